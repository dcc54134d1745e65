"""ModelSpec: what a model is, read from its config alone, without its weights.

Ops change a spec (sizes, eps, rotary) and the tensors that go with it; the plan is the spec after
every op, computed before any weight is read.

Configs arrive in every form transformers ever wrote (4.x: top-level `rope_theta` + `rope_scaling`,
Qwen2 sliding layers derived from `max_window_layers`; 5.x: `rope_parameters`, `layer_types`). A
spec holds the form transformers 5 reads, derived by transformers itself from the source config:
one `rope_parameters` section and explicit per-layer lists. Ops then change one place, and a
stale legacy key can never override what they wrote (transformers prefers `rope_scaling`).
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache

from .arch import Architecture, Axis, architecture_for, ARCHITECTURES
from .errors import SurgeryError
from .io.grown_tokenizer import NewToken
from .modeling import PATCHED_MODEL_TYPES

# Top-level keys transformers 5 folds into `rope_parameters` (and no longer writes).
LEGACY_ROPE_KEYS = ("rope_scaling", "rope_theta", "partial_rotary_factor")


def hf_config(config: dict):
    """The transformers config object for a config dict, built from a deep copy.

    transformers standardises rope dicts in place (adds rope_theta, rope_type, ...): handing it the
    spec's own nested dicts would change them behind the spec's back.
    """
    from transformers import AutoConfig

    return AutoConfig.for_model(**copy.deepcopy({k: v for k, v in config.items() if k != "auto_map"}))


@lru_cache(maxsize=None)
def attribute_map(model_type: str) -> dict[str, str]:
    """The older spellings transformers still reads for a family's config fields, each to the key it saves
    (transformers 5's Qwen3-MoE and Mixtral: num_experts -> num_local_experts)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return dict(getattr(CONFIG_MAPPING[model_type], "attribute_map", {})) if model_type in CONFIG_MAPPING else {}


def config_key(arch: Architecture, name: str) -> str:
    """The config.json key of the field surgery calls `name`, as transformers 5 saves it: the family's own name
    (T5's d_model), resolved through transformers' attribute_map."""
    name = arch.config_aliases.get(name, name)
    return attribute_map(arch.model_types[0]).get(name, name)


def saved_spellings(config: dict, arch: Architecture) -> list[str]:
    """Fields under an older spelling renamed in place to the key transformers saves them under; where both
    are present the saved one wins, as it does in transformers."""
    notes = []
    for old, new in attribute_map(arch.model_types[0]).items():
        if old not in config:
            continue
        value = config.pop(old)
        if new not in config:
            config[new] = value
            notes.append(f"{old} written as {new}, the key transformers 5 saves it under")
        elif config[new] != value:
            notes.append(f"{old} ({value!r}) dropped: transformers reads {new} ({config[new]!r})")
    return notes


def config_errors() -> tuple[type[Exception], ...]:
    """What transformers raises for a config it rejects (its strict dataclass validators raise their own type)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub
        return (ValueError, TypeError, KeyError)
    return (ValueError, TypeError, KeyError, StrictDataclassError)


def _first_line(e: Exception) -> str:
    cause = getattr(e, "__cause__", None) or e
    text = str(cause).strip()
    return text.splitlines()[-1] if text else type(cause).__name__


POSITIVE = re.compile(r"(rms_norm_eps|layer_norm_eps|layer_norm_epsilon|norm_eps|rope_theta)")


def _check_numbers(config: dict, where: str) -> None:
    """A NaN or infinite number anywhere in the config (JSON lets Python read them), or an eps or rope_theta at or below
    zero, gave NaN losses and a verification failure (exit 1) for what is bad input."""
    stack = [("", config)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            raise SurgeryError(f"config.json field {path!r} is {value}: not a finite number", where=where)
        elif POSITIVE.fullmatch(path.rsplit(".", 1)[-1]) and isinstance(value, (int, float)) and value <= 0:
            raise SurgeryError(f"config.json field {path!r} must be positive, got {value}", where=where)


@dataclass
class SpecMeta:
    """What the ops have done that the config does not say, carried from op to op."""

    added_tokens: list[NewToken] = field(default_factory=list)  # tokens grow_vocab gave rows, in id order
    source_vocab_size: int | None = None  # rows before the first grow_vocab: ids the source tokenizer may name
    layernorm_zero_padded: bool = False  # LayerNorm residual holds zero-padded dims awaiting patch_layernorm
    signal_width: int | None = None  # the residual's live prefix while the rest is zero-padded
    notes: list[str] = field(default_factory=list)  # what helpers shared by several ops say; the plan takes them
    standardised: list[str] = field(default_factory=list)  # how the source config was rewritten as transformers 5 reads it

    def take_notes(self) -> list[str]:
        """The notes, cleared: each is said once, by the step that caused it."""
        notes, self.notes = self.notes, []
        return notes


@dataclass
class ModelSpec:
    arch: Architecture
    config: dict
    # Width the norms are calibrated for; differs from hidden_size between a residual growth and
    # its rescale_norm.
    norm_width: int = 0
    # How the new residual dims are filled since the last rescale: "zero" | "mean" | "clone".
    residual_fill: str = "zero"
    meta: SpecMeta = field(default_factory=SpecMeta)

    @classmethod
    def from_config(cls, config: dict, where: str = "source") -> "ModelSpec":
        arch = architecture_for(PATCHED_MODEL_TYPES.get(config.get("model_type"), config.get("model_type")))
        if arch is None:
            known = ", ".join(sorted(ARCHITECTURES))
            raise SurgeryError(
                f"model_type {config.get('model_type')!r} is not supported; supported: {known}", where=where
            )
        config = copy.deepcopy(config)
        _check_numbers(config, where)
        renamed = saved_spellings(config, arch)
        for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
            key = config_key(arch, key)
            if not isinstance(config.get(key), int) or config[key] <= 0:
                raise SurgeryError(f"config.json field {key!r} must be a positive integer, got {config.get(key)!r}", where=where)
        if arch.is_moe:
            for key in (arch.inter_field, arch.experts_per_token_field, *arch.axis_fields.values()):
                key = config_key(arch, key)
                if not isinstance(config.get(key), int) or config[key] <= 0:
                    also = "".join(f" (or {old!r})" for old, new in attribute_map(arch.model_types[0]).items() if new == key)
                    raise SurgeryError(f"config.json field {key!r}{also} must be a positive integer, got {config.get(key)!r}",
                                       where=where)
            if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
                raise SurgeryError("dense MLP layers between the sparse ones (mlp_only_layers, decoder_sparse_step) "
                                   "are not supported; every layer must be a mixture of experts", where=where)
        spec = cls(arch=arch, config=config)
        if spec.config.get("model_type") in PATCHED_MODEL_TYPES:  # an output of patch_layernorm, read back
            spec.config["model_type"] = PATCHED_MODEL_TYPES[spec.config["model_type"]]
            spec.config.pop("auto_map", None)
            spec.config.pop("architectures", None)
        spec.meta.standardised = renamed + spec._standardise(where)
        if "tie_word_embeddings" not in spec.config:  # 4.x configs leave the class default out (Gemma, T5: tied)
            spec.config["tie_word_embeddings"] = bool(hf_config(spec.config).tie_word_embeddings)
        spec.norm_width = spec.config.get("surgery_norm_width", spec.hidden_size)
        return spec

    def _standardise(self, where: str) -> list[str]:
        """Rope settings and per-layer lists as transformers 5 resolves them, written explicitly."""
        try:
            hf = hf_config(self.config)
        except config_errors() as e:
            raise SurgeryError(f"transformers rejects this config: {_first_line(e)}", where=where) from None
        notes = []
        rope = getattr(hf, "rope_parameters", None)
        if rope:
            legacy = [k for k in LEGACY_ROPE_KEYS if k in self.config]
            if legacy or self.config.get("rope_parameters") != rope:
                for k in legacy:
                    del self.config[k]
                self.config["rope_parameters"] = copy.deepcopy(dict(rope))
                notes.append("rope settings written as one rope_parameters section, as transformers 5 reads them"
                             + (f" (was: {', '.join(legacy)})" if legacy else ""))
        for f in self.arch.layer_type_fields:
            types = getattr(hf, f, None)
            if isinstance(types, list) and self.config.get(f) != types:
                self.config[f] = list(types)
                notes.append(f"{f} written explicitly as transformers derives them, so they follow inserted layers")
        if notes:  # the rewritten config must mean what the source's did
            again = hf_config(self.config)
            same = getattr(again, "rope_parameters", None) == rope and all(
                getattr(again, f, None) == getattr(hf, f, None) for f in self.arch.layer_type_fields)
            assert same, f"standardising the config changed its meaning: {notes}"
        return notes

    def copy(self) -> "ModelSpec":
        return ModelSpec(self.arch, copy.deepcopy(self.config), self.norm_width, self.residual_fill, copy.deepcopy(self.meta))

    def key(self, name: str) -> str:
        """The config key of the field surgery calls `name` (`config_key`)."""
        return config_key(self.arch, name)

    # sizes -------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.config[self.key("hidden_size")]

    @property
    def num_heads(self) -> int:
        return self.config[self.key("num_attention_heads")]

    @property
    def num_kv_heads(self) -> int:
        return self.config.get("num_key_value_heads") or self.num_heads

    @property
    def head_dim(self) -> int:
        if self.arch.head_dim_field and self.config.get(self.arch.head_dim_field):
            return self.config[self.arch.head_dim_field]
        return self.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        """The MLP's width; in a mixture-of-experts family, each routed expert's."""
        return self.config[self.key(self.arch.inter_field)]

    @property
    def num_experts(self) -> int:
        """Routed experts per layer (1 for a dense MLP)."""
        field = self.arch.axis_fields.get(Axis.EXPERT)
        return self.config[self.key(field)] if field else 1

    @property
    def experts_per_token(self) -> int:
        f = self.arch.experts_per_token_field
        return self.config[self.key(f)] if f else 1

    @property
    def num_layers(self) -> int:
        return self.config[self.key("num_hidden_layers")]

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    @property
    def eps(self) -> float:
        return self.config[self.arch.eps_field]

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    @property
    def qk_norm(self) -> bool:
        if not self.arch.qk_norm:
            return False
        return not self.arch.qk_norm_field or bool(self.config.get(self.arch.qk_norm_field))

    @property
    def live_width(self) -> int | None:
        """Width the patched LayerNorm centres over (set by patch_layernorm)."""
        return self.config.get("surgery_live_width")

    @property
    def rope(self) -> dict:
        """The (single, standardised) rope_parameters section."""
        return self.config.setdefault("rope_parameters", {})

    def rope_sections(self) -> list[dict]:
        """Every rope_parameters dict: one, or one per layer type where transformers nests them (Gemma 3)."""
        rp = self.rope
        nested = [v for v in rp.values() if isinstance(v, dict)]
        return nested or [rp]

    def describe(self) -> str:
        s = (
            f"{self.arch.name}: hidden {self.hidden_size}, heads {self.num_heads}/{self.num_kv_heads} kv, "
            f"head_dim {self.head_dim}, mlp {self.intermediate_size}"
            + (f" x {self.num_experts} experts (top-{self.experts_per_token})" if self.arch.is_moe else "")
            + (f" + shared {self.config[self.key(self.arch.axis_fields[Axis.SHARED_INTER])]}"
               if Axis.SHARED_INTER in self.arch.axis_fields else "")
            + f", layers {self.num_layers}, vocab {self.vocab_size}"
        )
        if self.live_width:
            s += f", patched LayerNorm over {self.live_width}"
        return s

    # setters that keep the config consistent ---------------------------------------------
    def pin_head_dim(self) -> None:
        """Write a derived head_dim down before heads or hidden_size change (Llama-2 and Qwen2 configs omit it)."""
        if self.arch.head_dim_field and not self.config.get(self.arch.head_dim_field):
            self.config[self.arch.head_dim_field] = self.hidden_size // self.num_heads

    def set_heads(self, num_heads: int, num_kv_heads: int) -> None:
        self.pin_head_dim()
        self.config["num_attention_heads"] = num_heads
        self.config["num_key_value_heads"] = num_kv_heads

    def set_head_dim(self, head_dim: int) -> None:
        if self.arch.head_dim_field:
            self.config[self.arch.head_dim_field] = head_dim

    def set_hidden_size(self, hidden: int) -> None:
        self.pin_head_dim()
        self.config["hidden_size"] = hidden

    def set_intermediate_size(self, size: int) -> None:
        self.config[self.key(self.arch.inter_field)] = size

    def set_eps(self, eps: float) -> None:
        self.config[self.arch.eps_field] = eps

    def set_num_layers(self, n: int, inserted_after: list[int] | None = None, origin: list[int] | None = None) -> None:
        """Set the depth and keep per-layer config lists (`layer_types`) in step with the layers.

        `origin[i]` is the old layer that output layer i is, or is made from (a copy, or the
        neighbour a new block was placed next to): its entry is what layer i gets. Without it,
        `inserted_after` lists old layers each followed by one new block (-1: before layer 0), and
        with neither the old layers keep their place and new ones repeat the last entry.
        """
        old = self.num_layers
        if origin is None:
            after = sorted(inserted_after or [])
            origin, k = [], 0
            for j in range(-1, old):
                if j >= 0:
                    origin.append(j)
                while k < len(after) and after[k] == j:
                    origin.append(min(max(j, 0), old - 1))
                    k += 1
            origin = (origin + [old - 1] * n)[:n]
        if len(origin) != n or not all(0 <= j < old for j in origin):
            raise ValueError(f"origin must list {n} old layer indices in [0, {old}), got {origin}")
        self.config["num_hidden_layers"] = n
        for f in self.arch.layer_type_fields:
            types = self.config.get(f)
            if isinstance(types, list) and len(types) == old:
                self.config[f] = [types[j] for j in origin]
        self.sync_max_window_layers()

    def sync_max_window_layers(self) -> None:
        """`max_window_layers` (Qwen2, Qwen3, Qwen2-MoE) restated by the family's own rule (`Architecture.
        max_window_rule`) so that a reader deriving the layer types from it gets `layer_types`: kept where it
        still does, else the first value that does. Where none does (Qwen2-MoE slides only even layers) it is
        left; the explicit `layer_types` are what transformers 5 reads."""
        types, m = self.config.get("layer_types"), self.config.get("max_window_layers")
        if self.arch.max_window_rule is None or not isinstance(m, int) or not isinstance(types, list):
            return
        n = len(types)
        found = next((v for v in (m, *range(n + 1)) if self.arch.window_types(self.config, v, n) == types), None)
        if found is not None:
            self.config["max_window_layers"] = found
