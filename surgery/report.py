"""The verification report: the per-op story as a table, JSON with integrity hashes, markdown, a plot."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__
from .io.atomic import REPORT
from .io.digest import file_digests
from .rule_summary import short_rule
from .text_table import fit_lines, text_table


@dataclass(kw_only=True)
class StepResult:
    """One judged state: its loss, its distance from its reference and the rule that judged it."""
    op: str
    loss: float
    rel_change: float  # against the source, on every row
    max_logit_diff: float
    exactness: str
    rule: str
    passed: bool | None  # None: an intermediate approximate step, reported but not judged
    op_index: int | None = None  # the recipe op after which this state was taken
    kl_divergence: float = 0.0
    top1_agreement: float = 1.0
    reference: str = "source"  # what it was compared with: the source, or the state after the last reinit or prune
    # the loss change against `reference`, what the step is judged on (after a prune: what the later ops did)
    rel_change_vs_reference: float | None = None

    def rel_change_cell(self) -> str:
        return f"{self.rel_change:+.3e}" + (f" ({self.rel_change_vs_reference:+.3e} vs {self.reference})"
                                            if self.reference != "source" and self.rel_change_vs_reference is not None else "")


@dataclass
class DeadSlice:
    """A new slice some of whose units get no gradient (`verify.gradient_flow`)."""
    tensor: str
    op: str
    dead: int  # units with no gradient
    of: int  # units in the slice


@dataclass
class ExpertSymmetry:
    """A mixture-of-experts layer: distinct experts and the router's gradient, before and after one SGD step."""
    layer: int
    experts: int
    distinct: int
    distinct_after_step: int
    router_grad: float
    router_grad_after_step: float


@dataclass
class RandomPrune:
    """The same prune with importance: random (its seeded baseline)."""
    loss: float
    rel_change: float  # against the source
    rel_change_vs_reference: float  # against the state it pruned
    kl_divergence: float
    top1_agreement: float
    max_logit_diff: float
    dropped: list | None = None


@dataclass
class PruningRow:
    """A prune beside its random baseline (`random` None: the prune is random, its own baseline)."""
    op_index: int
    op: str
    importance: str  # or "listed"
    unit: str
    kept_per_layer: int
    of: int
    tokens: int  # calibration tokens its importance was measured on
    dropped: list | None
    loss: float
    rel_change: float  # against the source, as on every row
    rel_change_vs_reference: float  # against `reference`, the state it pruned
    reference: str
    kl_divergence: float
    top1_agreement: float
    random: RandomPrune | None
    beats_random: bool | None
    scores: list | None  # every score, for the plot (None beyond verify.pruning.MAX_REPORTED_SCORES)
    score_summary: list | None  # per layer [min, median, max]


@dataclass
class Report:
    loss_source: float
    loss_output: float
    rel_change: float  # against the source
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
    dead_slices: list[DeadSlice] = field(default_factory=list)
    expert_symmetry: list[ExpertSymmetry] = field(default_factory=list)
    seconds: float = 0.0
    reference: str = "source"  # what the output was compared with: the source, or the state after the last reinit
    bound: dict | None = None  # the final verdict's bound per metric (verify.rules.Bound), and its basis
    failed: list[str] = field(default_factory=list)  # each metric beyond its bound, e.g. "max |dlogit| 8.1 > 0.35"
    noise_floor: dict | None = None  # the measured rounding noise the bound derives from (verify.rules.NoiseFloor)
    pruning: list[PruningRow] = field(default_factory=list)
    rel_change_vs_reference: float | None = None  # the output's loss change against `reference`

    def symmetry_line(self) -> str | None:
        if not self.expert_symmetry:
            return None
        s = self.expert_symmetry
        n = s[0].experts
        lo = min(x.distinct_after_step for x in s)
        grad = min(x.router_grad_after_step for x in s)
        return (f"experts: {min(x.distinct for x in s)}..{max(x.distinct for x in s)} distinct of {n} per layer, "
                f"after one SGD step at least {lo} (router gradient >= {grad:.2e})"
                + ("" if lo > 1 and grad > 0 else ": the experts do not separate (router zeros?)"))

    def pruning_lines(self) -> list[str]:
        """Each prune beside the same prune with importance: random."""
        out = []
        for r in self.pruning:
            b = r.random
            how = "the listed layers" if r.importance == "listed" else r.importance
            who = "the listed choice" if r.importance == "listed" else how
            head = f"{r.op}: by {how}, loss {r.loss:.4f} ({_changes(r, r.reference)})"
            if b is None:
                out.append(f"{head}: a random prune, its own baseline")
                continue
            if r.dropped == b.dropped:
                verdict = "the random prune dropped the same units"
            else:
                verdict = f"{who} {'beats' if r.beats_random else 'does NOT beat'} random"
            out.append(f"{head}; same sizes at random {b.loss:.4f} ({_changes(b, r.reference)}): {verdict}")
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def table(self, width: int | None = None) -> str:
        """The per-step story with each rule in a few words (`short_rule`); surgery_report.md has them in full."""
        rows = [("step", "loss", "rel change", "max |dlogit|", "rule", "ok")]
        rows.append(("source", f"{self.loss_source:.6f}", "", "", "", ""))
        mark = {True: "yes", False: "NO", None: "-"}
        for i, s in enumerate(self.steps):
            name = s.op + (" [written output]" if i == len(self.steps) - 1 else "")
            rows.append((name, f"{s.loss:.6f}", s.rel_change_cell(), f"{s.max_logit_diff:.3e}",
                         short_rule(s.exactness, s.rule, s.passed), mark[s.passed]))
        if not self.steps:
            rows.append(("copy [written output]", f"{self.loss_output:.6f}", f"{self.rel_change:+.3e}", f"{self.max_logit_diff:.3e}",
                         short_rule(self.promise.split(":", 1)[0], self.rule, self.passed), mark[self.passed]))
        lines = text_table(rows, width=width, wrap=(0, 4))
        table = len(lines)
        verdict = "PASSED" if self.passed else f"FAILED{' at ' + self.broken_by if self.broken_by else ''}"
        lines.append(f"verification {verdict}: {self.tokens} tokens, {self.precision}, params {self.params_source:,} -> {self.params_output:,}")
        if self.dead_slices:
            lines.append(f"dead slices (no gradient): {len(self.dead_slices)}")
        if self.symmetry_line():
            lines.append(self.symmetry_line())
        lines += self.pruning_lines()
        return "\n".join(lines[:table] + fit_lines(lines[table:], width))


def _changes(row: PruningRow | RandomPrune, reference: str) -> str:
    """A pruning row's loss change against the source, and against the state it pruned where that is not the source."""
    if reference == "source":
        return f"{row.rel_change:+.2%}"
    return f"{row.rel_change:+.2%} vs source, {row.rel_change_vs_reference:+.2%} vs {reference}"


def write_report(out_dir: Path, report: Report | None, surgery_seconds: float, written, interrupted: bool = False) -> None:
    """The verification result plus integrity hashes: every output file and every tensor.

    `verification`: passed, failed, skipped (--no-verify) or interrupted (Ctrl-C: the weights are complete); `verified`
    is true only where it passed (it was true for a failed one, which a script testing it would have accepted)."""
    verified = report is not None and report.passed and not interrupted
    doc = {"surgery_version": __version__, "verified": verified, "surgery_seconds": round(surgery_seconds, 3),
           "verification": "interrupted" if interrupted else "skipped" if report is None else "passed" if report.passed else "failed"}
    if report is not None:
        doc.update(json.loads(report.to_json()))
        doc["verify_seconds"] = round(report.seconds, 3)
    doc["tensor_blake3"] = written.tensors
    doc["files_blake3"] = file_digests(out_dir, skip=(REPORT,), known=written.files)
    (out_dir / REPORT).write_text(json.dumps(doc, indent=2) + "\n")


def write_report_files(out_dir: Path, report: Report, title: str) -> list[str]:
    """`surgery_report.md` (the story as a table) and, with matplotlib, `surgery_report.png`."""
    written = []
    plotted = plot_steps(report, out_dir / "surgery_report.png", title)
    verdict = "passed" if report.passed else "FAILED"
    lines = [f"# Verification of {title}: {verdict}", "", f"Promise: {report.promise}", ""]
    if not report.passed:
        lines += [f"**Verification FAILED**: {report.rule}. The output is kept for inspection; it is not verified.", ""]
    lines += [md_row(["step", "loss", "rel. change", "max abs logit diff", "rule", "ok"]), md_row(["---"] * 6),
              md_row(["source", f"{report.loss_source:.6f}", "", "", "", ""])]
    mark = {True: "yes", False: "**NO**", None: "-"}
    for s in report.steps:
        lines.append(md_row([f"`{s.op}`", f"{s.loss:.6f}", s.rel_change_cell(), f"{s.max_logit_diff:.3e}", s.rule,
                             mark[s.passed]]))
    against = ("" if report.reference == "source" or report.rel_change_vs_reference is None
               else f"; against {report.reference}: relative change {report.rel_change_vs_reference:+.3e}")
    lines += ["", f"Output: loss {report.loss_output:.6f}, relative change {report.rel_change:+.3e} against the source{against}, max |logit diff| "
              f"{report.max_logit_diff:.3e}, next-token KL {report.kl_divergence:.3e}, top-1 agreement {report.top1_agreement:.4f}.",
              f"{report.tokens} tokens in {report.precision}. Verdict: **{verdict}**"
              + (f" (broken by {report.broken_by})" if report.broken_by else "") + ".", ""]
    if report.dead_slices:
        lines += ["Dead slices (no gradient): " + ", ".join(f"{d.tensor} ({d.dead}/{d.of})" for d in report.dead_slices), ""]
    if report.symmetry_line():
        lines += [report.symmetry_line()[0].upper() + report.symmetry_line()[1:] + ".", ""]
    if plotted:
        lines += ["![loss per step](surgery_report.png)", ""]
        written.append("surgery_report.png")
    if report.pruning:
        lines += pruning_section(report)
        if plot_importance(report, out_dir / "surgery_importance.png"):
            lines += ["![importance per layer](surgery_importance.png)", ""]
            written.append("surgery_importance.png")
    (out_dir / "surgery_report.md").write_text("\n".join(lines))
    return ["surgery_report.md"] + written


def md_row(cells: list[str]) -> str:
    """A markdown table row; `|` inside a cell (rules say |rel change|) is escaped, code spans included."""
    return "| " + " | ".join(" ".join(c.split()).replace("|", "\\|") for c in cells) + " |"


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


def pruning_section(report: Report, limit: int = 16) -> list[str]:
    """Each prune beside its random baseline, and what it dropped per layer."""
    lines = ["## Pruning: measured importance against a random prune of the same sizes", "",
             md_row(["op", "importance", "loss", "rel. change", "KL", "top-1", "random: loss", "rel. change", "KL", "top-1"]),
             md_row(["---"] * 10)]
    for r in report.pruning:
        b = r.random
        theirs = ["-"] * 4 if b is None else [f"{b.loss:.6f}", f"{b.rel_change:+.3e}", f"{b.kl_divergence:.3e}",
                                                f"{b.top1_agreement:.4f}"]
        lines.append(md_row([f"`{r.op}`", r.importance, f"{r.loss:.6f}", f"{r.rel_change:+.3e}",
                             f"{r.kl_divergence:.3e}", f"{r.top1_agreement:.4f}", *theirs]))
    lines.append("")
    for line in report.pruning_lines():
        lines += [f"- {line}"]
    lines.append("")
    for r in report.pruning:
        d = r.dropped
        if d and isinstance(d[0], list):
            lines.append(f"Dropped by `{r.op}` ({r.of - r.kept_per_layer} of {r.of} {r.unit}s per layer):")
            lines += [f"- layer {i}: " + ", ".join(map(str, x[:limit])) + (f", ... ({len(x)} in all)" if len(x) > limit else "")
                      for i, x in enumerate(d)]
        else:
            lines.append(f"Dropped by `{r.op}`: layers {d} of {r.of}.")
        lines.append("")
    return lines


def plot_importance(report: Report, path: Path) -> bool:
    """Per prune: each layer's scores, sorted, with the cut (neurons, heads), or the score of each layer (layers)."""
    scores = [r for r in report.pruning if r.scores is not None]
    if not scores:
        return False
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(6.4, 2.8 * len(scores)), dpi=100)
    for k, r in enumerate(scores, start=1):
        ax = fig.add_subplot(len(scores), 1, k)
        s = r.scores
        if s and isinstance(s[0], list):
            for layer, row in enumerate(s):
                top = max(row) or 1.0
                ax.plot(sorted((x / top for x in row), reverse=True), linewidth=0.8, label=f"layer {layer}" if len(s) <= 8 else None)
            ax.axvline(r.kept_per_layer - 0.5, color="tab:red", linestyle="--", linewidth=1, label="cut")
            ax.set_xlabel(f"{r.unit}s by rank (score / the layer's best)")
        else:
            dropped = set(r.dropped or []) if r.unit == "layer" else {(r.dropped or [-1])[0]}
            ax.bar(range(len(s)), s, color=["tab:red" if i in dropped else "tab:blue" for i in range(len(s))])
            ax.set_xlabel("layer (red: dropped)" if r.unit == "layer" else "first layer of the block")
        ax.set_ylabel(r.importance)
        ax.set_title(r.op, fontsize=9)
        if s and isinstance(s[0], list) and len(s) <= 8:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return True
