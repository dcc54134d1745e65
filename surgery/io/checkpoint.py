"""Reading a transformers checkpoint one tensor at a time.

Names, shapes and dtypes come from safetensors headers (or a pickle opened with mmap), so a
checkpoint is described without reading its weights.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import SurgeryError
from . import digest

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int | None = None  # absolute byte offset of the data in a safetensors file


def read_safetensors_header(path: Path) -> dict:
    """Parse a safetensors header by hand so a corrupt file fails with its name, not a Rust panic. As the safetensors
    library does, it refuses duplicate names and tensors that overlap, leave gaps or leave data unindexed."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n), object_pairs_hook=_unique_keys)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        data_len = size - 8 - n
        ranges = []
        for name, info in header.items():
            if name == "__metadata__":
                if not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                    raise ValueError("__metadata__ must map names to strings")
                continue
            check_tensor_name(name)
            if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
                raise ValueError(f"tensor {name!r} lacks dtype, shape or data_offsets")
            shape, offsets = info["shape"], info["data_offsets"]
            if not (isinstance(info["dtype"], str) and _counts(shape) and _counts(offsets) and len(offsets) == 2):
                raise ValueError(f"tensor {name!r}: dtype must be a string, shape and data_offsets lists of "
                                 f"non-negative integers (got {info['dtype']!r}, {shape!r}, {offsets!r})")
            start, end = offsets
            if end > data_len:
                raise ValueError(f"tensor {name!r} ends at byte {end} but the data is {data_len} bytes (truncated?)")
            dtype = _ST_DTYPES.get(info["dtype"])
            if dtype is not None:
                want = math.prod(shape) * dtype.itemsize
                if not start <= end or end - start != want:
                    raise ValueError(f"tensor {name!r} spans bytes {start}..{end} but its shape {shape} "
                                     f"and dtype {info['dtype']} need {want}")
            ranges.append((start, end, name))
        ranges.sort()
        for (_, end, first), (start, _, second) in zip(ranges, ranges[1:]):
            if start < end:
                raise ValueError(f"tensors {first!r} and {second!r} are overlapping (bytes {start}..{end})")
        at = 0
        for start, end, name in ranges:
            if start != at:
                raise ValueError(f"no tensor holds bytes {at}..{start} (the next, {name!r}, starts there)")
            at = end
        if at != data_len:
            raise ValueError(f"the tensors end at byte {at} but the data is {data_len} bytes")
        return header
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SurgeryError(f"corrupt safetensors file: {e}", where=str(path)) from None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the name {dup!r} appears twice")
    return out


def _counts(values) -> bool:
    return isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)


def check_tensor_name(name: str) -> None:
    """Refuse a tensor name holding a control character (ValueError): no model names one so, and the source
    content hash joins names with newlines and NULs, so such a name could pose as other tensors' entries."""
    bad = next((c for c in name if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        raise ValueError(f"tensor name {name!r} holds the control character {bad!r}")


def _header_length(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def read_tensor(meta: TensorMeta) -> torch.Tensor:
    """One tensor read with plain file reads into memory it owns.

    safetensors' `safe_open` maps the file, and every page a run touches then counts in its
    resident memory until the process ends: a streaming copy of a 4 GB checkpoint would show
    4 GB of RSS. Reading each tensor into its own buffer keeps memory at a few tensors.
    """
    n = torch.empty((), dtype=meta.dtype).element_size()
    for s in meta.shape:
        n *= s
    buf = torch.empty(n, dtype=torch.uint8)
    if n:
        with open(meta.file, "rb", buffering=0) as f:
            f.seek(meta.offset)
            view = memoryview(buf.numpy())
            got = 0
            while got < n:
                k = f.readinto(view[got:])
                if not k:
                    raise SurgeryError("file ends inside tensor data (truncated?)", where=str(meta.file))
                got += k
    return buf.view(meta.dtype).reshape(meta.shape)


def read_rows(meta: TensorMeta, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a tensor (its first dimension), read alone as `read_tensor` reads a whole one."""
    row = torch.empty((), dtype=meta.dtype).element_size()
    for s in meta.shape[1:]:
        row *= s
    part = TensorMeta((stop - start, *meta.shape[1:]), meta.dtype, meta.file, meta.offset + start * row)
    return read_tensor(part)


class Checkpoint:
    """A local transformers-format model directory."""

    def __init__(self, path: Path):
        self.path = Path(path)
        cfg = self.path / "config.json"
        if not self.path.is_dir():
            what = "is not a directory" if self.path.exists() else "does not exist"
            raise SurgeryError(f"source {what}: expected a checkpoint directory", where=str(self.path))
        if not cfg.is_file():
            raise SurgeryError("no config.json: not a transformers checkpoint directory", where=str(self.path))
        try:
            self.config = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise SurgeryError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}", where=str(cfg)) from None
        except UnicodeDecodeError:
            raise SurgeryError("config.json is not UTF-8 text", where=str(cfg)) from None
        if not isinstance(self.config, dict):
            raise SurgeryError("config.json is not a JSON object", where=str(cfg))
        self.tensors: dict[str, TensorMeta] = {}
        self._pickles: dict[Path, dict] = {}
        self._open: dict[Path, object] = {}
        self._index()

    def _index(self) -> None:
        st = sorted(self.path.glob("*.safetensors"))
        if st:
            index = self.path / "model.safetensors.index.json"
            files = st
            if index.is_file():
                try:
                    wm = json.loads(index.read_text()).get("weight_map", {})
                    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                        raise TypeError("weight_map is not a mapping of tensor names to file names")
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as e:
                    raise SurgeryError(f"corrupt index: {e}", where=str(index)) from None
                files = sorted({self.path / f for f in wm.values()})
                missing = [str(f.name) for f in files if not f.is_file()]
                if missing:
                    raise SurgeryError(f"index names missing shard(s): {', '.join(missing)}", where=str(index))
            for f in files:
                header = read_safetensors_header(f)
                data_start = 8 + _header_length(f)
                for name, info in header.items():
                    if name == "__metadata__":
                        continue
                    if info["dtype"] not in _ST_DTYPES:
                        raise SurgeryError(f"tensor {name!r} has unsupported dtype {info['dtype']}", where=str(f))
                    self.tensors[name] = TensorMeta(tuple(info["shape"]), _ST_DTYPES[info["dtype"]], f,
                                                    data_start + info["data_offsets"][0])
        else:
            bins = sorted(self.path.glob("pytorch_model*.bin"))
            if not bins:
                raise SurgeryError("no weights found (*.safetensors or pytorch_model*.bin)", where=str(self.path))
            for f in bins:
                sd = load_pickle(f)
                self._pickles[f] = sd
                for name, t in sd.items():
                    try:
                        check_tensor_name(name)
                    except ValueError as e:
                        raise SurgeryError(str(e), where=str(f)) from None
                    self.tensors[name] = TensorMeta(tuple(t.shape), t.dtype, f)
        if not self.tensors:
            raise SurgeryError("checkpoint holds no tensors", where=str(self.path))

    def load(self, name: str) -> torch.Tensor:
        meta = self.tensors[name]
        if meta.file in self._pickles:
            return self._pickles[meta.file][name]
        if meta.offset is not None:
            return read_tensor(meta)
        h = self._open.get(meta.file)
        if h is None:
            h = self._open[meta.file] = safe_open(str(meta.file), framework="pt")
        return h.get_tensor(name)

    reads_rows = True

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor (axis 0), read alone from a safetensors file (`rowwise`)."""
        meta = self.tensors[name]
        if meta.offset is None or meta.file in self._pickles:
            return self.load(name)[start:stop]  # a memory-mapped pickle: only those rows' pages are read
        return read_rows(meta, start, stop)


def load_pickle(path: Path) -> dict:
    """`torch.load` that refuses to run code: weights_only, memory-mapped."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # the unpickler reports forbidden globals as a generic error
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SurgeryError(f"refused to load (weights_only=True): {first}", where=str(path)) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SurgeryError("not a plain state dict of tensors", where=str(path))
    return sd


class InMemoryCheckpoint:
    """A state dict and config dict posing as a checkpoint (notebooks, tests, intermediate steps)."""

    def __init__(self, config: dict, state_dict: dict[str, torch.Tensor], path: Path | None = None):
        self.path = path or Path("<memory>")
        self.config = config
        self._sd = state_dict
        self.tensors = {n: TensorMeta(tuple(t.shape), t.dtype, self.path) for n, t in state_dict.items()}

    def load(self, name: str) -> torch.Tensor:
        return self._sd[name]

    reads_rows = True

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._sd[name][start:stop]


def tensor_digest(t: torch.Tensor) -> str:
    """The digest (`io.digest`) of a tensor's bytes as stored; it releases the GIL: writing goes on meanwhile."""
    data = t.detach().to("cpu").contiguous().reshape(-1)
    return digest.hexdigest(data.view(torch.uint8).numpy() if data.numel() else b"")


class SourceDigest:
    """A reader that hashes each source tensor the first time a run reads it.

    The executor reads every tensor it needs exactly once, in its background thread, so the source
    is hashed without a second read and overlapped with writing; `content_hash` reads only what the
    run never needed (a tied lm_head, dropped buffers, tensors an op replaced outright). Tensors
    written byte for byte (`copies`: source name -> output name) are not hashed twice: the writer's
    digest of the output tensor is theirs (`adopt`).
    """

    def __init__(self, reader, copies: dict[str, str] | None = None):
        from ..rowwise import Sequential

        self.reader = reader
        self.digests: dict[str, str] = {}
        self.copies = dict(copies or {})
        self._rows = Sequential()

    def __getattr__(self, name):  # path, passthrough, tensors, ...: the wrapped reader's
        return getattr(self.reader, name)

    def load(self, name: str) -> torch.Tensor:
        t = self.reader.load(name)
        if name not in self.digests and name not in self.copies:
            self.digests[name] = tensor_digest(t)
        return t

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows of a tensor (`rowwise`), hashed as they come when they come in order from row 0."""
        t = self.reader.load_rows(name, start, stop)
        if name not in self.digests and name not in self.copies:
            d = self._rows.feed(name, start, stop, self.reader.tensors[name].shape[0], t, digest.new)
            if d is not None:
                self.digests[name] = d
        return t

    def adopt(self, written: dict[str, str], sources: dict[str, str] | None = None) -> None:
        """Take the digests of byte-for-byte copies from the writer's per-tensor digests (output name -> digest),
        and those of sources it copied in pieces and hashed from the written bytes (source name -> digest)."""
        for src, out in self.copies.items():
            if src not in self.digests and out in written:
                self.digests[src] = written[out]
        for src, d in (sources or {}).items():
            self.digests.setdefault(src, d)
        self.copies = {}

    def content_hash(self, config_file: Path) -> str:
        """BLAKE3 over the config file's bytes and every tensor's name, dtype, shape and the BLAKE3 of its bytes."""
        h = digest.new(Path(config_file).read_bytes())
        for name, meta in sorted(self.reader.tensors.items()):
            if name not in self.digests:
                self.load(name)
            h.update(f"\n{name}\0{str(meta.dtype)[6:]}\0{list(meta.shape)}\0{self.digests[name]}".encode())
        return h.hexdigest()
