"""grow_heads: more attention heads, head_dim kept; the article's solution 1, made GQA-aware.

transformers maps query head j to kv head j // n_rep, so new query heads are inserted at the end
of each kv group (appending them at the end would silently rewire attention), and new kv heads
come as whole new groups. New heads are exact because their o_proj columns are zero. When the
residual grows with them (always for StableLM, whose head_dim is hidden_size / num_heads), the
new residual dims follow `grow_residual`.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

from ..arch import TensorRole as R
from ..errors import SurgeryError
from ..lazy import full
from ..state import ModelState
from .base import Exactness, Init, Op, OpContext, Promise, SizeValue, resolve_size
from .residual import grow_residual
from .slices import Fill, append_dest, grow_axis, head_dest, scale, scale_gain


def kv_layout(h: int, k: int, new_h: int, new_k: Optional[int]) -> tuple[int, list[int]]:
    """New kv head count and, for each old query head, its new index."""
    if new_k is None:
        if k == h:
            new_k = new_h
        elif new_h % k == 0:
            new_k = k
        else:
            raise SurgeryError(
                f"with {k} kv heads, num_heads must be a multiple of {k} (got {new_h}); or set num_kv_heads",
                loc=("num_heads",),
            )
    if new_k < k:
        raise SurgeryError(f"num_kv_heads would shrink from {k} to {new_k}; only growth is supported", loc=("num_kv_heads",))
    if new_h % new_k:
        raise SurgeryError(f"num_kv_heads {new_k} does not divide num_heads {new_h}", loc=("num_kv_heads",))
    rep, new_rep = h // k, new_h // new_k
    if new_rep < rep:
        raise SurgeryError(
            f"{new_h} heads over {new_k} kv heads gives {new_rep} query heads per group, fewer than the {rep} "
            f"the source has; grow num_heads or keep fewer kv heads",
            loc=("num_kv_heads",),
        )
    return new_k, [(j // rep) * new_rep + (j % rep) for j in range(h)]


class GrowHeads(Op):
    op: Literal["grow_heads"]
    num_heads: SizeValue
    num_kv_heads: Optional[SizeValue] = None
    init: Init = Init.TRAINABLE
    residual_fill: Literal["zero", "mean"] = "zero"
    residual: Literal["grow", "keep"] = "grow"

    reads = ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size")
    writes = ("num_attention_heads", "num_key_value_heads", "hidden_size", "attn", "residual")
    summary = "add attention heads (GQA-aware), head_dim kept; grows the residual by the new heads' width"

    def apply(self, state: ModelState, ctx: OpContext) -> Promise:
        spec = state.spec
        h, k, hd, d = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size
        new_h = resolve_size(self.num_heads, h, "num_heads")
        if new_h < h:
            raise SurgeryError(f"num_heads would shrink from {h} to {new_h}; only growth is supported", loc=("num_heads",))
        new_kv = resolve_size(self.num_kv_heads, k, "num_kv_heads") if self.num_kv_heads is not None else None
        new_k, q_pos = kv_layout(h, k, new_h, new_kv)
        if (new_h, new_k) == (h, k):
            raise SurgeryError(f"num_heads is already {h}: nothing to grow", loc=("num_heads",))
        if self.residual == "keep" and spec.arch.head_dim_field is None:
            raise SurgeryError(
                f"{spec.arch.name} derives head_dim from hidden_size / num_heads, so the residual must grow", loc=("residual",)
            )
        trainable = self.init == Init.TRAINABLE
        layout = spec.arch.qk_norm if spec.qk_norm else None
        label = f"grow_heads: {h}/{k} -> {new_h}/{new_k} heads"
        q_dest = head_dest(h, hd, q_pos)
        kv_dest = append_dest(k * hd)
        # A norm over the whole q (k) projection (OLMo 2) widens with the heads: new q/k rows must be zero (any
        # value would enter its statistics); its input is scaled by sqrt(new/old width), which keeps its mean
        # square and so its eps, and its gain by the inverse, which cancels the larger normalised values.
        widen = {R.ATTN_Q: new_h / h, R.ATTN_K: new_k / k} if layout == "projection" else {}

        def reader(name: str, role: R) -> Fill:
            if trainable and role not in widen:
                return Fill("random", ctx.seed_parts(name, "heads"))
            return Fill("zeros")

        for name, info, node in list(state.items(R.ATTN_Q, R.ATTN_K, R.ATTN_V, R.ATTN_O)):
            if info.role == R.ATTN_Q:
                grow_axis(state, name, 0, new_h * hd, q_dest, reader(name, info.role), label)
            elif info.role in (R.ATTN_K, R.ATTN_V):
                grow_axis(state, name, 0, new_k * hd, kv_dest, reader(name, info.role), label)
            elif info.kind == "weight":
                grow_axis(state, name, 1, new_h * hd, q_dest, Fill("zeros"), label, track="grow_heads" if trainable else None)
            r = widen.get(info.role, 1.0)
            if r != 1.0:
                state.tensors[name] = scale(state.tensors[name], math.sqrt(r), f"{label}: {info.role.value} x sqrt({r:.6g})")
        notes = []
        if layout == "head_tensors":
            _move_head_norms(state, R.ATTN_Q_NORM, q_pos, new_h, label)
            _move_head_norms(state, R.ATTN_K_NORM, list(range(k)), new_k, label)
        elif layout == "projection":
            norm_dest = {R.ATTN_Q_NORM: (new_h * hd, q_dest, widen[R.ATTN_Q]), R.ATTN_K_NORM: (new_k * hd, kv_dest, widen[R.ATTN_K])}
            for name, info, node in list(state.items(R.ATTN_Q_NORM, R.ATTN_K_NORM)):
                size, dest, r = norm_dest[info.role]
                f = Fill("const_mean") if trainable else Fill("const", value=spec.arch.weight_for_gain(0.0))
                grow_axis(state, name, 0, size, dest, f, label)
                if r != 1.0:
                    state.tensors[name] = scale_gain(state.tensors[name], 1 / math.sqrt(r), spec.arch,
                                                     f"{label}: {info.role.value} gain x sqrt(1/{r:.6g})")
            notes.append("q/k norms span the whole projection: the new heads' q/k rows are zero (they enter the norms' "
                         "statistics otherwise); they wake once the new o_proj columns move")
        spec.set_heads(new_h, new_k)
        if self.residual == "grow":
            grow_residual(state, d + (new_h - h) * hd, self.init, self.residual_fill, ctx, "grow_heads")
        return Promise(Exactness.EXACT, "new heads write through zero o_proj columns; query heads stay in their kv group", notes)


def _move_head_norms(state: ModelState, role: R, positions: list[int], new_count: int, label: str) -> None:
    """Per-head q/k norms are separate tensors: rename old heads to their new index, add fresh ones."""
    arch, spec = state.spec.arch, state.spec
    moved = {}
    kinds = {}
    for name, info, node in list(state.items(role)):
        kinds[info.kind] = node.dtype
        moved[arch.parameter_name(role, info.kind, info.layer, positions[info.head])] = node
        del state.tensors[name]
    for layer in range(spec.num_layers):
        for kind, dtype in kinds.items():
            value = 1.0 if kind == "weight" else 0.0
            for head in range(new_count):
                n = arch.parameter_name(role, kind, layer, head)
                if n not in moved:
                    moved[n] = full((spec.head_dim,), dtype, value, label)
    state.tensors.update(moved)
