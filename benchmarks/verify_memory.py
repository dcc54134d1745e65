"""Peak memory and time of verification: `surgery run` with verification and `surgery verify`.

Builds a synthetic Llama-shaped checkpoint (default: float32, 24 layers, hidden 1024, MLP 3584,
vocab 32000, 1.72 GB; the tiny builtin's tokenizer; `--layers 2 --hidden 4096 --intermediate 11008
--dtype bfloat16` gives two layers of a 7B Llama), then measures, each in a fresh process with
/usr/bin/time -v:

* `surgery run` of a `grow_mlp` recipe with `--no-verify` (the transform alone),
* the same run with verification (source, written output, gradient-flow check),
* `surgery verify OUT --against SRC`.

`--code DIR` runs the surgery package found in DIR (e.g. an export of an older commit) for
before/after rows. Everything lives in a temporary directory under /tmp, deleted at the end.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float, int]:
    """(peak RSS in MB, wall seconds, exit code) of a command, run outside any checkout (`python -m`
    would import the package in its working directory before PYTHONPATH)."""
    t0 = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - t0
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1)) / 1024
    if out.returncode not in (0, 1):
        sys.stderr.write(out.stderr[-3000:])
    return peak, wall, out.returncode


def print_rows(rows: list[tuple[str, float, float, str]]) -> None:
    """(command, peak RSS in MB or 0 for none, wall seconds, result) as a markdown table."""
    print("| command | peak RSS | wall time | result |")
    print("|---|---|---|---|")
    for what, peak, wall, res in rows:
        print(f"| {what} | {f'{peak:,.0f} MB' if peak else '-'} | {wall:.1f} s | {res} |")


def build(path: Path, layers: int, hidden: int, inter: int, vocab: int, heads: int, dtype: str) -> float:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(path)
    del model
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(ROOT / "surgery" / "assets" / "tiny-llama" / f, path / f)
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9


def checkpoint_arguments(ap: argparse.ArgumentParser) -> None:
    """The synthetic checkpoint's shape and the code measured (shared with prune.py)."""
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the checkpoint's storage dtype")
    ap.add_argument("--code", default=str(ROOT), help="directory holding the surgery package to measure")


def result(rc: int) -> str:
    return "exit 0" if rc == 0 else f"exit {rc}"


def main() -> None:
    ap = argparse.ArgumentParser()
    checkpoint_arguments(ap)
    ap.add_argument("--label", default="this tree")
    ap.add_argument("--upcycle", type=int, default=0, metavar="E",
                    help="measure upcycle_moe into E experts (Mixtral) instead of grow_mlp")
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(Path(args.code).resolve()))
    work = Path(tempfile.mkdtemp(prefix="surgery-verify-mem-"))
    try:
        size = build(work / "src", args.layers, args.hidden, args.intermediate, args.vocab, args.hidden // 64, args.dtype)
        recipe = work / "r.yaml"
        op = (f"  - op: upcycle_moe\n    num_experts: {args.upcycle}\n    top_k: 2\n" if args.upcycle else
              "  - op: grow_mlp\n    intermediate_size: x1.25\n")
        what = f"upcycle_moe x{args.upcycle}" if args.upcycle else "grow_mlp"
        recipe.write_text(f"name: m\nsource: {work / 'src'}\nops:\n{op}verify:\n  max_tokens: {args.tokens}\n")
        surgery = [sys.executable, "-m", "surgery"]
        rows = []
        peak, wall, _ = measure(surgery + ["run", str(recipe), "--output", str(work / "o"), "--no-verify", "--force"], env, work)
        out_gb = sum(f.stat().st_size for f in (work / "o").glob("*.safetensors")) / 1e9
        rows.append((f"`surgery run` {what}, `--no-verify` (output {out_gb:.2f} GB)", peak, wall, "-"))
        peak, wall, rc = measure(surgery + ["run", str(recipe), "--output", str(work / "o"), "--force"], env, work)
        rows.append((f"`surgery run` {what}, verified", peak, wall, result(rc)))
        peak, wall, rc = measure(surgery + ["verify", str(work / "o"), "--against", str(work / "src"),
                                            "--max-tokens", str(args.tokens)], env, work)
        rows.append(("`surgery verify OUT --against SRC`", peak, wall, result(rc)))
        print(f"{args.label}: Llama {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, vocab {args.vocab}, "
              f"{size:.2f} GB {args.dtype}, {args.tokens} tokens")
        print_rows(rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
