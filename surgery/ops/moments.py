"""The mean and standard deviation of a tensor's values, with the same bits on every machine.

Random fills draw from N(mean, std) of the tensor they extend. torch's full reductions split their sums
across its threads (and a GPU's across its blocks), so the last bits of the statistics, and then every
value drawn from them, depended on the core count and the device: the same recipe wrote different
bytes on 1 and 2 cores. Here each 4096-value row is summed by numpy (pairwise, on one thread) and the
row sums are added exactly (`math.fsum`): no thread count or device enters. Two passes (mean, then the
squared deviations from it) over 4 MiB blocks of float32 values. A tensor may also come as consecutive
blocks (`mean_of`, `std_mean_of`: its row blocks, computed one at a time): the rows of 4096 values are those
of the whole tensor wherever the blocks cut, so the statistics have the same bits.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:  # numpy and torch load where data is touched: plans and `surgery validate` start without them
    import numpy as np
    import torch

ROW = 4096
BLOCK = 256 * ROW  # values converted to float32 at a time (4 MiB): no copy of a whole tensor


def _pieces(blocks: Iterable[torch.Tensor]):
    """The values of `blocks` (tensors, in order: one tensor's flat values cut anywhere) as float32 arrays of at most BLOCK."""
    import torch

    for t in blocks:
        flat = t.detach().reshape(-1)
        for i in range(0, flat.numel(), BLOCK):
            yield flat[i:i + BLOCK].to(device="cpu", dtype=torch.float32).numpy()


class _RowSums:
    """Sums of each ROW consecutive values fed in, however the feeding cuts them: a row split between two
    pieces is completed from the next one, so the sums are those of the whole tensor's rows."""

    def __init__(self):
        self.sums: list[float] = []
        self._carry: np.ndarray | None = None

    def feed(self, a: np.ndarray) -> None:
        import numpy as np

        if self._carry is not None:
            need = ROW - self._carry.size
            if a.size < need:
                self._carry = np.concatenate([self._carry, a])
                return
            self.sums.extend(np.concatenate([self._carry, a[:need]]).reshape(1, ROW).sum(axis=1).tolist())
            self._carry, a = None, a[need:]
        cut = a.size - a.size % ROW
        if cut:
            self.sums.extend(a[:cut].reshape(-1, ROW).sum(axis=1).tolist())
        if cut < a.size:
            self._carry = a[cut:].copy()

    def total(self) -> float:
        """The exact sum of the row sums; the last, shorter row summed in float64."""
        import numpy as np

        tail = [float(self._carry.sum(dtype=np.float64))] if self._carry is not None and self._carry.size else []
        return math.fsum(self.sums + tail)


def mean(t: torch.Tensor) -> float:
    """The mean of every value of `t` (float64)."""
    return mean_of(lambda: (t,), t.numel())


def std_mean(t: torch.Tensor) -> tuple[float, float]:
    """(std, mean) of every value of `t` (two or more); the std with Bessel's correction, as `torch.std`."""
    return std_mean_of(lambda: (t,), t.numel())


def mean_of(blocks: Callable[[], Iterable[torch.Tensor]], n: int) -> float:
    """`mean` of a tensor of `n` values given as consecutive blocks (`blocks()` yields them, e.g. row blocks):
    the same bits however it is cut."""
    sums = _RowSums()
    for a in _pieces(blocks()):
        sums.feed(a)
    return sums.total() / n if n else math.nan


def std_mean_of(blocks: Callable[[], Iterable[torch.Tensor]], n: int) -> tuple[float, float]:
    """`std_mean` of a tensor given as consecutive blocks: two passes, so `blocks()` is called twice."""
    import numpy as np

    m = mean_of(blocks, n)
    shift = np.float32(m)
    firsts, seconds = _RowSums(), _RowSums()
    for a in _pieces(blocks()):
        d = np.subtract(a, shift)
        firsts.feed(d)
        np.square(d, out=d)
        seconds.feed(d)
    s1 = firsts.total()
    var = (seconds.total() - s1 * s1 / n) / (n - 1)
    return math.sqrt(max(var, 0.0)), m
