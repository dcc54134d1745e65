"""Proof that the function was kept: loss and logits of source and output, run by transformers.

Every comparison runs the models with stock transformers code (or the code shipped with a patched
checkpoint), in float32 by default, on the same tokens. Each step is judged by the rule its
promise implies: exact ops against float rounding, approximate ones against the recipe tolerance.
"""
from __future__ import annotations

import builtins
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import SurgeryError
from .ops import Exactness, Promise

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


def model_from_tensors(config_dict: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
                       attn_implementation: str | None = None):
    """A transformers model holding exactly these tensors (for steps that exist only in memory)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "auto_map"})
    cls = model_class(cfg)
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
        model, info = cls.from_pretrained(str(out_dir), dtype=dtype, output_loading_info=True, **extra)
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


@dataclass
class StepResult:
    op: str
    loss: float
    rel_change: float
    max_logit_diff: float
    exactness: str
    rule: str
    passed: bool | None  # None: an intermediate approximate step, reported but not judged


@dataclass
class Report:
    loss_source: float
    loss_output: float
    rel_change: float
    max_logit_diff: float
    mean_logit_diff: float
    top1_agreement: float
    kl_divergence: float
    passed: bool
    rule: str
    promise: str
    params_source: int
    params_output: int
    tokens: int
    precision: str
    steps: list[StepResult] = field(default_factory=list)
    broken_by: str | None = None
    dead_slices: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def table(self) -> str:
        rows = [("step", "loss", "rel change", "max |dlogit|", "rule", "ok")]
        rows.append(("source", f"{self.loss_source:.6f}", "", "", "", ""))
        mark = {True: "yes", False: "NO", None: "-"}
        for i, s in enumerate(self.steps):
            name = s.op + (" [written output]" if i == len(self.steps) - 1 else "")
            rows.append((name, f"{s.loss:.6f}", f"{s.rel_change:+.3e}", f"{s.max_logit_diff:.3e}", s.rule, mark[s.passed]))
        if not self.steps:
            rows.append(("copy [written output]", f"{self.loss_output:.6f}", f"{self.rel_change:+.3e}",
                         f"{self.max_logit_diff:.3e}", self.rule, mark[self.passed]))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        verdict = "PASSED" if self.passed else f"FAILED{' at ' + self.broken_by if self.broken_by else ''}"
        lines.append(f"verification {verdict}: {self.tokens} tokens, {self.precision}, params {self.params_source:,} -> {self.params_output:,}")
        if self.dead_slices:
            lines.append(f"dead slices (no gradient): {len(self.dead_slices)}")
        return "\n".join(lines)


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
        out = {}
        for i, s in enumerate(slices):
            p = params.get(s.tensor)
            if p is None or p.grad is None:
                out[i] = len(s.index)
                continue
            g = p.grad.index_select(s.axis, torch.tensor(s.index, device=p.grad.device)).abs()
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


def write_report_files(out_dir: Path, report: Report, title: str) -> list[str]:
    """`surgery_report.md` (the story as a table) and, with matplotlib, `surgery_report.png`."""
    written = []
    plotted = plot_steps(report, out_dir / "surgery_report.png", title)
    lines = [f"# Verification of {title}", "", f"Promise: {report.promise}", "",
             "| step | loss | rel. change | max abs logit diff | rule | ok |", "|---|---|---|---|---|---|",
             f"| source | {report.loss_source:.6f} | | | | |"]
    mark = {True: "yes", False: "**NO**", None: "-"}
    for s in report.steps:
        lines.append(f"| `{s.op}` | {s.loss:.6f} | {s.rel_change:+.3e} | {s.max_logit_diff:.3e} | {s.rule} | {mark[s.passed]} |")
    lines += ["", f"Output: loss {report.loss_output:.6f}, relative change {report.rel_change:+.3e}, max |logit diff| "
              f"{report.max_logit_diff:.3e}, next-token KL {report.kl_divergence:.3e}, top-1 agreement {report.top1_agreement:.4f}.",
              f"{report.tokens} tokens in {report.precision}. Verdict: **{'passed' if report.passed else 'FAILED'}**"
              + (f" (broken by {report.broken_by})" if report.broken_by else "") + ".", ""]
    if report.dead_slices:
        lines += ["Dead slices (no gradient): " + ", ".join(f"{d['tensor']} ({d['dead']}/{d['of']})" for d in report.dead_slices), ""]
    if plotted:
        lines += ["![loss per step](surgery_report.png)", ""]
        written.append("surgery_report.png")
    (out_dir / "surgery_report.md").write_text("\n".join(lines))
    return ["surgery_report.md"] + written


def plot_steps(report: Report, path: Path, title: str) -> bool:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    labels = ["source"] + [s.op.split("(")[0] for s in report.steps]
    losses = [report.loss_source] + [s.loss for s in report.steps]
    fig = Figure(figsize=(max(4.0, 1.3 * len(labels)), 3.2), dpi=100)
    ax = fig.add_subplot()
    ax.plot(range(len(losses)), losses, marker="o", color="tab:blue")
    ax.axhline(report.loss_source, color="tab:gray", linestyle="--", linewidth=1, label="source loss")
    for i, s in enumerate(report.steps, start=1):
        if s.passed is False:
            ax.plot([i], [s.loss], marker="x", color="tab:red", markersize=10)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("loss")
    ax.set_title(f"{title}: loss after each op", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return True
