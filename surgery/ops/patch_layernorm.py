"""patch_layernorm: the article's exact LayerNorm, shipped with the checkpoint.

Stock LayerNorm subtracts the mean over all D dims, and zero-padded dims pull that mean down: no
choice of weights undoes it (the article's +0.5%). The patched norm centres over the original
`live_width` dims only; with `rescale_norm` handling the variance it is exact. The output ships
`modeling_surgery.py` under a model_type of its own with an `auto_map` (`surgery.modeling`), so
`trust_remote_code=True` loads it and stock loading fails instead of computing something else.
"""
from __future__ import annotations

from typing import Literal

from ..errors import SurgeryError
from ..modeling import MODELING_FILE, PATCHED_MODEL_TYPES
from ..state import ModelState
from .base import Exactness, Op, OpContext, Promise

__all__ = ["MODELING_FILE", "PatchLayerNorm"]


class PatchLayerNorm(Op):
    op: Literal["patch_layernorm"]

    reads = ("residual",)
    writes = ("model_code",)
    summary = "LayerNorm that centres over the original dims only (exact with rescale_norm; ships model code)"

    def apply(self, state: ModelState, ctx: OpContext) -> Promise:
        spec = state.spec
        if spec.arch.norm != "layernorm" or not spec.arch.patched_class:
            raise SurgeryError(
                f"patch_layernorm applies to LayerNorm models; {spec.arch.name} uses RMSNorm, which rescale_norm already keeps exact",
                loc=("op",),
            )
        if spec.live_width:
            raise SurgeryError("the LayerNorm is already patched", loc=("op",))
        signal = spec.meta.signal_width
        if signal is None or signal == spec.hidden_size:
            raise SurgeryError("nothing to patch: no zero-padded residual dims; put patch_layernorm after a growth", loc=("op",))
        spec.config["surgery_live_width"] = signal
        spec.meta.layernorm_zero_padded = False
        shipped = next(k for k, v in PATCHED_MODEL_TYPES.items() if v == spec.arch.name)
        return Promise(
            Exactness.EXACT_SHIPPED_CODE,
            f"LayerNorm centres over the first {signal} dims; loads with trust_remote_code=True",
            [f"the output's model_type is {shipped}: stock transformers refuses it without trust_remote_code=True "
             f"(its stock class would centre over all {spec.hidden_size} dims and compute something else)"],
        )
