"""`python -m surgery`: the command line (`surgery.cli`)."""
from .cli import entry

entry()
