"""The Python API: what the CLI calls, and what a notebook can call.

    from surgery import api
    plan = api.plan("recipes/stablelm_grow.yaml", source="builtin:tiny-stablelm")
    result = api.run("recipes/stablelm_grow.yaml", source="builtin:tiny-stablelm", output="/tmp/o")
    result.report.passed
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import interrupt
from .card import config_file, write_model_card, write_resolved_recipe
from .errors import SurgeryError
from .execute import compute_dtype_for, copy_side_files, materialize, output_tensors, pick_device, write_output
from .io.atomic import AtomicOutput
from .io.checkpoint import InMemoryCheckpoint
from .io.grown_tokenizer import write_tokenizer
from .io.hf_format import HfFormat
from .io.native_format import MistralFormat
from .io.resolve import resolve_source
from .io.tokenizer import add_hf_tokenizer, text_encoder
from .plan import Plan, compile_plan
from .recipe.loader import LoadedRecipe, check_paths, load_recipe, validate_recipe
from .report import Report, write_report, write_report_files
from .runtime.build import disk_layout, load_problems, model_from_tensors, skeleton, streamable
from .runtime.progress import Progress
from .verify.data import calibration_ids
from .verify.run import verify_plan
from .text_table import fit_lines, terminal_width
from .verify.schedule import Rate, schedule, seconds_text

FORMATS = {"hf": HfFormat, "mistral": MistralFormat}  # output.format -> how the executor lays the output out


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
    """Schema check and the recipe's files (verification data); no source is read."""
    loaded = load(recipe, **overrides)
    check_paths(loaded)
    return loaded


def plan(recipe: str | Path | LoadedRecipe, *, measure: bool = False, device: str = "cpu", calibration_ids=None,
         progress: Progress | None = None, **overrides) -> Plan:
    """The plan: shapes, promises, the op graph. `measure`: also make the choices that need weights or data
    (which units a prune drops), on `device`, as a run does; otherwise the plan says they are made at run time."""
    loaded = recipe if isinstance(recipe, LoadedRecipe) else load(recipe, **overrides)
    src = loaded.recipe.source_spec
    try:
        source_dir = resolve_source(src.path, src.revision)
    except SurgeryError as e:
        raise e.located(loaded.where(("source",))) from None
    return compile_plan(loaded, source_dir, calibration_ids=calibration_ids, measure=measure,
                        device=pick_device(device) if isinstance(device, str) else device, progress=progress)


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
    check_paths(loaded, data=verify)  # before any weight is written
    p = plan(loaded)
    added = p.final.spec.meta.added_tokens
    if added and out_spec.format == "mistral":
        raise loaded.error(SurgeryError("Mistral's native tokenizer.model (sentencepiece) cannot take the new tokens; "
                                        "write format: hf (tokenizer.json)", loc=("output", "format")))
    if verify and (r.verify.data != "random" or added):
        text_encoder(p.source_dir)  # a tokenizer verification cannot read fails here, not after the writing
    try:
        dev = pick_device(device or r.device)
    except SurgeryError as e:
        if device:  # from --device, not from the recipe
            e.where, e.loc = f"--device {device}", None
        raise loaded.error(e) from None
    fmt = FORMATS[out_spec.format].for_output(out_spec, p.checkpoint)
    fmt.tensors(p.final)  # what the output format cannot hold is refused before the run announces its phases
    check_loadable(p, out_spec.format == "hf")
    show = Progress(progress)
    ids = prepare_verification(p) if verify else None  # before any weight is written: fail early
    rate = announce_phases(p, out_spec.dtype, ids, dev) if progress else None
    if any(s.promise.pruning is not None for s in p.steps):  # which units go: measured now, before any weight is written
        p = compile_plan(loaded, p.source_dir, p.checkpoint, ids, measure=True, device=dev, progress=show)
    atomic = AtomicOutput(Path(out_spec.path), force, p.source_dir, run_inputs(loaded, verify))
    with atomic as tmp:
        t0 = time.perf_counter()
        written = write_output(p.final, fmt, p.checkpoint, tmp, dev, progress)
        copy_side_files(p.source_dir, tmp)
        add_hf_tokenizer(tmp)
        if added:
            write_tokenizer(p.source_dir, tmp, added)
        source_hash = written.source.content_hash(config_file(p.source_dir))
        write_resolved_recipe(loaded, p, tmp, source_hash)
        interrupt.check()  # a Ctrl-C swallowed while writing: nothing is kept
        surgery_seconds = time.perf_counter() - t0
        if progress:
            print(f"wrote {out_spec.path}: {p.final.num_parameters:,} parameters "
                  f"({surgery_seconds:.1f} s)", file=sys.stderr, flush=True)
        report, stopped = None, False
        if verify:
            t1 = time.perf_counter()
            try:  # Ctrl-C now keeps the complete weights, marked unverified
                report = verify_plan(p, tmp, dev, ids, show, rate, source_hash=source_hash)  # first says what it will run and for about how long
                interrupt.check()
            except KeyboardInterrupt:
                interrupt.caught()
                stopped = True
            else:
                report.seconds = time.perf_counter() - t1
                write_report_files(tmp, report, loaded.recipe.name)
        write_model_card(loaded, p, tmp, report, surgery_seconds, interrupted=stopped)
        write_report(tmp, report, surgery_seconds, written, interrupted=stopped)
        atomic.keep_previous = report is not None and not report.passed  # --force never replaces an output by a failed one
        interrupt.check()
    if stopped:
        raise interrupt.VerificationInterrupted(atomic.written_to, interrupt.verify_later(atomic.written_to, p.promise.exactness))
    return RunResult(atomic.written_to, p, report)


WRITE_BYTES_PER_SECOND = 0.5e9  # assumed: growths stream at 2-3x cp's time on 2 cores (benchmarks/RESULTS.md)


def announce_phases(p: Plan, dtype: str, ids, device: torch.device) -> Rate | None:
    """Before any work, one line on stdout naming the run's phases and about how long each takes (stderr keeps
    its one line for an error); returns the verification estimate's rate, so verification need not say it again."""
    nbytes = sum(math.prod(node.shape) * target.itemsize for _, node, target in output_tensors(p.final, dtype))
    size = f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"
    parts = [f"write {size} ~ {seconds_text(nbytes / WRITE_BYTES_PER_SECOND)}"]
    if any(s.promise.pruning is not None for s in p.steps):
        parts.insert(0, "measure importance")
    rate = None
    if ids is not None:
        s = schedule(p)
        rate = Rate.assumed(s.parameters, int(ids.shape[1]), device.type, torch.get_num_threads())
        parts.append(s.headline(rate))
    print("\n".join(fit_lines(["phases: " + "; then ".join(parts)], terminal_width(watched=True))), flush=True)
    return rate


def run_inputs(loaded: LoadedRecipe, verify: bool) -> tuple[tuple[str, Path], ...]:
    """The local files a run reads besides the source: an output containing one of them is refused."""
    found = [("the recipe", Path(loaded.file))]
    if verify:
        found.append(("the verification data", Path(loaded.recipe.verify.data)))
    return tuple((f"{what} {path.resolve()}", path) for what, path in found if path.exists())


def prepare_verification(p: Plan):
    """Everything verification needs, checked before any weight is written: the calibration tokens
    (tokenizer and data), and configs transformers can build the source and output models from."""
    v = p.loaded.recipe.verify
    try:
        ids = calibration_ids(p.source_dir, v.data, v.max_tokens, p.initial.spec.vocab_size, p.loaded.recipe.seed)
    except SurgeryError as e:
        raise e.located(p.loaded.where(("verify", "data"))) from None
    return ids


def check_loadable(p: Plan, hf_output: bool) -> None:
    """Before any weight is written: transformers builds the source's and the output's models from their configs, and
    each loads its tensors with no key missing or unexpected. A config whose model_type or flags disagree with the
    tensors (StableLM's over a Llama's) wrote, unverified, an output transformers loads with keys missing. It costs an
    unverified run the modeling code's import (copy +0.55 s in pairs, benchmarks/RESULTS.md). Not on a thread beside
    the write: building a model patches torch.nn.Module and sets torch's default dtype, both process-wide."""
    dtype = compute_dtype_for(p.initial)
    for state, names, where in ((p.initial, p.checkpoint.tensors, str(p.source_dir / "config.json")),
                                (p.final, p.final.output() if hf_output else None, "the output's config")):
        model = skeleton(state.spec.config, dtype, torch.device("cpu"), where=where)
        if names is not None and streamable(state.spec.config):
            _, problems = load_problems(model, list(names))
            if problems:
                raise SurgeryError(f"the tensors do not match the model the config describes ({problems})", where=where)


def transform(model, ops: list[dict], seed: int = 0, device: str = "cpu", calibration_ids=None):
    """Apply ops to a transformers model in memory; returns (new model, plan). For notebooks and tests.

    `calibration_ids` (token ids, 1 x n) feed ops that learn from data (upcycle_moe's router: hidden)."""
    loaded = validate_recipe({"name": "in-memory", "source": "<memory>", "seed": seed, "ops": list(ops)}, "<ops>")
    config = model.config.to_dict()
    ckpt = InMemoryCheckpoint(config, disk_layout(model, dict(model.state_dict())))
    dev = pick_device(device)
    p = compile_plan(loaded, Path("<memory>"), ckpt, calibration_ids, measure=True, device=dev)
    dtype = compute_dtype_for(p.final)
    new = model_from_tensors(p.final.spec.config, materialize(p.final, ckpt, dev, dtype), dtype, dev,
                             attn_implementation=model.config._attn_implementation)
    return new, p
