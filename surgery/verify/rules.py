"""The rules that judge a step on its logits, and the text that states them.

Exact ops are judged against rounding noise measured on the reference (`NoiseFloor`, `exact_bound`),
approximate ones against the recipe tolerance, both ways (`approximate_bound`), re-initialisations and prunes
by their loss (`language_model_bound`, `judge_pruned`). A `Comparison` (`runtime.evaluation.compare`) is what
they read; nothing here runs a model, so `surgery plan` states the rules without torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..ops.base import Exactness, Promise

if TYPE_CHECKING:
    from ..runtime.evaluation import Comparison

# An exact step is judged against rounding noise measured on its reference (see NoiseFloor): the
# candidate and the reference each carry their own rounding, so their distance may reach twice one
# rounding's (KL, quadratic in small logit moves, four times).
MARGIN = 2.0
# A model whose greedy next token differs on more than 1 token in 100 is not the same model: an
# exact verdict needs this top-1 agreement, unless rounding alone, measured, flips more than half
# that on this model and text (near-ties: a nearly uniform model); then MARGIN x the measured flips.
# Within the max |dlogit| bound B a token's argmax can only flip where the reference's top two
# are within 2B: flips at such near-ties are what rounding does and pass (`max_flip_gap`).
MIN_TOP1_AGREEMENT = 0.99
HALF = ("bfloat16", "float16")  # the storage dtypes one rounding into which is measured (`NoiseFloor.storage`)
EXACT_KINDS = (Exactness.EXACT, Exactness.EXACT_SHIPPED_CODE, Exactness.EXACT_OLD_TOKENS)


@dataclass
class NoiseFloor:
    """How far rounding alone moves a reference model's logits, measured on that model and tokens.

    compute: the model evaluated in float32 against float64 (for a float64 model: its weights
      rounded to float32 and run so); what evaluating in the compute precision costs.
    storage: every weight of the model multiplied by (1 + d), d uniform in [-u, u] (seeded), u the
      unit roundoff of the half-precision dtype the output stores rounded tensors in: one rounding
      of every weight into that dtype, on any source (a bf16 source's own round trip would be the
      identity). None when nothing is stored coarser than float32.
    rope: the model run with the rotary frequencies a candidate's written rope parameters give its
      pairs (`WrittenRope`), where those are the model's own only up to float32 rounding (grow_head_dim
      by a non-integer ratio, `RotaryPairs.rounded`). Measured per candidate; None elsewhere.
    """
    compute: Comparison
    storage: Comparison | None = None
    storage_dtype: str | None = None  # "bfloat16" or "float16"
    rope: Comparison | None = None


@dataclass
class Bound:
    """The largest distance from its reference a step may show and still pass; `basis` says why."""
    max_logit_diff: float
    mean_logit_diff: float
    kl_divergence: float
    min_top1_agreement: float
    max_rel_change: float  # inf: the loss is not judged separately (exact steps: it follows from the logits)
    basis: str

    def exceeded(self, cmp: Comparison) -> list[str]:
        """One phrase per metric beyond its bound, e.g. 'max |dlogit| 8.1 > 0.35'."""
        out = []
        if not cmp.max_logit_diff <= self.max_logit_diff:
            out.append(f"max |dlogit| {cmp.max_logit_diff:.3g} > {self.max_logit_diff:.3g}")
        if not cmp.mean_logit_diff <= self.mean_logit_diff:
            out.append(f"mean |dlogit| {cmp.mean_logit_diff:.3g} > {self.mean_logit_diff:.3g}")
        if not cmp.kl_divergence <= self.kl_divergence:
            out.append(f"KL {cmp.kl_divergence:.3g} > {self.kl_divergence:.3g}")
        if not cmp.top1_agreement >= self.min_top1_agreement and not cmp.max_flip_gap <= 2 * self.max_logit_diff:
            out.append(f"top-1 agreement {cmp.top1_agreement:.4f} < {self.min_top1_agreement:.4f}"
                       + (f" (a flip where the reference's gap was {cmp.max_flip_gap:.3g} > 2 x {self.max_logit_diff:.3g})"
                          if math.isfinite(cmp.max_flip_gap) else ""))
        if not abs(cmp.rel_change) <= self.max_rel_change:
            out.append(f"|rel change| {abs(cmp.rel_change):.3g} > {self.max_rel_change:.3g}")
        return out

    def describe(self) -> str:
        parts = []
        if math.isfinite(self.max_logit_diff):
            parts.append(f"max |dlogit| <= {self.max_logit_diff:.3g}")  # mean |dlogit| is judged too, shown when beyond
        parts.append(f"KL <= {self.kl_divergence:.3g}")
        if self.min_top1_agreement > 0:
            parts.append(f"top-1 >= {self.min_top1_agreement:.4g}"
                         + (" or every flip a near-tie within 2x max |dlogit|" if math.isfinite(self.max_logit_diff) else ""))
        if math.isfinite(self.max_rel_change):
            parts.insert(0, f"|rel change| <= {self.max_rel_change:.3g}")
        return ", ".join(parts)

    def as_dict(self) -> dict:
        """For JSON: a metric not judged (an infinite bound) is None."""
        return {k: None if isinstance(v, float) and math.isinf(v) else v for k, v in self.__dict__.items()}


def _noise_parts(floor: NoiseFloor, rounded: bool) -> list[Comparison]:
    return ([floor.compute] + ([floor.storage] if rounded and floor.storage is not None else [])
            + ([floor.rope] if floor.rope is not None else []))


def exact_bound(floor: NoiseFloor, rounded: bool) -> Bound:
    """An exact step: the compute precision's noise, plus one storage rounding where the step's
    weights were rounded into half precision (the written output), plus the written rope frequencies'
    float32 rounding where the step has some, each times MARGIN."""
    parts = _noise_parts(floor, rounded)
    what = ("float32" + (f" + {floor.storage_dtype} rounding" if rounded and floor.storage is not None else "")
            + (" + written rope frequencies' float32 rounding" if floor.rope is not None else ""))
    return Bound(
        max_logit_diff=MARGIN * sum(c.max_logit_diff for c in parts),
        mean_logit_diff=MARGIN * sum(c.mean_logit_diff for c in parts),
        kl_divergence=MARGIN ** 2 * sum(c.kl_divergence for c in parts),
        min_top1_agreement=min(MIN_TOP1_AGREEMENT, 1 - MARGIN * sum(1 - c.top1_agreement for c in parts)),
        max_rel_change=math.inf,
        basis=f"{MARGIN:g}x measured {what} noise",
    )


def approximate_bound(tolerance: float, floor: NoiseFloor, rounded: bool, reference_loss: float) -> Bound:
    """The loss may move by `tolerance` either way, and KL(reference || output), the rise of the
    output's cross-entropy against the reference's own predictions, by tolerance x reference loss;
    the measured rounding noise comes on top. Logit distances and top-1 are reported, not judged."""
    parts = _noise_parts(floor, rounded)
    return Bound(
        max_logit_diff=math.inf, mean_logit_diff=math.inf,
        kl_divergence=tolerance * abs(reference_loss) + MARGIN ** 2 * sum(c.kl_divergence for c in parts),
        min_top1_agreement=0.0,
        max_rel_change=tolerance + MARGIN * sum(abs(c.rel_change) for c in parts),
        basis=f"tolerance {tolerance:g}",
    )


@dataclass
class Verdict:
    passed: bool | None  # None: an intermediate approximate step, reported but not judged
    rule: str
    failed: list[str] = field(default_factory=list)
    bound: Bound | None = None


def language_model_bound(vocab_size: int) -> float:
    """2 ln(vocab): the loss a model that still predicts stays under after a re-initialisation or a prune (a
    uniform guess scores ln(vocab))."""
    return 2 * math.log(vocab_size)


def judge(promise: Promise, cmp: Comparison, floor: NoiseFloor, tolerance: float, vocab_size: int,
          rounded: bool = False, prune_tolerance: float | None = None) -> Verdict:
    """Which rule applies to a step, and whether it held; `rounded`: the step's weights were
    stored in the floor's half-precision dtype."""
    if promise.exactness == Exactness.PRUNED:
        return judge_pruned(cmp, vocab_size, prune_tolerance)
    if promise.exactness == Exactness.REINIT:
        bound = language_model_bound(vocab_size)
        ok = cmp.loss <= bound
        return Verdict(ok, f"re-initialised: initial loss <= 2 ln(vocab) = {bound:.3f}",
                       [] if ok else [f"initial loss {cmp.loss:.3f} > {bound:.3f}"])
    exact = promise.exactness in EXACT_KINDS
    if exact:
        b, head = exact_bound(floor, rounded), promise.exactness.value
        if rounded and floor.storage_dtype is not None:
            head += f" up to {floor.storage_dtype} storage"
    else:
        b, head = approximate_bound(tolerance, floor, rounded, cmp.reference_loss), "approximate"
        if cmp.expected_rel_change is not None:  # judged on the old vocabulary: the new rows' mass is grow_vocab's own
            cmp = replace(cmp, rel_change=cmp.rel_change - cmp.expected_rel_change)
            head += f" (rel change net of the new rows' {cmp.expected_rel_change:+.3e})"
    failed = b.exceeded(cmp)
    rule = f"{head}: {b.describe()} ({b.basis})"
    if exact and cmp.expected_rel_change is not None:
        phrase, missed = grown_vocab_check(cmp, floor, rounded)
        rule += f"; {phrase}"
        failed += missed
    if failed:
        rule += "; beyond: " + ", ".join(failed)
    return Verdict(not failed, rule, failed, b)


def grown_vocab_check(cmp: Comparison, floor: NoiseFloor, rounded: bool) -> tuple[str, list[str]]:
    """Exact on the old tokens, second half: the loss moved by the new rows' mass and nothing else
    (the first half, old logits kept, is the exact bound on the first V logits)."""
    bound = MARGIN * sum(abs(c.rel_change) for c in _noise_parts(floor, rounded)) + cmp.loss_rounding
    off = abs(cmp.rel_change - cmp.expected_rel_change)
    phrase = (f"rel change = {cmp.expected_rel_change:+.3e} from the new rows' mass {cmp.new_rows_mass:.2e} "
              f"(+- {bound:.2g}: noise + float32 loss rounding)")
    return phrase, [] if off <= bound else [f"rel change {cmp.rel_change:+.3e} is {off:.2g} from the new rows' {cmp.expected_rel_change:+.3e}"]


def larger_noise(a: Comparison, b: Comparison) -> Comparison:
    """Per metric, the larger of two measured rounding noises."""
    return replace(a, max_logit_diff=max(a.max_logit_diff, b.max_logit_diff), mean_logit_diff=max(a.mean_logit_diff, b.mean_logit_diff),
                   kl_divergence=max(a.kl_divergence, b.kl_divergence), top1_agreement=min(a.top1_agreement, b.top1_agreement),
                   rel_change=a.rel_change if abs(a.rel_change) >= abs(b.rel_change) else b.rel_change)


def judge_pruned(cmp: Comparison, vocab_size: int, prune_tolerance: float | None) -> Verdict:
    """A prune changes the function on purpose: its loss change is measured and set beside a random prune's
    (`random_baseline`), not bounded, unless the recipe bounds it (`verify.prune_tolerance`). The model must
    still be a language model: its loss at most 2 ln(vocab), as after a re-initialisation."""
    bound = language_model_bound(vocab_size)
    failed = [] if cmp.loss <= bound else [f"loss {cmp.loss:.3f} > 2 ln(vocab) = {bound:.3f}"]
    if prune_tolerance is not None and not cmp.rel_change <= prune_tolerance:
        failed.append(f"rel change {cmp.rel_change:+.3g} > {prune_tolerance:g}")
    rule = pruned_rule(vocab_size, prune_tolerance)
    if failed:
        rule += "; beyond: " + ", ".join(failed)
    return Verdict(not failed, rule, failed)


def pruned_rule(vocab_size: int, prune_tolerance: float | None) -> str:
    return ("pruned: loss change measured" + (f", rel change <= {prune_tolerance:g}" if prune_tolerance is not None
                                              else " (not bounded: verify.prune_tolerance unset)")
            + f"; loss <= 2 ln(vocab) = {language_model_bound(vocab_size):.3f}")


def relative(loss: float, reference: float) -> float:
    """(loss - reference) / |reference|, as `runtime.evaluation.compare` states a loss change."""
    return (loss - reference) / abs(reference) if reference else math.inf
