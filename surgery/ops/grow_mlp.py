"""grow_mlp: more MLP neurons in every layer, exactly.

A neuron reads the residual through its gate/up rows and writes back through its down_proj column.
New neurons write through zero down_proj columns, so the function is kept in stock code for every
family. Under `init: trainable` their gate/up rows (and biases) are drawn from each tensor's own
statistics: with gate and up both zero a SwiGLU neuron computes silu(0) * 0 and never trains.
"""
from __future__ import annotations

from typing import Literal

from ..arch import WRITERS, Axis
from ..errors import SurgeryError
from ..state import ModelState
from .base import Exactness, Init, Op, OpContext, Promise, SizeValue, resolve_size
from .slices import Fill, append_dest, grow_axis


class GrowMlp(Op):
    op: Literal["grow_mlp"]
    intermediate_size: SizeValue
    init: Init = Init.TRAINABLE

    reads = ("intermediate_size", "num_hidden_layers")
    writes = ("intermediate_size", "mlp")
    summary = "add MLP neurons (intermediate_size); new neurons write through zero down_proj columns"

    def apply(self, state: ModelState, ctx: OpContext) -> Promise:
        spec = state.spec
        old = spec.intermediate_size
        new = resolve_size(self.intermediate_size, old, "intermediate_size")
        if new <= old:
            what = "is already" if new == old else f"would shrink from {old} to"
            raise SurgeryError(f"intermediate_size {what} {new}; only growth is supported", loc=("intermediate_size",))
        trainable = self.init == Init.TRAINABLE
        label = f"grow_mlp: intermediate {old} -> {new}"
        dest = append_dest(old)
        for name, info, node in list(state.items()):
            for axis, ax in enumerate(info.axes):
                if ax != Axis.INTER:
                    continue
                if info.role in WRITERS:  # down_proj: its new input columns must write nothing
                    grow_axis(state, name, axis, new, dest, Fill("zeros"), label, track="grow_mlp" if trainable else None)
                else:  # gate/up rows and biases: what the new neurons read
                    fill = Fill("random", ctx.seed_parts(name, "mlp")) if trainable else Fill("zeros")
                    grow_axis(state, name, axis, new, dest, fill, label)
        spec.set_intermediate_size(new)
        notes = [] if trainable else ["init: zeros leaves the new neurons dead (gate and up zero): they get no gradient"]
        return Promise(Exactness.EXACT, "new neurons write through zero down_proj columns", notes)
