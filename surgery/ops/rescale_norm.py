"""rescale_norm: norm weights and eps rescaled for a wider residual.

A zero-padded residual of width D has mean(x^2) = d/D of the old one. Scaling the norm weights by
sqrt(d/D) and eps by d/D restores every norm's output exactly (RMSNorm; LayerNorm too once its
mean is taken care of by `residual_fill: mean` or `patch_layernorm`). Gemma's norms scale their
gain 1 + w, not w.

eps is one config field, shared with the q/k norms (StableLM qk_layernorm, Qwen3, OLMo 2, Gemma 3),
whose inputs did not change. A norm of `s * x` with eps `s^2 * eps` is the norm of `x` with eps:
q/k projections (weights and biases) are scaled by sqrt(d/D) so those norms compute what they did.
"""
from __future__ import annotations

import math
from typing import Literal

from ..errors import SurgeryError
from ..state import ModelState
from .base import Exactness, Op, OpContext, Promise
from ..arch import TensorRole as R
from .slices import scale, scale_gain


class RescaleNorm(Op):
    op: Literal["rescale_norm"]

    reads = ("hidden_size", "residual")
    writes = ("eps", "norms")
    summary = "scale norm weights by sqrt(d/D) and eps by d/D after the residual grew from d to D"

    def apply(self, state: ModelState, ctx: OpContext) -> Promise:
        spec = state.spec
        d, big = spec.norm_width, spec.hidden_size
        if d == big:
            raise SurgeryError(
                f"nothing to rescale: the residual is still {big} wide, as the norms expect; put rescale_norm after a growth",
                loc=("op",),
            )
        ratio = d / big
        factor = math.sqrt(ratio)
        arch = spec.arch
        for name, info, node in list(state.items()):
            if info.role.is_norm and info.kind == "weight":
                label = f"rescale_norm: gain x sqrt({d}/{big})"
                state.tensors[name] = scale_gain(node, factor, arch, label) if arch.norm_offset else scale(node, factor, label)
            elif spec.qk_norm and info.role in (R.ATTN_Q, R.ATTN_K):
                state.tensors[name] = scale(node, factor, f"rescale_norm: {info.role.value} x sqrt({d}/{big}) for the shared eps")
        spec.set_eps(spec.eps * ratio)
        spec.norm_width = big
        notes = []
        if spec.qk_norm:
            notes.append(f"eps is shared with the q/k norms: q and k are scaled by sqrt({d}/{big}) so they see the eps they had")
        return Promise(Exactness.EXACT, f"norm weights x sqrt({d}/{big}), eps x {d}/{big}", notes)
