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
    MOE_ROUTER = "moe.router"  # router (Mixtral block_sparse_moe.gate): expert logits from the residual
    SHARED_GATE = "shared.gate"  # Qwen2-MoE shared expert, always on
    SHARED_UP = "shared.up"
    SHARED_DOWN = "shared.down"
    SHARED_ROUTER = "shared.router"  # Qwen2-MoE shared_expert_gate: sigmoid gate of the shared expert

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
    EXPERT = "expert"  # routed experts (router rows)
    SHARED_INTER = "shared_inter"  # the shared expert's intermediate
    ONE = "one"  # a single output (the shared expert's gate): nothing grows it


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
    (R.MOE_ROUTER, "weight"): (Axis.EXPERT, Axis.RESID),
    (R.SHARED_GATE, "weight"): (Axis.SHARED_INTER, Axis.RESID),
    (R.SHARED_UP, "weight"): (Axis.SHARED_INTER, Axis.RESID),
    (R.SHARED_DOWN, "weight"): (Axis.RESID, Axis.SHARED_INTER),
    (R.SHARED_ROUTER, "weight"): (Axis.ONE, Axis.RESID),
}

WRITERS = (R.EMBED, R.ATTN_O, R.MLP_DOWN, R.SHARED_DOWN)
MLP_ROLES = (R.MLP_GATE, R.MLP_UP, R.MLP_DOWN)
MOE_ROLES = (R.MOE_ROUTER, R.SHARED_GATE, R.SHARED_UP, R.SHARED_DOWN, R.SHARED_ROUTER)


@dataclass(frozen=True)
class TensorInfo:
    """Where a parameter sits in the model: its role, weight or bias, layer and head."""

    role: TensorRole
    kind: str  # "weight" | "bias"
    layer: int | None = None
    head: int | None = None
    expert: int | None = None

    @property
    def axes(self) -> tuple[Axis, ...]:
        return AXES[(self.role, self.kind)]


@dataclass(frozen=True)
class Architecture:
    """One model family in transformers layout.

    `names` maps a role to its parameter prefix; `{L}` is the layer index, `{H}` a head index,
    `{E}` an expert index. In a mixture-of-experts family the MLP roles are the routed experts'
    tensors (one per expert, as real releases ship them on disk), their intermediate axis counts
    `inter_field`; `axis_fields` names the config field that sizes each further axis.
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
    inter_field: str = "intermediate_size"
    axis_fields: dict[Axis, str] = field(default_factory=dict)
    experts_per_token_field: str | None = None  # set for mixture-of-experts families

    @property
    def is_moe(self) -> bool:
        return self.experts_per_token_field is not None

    def parameter_name(self, role: TensorRole, kind: str, layer: int | None = None, head: int | None = None,
                       expert: int | None = None) -> str:
        prefix = self.names[role].replace("{L}", str(layer)).replace("{H}", str(head)).replace("{E}", str(expert))
        return f"{prefix}.{kind}"

    def classify(self, name: str) -> TensorInfo | None:
        for role, rx in self._patterns():
            m = rx.fullmatch(name)
            if m:
                layer = int(m.group("L")) if "L" in rx.groupindex else None
                head = int(m.group("H")) if "H" in rx.groupindex else None
                expert = int(m.group("E")) if "E" in rx.groupindex else None
                return TensorInfo(role, m.group("kind"), layer, head, expert)
        return None

    def _patterns(self):
        cached = _PATTERN_CACHE.get(self.name)
        if cached is None:
            cached = []
            for role, prefix in self.names.items():
                rx = (re.escape(prefix).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{H\}", r"(?P<H>\d+)")
                      .replace(r"\{E\}", r"(?P<E>\d+)"))
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
    # Mixture-of-experts families, in the on-disk layout real releases ship (transformers 5 fuses the
    # experts into 3D tensors in memory and converts on load and save).
    "mixtral": Architecture(
        name="mixtral",
        model_types=("mixtral",),
        names={
            **_DECODER,
            R.MLP_GATE: "model.layers.{L}.block_sparse_moe.experts.{E}.w1",
            R.MLP_DOWN: "model.layers.{L}.block_sparse_moe.experts.{E}.w2",
            R.MLP_UP: "model.layers.{L}.block_sparse_moe.experts.{E}.w3",
            R.MOE_ROUTER: "model.layers.{L}.block_sparse_moe.gate",
        },
        axis_fields={Axis.EXPERT: "num_local_experts"},
        experts_per_token_field="num_experts_per_tok",
        **LLAMA_LIKE,
    ),
    "qwen2_moe": Architecture(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        names={
            **_DECODER,
            R.MLP_GATE: "model.layers.{L}.mlp.experts.{E}.gate_proj",
            R.MLP_UP: "model.layers.{L}.mlp.experts.{E}.up_proj",
            R.MLP_DOWN: "model.layers.{L}.mlp.experts.{E}.down_proj",
            R.MOE_ROUTER: "model.layers.{L}.mlp.gate",
            R.SHARED_GATE: "model.layers.{L}.mlp.shared_expert.gate_proj",
            R.SHARED_UP: "model.layers.{L}.mlp.shared_expert.up_proj",
            R.SHARED_DOWN: "model.layers.{L}.mlp.shared_expert.down_proj",
            R.SHARED_ROUTER: "model.layers.{L}.mlp.shared_expert_gate",
        },
        layer_type_fields=("layer_types",),
        inter_field="moe_intermediate_size",
        axis_fields={Axis.EXPERT: "num_experts", Axis.SHARED_INTER: "shared_expert_intermediate_size"},
        experts_per_token_field="num_experts_per_tok",
        **LLAMA_LIKE,
    ),
}


def architecture_for(model_type: str | None) -> Architecture | None:
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    return None
