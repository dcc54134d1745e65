"""Growing the residual stream: the one change every width growth shares.

Writers (embedding columns, o_proj and down_proj rows and biases) decide what the new dims carry:
zeros (`residual_fill: zero`) or the mean of the old dims (`residual_fill: mean`, which keeps
stock LayerNorm exact once `rescale_norm` follows). RMSNorm has no mean to keep: dims holding the
mean add (D-d) m^2 to its sum of squares, which no rescaling undoes, so mean fill is refused there
(zero fill with `rescale_norm` is exact). Readers may hold anything on the new input
columns while the norm output there is zero; under `init: trainable` they are drawn from the
tensor's own statistics so the new dims train.
"""
from __future__ import annotations

from ..arch import WRITERS, Axis
from ..errors import SurgeryError
from ..state import ModelState
from .base import Init, OpContext
from .slices import Fill, append_dest, grow_axis


def grow_residual(state: ModelState, new_width: int, init: Init, fill: str, ctx: OpContext, op: str) -> None:
    spec = state.spec
    d = spec.hidden_size
    if new_width == d:
        return
    if fill == "mean" and spec.arch.norm == "rmsnorm":
        raise SurgeryError(
            f"mean fill keeps a LayerNorm's mean; {spec.arch.name} uses RMSNorm, where dims filled with the mean "
            "change every norm's scale (not exact); use residual_fill: zero, which rescale_norm keeps exact",
            loc=("residual_fill",),
        )
    if fill == "mean" and spec.live_width:
        raise SurgeryError(
            "residual_fill: mean cannot follow patch_layernorm (the patched norm centres over the original dims only)",
            loc=("residual_fill",),
        )
    dest = append_dest(d)
    trainable = init == Init.TRAINABLE
    for name, info, node in list(state.items()):
        for axis, ax in enumerate(info.axes):
            if ax != Axis.RESID:
                continue
            label = f"{op}: residual {d} -> {new_width}"
            writer = info.role in WRITERS
            if info.role.is_norm:
                f = Fill("const_mean" if (trainable and info.kind == "weight") else "zeros")
                grow_axis(state, name, axis, new_width, dest, f, label)
            elif writer:
                f = Fill("mean") if fill == "mean" else Fill("zeros")
                grow_axis(state, name, axis, new_width, dest, f, label, track=op if trainable and fill != "mean" else None)
            else:
                f = Fill("random", ctx.seed_parts(name, "resid")) if trainable else Fill("zeros")
                grow_axis(state, name, axis, new_width, dest, f, label)
    spec.set_hidden_size(new_width)
    if fill == "mean":
        spec.residual_fill = "mean"
    elif spec.arch.norm == "layernorm" and not spec.live_width:
        spec.meta["layernorm_zero_padded"] = True
    if fill != "mean":
        spec.meta.setdefault("signal_width", d)
