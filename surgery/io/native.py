"""Reading Mistral's native release layout in place, without a separate conversion step.

A native folder holds `params.json` (`native_params`), the weights as `consolidated.safetensors`
(newer releases) or `consolidated.NN.pth` (plain pickled state dicts), and a tokenizer
(`tekken.json` or a sentencepiece `tokenizer.model[.vN]`, read by `tokenizer.py` with the libraries
that own them; its bos/eos/pad ids go into the config).

`NativeCheckpoint` poses as a transformers checkpoint (`Checkpoint`'s interface: `.config` a
MistralConfig-style dict, `.tensors` transformers names and shapes, `.load(name)` one tensor in
transformers layout), so every op works on a native source unchanged. wq and wk rows are permuted
to transformers' rotary order, and the slices of multi-file releases concatenated (`native_layout`);
replicated norms are taken from the first file (and the others must equal it), and a tensor found
in exactly one file is taken as it is (releases whose files split the model by module).

`.pth` files are opened with `torch.load(weights_only=True, mmap=True)` (`load_pickle`): nothing
in them can run code, and tensors stay on disk until an op reads them, so memory stays flat.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SurgeryError
from .checkpoint import _ST_DTYPES, TensorMeta, load_pickle, read_safetensors_header
from .native_layout import (CONCAT_DIM, GLOBAL_NAMES, LAYER_NAMES, NATIVE_LAYER_RX, WEIGHTS_FILE, layer_suffix, native_to_hf,
                            to_hf_rotary)
from .native_params import PARAMS_FILE, params_to_config, read_params
from .tokenizer import special_token_ids


@dataclass
class _Entry:
    native: str
    files: list[Path]  # one file, or every file holding a slice
    dim: int | None  # concatenation axis when sliced; None: single or replicated


def weight_files(path: Path) -> list[Path]:
    single = path / WEIGHTS_FILE
    if single.is_file():
        return [single]
    shards = sorted(path.glob("consolidated*.safetensors"), key=_natural)
    if shards:
        return shards
    return sorted(path.glob("consolidated*.pth"), key=_natural)


def _natural(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


class NativeCheckpoint:
    """A Mistral native folder seen as a transformers Mistral checkpoint (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise SurgeryError("source directory does not exist", where=str(self.path))
        self.params_file = self.path / PARAMS_FILE
        if not self.params_file.is_file():
            raise SurgeryError("no params.json: not a Mistral native checkpoint directory", where=str(self.path))
        self.params, self.passthrough = read_params(self.params_file)
        self.tensors: dict[str, TensorMeta] = {}
        self._entries: dict[str, _Entry] = {}  # transformers name -> where its native slices are
        self._pickles: dict[Path, dict] = {}
        self._open: dict[Path, object] = {}
        self._index()
        emb = self.tensors["model.embed_tokens.weight"].dtype
        self.config = params_to_config(self.params, emb)
        self.config.update(special_token_ids(self.path))  # params.json has no token ids

    # index -------------------------------------------------------------------------------
    def _file_tensors(self, f: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if f.suffix == ".safetensors":
            out = {}
            for name, info in read_safetensors_header(f).items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _ST_DTYPES:
                    raise SurgeryError(f"tensor {name!r} has unsupported dtype {info['dtype']}", where=str(f))
                out[name] = (tuple(info["shape"]), _ST_DTYPES[info["dtype"]])
            return out
        sd = load_pickle(f)
        if not all(isinstance(k, str) for k in sd):
            raise SurgeryError("state dict keys must be tensor names (strings)", where=str(f))
        self._pickles[f] = sd
        return {name: (tuple(t.shape), t.dtype) for name, t in sd.items()}

    def _index(self) -> None:
        files = weight_files(self.path)
        if not files:
            raise SurgeryError("no weights found (consolidated.safetensors or consolidated.NN.pth)", where=str(self.path))
        per_file = {f: self._file_tensors(f) for f in files}
        holders: dict[str, list[Path]] = {}
        for f, names in per_file.items():
            for n in names:
                holders.setdefault(n, []).append(f)
        unknown = sorted(n for n in holders if native_to_hf(n) is None)
        if unknown:
            hint = " (mixture-of-experts weights are not supported)" if any("expert" in n or ".gate." in n for n in unknown) else ""
            raise SurgeryError(f"{len(unknown)} tensor(s) that are not Mistral native weights{hint}, e.g. {unknown[0]!r}",
                               where=str(self.path))
        p = self.params
        n_files = len(files)
        for native, fs in holders.items():
            shapes = [per_file[f][native][0] for f in fs]
            dtypes = {per_file[f][native][1] for f in fs}
            if len(fs) == 1:
                shape, dim = shapes[0], None
            elif len(fs) != n_files:
                raise SurgeryError(f"tensor {native!r} is in {', '.join(f.name for f in fs)} but not in every weight file: "
                                   f"neither one whole tensor nor one slice per file", where=str(self.path))
            else:
                if len(dtypes) > 1:
                    raise SurgeryError(f"tensor {native!r} has slices of different dtypes across files", where=str(self.path))
                dim = CONCAT_DIM[layer_suffix(native)]
                if dim is None:
                    if len(set(shapes)) > 1:
                        raise SurgeryError(f"replicated tensor {native!r} has different shapes across files: {shapes}",
                                           where=str(self.path))
                    shape = shapes[0]
                else:
                    rank = {len(s) for s in shapes}
                    if rank != {2} or len({s[1 - dim] for s in shapes}) > 1:
                        raise SurgeryError(f"slices of {native!r} do not concatenate along dim {dim}: {shapes}", where=str(self.path))
                    shape = tuple(sum(s[dim] for s in shapes) if a == dim else shapes[0][a] for a in range(2))
            hf = native_to_hf(native)
            self._check_shape(native, shape, fs)
            self._entries[hf] = _Entry(native, fs, dim)
            self.tensors[hf] = TensorMeta(shape, dtypes.pop(), fs[0])
        need = list(GLOBAL_NAMES) + [f"layers.{i}.{s}" for i in range(p["n_layers"]) for s in LAYER_NAMES]
        missing = [n for n in need if native_to_hf(n) not in self.tensors]
        if missing:
            raise SurgeryError(f"missing tensor {missing[0]!r} ({len(missing)} missing in all) for n_layers={p['n_layers']}",
                               where=str(self.path))

    def _check_shape(self, native: str, shape: tuple[int, ...], files: list[Path]) -> None:
        p = self.params
        m = NATIVE_LAYER_RX.fullmatch(native)
        if m and int(m.group(1)) >= p["n_layers"]:
            raise SurgeryError(f"tensor {native!r} is beyond n_layers={p['n_layers']}", where=str(self.params_file))
        d, q, kv, h, v = p["dim"], p["n_heads"] * p["head_dim"], p["n_kv_heads"] * p["head_dim"], p["hidden_dim"], p["vocab_size"]
        fields_q = f"n_heads={p['n_heads']} x head_dim={p['head_dim']}"
        fields_kv = f"n_kv_heads={p['n_kv_heads']} x head_dim={p['head_dim']}"
        expect = {
            "tok_embeddings.weight": ((v, d), f"vocab_size={v}, dim={d}"),
            "output.weight": ((v, d), f"vocab_size={v}, dim={d}"),
            "norm.weight": ((d,), f"dim={d}"),
            "attention.wq.weight": ((q, d), f"{fields_q}, dim={d}"),
            "attention.wk.weight": ((kv, d), f"{fields_kv}, dim={d}"),
            "attention.wv.weight": ((kv, d), f"{fields_kv}, dim={d}"),
            "attention.wo.weight": ((d, q), f"dim={d}, {fields_q}"),
            "feed_forward.w1.weight": ((h, d), f"hidden_dim={h}, dim={d}"),
            "feed_forward.w3.weight": ((h, d), f"hidden_dim={h}, dim={d}"),
            "feed_forward.w2.weight": ((d, h), f"dim={d}, hidden_dim={h}"),
            "attention_norm.weight": ((d,), f"dim={d}"),
            "ffn_norm.weight": ((d,), f"dim={d}"),
        }
        want, fields = expect[layer_suffix(native)]
        if tuple(shape) != want:
            src = files[0].name if len(files) == 1 else f"{len(files)} files concatenated"
            raise SurgeryError(f"tensor {native!r} ({src}) has shape {list(shape)} but params.json ({fields}) implies {list(want)}",
                               where=str(self.params_file))

    # reading -----------------------------------------------------------------------------
    def _read(self, f: Path, native: str) -> torch.Tensor:
        if f in self._pickles:
            return self._pickles[f][native]
        h = self._open.get(f)
        if h is None:
            from safetensors import safe_open

            h = self._open[f] = safe_open(str(f), framework="pt")
        return h.get_tensor(native)

    def load_native(self, native: str) -> torch.Tensor:
        """One tensor as the release defines it (slices concatenated), native layout."""
        hf = native_to_hf(native)
        e = self._entries[hf]
        if len(e.files) == 1:
            return self._read(e.files[0], native)
        parts = [self._read(f, native) for f in e.files]
        if e.dim is None:
            for f, t in zip(e.files[1:], parts[1:]):
                if not torch.equal(t, parts[0]):
                    raise SurgeryError(f"replicated tensor {native!r} differs between {e.files[0].name} and {f.name}",
                                       where=str(self.path))
            return parts[0]
        return torch.cat(parts, dim=e.dim)

    def load(self, name: str) -> torch.Tensor:
        e = self._entries[name]
        t = self.load_native(e.native)
        p = self.params
        if e.native.endswith("attention.wq.weight"):
            return to_hf_rotary(t, p["n_heads"], p["head_dim"])
        if e.native.endswith("attention.wk.weight"):
            return to_hf_rotary(t, p["n_kv_heads"], p["head_dim"])
        return t

    def files(self) -> list[Path]:
        return sorted({f for e in self._entries.values() for f in e.files})
