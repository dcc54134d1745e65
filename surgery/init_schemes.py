"""Initialisation schemes as data: for one tensor, which distribution and which std.

`draw_for(method, spec, info, shape)` answers, per tensor, what the named scheme's source code does
to it, with nothing drawn yet; `Draw.sample` then draws it on CPU from a generator seeded by the
tensor's name (see `surgery.lazy.generator`), so the bits never depend on the device or on the
order tensors are visited in.

Where each std comes from (d = hidden_size, n = num_hidden_layers, i = layer index, I =
intermediate_size, base = the `std` override or the method's default):

hf
    transformers 5 `PreTrainedModel._init_weights`, which llama, mistral, qwen2 and stablelm use
    unchanged (checked against transformers 5.23): every Linear and Embedding weight
    N(0, initializer_range or 0.02), plain normal, never truncated (the seed-000 thread guessed a
    truncated normal from the config docstring: the code draws a plain one); the embedding row of
    `pad_token_id` zero; norm weights one, every bias zero.
normal / trunc_normal
    every weight matrix N(0, base), base = initializer_range or 0.02; `trunc_normal` cuts at
    +-3 base (torch `trunc_normal_` with std=base, so the values' own std is 0.9866 base).
olmo_*
    OLMo-core `InitMethod` (olmo_core/nn/transformer/init.py and Attention.init_weights), base 0.02
    (OLMo-core's init_std). Every Linear goes through `init_linear`: truncated at +-3 std. The
    embedding is truncated only for `normal`; the other four draw it from a plain normal.
    OLMo names map as w_q/w_k/w_v/w_out = attn.q/k/v/o, w1 = mlp.gate, w3 = mlp.up,
    w2 = mlp.down, w_out of the LM head = lm_head.
scaled
    GPT-2 / Megatron: N(0, base) everywhere, output projections (attn.o, mlp.down)
    N(0, base / sqrt(2 n)); base = initializer_range or 0.02.
lm_head_inv_sqrt_d
    N(0, d ** -0.5) (transformers PR for T5, seed 004): logits of unit variance from a
    unit-variance final hidden state. Meant for `targets: [lm_head]`; any other weight matrix
    selected gets the same N(0, d ** -0.5).
zeros / ones
    every selected tensor, weights, biases and norms alike, set to 0 / 1.

Norms and biases under every method but zeros/ones: norm weights 1, norm and linear biases 0.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from .arch import TensorInfo, TensorRole as R
from .errors import SurgeryError
from .spec import ModelSpec


class InitMethod(str, enum.Enum):
    HF = "hf"
    NORMAL = "normal"
    TRUNC_NORMAL = "trunc_normal"
    OLMO_NORMAL = "olmo_normal"
    OLMO_NORMALIZED = "olmo_normalized"
    OLMO_LLAMA = "olmo_llama"
    OLMO_LLAMA_DEPTH = "olmo_llama_depth"
    OLMO_FAN_IN = "olmo_fan_in"
    SCALED = "scaled"
    LM_HEAD_INV_SQRT_D = "lm_head_inv_sqrt_d"
    ZEROS = "zeros"
    ONES = "ones"

    def __str__(self) -> str:
        return self.value


M = InitMethod
OLMO = (M.OLMO_NORMAL, M.OLMO_NORMALIZED, M.OLMO_LLAMA, M.OLMO_LLAMA_DEPTH, M.OLMO_FAN_IN)
# Methods whose every std follows from the shapes: a `std` override has nothing to replace.
NO_BASE_STD = (M.OLMO_NORMALIZED, M.OLMO_FAN_IN, M.LM_HEAD_INV_SQRT_D, M.ZEROS, M.ONES)
OLMO_INIT_STD = 0.02
TRUNC_SIGMAS = 3.0

DESCRIPTIONS = {
    M.HF: "what transformers 5 does for the family: N(0, initializer_range), norms 1, biases 0, pad row 0",
    M.NORMAL: "every weight N(0, initializer_range)",
    M.TRUNC_NORMAL: "every weight N(0, initializer_range) truncated at +-3 std",
    M.OLMO_NORMAL: "OLMo-core normal: every weight truncated N(0, 0.02) at +-3 std",
    M.OLMO_NORMALIZED: "OLMo-core normalized (nGPT): d^-0.5, output projections d^-0.5/sqrt(2n)",
    M.OLMO_LLAMA: "OLMo-core llama: embedding N(0,1), o/up/down 0.02/sqrt(2n), lm_head d^-0.5",
    M.OLMO_LLAMA_DEPTH: "OLMo-core llama_depth: like llama with 0.02/sqrt(2(i+1)) by layer index i",
    M.OLMO_FAN_IN: "OLMo-core fan_in: every Linear 1/sqrt(fan_in), embedding N(0,1)",
    M.SCALED: "GPT-2/Megatron: N(0, std), attn.o and mlp.down N(0, std/sqrt(2n))",
    M.LM_HEAD_INV_SQRT_D: "N(0, d^-0.5): the T5 lm_head fix",
    M.ZEROS: "every selected tensor 0",
    M.ONES: "every selected tensor 1",
}

_MATRICES = (R.EMBED, R.LM_HEAD, R.ATTN_Q, R.ATTN_K, R.ATTN_V, R.ATTN_O, R.MLP_GATE, R.MLP_UP, R.MLP_DOWN, R.ATTN_REL_BIAS)
# Mixture-of-experts tensors are drawn by the rule of the dense tensor they play (as OLMo-core and
# transformers do): routers and the shared expert's sigmoid gate read the residual like mlp.gate,
# the shared expert is an MLP. Routed experts already carry the MLP roles.
AS_ROLE = {R.MOE_ROUTER: R.MLP_GATE, R.SHARED_ROUTER: R.MLP_GATE, R.SHARED_GATE: R.MLP_GATE, R.SHARED_UP: R.MLP_UP,
           R.SHARED_DOWN: R.MLP_DOWN}
_NORMS = (R.NORM_ATTN, R.NORM_MLP, R.NORM_ATTN_OUT, R.NORM_MLP_OUT, R.NORM_FINAL, R.ATTN_Q_NORM, R.ATTN_K_NORM)


def _phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def truncated_std(std: float, bound: float) -> float:
    """Std of N(0, std) truncated to [-bound, bound]."""
    if std == 0:
        return 0.0
    z = bound / std
    mass = _cdf(z) - _cdf(-z)
    return std * math.sqrt(1 - 2 * z * _phi(z) / mass)


@dataclass(frozen=True)
class Draw:
    """How one tensor is (re)initialised.

    dist: "normal" | "trunc_normal" | "constant". `std` is the std handed to torch (for a truncated
    normal, that of the normal before truncation); `bound` the truncation, |x| <= bound.
    """

    dist: str
    std: float = 0.0
    bound: float | None = None
    value: float = 0.0  # for "constant"
    zero_rows: tuple[int, ...] = ()  # rows set to zero after the draw (the embedding's padding row)
    rule: str = ""  # the formula, for plans, tables and plot legends

    @property
    def expected_std(self) -> float:
        """Std of the values the draw produces (zero rows aside)."""
        if self.dist == "constant":
            return 0.0
        if self.dist == "trunc_normal":
            return truncated_std(self.std, self.bound)
        return self.std

    def describe(self) -> str:
        if self.dist == "constant":
            return f"{self.value:g}"
        name = "trunc_normal" if self.dist == "trunc_normal" else "normal"
        s = f"{name}(0, {self.std:.4g}"
        if self.bound is not None:
            s += f", +-{self.bound:.4g}"
        s += ")"
        if self.zero_rows:
            s += f", row {','.join(map(str, self.zero_rows))} zero"
        return s

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Draw on CPU, float32, from `generator` alone."""
        import torch  # deferred: `surgery --help` lists `inspect --method` choices without loading torch

        if self.dist == "constant":
            return torch.full(shape, float(self.value), dtype=torch.float32)
        t = torch.empty(shape, dtype=torch.float32)
        if self.dist == "trunc_normal":
            torch.nn.init.trunc_normal_(t, mean=0.0, std=self.std, a=-self.bound, b=self.bound, generator=generator)
        else:
            torch.nn.init.normal_(t, mean=0.0, std=self.std, generator=generator)
        for r in self.zero_rows:
            t[r] = 0
        return t

    def pdf(self, x):
        """Predicted density at `x` (numpy array); None for a constant."""
        import numpy as np

        if self.dist == "constant" or self.std == 0:
            return None
        x = np.asarray(x, dtype=np.float64)
        p = np.exp(-0.5 * (x / self.std) ** 2) / (self.std * math.sqrt(2 * math.pi))
        if self.dist == "trunc_normal":
            z = self.bound / self.std
            p = np.where(np.abs(x) <= self.bound, p / (_cdf(z) - _cdf(-z)), 0.0)
        return p


def _normal(std: float, rule: str, zero_rows: tuple[int, ...] = ()) -> Draw:
    return Draw("normal", std, None, zero_rows=zero_rows, rule=rule)


def _trunc(std: float, rule: str) -> Draw:
    return Draw("trunc_normal", std, TRUNC_SIGMAS * std, rule=rule)


def default_base_std(method: InitMethod, spec: ModelSpec) -> float | None:
    if method in NO_BASE_STD:
        return None
    if method in OLMO:
        return OLMO_INIT_STD
    return float(spec.config.get("initializer_range") or 0.02)


def _pad_rows(spec: ModelSpec) -> tuple[int, ...]:
    pad = spec.config.get("pad_token_id")
    v = spec.vocab_size
    if isinstance(pad, int) and not isinstance(pad, bool) and -v <= pad < v:
        return (pad % v,)
    return ()


def draw_for(method: InitMethod | str, spec: ModelSpec, info: TensorInfo, shape: tuple[int, ...],
             std: float | None = None) -> Draw:
    """The draw `method` gives the tensor `info` of shape `shape` in a model described by `spec`.

    `std` overrides the method's base std (an error for methods whose stds all follow from shapes).
    """
    method = InitMethod(method)
    if std is not None and method in NO_BASE_STD:
        raise SurgeryError(f"{method.value} takes every std from the tensor shapes; std has nothing to override",
                           loc=("std",))
    if method == M.ZEROS:
        return Draw("constant", value=0.0, rule="zeros")
    if method == M.ONES:
        return Draw("constant", value=1.0, rule="ones")
    role = AS_ROLE.get(info.role, info.role)
    if info.kind == "bias":
        return Draw("constant", value=0.0, rule="bias: zeros")
    if role in _NORMS:
        if spec.arch.norm_offset:  # Gemma: x_hat * (1 + w), a unit gain is w = 0
            return Draw("constant", value=spec.arch.weight_for_gain(1.0), rule="norm weight: unit gain (1 + w, w = 0)")
        return Draw("constant", value=1.0, rule="norm weight: ones")
    assert role in _MATRICES, role
    if method == M.HF and spec.arch.init_rules == "t5":
        return _t5(spec, role, std)
    base = std if std is not None else default_base_std(method, spec)
    b = f"{base:g}" if base is not None else ""
    d, n = spec.hidden_size, spec.num_layers
    fan_in = shape[-1] if role != R.EMBED else None

    if method == M.HF:
        rows = _pad_rows(spec) if role == R.EMBED else ()
        return _normal(base, f"initializer_range = {b}", rows)
    if method == M.NORMAL:
        return _normal(base, f"{b}")
    if method == M.TRUNC_NORMAL:
        return _trunc(base, f"{b}, +-3 std")
    if method == M.SCALED:
        if role in (R.ATTN_O, R.MLP_DOWN):
            return _normal(base / math.sqrt(2 * n), f"{b} / sqrt(2 * {n})")
        return _normal(base, f"{b}")
    if method == M.LM_HEAD_INV_SQRT_D:
        return _normal(d ** -0.5, f"{d} ** -0.5")
    return _olmo(method, role, info.layer, d, n, base, fan_in)


def _t5(spec: ModelSpec, role: R, std: float | None) -> Draw:
    """T5PreTrainedModel._init_weights: stds from the shapes times initializer_factor (embedding and an untied
    lm_head: std 1, the seed 004 problem that `lm_head_inv_sqrt_d` fixes)."""
    f = std if std is not None else float(spec.config.get("initializer_factor", 1.0))
    d, dkv, h, dff = spec.hidden_size, spec.head_dim, spec.num_heads, spec.intermediate_size
    rules = {
        R.EMBED: (1.0, "initializer_factor"), R.LM_HEAD: (1.0, "initializer_factor"),
        R.ATTN_Q: ((d * dkv) ** -0.5, f"({d} * {dkv}) ** -0.5"), R.ATTN_K: (d ** -0.5, f"{d} ** -0.5"),
        R.ATTN_V: (d ** -0.5, f"{d} ** -0.5"), R.ATTN_O: ((h * dkv) ** -0.5, f"({h} * {dkv}) ** -0.5"),
        R.ATTN_REL_BIAS: (d ** -0.5, f"{d} ** -0.5"), R.MLP_GATE: (d ** -0.5, f"{d} ** -0.5"),
        R.MLP_UP: (d ** -0.5, f"{d} ** -0.5"), R.MLP_DOWN: (dff ** -0.5, f"{dff} ** -0.5"),
    }
    value, rule = rules[role]
    return _normal(f * value, rule if f == 1.0 else f"{f:g} * {rule}")


def _olmo(method: InitMethod, role: R, layer: int | None, d: int, n: int, base: float | None,
          fan_in: int | None) -> Draw:
    """OLMo-core's std per weight, following its code line by line (a `std` variable carried
    from w1 to w3 to w2 in `init_feed_forward`, and from q/k/v to w_out in Attention.init_weights)."""
    b = f"{base:g}" if base is not None else ""
    inv_d = d ** -0.5
    if role == R.EMBED:
        if method == M.OLMO_NORMAL:
            return _trunc(base, f"{b}, +-3 std")
        if method == M.OLMO_NORMALIZED:
            return _normal(inv_d, f"{d} ** -0.5")
        return _normal(1.0, "1")  # llama, llama_depth, fan_in (no embed_scale in transformers layouts)
    if role == R.LM_HEAD:
        if method == M.OLMO_NORMAL:
            return _trunc(base, f"{b}")
        return _trunc(inv_d, f"{d} ** -0.5")
    if method == M.OLMO_FAN_IN:
        return _trunc(fan_in ** -0.5, f"fan_in {fan_in} ** -0.5")
    i = layer if layer is not None else 0
    depth = {
        M.OLMO_LLAMA: (2 * n, f"sqrt(2 * {n})"),
        M.OLMO_LLAMA_DEPTH: (2 * (i + 1), "sqrt(2 * (layer + 1))"),
    }
    if method == M.OLMO_NORMALIZED:
        if role in (R.ATTN_O, R.MLP_DOWN):
            return _trunc(inv_d / math.sqrt(2 * n), f"{d} ** -0.5 / sqrt(2 * {n})")
        return _trunc(inv_d, f"{d} ** -0.5")  # q, k, v, w1 and (carried) w3
    if method == M.OLMO_NORMAL or role in (R.ATTN_Q, R.ATTN_K, R.ATTN_V, R.MLP_GATE):
        return _trunc(base, f"{b}")
    # llama / llama_depth: w_out, w3 and (carried from w3) w2
    k, txt = depth[method]
    return _trunc(base / math.sqrt(k), f"{b} / {txt}")


def tied_rule_role(method: InitMethod | str, lm_head_selected: bool) -> R:
    """Which role's rule draws the one tensor a tied model shares between embedding and head.

    transformers (`hf`) ties after drawing the embedding, which keeps its padding row at zero;
    OLMo-core and GPT-2 initialise the head last, so its rule is what a tied tensor ends with.
    """
    if InitMethod(method) == M.HF or not lm_head_selected:
        return R.EMBED
    return R.LM_HEAD
