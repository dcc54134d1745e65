"""grow_head_dim: wider attention heads, head count kept; the article's solution 2.

Every head's q/k/v rows grow per head (reshape to (heads, head_dim, in), pad, reshape back; biases
too) and o_proj's input columns the same way, with zero columns for the new dims, so the attention
output is unchanged. Three details make it exact:

- Scores are scaled by `head_dim ** -0.5`: q (weights and bias) is scaled by sqrt(D_h/d_h) (not where
  the scale is a config constant: Gemma's `query_pre_attn_scalar`).
- New q/k dims must add nothing to q.k: under `init: trainable` k's new rows are random and q's are
  zero (q's get gradient from the random k dims at once, so it is no saddle); v's new rows are
  random because o_proj's new columns are zero.
- Rotary: with partial rotary (NeoX layout, StableLM) the rotary dims are the first
  `int(head_dim * partial_rotary_factor)` of each head; the factor is scaled by d_h/D_h so they stay
  put, and every rope type computes the same float32 frequencies from the same rotary width. With
  full rotary (rotate_half pairs i and i + d/2) transformers computes pair j's inverse frequency as
  `1 / theta ** float32(2j / D)` in float32. Where D = m d, pair i goes to pair m i and theta is
  kept: 2mi / (md) is the same float32 number as 2i / d, so every frequency is bit for bit the
  source's (and so are linear's and llama3's, which transform each frequency alone); the new pairs
  take the frequencies between and below. Otherwise pair i stays at i and `rope_theta' = rope_theta
  ** (D/d)`: exact in real arithmetic, but 2i/D and 2i/d round differently in float32, and no float32
  theta' gives the frequencies back bit for bit; the plan states how far they differ (RotaryPairs)
  and verification measures what that does on the source. Gemma 3 has one theta per attention type:
  each is treated alike.

Where head_dim is derived from hidden_size / num_heads (`Architecture.head_dim_field is None`), the
residual grows to heads * D_h through `grow_residual`, so `rescale_norm` and `patch_layernorm`
(or `residual_fill: mean`) compose with it as they do with grow_heads. Elsewhere head_dim is a
config field and the residual is kept.

q/k norms (StableLM's per-head LayerNorms, Qwen3's and Gemma 3's shared per-head RMSNorm, OLMo 2's
over the whole projection) grow with head_dim by rho = D_h/d_h. Nothing but the old dims may enter
their statistics: new pre-norm dims are zero (RMSNorm) or their head's mean (LayerNorm: rows and
bias entries). q and k are scaled by sqrt(rho), which keeps each norm's mean square and so its eps
(shared with the layer norms); the normalised values then come out sqrt(rho) larger, and the gains
(Gemma: 1 + w) and LayerNorm biases bring q and k to c_q, c_k times their old values with
c_q * c_k = 1 / sigma, sigma being the change of the score scale (sqrt(d_h/D_h), or 1 where a
family scales scores by a config constant, Gemma's query_pre_attn_scalar). See docs/families.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..arch import Axis, TensorRole as R
from ..errors import SurgeryError
from ..state import ModelState
from .base import Exactness, Init, Op, OpContext, Promise, RotaryPairs, SizeValue, resolve_size
from .residual import grow_residual
from .slices import Fill, grow_axis, scale, scale_gain

if TYPE_CHECKING:  # torch loads where data is touched: plans and `surgery validate` start without it
    import torch

# rope types whose old inverse frequencies depend on rope_theta and head_dim only through
# theta ** (-2i/head_dim) (llama3 and linear rescale each frequency by its own value).
FULL_ROTARY_TYPES = ("default", "linear", "llama3")
# rope types that see head_dim only through the rotary width int(head_dim * partial_rotary_factor), which
# partial rotary keeps ('proportional' divides its exponents by the whole head_dim).
PARTIAL_ROTARY_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


@dataclass(frozen=True)
class HeadMean(Fill):
    """New entries of each head: the mean of that head's old entries along the axis.

    The axis holds `heads` contiguous blocks; missing positions come head by head (growth pads
    inside each head's block), so each head's mean is repeated over its new positions.
    """

    heads: int = 1

    def values(self, old: torch.Tensor, axis: int, n: int) -> torch.Tensor:
        x = old.movedim(axis, 0)
        d = x.shape[0] // self.heads
        per = n // self.heads
        m = x.reshape(self.heads, d, *x.shape[1:]).mean(dim=1, keepdim=True)
        out = m.expand(self.heads, per, *x.shape[1:]).reshape(n, *x.shape[1:])
        return out.movedim(0, axis).contiguous()


def pair_stride(d_h: int, new: int, rotary: str) -> int:
    """m where full rotary grows by an integer factor m (old pair i becomes pair m i, theta kept), else 1."""
    return new // d_h if rotary == "full" and new % d_h == 0 else 1


def within_head_positions(d_h: int, new: int, rotary: str) -> list[int]:
    """Where each old dim of a head goes in the grown head."""
    if rotary == "full":
        half, m = d_h // 2, pair_stride(d_h, new, rotary)
        return [m * i if i < half else new // 2 + m * (i - half) for i in range(d_h)]
    return list(range(d_h))


def float32_frequencies(theta: float, dim: int) -> torch.Tensor:
    """transformers' float32 inverse frequencies for full rotary (default; linear and llama3 start from them)."""
    import torch
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def per_head_dest(heads: int, new: int, pos: list[int]) -> list[int]:
    return [p * new + i for p in range(heads) for i in pos]


class GrowHeadDim(Op):
    op: Literal["grow_head_dim"]
    head_dim: SizeValue
    init: Init = Init.TRAINABLE
    residual_fill: Literal["zero", "mean"] = "zero"

    reads = ("head_dim", "num_attention_heads", "num_key_value_heads", "hidden_size", "rope")
    writes = ("head_dim", "hidden_size", "rope", "attn", "residual")
    summary = "widen every attention head (per-head padding, q rescaled, rotary kept); grows the residual where head_dim is derived"

    def apply(self, state: ModelState, ctx: OpContext) -> Promise:
        import torch
        spec = state.spec
        arch = spec.arch
        h, g, d_h, d = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size
        new = resolve_size(self.head_dim, d_h, "head_dim")
        if new == d_h:
            raise SurgeryError(f"head_dim is already {d_h}: nothing to grow", loc=("head_dim",))
        if new < d_h:
            raise SurgeryError(f"head_dim would shrink from {d_h} to {new}; only growth is supported", loc=("head_dim",))
        derived = arch.head_dim_field is None
        if derived and d != h * d_h:
            raise SurgeryError(f"hidden_size {d} is not num_heads {h} x head_dim {d_h}", loc=("head_dim",))
        notes: list[str] = []
        rope_changes, rounded = self._rope_changes(spec, d_h, new, notes)

        trainable = self.init == Init.TRAINABLE
        qk_norm = spec.qk_norm
        label = f"grow_head_dim: {d_h} -> {new}"
        pos = within_head_positions(d_h, new, arch.rotary)
        q_dest, kv_dest = per_head_dest(h, new, pos), per_head_dest(g, new, pos)
        rho = new / d_h
        # sigma: how much the score scale changes (head_dim ** -0.5, or a fixed query_pre_attn_scalar ** -0.5)
        sigma = 1.0 if arch.attn_scale_field else math.sqrt(d_h / new)
        # What q and k (after their norms, if any) are multiplied by, with c_q * c_k * sigma = 1.
        c_q, c_k = (math.sqrt(rho), 1 / (sigma * math.sqrt(rho))) if qk_norm else (1 / sigma, 1.0)

        def fill(name: str, role: R, heads: int) -> Fill:
            if qk_norm and role in (R.ATTN_Q, R.ATTN_K):
                # Nothing may enter the q/k norms' statistics but the old dims: a LayerNorm's new dims hold
                # their head's mean (mean kept), an RMSNorm's zeros.
                return HeadMean("head_mean", heads=heads) if arch.norm == "layernorm" else Fill("zeros")
            if trainable and role in (R.ATTN_K, R.ATTN_V):
                return Fill("random", ctx.seed_parts(name, "head_dim"))
            return Fill("zeros")  # q always (the random new k dims then add nothing to q.k); all under init: zeros

        for name, info, node in list(state.items(R.ATTN_Q, R.ATTN_K, R.ATTN_V, R.ATTN_O)):
            if info.role == R.ATTN_Q:
                # q's new rows are not tracked: they get gradient from the random k dims, except in heads whose
                # o_proj columns are still zero (a head added by grow_heads), which only wake up a step later.
                grow_axis(state, name, 0, h * new, q_dest, fill(name, info.role, h), label)
                # with q/k norms: the norm's width grows by rho; q scaled by sqrt(rho) keeps its eps relative
                factor = math.sqrt(rho) if qk_norm else c_q
                if factor != 1.0:
                    state.tensors[name] = scale(state.tensors[name], factor, f"{label}: q x {factor:.6g}")
            elif info.role in (R.ATTN_K, R.ATTN_V):
                grow_axis(state, name, 0, g * new, kv_dest, fill(name, info.role, g), label)
                if qk_norm and info.role == R.ATTN_K:
                    state.tensors[name] = scale(state.tensors[name], math.sqrt(rho), f"{label}: k x sqrt({new}/{d_h})")
            elif info.kind == "weight":  # o_proj: per-head zero input columns
                grow_axis(state, name, 1, h * new, q_dest, Fill("zeros"), label, track="grow_head_dim" if trainable else None)

        if qk_norm:
            # The norms' outputs grow by sqrt(rho) on the old dims (the new ones are zero): gains and biases
            # bring q to c_q and k to c_k times their old values.
            dests = {Axis.HEAD_DIM: pos, Axis.Q: q_dest, Axis.KV: kv_dest}
            for name, info, node in list(state.items(R.ATTN_Q_NORM, R.ATTN_K_NORM)):
                ax = info.axes[0]
                c = c_q if info.role == R.ATTN_Q_NORM else c_k
                if info.kind == "weight":
                    f = Fill("const_mean") if trainable else Fill("const", value=arch.weight_for_gain(0.0))
                    grow_axis(state, name, 0, len(dests[ax]) // len(pos) * new, dests[ax], f, label)
                    if abs(c / math.sqrt(rho) - 1) > 1e-15:
                        state.tensors[name] = scale_gain(state.tensors[name], c / math.sqrt(rho), arch,
                                                         f"{label}: {info.role.value} gain x {c / math.sqrt(rho):.6g}")
                else:
                    grow_axis(state, name, 0, len(dests[ax]) // len(pos) * new, dests[ax], Fill("zeros"), label)
                    if c != 1.0:
                        state.tensors[name] = scale(state.tensors[name], c, f"{label}: {info.role.value} bias x {c:.6g}")
            if arch.norm != "layernorm":
                notes.append("q/k norms: the new q/k dims are zero before the norm (any value would enter its statistics), "
                             "so they start dead; the new v dims and o_proj columns train")

        half = sorted({str(n.dtype)[6:] for _, _, n in state.items(R.ATTN_Q) if n.dtype in (torch.bfloat16, torch.float16)})
        if half and (qk_norm or c_q != 1.0):
            notes.append(f"{'q, k' if qk_norm else 'q'} rescaled by a factor that is rounded when stored in {', '.join(half)}")
        spec.set_head_dim(new)
        for section, changes in zip(spec.rope_sections(), rope_changes):
            section.update(changes)
        if derived:
            grow_residual(state, h * new, self.init, self.residual_fill, ctx, "grow_head_dim")
        elif self.residual_fill != "zero":
            notes.append(f"{arch.name} keeps its residual (head_dim is a config field): residual_fill has no effect")

        rotary = None
        if arch.rotary == "full":
            rotary = RotaryPairs(tuple(pos[: d_h // 2]), "; ".join(rounded) or None)
        return Promise(Exactness.EXACT, "per-head padding with zero o_proj columns; q rescaled for the score scale; rotary dims kept",
                       notes, rotary=rotary)

    def _rope_changes(self, spec, d_h: int, new: int, notes: list[str]) -> tuple[list[dict], list[str]]:
        """For each rope section (one, or one per layer type), the settings that keep the old rotary dims,
        and, where the written settings give the old frequencies back only up to float32 rounding, how far."""
        rounded: list[str] = []
        changes = [self._section_changes(spec, section, d_h, new, notes, rounded) for section in spec.rope_sections()]
        return changes, rounded

    def _section_changes(self, spec, section: dict, d_h: int, new: int, notes: list[str], rounded: list[str]) -> dict:
        import torch
        rotary = spec.arch.rotary
        rope_type = section.get("rope_type") or "default"
        if rotary == "partial":
            if rope_type not in PARTIAL_ROTARY_TYPES:
                raise SurgeryError(f"rope_type {rope_type!r} derives its frequencies from the whole head_dim, which grow_head_dim "
                                   f"changes; supported with partial rotary: {', '.join(PARTIAL_ROTARY_TYPES)}", loc=("head_dim",))
            factor = section.get("partial_rotary_factor")
            if not isinstance(factor, (int, float)) or isinstance(factor, bool):
                raise SurgeryError("config.json states no partial_rotary_factor; add it to rope_parameters", loc=("head_dim",))
            rot = int(d_h * factor)
            # factor * d_h / new reads best; rot / new can land one ulp low (6 / 47 * 47 < 6), the next float up cannot
            for candidate in (factor * d_h / new, rot / new, math.nextafter(rot / new, math.inf)):
                if int(new * candidate) == rot:
                    return {"partial_rotary_factor": candidate}
            raise SurgeryError(
                f"head_dim {new} cannot keep the {rot} rotary dims: no partial_rotary_factor f gives int({new} * f) == {rot} "
                f"in floating point; pick another head_dim",
                loc=("head_dim",),
            )
        if rotary == "full":
            if d_h % 2 or new % 2:
                raise SurgeryError(f"head_dim must be even for rotary embeddings (rotate_half pairs i and i + head_dim/2), got {new}",
                                   loc=("head_dim",))
            factor = section.get("partial_rotary_factor")
            if factor not in (None, 1, 1.0):
                raise SurgeryError(f"partial_rotary_factor {factor} with full rotary is not supported", loc=("head_dim",))
            if rope_type not in FULL_ROTARY_TYPES:
                raise SurgeryError(
                    f"rope_type {rope_type!r} derives its frequencies from head_dim in ways grow_head_dim cannot keep; "
                    f"supported: {', '.join(FULL_ROTARY_TYPES)}",
                    loc=("head_dim",),
                )
            theta = section.get("rope_theta")
            if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
                raise SurgeryError(f"config.json states no usable rope_theta (got {theta!r})", loc=("head_dim",))
            m = pair_stride(d_h, new, rotary)
            if m > 1:
                notes.append(f"rope_theta {theta:g} kept: old frequency pair i is now pair {m}i, the same float32 frequency bit "
                             f"for bit; the new pairs take the frequencies between and below")
                return {}
            try:
                new_theta = float(theta) ** (new / d_h)
            except OverflowError:
                new_theta = math.inf
            if new_theta >= torch.finfo(torch.float32).max:
                raise SurgeryError(f"rope_theta {theta:g} ** ({new}/{d_h}) = {new_theta:.3g} overflows float32, where transformers "
                                   f"computes the frequencies; pick a head_dim that is a multiple of {d_h} (rope_theta is then "
                                   "kept) or a smaller one", loc=("head_dim",))
            old_f = float32_frequencies(float(theta), d_h).double()
            new_f = float32_frequencies(new_theta, new)[: d_h // 2].double()
            differ = int((old_f != new_f).sum())
            rel = float(((new_f - old_f) / old_f).abs().max())
            positions = int(spec.config.get("max_position_embeddings") or 0)
            phase = f", {positions * float((new_f - old_f).abs().max()):.2g} rad of phase at position {positions}" if positions else ""
            what = (f"rope_theta {theta:g} -> {new_theta:.9g} gives the first {d_h // 2} frequencies back up to float32 rounding: "
                    f"{differ} of {d_h // 2} differ, by up to {rel:.2g} relative{phase}")
            rounded.append(what)
            notes.append(f"{what}. transformers computes them in float32, where 2i/{new} and 2i/{d_h} round differently: no "
                         f"rope_theta gives them bit for bit unless {new} is a multiple of {d_h} (then rope_theta is kept). "
                         "Verification measures what this rounding does on the source and allows for it")
            return {"rope_theta": new_theta}
        raise SurgeryError(f"rotary layout {rotary!r} is not supported by grow_head_dim", loc=("head_dim",))
