"""Writing sharded safetensors tensor by tensor.

safetensors' own `save_file` needs every tensor of a shard in memory at once. Since the plan knows
every output shape before any weight is read, we write each shard's header first and then stream
each tensor's bytes to its offset: memory holds one tensor, whatever the shard size. The files
are standard safetensors (the tests read them back with `safe_open`).
"""
from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from ..errors import SurgeryError
from ..finite import checkable, count_non_finite, tensor_non_finite
from . import digest
from .kernel_copy import copy_fd_range, copy_range, start_writeback

if TYPE_CHECKING:  # torch loads where tensors are written: the schema's size check (`parse_size`) starts without it
    import torch

_ST_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
             "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}  # torch dtype name -> safetensors'


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * units[u])
    return int(t)


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def assign_shards(tensors: list[PlannedTensor], shard_size: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    used = 0
    for t in tensors:
        if shards[-1] and used + t.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += t.nbytes
    return shards


def shard_file_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def layout_order(tensors: list[PlannedTensor]) -> list[PlannedTensor]:
    return sorted(tensors, key=lambda t: t.name)


@dataclass(frozen=True)
class SourceBytes:
    """An untouched tensor's bytes in a source safetensors file: moved by the kernel, never through Python."""
    name: str  # the source tensor's name, for the error message
    file: Path
    offset: int  # absolute byte offset in `file`
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class Pieces:
    """A tensor written as byte ranges: its source's kept bytes copied by the kernel, new values from memory.

    `copies` are (offset in the source tensor, offset in this tensor, length), ascending in both (none
    without a `source`); `data` are (offset in this tensor, bytes), possibly produced one block at a time
    as the writer iterates them (`rowwise`), and cover the rest, except ranges left to hold zeros
    (a shard is created at its full size, so bytes never written read as zeros). `checked`: the
    source was read, checked finite and hashed on the way (its values fed the fill); otherwise the
    read-back that digests the tensor also digests and checks the copied ranges, as for a whole copy.
    """
    source: SourceBytes | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    copies: list[tuple[int, int, int]]
    data: Iterable[tuple[int, memoryview]]
    checked: bool


CHUNK = 4 << 20  # bytes the hashing thread reads back at a time, into one buffer it reuses
MAX_UNHASHED = 2  # written tensors whose buffers wait for the hashing thread (bounds memory to ~2 tensors)
IN_FLIGHT = 2  # computed blocks written but waiting for the hashing thread
WRITEBACK = 64 << 20  # bytes written before the kernel is told to start putting them on disk
ALIGN = 64  # a kernel copy runs at full speed where source and output offsets agree modulo this (a cache line)
ALIGN_GAIN = 1 << 20  # bytes a header padding must align beyond no padding to be worth a layout of its own


class ShardWriter:
    """One safetensors file whose layout (tensors sorted by name) is fixed up front.

    Tensors may arrive in any order; when they arrive in layout order (`layout_order`, as the
    executor sends them) the file's digest is computed on the way: no second read for the report.
    One hashing thread computes the tensor's and the file's BLAKE3 (`io.digest`; it releases the
    GIL) while the caller writes the next tensor. An untouched source tensor (`SourceBytes`) is
    copied by the kernel; the hashing thread reads the written bytes back from the page cache once,
    feeds both digests and checks them finite (the check every other source tensor gets when it is read).
    """

    def __init__(self, path: Path, tensors: list[PlannedTensor], metadata: dict | None = None,
                 copies: dict[str, list[tuple[int, int, int]]] | None = None):
        """`copies`: for tensors whose bytes the kernel will copy from a source file, (offset in that file, offset
        in the tensor, bytes) of each range; the header is padded so that most of those bytes keep their source's
        offset modulo 64 (`ALIGN`)."""
        self.path = path
        self.planned = {t.name: t for t in tensors}
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self.offsets: dict[str, int] = {}
        for t in layout_order(tensors):
            header[t.name] = {"dtype": _ST_NAMES[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            self.offsets[t.name] = offset
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
        raw += b" " * _aligning_pad(8 + len(raw), self.offsets, copies or {})
        self.data_start = 8 + len(raw)
        self.f = open(path, "wb", buffering=0)
        head = len(raw).to_bytes(8, "little") + raw
        self._pwrite(memoryview(head), 0)
        self.f.truncate(self.data_start + offset)
        self.remaining = set(self.planned)
        self.file_hash = digest.new(head)
        self.hashed_to = 0  # data bytes hashed so far, in order; None once a tensor arrived out of order
        self.digests: dict[str, str] = {}  # tensor name -> digest of its bytes, complete after close()
        self.source_digests: dict[str, str] = {}  # source tensor name -> digest, for sources written in `Pieces`
        self._lane = ThreadPoolExecutor(1, thread_name_prefix="hash")  # FIFO: the file digest sees layout order
        self._unhashed: deque[tuple[str, Future, bool]] = deque()  # (name, digest job, holds a buffer)
        self._buffers = 0  # jobs in `_unhashed` holding a tensor's memory; kernel copies hold none
        self._flushed_to = self.data_start  # writeback started for the bytes before this offset
        self._chunk: memoryview | None = None  # the hashing thread's read-back buffer

    def _pwrite(self, view: memoryview, at: int) -> None:
        fd, done = self.f.fileno(), 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], at + done)

    def write(self, name: str, data: "torch.Tensor | SourceBytes | Pieces") -> None:
        """Write one tensor's bytes at its offset; their digest lands in `digests` (recorded in the report)."""
        p = self.planned[name]
        if tuple(data.shape) != p.shape or data.dtype != p.dtype:
            raise AssertionError(f"{name}: got {tuple(data.shape)} {data.dtype}, planned {p.shape} {p.dtype}")
        at = self.data_start + self.offsets[name]
        while self._buffers >= MAX_UNHASHED:
            self._settle_oldest()
        file_hash = None
        if self.hashed_to == self.offsets[name]:
            file_hash = self.file_hash
            self.hashed_to += p.nbytes
        else:
            self.hashed_to = None
        if isinstance(data, SourceBytes):
            copy_range(data.file, data.offset, self.f.fileno(), at, p.nbytes)
            finite = data if data.dtype.is_floating_point else None
            job, holds = self._lane.submit(self._hash_written, at, p.nbytes, file_hash, finite), False
        elif isinstance(data, Pieces) and data.source is None:  # all computed, in order: hashed from its buffers
            job, holds = self._write_computed(data.data, at, p.nbytes, file_hash), False
        elif isinstance(data, Pieces):
            src = data.source
            if data.copies:
                with open(src.file, "rb", buffering=0) as f:
                    for s_at, t_at, n in data.copies:
                        copy_fd_range(f.fileno(), src.file, src.offset + s_at, self.f.fileno(), at + t_at, n)
            for t_at, view in data.data:
                self._pwrite(view, at + t_at)
            kept = None if data.checked else [(at + t_at, at + t_at + n) for _, t_at, n in data.copies]
            job, holds = self._lane.submit(self._hash_written, at, p.nbytes, file_hash, None if data.checked else src, kept), False
        else:
            import torch

            t = data.detach().to("cpu").contiguous().reshape(-1)
            buf = memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
            self._pwrite(buf, at)
            job, holds = self._lane.submit(_hash_buffer, buf, file_hash), True
        self._unhashed.append((name, job, holds))
        self._buffers += holds
        self.remaining.discard(name)
        if at + p.nbytes - self._flushed_to >= WRITEBACK:
            start_writeback(self.f.fileno(), self._flushed_to, at + p.nbytes - self._flushed_to)
            self._flushed_to = at + p.nbytes

    def _write_computed(self, blocks: Iterable[tuple[int, memoryview]], at: int, n: int, file_hash) -> Future:
        """Consecutive blocks from a tensor's start, each written and then hashed from its own buffer on the
        hashing thread (no read-back, as a whole tensor's); at most IN_FLIGHT blocks wait for it."""
        h, waiting, done = digest.new(), deque(), 0
        for t_at, view in blocks:
            if t_at != done:
                raise AssertionError(f"{self.path.name}: computed bytes at {t_at}, expected {done}")
            self._pwrite(view, at + t_at)
            done += len(view)
            while len(waiting) >= IN_FLIGHT:
                waiting.popleft().result()
            waiting.append(self._lane.submit(_feed, view, h, file_hash))
        if done != n:
            raise AssertionError(f"{self.path.name}: computed {done} bytes of {n}")
        return self._lane.submit(h.hexdigest)

    def _settle_oldest(self) -> None:
        name, job, holds = self._unhashed.popleft()
        self._buffers -= holds
        self.digests[name] = job.result()

    def _hash_written(self, at: int, n: int, file_hash, finite: SourceBytes | None,
                      kept: list[tuple[int, int]] | None = None) -> str:
        """The digest of the written bytes [at, at + n), read back once: they also feed `file_hash` (when
        in layout order) and are checked finite when `finite` names their source: all of them, or only
        the `kept` file ranges (ascending) that hold the source's bytes, whose own digest is then recorded
        as the source tensor's."""
        if self._chunk is None:
            self._chunk = memoryview(bytearray(CHUNK))
        view, h, bad = self._chunk, digest.new(), 0
        source_hash = digest.new() if kept is not None else None
        kept = deque(kept or ())
        with open(self.path, "rb", buffering=0) as f:
            f.seek(at)
            done = 0
            while done < n:
                want, got = min(n - done, CHUNK), 0
                while got < want:  # a whole chunk, so it holds whole elements
                    k = f.readinto(view[got:want])
                    if not k:
                        raise SurgeryError("output shard shorter than planned", where=str(self.path))
                    got += k
                h.update(view[:want])
                if file_hash is not None:
                    file_hash.update(view[:want])
                if source_hash is not None:
                    lo = at + done
                    while kept and kept[0][0] < lo + want:
                        a, b = kept[0]
                        part = view[max(a, lo) - lo:min(b, lo + want) - lo]
                        source_hash.update(part)
                        if finite.dtype.is_floating_point:
                            bad += _non_finite(part, finite.dtype)
                        if b > lo + want:
                            break
                        kept.popleft()
                elif finite is not None:
                    bad += _non_finite(view[:want], finite.dtype)
                done += want
        if bad:
            raise SurgeryError(f"tensor {finite.name!r} holds {bad} NaN/Inf value(s); refusing to operate on a non-finite model",
                               where=str(finite.file.parent))
        if source_hash is not None:
            self.source_digests[finite.name] = source_hash.hexdigest()
        return h.hexdigest()

    def close(self) -> str | None:
        """Finish the file; its digest when every tensor came in layout order."""
        if self.remaining:
            raise AssertionError(f"{self.path.name}: tensors never written: {sorted(self.remaining)[:5]}")
        while self._unhashed:
            self._settle_oldest()
        self._shutdown()
        os.fsync(self.f.fileno())
        self.f.close()
        return self.file_hash.hexdigest() if self.hashed_to is not None else None

    def abort(self) -> None:
        """Stop hashing and close the file after a failure (the caller removes the output)."""
        for _, job, _ in self._unhashed:
            job.cancel()
        self._unhashed.clear()
        self._shutdown()
        if not self.f.closed:
            self.f.close()

    def _shutdown(self) -> None:
        self._lane.shutdown(wait=True)


@dataclass
class WrittenFiles:
    tensors: dict[str, str]  # tensor name -> digest of its bytes
    files: dict[str, str]  # file name -> digest, where its tensors came in layout order
    sources: dict[str, str]  # source tensor name -> digest, for sources written in `Pieces` and hashed here


def write_files(out_dir: Path, files: list[tuple[str, list[PlannedTensor]]], stream,
                copies: Callable[[str], list[tuple[int, int, int]]] = lambda name: [],
                written: Callable[[int], object] = lambda n: None) -> WrittenFiles:
    """Every file of `files` written from `stream`, a generator of (PlannedTensor, data): each file's tensors in layout
    order, file after file, so a file's first tensors compute while the last of the one before is written (a stream
    per file left the cores idle at every file's start). `copies(name)`: the ranges the kernel will copy into that
    tensor (`ShardWriter`); `written(bytes)` after each. A file is closed (its last digests, fsync) on a thread of
    its own while the next is written (closing in line left the kernel copy idle while the hashing caught up), at
    most one behind, and its errors (a copied tensor's NaN) surface before the next."""
    done = WrittenFiles({}, {}, {})
    closing: deque[tuple[str, ShardWriter, Future]] = deque()

    def settle(keep: int) -> None:
        while len(closing) > keep:
            fname, writer, job = closing[0]
            file_digest = job.result()
            closing.popleft()
            done.tensors.update(writer.digests)
            done.sources.update(writer.source_digests)
            if file_digest:
                done.files[fname] = file_digest

    with ThreadPoolExecutor(1, thread_name_prefix="close") as closer:
        try:
            for fname, shard in files:
                settle(keep=1)
                writer = ShardWriter(out_dir / fname, shard, copies={t.name: copies(t.name) for t in shard})
                try:
                    for _ in shard:
                        p, data = next(stream)  # a tensor of another file: `write` refuses it
                        writer.write(p.name, data)
                        del data
                        written(p.nbytes)
                except BaseException:
                    writer.abort()
                    raise
                closing.append((fname, writer, closer.submit(writer.close)))
            settle(keep=0)
        except BaseException:
            stream.close()
            for _, writer, job in closing:
                job.cancel()
                wait([job])
                writer.abort()
            raise
    return done


def _aligning_pad(data_start: int, offsets: dict[str, int], copies: dict[str, list[tuple[int, int, int]]]) -> int:
    """Spaces (a multiple of 8, below ALIGN) added to the header so that the most kernel-copied bytes land at their
    source offset modulo ALIGN. The kernel copies a range between files whose offsets differ by a multiple of 64
    at about twice the speed of one where they differ by 8 (1 GB: 0.4 s against 0.75 s on this project's machine).
    No padding unless it aligns ALIGN_GAIN more bytes than none: the natural layout is kept where the gain is
    under a millisecond, so a conversion there and back gives the same file."""
    aligned = [0] * (ALIGN // 8)
    for name, ranges in copies.items():
        for src_at, t_at, n in ranges:
            shift = (src_at - (data_start + offsets[name] + t_at)) % ALIGN
            if shift % 8 == 0:
                aligned[shift // 8] += n
    best = max(range(len(aligned)), key=lambda k: (aligned[k], -k))
    return 8 * best if aligned[best] - aligned[0] >= ALIGN_GAIN else 0


def _feed(view: memoryview, h, file_hash) -> None:
    h.update(view)
    if file_hash is not None:
        file_hash.update(view)


def _hash_buffer(buf: memoryview, file_hash) -> str:
    """A tensor's digest; its bytes also feed `file_hash` when it arrived in layout order."""
    if file_hash is not None:
        file_hash.update(buf)
    return digest.hexdigest(buf)


def _non_finite(view: memoryview, dtype: torch.dtype) -> int:
    """NaN/Inf count of raw bytes holding `dtype` values."""
    if checkable(dtype):
        return count_non_finite(view, dtype)
    import torch

    return tensor_non_finite(torch.frombuffer(view, dtype=dtype)) if len(view) else 0


def write_index(directory: Path, shards: list[list[PlannedTensor]], names: list[str]) -> None:
    if len(shards) == 1:
        return
    total = sum(t.nbytes for s in shards for t in s)
    weight_map = {t.name: fname for s, fname in zip(shards, names) for t in s}
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n"
    )


