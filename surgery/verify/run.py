"""Executing a schedule: the one path that runs verification's passes and judges each result.

`Execution` runs each pass of a `schedule.Schedule` once, in order, streamed layer by layer (`runtime`), and
judges every `Judgement` by its rule (`rules`). A pass's comparisons with references that ran before it are made
inside its own lm_head loop (`evaluation.evaluate(against=...)`), so no head is read twice for them. `verify_plan`
executes `schedule(plan)` after `surgery run` wrote its output and turns the judgements into the `Report`;
`pair.compare_checkpoints` executes `pair_schedule` for `surgery verify`. Memory holds one layer plus the
evaluations later judgements still need.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..io.grown_tokenizer import NewToken
from ..report import DeadSlice, ExpertSymmetry, Report, StepResult
from ..runtime.build import streamable
from ..runtime.evaluation import Comparison, Evaluation, compare, evaluate
from ..runtime.progress import QUIET, Progress
from ..runtime.sources import CheckpointSource, StateSource, TensorSource, open_source
from ..runtime.streamed import StreamedModel, WholeModel
from .cache import PassCache
from .data import calibration_ids, with_new_tokens
from .diagnosis import variance_culprit
from .experts import expert_symmetry
from .gradient_flow import dead_slices, whole_model_dead_slices
from .pruning import baseline_row, random_baseline
from .reference import DitheredSource, WrittenRope
from .rules import EXACT_KINDS, NoiseFloor, Verdict, judge, larger_noise, relative
from .schedule import OUTPUT, RANDOM, SOURCE, STATE, Judgement, Kind, Pass, Rate, Schedule, schedule, seconds_text

ROPE_BEYOND = "; the written rope frequencies differ from the reference's by more than float32 rounding"


@dataclass
class Judged:
    """A judgement's result: its comparison with its reference, the verdict, the noise floor it was judged against."""
    judgement: Judgement
    cmp: Comparison
    verdict: Verdict
    floor: NoiseFloor
    baseline: Comparison | None = None  # a prune's random baseline against the same reference


class Execution:
    """A schedule being run: each pass once, its evaluation kept while a later judgement still needs it.

    `models` gives the tensor source of each `schedule.Model`; `gradient_ids` and `slices` feed the gradient check."""

    def __init__(self, s: Schedule, models: Callable, ids: torch.Tensor, device: torch.device, progress: Progress = QUIET,
                 rate: Rate | None = None, gradient_ids: torch.Tensor | None = None, slices=None,
                 cache: PassCache | None = None):
        self.s, self.models, self.ids, self.device, self.progress = s, models, ids, device, progress
        self.cache = cache
        self.rate, self.gradient_ids, self.slices = rate, gradient_ids, slices
        self.done: dict[tuple, Evaluation] = {}
        self.compared: dict[tuple, Comparison] = {}  # (reference key, pass key): compared in the pass's head loop
        self.floors: dict[tuple, NoiseFloor] = {}
        self.rope: dict[tuple, Comparison] = {}
        self.dead: list[DeadSlice] = []
        self.symmetry: list[ExpertSymmetry] = []
        self.timed = False
        self.source_loss = float("nan")
        self.known = known_passes(s, cache)

    # passes -------------------------------------------------------------------------------------
    def evaluation(self, p: Pass) -> Evaluation:
        if p.key not in self.done:
            source = self.models(p.model)
            if p.kind == Kind.STORAGE_NOISE:
                source = DitheredSource(source, getattr(torch, self.s.storage))
            elif p.kind == Kind.ROPE_NOISE:
                raise AssertionError("rope noise runs per written frequencies: `rope_floor`")
            cached = self.cached(p)
            if cached is not None:
                with self.progress.phase(p.desc) as (_, summary):
                    summary.append(f"loss {cached.loss:.6f}, cached, skipped")
                self.done[p.key] = cached
            else:
                refs = self.references(p)
                ev = self._timed(p, lambda: evaluate(source, self.ids, self.device, getattr(torch, p.dtype), self.progress,
                                                     p.desc, against=tuple(self.done[r.key] for r in refs),
                                                     keep=self._needed_later(p.key, p.key)))
                self.compared.update({(r.key, p.key): c for r, c in zip(refs, ev.compared)})
                ev.compared = []
                self.done[p.key] = ev
                for key, done in self.done.items():  # kept logits no pass still to run compares with
                    if done.kept and not self._needed_later(key, p.key):
                        done.kept = {}
                if self.cache is not None and p == self.s.source.evaluate:
                    self.cache.put_evaluation(p.key, self.done[p.key])
        return self.done[p.key]

    def references(self, p: Pass) -> list[Pass]:
        """The passes `p`'s evaluation will be compared with that have run: compared inside its own head loop."""
        refs = self._reference_passes(p)
        return [r for k, r in refs.items() if k in self.done and k != p.key]

    def _needed_later(self, key: tuple, running: tuple) -> bool:
        """Whether a pass yet to run (not done, not `running`) is compared with the pass `key`: its logits are kept."""
        return any(key in self._reference_passes(q) and key != q.key
                   for q in self.s.passes if q.key not in self.done and q.key != running)

    def _reference_passes(self, p: Pass) -> dict[tuple, Pass]:
        refs = {}
        for r in (self.s.source, *(j.becomes for j in self.s.judgements if j.becomes is not None)):
            if p.key in {q.key for q in (r.compute, r.storage) if q is not None}:
                refs[r.evaluate.key] = r.evaluate
        for j in self.s.judgements:
            if p.key in {q.key for q in (j.candidate, j.baseline) if q is not None}:
                refs[j.reference.evaluate.key] = j.reference.evaluate
            if j.own_noise is not None and p.key == j.own_noise.key:
                refs[j.candidate.key] = j.candidate
            if j.rope is not None and p.key == j.rope.key:  # `rope_floor`
                refs[j.reference.evaluate.key] = j.reference.evaluate
        return refs

    def compare(self, ref: Pass, other: Pass) -> Comparison:
        """`other`'s evaluation compared with `ref`'s: from `other`'s own pass where `ref` ran before it."""
        reference, ev = self.evaluation(ref), self.evaluation(other)
        found = self.compared.get((ref.key, other.key))
        return found if found is not None else compare(reference, ev)

    def cached(self, p: Pass) -> Evaluation | None:
        """The source's evaluation from the cache, its head read from the source again when compared."""
        if self.cache is None or p != self.s.source.evaluate:
            return None
        dtype = getattr(torch, p.dtype)
        return self.cache.evaluation(p.key, lambda: StreamedModel(self.models(p.model), self.device, dtype), self.device)

    def _timed(self, p: Pass, run):
        """The first pass re-estimates the rest, said where that is 10 s or more and the estimate was off by over 1.5x."""
        t0 = time.perf_counter()
        out = run()
        if self.rate is not None and not self.timed and self.progress.enabled:
            rest = [q for q in self.s.passes if not q.when and q.key != p.key and q.key not in self.known]
            was = sum(self.rate.seconds(q) for q in rest)
            self.rate = self.rate.timed(time.perf_counter() - t0, p.units)
            now = sum(self.rate.seconds(q) for q in rest)
            if max(was, now) >= 10 and not was / 1.5 <= now <= was * 1.5:
                self.progress.note(f"verification: re-estimated from the first pass, ~ {seconds_text(now)} for the rest")
        self.timed = True
        return out

    def floor(self, ref) -> NoiseFloor:
        """A reference's measured noise floor: its compute noise and, where the output rounds into a half dtype, storage noise."""
        key = ref.evaluate.key
        if key not in self.floors:
            cached = self.cache.comparisons(floor_key(ref)) if self.cache is not None and ref == self.s.source else None
            if cached is not None:
                for p in (ref.compute, ref.storage):
                    if p is not None:
                        with self.progress.phase(p.desc) as (_, summary):
                            summary.append("cached, skipped")
                self.floors[key] = NoiseFloor(cached["compute"], cached["storage"], self.s.storage)
                return self.floors[key]
            self.evaluation(ref.evaluate)
            stored = None if ref.storage is None else self.compare(ref.evaluate, ref.storage)
            self.floors[key] = NoiseFloor(self.compare(ref.evaluate, ref.compute), stored, self.s.storage)
            if self.cache is not None and ref == self.s.source:
                self.cache.put_comparisons(floor_key(ref), {"compute": self.floors[key].compute, "storage": stored})
        return self.floors[key]

    def rope_floor(self, j: Judgement, floor: NoiseFloor) -> tuple[NoiseFloor, str]:
        """The floor plus what the candidate's written rope frequencies do to the reference; or what to add to a
        failed rule where they are further from the reference's than rounding."""
        written = WrittenRope(self.models(j.reference.evaluate.model), self.models(j.candidate.model).config, j.rope_pairs)
        if not written.rounding_only:
            return floor, ROPE_BEYOND
        key = (j.rope.key, written.key)
        if key not in self.rope:
            reference = self.evaluation(j.reference.evaluate)
            ev = self._timed(j.rope, lambda: evaluate(written, self.ids, self.device, getattr(torch, j.rope.dtype),
                                                      self.progress, j.rope.desc, against=(reference,)))
            self.rope[key] = ev.compared[0]
        return replace(floor, rope=self.rope[key]), ""

    def extra(self, p: Pass) -> None:
        """The gradient-flow check and expert symmetry of the written output."""
        source, dtype = self.models(p.model), getattr(torch, p.dtype)
        if p.kind == Kind.SYMMETRY:
            self.symmetry = expert_symmetry(source, self.ids, self.device, dtype, max_tokens=p.tokens, progress=self.progress)
        elif streamable(source.config):
            self.dead = dead_slices(source, self.gradient_ids, self.slices, self.device, dtype, max_tokens=p.tokens,
                                    progress=self.progress)
        else:  # an encoder-decoder (T5) runs whole
            self.dead = whole_model_dead_slices(WholeModel(source, self.device, dtype).model, self.gradient_ids, self.slices,
                                                max_tokens=p.tokens)

    # judging ------------------------------------------------------------------------------------
    def verdict(self, j: Judgement, cmp: Comparison, floor: NoiseFloor) -> Verdict:
        """`rules.judge`; an exact step beyond MARGIN x the reference's compute noise is judged again against the
        larger of that and the candidate's own, measured: a model whose sums are wider (clone_width) rounds more
        than its source, and the two may then differ by the sum of both roundings. That pass runs only on a miss."""
        s = self.s
        verdict = judge(j.promise, cmp, floor, s.tolerance, s.vocab_size, rounded=j.rounded, prune_tolerance=s.prune_tolerance)
        if j.own_noise is None or verdict.passed is not False or j.promise.exactness not in EXACT_KINDS:
            return verdict
        self.evaluation(j.candidate)
        own = self.compare(j.candidate, j.own_noise)
        if not own.max_logit_diff > floor.compute.max_logit_diff:
            return verdict
        second = judge(j.promise, cmp, replace(floor, compute=larger_noise(floor.compute, own)), s.tolerance, s.vocab_size,
                       rounded=j.rounded, prune_tolerance=s.prune_tolerance)
        second.rule += f" (its own {j.candidate.dtype} noise, measured, exceeds the reference's)"
        return second

    def judged(self, j: Judgement) -> Judged:
        self.evaluation(j.reference.evaluate)
        floor = self.floor(j.reference)
        self.evaluation(j.candidate)
        if j.final:
            for p in self.s.extra:
                self.extra(p)
        cmp = self.compare(j.reference.evaluate, j.candidate)
        beyond = ""
        if j.rope is not None:
            floor, beyond = self.rope_floor(j, floor)
        verdict = self.verdict(j, cmp, floor)
        if beyond and verdict.passed is False:
            verdict.rule += beyond
        if j.becomes is not None:
            self.floor(j.becomes)
        base = None if j.baseline is None else self.compare(j.reference.evaluate, j.baseline)
        if j.culprit is not None and verdict.passed is False:
            name, gain = variance_culprit(self.models(j.culprit.model), self.ids, self.device, getattr(torch, j.culprit.dtype),
                                          max_tokens=j.culprit.tokens)
            verdict.rule += f"; {name} amplifies its input's std {gain:.1f}x"
        if j.shown:
            verdict = Verdict(None, j.shown, [], verdict.bound)
        return Judged(j, cmp, verdict, floor, base)

    def run(self) -> list[Judged]:
        self.source_loss = self.evaluation(self.s.source.evaluate).loss
        self.floor(self.s.source)
        out = []
        for i, j in enumerate(self.s.judgements):
            out.append(self.judged(j))
            later = self.s.judgements[i + 1:]
            keep = {p.key for k in later for p in (*k.passes(), k.reference.evaluate)}
            self.done = {k: v for k, v in self.done.items() if k in keep}
        return out


def floor_key(ref) -> tuple:
    return (ref.evaluate.key, ref.compute.key, None if ref.storage is None else ref.storage.key)


def known_passes(s: Schedule, cache: PassCache | None) -> frozenset:
    """The keys of the passes whose answers the cache holds: they do not run."""
    if cache is None:
        return frozenset()
    known = set()
    if cache.has_evaluation(s.source.evaluate.key):
        known.add(s.source.evaluate.key)
    if cache.comparisons(floor_key(s.source)) is not None:
        known |= {p.key for p in (s.source.compute, s.source.storage) if p is not None}
    return frozenset(known)


def announce(s: Schedule, tokens: int, device: torch.device, progress: Progress, known: frozenset = frozenset()) -> Rate:
    """The rate the estimate assumes, after saying, before any work, what will run and for about how long."""
    rate = Rate.assumed(s.parameters, tokens, device.type, torch.get_num_threads())
    progress.note(s.headline(rate, known))
    return rate


class PlanModels:
    """The tensor source of each model a plan's schedule runs; the random baseline also says what it dropped."""

    def __init__(self, p, out_dir: Path):
        self.p, self.out_dir, self.sources, self.dropped = p, out_dir, {}, {}

    def __call__(self, model) -> TensorSource:
        key = (model.kind, model.op_index)
        if key not in self.sources:
            p = self.p
            step = p.steps[model.op_index] if model.op_index is not None else None
            if model.kind == SOURCE:
                self.sources[key] = CheckpointSource(p.checkpoint, str(p.source_dir))
            elif model.kind == OUTPUT:
                self.sources[key] = open_source(self.out_dir)
            elif model.kind == STATE:
                self.sources[key] = StateSource(step.state, p.checkpoint, f"after {model.label}")
            elif model.kind == RANDOM:
                base, self.dropped[model.op_index] = random_baseline(p, step)
                self.sources[key] = StateSource(base, p.checkpoint, f"ops[{step.index}] {step.op.op} with importance: random")
            else:
                raise AssertionError(f"a plan has no {model.kind} model")
        return self.sources[key]


def verify_plan(p, out_dir: Path, device: torch.device, ids: torch.Tensor | None = None, progress: Progress = QUIET,
                rate: Rate | None = None, source_hash: str | None = None) -> Report:
    """Loss and logits of the source, of every intermediate step (per_op), and of the written output, as
    `schedule(p)` says; `rate`: the estimate already announced (else it is announced here, and again where the cache skips passes). `source_hash`: the
    source's content hash; with it (and `verify.cache`), the source's passes are cached (`cache.PassCache`)."""
    s = schedule(p)
    v = p.loaded.recipe.verify
    if ids is None:
        ids = calibration_ids(p.source_dir, v.data, v.max_tokens, p.initial.spec.vocab_size, p.loaded.recipe.seed)
    models = PlanModels(p, out_dir)
    cache = None
    if source_hash is not None and v.cache and streamable(models(s.source.evaluate.model).config):
        cache = PassCache(source_hash, ids, device, s.storage)
    known = known_passes(s, cache)
    if rate is None or known:  # not said yet, or the cache skips passes the run's first line counted
        rate = announce(s, int(ids.shape[1]), device, progress, known)
    added = p.final.spec.meta.added_tokens
    ex = Execution(s, models, ids, device, progress, rate, with_new_tokens(ids, added), p.final.output_slices(), cache)
    results = ex.run()
    source_loss = ex.source_loss
    steps = [step_result(r, source_loss) for r in results if r.judgement.row]
    pruning = [baseline_row(p.steps[r.judgement.op_index], p.steps[r.judgement.op_index].promise.pruning, r.cmp, r.baseline,
                            models.dropped.get(r.judgement.op_index), source_loss, r.judgement.reference.label)
               for r in results if r.judgement.prune]
    final = results[-1]
    cmp, verdict = final.cmp, final.verdict
    ok, rule = verdict.passed, verdict.rule
    failing = next((s for s in steps if s.passed is False), None)
    if ok and failing is not None:  # a judged earlier state (or the math before rounding) broke its promise
        ok, rule = False, f"{failing.op}: {failing.rule}"
    if ex.dead:
        ok = False
        rule += f"; {len(ex.dead)} new slice(s) get no gradient"
    wrong = tokenizer_problems(out_dir, added)
    if wrong:
        ok = False
        rule += f"; tokenizer: {wrong[0]}" + (f" and {len(wrong) - 1} more" if len(wrong) > 1 else "")
    floor = final.floor
    return Report(
        loss_source=source_loss, loss_output=cmp.loss, rel_change=relative(cmp.loss, source_loss),
        rel_change_vs_reference=cmp.rel_change, max_logit_diff=cmp.max_logit_diff,
        mean_logit_diff=cmp.mean_logit_diff, top1_agreement=cmp.top1_agreement, kl_divergence=cmp.kl_divergence, passed=ok, rule=rule,
        promise=f"{p.promise.exactness.value}: {p.promise.reason}", params_source=p.initial.num_parameters,
        params_output=p.final.num_parameters, tokens=int(ids.shape[1]),
        precision=s.dtype + (f" compute, rounded weights stored as {s.storage} (judged against measured "
                             f"{s.storage} rounding noise)" if s.storage else ""),
        steps=steps, broken_by=broken_by(steps, p) if not ok else None, dead_slices=ex.dead, expert_symmetry=ex.symmetry,
        reference=final.judgement.reference.label, pruning=pruning,
        bound=verdict.bound.as_dict() if verdict.bound else None, failed=verdict.failed,
        noise_floor={"compute": asdict(floor.compute), "storage": asdict(floor.storage) if floor.storage else None,
                     "rope": asdict(floor.rope) if floor.rope else None},
    )


def step_result(r: Judged, source_loss: float) -> StepResult:
    j, cmp = r.judgement, r.cmp
    return StepResult(op=j.row, loss=cmp.loss, rel_change=relative(cmp.loss, source_loss), max_logit_diff=cmp.max_logit_diff,
                      exactness=j.promise.exactness.value, rule=r.verdict.rule, passed=r.verdict.passed, op_index=j.op_index,
                      kl_divergence=cmp.kl_divergence, top1_agreement=cmp.top1_agreement, reference=j.reference.label,
                      rel_change_vs_reference=cmp.rel_change)


def broken_by(steps: list[StepResult], p) -> str | None:
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


def tokenizer_problems(out_dir: Path, added: list[NewToken] | None) -> list[str]:
    """Each added token, encoded by the output's tokenizer as users load it, must be exactly its one planned id."""
    if not added:
        return []
    from ..io.grown_tokenizer import load_tokenizer

    tok = load_tokenizer(out_dir)
    out = []
    for a in added:
        got = tok(a.content, add_special_tokens=False)["input_ids"]
        if got != [a.id]:
            out.append(f"{a.content!r} encodes as {got}, not [{a.id}]")
    return out
