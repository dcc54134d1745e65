"""Lazy tensors: the tensor-level graph that ops build and the executor walks.

An op never touches data. It maps each `LazyTensor` of the model state to a new one whose `fn`
computes it from its `inputs`. Planning reads only shapes; executing evaluates one output tensor
at a time, so memory holds one tensor's chain of work, never the model (and a large tensor whose
nodes all have row rules, `rowwise`, one block of its rows at a time).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Protocol

if TYPE_CHECKING:  # torch loads where data is touched: plans and `surgery validate` start without it
    import torch


class RowRule:
    """How a node's output rows come from its inputs' rows (subclasses: per op)."""

    def align(self, node: LazyTensor) -> int:
        """Rows a block should be a multiple of (a random draw's block): efficiency only, never bits."""
        return 1

    def statistics(self, node: LazyTensor, blocks: Callable[[int], Iterable[torch.Tensor]]):
        """What the rows need from whole inputs (a fill's std and mean), computed from their blocks."""
        return None

    def stored_statistics(self, node: LazyTensor) -> bool:
        """Whether `statistics` takes a stored input's blocks in their storage dtype (it converts them a few MiB at
        a time itself): no float32 copy of each block is made for it."""
        return False

    def rows(self, node: LazyTensor, start: int, stop: int, fetch: Callable[[int, int, int], torch.Tensor], stats) -> torch.Tensor:
        raise NotImplementedError



class TensorReader(Protocol):
    def load(self, name: str) -> torch.Tensor: ...


class GrowthFill(Protocol):
    """What fills the new entries of an `AxisGrowth` (`ops.slices.Fill`), as the writer uses it."""

    kind: str

    @property
    def reads_values(self) -> bool: ...

    def values(self, old: torch.Tensor, axis: int, n: int) -> torch.Tensor: ...

    def constant(self, shape, dtype: torch.dtype, device) -> torch.Tensor: ...


@dataclass(frozen=True, eq=False)
class AxisGrowth:
    """What a growth's `fn` does, as data: old entry i goes to position dest[i] of an axis of new_size,
    the rest take `fill`. The writer reads it to copy the old entries' bytes by kernel."""

    axis: int
    new_size: int
    dest: torch.Tensor  # int64, one per old entry: the tensor the growth's fn is given, not a copy
    fill: GrowthFill


@dataclass(eq=False)
class LazyTensor:
    shape: tuple[int, ...]
    dtype: torch.dtype
    fn: Callable[..., torch.Tensor] | None = None  # None: read `source` from the checkpoint
    inputs: tuple["LazyTensor", ...] = ()
    label: str = ""
    source: str | None = None
    deterministic_seed: int | None = field(default=None, repr=False)
    # What `fn` does to values, for evaluating in the storage dtype (`storage_exact`): "move" places
    # input elements and the `fixed` values only (a constant is a move without inputs); "stats_fill"
    # also fills from fp32 statistics of its input, rounded once; None: arithmetic, evaluated in the
    # compute dtype.
    kind: str | None = field(default=None, repr=False)
    # The values a "move" writes besides its inputs' elements (a pad's 0, a norm's 1): it moves
    # exactly into a dtype only where each of them is representable there (0.1 is not, in bfloat16).
    fixed: tuple[float, ...] = field(default=(), repr=False)
    # Set when `fn` scatters its one input along an axis and fills the rest (`ops.slices.grow_axis`):
    # the writer then copies the kept elements' bytes from the source file instead of computing them.
    growth: AxisGrowth | None = field(default=None, repr=False)
    # How `fn` computes a block of output rows from its inputs' rows (`RowRule`, `rowwise`); None: only whole.
    rows: RowRule | None = field(default=None, repr=False)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...] | None = None, label: str = "",
            kind: str | None = None, fixed: tuple[float, ...] = (), rows: RowRule | None = None) -> "LazyTensor":
        return LazyTensor(tuple(shape if shape is not None else self.shape), self.dtype, fn, (self,), label, kind=kind,
                          fixed=tuple(fixed), rows=rows)


def read(name: str, shape, dtype: torch.dtype) -> LazyTensor:
    return LazyTensor(tuple(shape), dtype, None, (), f"read {name}", source=name)


def constant(shape, dtype: torch.dtype, fill: Callable[[tuple[int, ...]], torch.Tensor], label: str) -> LazyTensor:
    """A tensor computed from nothing (a random draw, a calibrated router): evaluated in the compute dtype."""
    return LazyTensor(tuple(shape), dtype, lambda: fill(tuple(shape)), (), label)


def full(shape, dtype: torch.dtype, value: float, label: str) -> LazyTensor:
    """A tensor of one fixed value (zero writers, unit norms): a move, exact in any dtype that represents `value`."""
    def fill():
        import torch
        return torch.full(tuple(shape), value, dtype=torch.float32 if representable(value, torch.float32) else torch.float64)

    return LazyTensor(tuple(shape), dtype, fill, (), label, kind="move", fixed=(float(value),))


def representable(value: float, dtype: torch.dtype) -> bool:
    """Whether `dtype` holds `value` exactly (0.1 rounds in every binary format; 0, 1, -1, 0.5 do not)."""
    import torch
    return math.isfinite(value) and float(torch.tensor(value, dtype=torch.float64).to(dtype)) == value


def stable_seed(*parts) -> int:
    """A seed from names, not from visiting order: the same recipe draws the same bits on any device."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def generator(*parts) -> torch.Generator:
    import torch
    g = torch.Generator(device="cpu")
    g.manual_seed(stable_seed(*parts))
    return g


def storage_exact(node: LazyTensor, dtype: torch.dtype) -> bool:
    """Whether evaluating `node` in `dtype` (its sources' storage dtype) gives the bits of evaluating it
    in float32 and rounding once to `dtype`.

    True when every source is stored in `dtype` and every op only moves elements (copies, slices,
    concatenations) or writes fixed values `dtype` represents, so each value is exact in both; a
    fill drawn from statistics of its input is allowed only where that input holds no earlier drawn
    values (float32 holds them unrounded, `dtype` rounded, and their statistics would differ).
    """
    if not dtype.is_floating_point:
        return False

    def ok(n: LazyTensor) -> tuple[bool, bool]:  # (exact, holds drawn values)
        if n.fn is None:
            return n.dtype == dtype, False
        if n.kind == "move":
            if not (n.inputs or n.fixed) or not all(representable(v, dtype) for v in n.fixed):
                return False, False
        elif n.kind != "stats_fill" or not n.inputs:
            return False, False
        parts = [ok(i) for i in n.inputs]
        if not all(e for e, _ in parts):
            return False, False
        drawn = any(d for _, d in parts)
        if n.kind == "stats_fill" and drawn:
            return False, False
        return True, drawn or n.kind == "stats_fill"

    return ok(node)[0]


def evaluate(node: LazyTensor, reader: TensorReader, device: torch.device, compute_dtype: torch.dtype) -> torch.Tensor:
    """Compute one tensor; each intermediate result is dropped as soon as its last consumer ran."""
    import torch
    uses: dict[int, int] = {}
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        for i in n.inputs:
            uses[id(i)] = uses.get(id(i), 0) + 1
            stack.append(i)
    memo: dict[int, torch.Tensor] = {}

    def go(n: LazyTensor) -> torch.Tensor:
        key = id(n)
        if key in memo:
            t = memo[key]
        elif n.fn is None:
            t = reader.load(n.source).to(device=device, dtype=compute_dtype)
        else:
            args = [take(i) for i in n.inputs]
            t = n.fn(*args)
            del args
            t = t.to(device=device, dtype=compute_dtype) if t.is_floating_point() else t.to(device)
        if tuple(t.shape) != n.shape:
            raise AssertionError(f"{n.label}: computed shape {tuple(t.shape)} != planned {n.shape}")
        return t

    def take(n: LazyTensor) -> torch.Tensor:
        t = go(n)
        uses[id(n)] -= 1
        if uses[id(n)] > 0:
            memo[id(n)] = t
        else:
            memo.pop(id(n), None)
        return t

    return go(node)


def _chosen_when_run():
    raise AssertionError("a prune's choice is made when the run starts: compile the plan with measure=True")


def deferred(node, shape: tuple[int, ...], label: str):
    """A tensor whose content depends on a choice not made yet (planning only)."""
    return node.map(lambda t: _chosen_when_run(), shape, f"{label} (chosen when the run starts)")
