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
    NORM_ATTN_OUT = "norm.attn_out"  # over the attention output before the residual add (OLMo 2, Gemma sandwich)
    NORM_MLP_OUT = "norm.mlp_out"  # over the MLP output before the residual add
    NORM_FINAL = "norm.final"
    ATTN_REL_BIAS = "attn.rel_bias"  # T5's relative position bias (buckets x heads)
    MOE_ROUTER = "moe.router"  # router (Mixtral block_sparse_moe.gate): expert logits from the residual
    SHARED_GATE = "shared.gate"  # Qwen2-MoE shared expert, always on
    SHARED_UP = "shared.up"
    SHARED_DOWN = "shared.down"
    SHARED_ROUTER = "shared.router"  # Qwen2-MoE shared_expert_gate: sigmoid gate of the shared expert

    @property
    def is_norm(self) -> bool:
        """A norm over the residual width (per-head q/k norms are not)."""
        return self in (TensorRole.NORM_ATTN, TensorRole.NORM_MLP, TensorRole.NORM_ATTN_OUT, TensorRole.NORM_MLP_OUT,
                        TensorRole.NORM_FINAL)


class Axis(str, enum.Enum):
    """What an axis of a tensor counts."""

    VOCAB = "vocab"
    RESID = "resid"  # the residual stream (hidden_size)
    Q = "q"  # num_heads x head_dim
    KV = "kv"  # num_kv_heads x head_dim
    INTER = "inter"  # MLP intermediate
    HEAD_DIM = "head_dim"  # one head's dims (per-head q/k norms)
    HEADS = "heads"  # one entry per attention head
    REL_BUCKETS = "rel_buckets"  # T5's relative position buckets
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
    (R.ATTN_REL_BIAS, "weight"): (Axis.REL_BUCKETS, Axis.HEADS),
    (R.NORM_ATTN_OUT, "weight"): (Axis.RESID,),
    (R.NORM_MLP_OUT, "weight"): (Axis.RESID,),
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


@dataclass(frozen=True)
class TensorInfo:
    """Where a parameter sits in the model: its role, weight or bias, layer and head."""

    role: TensorRole
    kind: str  # "weight" | "bias"
    layer: int | None = None
    head: int | None = None
    family_axes: tuple[Axis, ...] | None = None  # where a family's tensor differs from AXES (OLMo 2's q/k norms)
    expert: int | None = None

    @property
    def axes(self) -> tuple[Axis, ...]:
        return self.family_axes or AXES[(self.role, self.kind)]


@dataclass(frozen=True)
class Architecture:
    """One model family in transformers layout.

    `names` maps a role to its parameter prefix (or prefixes: T5's encoder and decoder stacks); `{L}` is
    the layer index, `{H}` a head index, `{E}` an expert index. In a mixture-of-experts family the MLP
    roles are the routed experts' tensors (one per expert, as real releases ship them on disk), their
    intermediate axis counts `inter_field`; `axis_fields` names the config field that sizes each further axis.
    `fused` maps a tensor stored on disk to the roles it concatenates along its first axis
    (Phi-3's qkv_proj is q | k | v): ops see the parts under their own names in `names`, and the
    output joins them again (`ModelState.output`).
    """

    name: str
    model_types: tuple[str, ...]
    names: dict[TensorRole, str | tuple[str, ...]]
    norm: str  # "layernorm" | "rmsnorm"
    eps_field: str
    head_dim_field: str | None  # None: head_dim is hidden_size // num_heads (StableLM)
    rotary: str  # "partial" (NeoX, fixed rotary dims) | "full" (rotate_half over head_dim)
    qk_norm_field: str | None = None  # config flag that switches the q/k norms on; None: always on where qk_norm is set
    # Where the q/k norms normalise: "head_tensors" (one norm tensor per head, StableLM), "head" (one
    # norm over head_dim shared by all heads, Qwen3, Gemma 3), "projection" (over the whole q or k
    # projection, num_heads x head_dim, OLMo 2).
    qk_norm: str | None = None
    norm_offset: float = 0.0  # norms compute x_hat * (offset + w): Gemma's 1 + w (a zero gain is w = -offset)
    embed_scale: str | None = None  # "sqrt_hidden": embeddings multiplied by hidden_size ** 0.5 (Gemma)
    attn_scale_field: str | None = None  # scores scaled by this config field ** -0.5 instead of head_dim's (Gemma)
    patched_class: str | None = None  # class shipped for patch_layernorm
    layer_type_fields: tuple[str, ...] = ()  # per-layer config lists that follow num_layers
    # How the family's config derives `layer_types` from `max_window_layers` m when sliding is on (transformers
    # 5 configuration_*.py): "from" (Qwen2, Qwen3: layers i >= m slide) or "even_below" (Qwen2-MoE: even
    # layers i < m slide). None: no such field.
    max_window_rule: str | None = None
    extra_bias_flags: tuple[str, ...] = field(default_factory=tuple)
    axes: dict[tuple[TensorRole, str], tuple[Axis, ...]] = field(default_factory=dict)  # overrides of AXES
    fused: dict[str, tuple[TensorRole, ...]] = field(default_factory=dict)
    config_aliases: dict[str, str] = field(default_factory=dict)  # surgery's field name -> the family's (T5: d_model)
    tied_aliases: tuple[str, ...] = ()  # stored copies of the embedding transformers ties on load (dropped)
    ops: tuple[str, ...] | None = None  # the ops this family supports; None: all
    ops_refusal: str = ""  # why the others are refused
    required_per_layer: tuple[TensorRole, ...] | None = None  # None: every per-layer role the table names
    init_rules: str | None = None  # "t5": `reinit method: hf` follows T5's own _init_weights

    def window_types(self, config: dict, max_window_layers: int, n: int) -> list[str]:
        """The layer types the family's config class derives from `max_window_layers` for n layers."""
        on = bool(config.get("use_sliding_window"))
        if self.max_window_rule == "from":  # the window is nulled unless use_sliding_window
            slides = lambda i: on and config.get("sliding_window") is not None and i >= max_window_layers
        else:
            slides = lambda i: on and i % 2 == 0 and i < max_window_layers
        return ["sliding_attention" if slides(i) else "full_attention" for i in range(n)]

    def gain(self, w):
        """The multiplier a norm weight stands for."""
        return w + self.norm_offset if self.norm_offset else w

    def weight_for_gain(self, g):
        return g - self.norm_offset if self.norm_offset else g

    inter_field: str = "intermediate_size"
    axis_fields: dict[Axis, str] = field(default_factory=dict)
    experts_per_token_field: str | None = None  # set for mixture-of-experts families

    @property
    def is_moe(self) -> bool:
        return self.experts_per_token_field is not None

    def parameter_name(self, role: TensorRole, kind: str, layer: int | None = None, head: int | None = None,
                       expert: int | None = None) -> str:
        prefix = self.prefixes(role)[0].replace("{L}", str(layer)).replace("{H}", str(head)).replace("{E}", str(expert))
        return f"{prefix}.{kind}"

    def prefixes(self, role: TensorRole) -> tuple[str, ...]:
        p = self.names[role]
        return (p,) if isinstance(p, str) else p

    def classify(self, name: str) -> TensorInfo | None:
        for role, rx in self._patterns():
            m = rx.fullmatch(name)
            if m:
                layer = int(m.group("L")) if "L" in rx.groupindex else None
                head = int(m.group("H")) if "H" in rx.groupindex else None
                kind = m.group("kind")
                expert = int(m.group("E")) if "E" in rx.groupindex else None
                return TensorInfo(role, kind, layer, head, self.axes.get((role, kind)), expert)
        return None

    def fused_parts(self, name: str) -> tuple[int | None, str, tuple[TensorRole, ...]] | None:
        """(layer, kind, part roles) of a fused tensor's name, or None."""
        for prefix, roles in self.fused.items():
            rx = re.escape(prefix).replace(r"\{L\}", r"(?P<L>\d+)") + r"\.(?P<kind>weight|bias)"
            m = re.fullmatch(rx, name)
            if m:
                return (int(m.group("L")) if "L" in m.groupdict() else None), m.group("kind"), roles
        return None

    def fused_name(self, role: TensorRole, kind: str, layer: int | None) -> str | None:
        for prefix, roles in self.fused.items():
            if role in roles:
                return f"{prefix.replace('{L}', str(layer))}.{kind}"
        return None

    def _patterns(self):
        cached = _PATTERN_CACHE.get(self.name)
        if cached is None:
            cached = []
            for role, prefix in ((r, p) for r in self.names for p in self.prefixes(r)):
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
        qk_norm="head_tensors",
        patched_class="SurgeryStableLmForCausalLM",
    ),
    "llama": Architecture(name="llama", model_types=("llama",), names=dict(_DECODER), **LLAMA_LIKE),
    "mistral": Architecture(name="mistral", model_types=("mistral",), names=dict(_DECODER), **LLAMA_LIKE),
    "qwen2": Architecture(
        name="qwen2",
        model_types=("qwen2",),
        names=dict(_DECODER),
        layer_type_fields=("layer_types",),
        max_window_rule="from",
        **LLAMA_LIKE,
    ),
    "qwen3": Architecture(
        name="qwen3",
        model_types=("qwen3",),
        names={
            **_DECODER,
            R.ATTN_Q_NORM: "model.layers.{L}.self_attn.q_norm",
            R.ATTN_K_NORM: "model.layers.{L}.self_attn.k_norm",
        },
        qk_norm="head",
        layer_type_fields=("layer_types",),
        max_window_rule="from",
        **LLAMA_LIKE,
    ),
    # OLMo 2: no pre-norms; the branch outputs are normalised before the residual add, and q_norm / k_norm
    # span the whole q / k projection. head_dim is hidden_size / num_heads (no config field).
    "olmo2": Architecture(
        name="olmo2",
        model_types=("olmo2",),
        names={
            **{r: p for r, p in _DECODER.items() if r not in (R.NORM_ATTN, R.NORM_MLP)},
            R.ATTN_Q_NORM: "model.layers.{L}.self_attn.q_norm",
            R.ATTN_K_NORM: "model.layers.{L}.self_attn.k_norm",
            R.NORM_ATTN_OUT: "model.layers.{L}.post_attention_layernorm",
            R.NORM_MLP_OUT: "model.layers.{L}.post_feedforward_layernorm",
        },
        norm="rmsnorm",
        eps_field="rms_norm_eps",
        head_dim_field=None,
        rotary="full",
        qk_norm="projection",
        axes={(R.ATTN_Q_NORM, "weight"): (Axis.Q,), (R.ATTN_K_NORM, "weight"): (Axis.KV,)},
    ),
    # Phi-3 (and Phi-4-mini): q | k | v in one qkv_proj, gate | up in one gate_up_proj; rotary over the first
    # head_dim x partial_rotary_factor dims of each head; head_dim is hidden_size / num_heads.
    "phi3": Architecture(
        name="phi3",
        model_types=("phi3",),
        names={
            **_DECODER,
            R.ATTN_Q: "model.layers.{L}.self_attn.qkv_proj[q]",
            R.ATTN_K: "model.layers.{L}.self_attn.qkv_proj[k]",
            R.ATTN_V: "model.layers.{L}.self_attn.qkv_proj[v]",
            R.MLP_GATE: "model.layers.{L}.mlp.gate_up_proj[gate]",
            R.MLP_UP: "model.layers.{L}.mlp.gate_up_proj[up]",
        },
        norm="rmsnorm",
        eps_field="rms_norm_eps",
        head_dim_field=None,
        rotary="partial",
        fused={
            "model.layers.{L}.self_attn.qkv_proj": (R.ATTN_Q, R.ATTN_K, R.ATTN_V),
            "model.layers.{L}.mlp.gate_up_proj": (R.MLP_GATE, R.MLP_UP),
        },
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
        max_window_rule="even_below",
        inter_field="moe_intermediate_size",
        axis_fields={Axis.EXPERT: "num_experts", Axis.SHARED_INTER: "shared_expert_intermediate_size"},
        experts_per_token_field="num_experts_per_tok",
        **LLAMA_LIKE,
    ),
    "qwen3_moe": Architecture(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        names={
            **_DECODER,
            R.ATTN_Q_NORM: "model.layers.{L}.self_attn.q_norm",
            R.ATTN_K_NORM: "model.layers.{L}.self_attn.k_norm",
            R.MLP_GATE: "model.layers.{L}.mlp.experts.{E}.gate_proj",
            R.MLP_UP: "model.layers.{L}.mlp.experts.{E}.up_proj",
            R.MLP_DOWN: "model.layers.{L}.mlp.experts.{E}.down_proj",
            R.MOE_ROUTER: "model.layers.{L}.mlp.gate",
        },
        qk_norm="head",
        inter_field="moe_intermediate_size",
        axis_fields={Axis.EXPERT: "num_experts"},
        experts_per_token_field="num_experts_per_tok",
        **LLAMA_LIKE,
    ),
}

# Gemma 2 and Gemma 3 (text): norms compute x_hat * (1 + w), embeddings are multiplied by sqrt(hidden_size),
# scores by query_pre_attn_scalar ** -0.5; sandwich norms around both branches. Gemma 3 adds per-head q/k norms.
_GEMMA = {
    **_DECODER,
    R.NORM_ATTN_OUT: "model.layers.{L}.post_attention_layernorm",
    R.NORM_MLP: "model.layers.{L}.pre_feedforward_layernorm",
    R.NORM_MLP_OUT: "model.layers.{L}.post_feedforward_layernorm",
}
GEMMA_LIKE = dict(norm_offset=1.0, embed_scale="sqrt_hidden", attn_scale_field="query_pre_attn_scalar",
                  layer_type_fields=("layer_types",), **LLAMA_LIKE)
ARCHITECTURES["gemma2"] = Architecture(name="gemma2", model_types=("gemma2",), names=dict(_GEMMA), **GEMMA_LIKE)
ARCHITECTURES["gemma3_text"] = Architecture(
    name="gemma3_text",
    model_types=("gemma3_text",),
    names={
        **_GEMMA,
        R.ATTN_Q_NORM: "model.layers.{L}.self_attn.q_norm",
        R.ATTN_K_NORM: "model.layers.{L}.self_attn.k_norm",
    },
    qk_norm="head",
    **GEMMA_LIKE,
)

# T5 (encoder-decoder, seed 004): tables for reinit and inspect; growth is not implemented for its layout.
_T5_STACKS = ("encoder", "decoder")
ARCHITECTURES["t5"] = Architecture(
    name="t5",
    model_types=("t5",),
    names={
        R.EMBED: "shared",
        R.LM_HEAD: "lm_head",
        R.ATTN_Q: tuple(f"{s}.block.{{L}}.layer.0.SelfAttention.q" for s in _T5_STACKS) + ("decoder.block.{L}.layer.1.EncDecAttention.q",),
        R.ATTN_K: tuple(f"{s}.block.{{L}}.layer.0.SelfAttention.k" for s in _T5_STACKS) + ("decoder.block.{L}.layer.1.EncDecAttention.k",),
        R.ATTN_V: tuple(f"{s}.block.{{L}}.layer.0.SelfAttention.v" for s in _T5_STACKS) + ("decoder.block.{L}.layer.1.EncDecAttention.v",),
        R.ATTN_O: tuple(f"{s}.block.{{L}}.layer.0.SelfAttention.o" for s in _T5_STACKS) + ("decoder.block.{L}.layer.1.EncDecAttention.o",),
        R.ATTN_REL_BIAS: tuple(f"{s}.block.{{L}}.layer.0.SelfAttention.relative_attention_bias" for s in _T5_STACKS),
        R.MLP_GATE: ("encoder.block.{L}.layer.1.DenseReluDense.wi_0", "decoder.block.{L}.layer.2.DenseReluDense.wi_0"),
        R.MLP_UP: ("encoder.block.{L}.layer.1.DenseReluDense.wi", "decoder.block.{L}.layer.2.DenseReluDense.wi",
                   "encoder.block.{L}.layer.1.DenseReluDense.wi_1", "decoder.block.{L}.layer.2.DenseReluDense.wi_1"),
        R.MLP_DOWN: ("encoder.block.{L}.layer.1.DenseReluDense.wo", "decoder.block.{L}.layer.2.DenseReluDense.wo"),
        R.NORM_ATTN: ("encoder.block.{L}.layer.0.layer_norm", "decoder.block.{L}.layer.0.layer_norm",
                      "decoder.block.{L}.layer.1.layer_norm"),
        R.NORM_MLP: ("encoder.block.{L}.layer.1.layer_norm", "decoder.block.{L}.layer.2.layer_norm"),
        R.NORM_FINAL: ("encoder.final_layer_norm", "decoder.final_layer_norm"),
    },
    norm="rmsnorm",
    eps_field="layer_norm_epsilon",
    head_dim_field="d_kv",
    rotary="none",
    config_aliases={"hidden_size": "d_model", "num_attention_heads": "num_heads", "num_hidden_layers": "num_layers",
                    "intermediate_size": "d_ff"},
    tied_aliases=("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
    ops=("reinit",),
    ops_refusal="T5 is an encoder-decoder: surgery re-initialises and inspects it; growth and prune ops are not implemented "
                "for its two stacks and cross-attention",
    required_per_layer=(R.ATTN_Q, R.ATTN_K, R.ATTN_V, R.ATTN_O, R.MLP_UP, R.MLP_DOWN, R.NORM_ATTN, R.NORM_MLP),
    init_rules="t5",
)


def architecture_for(model_type: str | None) -> Architecture | None:
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    return None
