"""Compiling a recipe against a source: every op applied to the spec and lazy tensors, no weights read.

The result is a `Plan`: the state after each op (config, tensor shapes, parameter count), what each
op promises, and the op graph (networkx) whose edges say which op consumes what an earlier one
changed. `surgery plan` prints it; `surgery run` executes its final state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import networkx as nx

from .calibration import Calibration
from .errors import SurgeryError
from .execute import half_storage
from .io.checkpoint import Checkpoint
from .io.resolve import open_checkpoint
from .ops import Exactness, Op, OpContext, Promise
from .recipe.loader import LoadedRecipe
from .spec import ModelSpec, _first_line, config_errors, hf_config
from .verify.data import calibration_ids as tokens_of
from .verify.schedule import schedule
from .state import ModelState, read_ties

_RANK = {Exactness.EXACT: 0, Exactness.EXACT_OLD_TOKENS: 1, Exactness.EXACT_SHIPPED_CODE: 2, Exactness.APPROXIMATE: 3,
         Exactness.PRUNED: 4, Exactness.REINIT: 5}


@dataclass
class Step:
    index: int
    op: Op
    state: ModelState
    promise: Promise  # what this op alone promises
    cumulative: Promise  # what the model after this op promises relative to the source
    config_changes: dict[str, tuple] = field(default_factory=dict)
    touched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    param_delta: int = 0


@dataclass
class Plan:
    loaded: LoadedRecipe
    source_dir: Path
    checkpoint: Checkpoint
    initial: ModelState
    steps: list[Step]
    graph: nx.DiGraph

    @property
    def final(self) -> ModelState:
        return self.steps[-1].state if self.steps else self.initial

    @property
    def promise(self) -> Promise:
        return self.steps[-1].cumulative if self.steps else Promise(Exactness.EXACT, "a plain copy")

    def states(self) -> list[ModelState]:
        return [self.initial] + [s.state for s in self.steps]

    @cached_property
    def warnings(self) -> list[str]:
        """What `surgery run` will refuse although the plan holds: a source tokenizer that verification
        (text data) or new tokens need and that does not load. Looked at when first asked for."""
        from .io.tokenizer import text_encoder

        if not self.source_dir.is_dir() or (self.loaded.recipe.verify.data == "random"
                                            and not self.final.spec.meta.added_tokens):
            return []
        try:
            text_encoder(self.source_dir)
        except SurgeryError as e:
            return [f"surgery run will refuse: {e}"]
        return []

    def promise_after(self, start: int, step: Step) -> Promise:
        """What the ops after the reset at ops[start] (a reinit, a prune) promise, relative to the state it left."""
        pr = cumulative_promise([s.promise for s in self.steps if start < s.index <= step.index], step.state.spec)
        return Promise(pr.exactness, f"relative to the state after ops[{start}] {self.steps[start].op.op}: {pr.reason}")

    @property
    def rounded_storage(self) -> str | None:
        """The half dtype ("bfloat16", "float16") the output rounds computed tensors into (`execute.half_storage`)."""
        out = self.loaded.recipe.output_spec
        dtype = half_storage(self.final, out.dtype if out else "auto")
        return None if dtype is None else str(dtype).replace("torch.", "")


def state_promise(spec: ModelSpec) -> list[tuple[Exactness, str]]:
    """What the model's current state owes to conditions no single op controls."""
    out = []
    if spec.norm_width != spec.hidden_size:
        out.append((Exactness.APPROXIMATE, f"norms still expect width {spec.norm_width}, residual is {spec.hidden_size} (add rescale_norm)"))
    if spec.meta.layernorm_zero_padded:
        out.append((Exactness.APPROXIMATE, "stock LayerNorm centres over zero-padded dims (add patch_layernorm, or grow with residual_fill: mean)"))
    if spec.live_width:
        out.append((Exactness.EXACT_SHIPPED_CODE, "patched LayerNorm shipped as modeling_surgery.py"))
    return out


def cumulative_promise(promises: list[Promise], spec: ModelSpec) -> Promise:
    items = [(p.exactness, p.reason) for p in promises] + state_promise(spec)
    worst = max((e for e, _ in items), key=_RANK.get, default=Exactness.EXACT)
    if worst == Exactness.EXACT:
        return Promise(Exactness.EXACT, "every op so far is exact in stock transformers code")
    reasons = [r for e, r in items if e == worst]
    if worst == Exactness.EXACT_SHIPPED_CODE:  # a grown vocabulary's promise still holds under shipped code
        reasons += [r for e, r in items if e == Exactness.EXACT_OLD_TOKENS]
    return Promise(worst, "; ".join(dict.fromkeys(reasons)))


def _check_config(spec: ModelSpec, loaded: LoadedRecipe, i: int) -> None:
    """transformers must accept the config an op produces, or the output would not load."""
    try:
        hf_config(spec.config)
    except config_errors() as e:
        raise loaded.error(SurgeryError(f"transformers rejects the resulting config: {_first_line(e)}", loc=("ops", i))) from None


def _diff_config(before: dict, after: dict) -> dict[str, tuple]:
    keys = [k for k in dict.fromkeys(list(before) + list(after)) if k not in ("transformers_version", "auto_map")]
    return {k: (before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)}


def op_graph(ops: list[Op]) -> nx.DiGraph:
    """Op i -> op j when j reads a field or tensor group that i (the latest such op) writes."""
    g = nx.DiGraph()
    g.add_node("source", writes=("*",))
    last_writer: dict[str, object] = {}
    for i, op in enumerate(ops):
        node = (i, op.op)
        g.add_node(node, reads=op.reads, writes=op.writes)
        for r in op.reads:
            g.add_edge(last_writer.get(r, "source"), node, via=r)
        for w in op.writes:
            last_writer[w] = node
    assert nx.is_directed_acyclic_graph(g)
    return g


def compile_plan(loaded: LoadedRecipe, source_dir: Path, checkpoint: Checkpoint | None = None,
                 calibration_ids=None, measure: bool = False, device=None, progress=None) -> Plan:
    """`measure`: make the choices that need the weights or data now (pruning importance), as a run does;
    without it those are left to the run and the plan says so."""
    ckpt = checkpoint or open_checkpoint(source_dir)
    v = loaded.recipe.verify
    if calibration_ids is None:
        vocab = int(ckpt.config.get("vocab_size") or 0)
        tokens = lambda: tokens_of(source_dir, v.data, v.max_tokens, vocab, loaded.recipe.seed)  # noqa: E731
    else:
        tokens = lambda: calibration_ids  # noqa: E731
    calibration = Calibration(ckpt, tokens, device, progress)
    spec = ModelSpec.from_config(ckpt.config, where=str(source_dir / "config.json"))
    read_ties(spec, ckpt)
    initial = ModelState.from_checkpoint(spec, ckpt.tensors, where=str(source_dir))
    recipe = loaded.recipe
    steps: list[Step] = []
    state = initial
    promises: list[Promise] = []
    arch = spec.arch
    for i, op in enumerate(recipe.ops):
        if arch.ops is not None and op.op not in arch.ops:
            raise loaded.error(SurgeryError(f"{op.op} is refused for {arch.name}: {arch.ops_refusal}; supported: "
                                            f"{', '.join(arch.ops)}", loc=("ops", i)))
        nxt = state.copy()
        try:
            promise = op.apply(nxt, OpContext(seed=recipe.seed, index=i, calibration=calibration, measure=measure,
                                                source_dir=source_dir if source_dir.is_dir() else None))
        except SurgeryError as e:
            e.loc = ("ops", i) + (e.loc or ())
            raise loaded.error(e) from None
        promise.notes += nxt.spec.meta.take_notes()  # what helpers shared by several ops have to say
        nxt.check_shapes(where=f"after ops[{i}] ({op.op}) [internal error]")
        _check_config(nxt.spec, loaded, i)
        promises.append(promise)
        touched = []
        for name, node in nxt.tensors.items():
            old = state.tensors.get(name)
            if old is not node:
                touched.append((name, old.shape if old is not None else None, node.shape))
        for name in state.tensors:
            if name not in nxt.tensors:
                touched.append((name, state.tensors[name].shape, None))
        steps.append(
            Step(
                index=i,
                op=op,
                state=nxt,
                promise=promise,
                cumulative=cumulative_promise(promises, nxt.spec),
                config_changes=_diff_config(state.spec.config, nxt.spec.config),
                touched=touched,
                param_delta=nxt.num_parameters - state.num_parameters,
            )
        )
        state = nxt
    if steps and state.spec.arch.is_moe:
        steps[-1].promise.notes += _experts_note(state.spec)
    return Plan(loaded, source_dir, ckpt, initial, steps, op_graph(list(recipe.ops)))


def _experts_note(spec: ModelSpec) -> list[str]:
    """What a mixture of experts whose widths torch's grouped_mm refuses needs to load (verification runs it eagerly)."""
    import torch

    from .runtime.build import grouped_mm_fits

    refused = [name for name, d in (("float32", torch.float32), ("bfloat16", torch.bfloat16)) if not grouped_mm_fits(spec.config, d)]
    if not refused:
        return []
    return [f"the experts' widths are not a multiple of 16 bytes in {' or '.join(refused)}: transformers' default experts "
            f"(torch's grouped_mm) refuse them there; load with experts_implementation=\"eager\""]


def format_plan(plan: Plan, max_tensors: int = 12, warnings: bool = False) -> str:
    """`warnings`: end with `Plan.warnings` (`surgery plan`; a model card's plan has none: its run went through)."""
    lines = [f"recipe {plan.loaded.recipe.name} ({plan.loaded.file})", f"source {plan.source_dir}", f"  {plan.initial.spec.describe()}",
             f"  parameters: {plan.initial.num_parameters:,}"]
    lines += [f"  config: {n}" for n in plan.initial.spec.meta.standardised]
    if plan.initial.dropped:
        lines.append(f"  dropped {len(plan.initial.dropped)} persisted buffer(s) transformers recomputes from the config and "
                     f"ignores on load, e.g. {plan.initial.dropped[0]}: not written to the output")
    if not plan.steps:
        lines.append("no ops: a plain copy (exact)")
    for step in plan.steps:
        preds = [p for p in plan.graph.predecessors((step.index, step.op.op))]
        after = ", ".join("source" if p == "source" else f"ops[{p[0]}] {p[1]}" for p in preds)
        lines.append("")
        lines.append(f"ops[{step.index}] {step.op.label()}   (after: {after})")
        lines.append(f"  what: {step.op.summary}")
        for k, (a, b) in step.config_changes.items():
            lines.append(f"  config {k}: {a} -> {b}")
        shown = step.touched[:max_tensors]
        for name, a, b in shown:
            lines.append(f"  tensor {name}: {list(a) if a else '(new)'} -> {list(b) if b else '(removed)'}")
        if len(step.touched) > max_tensors:
            lines.append(f"  ... and {len(step.touched) - max_tensors} more tensors")
        lines.append(f"  parameters: {step.param_delta:+,}")
        lines.append(f"  this op: {step.promise.exactness.value}: {step.promise.reason}")
        for n in step.promise.notes:
            lines.append(f"  note: {n}")
        lines.append(f"  model so far: {step.cumulative.exactness.value}: {step.cumulative.reason}")
    lines.append("")
    lines.append(f"result  {plan.final.spec.describe()}")
    lines.append(f"  parameters: {plan.initial.num_parameters:,} -> {plan.final.num_parameters:,} "
                 f"({plan.final.num_parameters - plan.initial.num_parameters:+,})")
    if plan.final.spec.arch.is_moe:
        lines.append(f"  active parameters per token: {plan.final.active_parameters:,} "
                     f"(top-{plan.final.spec.experts_per_token} of {plan.final.spec.num_experts} experts)")
    lines.append(f"  promise: {plan.promise.exactness.value}: {plan.promise.reason}")
    lines.append(f"  verify: {schedule(plan).planned_rule()}")
    lines += [f"  warning: {w}" for w in plan.warnings] if warnings else []
    return "\n".join(lines)
