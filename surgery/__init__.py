"""surgery: declarative, verified model surgery for transformer language models.

Installed as the distribution `model-surgery` (PyPI's `surgery` is an unrelated project); the
import package and the command are `surgery`.
"""
__version__ = "0.1.0"
DISTRIBUTION = "model-surgery"
