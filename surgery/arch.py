"""Architectures as data: tensor names, their roles, and which axis means what.

Operators never mention `q_proj` or `StableLm`: they ask for "every tensor whose input axis is
the residual stream" or "the head axis of attn.q". Adding a family means adding a table here.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field


class TensorRole(str, enum.Enum):
    EMBED = "embed"
    LM_HEAD = "lm_head"
    ATTN_Q = "attn.q"
    ATTN_K = "attn.k"
    ATTN_V = "attn.v"
    ATTN_O = "attn.o"
    ATTN_Q_NORM = "attn.q_norm"
    ATTN_K_NORM = "attn.k_norm"
    MLP_GATE = "mlp.gate"
    MLP_UP = "mlp.up"
    MLP_DOWN = "mlp.down"
    NORM_ATTN = "norm.attn"
    NORM_MLP = "norm.mlp"
    NORM_FINAL = "norm.final"

    @property
    def is_norm(self) -> bool:
        return self in (TensorRole.NORM_ATTN, TensorRole.NORM_MLP, TensorRole.NORM_FINAL)


class Axis(str, enum.Enum):
    """What an axis of a tensor counts."""

    VOCAB = "vocab"
    RESID = "resid"  # the residual stream (hidden_size)
    Q = "q"  # num_heads x head_dim
    KV = "kv"  # num_kv_heads x head_dim
    INTER = "inter"  # MLP intermediate
    HEAD_DIM = "head_dim"  # one head's dims (per-head q/k norms)


R = TensorRole
# Axes of each (role, kind) in transformers' (out, in) layout. Writers of the residual are the
# tensors whose *first* axis is RESID (and the embedding, whose second is).
AXES: dict[tuple[TensorRole, str], tuple[Axis, ...]] = {
    (R.EMBED, "weight"): (Axis.VOCAB, Axis.RESID),
    (R.LM_HEAD, "weight"): (Axis.VOCAB, Axis.RESID),
    (R.ATTN_Q, "weight"): (Axis.Q, Axis.RESID),
    (R.ATTN_Q, "bias"): (Axis.Q,),
    (R.ATTN_K, "weight"): (Axis.KV, Axis.RESID),
    (R.ATTN_K, "bias"): (Axis.KV,),
    (R.ATTN_V, "weight"): (Axis.KV, Axis.RESID),
    (R.ATTN_V, "bias"): (Axis.KV,),
    (R.ATTN_O, "weight"): (Axis.RESID, Axis.Q),
    (R.ATTN_O, "bias"): (Axis.RESID,),
    (R.ATTN_Q_NORM, "weight"): (Axis.HEAD_DIM,),
    (R.ATTN_Q_NORM, "bias"): (Axis.HEAD_DIM,),
    (R.ATTN_K_NORM, "weight"): (Axis.HEAD_DIM,),
    (R.ATTN_K_NORM, "bias"): (Axis.HEAD_DIM,),
    (R.MLP_GATE, "weight"): (Axis.INTER, Axis.RESID),
    (R.MLP_GATE, "bias"): (Axis.INTER,),
    (R.MLP_UP, "weight"): (Axis.INTER, Axis.RESID),
    (R.MLP_UP, "bias"): (Axis.INTER,),
    (R.MLP_DOWN, "weight"): (Axis.RESID, Axis.INTER),
    (R.MLP_DOWN, "bias"): (Axis.RESID,),
    (R.NORM_ATTN, "weight"): (Axis.RESID,),
    (R.NORM_ATTN, "bias"): (Axis.RESID,),
    (R.NORM_MLP, "weight"): (Axis.RESID,),
    (R.NORM_MLP, "bias"): (Axis.RESID,),
    (R.NORM_FINAL, "weight"): (Axis.RESID,),
    (R.NORM_FINAL, "bias"): (Axis.RESID,),
}

WRITERS = (R.EMBED, R.ATTN_O, R.MLP_DOWN)


@dataclass(frozen=True)
class TensorInfo:
    """Where a parameter sits in the model: its role, weight or bias, layer and head."""

    role: TensorRole
    kind: str  # "weight" | "bias"
    layer: int | None = None
    head: int | None = None

    @property
    def axes(self) -> tuple[Axis, ...]:
        return AXES[(self.role, self.kind)]


@dataclass(frozen=True)
class Architecture:
    """One model family in transformers layout.

    `names` maps a role to its parameter prefix; `{L}` is the layer index, `{H}` a head index.
    """

    name: str
    model_types: tuple[str, ...]
    names: dict[TensorRole, str]
    norm: str  # "layernorm" | "rmsnorm"
    eps_field: str
    head_dim_field: str | None  # None: head_dim is hidden_size // num_heads (StableLM)
    rotary: str  # "partial" (NeoX, fixed rotary dims) | "full" (rotate_half over head_dim)
    qk_norm_field: str | None = None
    patched_class: str | None = None  # class shipped for patch_layernorm
    layer_type_fields: tuple[str, ...] = ()  # per-layer config lists that follow num_layers
    extra_bias_flags: tuple[str, ...] = field(default_factory=tuple)

    def parameter_name(self, role: TensorRole, kind: str, layer: int | None = None, head: int | None = None) -> str:
        prefix = self.names[role].replace("{L}", str(layer)).replace("{H}", str(head))
        return f"{prefix}.{kind}"

    def classify(self, name: str) -> TensorInfo | None:
        for role, rx in self._patterns():
            m = rx.fullmatch(name)
            if m:
                layer = int(m.group("L")) if "L" in rx.groupindex else None
                head = int(m.group("H")) if "H" in rx.groupindex else None
                return TensorInfo(role, m.group("kind"), layer, head)
        return None

    def _patterns(self):
        cached = _PATTERN_CACHE.get(self.name)
        if cached is None:
            cached = []
            for role, prefix in self.names.items():
                rx = re.escape(prefix).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{H\}", r"(?P<H>\d+)")
                cached.append((role, re.compile(rx + r"\.(?P<kind>weight|bias)")))
            _PATTERN_CACHE[self.name] = cached
        return cached


_PATTERN_CACHE: dict[str, list] = {}

_DECODER = {
    R.EMBED: "model.embed_tokens",
    R.LM_HEAD: "lm_head",
    R.ATTN_Q: "model.layers.{L}.self_attn.q_proj",
    R.ATTN_K: "model.layers.{L}.self_attn.k_proj",
    R.ATTN_V: "model.layers.{L}.self_attn.v_proj",
    R.ATTN_O: "model.layers.{L}.self_attn.o_proj",
    R.MLP_GATE: "model.layers.{L}.mlp.gate_proj",
    R.MLP_UP: "model.layers.{L}.mlp.up_proj",
    R.MLP_DOWN: "model.layers.{L}.mlp.down_proj",
    R.NORM_ATTN: "model.layers.{L}.input_layernorm",
    R.NORM_MLP: "model.layers.{L}.post_attention_layernorm",
    R.NORM_FINAL: "model.norm",
}

LLAMA_LIKE = dict(norm="rmsnorm", eps_field="rms_norm_eps", head_dim_field="head_dim", rotary="full")

ARCHITECTURES: dict[str, Architecture] = {
    "stablelm": Architecture(
        name="stablelm",
        model_types=("stablelm",),
        names={
            **_DECODER,
            R.ATTN_Q_NORM: "model.layers.{L}.self_attn.q_layernorm.norms.{H}",
            R.ATTN_K_NORM: "model.layers.{L}.self_attn.k_layernorm.norms.{H}",
        },
        norm="layernorm",
        eps_field="layer_norm_eps",
        head_dim_field=None,
        rotary="partial",
        qk_norm_field="qk_layernorm",
        patched_class="SurgeryStableLmForCausalLM",
    ),
    "llama": Architecture(name="llama", model_types=("llama",), names=dict(_DECODER), **LLAMA_LIKE),
    "mistral": Architecture(name="mistral", model_types=("mistral",), names=dict(_DECODER), **LLAMA_LIKE),
    "qwen2": Architecture(
        name="qwen2",
        model_types=("qwen2",),
        names=dict(_DECODER),
        layer_type_fields=("layer_types",),
        **LLAMA_LIKE,
    ),
}


def architecture_for(model_type: str | None) -> Architecture | None:
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    return None
