"""The naive way to grow a checkpoint, as the seed article does it (the baseline of benchmarks/run.py).

Load the source with transformers, build the bigger model from an edited config, zero it and copy
every source parameter into the leading corner of its bigger counterpart (`to[:n, :m] = fr`),
rescale the norm weights by sqrt(d/D), and `save_pretrained`. Both models are in memory at once.

    python benchmarks/naive_grow.py SOURCE_DIR OUTPUT_DIR --heads-factor 1.5 [--shard-size 1GB]

Only the cost is of interest here: with grouped-query attention the article's corner padding does
not keep the function (the article says so), which does not change how many bytes move.
"""
from __future__ import annotations

import argparse
import math

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("output")
    ap.add_argument("--heads-factor", type=float, default=1.5, help="num_attention_heads multiplier (head_dim kept)")
    ap.add_argument("--shard-size", default="1GB")
    args = ap.parse_args()

    config = AutoConfig.from_pretrained(args.source)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(args.source, dtype=dtype)

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    old_hidden = config.hidden_size
    config.num_attention_heads = int(round(config.num_attention_heads * args.heads_factor))
    config.hidden_size = config.num_attention_heads * head_dim
    config.head_dim = head_dim
    bigger = AutoModelForCausalLM.from_config(config, dtype=dtype)  # the article: tp(config)

    with torch.no_grad():
        for fr, to in zip(model.parameters(), bigger.parameters()):
            to.data[:] = 0
            idx = tuple(slice(n) for n in fr.data.shape)
            to.data[idx] = fr.data[:]
        for name, p in bigger.named_parameters():
            if "norm.weight" in name:
                p.data[:] *= math.sqrt(old_hidden / config.hidden_size)
    bigger.save_pretrained(args.output, max_shard_size=args.shard_size)


if __name__ == "__main__":
    main()
