"""Growing one axis of a tensor: where the old entries go, what fills the new ones.

Every growth reduces to `grow_axis`: old entries scattered to `dest` positions of a longer axis,
the remaining positions filled by a `Fill`. Heads, head_dim, MLP neurons and the residual stream
differ only in the `dest` they compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..lazy import AxisGrowth, LazyTensor, generator
from ..state import ModelState, NewSlice
from . import moments

if TYPE_CHECKING:  # torch loads where data is touched: plans and `surgery validate` start without it
    import torch


@dataclass(frozen=True)
class Fill:
    """How new positions are filled.

    zeros: padding (writers, or `init: zeros`). random: normal with the old tensor's own mean
    and std (readers under `init: trainable`). mean: the mean of the old entries along the axis
    (writers under `residual_fill: mean`). const_mean: the old tensor's overall mean (norm weights
    on new dims, kept non-zero so gradient reaches them). ones: per-head norms of new heads.
    """

    kind: str
    seed: tuple = ()
    value: float = 0.0  # for "const"

    @property
    def reads_values(self) -> bool:
        """Whether the fill depends on the old entries' values (else only on shape and dtype)."""
        return self.kind not in CONSTANT_FILLS

    @property
    def fixed(self) -> tuple[float, ...]:
        """The one value a constant fill writes; empty where the fill reads or draws its values."""
        return ({"zeros": 0.0, "ones": 1.0}.get(self.kind, self.value),) if self.kind in CONSTANT_FILLS else ()

    @property
    def lazy_kind(self) -> str | None:
        """The `LazyTensor.kind` of a growth with this fill (None: evaluated in the compute dtype)."""
        return "move" if self.kind in CONSTANT_FILLS else "stats_fill" if self.kind in STATS_FILLS else None

    def constant(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        import torch
        return torch.full(tuple(shape), self.fixed[0], dtype=dtype, device=device)

    def values(self, old: torch.Tensor, axis: int, n: int) -> torch.Tensor:
        import torch
        shape = list(old.shape)
        shape[axis] = n
        if not self.reads_values:
            return self.constant(shape, old.dtype, old.device)
        if self.kind == "mean":
            return old.mean(dim=axis, keepdim=True).expand(shape).clone()
        if self.kind == "const_mean":
            return old.new_full(shape, moments.mean(old) if old.numel() else 1.0)
        if self.kind == "random":
            std, mean = moments.std_mean(old) if old.numel() > 1 else (0.02, moments.mean(old) if old.numel() else 0.0)
            if not std > 0:
                std = 0.02
            draw = torch.randn(shape, generator=generator(*self.seed), dtype=torch.float32)
            return draw.mul_(std).add_(mean).to(device=old.device, dtype=old.dtype)  # in place: same values
        raise ValueError(self.kind)


CONSTANT_FILLS = ("zeros", "ones", "const")  # moves: exact in a dtype that represents the value (`lazy.storage_exact`)
STATS_FILLS = ("random",)  # drawn in float32 from the input's float32 statistics, rounded once


def _run(index: torch.Tensor) -> int | None:
    """The start of `index` when it is one ascending run (a slice), else None."""
    n = index.numel()
    if n and int(index[-1]) - int(index[0]) == n - 1 and (n == 1 or bool((index[1:] - index[:-1] == 1).all())):
        return int(index[0])
    return None


def _place(out: torch.Tensor, axis: int, index: torch.Tensor, values: torch.Tensor) -> None:
    start = _run(index)
    if start is None:
        out.index_copy_(axis, index, values)
    else:  # a plain slice copy: no index arithmetic
        out.narrow(axis, start, index.numel()).copy_(values)


def scatter_axis(old: torch.Tensor, axis: int, new_size: int, dest: torch.Tensor, fill: Fill) -> torch.Tensor:
    import torch
    shape = list(old.shape)
    shape[axis] = new_size
    out = old.new_empty(shape)
    dest = dest.to(old.device)
    _place(out, axis, dest, old)
    mask = torch.ones(new_size, dtype=torch.bool, device=old.device)
    mask[dest] = False
    missing = mask.nonzero().flatten()
    if missing.numel():
        _place(out, axis, missing, fill.values(old, axis, missing.numel()))
    return out


def missing_positions(new_size: int, dest: list[int]) -> list[int]:
    taken = set(dest)
    return [i for i in range(new_size) if i not in taken]


def grow_axis(
    state: ModelState,
    name: str,
    axis: int,
    new_size: int,
    dest: list[int],
    fill: Fill,
    label: str,
    track: str | None = None,
) -> None:
    """Replace `state.tensors[name]` by its growth along `axis`; `track` records new slices."""
    import torch
    node = state.tensors[name]
    assert len(dest) == node.shape[axis], (name, axis, len(dest), node.shape)
    if new_size == node.shape[axis] and dest == list(range(new_size)):
        return
    shape = list(node.shape)
    shape[axis] = new_size
    dest_t = torch.tensor(dest, dtype=torch.long)
    grown = node.map(lambda t: scatter_axis(t, axis, new_size, dest_t, fill), tuple(shape), label, kind=fill.lazy_kind,
                     fixed=fill.fixed)
    grown.growth = AxisGrowth(axis, new_size, dest_t, fill)
    state.tensors[name] = grown
    for s in state.new_slices:
        if s.tensor == name and s.axis == axis:
            s.index = [dest[i] for i in s.index]
    if track:
        new = missing_positions(new_size, dest)
        if new:
            state.new_slices.append(NewSlice(name, axis, new, track))


def head_dest(old_heads: int, head_dim: int, head_positions: list[int]) -> list[int]:
    """Element positions of whole heads moved to `head_positions` (head_dim unchanged)."""
    return [p * head_dim + i for p in head_positions for i in range(head_dim)]


def append_dest(old_size: int) -> list[int]:
    return list(range(old_size))


def scale(node: LazyTensor, factor: float, label: str) -> LazyTensor:
    return node.map(lambda t: t * factor, label=label)


def scale_gain(node: LazyTensor, factor: float, arch, label: str) -> LazyTensor:
    """A norm weight whose gain (Gemma: 1 + w) is multiplied by `factor`."""
    if not arch.norm_offset:
        return scale(node, factor, label)
    return node.map(lambda t: arch.weight_for_gain(arch.gain(t) * factor), label=label)
