"""prune_mlp: fewer MLP neurons in every layer, the least important ones dropped (Minitron's width pruning).

A neuron reads the residual through its gate/up rows and writes back through its down_proj column: removing
those rows and that column removes exactly its contribution. `activation` importance is that contribution's
mean size on the calibration tokens, so the neurons whose removal changes the residual least go first.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from ..arch import Axis
from ..errors import SurgeryError
from ..importance import Importance, top
from ..state import ModelState
from .base import Exactness, OpContext, Promise, SizeValue, resolve_size
from .prune import PruneOp, Pruning, keep_axis, refuse_growth


class PruneMlp(PruneOp):
    unit_noun: ClassVar[str] = "neuron"
    op: Literal["prune_mlp"]
    intermediate_size: SizeValue
    importance: Literal["activation", "magnitude", "random"] = "activation"

    reads = ("intermediate_size", "mlp", "attn", "layers", "norms", "residual")
    writes = ("intermediate_size", "mlp")
    summary = "remove MLP neurons (intermediate_size), the least important by measured activation, magnitude or at random"

    def apply(self, state: ModelState, ctx: OpContext) -> Promise:
        spec = state.spec
        if spec.arch.is_moe:
            raise SurgeryError(f"{spec.arch.name} is a mixture of experts: prune_mlp prunes a dense MLP "
                               "(pruning experts' neurons is not supported)", loc=("op",))
        old = spec.intermediate_size
        new = resolve_size(self.intermediate_size, old, "intermediate_size")
        refuse_growth(new, old, "intermediate_size", "grow_mlp")
        importance = Importance(self.importance)
        m = self.measured(state, "neuron", ctx, importance)
        keep = None if m is None else [top(m.scores[layer], new) for layer in range(spec.num_layers)]
        label = f"prune_mlp: intermediate {old} -> {new}"
        for name, info, node in list(state.items()):
            for axis, ax in enumerate(info.axes):
                if ax == Axis.INTER:
                    keep_axis(state, name, axis, None if keep is None else keep[info.layer], new, label)
        spec.set_intermediate_size(new)
        dropped = None if keep is None else [sorted(set(range(old)) - set(k)) for k in keep]
        pruning = Pruning("neuron", importance, dropped, new, old, m, self.random_baseline())
        return Promise(Exactness.PRUNED, f"{old - new} of {old} MLP neurons per layer removed (by {importance.value})",
                       pruning.describe(), pruning)
