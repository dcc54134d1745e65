"""What verification will run and how each result will be judged, computed from a plan without torch.

`schedule(plan)` is the one statement of it: `surgery plan` prints it, `surgery run` executes it
(`verify.run`), and `pair_schedule` is the same for `surgery verify`. A `Pass` runs one model once (which
model: the source, the state after ops[i] from the lazy graph, the written output, a random-baseline prune;
in which dtype; for what); a `Judgement` compares one pass's evaluation with a reference's and names the
rule that judges it. Each pass has a stable `key`, so a pass whose answer is already known can be skipped.
Its cost is counted in `units`: one streamed forward pass of the source at the verification tokens.

Steps are compared with the source, or, after a reset (`reinit`, a prune), with the state right after the
latest one, which is judged by its loss: what later ops promise is relative to it.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from ..ops.base import RESETS, Exactness, Promise
from .rules import EXACT_KINDS, MARGIN, MIN_TOP1_AGREEMENT, language_model_bound, pruned_rule

# Models a pass can run.
SOURCE, STATE, OUTPUT, RANDOM, REFERENCE, CANDIDATE = "source", "state", "output", "random prune", "reference", "candidate"
GRADIENT_TOKENS = 128
TOKENS_PER_EXPERT = 16
INFORMATIONAL = "approximate so far: informational, later ops may restore it"


class Kind(str, enum.Enum):
    EVALUATE = "evaluate"  # the model in the compute dtype: loss, hidden states, logits on demand
    STORAGE_NOISE = "storage noise"  # every weight rounded once into the storage dtype (dithered)
    COMPUTE_NOISE = "compute noise"  # the model in the probe dtype (float64; float32 for a float64 model)
    ROPE_NOISE = "rope noise"  # the reference run with a candidate's written rotary frequencies
    GRADIENT = "gradient check"  # every new unit made trainable receives gradient
    SYMMETRY = "expert symmetry"  # upcycled experts separate after one step
    OWN_NOISE = "own noise"  # an exact miss: the candidate in the probe dtype, its own rounding measured
    CULPRIT = "variance culprit"  # a failed re-initialisation: the linear layer that amplifies most


# cost of each kind, in forward passes of the model it runs at the verification tokens (float64 ~2x on CPU;
# a local backward ~2x its forward)
COST = {Kind.EVALUATE: 1.0, Kind.STORAGE_NOISE: 1.0, Kind.COMPUTE_NOISE: 2.0, Kind.ROPE_NOISE: 1.0, Kind.GRADIENT: 3.0,
        Kind.SYMMETRY: 5.0, Kind.OWN_NOISE: 2.0, Kind.CULPRIT: 1.0}


@dataclass(frozen=True)
class Model:
    """Which model a pass runs: `kind` (SOURCE, STATE after ops[op_index], OUTPUT, RANDOM: the prune ops[op_index]
    with importance: random, or `surgery verify`'s REFERENCE and CANDIDATE), and its label in progress lines."""
    kind: str
    op_index: int | None = None
    label: str = ""


@dataclass(frozen=True)
class Pass:
    kind: Kind
    model: Model
    dtype: str
    desc: str  # what its progress line says
    units: float  # its cost in forward passes of the source at the verification tokens
    when: str = ""  # empty: always; else the condition it runs on
    rope_of: Model | None = None  # ROPE_NOISE: the candidate whose written frequencies the reference runs with
    tokens: int | None = None  # GRADIENT, SYMMETRY, CULPRIT: tokens it runs on (None: all)

    @property
    def key(self) -> tuple:
        """The same model, dtype and question give the same key: with the schedule's `inputs`, the key of the answer."""
        return (self.kind.value, self.model.kind, self.model.op_index, self.dtype,
                None if self.rope_of is None else self.rope_of.op_index)

    @property
    def phase(self) -> str:
        if self.kind == Kind.EVALUATE:
            names = {SOURCE: "source", REFERENCE: "reference", CANDIDATE: "candidate", RANDOM: "random baseline"}
            return names.get(self.model.kind, "step")
        if self.kind in (Kind.STORAGE_NOISE, Kind.COMPUTE_NOISE, Kind.ROPE_NOISE, Kind.OWN_NOISE):
            return "noise floor"
        return self.kind.value


@dataclass(frozen=True)
class Reference:
    """What judgements are compared with: a model's evaluation and the passes that measure its noise floor."""
    label: str
    evaluate: Pass
    compute: Pass
    storage: Pass | None = None


@dataclass(frozen=True)
class Judgement:
    """One report row: a candidate's evaluation compared with its reference's and judged by its promise's rule."""
    row: str  # the report row's op text ("": none, a plain copy's verdict is the report's own)
    op_index: int | None
    candidate: Pass
    reference: Reference
    promise: Promise
    rule: str  # the rule, as stated before any weight is read
    rounded: bool = False  # its weights were rounded into the storage dtype (the written output)
    own_noise: Pass | None = None  # an exact miss is judged again against the larger of both measured noises
    rope: Pass | None = None  # the reference with the candidate's written rope frequencies (into its noise floor)
    rope_pairs: tuple[int, ...] | None = None  # where the reference's rotary pairs sit in the candidate
    shown: str = ""  # informational: replaces the verdict (passed None) with this rule
    prune: bool = False  # a prune: reported beside `baseline`, the same prune with importance: random
    baseline: Pass | None = None
    culprit: Pass | None = None  # a re-initialisation that fails names its most amplifying layer
    becomes: Reference | None = None  # a reset: the reference of the judgements after it
    final: bool = False  # the written output (or the copy)

    def passes(self) -> list[Pass]:
        """In the order they run."""
        after = [self.becomes.storage, self.becomes.compute] if self.becomes is not None else []
        return [p for p in [self.candidate, self.rope, self.own_noise, *after, self.baseline, self.culprit] if p is not None]


@dataclass(frozen=True)
class Schedule:
    source: Reference
    judgements: tuple[Judgement, ...]
    extra: tuple[Pass, ...]  # after the final candidate's evaluation: the gradient check, expert symmetry
    dtype: str  # the compute dtype
    storage: str | None  # the half dtype rounded output tensors are stored in
    vocab_size: int
    tolerance: float
    prune_tolerance: float | None
    inputs: tuple = ()  # (data, max tokens, seed): with a pass's key and the source's content, what its answer depends on
    parameters: int = 0  # the source's (active) parameters: what one unit of cost runs

    @property
    def passes(self) -> list[Pass]:
        """Every pass once, in the order the run reaches them (conditional ones where they would run)."""
        out: dict[tuple, Pass] = {}
        for p in (self.source.evaluate, self.source.storage, self.source.compute):
            if p is not None:
                out.setdefault(p.key, p)
        for j in self.judgements:
            for p in j.passes()[:1] + (list(self.extra) if j.final else []) + j.passes()[1:]:
                out.setdefault(p.key, p)
        return list(out.values())

    def planned_rule(self) -> str:
        """How verification will judge the output: each reset's rule and the final one (`surgery plan`'s `verify:`)."""
        return "; ".join(j.rule for j in self.judgements if j.becomes is not None or j.final)

    def estimate(self, rate: Rate, known: frozenset = frozenset()) -> float:
        return sum(rate.seconds(p) for p in self.passes if not p.when and p.key not in known)

    def headline(self, rate: Rate, known: frozenset = frozenset()) -> str:
        """`verification: 7 passes (source, noise floor x2, 3 steps, gradient check) ~ 40 s`; passes whose answers
        are `known` (their keys: cached) are not counted: `(1 step; cached, skipped: source, noise floor)`."""
        run = [p for p in self.passes if not p.when and p.key not in known]
        skipped = [p for p in self.passes if not p.when and p.key in known]
        cached = f"; cached, skipped: {_phases(skipped)}" if skipped else ""
        return f"verification: {len(run)} passes ({_phases(run)}{cached}) ~ {seconds_text(self.estimate(rate, known))}"

    def describe(self, rate: Rate) -> list[str]:
        """The passes in order, what each is for, and the estimate: `surgery plan`'s verification section."""
        purpose = {self.source.evaluate.key: "the reference"}
        for j in self.judgements:
            against = "the source" if j.reference.label == "source" else f"the state after {j.reference.label}"
            purpose[j.candidate.key] = (f"{j.promise.exactness.value} against {against}" + (", informational" if j.shown else "")
                                        + ("; the reference from here on" if j.becomes is not None else ""))
            if j.baseline is not None:
                purpose[j.baseline.key] = "beside it: the same prune with importance: random"
            if j.rope is not None:
                purpose[j.rope.key] = "what the float32 rounding of the written rope frequencies does"
        for p in self.extra:
            purpose[p.key] = (f"every new unit gets gradient ({p.tokens} tokens)" if p.kind == Kind.GRADIENT
                              else f"upcycled experts separate after one step ({p.tokens} tokens)")
        lines = [self.headline(rate) + f" at {rate.describe()}"]
        for i, p in enumerate(self.passes, start=1):
            what = f"only if {p.when}" if p.when else purpose.get(p.key, "")
            lines.append(f"  {i:>2}. {p.desc} [{p.dtype}]" + (f": {what}" if what else ""))
        return lines


def _phases(passes: list[Pass]) -> str:
    counts: dict[str, int] = {}
    for p in passes:
        counts[p.phase] = counts.get(p.phase, 0) + 1
    return ", ".join(f"{n} step{'s' * (n > 1)}" if phase == "step" else phase if n == 1 else f"{phase} x{n}"
                     for phase, n in counts.items())


@dataclass(frozen=True)
class Rate:
    """Seconds a pass takes: a fixed start (building the model) plus its units times the seconds of one unit, from
    the FLOPs of a forward pass (2 x active parameters x tokens) at an assumed throughput, or measured (`timed`)."""
    overhead: float
    unit: float
    basis: str

    @classmethod
    def assumed(cls, parameters: int, tokens: int, device: str = "cpu", threads: int = 1) -> Rate:
        flops = 2.0 * parameters * tokens
        per_second = 10e12 if device == "cuda" else 25e9 * max(threads, 1)
        return cls(0.1, flops / per_second, f"an assumed {per_second / 1e9:g} GFLOP/s on {device}")

    def timed(self, seconds: float, units: float = 1.0) -> Rate:
        """The rate a pass of `units` that took `seconds` implies."""
        return Rate(self.overhead, max(seconds - self.overhead, 0.0) / units, f"the first pass ({seconds:.1f} s)")

    def seconds(self, p: Pass) -> float:
        return self.overhead + p.units * self.unit

    def describe(self) -> str:
        return self.basis


def seconds_text(s: float) -> str:
    return f"{max(s, 1):.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def gradient_tokens(spec) -> int:
    """Tokens the gradient-flow check runs on: 128, or, in a mixture of experts, enough that each expert
    expects 16 routed tokens (T k / E >= 16): an expert no token reaches gets no gradient on that batch,
    which is the data's doing, not a dead unit's."""
    if not spec.arch.is_moe:
        return GRADIENT_TOKENS
    return max(GRADIENT_TOKENS, -(-TOKENS_PER_EXPERT * spec.num_experts // spec.experts_per_token))


def written_rope(p, since: int | None, step) -> tuple[int, ...] | None:
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


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def reference_passes(model: Model, dtype: str, storage: str | None, units: float) -> Reference:
    probe = "float64" if dtype != "float64" else "float32"
    return Reference(
        model.label,
        Pass(Kind.EVALUATE, model, dtype, f"evaluating {model.label}", units),
        Pass(Kind.COMPUTE_NOISE, model, probe, f"noise floor: {model.label} in {probe}", COST[Kind.COMPUTE_NOISE] * units),
        None if storage is None else Pass(Kind.STORAGE_NOISE, model, dtype, f"noise floor: {model.label} with {storage} rounding",
                                          COST[Kind.STORAGE_NOISE] * units))


def stated_rule(promise: Promise, against: str, tolerance: float, noise: str) -> str:
    """The approximate or exact rule, as `surgery plan` states it."""
    if promise.exactness == Exactness.APPROXIMATE:
        return (f"approximate against {against}: |rel loss change| <= {tolerance:g} and KL <= {tolerance:g} x its loss, "
                f"plus {MARGIN:g}x the rounding noise measured on it ({noise})")
    return (f"{promise.exactness.value} against {against}: max/mean |dlogit| and KL within {MARGIN:g}x the rounding noise "
            f"measured on it ({noise}), top-1 agreement >= {MIN_TOP1_AGREEMENT} (lower only where the measured rounding flips more)")


def reset_rule(step, vocab: int, prune_tolerance: float | None) -> str:
    if step.promise.exactness == Exactness.REINIT:
        return f"ops[{step.index}] reinit: initial loss <= 2 ln(vocab) = {language_model_bound(vocab):.3f}"
    return (f"ops[{step.index}] {step.op.op}: " + pruned_rule(vocab, prune_tolerance)
            + (", beside the same prune with importance: random" if step.op.model_dump().get("importance") != "random" else ""))


def schedule(p) -> Schedule:
    """Every pass and judgement verification of `p` (a `plan.Plan`) will run, in order."""
    v = p.loaded.recipe.verify
    dtype = "float64" if any(_dtype_name(t.dtype) == "float64" for t in p.initial.tensors.values()) else "float32"
    probe = "float64" if dtype != "float64" else "float32"
    storage = p.rounded_storage
    vocab = p.initial.spec.vocab_size
    size = p.initial.active_parameters or 1

    def units(state, kind: Kind = Kind.EVALUATE, tokens: int | None = None) -> float:
        return COST[kind] * state.active_parameters / size * (min(tokens, v.max_tokens) / v.max_tokens if tokens else 1.0)

    source = reference_passes(Model(SOURCE, None, "source"), dtype, storage, 1.0)
    resets = [s.index for s in p.steps if s.promise.exactness in RESETS]
    noise = "float32 evaluation" + (f", one {storage} rounding of every weight" if storage else "")
    ref, out, extra = source, [], []
    if not p.steps:
        cand = Pass(Kind.EVALUATE, Model(OUTPUT, None, "output"), dtype, "evaluating output", units(p.final))
        out.append(Judgement("", None, cand, source, p.promise, stated_rule(p.promise, "the source", v.tolerance, noise),
                             rounded=storage is not None, final=True))
    for i, step in enumerate(p.steps):
        last = i == len(p.steps) - 1
        new_reference = step.index in resets and not last
        closes = last or p.steps[i + 1].index in resets  # the state a reset is about to replace closes what was promised
        if not (v.per_op or closes or new_reference):
            continue
        since = max((r for r in resets if r < step.index), default=None)
        promise = step.cumulative if since is None else p.promise_after(since, step)
        label = f"ops[{step.index}] {step.op.op}"
        state = Model(STATE, step.index, label)
        against = "the source" if since is None else f"the state after ops[{since}]"
        to = written_rope(p, since, step)
        exact = promise.exactness in EXACT_KINDS
        rope_noise = (", the written rope frequencies' float32 rounding (it is measured on that model run with them)"
                      if exact and to is not None else "")
        rule = (reset_rule(step, vocab, v.prune_tolerance) if step.index in resets
                else stated_rule(promise, against, v.tolerance, noise + rope_noise))

        def own(model: Model, state_=step.state) -> Pass | None:
            return Pass(Kind.OWN_NOISE, model, probe, f"noise floor: {label if model.kind != OUTPUT else 'output'} in {probe}",
                        units(state_, Kind.OWN_NOISE), when="the exact rule misses: its own noise may exceed the reference's") \
                if exact else None

        def rope(of: Model) -> Pass | None:
            return None if to is None else Pass(Kind.ROPE_NOISE, ref.evaluate.model, dtype,
                                                f"noise floor: {ref.label} with the written rope frequencies",
                                                units(step.state), rope_of=of)
        if last and v.per_op and storage:  # the exact math, judged at float precision before storage rounds it
            cand = Pass(Kind.EVALUATE, state, dtype, f"evaluating {label} before {storage} rounding", units(step.state))
            shown = (f"{promise.exactness.value}: judged on the written output"
                     if promise.exactness in (Exactness.APPROXIMATE, Exactness.PRUNED) else "")
            before = rule if step.index in resets else stated_rule(promise, against, v.tolerance, "float32 evaluation" + rope_noise)
            out.append(Judgement(f"{step.op.label()} [before {storage} rounding]", step.index, cand, ref, promise, shown or before,
                                 own_noise=own(state), rope=rope(state), rope_pairs=to, shown=shown))
            if exact:
                rule += f"; with per_op, the state before {storage} rounding within the float32 noise alone"
        becomes = None
        if last:
            model = Model(OUTPUT, step.index, "output")
            cand = Pass(Kind.EVALUATE, model, dtype, "evaluating output", units(p.final))
            slices = p.final.output_slices()
            tokens = gradient_tokens(p.final.spec)
            if slices:
                extra.append(Pass(Kind.GRADIENT, model, dtype, "gradient-flow check", units(p.final, Kind.GRADIENT, tokens),
                                  tokens=tokens))
            if p.final.spec.arch.is_moe and not p.final.spec.config.get("is_encoder_decoder"):
                extra.append(Pass(Kind.SYMMETRY, model, dtype, "expert symmetry", units(p.final, Kind.SYMMETRY, tokens),
                                  tokens=tokens))
            if step.index not in resets:
                rule = "; ".join([rule] + vocab_rules(p, promise))
        elif new_reference:
            becomes = reference_passes(state, dtype, storage, units(step.state))
            cand = becomes.evaluate
        else:
            cand = Pass(Kind.EVALUATE, state, dtype, f"evaluating {label}", units(step.state))
        baseline = None
        if step.promise.pruning is not None and step.promise.pruning.importance != "random":  # else its own baseline
            baseline = Pass(Kind.EVALUATE, Model(RANDOM, step.index, f"{label}'s random baseline"), dtype,
                            f"evaluating {label}'s random baseline", units(step.state))
        culprit = None
        if promise.exactness == Exactness.REINIT:
            culprit = Pass(Kind.CULPRIT, cand.model, dtype, f"the linear layer that amplifies most in {cand.model.label}",
                           units(step.state, Kind.CULPRIT, 256), when="the re-initialised loss is above its bound", tokens=256)
        shown = INFORMATIONAL if not closes and promise.exactness == Exactness.APPROXIMATE else ""
        out.append(Judgement(step.op.label(), step.index, cand, ref, promise, shown or rule, rounded=last and storage is not None,
                             own_noise=None if new_reference else own(cand.model, p.final if last else step.state),
                             rope=None if new_reference else rope(cand.model), rope_pairs=None if new_reference else to,
                             shown=shown, prune=step.promise.pruning is not None, baseline=baseline, culprit=culprit,
                             becomes=becomes, final=last))
        ref = becomes or ref
    return Schedule(source, tuple(out), tuple(extra), dtype, storage, vocab, v.tolerance, v.prune_tolerance,
                    (v.data, v.max_tokens, p.loaded.recipe.seed), size)


def vocab_rules(p, promise: Promise) -> list[str]:
    """What a grown vocabulary and added tokens add to the final rule."""
    parts = []
    old_vocab, new_vocab = p.initial.spec.vocab_size, p.final.spec.vocab_size
    if new_vocab > old_vocab:
        parts.append(f"logits on the first {old_vocab} tokens; " + (
            "the loss judged net of the new rows' share of the normaliser" if promise.exactness == Exactness.APPROXIMATE else
            f"the loss change must equal the {new_vocab - old_vocab} new rows' share of the normaliser, mean log(1 + "
            "sum_new e^z / sum_old e^z), within that noise plus the float32 rounding of the loss"))
    if p.final.spec.meta.added_tokens:
        parts.append("each added token encodes, with the output's AutoTokenizer, as its one planned id")
    return parts


def pair_schedule(dtype: str, storage: str | None, tolerance: float | None, parameters: int = 0, data: str = "",
                  max_tokens: int = 0) -> Schedule:
    """`surgery verify CANDIDATE --against REFERENCE`: the candidate judged against the reference, exact (the same
    function up to measured rounding noise) or, with a tolerance, approximate."""
    ref = reference_passes(Model(REFERENCE, None, "reference"), dtype, storage, 1.0)
    probe = "float64" if dtype != "float64" else "float32"
    cand = Model(CANDIDATE, None, "candidate")
    promise = Promise(Exactness.EXACT if tolerance is None else Exactness.APPROXIMATE, "surgery verify")
    noise = "float32 evaluation" + (f", one {storage} rounding of every weight" if storage else "")
    own = Pass(Kind.OWN_NOISE, cand, probe, f"noise floor: candidate in {probe}", COST[Kind.OWN_NOISE],
               when="the exact rule misses: its own noise may exceed the reference's") if tolerance is None else None
    j = Judgement("candidate", None, Pass(Kind.EVALUATE, cand, dtype, "evaluating candidate", 1.0), ref, promise,
                  stated_rule(promise, "the reference", tolerance or 0.0, noise), rounded=storage is not None, own_noise=own,
                  final=True)
    return Schedule(ref, (j,), (), dtype, storage, 0, tolerance or 0.0, None, (data, max_tokens), parameters)
