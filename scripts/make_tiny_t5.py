#!/usr/bin/env python
"""Build ``surgery/assets/tiny-t5``: a T5 v1.1-style encoder-decoder for the T5 re-initialisation recipe.

Usage::

    python scripts/make_tiny_t5.py

Gated-gelu MLP (wi_0, wi_1), untied lm_head, d_model 64, 4 heads of d_kv 16, d_ff 160, 2 encoder and
2 decoder blocks, the shared tokenizer of the other builtins (vocab 512). The weights are T5's own
initialisation (seed 0), not trained: the recipe it serves re-draws them, and `surgery inspect
--method hf` explains every tensor of it. Deterministic, CPU, no network.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent.parent / "surgery" / "assets"
TOKENIZER_FROM = ASSETS / "tiny-llama"
CONFIG = dict(d_ff=160, d_kv=16, d_model=64, decoder_start_token_id=0, dropout_rate=0.0, eos_token_id=0,
              feed_forward_proj="gated-gelu", initializer_factor=1.0, is_encoder_decoder=True, layer_norm_epsilon=1e-06,
              num_decoder_layers=2, num_heads=4, num_layers=2, pad_token_id=0, relative_attention_num_buckets=32,
              tie_word_embeddings=False, vocab_size=512)


def main() -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(**CONFIG)).eval()
    out, tmp = ASSETS / "tiny-t5", ASSETS / ".tiny-t5.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER_FROM / f, tmp / f)
    for f in tmp.iterdir():
        f.chmod(0o644)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"{out}: {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
