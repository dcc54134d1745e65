"""The streaming executor: one output tensor at a time, from source tensors read on demand.

Memory holds the tensors one output needs (its sources and the intermediate results of its chain
of ops), never the model. A background thread computes the next tensors while the current one is
written, so reading, transforming and writing overlap. One loop writes every format: an
`OutputFormat` (transformers' sharded safetensors, Mistral's native release) only names the
tensors, places them in files and writes what describes them.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
import numpy as np
from tqdm import tqdm

from .errors import SurgeryError
from .finite import tensor_non_finite
from .lazy import LazyTensor, evaluate, storage_exact
from .io.checkpoint import SourceDigest
from .io.writer import PlannedTensor, Pieces, SourceBytes, layout_order, write_files
from .modeling import MODELING_FILE
from .ops.slices import new_entry_blocks
from .rowwise import ahead, block_cost, byte_blocks, in_blocks, placed
from .state import ModelState

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pth|pt|ckpt)$|.*\.index\.json$")
NOT_COPIED = {"config.json", "README.md", ".gitattributes", "surgery_report.json", "surgery_report.md",
              "surgery_recipe.yaml", MODELING_FILE}


@dataclass
class Written:
    tensors: dict[str, str]  # tensor name -> digest of its bytes (`io.digest`)
    files: dict[str, str] = field(default_factory=dict)  # file -> digest, where computed while writing
    sources: dict[str, str] = field(default_factory=dict)  # source tensor -> digest, for those only copied in pieces
    source: SourceDigest | None = None  # every source tensor's digest, taken as the executor read it


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise SurgeryError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N", loc=("device",)) from None
    if dev.type not in ("cpu", "cuda"):
        raise SurgeryError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N", loc=("device",))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SurgeryError("device cuda requested but torch sees no GPU; use device: auto or cpu", loc=("device",))
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SurgeryError(f"no GPU {dev.index}: torch sees {torch.cuda.device_count()}", loc=("device",))
    return dev


def compute_dtype_for(state: ModelState) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in state.tensors.values()) else torch.float32


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def output_tensors(state: ModelState, dtype: str) -> list[tuple[str, LazyTensor, torch.dtype]]:
    out = []
    tensors = state.output()
    for name in sorted(tensors, key=_natural):
        node = tensors[name]
        target = node.dtype if dtype == "auto" or not node.dtype.is_floating_point else DTYPES[dtype]
        out.append((name, node, target))
    return out


def half_storage(state: ModelState, dtype: str) -> torch.dtype | None:
    """The half-precision dtype the output (in `dtype`, or "auto") rounds computed or cast tensors into (the coarser of
    bfloat16 and float16 if both), else None. Tensors that only move stored values (copies, pads, permutations, kept
    slices) or draw new ones from statistics round nothing that was computed: `storage_exact` says so, and they are
    written in the storage dtype."""
    half = (torch.bfloat16, torch.float16)
    rounded = {target for _, node, target in output_tensors(state, dtype)
               if target in half and (node.fn is not None or node.dtype != target) and not storage_exact(node, target)}
    return max(rounded, key=lambda d: torch.finfo(d).eps) if rounded else None


class FiniteReader:
    """Refuses source tensors holding NaN or Inf: no growth can promise anything about them."""

    def __init__(self, reader):
        self.reader = reader

    @property
    def reads_rows(self) -> bool:
        return bool(getattr(self.reader, "reads_rows", False))

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        t = self.reader.load_rows(name, start, stop)
        if t.is_floating_point() and tensor_non_finite(t):  # the error counts the whole tensor's, row block by block
            rows, step = self.reader.tensors[name].shape[0], max(1, stop - start)
            self._refuse(name, sum(tensor_non_finite(self.reader.load_rows(name, a, min(rows, a + step)))
                                   for a in range(0, rows, step)))
        return t

    def load(self, name: str) -> torch.Tensor:
        t = self.reader.load(name)
        bad = tensor_non_finite(t) if t.is_floating_point() else 0
        if bad:
            self._refuse(name, bad)
        return t

    def _refuse(self, name: str, bad: int):
        raise SurgeryError(f"tensor {name!r} holds {bad} NaN/Inf value(s); refusing to operate on a non-finite model",
                           where=str(getattr(self.reader, "path", "source")))


def source_bytes(reader, name: str) -> SourceBytes | None:
    """Where a source tensor's bytes lie in a safetensors file, if they do (then the kernel copies them)."""
    meta = getattr(reader, "tensors", {}).get(name)
    if meta is None or getattr(meta, "offset", None) is None:
        return None
    n = meta.dtype.itemsize
    for s in meta.shape:
        n *= s
    return SourceBytes(name, Path(meta.file), meta.offset, n, meta.dtype, tuple(meta.shape))


# Kept runs shorter than this (bytes, on average) are moved through memory: a kernel call each costs more. An 8B
# embedding grown on its columns has 128,256 runs of 8 KiB: as kernel copies, ~4 s more system time on 2 cores.
MIN_PIECE = 1 << 20


@dataclass(frozen=True)
class KeptLayout:
    """Where a growth's kept entries and new entries lie in its output's bytes (`Pieces` once the fill is computed)."""
    source: SourceBytes
    copies: list[tuple[int, int, int]]  # (offset in the source tensor, offset in the output, bytes)
    new: list[tuple[int, int, int, int]]  # (outer block, first new entry, offset in the output, entries)
    unit: int  # bytes of one entry along the axis


def kept_layout(node: LazyTensor, d: torch.dtype, reader) -> KeptLayout | None:
    """The byte layout of a growth of a stored tensor kept in its dtype (`AxisGrowth` over a read of it),
    or None where it must be computed: another op in between, a dtype change, reordered entries, short runs."""
    g = node.growth
    if g is None or len(node.inputs) != 1 or node.inputs[0].fn is not None or node.inputs[0].dtype != d:
        return None
    src = node.inputs[0]
    dest = g.dest.numpy()
    if not src.numel or (np.diff(dest) <= 0).any():
        return None
    outer, unit = 1, d.itemsize
    for s in src.shape[:g.axis]:
        outer *= s
    for s in src.shape[g.axis + 1:]:
        unit *= s
    old_n, new_n = src.shape[g.axis], g.new_size
    # runs of old entries that stay adjacent, found without a Python step per entry (70B MLPs have 28,672)
    breaks = (np.flatnonzero(np.diff(dest) != 1) + 1).tolist()
    runs: list[tuple[bool, int, int, int]] = []  # (kept, first old entry or first new entry, position, length)
    pos = made = 0
    for i, j in zip([0, *breaks], [*breaks, old_n]):
        at = int(dest[i])
        if at > pos:
            runs.append((False, made, pos, at - pos))
            made += at - pos
        runs.append((True, i, at, j - i))
        pos = at + j - i
    if pos < new_n:
        runs.append((False, made, pos, new_n - pos))
    kept = [r for r in runs if r[0]]
    if src.numel * d.itemsize < MIN_PIECE * outer * len(kept):
        return None
    sb = source_bytes(reader, src.source)
    if sb is None or sb.dtype != d:
        return None
    copies = [(o * old_n * unit + i * unit, o * new_n * unit + p * unit, n * unit) for o in range(outer) for _, i, p, n in kept]
    new = [(o, k, o * new_n * unit + p * unit, n) for o in range(outer) for is_kept, k, p, n in runs if not is_kept]
    return KeptLayout(sb, copies, new, unit)


def grown_pieces(node: LazyTensor, layout: KeptLayout, reader, device: torch.device, cd: torch.dtype, d: torch.dtype) -> Pieces:
    """A growth written as its source's bytes plus the new entries, computed exactly as `evaluate` computes
    them (same device and dtype); a zero fill is left to the file, which reads zero where never written."""
    g = node.growth
    src = node.inputs[0]
    data: Iterable[tuple[int, memoryview]] = []
    if g.fill.kind != "zeros":
        cdt = d if storage_exact(node, d) else cd
        shape = list(src.shape)
        shape[g.axis] = g.new_size - len(g.dest)
        blocks = new_entry_blocks(node, reader, device, cdt, d)
        if blocks is None:  # the fill reads its whole input: read through the run's reader, checked finite and hashed there
            blocks = [g.fill.values(reader.load(src.source).to(device=device, dtype=cdt), g.axis, shape[g.axis]).to(dtype=cdt)]
        else:  # computed block by block on a thread of their own, one ahead of the writer
            blocks = ahead(blocks)
        unit = layout.unit // d.itemsize  # values per entry
        data = placed(blocks, [((o * shape[g.axis] + k) * unit, at, n * unit) for o, k, at, n in layout.new], d)
    return Pieces(layout.source, node.shape, d, layout.copies, data, checked=g.fill.reads_values)


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def torch_threads(n: int):
    """torch's CPU thread count set to `n` inside the block, restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def streaming_threads(busy: int, workers: int = 1):
    """torch's CPU threads while a checkpoint streams: the cores the writer's own `busy` threads leave,
    shared by the `workers` that compute tensors side by side.

    The writer and the hashing thread keep cores busy themselves; torch's threads waking on every
    element-wise op beside them cost more than they gave: on 2 cores a bf16 grow_heads spent 7.3 s of
    system CPU and 12.8 s with two threads, 2.9 s and 8.8 s with one (benchmarks/RESULTS.md).
    """
    import torch

    return torch_threads(max(1, min(torch.get_num_threads(), (cpu_cores() - busy) // workers)))


def computed_in_order(pool: ThreadPoolExecutor, compute, tensors: list[PlannedTensor], cost, workers: int, budget: int):
    """(tensor, compute(tensor's name)) in the order given, computed ahead of the one being consumed by up
    to `workers` threads. One tensor always computes while the previous is consumed, as a single worker
    did; more compute beside it only while the costs of those computing add up to at most `budget`."""
    queue, pending = deque(tensors), deque()
    computing = 0

    def submit() -> None:
        nonlocal computing
        while queue and len(pending) < workers:
            c = cost(queue[0].name)
            if pending and computing + c > budget:
                break
            p = queue.popleft()
            computing += c
            pending.append((p, pool.submit(compute, p.name)))

    submit()
    try:
        while pending:
            p, fut = pending.popleft()
            data = fut.result()
            computing -= cost(p.name)
            submit()  # the next ones compute while this one is written
            yield p, data
            del data
    finally:
        for _, fut in pending:
            fut.cancel()


def materialize(state: ModelState, reader, device: torch.device, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a state in memory (for verifying intermediate steps of small models)."""
    cd = dtype or compute_dtype_for(state)
    return {name: evaluate(node, reader, device, cd) for name, node in state.output().items()}


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of an output, as its format names and lays it out."""
    name: str  # in the output's files
    node: LazyTensor
    dtype: torch.dtype
    # A move of the computed tensor's entries into the format's layout (Mistral's rotary row order): the
    # tensor is then computed, never copied as the source's bytes.
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def is_copy(self) -> bool:
        """Written as the source's bytes, untouched."""
        return self.transform is None and self.node.fn is None and self.node.dtype == self.dtype


class OutputFormat(Protocol):
    """An output's layout on disk (`io.hf_format`, `io.native_format`): what the executor's tensors are
    called, which file each goes in, and what is written beside them once they are."""

    def tensors(self, state: ModelState) -> list[OutputTensor]:
        """Every tensor to write; raises what the format cannot hold, before any weight is written."""

    def files(self, planned: list[PlannedTensor]) -> list[tuple[str, list[PlannedTensor]]]:
        """(file name, its tensors) for each weight file."""

    def finish(self, state: ModelState, out_dir: Path, files: list[tuple[str, list[PlannedTensor]]]) -> None:
        """The files that describe the weights (index, config), written after them."""


def write_output(state: ModelState, fmt: OutputFormat, source, out_dir: Path, device: torch.device,
                 progress: bool = True) -> Written:
    """Stream every output tensor into the file `fmt` puts it in; returns the digest of each tensor and file,
    and of each source tensor, hashed as it was read (`Written.source`)."""
    outputs = {o.name: o for o in fmt.tensors(state)}
    planned = [PlannedTensor(o.name, o.node.shape, o.dtype) for o in outputs.values()]
    files = fmt.files(planned)
    copies = {name: o.node.source for name, o in outputs.items() if o.is_copy}
    hashed = SourceDigest(source, {src: out for out, src in copies.items()})
    reader = FiniteReader(hashed)
    cd = compute_dtype_for(state)
    layouts = {n: lay for n, o in outputs.items()
               if n not in copies and o.transform is None and (lay := kept_layout(o.node, o.dtype, hashed))}
    blocked = {n for n, o in outputs.items()
               if n not in copies and n not in layouts and o.transform is None and in_blocks(o.node)}

    def compute(name: str) -> torch.Tensor | SourceBytes | Pieces:
        o = outputs[name]
        node, d = o.node, o.dtype
        if name in copies:  # untouched tensor: the kernel copies its bytes where the source has them in a file
            return source_bytes(hashed, node.source) or reader.load(node.source)
        if name in layouts:  # a growth: the kernel copies the kept entries, only the new ones are computed
            return grown_pieces(node, layouts[name], reader, device, cd, d)
        # copies, pads and permutations of tensors stored in d run in d: the same bits, no float32 round trip
        cdt = d if storage_exact(node, d) else cd
        if name in blocked:  # rows from its inputs' rows: computed and written a block at a time, as the writer takes them
            return Pieces(None, node.shape, d, [], byte_blocks(node, reader, device, cdt, d), checked=True)
        t = evaluate(node, reader, device, cdt)
        if o.transform is not None:
            t = o.transform(t)
        return t.to(dtype=d) if t.is_floating_point() else t

    # CPU-bound growths use both cores: a second tensor computes beside the first while the two cost no
    # more than the largest tensor alone (memory stays the single worker's); copies cost nothing.
    workers = 2 if device.type == "cpu" and cpu_cores() >= 2 else 1

    def cost(name: str) -> int:
        o = outputs[name]
        node, d = o.node, o.dtype
        if name in copies:
            return 0
        if name in blocked:
            return block_cost()
        if name in layouts:  # a growth in pieces holds its new entries, and its source where the fill reads it, or blocks of them
            src, g = node.inputs[0], node.growth
            whole = (node.numel - src.numel) * max(cd.itemsize, d.itemsize) + layouts[name].source.nbytes * g.fill.reads_values
            return min(whole, block_cost()) if g.fill.in_row_blocks(g.axis) else whole
        return node.numel * max(cd.itemsize, d.itemsize)

    costs = {n: cost(n) for n in outputs}

    def kernel_copies(name: str) -> list[tuple[int, int, int]]:
        """(offset in its source file, offset in the tensor, bytes) of each range of `name` the kernel will copy."""
        if name in copies:
            sb = source_bytes(hashed, outputs[name].node.source)
            return [(sb.offset, 0, sb.nbytes)] if sb else []
        if name in layouts:
            lay = layouts[name]
            return [(lay.source.offset + s_at, t_at, n) for s_at, t_at, n in lay.copies]
        return []

    budget = max(costs.values(), default=0)
    bar = tqdm(total=sum(p.nbytes for p in planned), unit="B", unit_scale=True, desc="writing",
               disable=not (progress and sys.stderr.isatty()), leave=False)
    with ThreadPoolExecutor(max_workers=workers) as pool, streaming_threads(busy=2, workers=workers):
        order = [t for _, shard in files for t in layout_order(shard)]
        done = write_files(out_dir, files, computed_in_order(pool, compute, order, costs.__getitem__, workers, budget),
                           kernel_copies, bar.update)
    bar.close()
    digests, file_digests, sources = done.tensors, done.files, done.sources
    hashed.adopt(digests, sources)
    fmt.finish(state, out_dir, files)
    return Written(digests, file_digests, sources, hashed)


def copy_side_files(source_dir: Path, out_dir: Path) -> list[str]:
    """Tokenizer files, generation config and the like, copied verbatim."""
    copied = []
    for f in sorted(source_dir.iterdir()):
        if f.is_file() and f.name not in NOT_COPIED and not WEIGHT_FILE.match(f.name) and f.name != "params.json" \
                and f.suffix != ".py":
            shutil.copyfile(f, out_dir / f.name)
            copied.append(f.name)
    return copied
