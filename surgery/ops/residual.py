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

from ..arch import WRITERS, Axis, TensorRole as R
from ..errors import SurgeryError
from ..state import ModelState
from .base import Init, OpContext
from .slices import Fill, append_dest, grow_axis, scale, scale_gain

ROUTERS = (R.MOE_ROUTER, R.SHARED_ROUTER)


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
            elif info.role in ROUTERS:  # zero columns: routing (a discrete top-k choice) sees exactly the old logits
                grow_axis(state, name, axis, new_width, dest, Fill("zeros"), label)
            else:
                f = Fill("random", ctx.seed_parts(name, "resid")) if trainable else Fill("zeros")
                grow_axis(state, name, axis, new_width, dest, f, label)
    spec.set_hidden_size(new_width)
    rescale_embedding(state, d, new_width, op)
    if fill == "mean":
        spec.residual_fill = "mean"
    elif spec.arch.norm == "layernorm" and not spec.live_width:
        spec.meta.layernorm_zero_padded = True
    if fill != "mean" and spec.meta.signal_width is None:
        spec.meta.signal_width = d


def embedding_factor(width: int, new_width: int) -> float:
    """Gemma multiplies embeddings by hidden_size ** 0.5, a float32 buffer cast to the weight's dtype.

    The float32 values make the factor exact wherever the model runs in float32 or float64 (and so in
    verification); a model run in bfloat16 rounds the buffer once more, an error of the order of its
    weights' own rounding.
    """
    import torch

    def normalizer(n: int) -> float:
        return float(torch.tensor(n ** 0.5, dtype=torch.float32))

    return normalizer(width) / normalizer(new_width)


def rescale_embedding(state: ModelState, width: int, new_width: int, op: str) -> None:
    """Where the embedding is scaled by sqrt(hidden_size), keep what the first layer reads.

    The embedding is divided by the change of that scale; a tied lm_head then reads a smaller
    matrix, which the final norm's gain makes up for.
    """
    spec, arch = state.spec, state.spec.arch
    if arch.embed_scale != "sqrt_hidden":
        return
    emb = arch.parameter_name(R.EMBED, "weight")
    f = embedding_factor(width, new_width)
    half = str(state.tensors[emb].dtype).replace("torch.", "")
    if half in ("bfloat16", "float16"):
        spec.meta.notes.append(
            f"run in {half}, {arch.name} rounds its sqrt(hidden_size) embedding scale to {half}: sqrt({width}) and "
            f"sqrt({new_width}) round differently, up to one {half} rounding of every embedding (verification runs in "
            "float32, where the scale is exact)")
    state.tensors[emb] = scale(state.tensors[emb], f, f"{op}: embedding x sqrt({width}/{new_width}) (scaled by sqrt(hidden_size))")
    if spec.tied:
        for name, info, node in list(state.items(R.NORM_FINAL)):
            if info.kind == "weight":
                state.tensors[name] = scale_gain(node, 1 / f, arch, f"{op}: final gain x sqrt({new_width}/{width}) (tied embedding)")
