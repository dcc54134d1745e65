"""Proof that the function was kept: loss and logits of source and output, run by transformers.

Every comparison runs the models with stock transformers code (or the code shipped with a patched
checkpoint), in float32 by default, on the same tokens, one decoder layer at a time (`runner`).
Each step is judged by the rule its promise implies, on its logits: exact ops against rounding
noise measured on the reference (`NoiseFloor`, `exact_bound`), approximate ones against the recipe
tolerance, both ways (`approximate_bound`), re-initialisations by their initial loss. `Comparison`
(produced block by block by `runner.compare`) is what evaluation hands to judging.
"""
from __future__ import annotations

import builtins
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import SurgeryError
from .gradient_flow import dead_slices, dead_units as dead_units_of, expert_symmetry, one_sgd_step
from .lazy import generator
from .importance import Importance
from .ops import RESETS, Exactness, Promise
from .report import DeadSlice, ExpertSymmetry, PruningRow, RandomPrune, Report, StepResult
from .runtime.build import disk_layout, streamable
from .runtime.evaluation import Comparison, Evaluation, compare, evaluate
from .runtime.progress import QUIET, Progress
from .runtime.sources import CheckpointSource, StateSource, TensorSource, open_source
from .runtime.streamed import StreamedModel, WholeModel

if TYPE_CHECKING:
    from .plan import Plan
    from .state import ModelState

ASSETS = Path(__file__).resolve().parent / "assets"
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
HALF = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def license_text() -> str:
    """The Python license as the running interpreter prints it (the article's data)."""
    printer = getattr(builtins, "license", None)
    try:
        printer._Printer__setup()
        text = "\n".join(printer._Printer__lines)
        if len(text) > 1000:
            return text
    except AttributeError:
        pass
    return (ASSETS / "python-license.txt").read_text()


def load_text(data: str) -> str:
    if data == "builtin:python-license":
        return license_text()
    p = Path(data).expanduser()
    if p.is_dir() and any((p / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        return dataset_text(p)
    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise SurgeryError("directory holds no .txt files", where=f"verify.data {data}")
        return "\n\n".join(f.read_text(errors="replace") for f in files)
    if p.is_file():
        return p.read_text(errors="replace")
    raise SurgeryError("not found: use builtin:python-license, a text file, a directory of .txt files, or a dataset saved "
                       "with datasets' save_to_disk", where=f"verify.data {data}")


def dataset_text(path: Path, max_chars: int = 2_000_000) -> str:
    """The text column of a local dataset (`datasets.save_to_disk`); `datasets` is optional."""
    try:
        import datasets
    except ImportError:
        raise SurgeryError("a dataset directory needs the `datasets` package: pip install datasets", where=str(path)) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["validation"] if "validation" in ds else ds[sorted(ds)[0]]
    column = "text" if "text" in ds.column_names else next(
        (c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")), None)
    if column is None:
        raise SurgeryError(f"no text column in the dataset (columns: {', '.join(ds.column_names)})", where=str(path))
    parts, size = [], 0
    for row in ds:
        parts.append(row[column])
        size += len(row[column])
        if size >= max_chars:
            break
    return "\n\n".join(parts)


def tokenize(source_dir: Path, data: str, max_tokens: int) -> torch.Tensor:
    from .io.tokenizer import text_encoder

    encode = text_encoder(source_dir)
    ids = torch.tensor([encode(load_text(data))], dtype=torch.long)[:, :max_tokens]
    if ids.shape[1] < 2:
        raise SurgeryError("verification data gives fewer than 2 tokens", where=f"verify.data {data}")
    return ids


def calibration_ids(source_dir: Path, data: str, max_tokens: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """The verification tokens: the data tokenized by the source's tokenizer, or `random` seeded ids
    (for a model that ships no tokenizer)."""
    if data == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (1, max_tokens), generator=g)
    return tokenize(source_dir, data, max_tokens)


def grown_vocab_check(cmp: Comparison, floor: NoiseFloor, rounded: bool) -> tuple[str, list[str]]:
    """Exact on the old tokens, second half: the loss moved by the new rows' mass and nothing else
    (the first half, old logits kept, is the exact bound on the first V logits)."""
    bound = MARGIN * sum(abs(c.rel_change) for c in _noise_parts(floor, rounded)) + cmp.loss_rounding
    off = abs(cmp.rel_change - cmp.expected_rel_change)
    phrase = (f"rel change = {cmp.expected_rel_change:+.3e} from the new rows' mass {cmp.new_rows_mass:.2e} "
              f"(+- {bound:.2g}: noise + float32 loss rounding)")
    return phrase, [] if off <= bound else [f"rel change {cmp.rel_change:+.3e} is {off:.2g} from the new rows' {cmp.expected_rel_change:+.3e}"]


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
    storage_dtype: torch.dtype | None = None
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
    what = ("float32" + (f" + {HALF[floor.storage_dtype]} rounding" if rounded and floor.storage is not None else "")
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
            head += f" up to {HALF[floor.storage_dtype]} storage"
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


EXACT_KINDS = (Exactness.EXACT, Exactness.EXACT_SHIPPED_CODE, Exactness.EXACT_OLD_TOKENS)


def larger_noise(a: Comparison, b: Comparison) -> Comparison:
    """Per metric, the larger of two measured rounding noises."""
    return replace(a, max_logit_diff=max(a.max_logit_diff, b.max_logit_diff), mean_logit_diff=max(a.mean_logit_diff, b.mean_logit_diff),
                   kl_divergence=max(a.kl_divergence, b.kl_divergence), top1_agreement=min(a.top1_agreement, b.top1_agreement),
                   rel_change=a.rel_change if abs(a.rel_change) >= abs(b.rel_change) else b.rel_change)


GRADIENT_TOKENS = 128
TOKENS_PER_EXPERT = 16


def gradient_tokens(spec) -> int:
    """Tokens the gradient-flow check runs on: 128, or, in a mixture of experts, enough that each expert
    expects 16 routed tokens (T k / E >= 16): an expert no token reaches gets no gradient on that batch,
    which is the data's doing, not a dead unit's."""
    if not spec.arch.is_moe:
        return GRADIENT_TOKENS
    return max(GRADIENT_TOKENS, -(-TOKENS_PER_EXPERT * spec.num_experts // spec.experts_per_token))


def judge_measured(promise: Promise, cmp: Comparison, floor: NoiseFloor, tolerance: float, vocab_size: int,
                   candidate: TensorSource, evaluation: Evaluation, ids: torch.Tensor, device: torch.device,
                   dtype: torch.dtype, progress: Progress = QUIET, label: str = "candidate", rounded: bool = False,
                   prune_tolerance: float | None = None) -> Verdict:
    """`judge`; an exact step beyond MARGIN x the reference's compute noise is judged again against the larger of
    that and the candidate's own, measured: a model whose sums are wider (clone_width) rounds more than its
    source, and the two may then differ by the sum of both roundings. The extra pass runs only on such a miss."""
    verdict = judge(promise, cmp, floor, tolerance, vocab_size, rounded=rounded, prune_tolerance=prune_tolerance)
    if verdict.passed is not False or promise.exactness not in EXACT_KINDS:
        return verdict
    probe_dtype = torch.float64 if dtype != torch.float64 else torch.float32
    own = compare(evaluation, evaluate(candidate, ids, device, probe_dtype, progress, f"noise floor: {label} in {_name(probe_dtype)}"))
    if not own.max_logit_diff > floor.compute.max_logit_diff:
        return verdict
    second = judge(promise, cmp, replace(floor, compute=larger_noise(floor.compute, own)), tolerance, vocab_size,
                   rounded=rounded, prune_tolerance=prune_tolerance)
    second.rule += f" (its own {_name(dtype)} noise, measured, exceeds the reference's)"
    return second


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


def random_baseline(p: "Plan", step) -> tuple["ModelState", list]:
    """The state a prune step would leave with importance: random and the same sizes (its seeded baseline),
    and what that prune dropped."""
    from .ops import OpContext

    pruning = step.promise.pruning
    op = type(step.op).model_validate(pruning.random_baseline)
    pos = p.steps.index(step)
    state = (p.steps[pos - 1].state if pos else p.initial).copy()
    promise = op.apply(state, OpContext(seed=p.loaded.recipe.seed, index=step.index, measure=True))
    return state, promise.pruning.dropped


MAX_REPORTED_SCORES = 200_000


def relative(loss: float, reference: float) -> float:
    """(loss - reference) / |reference|, as `runner.compare` states a loss change."""
    return (loss - reference) / abs(reference) if reference else math.inf


def baseline_row(step, pruning, cmp: Comparison, base: Comparison | None, dropped: list | None, source_loss: float,
                 reference: str = "source") -> PruningRow:
    """A prune beside its random baseline (None: the prune is random, its own baseline), for the report. `rel_change`
    is against the source, as on every row; `rel_change_vs_reference` against `reference`, the state it pruned."""
    m = pruning.measurement.scores if pruning.measurement is not None else None
    return PruningRow(
        op_index=step.index, op=step.op.label(),
        importance=pruning.importance.value if pruning.importance else "listed",
        unit=pruning.unit, kept_per_layer=pruning.kept_per_layer, of=pruning.of,
        tokens=pruning.measurement.tokens if pruning.measurement is not None else 0,
        dropped=pruning.dropped,
        loss=cmp.loss, rel_change=relative(cmp.loss, source_loss), rel_change_vs_reference=cmp.rel_change,
        reference=reference, kl_divergence=cmp.kl_divergence, top1_agreement=cmp.top1_agreement,
        random=None if base is None else RandomPrune(
            loss=base.loss, rel_change=relative(base.loss, source_loss), rel_change_vs_reference=base.rel_change,
            kl_divergence=base.kl_divergence, top1_agreement=base.top1_agreement, max_logit_diff=base.max_logit_diff,
            dropped=dropped),
        beats_random=None if base is None else cmp.loss < base.loss,
        # every score for the plot, up to MAX_REPORTED_SCORES numbers (a 70B model's 2.3M neuron scores: per layer min/median/max)
        scores=m.tolist() if m is not None and m.numel() <= MAX_REPORTED_SCORES else None,
        score_summary=[[float(r.min()), float(r.median()), float(r.max())] for r in m] if m is not None and m.dim() == 2 else None,
    )


def with_new_tokens(ids: torch.Tensor, added: list[dict] | None) -> torch.Tensor:
    """Ids for the gradient check: added tokens first, so their input rows can get gradient too."""
    if not added:
        return ids
    new = torch.tensor([[a["id"] for a in added]], dtype=ids.dtype)
    return torch.cat([new, ids], dim=1)


def whole_model_dead_slices(model, ids: torch.Tensor, slices, max_tokens: int = 128, lr: float = 1e-3) -> list[DeadSlice]:
    """Every new unit made trainable must receive gradient: one it never gets is dead.

    A unit (one index of a new slice) is judged on the first backward pass, and, where it got
    exactly zero, again after one small SGD step: some units are only one step from the signal
    (with tied embeddings the last writer of the new residual dims waits for the embedding's new
    columns to move). Zero gradient on both passes means zero on both sides: a saddle it never leaves.
    """
    if not slices:
        return []
    params = dict(model.named_parameters())
    x = ids[:, :max_tokens].to(next(model.parameters()).device)

    def dead_units() -> dict[int, int]:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            model(input_ids=x, labels=x).loss.backward()
        grads = disk_layout(model, {n: p.grad for n, p in params.items() if p.grad is not None})
        return dead_units_of(grads, slices, range(len(slices)), "")

    dead = dead_units()
    if dead:
        with one_sgd_step(params, {n: p.grad for n, p in params.items()}, lr):
            dead = {i: n for i, n in dead_units().items() if i in dead}
    model.zero_grad(set_to_none=True)
    return [DeadSlice(slices[i].tensor, slices[i].op, n, len(slices[i].index)) for i, n in dead.items()]


def variance_culprit(source: TensorSource, ids: torch.Tensor, device: torch.device, dtype: torch.dtype,
                     max_tokens: int = 256) -> tuple[str, float]:
    """The linear layer whose output std is largest relative to its input's: the usual reason a
    re-initialised model starts far above ln(vocab) (an lm_head drawn with std 1, seed 004).
    Streamed: each layer's linears are watched while that layer is in memory; lm_head's output is
    the logits, whose std is accumulated block by block."""
    gains: dict[str, float] = {}

    def watch(module: torch.nn.Module, prefix: str):
        hooks = []
        for name, mod in module.named_modules():
            if isinstance(mod, torch.nn.Linear):
                def hook(m, inp, out, name=prefix + name):
                    i = float(inp[0].float().std())
                    gains[name] = max(gains.get(name, 0.0), float(out.float().std()) / i if i > 0 else 0.0)
                hooks.append(mod.register_forward_hook(hook))
        return hooks

    if not streamable(source.config):  # T5: run whole, every linear watched
        model = WholeModel(source, device, dtype).model
        hooks = watch(model, "")
        try:
            x = ids[:, :max_tokens].to(device)
            with torch.no_grad():
                model(input_ids=x, labels=x)  # labels: the decoder needs its inputs
        finally:
            for h in hooks:
                h.remove()
        name = max(gains, key=gains.get)
        return name, gains[name]
    sm = StreamedModel(source, device, dtype)
    sm.on_layer = lambda i, layer, prefix: watch(layer, prefix)
    h = sm.hidden(ids[:, :max_tokens])
    w, b = sm.head_weights()
    n, s1, s2 = 0, 0.0, 0.0
    step = max(1, (32 * 2**20) // (8 * h.shape[0]))
    for start in range(0, w.shape[0], step):
        z = sm.logits(h, w, b, start, min(w.shape[0], start + step), transform=False).double()
        n, s1, s2 = n + z.numel(), s1 + float(z.sum()), s2 + float((z * z).sum())
    i = float(h.float().std())
    out = math.sqrt(max(s2 - s1 * s1 / n, 0.0) / max(n - 1, 1))
    gains[sm.head_prefix.rstrip(".")] = out / i if i > 0 else 0.0
    name = max(gains, key=gains.get)
    return name, gains[name]


@dataclass
class Reference:
    """What later steps are compared with: the source, or the state right after the last reinit."""
    label: str
    evaluation: Evaluation  # in the compute dtype
    floor: NoiseFloor
    source: TensorSource | None = None


class WrittenRope:
    """A reference run with the rotary frequencies a candidate's config gives the reference's pairs
    (`RotaryPairs.to`: pair i of the reference is the candidate's pair to[i]), computed by transformers
    from that config: what the float32 rounding of the written rope parameters alone does to it.

    `rounding_only`: each of those frequencies f is within float32 rounding of the reference's own.
    Each side computes theta ** -e in float32 with e, theta, the power and the reciprocal each rounded
    (unit roundoff u): a relative error up to (|ln f| + 4) u per side if the power is correctly
    rounded; 4 (|ln f| + 4) u in all allows each side twice that. Frequencies further apart are a
    different model, not rounding, and get no allowance."""

    def __init__(self, inner: TensorSource, candidate_config: dict, to: tuple[int, ...]):
        from .runtime.build import skeleton

        self.inner, self.config, self.where = inner, inner.config, inner.where
        theirs = skeleton(candidate_config, torch.float32, torch.device("cpu")).named_buffers()
        self.frequencies = {n: b[list(to)].clone() for n, b in theirs if n.endswith("inv_freq")}
        self.key = tuple((n, tuple(b.tolist())) for n, b in sorted(self.frequencies.items()))
        own = dict(skeleton(inner.config, torch.float32, torch.device("cpu")).named_buffers())
        u = torch.finfo(torch.float32).eps / 2
        self.rounding_only = bool(self.frequencies) and all(
            n in own and own[n].shape == f.shape
            and bool(((f.double() / own[n].double() - 1).abs() <= 4 * (own[n].double().log().abs() + 4) * u).all())
            for n, f in self.frequencies.items())

    def names(self):
        return self.inner.names()

    def load(self, name, device, dtype):
        return self.inner.load(name, device, dtype)

    def buffers(self, model) -> dict[str, torch.Tensor]:
        return {n: self.frequencies[n] for n, b in model.named_buffers()
                if n in self.frequencies and b.shape == self.frequencies[n].shape}


def written_rope(p: "Plan", since: int | None, step) -> tuple[int, ...] | None:
    """Where the reference's rotary pairs are in `step`'s state (the reference: the source, or the state
    after ops[since]), if a step between them writes rope parameters that round their frequencies."""
    to, rounded = None, False
    for s in p.steps:
        r = s.promise.rotary
        if r is None or s.index > step.index or (since is not None and s.index <= since):
            continue
        to = r.to if to is None else tuple(r.to[j] for j in to)
        rounded = rounded or r.rounded is not None
    return to if rounded else None


class DitheredSource:
    """Another source whose every weight is multiplied by (1 + d), d uniform in [-u, u] with u the unit
    roundoff of `dtype`: one rounding into `dtype` as the standard model of floating point has it,
    seeded per tensor name (a tied head sees its embedding's dither)."""

    def __init__(self, inner: TensorSource, dtype: torch.dtype, seed: int = 0):
        self.inner, self.u, self.seed = inner, torch.finfo(dtype).eps / 2, seed
        self.config, self.where = inner.config, inner.where

    def names(self):
        return self.inner.names()

    def load(self, name, device, dtype):
        w = self.inner.load(name, device, dtype)
        if not w.is_floating_point():
            return w
        d = 2 * torch.rand(w.shape, generator=generator("dither", self.seed, name), dtype=w.dtype) - 1
        return w.mul_(1 + self.u * d.to(w.device))


def measure_reference(label: str, source: TensorSource, ids: torch.Tensor, device: torch.device, dtype: torch.dtype,
                      storage: torch.dtype | None, progress: Progress = QUIET) -> Reference:
    """Evaluate a reference and measure its noise floor (each model streamed layer by layer)."""
    ev = evaluate(source, ids, device, dtype, progress, f"evaluating {label}")
    stored = None
    if storage is not None:
        stored = compare(ev, evaluate(DitheredSource(source, storage), ids, device, dtype, progress,
                                      f"noise floor: {label} with {_name(storage)} rounding"))
    probe_dtype = torch.float64 if dtype != torch.float64 else torch.float32
    probe = evaluate(source, ids, device, probe_dtype, progress, f"noise floor: {label} in {_name(probe_dtype)}")
    return Reference(label, ev, NoiseFloor(compare(ev, probe), stored, storage), source)


def verify_plan(p: Plan, out_dir: Path, device: torch.device, ids: torch.Tensor | None = None,
                progress: Progress = QUIET) -> Report:
    """Loss and logits of the source, of every intermediate step (per_op), and of the written output.

    Steps are compared with the source, or, after a `reinit`, with the state right after the latest
    one (which itself is judged by its initial loss): what later ops promise is relative to it.
    Every model runs layer by layer (`runner`): the source and the output from their files, each
    intermediate step from the lazy tensor graph, so memory holds one layer, never a model.
    """
    from .execute import compute_dtype_for

    v = p.loaded.recipe.verify
    dtype = compute_dtype_for(p.initial)
    if ids is None:
        ids = calibration_ids(p.source_dir, v.data, v.max_tokens, p.initial.spec.vocab_size, p.loaded.recipe.seed)
    storage = half_storage(p)
    vocab = p.initial.spec.vocab_size
    ref = measure_reference("source", CheckpointSource(p.checkpoint, str(p.source_dir)), ids, device, dtype, storage, progress)
    source = ref
    resets = [s.index for s in p.steps if s.promise.exactness in RESETS]  # each a new reference
    steps: list[StepResult] = []
    pruning: list[PruningRow] = []
    dead: list[DeadSlice] = []
    symmetry: list[ExpertSymmetry] = []
    final = None
    final_floor = ref.floor
    rope_noise: dict[tuple, Comparison] = {}

    def judged(promise, cmp, floor, candidate: TensorSource, evaluation: Evaluation, label: str, rounded: bool = False) -> Verdict:
        return judge_measured(promise, cmp, floor, v.tolerance, vocab, candidate, evaluation, ids, device, dtype, progress,
                              label, rounded, v.prune_tolerance)

    def floor_for(reference: Reference, since: int | None, step, candidate: TensorSource) -> tuple[NoiseFloor, str]:
        """The reference's floor, plus what the candidate's written rope frequencies do to the reference;
        and what to add to a failed rule where they are further from the reference's than rounding."""
        to = written_rope(p, since, step)
        if to is None:
            return reference.floor, ""
        written = WrittenRope(reference.source, candidate.config, to)
        if not written.rounding_only:
            return reference.floor, "; the written rope frequencies differ from the reference's by more than float32 rounding"
        key = (reference.label, written.key)
        if key not in rope_noise:
            rope_noise[key] = compare(reference.evaluation, evaluate(
                written, ids, device, dtype, progress, f"noise floor: {reference.label} with the written rope frequencies"))
        return replace(reference.floor, rope=rope_noise[key]), ""

    def judged_against(reference: Reference, since: int | None, step, promise, cmp, candidate: TensorSource,
                       evaluation: Evaluation, label: str, rounded: bool = False) -> tuple[Verdict, NoiseFloor]:
        floor, beyond = floor_for(reference, since, step, candidate)
        verdict = judged(promise, cmp, floor, candidate, evaluation, label, rounded)
        if beyond and verdict.passed is False:
            verdict.rule += beyond
        return verdict, floor

    for i, step in enumerate(p.steps):
        last = i == len(p.steps) - 1
        new_reference = step.index in resets and not last
        # the state a reinit is about to replace closes what was promised against the previous reference
        closes = last or p.steps[i + 1].index in resets
        if not (v.per_op or closes or new_reference):
            continue
        since = max((r for r in resets if r < step.index), default=None)
        promise = step.cumulative if since is None else _promise_after(p, since, step)
        before = ref
        label = f"ops[{step.index}] {step.op.op}"
        if last and v.per_op and storage is not None:  # the exact math, judged at float precision before storage rounds it
            exact_math = StateSource(step.state, p.checkpoint, f"after {label}")
            ev = evaluate(exact_math, ids, device, dtype, progress, f"evaluating {label} before {_name(storage)} rounding")
            cmp = compare(ref.evaluation, ev)
            verdict, _ = judged_against(ref, since, step, promise, cmp, exact_math, ev, label)
            if promise.exactness in (Exactness.APPROXIMATE, Exactness.PRUNED):
                verdict = Verdict(None, f"{promise.exactness.value}: judged on the written output", [], verdict.bound)
            steps.append(step_result(f"{step.op.label()} [before {_name(storage)} rounding]", step.index, cmp, verdict,
                                     promise, source.evaluation.loss, ref.label))
        if last:
            evaluated = open_source(out_dir)
            grad_ids = with_new_tokens(ids, p.final.spec.meta.get("added_tokens"))
            ev = evaluate(evaluated, ids, device, dtype, progress, "evaluating output")
            cmp = compare(ref.evaluation, ev)
            if streamable(evaluated.config):
                tokens = gradient_tokens(p.final.spec)
                dead = dead_slices(evaluated, grad_ids, p.final.output_slices(), device, dtype, max_tokens=tokens,
                                   progress=progress)
                symmetry = expert_symmetry(evaluated, ids, device, dtype, max_tokens=tokens, progress=progress)
            else:  # an encoder-decoder (T5) runs whole
                dead = whole_model_dead_slices(WholeModel(evaluated, device, dtype).model, grad_ids, p.final.output_slices())
            verdict, final_floor = judged_against(ref, since, step, promise, cmp, evaluated, ev, "output",
                                                  rounded=storage is not None)
        elif new_reference:
            evaluated = StateSource(step.state, p.checkpoint, f"after {label}")
            ref = measure_reference(label, evaluated, ids, device, dtype, storage, progress)
            cmp = compare(before.evaluation, ref.evaluation)
            verdict = judge(promise, cmp, before.floor, v.tolerance, vocab, prune_tolerance=v.prune_tolerance)
        else:
            evaluated = StateSource(step.state, p.checkpoint, f"after {label}")
            ev = evaluate(evaluated, ids, device, dtype, progress, f"evaluating {label}")
            cmp = compare(ref.evaluation, ev)
            verdict, _ = judged_against(ref, since, step, promise, cmp, evaluated, ev, label)
        if step.promise.pruning is not None:
            bcmp, dropped = None, None
            if step.promise.pruning.importance != Importance.RANDOM:  # a random prune is its own baseline
                base, dropped = random_baseline(p, step)
                bcmp = compare(before.evaluation, evaluate(StateSource(base, p.checkpoint, f"{label} with importance: random"),
                                                           ids, device, dtype, progress, f"evaluating {label}'s random baseline"))
            pruning.append(baseline_row(step, step.promise.pruning, cmp, bcmp, dropped, source.evaluation.loss, before.label))
        if verdict.passed is False and promise.exactness == Exactness.REINIT:
            name, gain = variance_culprit(evaluated, ids, device, dtype)
            verdict.rule += f"; {name} amplifies its input's std {gain:.1f}x"
        if not closes and promise.exactness == Exactness.APPROXIMATE:
            verdict = Verdict(None, "approximate so far: informational, later ops may restore it", [], verdict.bound)
        steps.append(step_result(step.op.label(), step.index, cmp, verdict, promise, source.evaluation.loss, before.label))
        if last:
            final = (cmp, verdict)
            final_reference = before.label
    if final is None:  # no ops: a plain copy
        final_reference = ref.label
        cmp = compare(ref.evaluation, evaluate(open_source(out_dir), ids, device, dtype, progress, "evaluating output"))
        final = (cmp, judge(p.promise, cmp, ref.floor, v.tolerance, vocab, rounded=storage is not None))
    cmp, verdict = final
    ok, rule = verdict.passed, verdict.rule
    failing = next((s for s in steps if s.passed is False), None)
    if ok and failing is not None:  # a judged earlier state (or the math before rounding) broke its promise
        ok, rule = False, f"{failing.op}: {failing.rule}"
    if dead:
        ok = False
        rule += f"; {len(dead)} new slice(s) get no gradient"
    wrong = tokenizer_problems(out_dir, p.final.spec.meta.get("added_tokens"))
    if wrong:
        ok = False
        rule += f"; tokenizer: {wrong[0]}" + (f" and {len(wrong) - 1} more" if len(wrong) > 1 else "")
    broken = broken_by(steps, p) if not ok else None
    return Report(
        loss_source=source.evaluation.loss, loss_output=cmp.loss, rel_change=relative(cmp.loss, source.evaluation.loss),
        rel_change_vs_reference=cmp.rel_change, max_logit_diff=cmp.max_logit_diff,
        mean_logit_diff=cmp.mean_logit_diff, top1_agreement=cmp.top1_agreement, kl_divergence=cmp.kl_divergence, passed=ok, rule=rule,
        promise=f"{p.promise.exactness.value}: {p.promise.reason}", params_source=p.initial.num_parameters,
        params_output=p.final.num_parameters, tokens=int(ids.shape[1]),
        precision=_name(dtype) + (f" compute, rounded weights stored as {_name(storage)} (judged against measured "
                                  f"{_name(storage)} rounding noise)" if storage else ""),
        steps=steps, broken_by=broken, dead_slices=dead, expert_symmetry=symmetry, reference=final_reference,
        pruning=pruning,
        bound=verdict.bound.as_dict() if verdict.bound else None, failed=verdict.failed,
        noise_floor={"compute": asdict(ref.floor.compute), "storage": asdict(ref.floor.storage) if ref.floor.storage else None,
                     "rope": asdict(final_floor.rope) if final_floor.rope else None},
    )


def step_result(row: str, op_index: int, cmp: Comparison, verdict: Verdict, promise: Promise, source_loss: float,
                reference: str) -> StepResult:
    return StepResult(op=row, loss=cmp.loss, rel_change=relative(cmp.loss, source_loss), max_logit_diff=cmp.max_logit_diff,
                      exactness=promise.exactness.value, rule=verdict.rule, passed=verdict.passed, op_index=op_index,
                      kl_divergence=cmp.kl_divergence, top1_agreement=cmp.top1_agreement, reference=reference,
                      rel_change_vs_reference=cmp.rel_change)


def planned_rule(p: Plan) -> str:
    """How verification will judge the output, said before any weight is read (`surgery plan`)."""
    v = p.loaded.recipe.verify
    storage = half_storage(p)
    noise = "float32 evaluation" + (f", one {HALF[storage]} rounding of every weight" if storage else "")
    resets = [s for s in p.steps if s.promise.exactness in RESETS]
    promise, parts = p.promise, []
    for r in resets:
        if r.promise.exactness == Exactness.REINIT:
            parts.append(f"ops[{r.index}] reinit: initial loss <= 2 ln(vocab) = {language_model_bound(p.initial.spec.vocab_size):.3f}")
        else:
            parts.append(f"ops[{r.index}] {r.op.op}: " + pruned_rule(p.initial.spec.vocab_size, v.prune_tolerance)
                         + (", beside the same prune with importance: random" if r.op.model_dump().get("importance") != "random"
                            else ""))
    reinit_at = resets[-1].index if resets else None
    if reinit_at is not None:
        if reinit_at == p.steps[-1].index:
            return "; ".join(parts)
        promise = _promise_after(p, reinit_at, p.steps[-1])
    against = f"the state after ops[{reinit_at}]" if reinit_at is not None else "the source"
    if promise.exactness == Exactness.APPROXIMATE:
        parts.append(f"approximate against {against}: |rel loss change| <= {v.tolerance:g} and KL <= {v.tolerance:g} x its loss, "
                     f"plus {MARGIN:g}x the rounding noise measured on it ({noise})")
    else:
        if p.steps and written_rope(p, reinit_at, p.steps[-1]) is not None:
            noise += ", the written rope frequencies' float32 rounding (it is measured on that model run with them)"
        parts.append(f"{promise.exactness.value} against {against}: max/mean |dlogit| and KL within {MARGIN:g}x the rounding noise "
                     f"measured on it ({noise}), top-1 agreement >= {MIN_TOP1_AGREEMENT} (lower only where the measured rounding flips more)"
                     + (f"; with per_op, the state before {HALF[storage]} rounding within the float32 noise alone"
                        if storage and v.per_op else ""))
    old_vocab, new_vocab = p.initial.spec.vocab_size, p.final.spec.vocab_size
    if new_vocab > old_vocab:
        parts.append(f"logits on the first {old_vocab} tokens; " + (
            "the loss judged net of the new rows' share of the normaliser" if promise.exactness == Exactness.APPROXIMATE else
            f"the loss change must equal the {new_vocab - old_vocab} new rows' share of the normaliser, mean log(1 + "
            "sum_new e^z / sum_old e^z), within that noise plus the float32 rounding of the loss"))
    if p.final.spec.meta.get("added_tokens"):
        parts.append("each added token encodes, with the output's AutoTokenizer, as its one planned id")
    return "; ".join(parts)


def broken_by(steps: list[StepResult], p: Plan) -> str | None:
    """The op (or the ops) between the last state that passed and the first that failed: with
    per_op: false or approximate intermediate steps, one state cannot name one op."""
    good = -1  # the source
    for s in steps:
        if s.passed is False:
            first = good + 1
            if first == s.op_index:
                return f"ops[{first}] {p.steps[first].op.op}"
            return f"one of ops[{first}..{s.op_index}] ({', '.join(st.op.op for st in p.steps[first:s.op_index + 1])})"
        if s.passed:
            good = s.op_index
    return None


def _promise_after(p: Plan, start: int, step) -> Promise:
    """What the ops after the re-init at ops[start] promise, relative to the state it left."""
    from .plan import cumulative_promise

    pr = cumulative_promise([s.promise for s in p.steps if start < s.index <= step.index], step.state.spec)
    return Promise(pr.exactness, f"relative to the state after ops[{start}] {p.steps[start].op.op}: {pr.reason}")


def tokenizer_problems(out_dir: Path, added: list[dict] | None) -> list[str]:
    """Each added token, encoded by the output's tokenizer as users load it, must be exactly its one planned id."""
    if not added:
        return []
    from .io.grown_tokenizer import load_tokenizer

    tok = load_tokenizer(out_dir)
    out = []
    for a in added:
        got = tok(a["content"], add_special_tokens=False)["input_ids"]
        if got != [a["id"]]:
            out.append(f"{a['content']!r} encodes as {got}, not [{a['id']}]")
    return out


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def half_storage(p: Plan) -> torch.dtype | None:
    """The half-precision dtype the output rounds computed or cast tensors into (the coarser of
    bfloat16 and float16 if both), else None. Tensors that only move stored values (copies, pads,
    permutations, kept slices) or draw new ones from statistics round nothing that was computed:
    `storage_exact` says so, and they are written in the storage dtype."""
    from .execute import output_tensors
    from .lazy import storage_exact

    out = p.loaded.recipe.output_spec
    rounded = {target for _, node, target in output_tensors(p.final, out.dtype if out else "auto")
               if target in HALF and (node.fn is not None or node.dtype != target) and not storage_exact(node, target)}
    return max(rounded, key=lambda d: torch.finfo(d).eps) if rounded else None

