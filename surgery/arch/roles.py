"""What a tensor is, whatever the family calls it: its role, which axis counts what, layer and head."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class TensorRole(str, enum.Enum):
    EMBED = "embed"
    LM_HEAD = "lm_head"
    ATTN_Q = "attn.q"
    ATTN_K = "attn.k"
    ATTN_V = "attn.v"
    ATTN_O = "attn.o"
    ATTN_Q_NORM = "attn.q_norm"
    ATTN_K_NORM = "attn.k_norm"
    MLP_GATE = "mlp.gate"
    MLP_UP = "mlp.up"
    MLP_DOWN = "mlp.down"
    NORM_ATTN = "norm.attn"
    NORM_MLP = "norm.mlp"
    NORM_ATTN_OUT = "norm.attn_out"  # over the attention output before the residual add (OLMo 2, Gemma sandwich)
    NORM_MLP_OUT = "norm.mlp_out"  # over the MLP output before the residual add
    NORM_FINAL = "norm.final"
    ATTN_REL_BIAS = "attn.rel_bias"  # T5's relative position bias (buckets x heads)
    MOE_ROUTER = "moe.router"  # router (Mixtral block_sparse_moe.gate): expert logits from the residual
    SHARED_GATE = "shared.gate"  # Qwen2-MoE shared expert, always on
    SHARED_UP = "shared.up"
    SHARED_DOWN = "shared.down"
    SHARED_ROUTER = "shared.router"  # Qwen2-MoE shared_expert_gate: sigmoid gate of the shared expert

    @property
    def is_norm(self) -> bool:
        """A norm over the residual width (per-head q/k norms are not)."""
        return self in (TensorRole.NORM_ATTN, TensorRole.NORM_MLP, TensorRole.NORM_ATTN_OUT, TensorRole.NORM_MLP_OUT,
                        TensorRole.NORM_FINAL)


class Axis(str, enum.Enum):
    """What an axis of a tensor counts."""

    VOCAB = "vocab"
    RESID = "resid"  # the residual stream (hidden_size)
    Q = "q"  # num_heads x head_dim
    KV = "kv"  # num_kv_heads x head_dim
    INTER = "inter"  # MLP intermediate
    HEAD_DIM = "head_dim"  # one head's dims (per-head q/k norms)
    HEADS = "heads"  # one entry per attention head
    REL_BUCKETS = "rel_buckets"  # T5's relative position buckets
    EXPERT = "expert"  # routed experts (router rows)
    SHARED_INTER = "shared_inter"  # the shared expert's intermediate
    ONE = "one"  # a single output (the shared expert's gate): nothing grows it


R = TensorRole
# Axes of each (role, kind) in transformers' (out, in) layout. Writers of the residual are the
# tensors whose *first* axis is RESID (and the embedding, whose second is).
AXES: dict[tuple[TensorRole, str], tuple[Axis, ...]] = {
    (R.EMBED, "weight"): (Axis.VOCAB, Axis.RESID),
    (R.LM_HEAD, "weight"): (Axis.VOCAB, Axis.RESID),
    (R.ATTN_Q, "weight"): (Axis.Q, Axis.RESID),
    (R.ATTN_Q, "bias"): (Axis.Q,),
    (R.ATTN_K, "weight"): (Axis.KV, Axis.RESID),
    (R.ATTN_K, "bias"): (Axis.KV,),
    (R.ATTN_V, "weight"): (Axis.KV, Axis.RESID),
    (R.ATTN_V, "bias"): (Axis.KV,),
    (R.ATTN_O, "weight"): (Axis.RESID, Axis.Q),
    (R.ATTN_O, "bias"): (Axis.RESID,),
    (R.ATTN_Q_NORM, "weight"): (Axis.HEAD_DIM,),
    (R.ATTN_Q_NORM, "bias"): (Axis.HEAD_DIM,),
    (R.ATTN_K_NORM, "weight"): (Axis.HEAD_DIM,),
    (R.ATTN_K_NORM, "bias"): (Axis.HEAD_DIM,),
    (R.MLP_GATE, "weight"): (Axis.INTER, Axis.RESID),
    (R.MLP_GATE, "bias"): (Axis.INTER,),
    (R.MLP_UP, "weight"): (Axis.INTER, Axis.RESID),
    (R.MLP_UP, "bias"): (Axis.INTER,),
    (R.MLP_DOWN, "weight"): (Axis.RESID, Axis.INTER),
    (R.MLP_DOWN, "bias"): (Axis.RESID,),
    (R.NORM_ATTN, "weight"): (Axis.RESID,),
    (R.NORM_ATTN, "bias"): (Axis.RESID,),
    (R.NORM_MLP, "weight"): (Axis.RESID,),
    (R.NORM_MLP, "bias"): (Axis.RESID,),
    (R.ATTN_REL_BIAS, "weight"): (Axis.REL_BUCKETS, Axis.HEADS),
    (R.NORM_ATTN_OUT, "weight"): (Axis.RESID,),
    (R.NORM_MLP_OUT, "weight"): (Axis.RESID,),
    (R.NORM_FINAL, "weight"): (Axis.RESID,),
    (R.NORM_FINAL, "bias"): (Axis.RESID,),
    (R.MOE_ROUTER, "weight"): (Axis.EXPERT, Axis.RESID),
    (R.SHARED_GATE, "weight"): (Axis.SHARED_INTER, Axis.RESID),
    (R.SHARED_UP, "weight"): (Axis.SHARED_INTER, Axis.RESID),
    (R.SHARED_DOWN, "weight"): (Axis.RESID, Axis.SHARED_INTER),
    (R.SHARED_ROUTER, "weight"): (Axis.ONE, Axis.RESID),
}

WRITERS = (R.EMBED, R.ATTN_O, R.MLP_DOWN, R.SHARED_DOWN)
MLP_ROLES = (R.MLP_GATE, R.MLP_UP, R.MLP_DOWN)


@dataclass(frozen=True)
class TensorInfo:
    """Where a parameter sits in the model: its role, weight or bias, layer and head."""

    role: TensorRole
    kind: str  # "weight" | "bias"
    layer: int | None = None
    head: int | None = None
    family_axes: tuple[Axis, ...] | None = None  # where a family's tensor differs from AXES (OLMo 2's q/k norms)
    expert: int | None = None

    @property
    def axes(self) -> tuple[Axis, ...]:
        return self.family_axes or AXES[(self.role, self.kind)]
