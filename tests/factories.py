"""Random models of every supported family, with weights no growth can get right by accident.

Norm weights and biases are random (not ones and zeros), the embedding has a non-zero mean, and
every bias the family allows is present and random.
"""
from __future__ import annotations

import torch
import transformers

FAMILIES = ("stablelm", "llama", "mistral", "qwen2")


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
            if "norm" in name and name.endswith("weight"):
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
