#!/usr/bin/env python
"""Build the tiny builtin models shipped in ``surgery/assets/``.

Usage::

    python scripts/make_tiny_models.py            # build everything
    python scripts/make_tiny_models.py --only tiny-llama

What it does (deterministically, CPU only, no network):

1. Writes ``surgery/assets/python-license.txt`` (the Python license text as the
   interpreter prints it) if it does not exist yet.  Training always reads the
   bundled copy, so the result does not depend on the interpreter version.
2. Trains a byte-level BPE tokenizer (vocab 512) on that text and wraps it as a
   ``PreTrainedTokenizerFast``.
3. Trains three tiny causal LMs (StableLM, Llama with GQA, Mistral with tied
   embeddings) on the text with AdamW until they nearly memorise it, and saves
   them (float32, safetensors) together with the tokenizer.
4. Writes ``surgery/assets/README.md`` and prints parameter counts and the loss
   on the first 2048 tokens of the text.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "surgery" / "assets"
LICENSE_FILE = ASSETS / "python-license.txt"

SPECIAL = "<|endoftext|>"
VOCAB = 512
SEQ_EVAL = 2048
NUM_THREADS = 2
SEED = 1234


# --------------------------------------------------------------------------- data


def license_text() -> str:
    """The bundled license text; created from the running interpreter if missing."""
    if not LICENSE_FILE.exists():
        import builtins

        lic = builtins.license
        lic._Printer__setup()
        text = "\n".join(lic._Printer__lines)
        ASSETS.mkdir(parents=True, exist_ok=True)
        LICENSE_FILE.write_text(text, encoding="utf-8", newline="\n")
    return LICENSE_FILE.read_text(encoding="utf-8")


def build_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL,
        eos_token=SPECIAL,
        unk_token=SPECIAL,
        clean_up_tokenization_spaces=False,
    )
    ids = fast(text)["input_ids"]
    assert fast.decode(ids) == text, "tokenizer does not round-trip the license text"
    return fast


# ------------------------------------------------------------------------- models

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=SEQ_EVAL,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=None,
    initializer_range=0.02,
)


def make_config(name: str):
    from transformers import LlamaConfig, MistralConfig, StableLmConfig

    if name == "tiny-stablelm":
        return StableLmConfig(
            **COMMON,
            num_key_value_heads=4,
            use_qkv_bias=True,
            qk_layernorm=False,
            use_parallel_residual=False,
            layer_norm_eps=1e-5,
            hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            tie_word_embeddings=False,
        )
    if name in ("tiny-llama", "tiny-llama-deep"):  # the deep one: the same model with 8 layers
        return LlamaConfig(
            **{**COMMON, **({"num_hidden_layers": 8} if name == "tiny-llama-deep" else {})},
            num_key_value_heads=2,
            head_dim=16,
            rms_norm_eps=1e-5,
            hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
        )
    if name == "tiny-mistral-hf":
        return MistralConfig(
            **COMMON,
            num_key_value_heads=2,
            head_dim=16,
            rms_norm_eps=1e-5,
            hidden_act="silu",
            sliding_window=SEQ_EVAL,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=True,
        )
    if name == "tiny-qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(
            **COMMON,
            num_key_value_heads=2,
            head_dim=32,  # independent of hidden / heads (64 / 4 = 16), as in Qwen3-0.6B (1024 / 16 vs 128)
            rms_norm_eps=1e-6,
            hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=True,
        )
    if name == "tiny-olmo2":
        from transformers import Olmo2Config

        return Olmo2Config(**COMMON, num_key_value_heads=4, rms_norm_eps=1e-6,
                           rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False)
    if name == "tiny-phi3":
        from transformers import Phi3Config

        return Phi3Config(**COMMON, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=True,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75})
    if name == "tiny-gemma2":
        from transformers import Gemma2Config

        return Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, rms_norm_eps=1e-6,
                            sliding_window=512, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                            tie_word_embeddings=True)
    if name == "tiny-gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(**COMMON, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, rms_norm_eps=1e-6,
                                sliding_window=512, layer_types=["sliding_attention", "full_attention"],
                                tie_word_embeddings=True)
    raise KeyError(name)


DESCRIPTIONS = {
    "tiny-stablelm": "StableLM architecture: LayerNorm with bias, qkv bias, partial rotary (25%), "
    "4 heads / 4 kv heads, untied embeddings",
    "tiny-llama": "Llama architecture: RMSNorm, GQA (4 query heads / 2 kv heads, head_dim 16), "
    "untied embeddings",
    "tiny-mistral-hf": "Mistral architecture: RMSNorm, GQA (4 / 2 kv heads, head_dim 16), "
    "sliding_window 2048, TIED input/output embeddings",
    "tiny-olmo2": "OLMo 2 architecture: no pre-norms, norms on the branch outputs, q_norm/k_norm over the whole "
    "projection, 4 / 4 kv heads, untied embeddings (30 training steps, embedding offset)",
    "tiny-phi3": "Phi-3 architecture (as Phi-4-mini): fused qkv_proj and gate_up_proj, partial rotary (75%), "
    "GQA (4 / 2 kv heads), TIED embeddings (30 training steps, embedding offset)",
    "tiny-gemma2": "Gemma 2 architecture: 1 + w RMSNorm, sandwich norms, embeddings x sqrt(hidden), head_dim 32, "
    "query_pre_attn_scalar 32, soft-capping, sliding window 512 on alternate layers, TIED (30 training steps, "
    "embedding offset)",
    "tiny-gemma3": "Gemma 3 text architecture: as Gemma 2 plus per-head q/k norms, 4 / 1 kv heads, layers "
    "sliding (512) then full, TIED (30 training steps, embedding offset)",
    "tiny-qwen3": "Qwen3 architecture: RMSNorm, per-head q_norm/k_norm, GQA (4 / 2 kv heads), head_dim 32 "
    "independent of hidden / heads, TIED embeddings (60 training steps)",
    "tiny-llama-deep": "tiny-llama with 8 decoder layers instead of 2: a trained model deep enough to show "
    "layer pruning (dropping 1-2 of 8 layers) and MLP/head pruning",
}

# per-model training schedule
TRAIN = {
    # step counts chosen so every model lands at a realistic loss of roughly 0.6-0.9
    # nats/token on the text (well learned, but not saturated), like a real pretrained
    # LM on a familiar document.
    "tiny-stablelm": dict(steps=500, lr=3e-3),
    "tiny-llama": dict(steps=380, lr=3e-3),
    "tiny-mistral-hf": dict(steps=360, lr=3e-3),
    # the families added later: fewer steps (a shared CPU), enough to move every norm and the embedding mean
    "tiny-qwen3": dict(steps=60, lr=3e-3),
    "tiny-olmo2": dict(steps=30, lr=3e-3),
    "tiny-phi3": dict(steps=30, lr=3e-3),
    "tiny-gemma2": dict(steps=30, lr=3e-3),
    "tiny-gemma3": dict(steps=30, lr=3e-3),
    # last, so that SEED + index leaves every earlier model's seed as it was; 300 steps land it in the
    # same loss range as tiny-llama (400 memorise the text: loss 0.22) in under 3 minutes of CPU
    "tiny-llama-deep": dict(steps=300, lr=3e-3),
}
BATCH = 8
WINDOW = 256


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def eval_loss(model, ids: torch.Tensor) -> float:
    model.eval()
    x = ids[:SEQ_EVAL].unsqueeze(0)
    out = model(input_ids=x, labels=x)
    model.train()
    return float(out.loss)


def window_batch(ids: torch.Tensor, gen: torch.Generator, step: int) -> torch.Tensor:
    """Random windows; every 4th step one long window from the start of the text."""
    n = ids.numel()
    if step % 4 == 3:
        length = SEQ_EVAL if step % 8 == 7 else 1024
        start = int(torch.randint(0, max(1, n - length), (1,), generator=gen)) if step % 16 != 15 else 0
        return ids[start : start + length].unsqueeze(0)
    starts = torch.randint(0, n - WINDOW, (BATCH,), generator=gen)
    return torch.stack([ids[s : s + WINDOW] for s in starts.tolist()])


def train_model(name: str, ids: torch.Tensor, seed: int):
    from transformers import AutoModelForCausalLM

    cfg = make_config(name)
    seed_all(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    model.train()
    sched = TRAIN[name]
    steps, lr = sched["steps"], sched["lr"]
    decay, no_decay = [], []
    for pname, p in model.named_parameters():
        (no_decay if (p.ndim < 2 or "norm" in pname) else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    warmup = 30

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        prog = (step - warmup) / max(1, steps - warmup)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * prog)))

    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = window_batch(ids, gen, step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  [{name}] step {step:4d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    return model, time.time() - t0


@torch.no_grad()
def shift_layernorm_embeddings(model, ids: torch.Tensor, seed: int) -> None:
    """Give every embedding row a non-zero mean without changing the function.

    In a pre-LayerNorm model every reader of the residual stream is a LayerNorm,
    which ignores a shift along the all-ones direction.  Gradients therefore never
    move the per-row mean of the embeddings, and it stays at its ~0 init value.
    Adding a per-token constant is exactly function-preserving, and gives surgery
    such as "center the writing weights" something real to do.
    """
    before = eval_loss(model, ids)
    gen = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings().weight
    offset = 0.02 + 0.03 * torch.rand(emb.shape[0], 1, generator=gen)
    emb.add_(offset.to(emb.dtype))
    after = eval_loss(model, ids)
    assert abs(after - before) < 1e-4, (before, after)


# Builtins added with the newer families, trained only briefly on a shared CPU: test models for exact
# surgery, not language models. Their embedding rows get a random offset after training (it changes the
# function, which is then what the README's loss measures) so that the embedding mean is not ~0.
BRIEF = ("tiny-olmo2", "tiny-phi3", "tiny-gemma2", "tiny-gemma3")


def offset_embeddings(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb.add_((0.02 + 0.03 * torch.rand(emb.shape[0], 1, generator=gen)).to(emb.dtype))


def check_nontrivial(name: str, model) -> None:
    sd = model.state_dict()
    for k, v in sd.items():
        if "norm" in k and k.endswith(".weight"):
            assert not torch.allclose(v, torch.ones_like(v)), f"{name}: {k} still all ones"
        if "norm" in k and k.endswith(".bias"):
            assert not torch.allclose(v, torch.zeros_like(v)), f"{name}: {k} still all zeros"
    emb = model.get_input_embeddings().weight
    assert emb.mean().abs() > 1e-4, f"{name}: embedding mean {emb.mean().item()} too close to 0"


def save_model(name: str, model, tokenizer) -> Path:
    """Save into a scratch dir, then swap it in, so readers never see a half-written model."""
    out = ASSETS / name
    tmp = ASSETS / f".{name}.tmp"
    old = ASSETS / f".{name}.old"
    for d in (tmp, old):
        if d.exists():
            shutil.rmtree(d)
    model.config.use_cache = True
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():  # save_pretrained may create 0600 files; make them package-friendly
        f.chmod(0o644)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
    return out


def verify(name: str, ids: torch.Tensor) -> tuple[float, int]:
    """Reload ``name`` from disk the way users will; return (loss, parameter count)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = ASSETS / name
    model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True, dtype=torch.float32)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"{name}: loading info not clean: {bad}"
    tok = AutoTokenizer.from_pretrained(d)
    text = LICENSE_FILE.read_text(encoding="utf-8")
    tids = torch.tensor(tok(text)["input_ids"])
    assert torch.equal(tids, ids), f"{name}: reloaded tokenizer gives different ids"
    check_nontrivial(name, model)
    return eval_loss(model, ids), sum(p.numel() for p in model.parameters())


README_BEGIN = "<!-- begin: generated by scripts/make_tiny_models.py -->"
README_END = "<!-- end: generated by scripts/make_tiny_models.py -->"


def write_readme(results: dict) -> None:
    lines = [
        "# Builtin tiny models",
        "",
        "Small causal LMs embedded in the package for tests and demos. They were made with",
        "",
        "    python scripts/make_tiny_models.py",
        "",
        "which is deterministic and runs on CPU in a few minutes. The script trains a",
        "byte-level BPE tokenizer (vocab 512, special token `<|endoftext|>` used as bos/eos/unk)",
        "on `python-license.txt` (the Python license text as printed by `license()`), then",
        "trains each model with AdamW on that same text until it knows it well",
        "(loss below 1 nat/token, like a real pretrained LM on a familiar document).",
        "All models are float32 safetensors with hidden size 64, 2 layers (8 in `tiny-llama-deep`), 4 attention heads,",
        "intermediate size 160 and max_position_embeddings 2048, and share the tokenizer.",
        "",
        "| builtin | architecture | params | loss (first 2048 tokens of the license) |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| `{name}` | {DESCRIPTIONS[name]} | {r['params']:,} | {r['loss']:.4f} |")
    lines += [
        "",
        "The loss is the mean next-token cross-entropy on the license text tokenized with the",
        "bundled tokenizer (no BOS added), truncated to its first 2048 tokens, evaluated as one",
        "float32 sequence. Norm weights/biases and embedding means are non-trivial after",
        "training, so weight-transforming surgery is actually exercised. The builtins of the",
        "newer families (Qwen3, OLMo 2, Phi-3, Gemma 2, Gemma 3) are test models for exact surgery,",
        "trained for a few dozen steps only (their losses say so), not language models.",
        "",
    ]
    # Only the block between the markers belongs to this script; anything else in
    # README.md (e.g. notes on builtins made by other scripts) is kept.
    block = "\n".join([README_BEGIN, *lines, README_END])
    readme = ASSETS / "README.md"
    old = readme.read_text(encoding="utf-8") if readme.exists() else ""
    if README_BEGIN in old and README_END in old:
        head, rest = old.split(README_BEGIN, 1)
        tail = rest.split(README_END, 1)[1]
        new = head + block + tail
    elif old.startswith("# Builtin tiny models") and "make_tiny_models.py" in old and README_BEGIN not in old:
        new = block + "\n"  # the unmarked file an earlier version of this script wrote
    elif old:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    else:
        new = block + "\n"
    readme.write_text(new, encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=list(TRAIN), help="build only this model (repeatable)")
    args = ap.parse_args(argv)

    torch.set_num_threads(NUM_THREADS)
    try:
        torch.use_deterministic_algorithms(True)
    except Exception as e:  # pragma: no cover
        print(f"warning: deterministic algorithms unavailable: {e}", file=sys.stderr)

    ASSETS.mkdir(parents=True, exist_ok=True)
    init = ASSETS / "__init__.py"
    if not init.exists():
        init.write_text("", encoding="utf-8")

    text = license_text()
    tokenizer = build_tokenizer(text)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    print(f"license text: {len(text)} chars, {ids.numel()} tokens (vocab {len(tokenizer)})")

    names = args.only or list(TRAIN)
    results = {}
    for i, name in enumerate(TRAIN):
        if name not in names:
            continue
        print(f"training {name} ...", flush=True)
        model, secs = train_model(name, ids, SEED + i)
        if name == "tiny-stablelm":
            shift_layernorm_embeddings(model, ids, seed=SEED + 100 + i)
        if name in BRIEF:
            offset_embeddings(model, seed=SEED + 100 + i)
        check_nontrivial(name, model)
        save_model(name, model, tokenizer)
        loss, params = verify(name, ids)
        results[name] = dict(params=params, loss=loss, secs=secs)

    # models not rebuilt in this run (--only) are measured from disk for the README
    for name in TRAIN:
        if name not in results and (ASSETS / name / "model.safetensors").exists():
            loss, params = verify(name, ids)
            results[name] = dict(params=params, loss=loss, secs=float("nan"))
    write_readme({n: results[n] for n in TRAIN if n in results})

    print()
    print(f"{'model':<18}{'params':>10}{'loss@2048':>12}{'train s':>10}")
    for name in TRAIN:
        if name in results:
            r = results[name]
            secs = "-" if math.isnan(r["secs"]) else f"{r['secs']:.1f}"
            print(f"{name:<18}{r['params']:>10,}{r['loss']:>12.4f}{secs:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
