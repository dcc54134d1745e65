"""Benchmark surgery against `cp -r`, the naive transformers way, and mergekit, on synthetic checkpoints.

    python benchmarks/run.py                      # the default matrix, writes benchmarks/RESULTS.md
    python benchmarks/run.py --quick              # 0.25 GB smoke test, writes WORKDIR/RESULTS-quick.md
    python benchmarks/run.py --sizes 1GB --dtypes bfloat16 --methods cp,copy,grow_heads
    python benchmarks/run.py --llama8b [--layers 6]  # one Llama-3-8B-shaped checkpoint, issue 27's targets

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

With --shape, one checkpoint of a published model's shape (depth from --layers) takes every method
plus one streamed forward pass (the unit) and verified runs at 256 and 2048 tokens, and its
targets (SHAPE_TARGETS) are checked in a section of the results file of its own.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
import zlib
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

# --shape: one checkpoint of a published model's shape; forwardN / verifyN take any token count N.
UNVERIFIED = ["copy", "grow_mlp", "grow_heads", "clone_width"]
# floor_M (benchmarks/floor.py): M's bytes moved and hashed as surgery hashes them, nothing else; run after M
FLOOR = "floor_"
SHAPE_METHODS = ["cp"] + [x for m in UNVERIFIED for x in (m, FLOOR + m)] + ["forward256", "verify256", "forward2048", "verify2048"]
PROBE = re.compile(r"^(forward|verify)(\d+)$")
# Issue 27's targets on the Llama-3-8B-shaped checkpoint, (method, measure, at most). Measures:
# vs_cp_per_byte, time over cp + sync's for the same bytes; maxrss, the kernel's peak RSS in bytes;
# vs_forward, time over one streamed forward pass of the source at the same token count.
SHAPE_TARGETS = [
    ("copy", "vs_cp_per_byte", 1.3),
    ("grow_mlp", "vs_cp_per_byte", 2.0),
    ("grow_heads", "vs_cp_per_byte", 2.0),
    ("clone_width", "vs_cp_per_byte", 3.0),
    *[(m, "maxrss", 1.5e9) for m in UNVERIFIED],
    ("verify256", "vs_forward", 6.0),
    ("verify2048", "vs_forward", 6.0),
]
MEASURES = {
    "vs_cp_per_byte": ("time / (cp + sync), same bytes", lambda v: f"{v:.2f}x"),
    "maxrss": ("peak RSS", lambda v: f"{v / 1e9:.2f} GB"),
    "vs_forward": ("time / one forward pass, same tokens", lambda v: f"{v:.2f}x"),
}


def label(method: str) -> str:
    if method.startswith(FLOOR):
        return f"floor under {method.removeprefix(FLOOR)} (floor.py)"
    m = PROBE.match(method)
    if m is None:
        return LABELS[method]
    if m[1] == "forward":
        return f"one streamed forward, {m[2]} tokens (the unit)"
    return f"surgery grow_mlp x1.25, verified, {m[2]} tokens"


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

    def __init__(self, hidden: int, vocab: int, heads: int | None = None, kv_heads: int | None = None, head_dim: int = 64,
                 inter: int | None = None, rope_theta: float = 10000.0, max_positions: int = 2048):
        self.hidden = hidden
        self.head_dim = head_dim
        self.heads = heads or hidden // head_dim
        self.kv_heads = kv_heads or max(1, self.heads // 4)
        self.inter = inter or 4 * hidden
        self.vocab = vocab
        self.rope_theta, self.max_positions = rope_theta, max_positions

    def scaled(self, factor: int) -> "Shape":
        """The same proportions, every width divided by `factor` (head_dim kept): a quick stand-in."""
        if factor == 1:
            return self
        heads = max(1, self.heads // factor)
        return Shape(heads * self.head_dim, self.vocab // factor, heads, max(1, self.kv_heads // factor), self.head_dim,
                     self.inter // factor, self.rope_theta, self.max_positions)

    def describe(self) -> str:
        return (f"hidden {self.hidden}, {self.heads} heads / {self.kv_heads} kv heads, head_dim {self.head_dim}, "
                f"MLP {self.inter}, vocab {self.vocab}, rope_theta {self.rope_theta:g}, untied")

    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * q * h + 2 * kv * h + 3 * h * self.inter + 2 * h

    def fixed_params(self) -> int:
        return 2 * self.vocab * self.hidden + self.hidden

    def layers_for(self, nbytes: int, dtype: str) -> int:
        params = nbytes // ITEMSIZE[dtype]
        return max(1, round((params - self.fixed_params()) / self.layer_params()))

    def tensors(self, layers: int):
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        yield "model.embed_tokens.weight", (self.vocab, h)
        for i in range(layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", (h,)
            yield p + "self_attn.q_proj.weight", (q, h)
            yield p + "self_attn.k_proj.weight", (kv, h)
            yield p + "self_attn.v_proj.weight", (kv, h)
            yield p + "self_attn.o_proj.weight", (h, q)
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
            "max_position_embeddings": self.max_positions, "rms_norm_eps": 1e-5, "rope_theta": self.rope_theta,
            "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2, "dtype": dtype,
        }

    def key(self) -> dict:
        return {"hidden": self.hidden, "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "inter": self.inter, "vocab": self.vocab, "rope_theta": self.rope_theta}


# Published shapes (--shape); the checkpoint's depth comes from --layers.
SHAPES = {
    "llama3-8b": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, inter=14336, vocab=128256, rope_theta=500000.0,
                      max_positions=8192),
}

ST_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
GEN_CHUNK = 16 * MiB  # elements drawn at a time: 64 MiB of float32 however large the tensor


def tensor_bytes(shape: tuple[int, ...], dtype: str) -> int:
    n = ITEMSIZE[dtype]
    for s in shape:
        n *= s
    return n


def write_streamed(path: Path, specs: list[tuple[str, tuple[int, ...]]], dtype: str) -> None:
    """One safetensors file written tensor by tensor, each drawn in row blocks: memory stays one block,
    however large the file. Weights ~ N(0, 0.02) from a generator seeded by the tensor's name (the first
    layers of a deeper checkpoint are the same tensors); 1-d tensors (norms) are ones."""
    import torch

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shp in specs:
        n = tensor_bytes(shp, dtype)
        header[name] = {"dtype": ST_DTYPE[dtype], "shape": list(shp), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tdtype = getattr(torch, dtype)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)))
        fh.write(head)
        for name, shp in specs:
            if len(shp) == 1:
                fh.write(torch.ones(shp, dtype=tdtype).view(torch.uint8).numpy().tobytes())
                continue
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            rows = max(1, GEN_CHUNK // shp[1])
            for start in range(0, shp[0], rows):
                block = torch.empty((min(rows, shp[0] - start), shp[1]), dtype=torch.float32).normal_(0, 0.02, generator=g)
                fh.write(block.to(tdtype).view(torch.uint8).numpy().data)
                del block


def build_checkpoint(path: Path, shape: Shape, layers: int, dtype: str, shard_size: int) -> dict:
    """Random weights (std 0.02, norms 1), sharded like save_pretrained, written tensor by tensor;
    cached by its description."""
    desc = {**shape.key(), "layers": layers, "dtype": dtype, "shard_size": shard_size, "writer": "streamed"}
    marker = path / "bench.json"
    if marker.is_file() and json.loads(marker.read_text()) == desc:
        return desc
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    shards, cur, used = [], [], 0
    for name, shp in shape.tensors(layers):
        n = tensor_bytes(shp, dtype)
        if cur and used + n > shard_size:
            shards.append(cur)
            cur, used = [], 0
        cur.append((name, shp))
        used += n
    shards.append(cur)
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for shard, fname in zip(shards, names):
        write_streamed(path / fname, shard, dtype)
        for name, shp in shard:
            weight_map[name] = fname
            total += tensor_bytes(shp, dtype)
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


def poll_tree(proc: subprocess.Popen, interval: float = 0.05, deadline: float | None = None) -> dict[str, int]:
    """Peak of the process tree's summed RSS (total, anonymous, file-backed) until it exits; past
    `deadline` (perf_counter) its process group is killed."""
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        if deadline is not None and time.perf_counter() > deadline:
            os.killpg(proc.pid, 9)
            break
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


def busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat; steal counts: another guest took them)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def others_share(rec: dict, cpus: int) -> float:
    """The share of the machine's cores that work other than the measured run (and this script's polling) used
    while it ran: the benchmark's own runs start several threads, so the load average cannot tell."""
    others = rec.get("busy", math.nan) - rec.get("user", 0) - rec.get("sys", 0)
    return max(0.0, others) / (rec["wall"] * cpus) if rec.get("wall") and not math.isnan(others) else 0.0


def measure(label: str, cmd: list[str], source: Path, output: Path, logdir: Path, env: dict, cold: bool = False,
            timeout: float | None = None) -> dict:
    subprocess.run(["sync"], check=False)
    evict(source) if cold else warm(source)
    subprocess.run(["sync"], check=False)
    load = os.getloadavg()
    time_bin = shutil.which("time", path="/usr/bin:/bin")
    tfile = logdir / f"{label}.time"
    full = ([time_bin, "-v", "-o", str(tfile)] if time_bin else []) + cmd
    log = logdir / f"{label}.log"
    t0, b0 = time.perf_counter(), busy_seconds()
    with open(log, "w") as lf:
        proc = subprocess.Popen(full, stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=str(logdir), start_new_session=True)
        peaks = poll_tree(proc, deadline=None if timeout is None else t0 + timeout)
        rc = proc.wait()
    t1, b1 = time.perf_counter(), busy_seconds()
    if output.exists():
        subprocess.run(["sync", "-f", str(output)], check=False)
    t2 = time.perf_counter()
    rec = {"label": label, "cmd": cmd, "rc": rc, "timed_out": timeout is not None and t1 - t0 > timeout, "wall": t1 - t0, "sync": t2 - t1, "load1": load[0],
           "busy": b1 - b0,
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

def surgery_recipe(path: Path, name: str, source: Path, output: Path, ops: list[dict], shard_size: int,
                   verify: dict | None = None) -> Path:
    import yaml

    doc = {"name": f"bench-{name}", "source": str(source), "device": "cpu", "seed": 0,
           "output": {"path": str(output), "shard_size": str(shard_size)}, "ops": ops}
    if verify:
        doc["verify"] = verify
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


def command_for(method: str, source: Path, output: Path, desc: dict, work: Path, args, mergekit: str | None,
                written: dict[str, int] | None = None) -> list[str] | None:
    """The command line measuring `method`; None where it cannot run (no mergekit, a floor whose method did not run).
    `written`: output bytes of the methods measured so far, for the floors of growths."""
    if method.startswith(FLOOR):
        of = method.removeprefix(FLOOR)
        if of == "copy":
            return [sys.executable, str(HERE / "floor.py"), "copy", str(source), str(output)]
        n = (written or {}).get(of)
        return [sys.executable, str(HERE / "floor.py"), "write", str(source), str(output), "--bytes", str(n)] if n else None
    if method == "cp":
        return ["cp", "-r", str(source), str(output)]
    if method in OPS:
        recipe = surgery_recipe(work / f"{method}.yaml", method, source, output, OPS[method], args.shard_size)
        return [sys.executable, "-m", "surgery", "run", str(recipe), "--no-verify"]
    probe = PROBE.match(method)
    if probe and probe[1] == "forward":
        return [sys.executable, str(HERE / "probes.py"), "forward", str(source), "--tokens", probe[2], "--seed", "0"]
    if probe:  # verification runs on the main thread: cProfile sees where its time goes
        recipe = surgery_recipe(work / f"{method}.yaml", method, source, output, OPS["grow_mlp"], args.shard_size,
                                verify={"data": "random", "max_tokens": int(probe[2])})
        return [sys.executable, str(HERE / "probes.py"), "profile", str(work / f"{method}.prof"), "--", "run", str(recipe)]
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


# ----------------------------------------------------------------------------- one published shape (--shape)

PHASE = re.compile(r"^(?P<desc>.+?)(?:: (?P<summary>(?:loss |\d).*?))? \((?P<sec>\d+(?:\.\d+)?) s\)$")


def parse_phases(text: str) -> list[dict]:
    """The summary line `surgery run` prints per phase (`runtime.progress.Progress`): what ran, and its seconds."""
    out = []
    for line in text.splitlines():
        m = PHASE.match(line.strip())
        if m:
            out.append({"phase": m["desc"], "summary": m["summary"] or "", "seconds": float(m["sec"])})
    return out


def parse_probe(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith('{"probe"'):
            return json.loads(line)
    return None


def profile_summary(path: Path, top: int = 18) -> dict:
    """The main thread's profile: surgery's functions by cumulative time, every function by own time."""
    import pstats

    st = pstats.Stats(str(path))
    rows = []
    for (file, line, fn), (_, ncalls, tottime, cumtime, _) in st.stats.items():
        where = file.split("/surgery/", 1)[1] if "/surgery/" in file else Path(file).name if file != "~" else ""
        rows.append({"function": f"{where}:{fn}" if where else fn, "surgery": "/surgery/" in file, "calls": ncalls,
                     "own_s": tottime, "cum_s": cumtime})
    ours = sorted((r for r in rows if r["surgery"]), key=lambda r: -r["cum_s"])[:top]
    own = sorted(rows, key=lambda r: -r["own_s"])[:top // 2]
    named = {r["function"]: r for r in rows if r["function"] in OUTSIDE_PHASES}
    return {"total_s": st.total_tt, "surgery": ours, "own": own, "named": named}


# Parts of a verified run that print no phase line, timed from its profile instead (disjoint from the phases).
OUTSIDE_PHASES = {
    "api.py:plan": "planning: config, the lazy graph",
    "api.py:prepare_verification": "preparing verification: the ids, both models' skeletons",
    "runtime/evaluation.py:compare": "comparing outside a pass: both models' logits recomputed from their hidden states, block by block, in float64",
}


def annotate(results: list[dict]) -> None:
    """Ratios each shape target reads: against cp + sync for the same bytes, against one forward pass."""
    by = {r["method"]: r for r in results}
    cp = by.get("cp")
    cp_rate = (cp["read_bytes"] + cp["written_bytes"]) / cp["total"] if cp and cp["rc"] == 0 else None
    for r in results:
        ok = r["rc"] == 0
        rate = (r["read_bytes"] + r["written_bytes"]) / r["total"] if ok else None
        r["vs_cp_per_byte"] = ratio(cp_rate, rate) if ok and r["written_bytes"] and r["method"] != "cp" else None
        m = PROBE.match(r["method"])
        fwd = by.get(f"forward{m[2]}") if m and m[1] == "verify" else None
        r["vs_forward"] = ratio(r["total"], fwd["total"]) if fwd and fwd["rc"] == 0 and not r.get("timed_out") else None


def shape_checks(results: list[dict]) -> list[dict]:
    by = {r["method"]: r for r in results}
    checks = []
    for method, measure_, limit in SHAPE_TARGETS:
        what, fmt = MEASURES[measure_]
        r = by.get(method)
        value = None if r is None or r["rc"] != 0 else r.get(measure_)
        floor = by.get(FLOOR + method) if measure_ == "vs_cp_per_byte" else None
        under = floor.get(measure_) if floor and floor["rc"] == 0 else None
        checks.append({"method": method, "target": f"{what} <= {fmt(limit)}", "value": value,
                       "shown": "not measured" if r is None else ("failed" if value is None else fmt(value)),
                       "met": value is not None and value <= limit, "floor": under,
                       "floor_shown": fmt(under) if under is not None else "",
                       "reachable": under is None or under <= limit})
    return checks


SHAPE_BEGIN = "<!-- {name}: begin (run.py --shape rewrites the text between these markers) -->"
SHAPE_END = "<!-- {name}: end -->"


def insert_section(path: Path, name: str, text: str) -> None:
    """Put a shape's section into a results file: in place of its previous one, else first below the
    analysis marker (kept when the matrix rewrites the file), else at the end."""
    begin, end = SHAPE_BEGIN.format(name=name), SHAPE_END.format(name=name)
    block = f"{begin}\n{text.rstrip()}\n{end}"
    old = path.read_text() if path.is_file() else ""
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    elif ANALYSIS_MARK in old:
        head, tail = old.split(ANALYSIS_MARK, 1)
        new = f"{head}{ANALYSIS_MARK}\n\n{block}\n{tail}"
    else:
        new = (old.rstrip() + "\n\n" if old else "") + block + "\n"
    path.write_text(new)


def render_shape(results: list[dict], info: dict, args, ckpt: dict, notes: list[str]) -> str:
    annotate(results)
    checks = shape_checks(results)
    shared = max([others_share(r, info["cpus"]) for r in results], default=0.0)
    title = SHAPES_TITLE.get(args.shape, args.shape)
    lines = [
        f"## {title}-shaped checkpoint, {ckpt['layers']} layers ({info['date']})", "",
        f"Written by `python benchmarks/run.py {' '.join(args.argv)}`; {info['code']}"
        + ("" if info.get("code_end", info["code"]) == info["code"] else f" at the start, {info['code_end']} at the end") + ". "
        f"{info['cpus']} cores ({info['cpu']}), {info['ram_gib']:.1f} GiB RAM; work dir {info['disk']}; torch {info['torch']}, "
        f"transformers {info['transformers']}.", "",
        f"Load: `uptime` at the start `{info['uptime_start']}`, at the end `{info['uptime_end']}`; the `load` column is the "
        "1-minute load when each run started (the benchmark's own previous run counts 1 to 3: surgery's runs keep several "
        f"threads busy). Other work's CPU while a run ran (the machine's busy time less the run's own): at most "
        f"{100 * shared:.0f} % of the cores.",
    ]
    if shared > 0.25:
        lines += ["", f"**Preliminary**: the machine was shared with other work (up to {100 * shared:.0f} % of its "
                  f"{info['cpus']} cores during a run): times, and cp's floor with them, are noisy; peaks of memory are not affected."]
    lines += [
        "", f"Checkpoint: {ckpt['layers']} layers of {title}'s shape ({ckpt['shape']}), {ckpt['dtype']}, random weights "
        f"(N(0, 0.02), norms 1, seeded per tensor name, written tensor by tensor), {ckpt['bytes'] / 1e9:.2f} GB of tensors "
        f"in {ckpt['shards']} safetensors shards of at most {fmt_size(args.shard_size)}, largest tensor {ckpt['largest'] / MiB:.0f} MiB "
        "(embedding and lm_head), config.json, no tokenizer.", "",
        "Every run is a fresh process under `/usr/bin/time -v`, started with the source warm in the page cache and pending "
        "writes flushed; `sync -f` after it is timed and counted. Surgery's unverified runs use `--no-verify`. "
        "`forwardN` is one streamed forward pass of the source through surgery's runner (`runtime.evaluation.evaluate`, float32, "
        "one layer at a time, logits in vocabulary blocks) on the N seeded random ids that `verify.data: random` gives, "
        "start-up included, as a run includes its own: the unit a verified run is counted in. `verifyN` is `surgery run` "
        "of grow_mlp x1.25 verified on those N tokens (`verify.data: random`, `max_tokens: N`), under cProfile, with an empty "
        "verification cache (`SURGERY_CACHE`): a first run, its source's passes not cached.", "",
        "| method | wall + sync (s) | read+written (GB) | MB/s | time / (cp + sync), same bytes | time / forward, same tokens "
        "| peak RSS (MiB) | peak anon RSS (MiB) | CPU s (user+sys) | CPU | load | exit |",
        "|" + "---|" * 12,
    ]
    for r in results:
        moved = r["read_bytes"] + r["written_bytes"]
        ok = r["rc"] == 0
        rate = moved / r["total"] if ok and r["written_bytes"] else None
        lines.append("| " + " | ".join([
            label(r["method"]) + (f" ({r['all_totals']} s)" if "all_totals" in r else ""),
            f"{r['wall']:.1f} + {r['sync']:.1f}", f"{moved / 1e9:.2f}" if r["written_bytes"] else f"{r['read_bytes'] / 1e9:.2f} read",
            f2(rate and rate / 1e6, "{:.0f}"), f2(r.get("vs_cp_per_byte")), f2(r.get("vs_forward")),
            f"{r['maxrss'] / MiB:.0f}", f"{r['peak_anon'] / MiB:.0f}", f"{r.get('user', 0) + r.get('sys', 0):.1f}",
            f"{r.get('cpu_pct', 0):.0f}%", f"{r['load1']:.1f}",
            "timed out" if r.get("timed_out") else str(r["rc"]),
        ]) + " |")
    met = sum(c["met"] for c in checks)
    lines += ["", f"### Targets ({met} of {len(checks)} met)", "",
              "Targets live in `SHAPE_TARGETS` (benchmarks/run.py). Peak RSS is the kernel's maximum resident set "
              "(it counts mmapped file pages); 1.5 GB is 1.5e9 bytes.", "",
              "The floor is `floor_M`'s measure (benchmarks/floor.py), a lower bound on M's I/O and hashing: every source "
              "byte moved by the kernel and read back for its two digests, the bytes M adds written from memory and hashed "
              "twice, fsync, and nothing else, not even torch's start-up. A target below its floor cannot be met on this "
              "machine while the digests are kept.", "",
              "| method | target | measured | floor | |", "|---|---|---|---|---|"]
    for c in checks:
        verdict = "PASS" if c["met"] else "**MISS**" + ("" if c["reachable"] else " (below the floor: not reachable here)")
        lines.append(f"| {c['method']} | {c['target']} | {c['shown']} | {c['floor_shown']} | {verdict} |")
    lines += verification_breakdown(results)
    if notes:
        lines += ["", "### Notes from this run", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


SHAPES_TITLE = {"llama3-8b": "Llama-3-8B"}
DEFAULT_LAYERS = 6  # --shape's depth unless --layers says otherwise


def verification_breakdown(results: list[dict]) -> list[str]:
    """Per verified run: its phases (each a pass over the layers, or the write) in seconds and in forward units,
    and the profile's heaviest functions."""
    by = {r["method"]: r for r in results}
    out = []
    for r in results:
        m = PROBE.match(r["method"])
        if not m or m[1] != "verify":
            continue
        fwd = by.get(f"forward{m[2]}")
        unit = (fwd.get("probe") or {}).get("evaluate_s") if fwd and fwd["rc"] == 0 else None
        out += ["", f"### Where {r['method']}'s time goes", ""]
        if unit:
            p = fwd["probe"]
            out.append(f"The unit, `forward{m[2]}`: {fwd['total']:.1f} s in all, of which start-up (imports, a first skeleton) "
                       f"{p['imports_s']:.1f} s and "
                       f"`runtime.evaluation.evaluate` {p['evaluate_s']:.1f} s (model skeleton {p['build_s']:.1f} s, embedding + layers "
                       f"{p['layers_s']:.1f} s, lm_head in vocabulary blocks + loss {p['head_s']:.1f} s; reading and converting "
                       f"the {p['loads']} tensors {p['load_s']:.1f} s of these); {p['threads']} torch threads. "
                       "`units` below are a phase's seconds over that `runtime.evaluation.evaluate` time.")
            out.append("")
        out += ["| phase (`surgery run`'s summary lines, and the profile) | seconds | share of the run | units | summary |", "|---|---|---|---|---|"]
        prof = r.get("profile")
        parts = [("write (the transform, streamed)" if ph["phase"].startswith("wrote ") else ph["phase"], ph["seconds"],
                  ph["summary"]) for ph in r.get("phases", [])]
        for fn, what in OUTSIDE_PHASES.items():
            row = (prof or {}).get("named", {}).get(fn)
            if row:
                parts.append((f"{what} (`{fn}`, cProfile)", row["cum_s"], f"{row['calls']} call(s)"))
        listed = 0.0
        for what, sec, summary in parts:
            listed += sec
            out.append(f"| {what} | {sec:.1f} | {100 * sec / r['total']:.0f}% | {f2(unit and sec / unit)} | {summary} |")
        out.append(f"| rest (start-up, imports, report, exit, sync) | {r['total'] - listed:.1f} | "
                   f"{100 * (r['total'] - listed) / r['total']:.0f}% | | |")
        if prof:
            out += ["", f"cProfile of the main thread ({prof['total_s']:.0f} s; the writer's worker threads show as waits): "
                        "surgery's functions by cumulative time, then the heaviest functions by their own time.", "",
                    "| function | calls | own s | cumulative s |", "|---|---|---|---|"]
            for row in prof["surgery"] + [{"function": "**by own time:**", "calls": "", "own_s": None, "cum_s": None}] + prof["own"]:
                out.append(f"| `{row['function']}` | {row['calls']} | {f2(row['own_s'], '{:.1f}')} | {f2(row['cum_s'], '{:.1f}')} |"
                           if row["own_s"] is not None else f"| {row['function']} | | | |")
    return out


# ----------------------------------------------------------------------------- main

def run_methods(src: Path, desc: dict, size: int, methods: list[str], args, env: dict, mergekit: str | None,
                notes: list[str], skip=lambda m: False) -> list[dict]:
    """Each method measured once on one checkpoint (cp: the median of --cp-repeat runs)."""
    work = Path(args.workdir).expanduser().absolute()
    logdir = work / "logs" / src.name
    logdir.mkdir(parents=True, exist_ok=True)
    results, written = [], {}
    for m in methods:
        if skip(m):
            continue
        out = work / "out" / f"{src.name}-{m}"
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = command_for(m, src, out, desc, logdir, args, mergekit, written)
        if cmd is None:
            continue
        timeout = args.timeout or None
        run_env = env
        if PROBE.match(m) and PROBE.match(m)[1] == "verify":  # a first run: the source's passes not cached yet
            cache = work / "verify-cache" / f"{src.name}-{m}"
            shutil.rmtree(cache, ignore_errors=True)
            run_env = dict(env, SURGERY_CACHE=str(cache))
        rec = measure(m, cmd, src, out, logdir, run_env, cold=args.cold, timeout=timeout)
        repeat = args.cp_repeat if m == "cp" else args.repeat if m in UNVERIFIED or m.startswith(FLOOR) else 1
        if repeat > 1 and rec["rc"] == 0:  # this machine's page cache makes single runs vary: keep the median run
            runs = [rec] + [measure(m, cmd, src, out, logdir, run_env, cold=args.cold) for _ in range(repeat - 1)]
            rec = sorted(runs, key=lambda r: r["total"])[len(runs) // 2]
            rec["all_totals"] = [round(r["total"], 2) for r in runs]
        shutil.rmtree(out.with_name(out.name + ".failed"), ignore_errors=True)  # a failed verification's kept output
        log = (logdir / f"{m}.log").read_text(errors="replace")
        if PROBE.match(m):
            rec["phases"], rec["probe"] = parse_phases(log), parse_probe(log)
            prof = logdir / f"{m}.prof"
            if prof.is_file() and prof.stat().st_mtime >= time.time() - rec["total"] - 5:
                rec["profile"] = profile_summary(prof)
        rec.update(method=m, size=size, dtype=desc["dtype"])
        results.append(rec)
        if rec["rc"] == 0:
            written[m] = rec["written_bytes"]
        status = ("ok" if rec["rc"] == 0 else f"TIMED OUT after {rec['wall']:.0f} s" if rec.get("timed_out")
                  else f"FAILED rc={rec['rc']} (log {logdir / (m + '.log')})")
        if "all_totals" in rec:
            status += f" (median of {rec['all_totals']} s)"
        print(f"   {label(m):<46} {rec['wall']:7.1f} s + sync {rec['sync']:5.1f} s  peak RSS {rec['maxrss'] / MiB:7.0f} MiB"
              f"  anon {rec['peak_anon'] / MiB:7.0f} MiB  load {rec['load1']:.1f}  {status}", flush=True)
        if rec["rc"] != 0:
            why = f"timed out after {rec['wall']:.0f} s (--timeout)" if rec.get("timed_out") else f"failed (rc {rec['rc']})"
            last = rec["error"].strip().splitlines()[-1][:300] if rec["error"].strip() else ""
            notes.append(f"{src.name} {m} {why}: {last}")
    return results


def disk_check(work: Path, shape: Shape, layers: int, dtype: str, methods: list[str], cached: bool) -> str | None:
    """Why the source plus the largest output would not fit on the work dir's disk, or None."""
    layer, fixed = shape.layer_params() * ITEMSIZE[dtype], shape.fixed_params() * ITEMSIZE[dtype]
    # output over source, layers and embedding + lm_head apart: clone_width x2 4x and 2x, the others at most ~1.6x
    factors = [(4, 2) if m.removeprefix(FLOOR) == "clone_width" else (0, 0) if m.startswith("forward") else (1.6, 1.3) for m in methods]
    grow_layers, grow_fixed = max(factors, default=(0, 0))

    def need(n: int) -> float:
        return (n * layer + fixed) * (0 if cached else 1) + n * layer * grow_layers + fixed * grow_fixed

    free = shutil.disk_usage(work).free - 2 * 10**9
    if need(layers) <= free:
        return None
    fits = max((n for n in range(1, layers) if need(n) <= free), default=0)
    return (f"--layers {layers} needs about {need(layers) / 1e9:.0f} GB on {work} (the source and the largest output), "
            f"{free / 1e9:.0f} GB are free beyond a 2 GB margin: " + (f"--layers {fits} fits" if fits else "not even one layer fits"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description="surgery vs cp, naive transformers and mergekit on synthetic checkpoints")
    ap.add_argument("--sizes", default="0.5GB,1GB,2GB,4GB", help="checkpoint sizes (tensor bytes), comma-separated")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated: float32, bfloat16, float16")
    ap.add_argument("--methods", help=f"subset of {','.join(METHODS)} (default all); with --shape: of "
                                      f"{','.join(SHAPE_METHODS)}, forwardN and verifyN for any N (default those)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="one checkpoint of a published model's shape instead of the "
                    "size matrix; its section of --results is rewritten, the rest kept")
    ap.add_argument("--llama8b", action="store_const", const="llama3-8b", dest="shape", help="same as --shape llama3-8b")
    ap.add_argument("--layers", type=int, help="with --shape: decoder layers of its checkpoint (default 6; 1 with --quick)")
    ap.add_argument("--scale", type=int, help="with --shape: divide every width but head_dim by this (default 1; 8 with --quick)")
    ap.add_argument("--timeout", type=float, default=0, help="kill a measurement after this many seconds (default: never)")
    ap.add_argument("--workdir", default="/tmp/surgery-bench", help="scratch directory for checkpoints and outputs")
    ap.add_argument("--shard-size", default="1GB", help="shard size of the checkpoints and of every output")
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size of the synthetic Llama (a multiple of 256)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--naive-max", default="4GB", help="skip the naive way above this size (it holds both models in RAM)")
    ap.add_argument("--clone-max", default="4GB", help="skip clone_width above this size (it writes ~4x the source)")
    ap.add_argument("--cp-repeat", type=int, default=3, help="run cp this many times and keep the median (default 3)")
    ap.add_argument("--repeat", type=int, default=1, help="with --shape: run each unverified surgery method and floor this "
                                                          "many times and keep the median (default 1)")
    ap.add_argument("--mergekit", help="path to mergekit-yaml (default: on PATH, else ../bench-venv/bin/mergekit-yaml)")
    ap.add_argument("--results", help="markdown file to write (default benchmarks/RESULTS.md; WORKDIR/RESULTS-quick.md with "
                                      "--quick, WORKDIR/RESULTS-SHAPE-quick.md with --shape --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 0.25GB checkpoints only; with --shape: 1 layer, widths / 8")
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
    methods = [m.strip() for m in (args.methods or ",".join(SHAPE_METHODS if args.shape else METHODS)).split(",") if m.strip()]
    known = (lambda m: m in SHAPE_METHODS or PROBE.match(m) or m in METHODS) if args.shape else (lambda m: m in METHODS)
    bad = [m for m in methods if not known(m)] + [d for d in dtypes if d not in ITEMSIZE]
    if bad:
        ap.error(f"unknown: {', '.join(bad)}")
    if args.hidden % 256:
        ap.error("--hidden must be a multiple of 256")
    if not args.shape and (args.layers or args.scale):
        ap.error("--layers and --scale go with --shape")
    naive_max, clone_max = parse_size(args.naive_max), parse_size(args.clone_max)
    work = Path(args.workdir).expanduser().absolute()
    work.mkdir(parents=True, exist_ok=True)
    if args.shape:
        results_path = Path(args.results) if args.results else (
            work / f"RESULTS-{args.shape}-quick.md" if args.quick else HERE / "RESULTS.md")
    else:
        results_path = Path(args.results) if args.results else (work / "RESULTS-quick.md" if args.quick else HERE / "RESULTS.md")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    mergekit = find_mergekit(args.mergekit) if "mergekit" in methods else None
    notes: list[str] = []
    info = machine()
    info["disk"] = disk_line(work)
    info["load_start"] = os.getloadavg()[0]
    info["uptime_start"] = uptime()
    if "mergekit" in methods:
        if mergekit is None:
            notes.append("mergekit-yaml not found (see benchmarks/README.md to install it in a separate venv): its rows are missing")
        else:
            mk_py = Path(mergekit).parent / "python"
            v = subprocess.run([str(mk_py), "-c", "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
                               capture_output=True, text=True).stdout.split()
            info["mergekit"] = f"{v[0]} (torch {v[1]}, {mergekit})" if len(v) == 2 else mergekit
    print(f"load average {os.getloadavg()}; workdir {work} ({info['disk']})", flush=True)
    if args.shape:
        return main_shape(args, methods, work, results_path, env, mergekit, notes, info)

    shape = Shape(args.hidden, args.vocab)
    results, info["checkpoints"] = [], []
    t_start = time.perf_counter()
    for dtype in dtypes:
        for size in sizes:
            src = work / f"llama-{fmt_size(size)}-{dtype}"
            t0 = time.perf_counter()
            desc = build_checkpoint(src, shape, shape.layers_for(size, dtype), dtype, args.shard_size)
            nbytes = dir_bytes(src, weights_only=True)
            info["checkpoints"].append({"size": fmt_size(size), "dtype": dtype, "layers": desc["layers"], "bytes": nbytes,
                                        "largest": largest_tensor(src)})
            print(f"== {src.name}: {desc['layers']} layers, {nbytes / 1e9:.2f} GB (ready in {time.perf_counter() - t0:.0f} s)", flush=True)
            results += run_methods(src, desc, size, methods, args, env, mergekit, notes,
                                   skip=lambda m: (m == "naive" and size > naive_max) or (m == "clone_width" and size > clone_max))
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


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main_shape(args, methods: list[str], work: Path, results_path: Path, env: dict, mergekit: str | None,
               notes: list[str], info: dict) -> int:
    """One checkpoint of a published shape, every method on it, its section written into the results file."""
    dtype = "bfloat16"
    layers = args.layers or (1 if args.quick else DEFAULT_LAYERS)
    scale = args.scale or (8 if args.quick else 1)
    shape = Shape(**SHAPES[args.shape]).scaled(scale)
    name = f"{args.shape}" + (f"-scale{scale}" if scale > 1 else "") + f"-{layers}L-{dtype}"
    src = work / name
    marker = src / "bench.json"
    cached = marker.is_file()
    why = disk_check(work, shape, layers, dtype, methods, cached)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    desc = build_checkpoint(src, shape, layers, dtype, args.shard_size)
    nbytes = dir_bytes(src, weights_only=True)
    ckpt = {"layers": layers, "dtype": dtype, "bytes": nbytes, "largest": largest_tensor(src), "shape": shape.describe(),
            "shards": len(list(src.glob("*.safetensors")))}
    print(f"== {src.name}: {shape.describe()}, {layers} layers, {nbytes / 1e9:.2f} GB "
          f"(ready in {time.perf_counter() - t_start:.0f} s)", flush=True)
    results = run_methods(src, desc, nbytes, methods, args, env, mergekit, notes)
    info["load_end"] = os.getloadavg()[0]
    info["uptime_end"] = uptime()
    info["code_end"] = code_version()
    if info["code_end"] != info["code"]:
        notes.append(f"the code changed during the run: {info['code']} at the start, {info['code_end']} at the end")
    if scale > 1:
        notes.append(f"widths divided by {scale} (--scale): a smoke test, not the shape's numbers")
    notes.append(f"whole benchmark: {time.perf_counter() - t_start:.0f} s of wall time, checkpoint included")
    (work / f"results-{name}.json").write_text(json.dumps({"machine": info, "checkpoint": ckpt, "results": results},
                                                          indent=2, default=str))
    # the default depth keeps the shape's own section; another depth gets one of its own beside it
    section = args.shape if layers == DEFAULT_LAYERS or args.quick else f"{args.shape}-{layers}L"
    insert_section(results_path, section, render_shape(results, info, args, ckpt, notes))
    checks = shape_checks(results)
    for c in checks:
        floor = f"  (floor {c['floor_shown']}{'' if c['reachable'] else ': the target is below it'})" if c["floor_shown"] else ""
        print(f"   {'PASS' if c['met'] else 'MISS'}  {c['method']:<12} {c['target']:<46} {c['shown']}{floor}")
    print(f"{sum(c['met'] for c in checks)} of {len(checks)} targets met; wrote {results_path}")
    if args.clean:
        shutil.rmtree(src, ignore_errors=True)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
