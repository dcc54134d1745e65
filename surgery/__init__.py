"""surgery: declarative, verified model surgery for transformer language models."""
__version__ = "0.1.0"
