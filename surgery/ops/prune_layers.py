"""prune_layers: fewer decoder blocks: the n least important (ShortGPT), or one contiguous block (Gromov et al.).

A block adds its attention and MLP outputs to the residual stream; one whose output hardly differs from its
input (low block influence, small angular distance) does little, and dropping it is the cheapest cut.
`block: true` drops n consecutive layers where the hidden states n layers apart are closest (Gromov et al.
2024). Those are estimates from one pass; `importance: loss` measures instead the calibration loss without
each candidate (one pass per candidate) and drops the cheapest. Kept layers keep their order and are
renumbered, per-head tensors and experts included, and per-layer config lists (`layer_types`) follow their layers.
"""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

from ..errors import SurgeryError
from ..importance import Importance, top
from ..state import ModelState
from .base import Exactness, OpContext, Promise, SizeValue, checked_indices, resolve_size
from .grow_layers import SOURCE_LAYER
from .prune import PruneOp, Pruning, deferred, refuse_growth


class PruneLayers(PruneOp):
    unit_noun: ClassVar[str] = "layer"
    op: Literal["prune_layers"]
    num_layers: Optional[SizeValue] = None
    drop: Optional[list[int]] = None
    block: bool = False
    importance: Optional[Literal["block_influence", "angular", "magnitude", "loss", "random"]] = None

    reads = ("num_hidden_layers", "layer_types", "layers", "attn", "mlp", "norms", "residual")
    writes = ("num_hidden_layers", "layer_types", "layers")
    summary = ("remove decoder blocks: the least important (block influence, angular distance, magnitude, the measured loss "
               "without each) or listed ones")

    def apply(self, state: ModelState, ctx: OpContext) -> Promise:
        spec = state.spec
        old = spec.num_layers
        if (self.num_layers is None) == (self.drop is None):
            raise SurgeryError("set either num_layers (how many remain) or drop (which layers go)", loc=("num_layers",))
        unit, importance, m, dropped, count = self._choose(state, ctx)
        # until the choice is made (planning only) the last layers stand in for it, for the names alone
        kept = [j for j in range(old) if j not in set(dropped if dropped is not None else range(old - count, old))]
        new = len(kept)
        label = f"prune_layers: {old} -> {new} layers"
        keep_layers(state, kept, label, chosen=dropped is not None)
        baseline = self.random_baseline() if importance is not None else {"op": self.op, "num_layers": new, "importance": "random"}
        pruning = Pruning(unit, importance, dropped, new, old, m, baseline)
        how = "listed" if importance is None else importance.value
        return Promise(Exactness.PRUNED, f"{count} of {old} layers removed ({how})", pruning.describe(), pruning)

    def _choose(self, state: ModelState, ctx: OpContext):
        """(unit, importance, measurement, dropped layers or None until measured, how many go)."""
        old = state.spec.num_layers
        if self.drop is not None:
            if self.importance is not None or self.block:
                raise SurgeryError("drop lists the layers that go: importance and block choose them otherwise; set one",
                                   loc=("drop",))
            dropped = self._checked_drop(old)
            return "layer", None, None, dropped, len(dropped)
        new = resolve_size(self.num_layers, old, "num_layers")
        refuse_growth(new, old, "num_layers", "grow_layers")
        n = old - new
        importance = Importance(self.importance or Importance.BLOCK_INFLUENCE)
        unit = "block" if self.block and n > 1 else "layer"
        m = self.measured(state, unit, ctx, importance, block=n if unit == "block" else 1, keep_layers=keep_layers)
        if m is None:
            return unit, importance, None, None, n
        if unit == "block":
            start = int(m.scores.argmin())  # ties: the earliest block
            return unit, importance, m, list(range(start, start + n)), n
        kept = top(m.scores, new)
        return unit, importance, m, [j for j in range(old) if j not in kept], n

    def _checked_drop(self, old: int) -> list[int]:
        seen = set(checked_indices(self.drop, old, "drop", SOURCE_LAYER, noun="layer"))
        if not self.drop:
            raise SurgeryError("drop lists no layer: nothing to prune", loc=("drop",))
        if len(seen) >= old:
            raise SurgeryError(f"dropping all {old} layers leaves no model; keep at least one", loc=("drop",))
        return sorted(seen)


def keep_layers(state: ModelState, kept: list[int], label: str, chosen: bool = True) -> None:
    """The model with only the `kept` layers, in order: tensors renumbered, config lists with their layers."""
    renumber(state, kept, label, chosen)
    state.spec.set_num_layers(len(kept), origin=kept)


def renumber(state: ModelState, kept: list[int], label: str, chosen: bool = True) -> None:
    """Only the `kept` layers remain, renumbered in order (per-head and per-expert tensors with them); with
    `chosen` false the choice is made when the run starts, and no layer's tensor can be computed yet."""
    arch = state.spec.arch
    position = {j: p for p, j in enumerate(kept)}
    rename, removed = {}, []
    for name, info, node in list(state.items()):
        if info.layer is None:
            continue
        if info.layer in position:
            rename[name] = arch.parameter_name(info.role, info.kind, position[info.layer], info.head, info.expert)
        else:
            removed.append(name)
    for name in removed:
        del state.tensors[name]
    state.new_slices = [s for s in state.new_slices if s.tensor not in removed]
    state.rename(rename)
    if not chosen:
        for name in rename.values():
            state.tensors[name] = deferred(state.tensors[name], state.tensors[name].shape, label)
