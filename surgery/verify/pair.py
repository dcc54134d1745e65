"""`surgery verify OUTPUT [--against SOURCE]` and `surgery verify --integrity OUTPUT`.

Compares any two checkpoints (made by surgery or not) on the same tokens, by executing `pair_schedule` on
the path `surgery run` judges by (`verify.run`). Both run layer by layer, so memory holds one layer plus the
reference's final hidden states, whatever the size. The candidate is judged: without --tolerance as the same
function (exact, against the rounding noise measured on the reference, as `surgery run` judges exact steps),
with --tolerance T as an approximation (|rel change| <= T and KL <= T x reference loss). Beyond it: exit 1.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import recorded_source
from ..text_table import terminal_width
from ..errors import SurgeryError
from ..io.resolve import open_checkpoint, resolve_source

DTYPES = ("float32", "float64")  # torch loads when a comparison runs, so `surgery --help` stays fast


@dataclass
class PairReport:
    loss_reference: float
    loss_candidate: float
    rel_change: float
    max_logit_diff: float
    mean_logit_diff: float
    kl_divergence: float
    top1_agreement: float
    tokens: int
    precision: str
    compared_vocab: int
    seconds: float
    passed: bool = True
    rule: str = ""
    failed: list[str] = field(default_factory=list)  # each metric beyond its bound
    bound: dict | None = None
    max_flip_gap: float = 0.0  # see Comparison.max_flip_gap

    def text(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        return "\n".join([
            f"loss  reference {self.loss_reference:.6f}  candidate {self.loss_candidate:.6f}  rel change {self.rel_change:+.3e}",
            f"logits  max |diff| {self.max_logit_diff:.3e}  mean |diff| {self.mean_logit_diff:.3e}  (first {self.compared_vocab} tokens of the vocab)",
            f"next-token KL {self.kl_divergence:.3e}  top-1 agreement {self.top1_agreement:.4f}",
            f"{self.tokens} tokens, {self.precision}, {self.seconds:.1f} s",
            f"verdict {verdict}: {self.rule}",
        ])


def compare_checkpoints(candidate: str, reference: str, data: str = "builtin:python-license", max_tokens: int = 2048,
                        dtype: str = "float32", device: str = "auto", tolerance: float | None = None,
                        progress: bool = False) -> PairReport:
    """Both models run layer by layer: memory holds one layer and the reference's final hidden states."""
    from ..execute import pick_device
    from ..runtime.progress import Progress
    from ..runtime.sources import open_source
    from ..runtime.streamed import StreamedModel
    from .data import calibration_ids
    from .run import Execution, announce
    from .schedule import CANDIDATE, REFERENCE, pair_schedule

    t0 = time.perf_counter()
    import torch

    dt = getattr(torch, dtype)
    dev = pick_device(device)
    show = Progress(progress)
    ref_dir, cand_dir = resolve_source(reference), resolve_source(candidate)
    ref_src, cand_src = open_source(ref_dir), open_source(cand_dir)  # a directory that is no checkpoint: one line now
    for src in (ref_src, cand_src):  # both must load cleanly before either is run
        StreamedModel(src, dev, dt)
    ids = calibration_ids(ref_dir, data, max_tokens, int(ref_src.config.get("vocab_size") or 0))
    if data != "random":
        check_tokenizers(ref_dir, cand_dir, data, ids, show)
    half = {m.dtype for m in cand_src.reader.tensors.values() if m.dtype in (torch.bfloat16, torch.float16)}
    storage = str(max(half, key=lambda d: torch.finfo(d).eps))[6:] if half else None
    size = sum(math.prod(m.shape) for m in ref_src.reader.tensors.values())
    s = pair_schedule(dtype, storage, tolerance, size, data, max_tokens)
    rate = announce(s, int(ids.shape[1]), dev, show)
    sources = {REFERENCE: ref_src, CANDIDATE: cand_src}
    (judged,) = Execution(s, lambda model: sources[model.kind], ids, dev, show, rate).run()
    cmp, verdict = judged.cmp, judged.verdict
    return PairReport(
        loss_reference=cmp.reference_loss, loss_candidate=cmp.loss, rel_change=cmp.rel_change, max_logit_diff=cmp.max_logit_diff,
        mean_logit_diff=cmp.mean_logit_diff, kl_divergence=cmp.kl_divergence, top1_agreement=cmp.top1_agreement,
        tokens=int(ids.shape[1]), precision=dtype + (f", candidate stores {storage}" if storage else ""),
        compared_vocab=cmp.compared_vocab, seconds=time.perf_counter() - t0, passed=bool(verdict.passed), rule=verdict.rule,
        failed=verdict.failed, bound=verdict.bound.as_dict() if verdict.bound else None, max_flip_gap=cmp.max_flip_gap,
    )


def check_tokenizers(ref_dir: Path, cand_dir: Path, data: str, ids: torch.Tensor, show) -> None:
    """Both models must read the same tokens: a candidate whose tokenizer splits the data differently is refused."""
    from .data import tokenize

    try:
        theirs = tokenize(cand_dir, data, ids.shape[1])
    except SurgeryError:
        print(f"warning: {cand_dir} has no loadable tokenizer; both models are fed the reference's tokens", file=sys.stderr)
        return
    n = min(ids.shape[1], theirs.shape[1])
    differ = (ids[0, :n] != theirs[0, :n]).nonzero()
    if differ.numel() or theirs.shape[1] != ids.shape[1]:
        at = int(differ[0]) if differ.numel() else n
        raise SurgeryError(f"the two tokenizers split the data differently (first difference at token {at}): the "
                           "comparison would be meaningless; compare models that share a tokenizer, or pass --data random",
                           where=str(cand_dir))


def check_integrity(output: Path) -> list[str]:
    """Files whose digest differs from the one the report recorded (missing files included).

    Reports record BLAKE3 (`files_blake3`); those written before record SHA-256 (`files_sha256`).
    """
    report = output / "surgery_report.json"
    if not report.is_file():
        raise SurgeryError("no surgery_report.json: not an output of surgery", where=str(output))
    try:
        doc = json.loads(report.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SurgeryError(f"not valid JSON ({e}); the report itself was changed", where=str(report)) from None
    key = next((k for k in ("files_blake3", "files_sha256") if isinstance(doc, dict) and k in doc), None)
    recorded = doc.get(key) if key else None
    if not isinstance(recorded, dict) or not recorded:
        raise SurgeryError("the report records no file hashes", where=str(report))
    from ..io.digest import file_digests

    now = file_digests(output, skip=("surgery_report.json",), algorithm=key.removeprefix("files_"))
    return sorted(f for f in recorded if now.get(f) != recorded[f]) + sorted(f for f in now if f not in recorded)


def _token_budget(text: str) -> int:
    """--max-tokens: a loss needs at least two tokens (one prediction)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 2:
        raise argparse.ArgumentTypeError(f"{n}: at least 2 tokens (a loss needs one prediction)")
    return n


def add_verify_parser(sub) -> None:
    p = sub.add_parser("verify", help="compare two checkpoints, or re-check an output's file hashes")
    p.add_argument("output", help="the checkpoint to check")
    p.add_argument("--against", help="reference checkpoint (directory, hub id or builtin:NAME); default: the source an "
                   "output of surgery records, if its content hash still matches: then, with no other option, the output "
                   "is judged by its recipe's own verification (the passes and rules of the run that wrote it)")
    p.add_argument("--integrity", action="store_true", help="re-check the hash (BLAKE3) of every file the report recorded")
    p.add_argument("--data",
                   help="evaluation text: builtin:python-license, a text file, a directory of .txt files, a saved "
                        "dataset, or random (seeded token ids) (default: builtin:python-license; without --against, "
                        "the recorded recipe's verify.data)")
    p.add_argument("--max-tokens", type=_token_budget, metavar="N",
                   help="evaluate on the first N tokens of the data, N >= 2 (default: 2048; without --against, the "
                        "recorded recipe's verify.max_tokens)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="precision both models run in (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N; layers stream through it (default: %(default)s)")
    p.add_argument("--tolerance", type=_tolerance, metavar="T",
                   help="accept an approximation: |relative loss change| <= T and next-token KL <= T x reference loss "
                        "(default: the same function, up to the rounding noise measured on the reference; without --against, an "
                        "approximate recipe's own verify.tolerance)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_verify)


def run_verify(args) -> int:
    if args.integrity:
        bad = check_integrity(Path(args.output))
        if bad:
            print(f"integrity FAILED: {len(bad)} file(s) changed or missing: {', '.join(bad)}")
            return 1
        print("integrity ok: every file matches its recorded hash")
        if not args.against:
            return 0
    if not (args.against or args.data or args.max_tokens or args.tolerance is not None or args.dtype != "float32"):
        report = recorded_source.verify_as_run(Path(args.output), args.device)  # the run's own passes and rules
        print(json.dumps(asdict(report), indent=2) if args.json else report.table(width=terminal_width(watched=True)))
        return 0 if report.passed else 1
    recorded_source.fill_defaults(args)
    rep = compare_checkpoints(args.output, args.against, args.data, args.max_tokens, args.dtype, args.device, args.tolerance,
                              progress=True)
    print(json.dumps(asdict(rep), indent=2) if args.json else rep.text())
    return 0 if rep.passed else 1


def _tolerance(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number >= 0, e.g. 1e-3")
    return value
