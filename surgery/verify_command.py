"""`surgery verify OUTPUT --against SOURCE` and `surgery verify --integrity OUTPUT`.

Compares any two checkpoints (made by surgery or not) on the same tokens: one model is evaluated
and freed before the other is loaded, so memory holds one model plus the reference logits.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import SurgeryError
from .io.resolve import resolve_source

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

    def text(self) -> str:
        return "\n".join([
            f"loss  reference {self.loss_reference:.6f}  candidate {self.loss_candidate:.6f}  rel change {self.rel_change:+.3e}",
            f"logits  max |diff| {self.max_logit_diff:.3e}  mean |diff| {self.mean_logit_diff:.3e}  (first {self.compared_vocab} tokens of the vocab)",
            f"next-token KL {self.kl_divergence:.3e}  top-1 agreement {self.top1_agreement:.4f}",
            f"{self.tokens} tokens, {self.precision}, {self.seconds:.1f} s",
        ])


def compare_checkpoints(candidate: str, reference: str, data: str = "builtin:python-license", max_tokens: int = 2048,
                        dtype: str = "float32", device: str = "auto", device_map: str | None = None) -> PairReport:
    from .execute import pick_device
    from .io.native import load_model as load_output  # native folders are converted in memory
    from .verify import compare, evaluate_model, tokenize

    t0 = time.perf_counter()
    import torch

    dt = getattr(torch, dtype)
    dev = pick_device(device)
    ref_dir, cand_dir = resolve_source(reference), resolve_source(candidate)
    ids = tokenize(ref_dir, data, max_tokens)
    ref = evaluate_model(load_output(ref_dir, dt, dev, device_map), ids)  # freed before the candidate loads
    cmp = compare(ref, evaluate_model(load_output(cand_dir, dt, dev, device_map), ids))
    return PairReport(
        loss_reference=ref.loss, loss_candidate=cmp.loss, rel_change=cmp.rel_change, max_logit_diff=cmp.max_logit_diff,
        mean_logit_diff=cmp.mean_logit_diff, kl_divergence=cmp.kl_divergence, top1_agreement=cmp.top1_agreement,
        tokens=int(ids.shape[1]), precision=dtype, compared_vocab=cmp.compared_vocab, seconds=time.perf_counter() - t0,
    )


def check_integrity(output: Path) -> list[str]:
    """Files whose SHA-256 differs from the one the report recorded (missing files included)."""
    report = output / "surgery_report.json"
    if not report.is_file():
        raise SurgeryError("no surgery_report.json: not an output of surgery", where=str(output))
    recorded = json.loads(report.read_text()).get("files_sha256")
    if not recorded:
        raise SurgeryError("the report records no file hashes", where=str(report))
    from .io.writer import file_digests

    now = file_digests(output, skip=("surgery_report.json",))
    return sorted(f for f in recorded if now.get(f) != recorded[f]) + sorted(f for f in now if f not in recorded)


def add_verify_parser(sub) -> None:
    p = sub.add_parser("verify", help="compare two checkpoints, or re-check an output's file hashes")
    p.add_argument("output", help="the checkpoint to check")
    p.add_argument("--against", help="reference checkpoint (directory, hub id or builtin:NAME)")
    p.add_argument("--integrity", action="store_true", help="re-check the SHA-256 of every file the report recorded")
    p.add_argument("--data", default="builtin:python-license")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--device-map", choices=["auto"], help="place (and offload) a model larger than one device with accelerate")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_verify)


def run_verify(args) -> int:
    if args.integrity:
        bad = check_integrity(Path(args.output))
        if bad:
            print(f"integrity FAILED: {len(bad)} file(s) changed or missing: {', '.join(bad)}")
            return 1
        print("integrity ok: every file matches its recorded SHA-256")
        if not args.against:
            return 0
    if not args.against:
        raise SurgeryError("give --against SOURCE to compare, or --integrity", where="surgery verify")
    rep = compare_checkpoints(args.output, args.against, args.data, args.max_tokens, args.dtype, args.device, args.device_map)
    print(json.dumps(asdict(rep), indent=2) if args.json else rep.text())
    return 0
