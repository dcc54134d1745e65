"""Benchmark surgery against `cp -r`, the naive transformers way, and mergekit, on synthetic checkpoints.

    python benchmarks/run.py                      # the default matrix, writes benchmarks/RESULTS.md
    python benchmarks/run.py --quick              # 0.25 GB smoke test, writes WORKDIR/RESULTS-quick.md
    python benchmarks/run.py --sizes 1GB --dtypes bfloat16 --methods cp,copy,grow_heads

For each size and dtype it builds (once, cached in --workdir) a Llama-shaped checkpoint of sharded
safetensors with a config.json and no tokenizer. Sizes grow by depth at a fixed width, so the
largest tensor (the embedding) is the same at every size: memory that grows with the size is
memory that grows with the model, not with a tensor.

Every measurement is a fresh subprocess under `/usr/bin/time -v` (peak RSS from the kernel), with
the process tree's RSS also polled from /proc (anonymous and file-backed apart). Before each one
the source is read once, so all start from a warm page cache (dropping caches needs root), and
pending writes are flushed. After it, `sync -f` on the output's filesystem is timed too, so writes
still in the page cache (cp never fsyncs, surgery fsyncs every shard) are paid for: the time that
counts is wall + sync. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ANALYSIS_MARK = "<!-- analysis: text below this line is kept when the benchmark rewrites this file -->"

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
METHODS = ["cp", "copy", "grow_heads", "grow_mlp", "clone_width", "naive", "mergekit"]
SURGERY_METHODS = ["copy", "grow_heads", "grow_mlp", "clone_width"]
# issue 17's time targets: time over cp's for the same bytes
CP_TARGET = {"copy": 1.5, "grow_heads": 2.0, "grow_mlp": 2.0, "clone_width": 3.0}
LABELS = {
    "cp": "cp -r",
    "copy": "surgery (no ops)",
    "grow_heads": "surgery grow_heads x1.5 + rescale_norm",
    "grow_mlp": "surgery grow_mlp x1.25",
    "clone_width": "surgery clone_width x2",
    "naive": "naive transformers (grow_heads x1.5)",
    "mergekit": "mergekit passthrough",
}
GiB = 1 << 30
MiB = 1 << 20


# ----------------------------------------------------------------------------- sizes and shapes

def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * units[u])
    return int(float(t))


def fmt_size(n: int) -> str:
    return f"{n / 1e9:g}GB"


class Shape:
    """A Llama of fixed width; the number of layers makes the size."""

    def __init__(self, hidden: int, vocab: int):
        self.hidden = hidden
        self.head_dim = 64
        self.heads = hidden // self.head_dim
        self.kv_heads = max(1, self.heads // 4)
        self.inter = 4 * hidden
        self.vocab = vocab

    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return 2 * h * h + 2 * kv * h + 3 * h * self.inter + 2 * h

    def fixed_params(self) -> int:
        return 2 * self.vocab * self.hidden + self.hidden

    def layers_for(self, nbytes: int, dtype: str) -> int:
        params = nbytes // ITEMSIZE[dtype]
        return max(1, round((params - self.fixed_params()) / self.layer_params()))

    def tensors(self, layers: int):
        h, kv = self.hidden, self.kv_heads * self.head_dim
        yield "model.embed_tokens.weight", (self.vocab, h)
        for i in range(layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", (h,)
            yield p + "self_attn.q_proj.weight", (h, h)
            yield p + "self_attn.k_proj.weight", (kv, h)
            yield p + "self_attn.v_proj.weight", (kv, h)
            yield p + "self_attn.o_proj.weight", (h, h)
            yield p + "post_attention_layernorm.weight", (h,)
            yield p + "mlp.gate_proj.weight", (self.inter, h)
            yield p + "mlp.up_proj.weight", (self.inter, h)
            yield p + "mlp.down_proj.weight", (h, self.inter)
        yield "model.norm.weight", (h,)
        yield "lm_head.weight", (self.vocab, h)

    def config(self, layers: int, dtype: str) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.inter, "num_hidden_layers": layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim, "vocab_size": self.vocab,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
            "bos_token_id": 1, "eos_token_id": 2, "dtype": dtype,
        }


def build_checkpoint(path: Path, shape: Shape, nbytes: int, dtype: str, shard_size: int) -> dict:
    """Random weights (std 0.02, norms 1), sharded like save_pretrained; cached by its description."""
    import torch
    from safetensors.torch import save_file

    layers = shape.layers_for(nbytes, dtype)
    desc = {"hidden": shape.hidden, "vocab": shape.vocab, "layers": layers, "dtype": dtype, "shard_size": shard_size}
    marker = path / "bench.json"
    if marker.is_file() and json.loads(marker.read_text()) == desc:
        return desc
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    tdtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    shards, cur, used = [], {}, 0
    specs = list(shape.tensors(layers))
    for name, shp in specs:
        n = ITEMSIZE[dtype]
        for s in shp:
            n *= s
        if cur and used + n > shard_size:
            shards.append(cur)
            cur, used = {}, 0
        cur[name] = (name, shp)
        used += n
    shards.append(cur)
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for shard, fname in zip(shards, names):
        tensors = {}
        for name, (_, shp) in shard.items():
            if len(shp) == 1:
                t = torch.ones(shp, dtype=tdtype)
            else:
                t = torch.empty(shp, dtype=torch.float32).normal_(0, 0.02, generator=g).to(tdtype)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(shape.config(layers, dtype), indent=2) + "\n")
    marker.write_text(json.dumps(desc))
    return desc


def largest_tensor(directory: Path) -> int:
    """Bytes of the largest tensor in a directory's safetensors files (from the headers)."""
    best = 0
    for f in directory.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                a, b = v["data_offsets"]
                best = max(best, b - a)
    return best


def dir_bytes(directory: Path, weights_only: bool = False) -> int:
    if not directory.exists():
        return 0
    return sum(p.stat().st_size for p in directory.rglob("*")
               if p.is_file() and (not weights_only or p.suffix == ".safetensors"))


# ----------------------------------------------------------------------------- measuring

def warm(directory: Path) -> None:
    """Read every file once so the measurement starts from a warm page cache."""
    buf = bytearray(16 * MiB)
    for f in sorted(directory.iterdir()):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "RssAnon:", "RssFile:", "RssShmem:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def poll_tree(proc: subprocess.Popen, interval: float = 0.05) -> dict[str, int]:
    """Peak of the process tree's summed RSS (total, anonymous, file-backed) until it exits."""
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            pids = [proc.pid] + [c.pid for c in root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pids = [proc.pid]
        tot = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        for pid in pids:
            st = _status(pid)
            for k in tot:
                tot[k] += st.get(k, 0)
        for k in tot:
            peaks[k] = max(peaks[k], tot[k])
        time.sleep(interval)
    return peaks


def parse_time_v(text: str) -> dict:
    out = {}
    pats = {
        "maxrss": r"Maximum resident set size \(kbytes\): (\d+)",
        "user": r"User time \(seconds\): ([\d.]+)",
        "sys": r"System time \(seconds\): ([\d.]+)",
        "cpu_pct": r"Percent of CPU this job got: (\d+)%",
        "fs_out": r"File system outputs: (\d+)",
        "fs_in": r"File system inputs: (\d+)",
        "major_faults": r"Major \(requiring I/O\) page faults: (\d+)",
    }
    for k, p in pats.items():
        m = re.search(p, text)
        if m:
            out[k] = float(m.group(1))
    if "maxrss" in out:
        out["maxrss"] = int(out["maxrss"]) * 1024
    return out


def evict(directory: Path) -> None:
    """Drop a directory's clean pages from the page cache (posix_fadvise DONTNEED needs no root)."""
    for f in sorted(directory.iterdir()):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(label: str, cmd: list[str], source: Path, output: Path, logdir: Path, env: dict, cold: bool = False) -> dict:
    subprocess.run(["sync"], check=False)
    evict(source) if cold else warm(source)
    subprocess.run(["sync"], check=False)
    load = os.getloadavg()
    time_bin = shutil.which("time", path="/usr/bin:/bin")
    tfile = logdir / f"{label}.time"
    full = ([time_bin, "-v", "-o", str(tfile)] if time_bin else []) + cmd
    log = logdir / f"{label}.log"
    t0 = time.perf_counter()
    with open(log, "w") as lf:
        proc = subprocess.Popen(full, stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=str(logdir))
        peaks = poll_tree(proc)
        rc = proc.wait()
    t1 = time.perf_counter()
    if output.exists():
        subprocess.run(["sync", "-f", str(output)], check=False)
    t2 = time.perf_counter()
    rec = {"label": label, "cmd": cmd, "rc": rc, "wall": t1 - t0, "sync": t2 - t1, "load1": load[0],
           "peak_rss_polled": peaks["VmRSS"], "peak_anon": peaks["RssAnon"], "peak_file": peaks["RssFile"],
           "read_bytes": dir_bytes(source, weights_only=True), "written_bytes": dir_bytes(output),
           "largest_tensor": max(largest_tensor(source), largest_tensor(output)) if output.exists() else largest_tensor(source),
           "load1_after": os.getloadavg()[0]}
    if time_bin and tfile.exists():
        rec.update(parse_time_v(tfile.read_text()))
    rec.setdefault("maxrss", peaks["VmRSS"])
    rec["total"] = rec["wall"] + rec["sync"]
    if rc != 0:
        rec["error"] = log.read_text()[-2000:]
    shutil.rmtree(output, ignore_errors=True)
    return rec


# ----------------------------------------------------------------------------- the methods

def surgery_recipe(path: Path, name: str, source: Path, output: Path, ops: list[dict], shard_size: int) -> Path:
    import yaml

    doc = {"name": f"bench-{name}", "source": str(source), "device": "cpu", "seed": 0,
           "output": {"path": str(output), "shard_size": str(shard_size)}, "ops": ops}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


OPS = {
    "copy": [],
    "grow_heads": [{"op": "grow_heads", "num_heads": "x1.5"}, {"op": "rescale_norm"}],
    "grow_mlp": [{"op": "grow_mlp", "intermediate_size": "x1.25"}],
    "clone_width": [{"op": "clone_width", "factor": 2, "noise": 0.01}],
}


def find_mergekit(arg: str | None) -> str | None:
    for cand in ([arg] if arg else []) + [shutil.which("mergekit-yaml"), str(REPO.parent / "bench-venv/bin/mergekit-yaml")]:
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def command_for(method: str, source: Path, output: Path, desc: dict, work: Path, args, mergekit: str | None) -> list[str] | None:
    if method == "cp":
        return ["cp", "-r", str(source), str(output)]
    if method in OPS:
        recipe = surgery_recipe(work / f"{method}.yaml", method, source, output, OPS[method], args.shard_size)
        return [sys.executable, "-m", "surgery", "run", str(recipe), "--no-verify"]
    if method == "naive":
        return [sys.executable, str(HERE / "naive_grow.py"), str(source), str(output), "--heads-factor", "1.5",
                "--shard-size", f"{args.shard_size // 10**6}MB"]
    if method == "mergekit":
        if mergekit is None:
            return None
        cfg = work / "mergekit.yml"
        cfg.write_text(json.dumps({"merge_method": "passthrough", "dtype": desc["dtype"],
                                   "slices": [{"sources": [{"model": str(source), "layer_range": [0, desc["layers"]]}]}]}))
        per_shard = args.shard_size // ITEMSIZE[desc["dtype"]]
        return [mergekit, str(cfg), str(output), "--out-shard-size", str(per_shard), "--no-copy-tokenizer", "--quiet"]
    raise ValueError(method)


# ----------------------------------------------------------------------------- the report

def machine() -> dict:
    import importlib.metadata as md

    def ver(p):
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return "absent"

    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "ram_gib": psutil.virtual_memory().total / GiB,
            "python": platform.python_version(), "torch": ver("torch"), "transformers": ver("transformers"),
            "safetensors": ver("safetensors"), "surgery": ver("model-surgery"), "blake3": ver("blake3"), "kernel": platform.release(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "code": code_version()}


def code_version() -> str:
    """The commit measured, and the files of the package that differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "surgery"],
                               capture_output=True, text=True).stdout.split("\n")
    except OSError:
        return "unknown (no git)"
    files = [line[3:] for line in dirty if line.strip()]
    return f"commit {head or '?'}" + (f" with uncommitted changes to {', '.join(files)}" if files else "")


def disk_line(path: Path) -> str:
    try:
        df = subprocess.run(["df", "-hT", str(path)], capture_output=True, text=True).stdout.strip().splitlines()[-1].split()
        return f"{df[0]} ({df[1]}), {df[2]} total, {df[4]} free"
    except Exception:
        return "?"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def f2(x, fmt="{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def analyse(results: list[dict]) -> tuple[list[str], list[dict]]:
    """Table rows and target checks."""
    rows, checks = [], []
    by_ckpt: dict[tuple, dict] = {}
    for r in results:
        by_ckpt.setdefault((r["size"], r["dtype"]), {})[r["method"]] = r
    for (size, dtype), ms in by_ckpt.items():
        cp, naive = ms.get("cp"), ms.get("naive")
        cp_rate = (cp["read_bytes"] + cp["written_bytes"]) / cp["total"] if cp and cp["rc"] == 0 else None
        for m in METHODS:
            r = ms.get(m)
            if r is None:
                continue
            moved = r["read_bytes"] + r["written_bytes"]
            ok = r["rc"] == 0
            rate = moved / r["total"] if ok else None
            r["vs_cp"] = ratio(r["total"], cp["total"]) if cp and ok else None
            r["vs_cp_per_byte"] = ratio(cp_rate, rate) if ok else None
            r["naive_over_this"] = (ratio(naive["maxrss"], r["maxrss"])
                                    if naive and naive["rc"] == 0 and ok and m not in ("cp", "naive") else None)
            rows.append("| " + " | ".join([
                f"{fmt_size(size)} {dtype}", LABELS[m] + ("" if ok else f" (failed rc={r['rc']})"),
                f"{r['wall']:.1f} + {r['sync']:.1f}", f"{moved / 1e9:.2f}", f2(rate and rate / 1e6, "{:.0f}"),
                f2(r["vs_cp"]), f2(r["vs_cp_per_byte"]), f"{r['maxrss'] / MiB:.0f}", f"{r['peak_anon'] / MiB:.0f}",
                f2(r["naive_over_this"], "{:.1f}x"), f"{r.get('user', 0) + r.get('sys', 0):.1f}", f"{r.get('cpu_pct', 0):.0f}%",
                f"{r['load1']:.1f}",
            ]) + " |")
    # targets
    for (size, dtype), ms in by_ckpt.items():
        for m in SURGERY_METHODS:
            r = ms.get(m)
            if r is None or r["rc"] != 0:
                continue
            if r.get("vs_cp_per_byte") is not None:
                checks.append({"target": f"time within {CP_TARGET[m]}x of cp (same bytes)", "case": f"{fmt_size(size)} {dtype} {m}",
                               "value": f"{r['vs_cp_per_byte']:.2f}x", "met": r["vs_cp_per_byte"] <= CP_TARGET[m]})
            naive = ms.get("naive")
            if m == "grow_heads" and naive and naive["rc"] == 0:  # the same job as the naive way
                checks.append({"target": "faster than the naive way", "case": f"{fmt_size(size)} {dtype} {m}",
                               "value": f"{r['total']:.1f} s vs {naive['total']:.1f} s", "met": r["total"] < naive["total"]})
            limit = GiB + 3 * r["largest_tensor"]
            checks.append({"target": "peak RSS < 1 GiB + 3x largest tensor", "case": f"{fmt_size(size)} {dtype} {m}",
                           "value": f"{r['maxrss'] / MiB:.0f} MiB vs {limit / MiB:.0f} MiB", "met": r["maxrss"] < limit})
            checks.append({"target": "peak anonymous RSS < 1 GiB + 3x largest tensor", "case": f"{fmt_size(size)} {dtype} {m}",
                           "value": f"{r['peak_anon'] / MiB:.0f} MiB vs {limit / MiB:.0f} MiB", "met": r["peak_anon"] < limit})
            if m == "grow_heads" and r.get("naive_over_this") is not None:  # the same job as the naive way
                checks.append({"target": ">= 3x less peak memory than naive", "case": f"{fmt_size(size)} {dtype} {m}",
                               "value": f"{r['naive_over_this']:.1f}x", "met": r["naive_over_this"] >= 3})
        mk, cp_ = ms.get("mergekit"), ms.get("copy")
        if mk and cp_ and mk["rc"] == 0 and cp_["rc"] == 0:
            # per byte: mergekit writes its own metadata, surgery its report; compare rates
            v = ratio((mk["read_bytes"] + mk["written_bytes"]) / mk["total"], (cp_["read_bytes"] + cp_["written_bytes"]) / cp_["total"])
            checks.append({"target": "surgery copy not slower than mergekit passthrough (same bytes)",
                           "case": f"{fmt_size(size)} {dtype}", "value": f"{v:.2f}x mergekit's time", "met": v <= 1.0})
    # flatness: same method and dtype across sizes
    for dtype in sorted({d for _, d in by_ckpt}):
        for m, key, what in [(m, k, w) for m in SURGERY_METHODS for k, w in (("maxrss", "peak RSS"), ("peak_anon", "peak anonymous RSS"))]:
            pts = sorted((s, ms[m][key]) for (s, d), ms in by_ckpt.items() if d == dtype and m in ms and ms[m]["rc"] == 0)
            if len(pts) >= 2:
                lo, hi = min(p[1] for p in pts), max(p[1] for p in pts)
                checks.append({"target": f"{what} flat as the model grows (max/min <= 1.25)",
                               "case": f"{dtype} {m} {fmt_size(pts[0][0])}..{fmt_size(pts[-1][0])}",
                               "value": " -> ".join(f"{v / MiB:.0f}" for _, v in pts) + f" MiB ({hi / lo:.2f}x)",
                               "met": hi / lo <= 1.25})
    return rows, checks


def headline(results: list[dict]) -> list[str]:
    """The ratios worth quoting: at the largest size of each dtype, and memory across sizes."""
    out = []
    for dtype in sorted({r["dtype"] for r in results}):
        rs = [r for r in results if r["dtype"] == dtype and r["rc"] == 0]
        if not rs:
            continue
        top = max(r["size"] for r in rs)
        at = {r["method"]: r for r in rs if r["size"] == top}
        parts = []
        for m in SURGERY_METHODS:
            if m in at and at[m].get("vs_cp_per_byte") is not None:
                parts.append(f"{m} {at[m]['vs_cp_per_byte']:.2f}x")
        if parts:
            out.append(f"- {fmt_size(top)} {dtype}, time over cp's for the same bytes: " + ", ".join(parts))
        if "copy" in at and "mergekit" in at:
            v = ((at["copy"]["read_bytes"] + at["copy"]["written_bytes"]) / at["copy"]["total"])
            w = ((at["mergekit"]["read_bytes"] + at["mergekit"]["written_bytes"]) / at["mergekit"]["total"])
            out.append(f"- {fmt_size(top)} {dtype}, surgery copy vs mergekit passthrough: {w / v:.2f}x mergekit's time")
        if "grow_heads" in at and at["grow_heads"].get("naive_over_this"):
            out.append(f"- {fmt_size(top)} {dtype}, naive peak RSS over grow_heads' peak RSS: {at['grow_heads']['naive_over_this']:.1f}x "
                       f"({at['naive']['maxrss'] / GiB:.1f} GiB vs {at['grow_heads']['maxrss'] / GiB:.2f} GiB)")
        for m in SURGERY_METHODS:
            pts = sorted((r["size"], r["maxrss"]) for r in rs if r["method"] == m)
            if len(pts) >= 2:
                out.append(f"- {dtype} {m} peak RSS from {fmt_size(pts[0][0])} to {fmt_size(pts[-1][0])}: "
                           + " -> ".join(f"{v / MiB:.0f}" for _, v in pts) + " MiB")
    return out


def scaling(results: list[dict], project_to: float = 140e9) -> list[str]:
    """Each method's time as a start-up cost plus a streaming rate: a least-squares line through its
    runs at every size (time over bytes read + written). The rate is what a large checkpoint pays;
    the start-up is what dominates the small sizes."""
    lines = []
    for dtype in sorted({r["dtype"] for r in results}):
        fits = {}
        for m in METHODS:
            pts = [(r["read_bytes"] + r["written_bytes"], r["total"], r["size"]) for r in results
                   if r["dtype"] == dtype and r["method"] == m and r["rc"] == 0]
            if len({p[2] for p in pts}) < 2:
                continue
            slope, start_up = statistics.linear_regression([p[0] for p in pts], [p[1] for p in pts])
            moved, _, size = max(pts, key=lambda p: p[2])
            fits[m] = (start_up, slope, moved / size)
        if "cp" not in fits:
            continue
        cp_slope = fits["cp"][1]
        for m, (fixed, slope, moved) in fits.items():
            at = project_to * moved
            lines.append(f"| {dtype} | {LABELS[m]} | {fixed:.2f} | {slope * 1e9:.3f} | {f2(ratio(slope, cp_slope))} | "
                         f"{(fixed + slope * at) / 60:.1f} | {cp_slope * at / 60:.1f} |")
    if not lines:
        return []
    return ["## Start-up and streaming rate", "",
            "A line through each method's runs at every size: time = start-up + bytes moved (read + written) x seconds per GB. "
            "`rate / cp's` compares the slopes (what a large checkpoint pays per byte); the last columns project both lines to "
            f"a {project_to / 1e9:.0f} GB checkpoint (bytes moved scaled as at the largest size measured).", "",
            f"| dtype | method | start-up (s) | s per GB moved | rate / cp's | {project_to / 1e9:.0f} GB (min) | cp, same bytes (min) |",
            "|---|---|---|---|---|---|---|", *lines, ""]


HEADER = ("| checkpoint | method | wall + sync (s) | read+written (GB) | MB/s | time / cp | time / cp, same bytes "
          "| peak RSS (MiB) | peak anon RSS (MiB) | naive peak / this | CPU s (user+sys) | CPU | load |")
SEP = "|" + "---|" * 13


def render(results: list[dict], info: dict, args, notes: list[str], kept: str) -> str:
    rows, checks = analyse(results)
    met = sum(c["met"] for c in checks)
    lines = [
        "# Benchmarks", "",
        f"Written by `python benchmarks/run.py {' '.join(args.argv)}` on {info['date']} (how to run: `benchmarks/README.md`).", "",
        "## Machine", "",
        f"- {info['cpus']} cores ({info['cpu']}), {info['ram_gib']:.1f} GiB RAM, kernel {info['kernel']}",
        f"- disk of the work dir: {info['disk']}",
        f"- Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, safetensors {info['safetensors']}, "
        f"surgery {info['surgery']}, blake3 {info.get('blake3', 'absent')}, mergekit {info.get('mergekit', 'absent')}",
        f"- code measured: {info['code']}" + ("" if info.get("code_end", info["code"]) == info["code"]
                                               else f" at the start, {info['code_end']} at the end"),
        f"- load average (1 min) at start {info['load_start']:.2f}, at end {info['load_end']:.2f}; "
        "the `load` column is the 1-minute load average when each measurement started: it includes the benchmark's own previous "
        "run (about 1 to 1.5), so values well above 1.5 mean other work shared the 2 cores",
        "",
        "## Checkpoints", "",
        f"Synthetic Llama (hidden {args.hidden}, {args.hidden // 64} heads / {max(1, args.hidden // 256)} kv heads, head_dim 64, "
        f"MLP {4 * args.hidden}, vocab {args.vocab}, untied), random weights, safetensors in {fmt_size(args.shard_size)} shards, "
        "config.json, no tokenizer. Sizes grow by depth, so the largest tensor (embedding / lm_head) is the same at every size.", "",
        "| checkpoint | layers | tensors' bytes | largest tensor |", "|---|---|---|---|",
    ]
    for c in info["checkpoints"]:
        lines.append(f"| {c['size']} {c['dtype']} | {c['layers']} | {c['bytes'] / 1e9:.2f} GB | {c['largest'] / MiB:.0f} MiB |")
    lines += [
        "", "## Results", "",
        "Every run is a fresh process under `/usr/bin/time -v`; surgery runs use `--no-verify`. "
        + ("Cold cache: the source's pages are evicted before each run (`posix_fadvise(DONTNEED)`; `drop_caches` needs root). "
           if args.cold else
           "Warm cache: the source is read once before each run (`drop_caches` needs root), so every method starts alike. ")
        + "Pending writes are flushed before each run, and the `sync -f` after it is timed and counted, because `cp` leaves its "
        "output in the page cache while surgery fsyncs every shard. "
        "`time / cp, same bytes` is cp's MB/s over this run's MB/s (read + written bytes): the target's measure, since a growth "
        "writes more bytes than it reads. `peak RSS` is the kernel's maximum RSS (it counts file pages mapped by mmap); "
        "`peak anon RSS` is the polled peak of anonymous memory alone (50 ms sampling). "
        f"cp is run {args.cp_repeat} times and its median kept (its time varies with the page cache's state); "
        "every other row is one run.", "",
        HEADER, SEP, *rows, "",
        *scaling(results),
        "## Headline", "", *headline(results), "",
        f"## Targets ({met} of {len(checks)} checks met)", "",
        "| target | case | measured | met |", "|---|---|---|---|",
    ]
    for c in checks:
        lines.append(f"| {c['target']} | {c['case']} | {c['value']} | {'yes' if c['met'] else '**no**'} |")
    if notes:
        lines += ["", "## Notes from this run", ""] + [f"- {n}" for n in notes]
    lines += ["", ANALYSIS_MARK, kept.rstrip(), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description="surgery vs cp, naive transformers and mergekit on synthetic checkpoints")
    ap.add_argument("--sizes", default="0.5GB,1GB,2GB,4GB", help="checkpoint sizes (tensor bytes), comma-separated")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated: float32, bfloat16, float16")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--workdir", default="/tmp/surgery-bench", help="scratch directory for checkpoints and outputs")
    ap.add_argument("--shard-size", default="1GB", help="shard size of the checkpoints and of every output")
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size of the synthetic Llama (a multiple of 256)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--naive-max", default="4GB", help="skip the naive way above this size (it holds both models in RAM)")
    ap.add_argument("--clone-max", default="4GB", help="skip clone_width above this size (it writes ~4x the source)")
    ap.add_argument("--cp-repeat", type=int, default=3, help="run cp this many times and keep the median (default 3)")
    ap.add_argument("--mergekit", help="path to mergekit-yaml (default: on PATH, else ../bench-venv/bin/mergekit-yaml)")
    ap.add_argument("--results", help="markdown file to write (default benchmarks/RESULTS.md; WORKDIR/RESULTS-quick.md with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 0.25GB checkpoints only")
    ap.add_argument("--cold", action="store_true",
                    help="evict the source from the page cache before each run (posix_fadvise) instead of reading it once")
    ap.add_argument("--clean", action="store_true", help="delete the synthetic checkpoints at the end (they are cached otherwise)")
    args = ap.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.sizes = "0.25GB"
    args.shard_size = parse_size(args.shard_size)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS] + [d for d in dtypes if d not in ITEMSIZE]
    if bad:
        ap.error(f"unknown: {', '.join(bad)}")
    if args.hidden % 256:
        ap.error("--hidden must be a multiple of 256")
    naive_max, clone_max = parse_size(args.naive_max), parse_size(args.clone_max)
    work = Path(args.workdir).expanduser().absolute()
    work.mkdir(parents=True, exist_ok=True)
    results_path = Path(args.results) if args.results else (work / "RESULTS-quick.md" if args.quick else HERE / "RESULTS.md")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    mergekit = find_mergekit(args.mergekit) if "mergekit" in methods else None
    notes: list[str] = []
    info = machine()
    info["disk"] = disk_line(work)
    info["load_start"] = os.getloadavg()[0]
    if "mergekit" in methods:
        if mergekit is None:
            notes.append("mergekit-yaml not found (see benchmarks/README.md to install it in a separate venv): its rows are missing")
        else:
            mk_py = Path(mergekit).parent / "python"
            v = subprocess.run([str(mk_py), "-c", "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
                               capture_output=True, text=True).stdout.split()
            info["mergekit"] = f"{v[0]} (torch {v[1]}, {mergekit})" if len(v) == 2 else mergekit
    print(f"load average {os.getloadavg()}; workdir {work} ({info['disk']})", flush=True)

    shape = Shape(args.hidden, args.vocab)
    results, info["checkpoints"] = [], []
    t_start = time.perf_counter()
    for dtype in dtypes:
        for size in sizes:
            src = work / f"llama-{fmt_size(size)}-{dtype}"
            t0 = time.perf_counter()
            desc = build_checkpoint(src, shape, size, dtype, args.shard_size)
            nbytes = dir_bytes(src, weights_only=True)
            info["checkpoints"].append({"size": fmt_size(size), "dtype": dtype, "layers": desc["layers"], "bytes": nbytes,
                                        "largest": largest_tensor(src)})
            print(f"== {src.name}: {desc['layers']} layers, {nbytes / 1e9:.2f} GB (ready in {time.perf_counter() - t0:.0f} s)", flush=True)
            logdir = work / "logs" / src.name
            logdir.mkdir(parents=True, exist_ok=True)
            for m in methods:
                if (m == "naive" and size > naive_max) or (m == "clone_width" and size > clone_max):
                    continue
                out = work / "out" / f"{src.name}-{m}"
                shutil.rmtree(out, ignore_errors=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                cmd = command_for(m, src, out, desc, logdir, args, mergekit)
                if cmd is None:
                    continue
                rec = measure(m, cmd, src, out, logdir, env, cold=args.cold)
                if m == "cp" and args.cp_repeat > 1:  # the floor is cheap to measure and noisy: keep the median run
                    runs = [rec] + [measure(m, cmd, src, out, logdir, env, cold=args.cold) for _ in range(args.cp_repeat - 1)]
                    rec = sorted(runs, key=lambda r: r["total"])[len(runs) // 2]
                    rec["all_totals"] = [round(r["total"], 2) for r in runs]
                rec.update(method=m, size=size, dtype=dtype)
                results.append(rec)
                status = "ok" if rec["rc"] == 0 else f"FAILED rc={rec['rc']} (log {logdir / (m + '.log')})"
                if "all_totals" in rec:
                    status += f" (median of {rec['all_totals']} s)"
                print(f"   {LABELS[m]:<42} {rec['wall']:7.1f} s + sync {rec['sync']:5.1f} s  peak RSS {rec['maxrss'] / MiB:7.0f} MiB"
                      f"  anon {rec['peak_anon'] / MiB:7.0f} MiB  load {rec['load1']:.1f}  {status}", flush=True)
                if rec["rc"] != 0:
                    notes.append(f"{src.name} {m} failed (rc {rec['rc']}): " + rec["error"].strip().splitlines()[-1][:300])
            if args.clean:
                shutil.rmtree(src, ignore_errors=True)
    info["load_end"] = os.getloadavg()[0]
    info["code_end"] = code_version()
    if info["code_end"] != info["code"]:
        notes.append(f"the code changed during the run: {info['code']} at the start, {info['code_end']} at the end; "
                     "rows measured before and after the change are not comparable")
    notes.append(f"whole benchmark: {time.perf_counter() - t_start:.0f} s of wall time")
    (work / "results.json").write_text(json.dumps({"machine": info, "results": results}, indent=2, default=str))
    kept = ""
    if results_path.is_file() and ANALYSIS_MARK in results_path.read_text():
        kept = results_path.read_text().split(ANALYSIS_MARK, 1)[1]
    text = render(results, info, args, notes, kept)
    results_path.write_text(text)
    rows, checks = analyse(results)
    print("\n" + HEADER + "\n" + SEP + "\n" + "\n".join(rows))
    print(f"\n{sum(c['met'] for c in checks)} of {len(checks)} target checks met; wrote {results_path}")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
