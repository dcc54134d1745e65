"""One model family's tensor names as data: `Architecture` maps each role to its parameter names and back."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .roles import Axis, TensorInfo, TensorRole


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
