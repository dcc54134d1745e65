"""Growing one axis of a tensor: where the old entries go, what fills the new ones.

Every growth reduces to `grow_axis`: old entries scattered to `dest` positions of a longer axis,
the remaining positions filled by a `Fill`. Heads, head_dim, MLP neurons and the residual stream
differ only in the `dest` they compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from ..lazy import AxisGrowth, LazyTensor
from ..rowwise import ROW_LOCAL, RowEvaluator, RowRule, block_rows, draw_rows, in_order, randn_rows, separable, stored_as
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

    def statistics(self, n: int, blocks: Callable[[], Iterable[torch.Tensor]]) -> tuple[float, ...]:
        """What the fill reads from the whole old tensor of `n` values, which `blocks()` yields in order (whole,
        or its row blocks: the same bits); called once per pass. Empty for fills that read nothing or rows only."""
        if self.kind == "random":
            std, mean = moments.std_mean_of(blocks, n) if n > 1 else (0.02, moments.mean_of(blocks, n) if n else 0.0)
            return (std if std > 0 else 0.02, mean)
        if self.kind == "const_mean":
            return (moments.mean_of(blocks, n) if n else 1.0,)
        return ()

    def block(self, shape, stats: tuple[float, ...], start: int, stop: int, dtype: torch.dtype, device) -> torch.Tensor:
        """Rows [start, stop) (axis 0) of this fill for new entries of a whole `shape`, from the old tensor's
        `statistics`: random rows are drawn block by block (`rowwise.randn_rows`). Not for `mean`, which reads rows."""
        import torch
        rows = (stop - start,) + tuple(shape[1:])
        if not self.reads_values:
            return self.constant(rows, dtype, device)
        if self.kind == "const_mean":
            return torch.full(rows, stats[0], dtype=dtype, device=device)
        if self.kind == "random":
            std, mean = stats
            return randn_rows(shape, self.seed, start, stop).mul_(std).add_(mean).to(device=device, dtype=dtype)
        raise ValueError(self.kind)

    def values(self, old: torch.Tensor, axis: int, n: int, stats: tuple[float, ...] | None = None, start: int = 0,
               rows: int | None = None) -> torch.Tensor:
        """The `n` new entries along `axis` of `old`. In row blocks (axis > 0): `old` holds rows from `start` of a
        tensor of `rows` rows whose `statistics` are `stats`."""
        shape = list(old.shape)
        shape[axis] = n
        if self.kind == "mean":
            return old.mean(dim=axis, keepdim=True).expand(shape).clone()
        if stats is None:
            stats = self.statistics(old.numel(), lambda: (old,))
        whole = shape if rows is None else [rows] + shape[1:]
        return self.block(whole, stats, start, start + shape[0], old.dtype, old.device)

    def in_row_blocks(self, axis: int) -> bool:
        """Whether new entries along `axis` can be computed block by block of rows: this class's own fills (not
        subclasses, whose values read the whole old tensor), and `mean` only across a row (axis > 0)."""
        return type(self) is Fill and (self.kind != "mean" or axis > 0)


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


class _RowsFill:
    """A fill's values for one row block of a growth along axis > 0 (`scatter_axis` asks it for them)."""

    def __init__(self, fill: Fill, stats, start: int, rows: int):
        self.fill, self.stats, self.start, self.rows = fill, stats, start, rows

    def values(self, old, axis: int, n: int):
        return self.fill.values(old, axis, n, self.stats, self.start, self.rows)


def _new_shape(node: LazyTensor) -> list[int]:
    """The shape of a growth's new entries alone: its input's, with the grown axis holding the new positions."""
    g = node.growth
    shape = list(node.inputs[0].shape)
    shape[g.axis] = g.new_size - len(g.dest)
    return shape


class GrowthRows(RowRule):
    """A growth, row block by row block; statistics of the whole input first. Along axis > 0 each output row is
    its input row grown; along axis 0 a block's rows are old rows (moved) and new rows (the fill's next rows)."""

    def align(self, node):
        g = node.growth
        return draw_rows(_new_shape(node)) if g.axis and g.fill.kind == "random" else 1

    def statistics(self, node, blocks):
        return node.growth.fill.statistics(node.inputs[0].numel, lambda: blocks(0))

    def stored_statistics(self, node):
        return type(node.growth.fill) is Fill  # its statistics are `moments`'; a subclass's may read other dtypes

    def rows(self, node, start, stop, fetch, stats):
        import torch
        g = node.growth
        if g.axis:
            return scatter_axis(fetch(0, start, stop), g.axis, g.new_size, g.dest, _RowsFill(g.fill, stats, start, node.shape[0]))
        source = torch.full((g.new_size,), -1, dtype=torch.long)  # output row -> old row, -1 where new
        source[g.dest] = torch.arange(len(g.dest))
        block = source[start:stop]
        kept = block >= 0
        old_rows = block[kept]
        lo = int(old_rows.min()) if old_rows.numel() else 0
        old = fetch(0, lo, int(old_rows.max()) + 1 if old_rows.numel() else 0)
        out = old.new_empty((stop - start,) + tuple(node.shape[1:]))
        if old_rows.numel():
            _place(out, 0, kept.nonzero().flatten().to(old.device), old.index_select(0, (old_rows - lo).to(old.device)))
        new = (~kept).nonzero().flatten()
        if new.numel():
            first = start - int((source[:start] >= 0).sum())  # new rows before this block
            _place(out, 0, new.to(old.device), g.fill.block(_new_shape(node), stats, first, first + new.numel(), old.dtype, old.device))
        return out


GROWTH_ROWS = GrowthRows()


def new_entry_blocks(node: LazyTensor, reader, device, dtype: torch.dtype,
                     out_dtype: torch.dtype | None = None) -> Iterator[torch.Tensor] | None:
    """A growth's new entries (`_new_shape`) computed in `dtype` (and rounded to `out_dtype`, on the CPU, where given),
    in consecutive blocks of their rows, as `scatter_axis` computes them; the statistics the fill needs are computed
    now, from the input's row blocks. None where the fill needs its whole input at once (`Fill.in_row_blocks`)."""
    g = node.growth
    src, shape = node.inputs[0], _new_shape(node)
    if not g.fill.in_row_blocks(g.axis) or not separable(src):
        return None
    ev = RowEvaluator(src, reader, device, dtype)
    stats = g.fill.statistics(src.numel, ev.blocks) if g.fill.kind != "mean" else ()

    def block(a: int, b: int) -> torch.Tensor:
        if g.fill.kind == "mean":  # along axis > 0: the rows of the input
            t = g.fill.values(ev.rows(src, a, b), g.axis, shape[g.axis])
        else:
            t = g.fill.block(shape, stats, a, b, dtype, device)
        return t if out_dtype is None else stored_as(t, out_dtype)  # rounded on the threads that compute the blocks

    step = block_rows(shape, draw_rows(shape) if g.fill.kind == "random" else 1)
    spans = [(a, min(shape[0], a + step)) for a in range(0, shape[0], step)]
    return in_order([lambda a=a, b=b: block(a, b) for a, b in spans])


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
    if fill.in_row_blocks(axis):
        grown.rows = GROWTH_ROWS
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
    return node.map(lambda t: t * factor, label=label, rows=ROW_LOCAL)


def scale_gain(node: LazyTensor, factor: float, arch, label: str) -> LazyTensor:
    """A norm weight whose gain (Gemma: 1 + w) is multiplied by `factor`."""
    if not arch.norm_offset:
        return scale(node, factor, label)
    return node.map(lambda t: arch.weight_for_gain(arch.gain(t) * factor), label=label, rows=ROW_LOCAL)
