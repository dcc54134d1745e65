"""Random models of every supported family, with weights no growth can get right by accident.

Norm weights and biases are random (not ones and zeros), the embedding has a non-zero mean, and
every bias the family allows is present and random.
"""
from __future__ import annotations

import torch
import transformers

FAMILIES = ("stablelm", "llama", "mistral", "qwen2")

# The non-size fields of real releases' config.json, as transformers 4.x wrote them (top-level
# rope_theta, rope_scaling null, no layer_types): Qwen3-0.6B, OLMo-2-1124-7B, Phi-4-mini (phi3 with
# partial rotary and GQA), Gemma-2-2b, Gemma-3-1b (gemma3_text).
RELEASES = {
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], attention_bias=False, attention_dropout=0.0,
                  hidden_act="silu", initializer_range=0.02, max_window_layers=28, rms_norm_eps=1e-06, rope_scaling=None,
                  rope_theta=1000000, sliding_window=None, use_sliding_window=False, torch_dtype="bfloat16",
                  transformers_version="4.51.0", use_cache=True),
    "olmo2": dict(model_type="olmo2", architectures=["Olmo2ForCausalLM"], attention_bias=False, attention_dropout=0.0,
                  hidden_act="silu", initializer_range=0.02, pad_token_id=1, rms_norm_eps=1e-06, rope_scaling=None,
                  rope_theta=500000, torch_dtype="float32", transformers_version="4.47.0.dev0", use_cache=True),
    "phi3": dict(model_type="phi3", architectures=["Phi3ForCausalLM"], attention_bias=False, attention_dropout=0.0,
                 embd_pdrop=0.0, hidden_act="silu", initializer_range=0.02, original_max_position_embeddings=4096,
                 partial_rotary_factor=0.75, resid_pdrop=0.0, rms_norm_eps=1e-05, rope_scaling=None, rope_theta=10000.0,
                 sliding_window=262144, torch_dtype="bfloat16", transformers_version="4.45.0", use_cache=True),
    "gemma2": dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], attention_bias=False, attention_dropout=0.0,
                   attn_logit_softcapping=50.0, cache_implementation="hybrid", final_logit_softcapping=30.0,
                   hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh", initializer_range=0.02,
                   pad_token_id=0, rms_norm_eps=1e-06, rope_theta=10000.0, sliding_window=4096, torch_dtype="float32",
                   transformers_version="4.42.4", use_cache=True),
    "gemma3_text": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], attention_bias=False,
                        attention_dropout=0.0, attn_logit_softcapping=None, cache_implementation="hybrid",
                        final_logit_softcapping=None, hidden_activation="gelu_pytorch_tanh", initializer_range=0.02,
                        pad_token_id=0, rms_norm_eps=1e-06, rope_local_base_freq=10000, rope_scaling=None,
                        rope_theta=1000000, sliding_window=512, sliding_window_pattern=6, torch_dtype="bfloat16",
                        transformers_version="4.50.0.dev0", use_cache=True),
}


def release_config(family: str, *, heads: int = 4, kv_heads: int = 2, head_dim: int = 8, hidden: int | None = None,
                   layers: int = 2, intermediate: int = 24, vocab: int = 64, tied: bool = False, **fields):
    """A tiny config with a release's fields; head_dim is a config field (independent of hidden / heads) where
    the family has one, else hidden = heads * head_dim."""
    d = dict(RELEASES[family], vocab_size=vocab, intermediate_size=intermediate, num_hidden_layers=layers,
             num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied, max_position_embeddings=256,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)  # the releases' ids lie outside a tiny vocabulary
    if family in ("olmo2", "phi3"):
        d["hidden_size"] = heads * head_dim  # these derive head_dim from hidden_size / num_attention_heads
    else:
        d.update(hidden_size=hidden or heads * head_dim, head_dim=head_dim)
    if family.startswith("gemma"):
        d["query_pre_attn_scalar"] = head_dim
    d.update(fields)
    return transformers.AutoConfig.for_model(**{k: v for k, v in d.items() if v is not None or k != "partial_rotary_factor"})


def make_config(family: str, *, hidden_heads: int = 4, kv_heads: int = 2, head_dim: int = 8, layers: int = 2,
                intermediate: int = 24, vocab: int = 64, tied: bool = False, qkv_bias: bool = True,
                qk_layernorm: bool = False, parallel_residual: bool = False, eps: float = 1e-5):
    common = dict(vocab_size=vocab, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=hidden_heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                  max_position_embeddings=256)
    hidden = hidden_heads * head_dim
    if family == "stablelm":
        return transformers.StableLmConfig(hidden_size=hidden, use_qkv_bias=qkv_bias, qk_layernorm=qk_layernorm,
                                           use_parallel_residual=parallel_residual, layer_norm_eps=eps,
                                           partial_rotary_factor=0.5, **common)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[family]
    extra = {"attention_bias": qkv_bias} if family == "llama" else {}
    if family == "mistral":
        extra["sliding_window"] = 256
    return cls(hidden_size=hidden, head_dim=head_dim, rms_norm_eps=eps, **extra, **common)


def make_model(config, seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or "layernorm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=dtype))
            elif name.endswith("bias"):
                p.copy_(0.1 + 0.2 * torch.randn(p.shape, generator=g, dtype=dtype))
            elif "embed_tokens" in name:
                p.copy_(0.3 + 0.5 * torch.randn(p.shape, generator=g, dtype=dtype))
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) / p.shape[-1] ** 0.5)
    return model.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)
