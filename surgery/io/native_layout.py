"""How a tensor of Mistral's native release corresponds to a transformers Mistral tensor.

Names: `layers.N.attention.wq.weight` is `model.layers.N.self_attn.q_proj.weight`, and so on.

Rotary embedding. Native code rotates interleaved pairs (dims 2i, 2i+1 of a head); transformers'
`rotate_half` rotates (i, i + head_dim/2). The rows of wq and wk are permuted per head to match:
native row 2i+j of a head becomes transformers row j*head_dim/2 + i. wq has n_heads heads, wk has
n_kv_heads heads (the common bug uses n_heads for wk, which scrambles the kv heads under GQA).
wv, wo and the rest are not rotated and are not permuted. Permutations are pure index moves, so
native -> hf -> native is bit-exact.

Multi-file releases. When a tensor appears in every `consolidated.NN.pth` (one slice per
model-parallel rank), the slices are concatenated by the native rules, as the reference converter
(transformers' convert_mistral_weights_to_hf.py) does: along the input axis (dim 1) for
tok_embeddings, wo and w2; along the output axis (dim 0) for wq, wk, wv, w1, w3 and output; the
norms are replicated (`CONCAT_DIM` None).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "consolidated.safetensors"

GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_GLOBAL = {v: k for k, v in GLOBAL_NAMES.items()}
_HF_LAYER = {v: k for k, v in LAYER_NAMES.items()}
NATIVE_LAYER_RX = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER_RX = re.compile(r"model\.layers\.(\d+)\.(.+)")

# Concatenation axis of a tensor sliced across model-parallel files (None: replicated).
CONCAT_DIM = {
    "tok_embeddings.weight": 1, "output.weight": 0, "norm.weight": None,
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0, "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "feed_forward.w2.weight": 1,
    "attention_norm.weight": None, "ffn_norm.weight": None,
}


def native_to_hf(name: str) -> str | None:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    m = NATIVE_LAYER_RX.fullmatch(name)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"
    return None


def hf_to_native(name: str) -> str | None:
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name]
    m = _HF_LAYER_RX.fullmatch(name)
    if m and m.group(2) in _HF_LAYER:
        return f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
    return None


def layer_suffix(native: str) -> str:
    m = NATIVE_LAYER_RX.fullmatch(native)
    return m.group(2) if m else native


def to_hf_rotary(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Native interleaved-pair rows of wq/wk -> transformers rotate_half rows, head by head."""
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)


def to_native_rotary(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Inverse of `to_hf_rotary`."""
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)
