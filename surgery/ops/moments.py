"""The mean and standard deviation of a tensor's values, with the same bits on every machine.

Random fills draw from N(mean, std) of the tensor they extend. torch's full reductions split their sums
across its threads (and a GPU's across its blocks), so the last bits of the statistics, and then every
value drawn from them, depended on the core count and the device: the same recipe wrote different
bytes on 1 and 2 cores. Here each 4096-value row is summed by numpy (pairwise, on one thread) and the
row sums are added exactly (`math.fsum`): no thread count or device enters. Two passes (mean, then the
squared deviations from it) over 4 MiB blocks of float32 values.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy and torch load where data is touched: plans and `surgery validate` start without them
    import numpy as np
    import torch

ROW = 4096
BLOCK = 256 * ROW  # values converted to float32 at a time (4 MiB): no copy of a whole tensor


def _blocks(t: torch.Tensor):
    import torch

    flat = t.detach().reshape(-1)
    for i in range(0, flat.numel(), BLOCK):
        yield flat[i:i + BLOCK].to(device="cpu", dtype=torch.float32).numpy()


def _row_sums(a: np.ndarray, into: list[float]) -> None:
    """Sums of each ROW values (the last row may be shorter: blocks hold whole rows but the last)."""
    import numpy as np

    cut = a.size - a.size % ROW
    if cut:
        into.extend(a[:cut].reshape(-1, ROW).sum(axis=1).tolist())
    if cut < a.size:
        into.append(float(a[cut:].sum(dtype=np.float64)))


def mean(t: torch.Tensor) -> float:
    """The mean of every value of `t` (float64)."""
    sums: list[float] = []
    for a in _blocks(t):
        _row_sums(a, sums)
    return math.fsum(sums) / t.numel() if t.numel() else math.nan


def std_mean(t: torch.Tensor) -> tuple[float, float]:
    """(std, mean) of every value of `t` (two or more); the std with Bessel's correction, as `torch.std`."""
    import numpy as np

    n = t.numel()
    m = mean(t)
    shift = np.float32(m)
    firsts: list[float] = []
    seconds: list[float] = []
    for a in _blocks(t):
        d = np.subtract(a, shift)
        _row_sums(d, firsts)
        np.square(d, out=d)
        _row_sums(d, seconds)
    s1 = math.fsum(firsts)
    var = (math.fsum(seconds) - s1 * s1 / n) / (n - 1)
    return math.sqrt(max(var, 0.0)), m
