"""What the three prune ops share: scoring units (now, or when the run starts), keeping the chosen ones.

A prune keeps, in every layer, the same number of units (a standard config loads it): the highest-scoring
ones by the op's `importance` (`surgery.importance`). Kept units keep their order, so a kept query head stays
in its kv group. Choices that need weights or data are made when the run starts, before any weight is
written (`OpContext.measure`); `surgery plan` says so, and its tensors for such a choice cannot be evaluated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from pydantic import field_validator

from ..errors import SurgeryError
from ..importance import Importance, Measurement, measure
from ..state import ModelState
from .base import Op, OpContext


@dataclass
class Pruning:
    """A prune's choice: per layer the units dropped (for `prune_layers`, one list of layers)."""

    unit: str
    importance: Importance | None  # None: listed in the recipe (prune_layers' drop)
    dropped: list | None  # None: chosen when the run starts
    kept_per_layer: int = 0
    of: int = 0
    measurement: Measurement | None = None
    random_baseline: dict = field(default_factory=dict)  # the same op with importance: random (its op fields)

    def describe(self, limit: int = 8) -> list[str]:
        how = "listed in the recipe" if self.importance is None else self.importance.value + (
            f" on {self.measurement.tokens} calibration tokens" if self.measurement is not None and self.measurement.tokens else "")
        if self.dropped is None:
            return [f"which {self.unit}s go is measured ({how}) when the run starts, before any weight is written; "
                    f"the report lists them"]
        if self.unit in ("layer", "block"):
            out = [f"dropped layers {self.dropped} of {self.of} (by {how})"]
            m = self.measurement
            if m is not None and self.importance != Importance.RANDOM:
                n = self.of - self.kept_per_layer
                each = "layer" if self.unit == "layer" else f"block of {n} layers (by its first)"
                what = f"calibration loss without each {each}" if self.importance == Importance.LOSS else \
                    f"{self.importance.value} of each {each}"
                shown = ", ".join(f"{i}: {float(v):.4g}" for i, v in enumerate(m.scores[:limit]))
                out.append(f"  {what}: {shown}" + (f", ... ({len(m.scores)} in all)" if len(m.scores) > limit else ""))
            return out
        out = [f"dropped {self.of - self.kept_per_layer} of {self.of} {self.unit}s per layer (by {how}):"]
        for layer, d in enumerate(self.dropped[:limit]):
            shown = ", ".join(map(str, d[:limit])) + (f", ... ({len(d)} in all)" if len(d) > limit else "")
            out.append(f"  layer {layer}: {shown}")
        if len(self.dropped) > limit:
            out.append(f"  ... and {len(self.dropped) - limit} more layers (the report lists every one)")
        return out


def _chosen_when_run():
    raise AssertionError("a prune's choice is made when the run starts: compile the plan with measure=True")


def deferred(node, shape: tuple[int, ...], label: str):
    """A tensor whose content depends on a choice not made yet (planning only)."""
    return node.map(lambda t: _chosen_when_run(), shape, f"{label} (chosen when the run starts)")


def keep_axis(state: ModelState, name: str, axis: int, keep: list[int] | None, new_size: int, label: str) -> None:
    """`state.tensors[name]` with only the `keep` positions of `axis` (None: not chosen yet)."""
    node = state.tensors[name]
    shape = list(node.shape)
    shape[axis] = new_size
    slices = [s for s in state.new_slices if s.tensor == name and s.axis == axis]
    if keep is None:
        state.tensors[name] = deferred(node, tuple(shape), label)
        state.new_slices = [s for s in state.new_slices if s not in slices]
        return
    import torch

    assert len(keep) == new_size, (name, len(keep), new_size)
    index = torch.tensor(keep, dtype=torch.long)
    state.tensors[name] = node.map(lambda t: t.index_select(axis, index.to(t.device)), tuple(shape), label, kind="move")
    position = {old: new for new, old in enumerate(keep)}
    for s in slices:  # units an earlier growth added and this prune keeps: still checked for gradient
        s.index = [position[i] for i in s.index if i in position]
    state.new_slices = [s for s in state.new_slices if s.index]


class PruneOp(Op):
    """Base of prune_mlp / prune_heads / prune_layers: `importance` decides what goes."""

    unit_noun: ClassVar[str] = "unit"

    @field_validator("importance", mode="before", check_fields=False)
    @classmethod
    def _loss_needs_layers(cls, v):
        """`loss` runs the model once per candidate: per layer that is L passes, per neuron or head far too many."""
        if v == Importance.LOSS.value and cls.unit_noun != "layer":
            raise ValueError(f"importance loss (one forward pass per candidate removed) is measured for layers only "
                             f"(prune_layers); for {cls.unit_noun}s use activation, magnitude or random")
        return v

    def measured(self, state: ModelState, unit: str, ctx: OpContext, importance: Importance, block: int = 1,
                 keep_layers=None) -> Measurement | None:
        if importance == Importance.RANDOM or ctx.measure:
            return measure(state, unit, importance, ctx, block, keep_layers)
        return None

    def random_baseline(self) -> dict:
        """This op's fields with importance: random (verification evaluates it beside the op)."""
        return {**self.model_dump(mode="json", by_alias=True), "importance": Importance.RANDOM.value}


def refuse_growth(new: int, old: int, field_name: str, grow_op: str, unchanged_too: bool = True) -> None:
    """A prune op asked to grow (or, with `unchanged_too`, to keep the size) is refused in one line."""
    if new > old:
        raise SurgeryError(f"{field_name} would grow from {old} to {new}; prune ops only remove ({grow_op} adds)",
                           loc=(field_name,))
    if unchanged_too and new == old:
        raise SurgeryError(f"{field_name} is already {old}: nothing to prune", loc=(field_name,))
