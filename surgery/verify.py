"""Proof that the function was kept: loss and logits of source and output, run by transformers.

Every comparison runs the models with stock transformers code (or the code shipped with a patched
checkpoint), in float32 by default, on the same tokens. Each step is judged by the rule its
promise implies: exact ops against float rounding, approximate ones against the recipe tolerance.
"""
from __future__ import annotations

import builtins
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import SurgeryError
from .gradient_flow import dead_slices
from .ops import Exactness, Promise
from .report import Report, StepResult
from .runner import (QUIET, CheckpointSource, Comparison, Progress, RoundedSource, StateSource, StreamedModel, TensorSource,
                     compare, evaluate, open_source)

if TYPE_CHECKING:
    from .plan import Plan

ASSETS = Path(__file__).resolve().parent / "assets"
# Relative loss change accepted for a step promised exact, by evaluation precision.
# Relative loss change accepted for an exact step, by the precision the comparison is made in.
# A bf16/fp16 output rounds every grown weight once more than the (equally rounded) reference:
# two units of roundoff of that format.
EXACT_TOLERANCE = {
    torch.float32: 1e-5,
    torch.float64: 1e-10,
    torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
    torch.float16: 2 * torch.finfo(torch.float16).eps,
}


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
    from transformers import AutoTokenizer

    from .io.native import is_native, native_tokenizer

    try:
        tok = native_tokenizer(source_dir) if is_native(source_dir) else AutoTokenizer.from_pretrained(str(source_dir))
    except SurgeryError:
        raise
    except Exception as e:  # transformers raises many types for a missing tokenizer
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise SurgeryError(f"cannot load the source tokenizer ({type(e).__name__}{': ' + why if why else ''}); verification "
                           "needs one: set verify.data: random (seeded token ids), or pass --no-verify",
                           where=str(source_dir)) from None
    ids = tok(load_text(data), return_tensors="pt")["input_ids"][:, :max_tokens]
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


def judge(promise: Promise, cmp: Comparison, tolerance: float, dtype: torch.dtype, vocab_size: int) -> tuple[bool, str]:
    """Which rule applies to a step, and whether it held."""
    if promise.exactness == Exactness.REINIT:
        bound = 2 * math.log(vocab_size)
        return cmp.loss <= bound, f"re-initialised: initial loss <= 2 ln(vocab) = {bound:.3f}"
    if promise.exactness in (Exactness.EXACT, Exactness.EXACT_SHIPPED_CODE):
        tol = EXACT_TOLERANCE[dtype]  # the precision in use, not the recipe's tolerance (that is for approximations)
        return abs(cmp.rel_change) <= tol, f"{promise.exactness.value}: |rel change| <= {tol:g} ({str(dtype)[6:]} rounding)"
    return cmp.rel_change <= tolerance, f"approximate: rel change <= tolerance {tolerance:g}"


def variance_culprit(source: TensorSource, ids: torch.Tensor, device: torch.device, dtype: torch.dtype,
                     max_tokens: int = 256) -> tuple[str, float]:
    """The linear layer whose output std is largest relative to its input's: the usual reason a
    re-initialised model starts far above ln(vocab) (an lm_head drawn with std 1, seed 004).
    Streamed: each layer's linears are watched while that layer is in memory; lm_head's output is
    the logits, whose std is accumulated block by block."""
    sm = StreamedModel(source, device, dtype)
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


def verify_plan(p: Plan, out_dir: Path, device: torch.device, ids: torch.Tensor | None = None,
                progress: Progress = QUIET) -> Report:
    """Loss and logits of the source, of every intermediate step (per_op), and of the written output.

    Every model is run layer by layer (`runner`): the source and the output from their files, each
    intermediate step from the lazy tensor graph, so memory holds one layer, never a model.
    """
    from .execute import compute_dtype_for

    v = p.loaded.recipe.verify
    dtype = compute_dtype_for(p.initial)
    if ids is None:
        ids = calibration_ids(p.source_dir, v.data, v.max_tokens, p.initial.spec.vocab_size, p.loaded.recipe.seed)
    source = CheckpointSource(p.checkpoint, str(p.source_dir))
    ref = evaluate(source, ids, device, dtype, progress, "evaluating source")
    # A lower-precision output is judged against the source rounded to the same precision, so the
    # check measures the surgery, not the cast; the report says so.
    storage = _storage_dtype(p)
    ref_final, judged_in = ref, dtype
    if storage is not None:
        ref_final = evaluate(RoundedSource(source, storage), ids, device, dtype, progress,
                             f"evaluating source rounded to {_name(storage)}")
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
            evaluated = open_source(out_dir)
            cmp = compare(ref_final, evaluate(evaluated, ids, device, dtype, progress, "evaluating output"))
            dead = dead_slices(evaluated, ids, p.final.new_slices, device, dtype, progress=progress)
            ok, rule = judge(step.cumulative, cmp, v.tolerance, judged_in, vocab)
        else:
            evaluated = StateSource(step.state, p.checkpoint, f"after ops[{i}] ({step.op.op})")
            cmp = compare(ref, evaluate(evaluated, ids, device, dtype, progress, f"evaluating ops[{i}] {step.op.op}"))
            ok, rule = judge(step.cumulative, cmp, v.tolerance, dtype, vocab)
        if ok is False and step.cumulative.exactness == Exactness.REINIT:
            name, gain = variance_culprit(evaluated, ids, device, dtype)
            rule += f"; {name} amplifies its input's std {gain:.1f}x"
        if not last and step.cumulative.exactness == Exactness.APPROXIMATE:
            ok, rule = None, "approximate so far: informational, later ops may restore it"
        steps.append(StepResult(step.op.label(), cmp.loss, cmp.rel_change, cmp.max_logit_diff,
                                step.cumulative.exactness.value, rule, ok))
        if last:
            final_cmp = (cmp, ok, rule)
        elif ok is False and broken is None:
            broken = f"ops[{i}] {step.op.op}"
    if final_cmp is None:  # no ops: a plain copy
        cmp = compare(ref, evaluate(open_source(out_dir), ids, device, dtype, progress, "evaluating output"))
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


def _first_failing(steps: list[StepResult], p: Plan) -> str | None:
    for s, step in zip(steps, p.steps):
        if s.passed is False:
            return f"ops[{step.index}] {step.op.op}"
    return None
