"""ModelSpec: what a model is, read from its config alone, without its weights.

Ops change a spec (sizes, eps, rotary) and the tensors that go with it; the plan is the spec after
every op, computed before any weight is read.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .arch import Architecture, Axis, architecture_for, ARCHITECTURES
from .errors import SurgeryError


@dataclass
class ModelSpec:
    arch: Architecture
    config: dict
    # Width the norms are calibrated for; differs from hidden_size between a residual growth and
    # its rescale_norm.
    norm_width: int = 0
    # How the new residual dims are filled since the last rescale: "zero" | "mean" | "clone".
    residual_fill: str = "zero"
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: dict, where: str = "source") -> "ModelSpec":
        arch = architecture_for(config.get("model_type"))
        if arch is None:
            known = ", ".join(sorted(ARCHITECTURES))
            raise SurgeryError(
                f"model_type {config.get('model_type')!r} is not supported; supported: {known}", where=where
            )
        for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
            if not isinstance(config.get(key), int) or config[key] <= 0:
                raise SurgeryError(f"config.json field {key!r} must be a positive integer, got {config.get(key)!r}", where=where)
        if arch.is_moe:
            for key in (arch.inter_field, arch.experts_per_token_field, *arch.axis_fields.values()):
                if not isinstance(config.get(key), int) or config[key] <= 0:
                    raise SurgeryError(f"config.json field {key!r} must be a positive integer, got {config.get(key)!r}",
                                       where=where)
            if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
                raise SurgeryError("dense MLP layers between the sparse ones (mlp_only_layers, decoder_sparse_step) "
                                   "are not supported; every layer must be a mixture of experts", where=where)
        spec = cls(arch=arch, config=copy.deepcopy(config))
        spec.norm_width = spec.config.get("surgery_norm_width", spec.hidden_size)
        return spec

    def copy(self) -> "ModelSpec":
        return ModelSpec(self.arch, copy.deepcopy(self.config), self.norm_width, self.residual_fill, copy.deepcopy(self.meta))

    # sizes -------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.config["hidden_size"]

    @property
    def num_heads(self) -> int:
        return self.config["num_attention_heads"]

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
        return self.config[self.arch.inter_field]

    @property
    def num_experts(self) -> int:
        """Routed experts per layer (1 for a dense MLP)."""
        field = self.arch.axis_fields.get(Axis.EXPERT)
        return self.config[field] if field else 1

    @property
    def experts_per_token(self) -> int:
        f = self.arch.experts_per_token_field
        return self.config[f] if f else 1

    @property
    def num_layers(self) -> int:
        return self.config["num_hidden_layers"]

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
        return bool(self.arch.qk_norm_field and self.config.get(self.arch.qk_norm_field))

    @property
    def live_width(self) -> int | None:
        """Width the patched LayerNorm centres over (set by patch_layernorm)."""
        return self.config.get("surgery_live_width")

    @property
    def rope(self) -> dict:
        rp = self.config.get("rope_parameters")
        if rp is None:
            rp = {"rope_theta": self.config.get("rope_theta", 10000.0), "rope_type": "default"}
            self.config["rope_parameters"] = rp
        return rp

    def rope_value(self, key: str):
        """A rope setting as transformers resolves it: rope_parameters first, then the legacy top-level key."""
        rp = self.config.get("rope_parameters")
        if isinstance(rp, dict) and key in rp:
            return rp[key]
        return self.config.get(key)

    def set_rope_value(self, key: str, value) -> None:
        self.rope[key] = value
        if key in self.config:  # a legacy top-level copy: keep it consistent
            self.config[key] = value

    def describe(self) -> str:
        s = (
            f"{self.arch.name}: hidden {self.hidden_size}, heads {self.num_heads}/{self.num_kv_heads} kv, "
            f"head_dim {self.head_dim}, mlp {self.intermediate_size}"
            + (f" x {self.num_experts} experts (top-{self.experts_per_token})" if self.arch.is_moe else "")
            + (f" + shared {self.config[self.arch.axis_fields[Axis.SHARED_INTER]]}"
               if Axis.SHARED_INTER in self.arch.axis_fields else "")
            + f", layers {self.num_layers}, vocab {self.vocab_size}"
        )
        if self.live_width:
            s += f", patched LayerNorm over {self.live_width}"
        return s

    # setters that keep the config consistent ---------------------------------------------
    def set_heads(self, num_heads: int, num_kv_heads: int) -> None:
        self.config["num_attention_heads"] = num_heads
        self.config["num_key_value_heads"] = num_kv_heads

    def set_head_dim(self, head_dim: int) -> None:
        if self.arch.head_dim_field:
            self.config[self.arch.head_dim_field] = head_dim

    def set_hidden_size(self, hidden: int) -> None:
        self.config["hidden_size"] = hidden

    def set_intermediate_size(self, size: int) -> None:
        self.config[self.arch.inter_field] = size

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
