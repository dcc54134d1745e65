"""prune_layers: fewer decoder blocks: the n least important (ShortGPT), or one contiguous block (Gromov et al.).

A block adds its attention and MLP outputs to the residual stream; one whose output hardly differs from its
input (low block influence, small angular distance) does little, and dropping it is the cheapest cut.
`block: true` drops n consecutive layers where the hidden states n layers apart are closest (Gromov et al.
2024). Kept layers keep their order and are renumbered, per-head tensors and experts included, and per-layer
config lists (`layer_types`) follow their layers.
"""
from __future__ import annotations

from typing import Literal, Optional

from ..errors import SurgeryError
from ..importance import Importance, top
from ..state import ModelState
from .base import Exactness, OpContext, Promise, SizeValue, resolve_size
from .prune import PruneOp, Pruning, deferred, refuse_growth


class PruneLayers(PruneOp):
    op: Literal["prune_layers"]
    num_layers: Optional[SizeValue] = None
    drop: Optional[list[int]] = None
    block: bool = False
    importance: Optional[Literal["block_influence", "angular", "magnitude", "random"]] = None

    reads = ("num_hidden_layers", "layer_types", "layers", "attn", "mlp", "norms", "residual")
    writes = ("num_hidden_layers", "layer_types", "layers")
    summary = "remove decoder blocks: the least important (block influence, angular distance, magnitude) or listed ones"

    def apply(self, state: ModelState, ctx: OpContext) -> Promise:
        spec, arch = state.spec, state.spec.arch
        old = spec.num_layers
        if (self.num_layers is None) == (self.drop is None):
            raise SurgeryError("set either num_layers (how many remain) or drop (which layers go)", loc=("num_layers",))
        m = None
        if self.drop is not None:
            if self.importance is not None or self.block:
                raise SurgeryError("drop lists the layers that go: importance and block choose them otherwise; set one",
                                   loc=("drop",))
            dropped = self._checked_drop(old)
            importance, unit = None, "layer"
        else:
            new = resolve_size(self.num_layers, old, "num_layers")
            refuse_growth(new, old, "num_layers", "num_layers", "grow_layers")
            n = old - new
            importance = Importance(self.importance or Importance.BLOCK_INFLUENCE)
            unit = "block" if self.block and n > 1 else "layer"
            m = self.measured(state, unit, ctx, importance, block=n if unit == "block" else 1)
            if m is None:
                dropped = None
            elif unit == "block":
                start = int(m.scores.argmin())  # ties: the earliest block
                dropped = list(range(start, start + n))
            else:
                kept = top(m.scores, new)
                dropped = [j for j in range(old) if j not in kept]
        count = len(dropped) if dropped is not None else old - new
        provisional = dropped is None
        gone = set(dropped if dropped is not None else range(old - count, old))  # names only, until chosen
        kept = [j for j in range(old) if j not in gone]
        new = len(kept)
        label = f"prune_layers: {old} -> {new} layers"
        position = {j: p for p, j in enumerate(kept)}
        rename, removed = {}, []
        for name, info, node in list(state.items()):
            if info.layer is None:
                continue
            if info.layer in gone:
                removed.append(name)
            else:
                rename[name] = arch.parameter_name(info.role, info.kind, position[info.layer], info.head, info.expert)
        for name in removed:
            del state.tensors[name]
        state.new_slices = [s for s in state.new_slices if s.tensor not in removed]
        state.rename(rename)
        if provisional:  # which layers stay is measured when the run starts: no tensor of a layer can be computed yet
            for name in rename.values():
                state.tensors[name] = deferred(state.tensors[name], state.tensors[name].shape, label)
        spec.set_num_layers(new, origin=kept)
        pruning = Pruning(unit, importance, None if provisional else sorted(gone), new, old, m,
                          self.random_baseline() if importance is not None else
                          {"op": self.op, "num_layers": new, "importance": Importance.RANDOM.value})
        how = "listed" if importance is None else importance.value
        return Promise(Exactness.PRUNED, f"{count} of {old} layers removed ({how})", pruning.describe(), pruning)

    def _checked_drop(self, old: int) -> list[int]:
        seen: set[int] = set()
        for i, j in enumerate(self.drop):
            if not 0 <= j < old:
                raise SurgeryError(f"layer {j} is not a layer of the source (0..{old - 1})", loc=("drop", i))
            if j in seen:
                raise SurgeryError(f"layer {j} is listed twice", loc=("drop", i))
            seen.add(j)
        if not self.drop:
            raise SurgeryError("drop lists no layer: nothing to prune", loc=("drop",))
        if len(seen) >= old:
            raise SurgeryError(f"dropping all {old} layers leaves no model; keep at least one", loc=("drop",))
        return sorted(seen)
