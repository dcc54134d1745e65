"""The mean and standard deviation of a tensor's values, with the same bits on every machine.

Random fills draw from N(mean, std) of the tensor they extend. torch's full reductions split their sums
across its threads (and a GPU's across its blocks), so the last bits of the statistics, and then every
value drawn from them, depended on the core count and the device: the same recipe wrote different
bytes on 1 and 2 cores. Here each 4096-value row is summed by numpy (pairwise, on one thread) and the
row sums are added exactly (`math.fsum`): no thread count or device enters. Two passes (mean, then the
squared deviations from it), each value read in float32.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy and torch load where data is touched: plans and `surgery validate` start without them
    import numpy as np
    import torch

ROW = 4096


def _values(t: torch.Tensor) -> np.ndarray:
    import torch

    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().reshape(-1).numpy()


def _total(a: np.ndarray) -> float:
    import numpy as np

    cut = a.size - a.size % ROW
    rows = a[:cut].reshape(-1, ROW).sum(axis=1).tolist() if cut else []
    return math.fsum(rows + [float(a[cut:].sum(dtype=np.float64))])


def mean(t: torch.Tensor) -> float:
    """The mean of every value of `t` (float64)."""
    a = _values(t)
    return _total(a) / a.size if a.size else math.nan


def std_mean(t: torch.Tensor) -> tuple[float, float]:
    """(std, mean) of every value of `t` (two or more); the std with Bessel's correction, as `torch.std`."""
    import numpy as np

    a = _values(t)
    n = a.size
    m = _total(a) / n
    d = np.subtract(a, np.float32(m))
    s1 = _total(d)
    np.square(d, out=d)
    var = (_total(d) - s1 * s1 / n) / (n - 1)
    return math.sqrt(max(var, 0.0)), m
