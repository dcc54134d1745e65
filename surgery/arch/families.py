"""The supported families, one table each: adding a family means adding a table here."""
from __future__ import annotations

from .architecture import Architecture
from .roles import Axis, TensorRole

R = TensorRole

_DECODER = {
    R.EMBED: "model.embed_tokens",
    R.LM_HEAD: "lm_head",
    R.ATTN_Q: "model.layers.{L}.self_attn.q_proj",
    R.ATTN_K: "model.layers.{L}.self_attn.k_proj",
    R.ATTN_V: "model.layers.{L}.self_attn.v_proj",
    R.ATTN_O: "model.layers.{L}.self_attn.o_proj",
    R.MLP_GATE: "model.layers.{L}.mlp.gate_proj",
    R.MLP_UP: "model.layers.{L}.mlp.up_proj",
    R.MLP_DOWN: "model.layers.{L}.mlp.down_proj",
    R.NORM_ATTN: "model.layers.{L}.input_layernorm",
    R.NORM_MLP: "model.layers.{L}.post_attention_layernorm",
    R.NORM_FINAL: "model.norm",
}

LLAMA_LIKE = dict(norm="rmsnorm", eps_field="rms_norm_eps", head_dim_field="head_dim", rotary="full")

ARCHITECTURES: dict[str, Architecture] = {
    "stablelm": Architecture(
        name="stablelm",
        model_types=("stablelm",),
        names={
            **_DECODER,
            R.ATTN_Q_NORM: "model.layers.{L}.self_attn.q_layernorm.norms.{H}",
            R.ATTN_K_NORM: "model.layers.{L}.self_attn.k_layernorm.norms.{H}",
        },
        norm="layernorm",
        eps_field="layer_norm_eps",
        head_dim_field=None,
        rotary="partial",
        qk_norm_field="qk_layernorm",
        qk_norm="head_tensors",
        patched_class="SurgeryStableLmForCausalLM",
    ),
    "llama": Architecture(name="llama", model_types=("llama",), names=dict(_DECODER), **LLAMA_LIKE),
    "mistral": Architecture(name="mistral", model_types=("mistral",), names=dict(_DECODER), **LLAMA_LIKE),
    "qwen2": Architecture(
        name="qwen2",
        model_types=("qwen2",),
        names=dict(_DECODER),
        layer_type_fields=("layer_types",),
        max_window_rule="from",
        **LLAMA_LIKE,
    ),
    "qwen3": Architecture(
        name="qwen3",
        model_types=("qwen3",),
        names={
            **_DECODER,
            R.ATTN_Q_NORM: "model.layers.{L}.self_attn.q_norm",
            R.ATTN_K_NORM: "model.layers.{L}.self_attn.k_norm",
        },
        qk_norm="head",
        layer_type_fields=("layer_types",),
        max_window_rule="from",
        **LLAMA_LIKE,
    ),
    # OLMo 2: no pre-norms; the branch outputs are normalised before the residual add, and q_norm / k_norm
    # span the whole q / k projection. head_dim is hidden_size / num_heads (no config field).
    "olmo2": Architecture(
        name="olmo2",
        model_types=("olmo2",),
        names={
            **{r: p for r, p in _DECODER.items() if r not in (R.NORM_ATTN, R.NORM_MLP)},
            R.ATTN_Q_NORM: "model.layers.{L}.self_attn.q_norm",
            R.ATTN_K_NORM: "model.layers.{L}.self_attn.k_norm",
            R.NORM_ATTN_OUT: "model.layers.{L}.post_attention_layernorm",
            R.NORM_MLP_OUT: "model.layers.{L}.post_feedforward_layernorm",
        },
        norm="rmsnorm",
        eps_field="rms_norm_eps",
        head_dim_field=None,
        rotary="full",
        qk_norm="projection",
        axes={(R.ATTN_Q_NORM, "weight"): (Axis.Q,), (R.ATTN_K_NORM, "weight"): (Axis.KV,)},
    ),
    # Phi-3 (and Phi-4-mini): q | k | v in one qkv_proj, gate | up in one gate_up_proj; rotary over the first
    # head_dim x partial_rotary_factor dims of each head; head_dim is hidden_size / num_heads.
    "phi3": Architecture(
        name="phi3",
        model_types=("phi3",),
        names={
            **_DECODER,
            R.ATTN_Q: "model.layers.{L}.self_attn.qkv_proj[q]",
            R.ATTN_K: "model.layers.{L}.self_attn.qkv_proj[k]",
            R.ATTN_V: "model.layers.{L}.self_attn.qkv_proj[v]",
            R.MLP_GATE: "model.layers.{L}.mlp.gate_up_proj[gate]",
            R.MLP_UP: "model.layers.{L}.mlp.gate_up_proj[up]",
        },
        norm="rmsnorm",
        eps_field="rms_norm_eps",
        head_dim_field=None,
        rotary="partial",
        fused={
            "model.layers.{L}.self_attn.qkv_proj": (R.ATTN_Q, R.ATTN_K, R.ATTN_V),
            "model.layers.{L}.mlp.gate_up_proj": (R.MLP_GATE, R.MLP_UP),
        },
    ),
    # Mixture-of-experts families, in the on-disk layout real releases ship (transformers 5 fuses the
    # experts into 3D tensors in memory and converts on load and save).
    "mixtral": Architecture(
        name="mixtral",
        model_types=("mixtral",),
        names={
            **_DECODER,
            R.MLP_GATE: "model.layers.{L}.block_sparse_moe.experts.{E}.w1",
            R.MLP_DOWN: "model.layers.{L}.block_sparse_moe.experts.{E}.w2",
            R.MLP_UP: "model.layers.{L}.block_sparse_moe.experts.{E}.w3",
            R.MOE_ROUTER: "model.layers.{L}.block_sparse_moe.gate",
        },
        axis_fields={Axis.EXPERT: "num_local_experts"},
        experts_per_token_field="num_experts_per_tok",
        **LLAMA_LIKE,
    ),
    "qwen2_moe": Architecture(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        names={
            **_DECODER,
            R.MLP_GATE: "model.layers.{L}.mlp.experts.{E}.gate_proj",
            R.MLP_UP: "model.layers.{L}.mlp.experts.{E}.up_proj",
            R.MLP_DOWN: "model.layers.{L}.mlp.experts.{E}.down_proj",
            R.MOE_ROUTER: "model.layers.{L}.mlp.gate",
            R.SHARED_GATE: "model.layers.{L}.mlp.shared_expert.gate_proj",
            R.SHARED_UP: "model.layers.{L}.mlp.shared_expert.up_proj",
            R.SHARED_DOWN: "model.layers.{L}.mlp.shared_expert.down_proj",
            R.SHARED_ROUTER: "model.layers.{L}.mlp.shared_expert_gate",
        },
        layer_type_fields=("layer_types",),
        max_window_rule="even_below",
        inter_field="moe_intermediate_size",
        axis_fields={Axis.EXPERT: "num_experts", Axis.SHARED_INTER: "shared_expert_intermediate_size"},
        experts_per_token_field="num_experts_per_tok",
        **LLAMA_LIKE,
    ),
    "qwen3_moe": Architecture(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        names={
            **_DECODER,
            R.ATTN_Q_NORM: "model.layers.{L}.self_attn.q_norm",
            R.ATTN_K_NORM: "model.layers.{L}.self_attn.k_norm",
            R.MLP_GATE: "model.layers.{L}.mlp.experts.{E}.gate_proj",
            R.MLP_UP: "model.layers.{L}.mlp.experts.{E}.up_proj",
            R.MLP_DOWN: "model.layers.{L}.mlp.experts.{E}.down_proj",
            R.MOE_ROUTER: "model.layers.{L}.mlp.gate",
        },
        qk_norm="head",
        inter_field="moe_intermediate_size",
        axis_fields={Axis.EXPERT: "num_experts"},
        experts_per_token_field="num_experts_per_tok",
        **LLAMA_LIKE,
    ),
}

# Gemma 2 and Gemma 3 (text): norms compute x_hat * (1 + w), embeddings are multiplied by sqrt(hidden_size),
# scores by query_pre_attn_scalar ** -0.5; sandwich norms around both branches. Gemma 3 adds per-head q/k norms.
_GEMMA = {
    **_DECODER,
    R.NORM_ATTN_OUT: "model.layers.{L}.post_attention_layernorm",
    R.NORM_MLP: "model.layers.{L}.pre_feedforward_layernorm",
    R.NORM_MLP_OUT: "model.layers.{L}.post_feedforward_layernorm",
}
GEMMA_LIKE = dict(norm_offset=1.0, embed_scale="sqrt_hidden", attn_scale_field="query_pre_attn_scalar",
                  layer_type_fields=("layer_types",), **LLAMA_LIKE)
ARCHITECTURES["gemma2"] = Architecture(name="gemma2", model_types=("gemma2",), names=dict(_GEMMA), **GEMMA_LIKE)
ARCHITECTURES["gemma3_text"] = Architecture(
    name="gemma3_text",
    model_types=("gemma3_text",),
    names={
        **_GEMMA,
        R.ATTN_Q_NORM: "model.layers.{L}.self_attn.q_norm",
        R.ATTN_K_NORM: "model.layers.{L}.self_attn.k_norm",
    },
    qk_norm="head",
    **GEMMA_LIKE,
)

# T5 (encoder-decoder, seed 004): tables for reinit and inspect; growth is not implemented for its layout.
_T5_STACKS = ("encoder", "decoder")
ARCHITECTURES["t5"] = Architecture(
    name="t5",
    model_types=("t5",),
    names={
        R.EMBED: "shared",
        R.LM_HEAD: "lm_head",
        R.ATTN_Q: tuple(f"{s}.block.{{L}}.layer.0.SelfAttention.q" for s in _T5_STACKS) + ("decoder.block.{L}.layer.1.EncDecAttention.q",),
        R.ATTN_K: tuple(f"{s}.block.{{L}}.layer.0.SelfAttention.k" for s in _T5_STACKS) + ("decoder.block.{L}.layer.1.EncDecAttention.k",),
        R.ATTN_V: tuple(f"{s}.block.{{L}}.layer.0.SelfAttention.v" for s in _T5_STACKS) + ("decoder.block.{L}.layer.1.EncDecAttention.v",),
        R.ATTN_O: tuple(f"{s}.block.{{L}}.layer.0.SelfAttention.o" for s in _T5_STACKS) + ("decoder.block.{L}.layer.1.EncDecAttention.o",),
        R.ATTN_REL_BIAS: tuple(f"{s}.block.{{L}}.layer.0.SelfAttention.relative_attention_bias" for s in _T5_STACKS),
        R.MLP_GATE: ("encoder.block.{L}.layer.1.DenseReluDense.wi_0", "decoder.block.{L}.layer.2.DenseReluDense.wi_0"),
        R.MLP_UP: ("encoder.block.{L}.layer.1.DenseReluDense.wi", "decoder.block.{L}.layer.2.DenseReluDense.wi",
                   "encoder.block.{L}.layer.1.DenseReluDense.wi_1", "decoder.block.{L}.layer.2.DenseReluDense.wi_1"),
        R.MLP_DOWN: ("encoder.block.{L}.layer.1.DenseReluDense.wo", "decoder.block.{L}.layer.2.DenseReluDense.wo"),
        R.NORM_ATTN: ("encoder.block.{L}.layer.0.layer_norm", "decoder.block.{L}.layer.0.layer_norm",
                      "decoder.block.{L}.layer.1.layer_norm"),
        R.NORM_MLP: ("encoder.block.{L}.layer.1.layer_norm", "decoder.block.{L}.layer.2.layer_norm"),
        R.NORM_FINAL: ("encoder.final_layer_norm", "decoder.final_layer_norm"),
    },
    norm="rmsnorm",
    eps_field="layer_norm_epsilon",
    head_dim_field="d_kv",
    rotary="none",
    config_aliases={"hidden_size": "d_model", "num_attention_heads": "num_heads", "num_hidden_layers": "num_layers",
                    "intermediate_size": "d_ff"},
    tied_aliases=("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
    ops=("reinit",),
    ops_refusal="T5 is an encoder-decoder: surgery re-initialises and inspects it; growth and prune ops are not implemented "
                "for its two stacks and cross-attention",
    required_per_layer=(R.ATTN_Q, R.ATTN_K, R.ATTN_V, R.ATTN_O, R.MLP_UP, R.MLP_DOWN, R.NORM_ATTN, R.NORM_MLP),
    init_rules="t5",
)


def architecture_for(model_type: str | None) -> Architecture | None:
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    return None
