"""surgery: declarative, verified model surgery for transformer language models.

Installed as the distribution `model-surgery` (PyPI's `surgery` is an unrelated project); the
import package and the command are `surgery`.
"""
__version__ = "0.1.0"
DISTRIBUTION = "model-surgery"

import os as _os

# torch's OpenMP threads spin while they wait for work. A run keeps reading, hashing and writing on
# other threads, so spinning threads take the cores those need: on 2 cores a bf16 grow_mlp spent
# 13-14 s of user CPU instead of 6 s (benchmarks/RESULTS.md). Sleeping waiters change no result
# (the number of threads, hence every reduction's order, stays torch's). Read when torch loads;
# an explicit setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
