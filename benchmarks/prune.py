"""Time and peak memory of pruning a synthetic Llama-shaped checkpoint (default 1.72 GB float32, as
`verify_memory.py` builds it: 24 layers, hidden 1024, MLP 3584, vocab 32000, the tiny builtin's tokenizer).

Each row is a fresh `surgery run` process under /usr/bin/time -v: the importance measurement (a
layer-streamed pass over the calibration tokens) and the streamed write, with `--no-verify`; then the
MLP prune again with verification (source, output, and the seeded random prune of the same sizes
beside it). `cp -r` + `sync` of the source gives the floor. Random weights: the scores mean nothing,
the costs are what is measured.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from verify_memory import build, checkpoint_arguments, measure, print_rows, result

CASES = [
    ("prune_mlp x0.75 (activation)", [{"op": "prune_mlp", "intermediate_size": "x0.75", "importance": "activation"}], False),
    ("prune_heads x0.5 (activation)", [{"op": "prune_heads", "num_heads": "x0.5", "importance": "activation"}], False),
    ("prune_layers -6 (block_influence)", [{"op": "prune_layers", "num_layers": -6, "importance": "block_influence"}], False),
    ("prune_layers -6 block (angular)", [{"op": "prune_layers", "num_layers": -6, "block": True, "importance": "angular"}], False),
    ("prune_mlp x0.75 (activation), verified", [{"op": "prune_mlp", "intermediate_size": "x0.75", "importance": "activation"}], True),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    checkpoint_arguments(ap)
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(Path(args.code).resolve()))
    work = Path(tempfile.mkdtemp(prefix="surgery-prune-bench-"))
    try:
        size = build(work / "src", args.layers, args.hidden, args.intermediate, args.vocab, args.hidden // 64, args.dtype)
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", str(work / "src"), str(work / "cp")], check=True)
        subprocess.run(["sync"], check=True)
        cp = time.perf_counter() - t0
        shutil.rmtree(work / "cp")
        rows = [("`cp -r` + `sync` of the source", 0.0, cp, "-")]
        for what, ops, verify in CASES:
            recipe = work / "r.yaml"
            recipe.write_text(json.dumps({"name": "bench", "source": str(work / "src"), "ops": ops,
                                          "verify": {"max_tokens": args.tokens}}))
            cmd = [sys.executable, "-m", "surgery", "run", str(recipe), "--output", str(work / "o"), "--force"]
            peak, wall, rc = measure(cmd + ([] if verify else ["--no-verify"]), env, work)
            rows.append((f"`surgery run` {what}", peak, wall, result(rc)))
            shutil.rmtree(work / "o", ignore_errors=True)
        load = os.getloadavg()[0]
        print(f"Llama {args.layers} layers, hidden {args.hidden} ({args.hidden // 64} heads), MLP {args.intermediate}, "
              f"vocab {args.vocab}, {size:.2f} GB {args.dtype}, {args.tokens} calibration tokens; load at end {load:.1f}")
        print_rows(rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
