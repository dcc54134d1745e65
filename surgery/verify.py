"""Proof that the function was kept: loss and logits of source and output, run by transformers.

Every comparison runs the models with stock transformers code (or the code shipped with a patched
checkpoint), in float32 by default, on the same tokens. Each step is judged by the rule its
promise implies: exact ops against float rounding, approximate ones against the recipe tolerance.
"""
from __future__ import annotations

import builtins
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers.conversion_mapping import get_checkpoint_conversion_mapping

from .errors import SurgeryError
from .ops import Exactness, Promise
from .report import Report, StepResult

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
        raise SurgeryError(f"cannot load the source tokenizer ({type(e).__name__}); verification needs one, or pass --no-verify",
                           where=str(source_dir)) from None
    ids = tok(load_text(data), return_tensors="pt")["input_ids"][:, :max_tokens]
    if ids.shape[1] < 2:
        raise SurgeryError("verification data gives fewer than 2 tokens", where=f"verify.data {data}")
    return ids


def model_class(config):
    if getattr(config, "surgery_live_width", None):
        from .modeling.modeling_surgery import SurgeryStableLmForCausalLM

        return SurgeryStableLmForCausalLM
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def experts_kwargs(config, dtype: torch.dtype) -> dict:
    """transformers 5 runs experts through torch's grouped_mm by default, which has no float64 kernel:
    float64 mixture-of-experts models run the eager per-expert loop."""
    if dtype == torch.float64 and get_checkpoint_conversion_mapping(config.model_type):
        return {"experts_implementation": "eager"}
    return {}


def model_from_tensors(config_dict: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
                       attn_implementation: str | None = None):
    """A transformers model holding exactly these tensors (for steps that exist only in memory)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "auto_map"})
    cls = model_class(cfg)
    if get_checkpoint_conversion_mapping(cfg.model_type):
        # on-disk names (per-expert tensors) that transformers converts while loading, as from a file
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model, info = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)].from_pretrained(
            None, config=cfg, state_dict={k: v.to(dtype) for k, v in tensors.items()}, dtype=dtype,
            attn_implementation=attn_implementation, output_loading_info=True, **experts_kwargs(cfg, dtype))
        bad = {k: sorted(v)[:3] for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if bad:
            raise AssertionError(f"state does not fit {type(model).__name__}: {bad}")
        return model.to(device).eval()
    build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
    model = build(cfg, dtype=dtype, attn_implementation=attn_implementation)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise AssertionError(f"state does not fit {type(model).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device).eval()


def load_output(out_dir: Path, dtype: torch.dtype, device: torch.device, device_map: str | None = None):
    """Load a written checkpoint the way users will, and refuse any missing or unexpected key."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = AutoConfig.from_pretrained(str(out_dir))
    cls = model_class(cfg)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would be a second message; `bad` below says it in one line
    try:
        extra = {}
        if device_map:  # larger than one device: accelerate places (and offloads) the layers
            try:
                import accelerate  # noqa: F401
            except ImportError:
                raise SurgeryError("device_map needs the `accelerate` package: pip install accelerate", where=str(out_dir)) from None
            import tempfile

            import atexit
            import shutil

            offload = tempfile.mkdtemp(prefix="surgery-offload-")
            atexit.register(shutil.rmtree, offload, True)
            extra = {"device_map": device_map, "offload_folder": offload}
        model, info = cls.from_pretrained(str(out_dir), dtype=dtype, output_loading_info=True, **extra,
                                          **experts_kwargs(cfg, dtype))
    finally:
        hf_logging.set_verbosity(level)
    bad = {k: sorted(map(str, v)) for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:  # a source or compared checkpoint that disagrees with its config (an output doing so is a bug)
        what = "; ".join(f"{k.replace('_', ' ')}: {', '.join(v[:3])}" + (f" and {len(v) - 3} more" if len(v) > 3 else "")
                         for k, v in bad.items())
        raise SurgeryError(f"does not load cleanly with transformers ({what})", where=str(out_dir))
    return (model if device_map else model.to(device)).eval()


@dataclass
class Evaluation:
    loss: float
    logits: torch.Tensor  # (tokens, vocab) on CPU, float32/64


@torch.no_grad()
def evaluate_model(model, ids: torch.Tensor) -> Evaluation:
    dev = next(model.parameters()).device
    out = model(input_ids=ids.to(dev), labels=ids.to(dev))
    return Evaluation(float(out.loss), out.logits[0].to("cpu"))


@dataclass
class Comparison:
    loss: float
    rel_change: float
    max_logit_diff: float
    mean_logit_diff: float
    top1_agreement: float
    kl_divergence: float  # KL(reference || other) of next-token distributions, mean over tokens
    compared_vocab: int


def compare(ref: Evaluation, other: Evaluation) -> Comparison:
    """Over the reference's vocabulary (a grown vocab is compared on its first V tokens)."""
    v = ref.logits.shape[-1]
    a, b = ref.logits.double(), other.logits[..., :v].double()
    diff = (a - b).abs()
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
    return Comparison(
        loss=other.loss,
        rel_change=(other.loss - ref.loss) / abs(ref.loss) if ref.loss else math.inf,
        max_logit_diff=float(diff.max()),
        mean_logit_diff=float(diff.mean()),
        top1_agreement=float((a.argmax(-1) == b.argmax(-1)).double().mean()),
        kl_divergence=max(float(kl), 0.0),
        compared_vocab=v,
    )


def judge(promise: Promise, cmp: Comparison, tolerance: float, dtype: torch.dtype, vocab_size: int) -> tuple[bool, str]:
    """Which rule applies to a step, and whether it held."""
    if promise.exactness == Exactness.REINIT:
        bound = 2 * math.log(vocab_size)
        return cmp.loss <= bound, f"re-initialised: initial loss <= 2 ln(vocab) = {bound:.3f}"
    if promise.exactness in (Exactness.EXACT, Exactness.EXACT_SHIPPED_CODE):
        tol = EXACT_TOLERANCE[dtype]  # the precision in use, not the recipe's tolerance (that is for approximations)
        return abs(cmp.rel_change) <= tol, f"{promise.exactness.value}: |rel change| <= {tol:g} ({str(dtype)[6:]} rounding)"
    return cmp.rel_change <= tolerance, f"approximate: rel change <= tolerance {tolerance:g}"


def disk_layout(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameters (or their gradients) under the names and shapes a checkpoint holds on disk:
    transformers 5 fuses Mixtral's and Qwen-MoE's experts in memory, slices name them per expert."""
    if not get_checkpoint_conversion_mapping(model.config.model_type):
        return tensors
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(tensors))


def dead_slices(model, ids: torch.Tensor, slices, max_tokens: int = 128, lr: float = 1e-3) -> list[dict]:
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
        out = {}
        for i, s in enumerate(slices):
            grad = grads.get(s.tensor)
            if grad is None:
                out[i] = len(s.index)
                continue
            g = grad.index_select(s.axis, torch.tensor(s.index, device=grad.device)).abs()
            other = [d for d in range(g.dim()) if d != s.axis]
            n = int(((g.amax(dim=other) if other else g) == 0).sum())
            if n:
                out[i] = n
        return out

    dead = dead_units()
    if dead:
        saved = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for p in params.values():
                if p.grad is not None:
                    p -= lr * p.grad
        dead = {i: n for i, n in dead_units().items() if i in dead}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
    model.zero_grad(set_to_none=True)
    return [{"tensor": slices[i].tensor, "op": slices[i].op, "dead": n, "of": len(slices[i].index)} for i, n in dead.items()]


def expert_symmetry(model, ids: torch.Tensor, max_tokens: int = 128, lr: float = 1e-3) -> list[dict]:
    """Per MoE layer: how many experts differ, and the router's gradient, before and after one SGD step.

    Experts that start as copies of one MLP only separate if routing gives them different gradients;
    with identical experts a renormalised router's own gradient is zero until they do. One step on
    the calibration tokens shows whether training can leave that fixed point (the model is restored).
    """
    from .arch import TensorRole as R, architecture_for

    arch = architecture_for(model.config.model_type)
    if arch is None or not arch.is_moe:
        return []
    params = dict(model.named_parameters())
    x = ids[:, :max_tokens].to(next(model.parameters()).device)

    def by_layer(tensors: dict[str, torch.Tensor]) -> dict[int, dict]:
        out: dict[int, dict] = {}
        for name, t in disk_layout(model, tensors).items():
            info = arch.classify(name)
            if info is None or info.layer is None:
                continue
            layer = out.setdefault(info.layer, {"experts": {}, "router": None})
            if info.expert is not None:
                layer["experts"].setdefault(info.expert, []).append((name, t))
            elif info.role == R.MOE_ROUTER:
                layer["router"] = t
        return out

    def distinct(experts: dict[int, list]) -> int:
        groups: list[list[torch.Tensor]] = []
        for e in sorted(experts):
            ts = [t for _, t in sorted(experts[e], key=lambda nt: nt[0])]
            if not any(all(torch.equal(a, b) for a, b in zip(ts, g)) for g in groups):
                groups.append(ts)
        return len(groups)

    def router_grads() -> dict[int, float]:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            model(input_ids=x, labels=x).loss.backward()
        grads = by_layer({n: p.grad for n, p in params.items() if p.grad is not None})
        return {i: float(v["router"].norm()) if v["router"] is not None else 0.0 for i, v in grads.items()}

    before = by_layer({n: p.detach() for n, p in params.items()})
    counts_before = {i: distinct(v["experts"]) for i, v in before.items()}
    grad_before = router_grads()
    saved = {n: p.detach().clone() for n, p in params.items()}
    try:
        with torch.no_grad():
            for p in params.values():
                if p.grad is not None:
                    p -= lr * p.grad
        after = by_layer({n: p.detach() for n, p in params.items()})
        counts_after = {i: distinct(v["experts"]) for i, v in after.items()}
        grad_after = router_grads()
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
        model.zero_grad(set_to_none=True)
    return [{"layer": i, "experts": len(before[i]["experts"]), "distinct": counts_before[i],
             "distinct_after_step": counts_after.get(i, 0), "router_grad": grad_before.get(i, 0.0),
             "router_grad_after_step": grad_after.get(i, 0.0)} for i in sorted(before)]


@torch.no_grad()
def variance_culprit(model, ids: torch.Tensor, max_tokens: int = 256) -> tuple[str, float]:
    """The linear layer whose output std is largest relative to its input's: the usual reason a
    re-initialised model starts far above ln(vocab) (an lm_head drawn with std 1, seed 004)."""
    gains: dict[str, float] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(m, inp, out, name=name):
                i = float(inp[0].float().std())
                gains[name] = max(gains.get(name, 0.0), float(out.float().std()) / i if i > 0 else 0.0)
            hooks.append(mod.register_forward_hook(hook))
    try:
        x = ids[:, :max_tokens].to(next(model.parameters()).device)
        model(input_ids=x)
    finally:
        for h in hooks:
            h.remove()
    name = max(gains, key=gains.get)
    return name, gains[name]


def verify_plan(p: Plan, out_dir: Path, device: torch.device) -> Report:
    """Loss and logits of the source, of every intermediate step (per_op), and of the written output."""
    from .execute import compute_dtype_for, materialize
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
    symmetry: list[dict] = []
    broken = None
    final_cmp = None
    for i, step in enumerate(p.steps):
        last = i == len(p.steps) - 1
        if not (v.per_op or last):
            continue
        if last:
            model = _load(out_dir, dtype, device)
            dead = dead_slices(model, ids, p.final.new_slices)
            symmetry = expert_symmetry(model, ids)
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
        steps=steps, broken_by=broken if not ok else None, dead_slices=dead, expert_symmetry=symmetry,
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
