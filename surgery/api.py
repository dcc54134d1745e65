"""The Python API: what the CLI calls, and what a notebook can call.

    from surgery import api
    plan = api.plan("recipes/stablelm_grow.yaml", source="builtin:tiny-stablelm")
    result = api.run("recipes/stablelm_grow.yaml", source="builtin:tiny-stablelm", output="/tmp/o")
    result.report.passed
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from . import __version__
from .errors import SurgeryError
from .execute import compute_dtype_for, copy_side_files, materialize, pick_device, write_config, write_weights
from .io.native import add_hf_tokenizer, is_native, write_native
from .io.resolve import resolve_source
from .ops import Exactness
from .io.writer import AtomicOutput, file_digests
from .plan import Plan, compile_plan, format_plan
from .recipe.loader import LoadedRecipe, load_recipe
from .verify import (
    Report, StepResult, compare, dead_slices, evaluate_model, variance_culprit, write_report_files, judge, load_output, model_from_tensors, tokenize,
)


@dataclass
class RunResult:
    output: Path
    plan: Plan
    report: Report | None


def load(recipe: str | Path, sets: list[str] | None = None, source: str | None = None, output: str | None = None,
         libraries: list[str] | None = None) -> LoadedRecipe:
    """A recipe by path, library name or hf:// address, with overrides applied and validated."""
    return load_recipe(recipe, sets=sets, source=source, output=output, libraries=libraries)


def validate(recipe: str | Path, **overrides) -> LoadedRecipe:
    """Schema check only: no source is read."""
    return load(recipe, **overrides)


def plan(recipe: str | Path | LoadedRecipe, **overrides) -> Plan:
    loaded = recipe if isinstance(recipe, LoadedRecipe) else load(recipe, **overrides)
    src = loaded.recipe.source_spec
    try:
        source_dir = resolve_source(src.path, src.revision)
    except SurgeryError as e:
        raise e.located(loaded.where(("source",))) from None
    return compile_plan(loaded, source_dir)


def run(
    recipe: str | Path | LoadedRecipe,
    *,
    sets: list[str] | None = None,
    source: str | None = None,
    output: str | None = None,
    device: str | None = None,
    force: bool = False,
    verify: bool = True,
    progress: bool = False,
    libraries: list[str] | None = None,
) -> RunResult:
    loaded = recipe if isinstance(recipe, LoadedRecipe) else load(recipe, sets, source, output, libraries)
    r = loaded.recipe
    out_spec = r.output_spec
    if out_spec is None:
        raise SurgeryError("no output directory: set output: in the recipe or pass --output DIR", where=loaded.file)
    p = plan(loaded)
    try:
        dev = pick_device(device or r.device)
    except SurgeryError as e:
        if device:  # from --device, not from the recipe
            e.where, e.loc = f"--device {device}", None
        raise loaded.error(e) from None
    with AtomicOutput(Path(out_spec.path), force, p.source_dir) as tmp:
        t0 = time.perf_counter()
        if out_spec.format == "mistral":
            tensor_digests = write_native(p.final, p.checkpoint, tmp, dev, out_spec.dtype, progress)
        else:
            tensor_digests = write_weights(p.final, p.checkpoint, tmp, dev, out_spec.dtype, out_spec.shard_size, progress)
            write_config(p.final, tmp, out_spec.dtype)
        copy_side_files(p.source_dir, tmp)
        add_hf_tokenizer(p.source_dir, tmp)
        write_resolved_recipe(loaded, p, tmp)
        surgery_seconds = time.perf_counter() - t0
        report = None
        if verify:
            t1 = time.perf_counter()
            report = verify_plan(p, tmp, dev)
            report.seconds = time.perf_counter() - t1
            write_report_files(tmp, report, loaded.recipe.name)
        write_model_card(loaded, p, tmp, report, surgery_seconds)
        write_report(tmp, report, surgery_seconds, tensor_digests)
    return RunResult(Path(out_spec.path), p, report)


def verify_plan(p: Plan, out_dir: Path, device: torch.device) -> Report:
    """Loss and logits of the source, of every intermediate step (per_op), and of the written output."""
    from .io.native import load_model as _load  # native dirs are converted in memory

    v = p.loaded.recipe.verify
    dtype = compute_dtype_for(p.initial)
    ids = tokenize(p.source_dir, v.data, v.max_tokens)
    source_model = _load(p.source_dir, dtype, device)
    ref = evaluate_model(source_model, ids)
    del source_model
    # A lower-precision output is judged against the source rounded to the same precision, so the
    # check measures the surgery, not the cast; the report says so.
    storage = _storage_dtype(p)
    ref_final, judged_in = ref, dtype
    if storage is not None:
        ref_final = evaluate_model(_load(p.source_dir, storage, device).to(dtype), ids)
        judged_in = storage
    vocab = p.initial.spec.vocab_size
    steps: list[StepResult] = []
    dead: list[dict] = []
    broken = None
    final_cmp = None
    for i, step in enumerate(p.steps):
        last = i == len(p.steps) - 1
        if not (v.per_op or last):
            continue
        if last:
            model = _load(out_dir, dtype, device)
            dead = dead_slices(model, ids, p.final.new_slices)
            cmp = compare(ref_final, evaluate_model(model, ids))
            ok, rule = judge(step.cumulative, cmp, v.tolerance, judged_in, vocab)
        else:
            model = model_from_tensors(step.state.spec.config, materialize(step.state, p.checkpoint, device, dtype), dtype, device)
            cmp = compare(ref, evaluate_model(model, ids))
            ok, rule = judge(step.cumulative, cmp, v.tolerance, dtype, vocab)
        if ok is False and step.cumulative.exactness == Exactness.REINIT:
            name, gain = variance_culprit(model, ids)
            rule += f"; {name} amplifies its input's std {gain:.1f}x"
        del model
        if not last and step.cumulative.exactness == Exactness.APPROXIMATE:
            ok, rule = None, "approximate so far: informational, later ops may restore it"
        steps.append(StepResult(step.op.label(), cmp.loss, cmp.rel_change, cmp.max_logit_diff,
                                step.cumulative.exactness.value, rule, ok))
        if last:
            final_cmp = (cmp, ok, rule)
        elif ok is False and broken is None:
            broken = f"ops[{i}] {step.op.op}"
    if final_cmp is None:  # no ops: a plain copy
        cmp = compare(ref, evaluate_model(_load(out_dir, dtype, device), ids))
        ok, rule = judge(p.promise, cmp, v.tolerance, dtype, vocab)
        final_cmp = (cmp, ok, rule)
    cmp, ok, rule = final_cmp
    if dead:
        ok = False
        rule += f"; {len(dead)} new slice(s) get no gradient"
    if not ok and broken is None and p.steps:
        broken = _first_failing(steps, p)
    return Report(
        loss_source=ref.loss, loss_output=cmp.loss, rel_change=cmp.rel_change, max_logit_diff=cmp.max_logit_diff,
        mean_logit_diff=cmp.mean_logit_diff, top1_agreement=cmp.top1_agreement, kl_divergence=cmp.kl_divergence, passed=ok, rule=rule,
        promise=f"{p.promise.exactness.value}: {p.promise.reason}", params_source=p.initial.num_parameters,
        params_output=p.final.num_parameters, tokens=int(ids.shape[1]),
        precision=_name(dtype) + (f" compute, weights stored as {_name(storage)} (reference rounded alike)" if storage else ""),
        steps=steps, broken_by=broken if not ok else None, dead_slices=dead,
    )


REPORT = "surgery_report.json"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _storage_dtype(p: Plan) -> torch.dtype | None:
    """The output's dtype when it is coarser than the source's, else None."""
    from .execute import DTYPES

    out = p.loaded.recipe.output_spec
    if out is None or out.dtype == "auto":
        return None
    storage = DTYPES[out.dtype]
    src = max((t.dtype for t in p.initial.tensors.values() if t.dtype.is_floating_point), key=lambda d: d.itemsize)
    return storage if storage.itemsize < src.itemsize else None


def write_report(out_dir: Path, report: Report | None, surgery_seconds: float, tensor_digests: dict[str, str]) -> None:
    """The verification result plus integrity hashes: every output file and every tensor."""
    doc = {"surgery_version": __version__, "verified": report is not None, "surgery_seconds": round(surgery_seconds, 3)}
    if report is not None:
        doc.update(json.loads(report.to_json()))
        doc["verify_seconds"] = round(report.seconds, 3)
    doc["tensor_sha256"] = tensor_digests
    doc["files_sha256"] = file_digests(out_dir, skip=(REPORT,))
    (out_dir / REPORT).write_text(json.dumps(doc, indent=2) + "\n")


def _first_failing(steps: list[StepResult], p: Plan) -> str | None:
    for s, step in zip(steps, p.steps):
        if s.passed is False:
            return f"ops[{step.index}] {step.op.op}"
    return None


def source_fingerprint(p: Plan) -> str:
    """Content hash of the source: config and tensor headers (names, shapes, dtypes, file sizes)."""
    h = hashlib.sha256()
    h.update((p.source_dir / ("params.json" if is_native(p.source_dir) else "config.json")).read_bytes())
    for name, meta in sorted(p.checkpoint.tensors.items()):
        h.update(f"{name}:{meta.shape}:{meta.dtype}:{meta.file.stat().st_size}".encode())
    return h.hexdigest()


def resolved_recipe(loaded: LoadedRecipe, p: Plan) -> dict:
    data = loaded.recipe.model_dump(mode="json", exclude_none=True)
    src = loaded.recipe.source_spec
    data["source"] = {"path": src.path, **({"revision": src.revision} if src.revision else {})}
    return data


def write_resolved_recipe(loaded: LoadedRecipe, p: Plan, out_dir: Path) -> None:
    header = (
        f"# Resolved by surgery {__version__} from {loaded.file}\n"
        f"# source content sha256 (config + tensor headers): {source_fingerprint(p)}\n"
    )
    body = yaml.safe_dump(resolved_recipe(loaded, p), sort_keys=False)
    (out_dir / "surgery_recipe.yaml").write_text(header + body)


def write_model_card(loaded: LoadedRecipe, p: Plan, out_dir: Path, report: Report | None, seconds: float) -> None:
    src = loaded.recipe.source_spec.path
    lines = ["---", f"base_model: {src}", "tags:", "- surgery", "---", "",
             f"# {loaded.recipe.name}", ""]
    if loaded.recipe.description:
        lines += [loaded.recipe.description.strip(), ""]
    lines += [f"Made with surgery {__version__} from `{src}` in {seconds:.1f} s.", "",
              f"Promise: **{p.promise.exactness.value}**: {p.promise.reason}.", ""]
    if p.final.spec.live_width:
        lines += ["This checkpoint ships its model code (`modeling_surgery.py`): load it with "
                  "`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.", ""]
    if report is not None:
        lines += ["## Verification", "", "```", report.table(), "```", "", "Details: [surgery_report.md](surgery_report.md).", ""]
    lines += ["## Recipe", "", "```yaml", (out_dir / "surgery_recipe.yaml").read_text().rstrip(), "```", "",
              "## Plan", "", "```", format_plan(p), "```", ""]
    (out_dir / "README.md").write_text("\n".join(lines))


def transform(model, ops: list[dict], seed: int = 0, device: str = "cpu"):
    """Apply ops to a transformers model in memory; returns (new model, plan). For notebooks and tests."""
    from pydantic import ValidationError

    from .io.checkpoint import InMemoryCheckpoint
    from .recipe.loader import validation_error
    from .recipe.schema import Recipe

    data = {"name": "in-memory", "source": "<memory>", "seed": seed, "ops": list(ops)}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise validation_error(e, data, "<ops>", {}, {}) from None
    loaded = LoadedRecipe(recipe, "<ops>", data)
    config = model.config.to_dict()
    ckpt = InMemoryCheckpoint(config, dict(model.state_dict()))
    p = compile_plan(loaded, Path("<memory>"), ckpt)
    dev = pick_device(device)
    dtype = compute_dtype_for(p.final)
    new = model_from_tensors(p.final.spec.config, materialize(p.final, ckpt, dev, dtype), dtype, dev,
                             attn_implementation=model.config._attn_implementation)
    return new, p
