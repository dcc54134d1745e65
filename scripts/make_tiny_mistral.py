#!/usr/bin/env python
"""Build ``builtin:tiny-mistral``: a tiny Mistral in Mistral's native release layout.

Usage::

    python scripts/make_tiny_mistral.py

Deterministic, CPU only (one thread), no network, about a minute:

1. Trains a sentencepiece BPE tokenizer (vocab 512, byte fallback, identity normalisation, as
   Mistral's tokenizers are) on ``surgery/assets/python-license.txt`` -> ``tokenizer.model``.
2. Trains a transformers ``MistralForCausalLM`` (hidden 64, 4 heads / 2 kv heads, head_dim 16,
   2 layers, MLP 160, untied) on the text tokenized by that tokenizer until it nearly memorises it.
3. Writes it with surgery's own native writer (``surgery.io.native_format.MistralFormat``):
   ``consolidated.safetensors`` (native names, interleaved rotary rows) and ``params.json``.
   Beside ``tokenizer.model`` it saves ``tokenizer.json``/``tokenizer_config.json`` converted
   from it by transformers' own converter (``surgery.io.tokenizer.hf_tokenizer_from_native``,
   needs protobuf), so ``AutoTokenizer.from_pretrained(dir)`` works. (The committed asset's
   tokenizer.json was made by an earlier hand-written converter; tests check both encode alike.)
4. Reads the folder back through ``NativeCheckpoint`` and checks the loss is the trained model's.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ASSETS = REPO / "surgery" / "assets"
OUT = ASSETS / "tiny-mistral"
TEXT = ASSETS / "python-license.txt"
SEED = 4321
VOCAB = 512
SEQ_EVAL = 2048
STEPS, LR, BATCH, WINDOW, WARMUP = 600, 3e-3, 8, 256, 30


def train_tokenizer(text: str) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=buf, vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    return buf.getvalue()


def make_config():
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, hidden_act="silu", max_position_embeddings=SEQ_EVAL, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, sliding_window=4096,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )


def batch(ids: torch.Tensor, gen: torch.Generator, step: int) -> torch.Tensor:
    """Random windows; every 4th step one long window (every 16th the start of the text, as verified)."""
    n = ids.numel()
    if step % 4 == 3:
        length = SEQ_EVAL if step % 8 == 7 else 1024
        start = 0 if step % 16 == 15 else int(torch.randint(0, n - length, (1,), generator=gen))
        return ids[start:start + length].unsqueeze(0)
    starts = torch.randint(0, n - WINDOW, (BATCH,), generator=gen)
    return torch.stack([ids[s:s + WINDOW] for s in starts.tolist()])


@torch.no_grad()
def eval_loss(model, ids: torch.Tensor) -> float:
    x = ids[:SEQ_EVAL].unsqueeze(0)
    return float(model(input_ids=x, labels=x).loss)


def train(ids: torch.Tensor):
    from transformers import MistralForCausalLM

    torch.manual_seed(SEED)
    model = MistralForCausalLM._from_config(make_config(), dtype=torch.float32, attn_implementation="eager")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    t0 = time.time()
    for step in range(STEPS):
        warm = (step + 1) / WARMUP if step < WARMUP else None
        prog = (step - WARMUP) / (STEPS - WARMUP)
        for g in opt.param_groups:
            g["lr"] = LR * (warm if warm is not None else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * prog)))
        x = batch(ids, gen, step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == STEPS - 1:
            print(f"  step {step:4d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    return model.eval()


def main() -> int:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    from surgery.io.checkpoint import InMemoryCheckpoint
    from surgery.io.native import NativeCheckpoint
    from surgery.execute import write_output
    from surgery.io.native_format import MistralFormat
    from surgery.io.tokenizer import hf_tokenizer_from_native
    from surgery.spec import ModelSpec
    from surgery.state import ModelState
    from surgery.runtime.build import model_from_tensors

    text = TEXT.read_text(encoding="utf-8")
    tmp = Path(tempfile.mkdtemp(prefix="tiny-mistral-"))
    try:
        (tmp / "tokenizer.model").write_bytes(train_tokenizer(text))
        tok = hf_tokenizer_from_native(tmp / "tokenizer.model")
        ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
        assert tok.decode(ids, skip_special_tokens=True) == text, "tokenizer does not round-trip the license text"
        print(f"license text: {len(text)} chars, {ids.numel()} tokens (vocab {VOCAB}, BOS first)")

        model = train(ids)
        trained = eval_loss(model, ids)
        cfg = model.config.to_dict()
        ck = InMemoryCheckpoint(cfg, {k: v.detach().clone() for k, v in model.state_dict().items()})
        state = ModelState.from_checkpoint(ModelSpec.from_config(cfg), ck.tensors)
        write_output(state, MistralFormat("float32"), ck, tmp, torch.device("cpu"), progress=False)
        tok.save_pretrained(str(tmp))

        back = NativeCheckpoint(tmp)
        reread = model_from_tensors(back.config, {n: back.load(n) for n in back.tensors}, torch.float32, torch.device("cpu"))
        loss = eval_loss(reread, ids)
        assert abs(loss - trained) <= 1e-6 * max(1.0, trained), (loss, trained)

        if OUT.exists():
            shutil.rmtree(OUT)
        OUT.mkdir(parents=True)
        for f in ("params.json", "consolidated.safetensors", "tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tmp / f, OUT / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in OUT.iterdir())
    params = sum(math.prod(m.shape) for m in back.tensors.values())
    print(json.dumps(json.loads((OUT / "params.json").read_text())))
    print(f"wrote {OUT}: {params:,} parameters, {size / 1e6:.2f} MB, loss on the first {SEQ_EVAL} tokens {loss:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
