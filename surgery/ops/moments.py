"""The mean and standard deviation of a tensor's values, with the same bits on every machine.

Random fills draw from N(mean, std) of the tensor they extend. torch's full reductions split their sums
across its threads (and a GPU's across its blocks), so the last bits of the statistics, and then every
value drawn from them, depended on the core count and the device: the same recipe wrote different
bytes on 1 and 2 cores. Here each 4096-value row is summed by numpy (pairwise, on one thread) and the
row sums are added exactly (`math.fsum`): no thread count or device enters. The standard deviation comes
from the same single pass over 4 MiB blocks of float32 values: each row's squared deviations from its
own mean, combined across rows in float64 (Chan et al.'s pairwise update, exact sums): the source is
read once, where a pass for the mean and another for the deviations from it read it twice (a random
fill's statistics were the largest cost of an 8B grow_heads). A tensor may also come as consecutive
blocks (`mean_of`, `std_mean_of`: its row blocks, computed one at a time): the rows of 4096 values are those
of the whole tensor wherever the blocks cut, so the statistics have the same bits.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

if TYPE_CHECKING:  # numpy and torch load where data is touched: plans and `surgery validate` start without them
    import numpy as np
    import torch

ROW = 4096
BLOCK = 256 * ROW  # values converted to float32 at a time (4 MiB): no copy of a whole tensor


def _pieces(blocks: Iterable[torch.Tensor]):
    """The values of `blocks` (tensors, in order: one tensor's flat values cut anywhere) as float32 arrays of at most
    BLOCK, each valid until the next is asked for: other dtypes are converted into one reused buffer (a fresh
    allocation per piece cost page faults on every one)."""
    import torch

    buf = None
    for t in blocks:
        flat = t.detach().reshape(-1)
        for i in range(0, flat.numel(), BLOCK):
            part = flat[i:i + BLOCK]
            if part.dtype == torch.float32 and part.device.type == "cpu":
                yield part.numpy()
                continue
            if buf is None:
                buf = torch.empty(BLOCK, dtype=torch.float32)
            yield buf[:part.numel()].copy_(part).numpy()


def _rows(pieces: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """The values of `pieces` (one tensor's flat float32 values, cut anywhere) as 2-D arrays of whole ROW-value
    rows, a row split between pieces completed from the next; then the last, shorter row (one row of fewer values)."""
    import numpy as np

    carry = None
    for a in pieces:
        if carry is not None:
            need = ROW - carry.size
            if a.size < need:
                carry = np.concatenate([carry, a])
                continue
            yield np.concatenate([carry, a[:need]]).reshape(1, ROW)
            carry, a = None, a[need:]
        cut = a.size - a.size % ROW
        if cut:
            yield a[:cut].reshape(-1, ROW)
        if cut < a.size:
            carry = a[cut:].copy()
    if carry is not None and carry.size:
        yield carry.reshape(1, -1)


def _row_sums(rows: np.ndarray) -> np.ndarray:
    """Each row's sum in float64: whole rows summed in float32 (numpy's pairwise sum), the shorter last row in float64."""
    import numpy as np

    return rows.sum(axis=1, dtype=np.float64) if rows.shape[1] < ROW else rows.sum(axis=1).astype(np.float64)


def _exact_sum(parts: list[np.ndarray]) -> float:
    """The exactly rounded sum of every value of `parts` (float64 arrays): the same whatever their order."""
    import numpy as np

    return math.fsum(np.concatenate(parts).tolist())


def mean(t: torch.Tensor) -> float:
    """The mean of every value of `t` (float64)."""
    return mean_of(lambda: (t,), t.numel())


def std_mean(t: torch.Tensor) -> tuple[float, float]:
    """(std, mean) of every value of `t` (two or more); the std with Bessel's correction, as `torch.std`."""
    return std_mean_of(lambda: (t,), t.numel())


def mean_of(blocks: Callable[[], Iterable[torch.Tensor]], n: int) -> float:
    """`mean` of a tensor of `n` values given as consecutive blocks (`blocks()` yields them, e.g. row blocks):
    the same bits however it is cut."""
    sums = [_row_sums(r) for r in _rows(_pieces(blocks()))]
    return _exact_sum(sums) / n if n else math.nan


def std_mean_of(blocks: Callable[[], Iterable[torch.Tensor]], n: int) -> tuple[float, float]:
    """`std_mean` of a tensor given as consecutive blocks, in one pass (`blocks()` is called once). The mean is
    `mean_of`'s, bit for bit. The sum of squared deviations is every row's own, taken from its mean rounded to
    float32 and corrected for that rounding, plus each row's count times its mean's squared distance from the
    whole mean (float64): no cancellation between rows, however far the values sit from zero."""
    import numpy as np

    sums, counts, means, squares = [], [], [], []
    for r in _rows(_pieces(blocks())):
        width = r.shape[1]
        s = _row_sums(r)
        shift = s / width if width < ROW else (s / width).astype(np.float32)
        d = (r.astype(np.float64) if width < ROW else r) - shift[:, None]
        first = _row_sums(d)
        np.square(d, out=d)
        sums.append(s)
        counts.append(np.full(len(s), float(width)))
        means.append(shift + first / width)
        squares.append(_row_sums(d) - first * first / width)
    if not sums:
        return math.nan, math.nan
    c, mu = np.concatenate(counts), np.concatenate(means)
    centre = _exact_sum([c * mu]) / n
    var = (_exact_sum(squares) + _exact_sum([c * np.square(mu - centre)])) / (n - 1)
    return math.sqrt(max(var, 0.0)), _exact_sum(sums) / n
