"""patch_layernorm: the article's exact LayerNorm, shipped with the checkpoint.

Stock LayerNorm subtracts the mean over all D dims, and zero-padded dims pull that mean down: no
choice of weights undoes it (the article's +0.5%). The patched norm centres over the original
`live_width` dims only; with `rescale_norm` handling the variance it is exact. The output ships
`modeling_surgery.py` and an `auto_map`, so `trust_remote_code=True` loads it.
"""
from __future__ import annotations

from typing import Literal

from ..errors import SurgeryError
from ..state import ModelState
from .base import Exactness, Op, OpContext, Promise

MODELING_FILE = "modeling_surgery.py"


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
        signal = spec.meta.get("signal_width")
        if signal is None or signal == spec.hidden_size:
            raise SurgeryError("nothing to patch: no zero-padded residual dims; put patch_layernorm after a growth", loc=("op",))
        spec.config["surgery_live_width"] = signal
        spec.config["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{spec.arch.patched_class}"}
        spec.meta.pop("layernorm_zero_padded", None)
        return Promise(
            Exactness.EXACT_SHIPPED_CODE,
            f"LayerNorm centres over the first {signal} dims; loads with trust_remote_code=True",
        )
