"""Mistral's native release layout, read and written without a separate conversion step.

A native folder holds `params.json` (dim, n_layers, head_dim, hidden_dim, n_heads, n_kv_heads,
norm_eps, sliding_window, vocab_size, sometimes rope_theta and max_seq_len), the weights as
`consolidated.safetensors` (newer releases) or `consolidated.NN.pth` (plain pickled state dicts),
and a tokenizer (`tekken.json` or a sentencepiece `tokenizer.model[.vN]`, read by `tokenizer.py`
with the libraries that own them; its bos/eos/pad ids go into the config). No `config.json`.

`NativeCheckpoint` poses as a transformers checkpoint (`Checkpoint`'s interface: `.config` a
MistralConfig-style dict, `.tensors` transformers names and shapes, `.load(name)` one tensor in
transformers layout), so every op works on a native source unchanged. Two layout differences:

* Rotary embedding. Native code rotates interleaved pairs (dims 2i, 2i+1 of a head); transformers'
  `rotate_half` rotates (i, i + head_dim/2). The rows of wq and wk are permuted per head to match:
  native row 2i+j of a head becomes transformers row j*head_dim/2 + i. wq has n_heads heads, wk has
  n_kv_heads heads (the common bug uses n_heads for wk, which scrambles the kv heads under GQA).
  wv, wo and the rest are not rotated and are not permuted.
* Multi-file releases. When a tensor appears in every `consolidated.NN.pth` (one slice per
  model-parallel rank), the slices are concatenated by the native rules, as the reference
  converter (transformers' convert_mistral_weights_to_hf.py) does: along the input axis (dim 1) for
  tok_embeddings, wo and w2; along the output axis (dim 0) for wq, wk, wv, w1, w3 and output; the
  norms are replicated, so the first copy is taken (and the others must equal it). A tensor found
  in exactly one file is taken as it is (releases whose files split the model by module).

`.pth` files are opened with `torch.load(weights_only=True, mmap=True)` (`load_pickle`): nothing
in them can run code, and tensors stay on disk until an op reads them, so memory stays flat.

`write_native` writes `consolidated.safetensors` (streamed, one tensor in memory at a time, with
the inverse permutation), `params.json` describing the possibly grown model, and copies
`tokenizer.model`. Permutations are pure index moves, so native -> hf -> native is bit-exact.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SurgeryError
from .checkpoint import _ST_DTYPES, TensorMeta, load_pickle, read_safetensors_header
from .tokenizer import special_token_ids

PARAMS_FILE = "params.json"
WEIGHTS_FILE = "consolidated.safetensors"

# rope_theta when params.json has none. Mistral-7B-v0.1, the release that omits the field, was
# trained with 10000 (its reference code's default, and the default of transformers' converter).
# Later releases write rope_theta explicitly (1e6); mistral-inference falls back to 1e6 instead,
# which would mis-rotate v0.1. We follow the converter, and always write the field on output.
DEFAULT_ROPE_THETA = 10000.0
# max_position_embeddings when params.json has no max_seq_len (transformers' converter default).
DEFAULT_MAX_SEQ_LEN = 32768

REQUIRED_INT = ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size")
OPTIONAL_INT = ("head_dim", "n_kv_heads", "max_seq_len")
# Fields with no effect on the weights or the function: carried verbatim into a native output.
PASSTHROUGH = ("max_batch_size",)
# Fields that change the architecture in ways this reader does not implement.
UNSUPPORTED = {
    "moe": "mixture-of-experts (Mixtral) layers",
    "vision_encoder": "a vision encoder (Pixtral)",
    "lora": "LoRA adapter weights",
    "quantization": "quantized weights",
    "yarn": "YaRN rope scaling",
    "use_scaled_rope": "scaled rope (Llama 3.1 style)",
}

_GLOBAL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_GLOBAL = {v: k for k, v in _GLOBAL.items()}
_HF_LAYER = {v: k for k, v in _LAYER.items()}
_NATIVE_LAYER_RX = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER_RX = re.compile(r"model\.layers\.(\d+)\.(.+)")

# Concatenation axis of a tensor sliced across model-parallel files (None: replicated).
_CONCAT_DIM = {
    "tok_embeddings.weight": 1, "output.weight": 0, "norm.weight": None,
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0, "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "feed_forward.w2.weight": 1,
    "attention_norm.weight": None, "ffn_norm.weight": None,
}


def native_to_hf(name: str) -> str | None:
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _NATIVE_LAYER_RX.fullmatch(name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def hf_to_native(name: str) -> str | None:
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name]
    m = _HF_LAYER_RX.fullmatch(name)
    if m and m.group(2) in _HF_LAYER:
        return f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
    return None


def _suffix(native: str) -> str:
    m = _NATIVE_LAYER_RX.fullmatch(native)
    return m.group(2) if m else native


# rotary layout -----------------------------------------------------------------------------

def to_hf_rotary(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Native interleaved-pair rows of wq/wk -> transformers rotate_half rows, head by head."""
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)


def to_native_rotary(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Inverse of `to_hf_rotary`."""
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)


# params.json -------------------------------------------------------------------------------

def is_native(path) -> bool:
    """A directory in Mistral's native layout: params.json and no config.json.

    The weights are not required here so that a native folder missing them gets NativeCheckpoint's
    precise error ("no consolidated.safetensors or consolidated.NN.pth") rather than "no config.json".
    """
    p = Path(path)
    return p.is_dir() and (p / PARAMS_FILE).is_file() and not (p / "config.json").exists()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_params(path: Path) -> tuple[dict, dict]:
    """Validated params.json: (the fields surgery models, the passthrough fields)."""
    where = str(path)
    try:
        raw = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise SurgeryError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}", where=where) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SurgeryError(f"cannot read params.json: {e}", where=where) from None
    if not isinstance(raw, dict):
        raise SurgeryError(f"params.json must be a JSON object, got {type(raw).__name__}", where=where)

    def bad(field: str, want: str) -> SurgeryError:
        return SurgeryError(f"field {field!r} must be {want}, got {raw[field]!r} ({type(raw[field]).__name__})", where=where)

    for key, what in UNSUPPORTED.items():
        if key in raw and raw[key] not in (None, False, {}):
            raise SurgeryError(f"field {key!r}: {what} are not supported by surgery", where=where)
    if raw.get("tied_embeddings") not in (None, False):
        raise SurgeryError("field 'tied_embeddings': tied native checkpoints are not supported", where=where)
    if raw.get("model_type") not in (None, "transformer"):
        raise SurgeryError(f"field 'model_type': {raw['model_type']!r} models are not supported (only 'transformer')", where=where)
    known = set(REQUIRED_INT) | set(OPTIONAL_INT) | set(PASSTHROUGH) | set(UNSUPPORTED) | {
        "norm_eps", "sliding_window", "rope_theta", "tied_embeddings", "model_type"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SurgeryError(
            f"unknown field {unknown[0]!r}: surgery refuses fields it cannot carry rather than dropping what they change; "
            f"understood: {', '.join(sorted(set(REQUIRED_INT) | set(OPTIONAL_INT) | {'norm_eps', 'sliding_window', 'rope_theta'}))}",
            where=where,
        )

    for key in REQUIRED_INT + ("norm_eps",):
        if key not in raw:
            raise SurgeryError(f"missing field {key!r}", where=where)
    params: dict = {}
    for key in REQUIRED_INT + OPTIONAL_INT:
        if key in raw and raw[key] is not None:
            if not _is_int(raw[key]) or raw[key] <= 0:
                raise bad(key, "a positive integer")
            params[key] = raw[key]
    if not _is_number(raw["norm_eps"]) or raw["norm_eps"] <= 0:
        raise bad("norm_eps", "a positive number")
    params["norm_eps"] = raw["norm_eps"]
    if raw.get("rope_theta") is not None:
        if not _is_number(raw["rope_theta"]) or raw["rope_theta"] <= 0:
            raise bad("rope_theta", "a positive number")
        params["rope_theta"] = raw["rope_theta"]
    sw = raw.get("sliding_window")
    if isinstance(sw, str) and sw.strip().isdigit():  # some releases write it as a string
        sw = int(sw)
    if sw is not None:
        if isinstance(sw, list):
            raise SurgeryError("field 'sliding_window': per-layer windows (a list) are not supported", where=where)
        if not _is_int(sw) or sw <= 0:
            raise bad("sliding_window", "a positive integer or null")
        params["sliding_window"] = sw

    params.setdefault("n_kv_heads", params["n_heads"])
    params.setdefault("head_dim", params["dim"] // params["n_heads"])
    if "head_dim" not in raw and params["dim"] % params["n_heads"]:
        raise SurgeryError(f"field 'head_dim' is missing and dim {params['dim']} is not a multiple of n_heads {params['n_heads']}",
                           where=where)
    if params["n_heads"] % params["n_kv_heads"]:
        raise SurgeryError(f"field 'n_kv_heads' ({params['n_kv_heads']}) must divide n_heads ({params['n_heads']})", where=where)
    if params["head_dim"] % 2:
        raise SurgeryError(f"field 'head_dim' ({params['head_dim']}) must be even: rotary embeddings rotate pairs", where=where)
    passthrough = {k: raw[k] for k in PASSTHROUGH if k in raw}
    return params, passthrough


def params_to_config(params: dict, dtype: torch.dtype | None = None) -> dict:
    """A transformers MistralConfig-style dict for these params."""
    config = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": params["vocab_size"],
        "hidden_size": params["dim"],
        "intermediate_size": params["hidden_dim"],
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": params["n_heads"],
        "num_key_value_heads": params["n_kv_heads"],
        "head_dim": params["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": params.get("max_seq_len", DEFAULT_MAX_SEQ_LEN),
        "initializer_range": 0.02,
        "rms_norm_eps": params["norm_eps"],
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_theta": float(params.get("rope_theta", DEFAULT_ROPE_THETA)), "rope_type": "default"},
        "sliding_window": params.get("sliding_window"),
        "attention_dropout": 0.0,
    }
    if dtype is not None:
        config["dtype"] = str(dtype).replace("torch.", "")
    return config


def native_params(spec, passthrough: dict | None = None) -> dict:
    """params.json for a model spec (native field order), or a SurgeryError naming what native code cannot run."""
    cfg = spec.config
    why = []
    if spec.arch.name not in ("mistral", "llama"):
        why.append(f"architecture {spec.arch.name}")
    if spec.arch.norm != "rmsnorm":
        why.append("LayerNorm")
    if cfg.get("hidden_act", "silu") != "silu":
        why.append(f"activation {cfg.get('hidden_act')}")
    if spec.live_width:
        why.append("a patched LayerNorm")
    rope = spec.rope
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        why.append(f"rope {rope}")
    if spec.head_dim % 2:
        why.append(f"odd head_dim {spec.head_dim}")
    if why:
        raise SurgeryError(f"Mistral's native format cannot express {', '.join(why)}; write format: hf", where="output.format")
    params = {
        "dim": spec.hidden_size,
        "n_layers": spec.num_layers,
        "head_dim": spec.head_dim,
        "hidden_dim": spec.intermediate_size,
        "n_heads": spec.num_heads,
        "n_kv_heads": spec.num_kv_heads,
        "norm_eps": spec.eps,
    }
    if cfg.get("sliding_window") is not None and cfg.get("use_sliding_window", True):
        params["sliding_window"] = cfg["sliding_window"]
    params["vocab_size"] = spec.vocab_size
    params["rope_theta"] = float(rope.get("rope_theta", DEFAULT_ROPE_THETA))
    mpe = cfg.get("max_position_embeddings")
    if mpe and mpe != DEFAULT_MAX_SEQ_LEN:
        params["max_seq_len"] = mpe
    params.update(passthrough or {})
    return params


# reading -----------------------------------------------------------------------------------

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
                dim = _CONCAT_DIM[_suffix(native)]
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
        need = list(_GLOBAL) + [f"layers.{i}.{s}" for i in range(p["n_layers"]) for s in _LAYER]
        missing = [n for n in need if native_to_hf(n) not in self.tensors]
        if missing:
            raise SurgeryError(f"missing tensor {missing[0]!r} ({len(missing)} missing in all) for n_layers={p['n_layers']}",
                               where=str(self.path))

    def _check_shape(self, native: str, shape: tuple[int, ...], files: list[Path]) -> None:
        p = self.params
        m = _NATIVE_LAYER_RX.fullmatch(native)
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
        want, fields = expect[_suffix(native)]
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


# writing -----------------------------------------------------------------------------------

def write_native(state, reader, out_dir: Path, device: torch.device, dtype: str = "auto",
                 progress: bool = False) -> dict[str, str]:
    """consolidated.safetensors + params.json (+ tokenizer.model copied) for `state`; returns each tensor's digest (`io.digest`)."""
    from tqdm import tqdm

    from ..arch import TensorRole as R
    from ..execute import FiniteReader, compute_dtype_for, output_tensors, streaming_threads
    from ..lazy import evaluate
    from .writer import PlannedTensor, ShardWriter

    spec = state.spec
    params = native_params(spec, getattr(reader, "passthrough", None))
    biases = [n for n, info, _ in state.items() if info.kind != "weight"]
    if biases:
        raise SurgeryError(f"Mistral's native format has no biases, but the model has {len(biases)} (e.g. {biases[0]!r}); "
                           f"write format: hf", where="output.format")
    jobs: dict[str, tuple] = {}
    for name, node, d in output_tensors(state, dtype):
        info = state.info(name)
        native = hf_to_native(name)
        if native is None:
            raise SurgeryError(f"tensor {name!r} has no place in Mistral's native format; write format: hf", where="output.format")
        heads = {R.ATTN_Q: spec.num_heads, R.ATTN_K: spec.num_kv_heads}.get(info.role)
        jobs[native] = (node, d, heads)
        if info.role == R.EMBED and spec.tied:  # native checkpoints always hold their output matrix
            jobs["output.weight"] = (node, d, None)
    planned = [PlannedTensor(n, node.shape, d) for n, (node, d, _) in jobs.items()]
    cd = compute_dtype_for(state)
    finite = FiniteReader(reader)  # NaN/Inf source tensors are refused by name, as write_weights does
    out_dir = Path(out_dir)
    writer = ShardWriter(out_dir / WEIGHTS_FILE, planned)
    digests: dict[str, str] = {}
    bar = tqdm(total=sum(p.nbytes for p in planned), unit="B", unit_scale=True, desc="writing",
               disable=not (progress and sys.stderr.isatty()), leave=False)
    try:
        with streaming_threads(busy=1):  # the hashing thread
            for p in planned:
                node, d, heads = jobs[p.name]
                t = evaluate(node, finite, device, cd)
                if heads is not None:
                    t = to_native_rotary(t, heads, spec.head_dim)
                writer.write(p.name, t.to(dtype=d) if t.is_floating_point() else t)
                bar.update(p.nbytes)
        writer.close()
        digests.update(writer.digests)
    finally:
        bar.close()
        writer.abort()
    (out_dir / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")
    src = getattr(reader, "path", None)
    if src is not None and Path(src).is_dir():
        for f in sorted(Path(src).glob("tokenizer.model*")):
            shutil.copyfile(f, out_dir / f.name)
    return digests
