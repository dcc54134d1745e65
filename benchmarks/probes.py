"""What run.py measures beside plain commands, each in its own process:

    python benchmarks/probes.py forward SRC --tokens N [--seed S]
        one streamed forward pass of SRC through surgery's runner (`runtime.evaluation.evaluate`, float32, as
        verification evaluates a bf16 source) on the seeded random ids `verify.data: random` gives:
        the unit a verified run's time is counted in. Prints one JSON line: its parts' seconds.
    python benchmarks/probes.py profile OUT.prof -- run RECIPE [...]
        the `surgery` command under cProfile, stats dumped to OUT.prof, its exit status kept
        (`python -m cProfile` swallows it). Verification runs on the main thread, so cProfile sees it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _timed(cls, name: str, totals: dict, key: str) -> None:
    """Add the wall time of every call of cls.name to totals[key] (outermost calls only)."""
    inner = getattr(cls, name)
    depth = [0]

    def wrapper(*a, **kw):
        depth[0] += 1
        t0 = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                totals[key] += time.perf_counter() - t0
                totals[key + "_calls"] += 1

    setattr(cls, name, wrapper)


def forward(src: Path, tokens: int, seed: int) -> dict:
    import surgery  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads, as the command does)
    from surgery.cli import limit_malloc_arenas

    limit_malloc_arenas()
    t_start = time.perf_counter()
    import torch

    from surgery.runtime import build, evaluation, sources, streamed
    from surgery.verify.data import calibration_ids

    totals = {k: 0.0 for k in ("build", "build_calls", "layers", "layers_calls", "load", "load_calls")}
    source = sources.open_source(src)
    ids = calibration_ids(src, "random", tokens, source.config["vocab_size"], seed)
    build.skeleton(source.config, torch.float32, torch.device("cpu"))  # transformers' modeling imports, counted apart
    _timed(streamed.StreamedModel, "__init__", totals, "build")
    _timed(streamed.StreamedModel, "hidden", totals, "layers")
    _timed(sources.CheckpointSource, "load", totals, "load")
    t0 = time.perf_counter()
    ev = evaluation.evaluate(source, ids, torch.device("cpu"), torch.float32)
    t1 = time.perf_counter()
    return {"probe": "forward", "tokens": int(ids.shape[1]), "loss": ev.loss, "imports_s": t0 - t_start,
            "evaluate_s": t1 - t0, "build_s": totals["build"], "layers_s": totals["layers"],
            "head_s": (t1 - t0) - totals["build"] - totals["layers"], "load_s": totals["load"],
            "loads": int(totals["load_calls"]), "threads": torch.get_num_threads()}


def profile(out: Path, argv: list[str]) -> int:
    import cProfile

    import surgery  # noqa: F401
    from surgery.cli import limit_malloc_arenas, main

    limit_malloc_arenas()
    prof = cProfile.Profile()
    try:
        rc = prof.runcall(main, argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        prof.dump_stats(str(out))
    return rc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("forward")
    f.add_argument("source", type=Path)
    f.add_argument("--tokens", type=int, required=True)
    f.add_argument("--seed", type=int, default=0, help="the recipe's seed: the same ids verification draws")
    p = sub.add_parser("profile")
    p.add_argument("out", type=Path)
    p.add_argument("argv", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.cmd == "forward":
        print(json.dumps(forward(args.source, args.tokens, args.seed)), flush=True)
        code = 0
    else:
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        code = profile(args.out, argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as `surgery`'s entry: no interpreter teardown in the time measured


if __name__ == "__main__":
    main()
