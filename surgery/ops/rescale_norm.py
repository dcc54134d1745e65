"""rescale_norm: norm weights and eps rescaled for a wider residual.

A zero-padded residual of width D has mean(x^2) = d/D of the old one. Scaling the norm weights by
sqrt(d/D) and eps by d/D restores every norm's output exactly (RMSNorm; LayerNorm too once its
mean is taken care of by `residual_fill: mean` or `patch_layernorm`).
"""
from __future__ import annotations

import math
from typing import Literal

from ..errors import SurgeryError
from ..state import ModelState
from .base import Exactness, Op, OpContext, Promise
from .slices import scale


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
        for name, info, node in list(state.items()):
            if info.role.is_norm and info.kind == "weight":
                state.tensors[name] = scale(node, factor, f"rescale_norm: x sqrt({d}/{big})")
        spec.set_eps(spec.eps * ratio)
        spec.norm_width = big
        notes = []
        if spec.qk_norm:
            # eps is shared with the per-head q/k norms: they owe whatever scale their head_dim growth needs
            owed = spec.meta.get("qk_eps_owed", 1.0) / ratio
            spec.meta["qk_eps_owed"] = owed
            if abs(owed - 1) > 1e-12:
                notes.append(f"eps is shared with the per-head q/k norms, which need it x{owed:g} of what they get: slightly inexact")
        return Promise(Exactness.EXACT, f"norm weights x sqrt({d}/{big}), eps x {d}/{big}", notes)
