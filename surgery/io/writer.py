"""Writing sharded safetensors tensor by tensor, and outputs that are complete or absent.

safetensors' own `save_file` needs every tensor of a shard in memory at once. Since the plan knows
every output shape before any weight is read, we write each shard's header first and then stream
each tensor's bytes to its offset: memory holds one tensor, whatever the shard size. The files
are standard safetensors (the tests read them back with `safe_open`).
"""
from __future__ import annotations

import errno
import functools
import json
import os
import secrets
import shutil
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from ..errors import SurgeryError
from ..finite import checkable, count_non_finite, tensor_non_finite
from . import digest

if TYPE_CHECKING:  # torch loads where tensors are written: the schema's size check (`parse_size`) starts without it
    import torch

_ST_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
             "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}  # torch dtype name -> safetensors'

TMP_PREFIX = ".surgery-tmp-"


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
WRITEBACK = 64 << 20  # bytes written before the kernel is told to start putting them on disk
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}


def copy_range(src: Path, src_offset: int, dst_fd: int, dst_offset: int, n: int) -> None:
    """Copy n bytes of `src` into `dst_fd` at `dst_offset` inside the kernel (copy_file_range, else sendfile),
    else through a buffer (where neither copies between files: macOS's sendfile writes to sockets only)."""
    with open(src, "rb", buffering=0) as f:
        copy_fd_range(f.fileno(), src, src_offset, dst_fd, dst_offset, n)


def copy_fd_range(fd: int, src: Path, src_offset: int, dst_fd: int, dst_offset: int, n: int) -> None:
    """`copy_range` from an open source file `fd` (`src` names it in errors)."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < n:
                k = os.copy_file_range(fd, dst_fd, n - done, src_offset + done, dst_offset + done)
                if not k:
                    raise SurgeryError("file ends inside tensor data (truncated?)", where=str(src))
                done += k
            return
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
    try:
        if not hasattr(os, "sendfile"):
            raise OSError(errno.ENOSYS, "no sendfile")
        os.lseek(dst_fd, dst_offset + done, os.SEEK_SET)
        while done < n:
            k = os.sendfile(dst_fd, fd, src_offset + done, n - done)
            if not k:
                raise SurgeryError("file ends inside tensor data (truncated?)", where=str(src))
            done += k
    except OSError as e:
        if e.errno not in _NO_KERNEL_COPY and e.errno != errno.ENOTSOCK:
            raise
        while done < n:
            block = os.pread(fd, min(n - done, CHUNK), src_offset + done)
            if not block:
                raise SurgeryError("file ends inside tensor data (truncated?)", where=str(src))
            written = 0
            while written < len(block):
                written += os.pwrite(dst_fd, block[written:], dst_offset + done + written)
            done += len(block)


class ShardWriter:
    """One safetensors file whose layout (tensors sorted by name) is fixed up front.

    Tensors may arrive in any order; when they arrive in layout order (`layout_order`, as the
    executor sends them) the file's digest is computed on the way: no second read for the report.
    One hashing thread computes the tensor's and the file's BLAKE3 (`io.digest`; it releases the
    GIL) while the caller writes the next tensor. An untouched source tensor (`SourceBytes`) is
    copied by the kernel; the hashing thread reads the written bytes back from the page cache once,
    feeds both digests and checks them finite (the check every other source tensor gets when it is read).
    """

    def __init__(self, path: Path, tensors: list[PlannedTensor], metadata: dict | None = None):
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


@functools.cache
def _sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # a libc without it
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, n: int) -> None:
    """Ask the kernel to start writing a byte range to disk now, without waiting (Linux's sync_file_range).

    The disk then works while the next tensors are computed, and the fsync that ends each shard waits
    only for the last few: a shard's writeback no longer starts when it is complete. Elsewhere a no-op.
    """
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, offset, n, _SYNC_FILE_RANGE_WRITE)  # advisory: an error leaves it to fsync


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


REPORT = "surgery_report.json"  # in every output surgery writes (with or without verification): its marker


def not_a_surgery_output(directory: Path) -> str | None:
    """Why `--force` may not replace `directory` (None when it may): it must hold exactly an output surgery
    wrote, i.e. a surgery_report.json listing every other file in it, and nothing else."""
    try:
        doc = json.loads((directory / REPORT).read_text())
    except FileNotFoundError:
        return f"it holds no {REPORT}, so surgery did not write it"
    except (OSError, ValueError) as e:
        return f"its {REPORT} cannot be read ({getattr(e, 'strerror', None) or e})"
    files = next((doc[k] for k in ("files_blake3", "files_sha256") if isinstance(doc, dict) and isinstance(doc.get(k), dict)), None)
    if files is None or "surgery_version" not in doc:
        return f"its {REPORT} is not a surgery report"
    listed = set(files) | {REPORT}
    folders = {str(parent) for f in listed for parent in Path(f).parents if str(parent) != "."}
    for root, dirs, names in os.walk(directory):
        for name in sorted(dirs) + sorted(names):
            path = Path(root) / name
            rel = str(path.relative_to(directory))
            ok = rel in folders if path.is_dir() and not path.is_symlink() else rel in listed and not path.is_symlink()
            if not ok:
                return f"it holds {rel}, which surgery did not write"
    return None


def _make_temporary(parent: Path, prefix: str) -> Path:
    """mkdtemp's unique name with a plain mkdir's mode (0777 less the umask, as save_pretrained's), not 0700."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no unused temporary directory name", str(parent))


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


class AtomicOutput:
    """A temporary directory beside the target, renamed into place only when complete.

    An existing target is replaced only with `force`, and only when it is empty or an output surgery
    wrote (`not_a_surgery_output`); never one that holds the current directory, the source or one of
    `inputs` ((what, path): the recipe, the verification data). Leftover temporary directories from
    killed runs are recognised by their prefix and removed by the next run that writes beside them.
    """

    def __init__(self, target: Path, force: bool, source: Path | None, inputs: tuple[tuple[str, Path], ...] = ()):
        if not str(target).strip() or Path(target).expanduser().resolve() == Path.cwd().resolve():
            raise SurgeryError("the output must be a directory path other than the current directory", where=f"output {str(target)!r}")
        self.target = Path(target).expanduser().absolute()
        self.force = force
        tgt = self.target.resolve()
        if source is not None:
            src = Path(source).resolve()
            if tgt == src or src in tgt.parents:
                raise SurgeryError("output must not be the source directory or inside it", where=str(self.target))
            if tgt in src.parents:
                raise SurgeryError("output must not contain the source directory", where=str(self.target))
        self.protected = (("the current directory", Path.cwd()),) + tuple(inputs)
        self.failed = self.target.with_name(f"{self.target.name}.failed")
        self._check_replaceable(self.target, "")
        if self.target.exists() and any(self.target.iterdir()):
            # a failed verification would go to TARGET.failed, replacing what is there
            self._check_replaceable(self.failed, f"a failed verification of {self.target} would be written here, but ")
        self.tmp: Path | None = None
        # Set when the finished output must not replace what is there (a run whose verification failed):
        # it then goes to `<target>.failed` and the previous output stays.
        self.keep_previous = False
        self.written_to = self.target

    def _check_replaceable(self, path: Path, why: str) -> None:
        """Refuse now what `_move_into_place` would have to delete and must not."""
        resolved = path.resolve()
        for label, p in self.protected:
            p = Path(p).resolve()
            if resolved == p or resolved in p.parents:
                raise SurgeryError(f"{why}output must not contain {label}", where=str(path))
        if not path.exists():
            return
        if not path.is_dir():
            raise SurgeryError(f"{why}output exists and is not a directory", where=str(path))
        if not any(path.iterdir()):
            return
        problem = not_a_surgery_output(path)
        if not self.force:
            if problem is None:
                raise SurgeryError(f"{why}output directory holds a previous surgery output; pass --force to replace it",
                                   where=str(path))
            raise SurgeryError(f"{why}output directory is not empty and {problem}; choose another output "
                               f"(--force replaces only an output surgery wrote)", where=str(path))
        if problem is not None:
            raise SurgeryError(f"{why}--force replaces only an output surgery wrote, and {problem}; "
                               f"choose another output or move it away yourself", where=str(path))

    def __enter__(self) -> Path:
        parent = self.target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            clean_stale_temporaries(parent)
            self.tmp = _make_temporary(parent, f"{TMP_PREFIX}{self.target.name}-{os.getpid()}-")
        except OSError as e:
            raise SurgeryError(f"cannot write the output: {e.strerror}", where=str(self.target)) from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                # a full disk (ENOSPC), a file size limit (EFBIG), a read-only or vanished directory
                what = exc.strerror or str(exc) or type(exc).__name__
                if exc.filename:
                    what += f" ({exc.filename})"
                raise SurgeryError(f"cannot write the output: {what}; nothing was written", where=str(self.target)) from None
            return
        if self.keep_previous and self.target.exists() and any(self.target.iterdir()):
            self.written_to = self.failed
        try:
            self._move_into_place(self.written_to)
        except SurgeryError:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise SurgeryError(f"cannot move the finished output into place: {e.strerror}", where=str(self.written_to)) from None

    def _move_into_place(self, dest: Path) -> None:
        """Rename the temporary to `dest`. An empty `dest` is replaced by the rename itself (which fails if
        anything appeared in it meanwhile); a non-empty one is moved aside and checked again before it goes."""
        if not dest.exists() or (dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir())):
            os.rename(self.tmp, dest)
            return
        aside = dest.with_name(f"{TMP_PREFIX}{dest.name}-{os.getpid()}-old")
        os.rename(dest, aside)
        problem = "it is not a directory" if not aside.is_dir() else not_a_surgery_output(aside) if any(aside.iterdir()) else None
        if problem is not None:  # changed since the run began
            os.rename(aside, dest)
            raise SurgeryError(f"changed during the run: {problem}; nothing was replaced", where=str(dest))
        try:
            os.rename(self.tmp, dest)
        except OSError:
            os.rename(aside, dest)  # put the previous output back
            raise
        _remove(aside)


def clean_stale_temporaries(parent: Path) -> list[Path]:
    """Remove temporaries whose writing process no longer exists."""
    removed = []
    for p in parent.glob(f"{TMP_PREFIX}*"):
        try:
            pid = int(p.name[len(TMP_PREFIX):].rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        if pid != os.getpid() and not _alive(pid):
            _remove(p)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def file_digests(directory: Path, skip: tuple[str, ...] = (), known: dict[str, str] | None = None,
                 algorithm: str = digest.ALGORITHM) -> dict[str, str]:
    """The digest of every file of an output (BLAKE3 unless told), read in 16 MiB blocks unless already `known`."""
    out = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in skip):
        rel = str(f.relative_to(directory))
        out[rel] = known[rel] if known and rel in known else digest.file_hexdigest(f, algorithm)
    return out
