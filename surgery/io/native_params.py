"""Mistral's `params.json`: read and validated, as a transformers config, and written for a model spec.

A native folder holds `params.json` (dim, n_layers, head_dim, hidden_dim, n_heads, n_kv_heads,
norm_eps, sliding_window, vocab_size, sometimes rope_theta and max_seq_len) and no `config.json`.
Fields surgery cannot carry are refused rather than dropped.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SurgeryError

if TYPE_CHECKING:
    import torch

PARAMS_FILE = "params.json"

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
