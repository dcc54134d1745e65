"""`surgery inspect`: what a checkpoint's tensors look like, and whether a scheme explains them.

    surgery inspect CHECKPOINT [--tensors GLOB] [--method M] [--std S] [--plot FILE.png [--log]]

A table per tensor (shape, mean, std, min, max, share of values beyond 3 std from the mean) and,
with `--method`, the std the scheme predicts for that tensor (see `surgery.init_schemes`). `--plot`
draws a histogram per tensor with the scheme's density over it (a plain or truncated normal), or a
normal fitted to the data when no method is given. matplotlib is imported only for `--plot`.

The CLI entry points are `add_inspect_parser(sub)` and `run_inspect(args)`.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .arch import TensorInfo
from .errors import SurgeryError
from .init_schemes import Draw, InitMethod, draw_for, tied_rule_role
from .io.resolve import open_checkpoint, resolve_source
from .text_table import terminal_width, text_table
from .spec import ModelSpec

if TYPE_CHECKING:  # torch loads only when a command reads weights: `surgery --help` stays fast
    import torch

    from .io.checkpoint import Checkpoint

CHUNK = 1 << 22  # elements per reduction step: the statistics of a 7B embedding in bounded memory
MAX_PLOTS = 24


@dataclass
class TensorStats:
    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    mean: float
    std: float
    min: float
    max: float
    beyond_3std: float  # share of values with |x - mean| > 3 std
    predicted: Draw | None = None  # the scheme's draw for this tensor, with --method

    @property
    def ratio(self) -> float | None:
        """Measured std over the std the scheme predicts."""
        if self.predicted is None:
            return None
        want = self.predicted.expected_std
        if want == 0:
            return None
        return self.std / want


@dataclass
class Inspection:
    path: Path
    spec: ModelSpec | None  # None for a family surgery does not know (globs only, no prediction)
    method: InitMethod | None
    stats: list[TensorStats]
    checkpoint: Checkpoint


def tensor_stats(t: torch.Tensor) -> tuple[float, float, float, float, float]:
    import torch

    """mean, std (population), min, max, share beyond 3 std; float64 sums over chunks."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return (math.nan,) * 5
    s = sq = 0.0
    lo, hi = math.inf, -math.inf
    for i in range(0, n, CHUNK):
        c = flat[i:i + CHUNK].to(torch.float64)
        s += float(c.sum())
        sq += float((c * c).sum())
        lo = min(lo, float(c.min()))
        hi = max(hi, float(c.max()))
    mean = s / n
    var = 0.0
    for i in range(0, n, CHUNK):  # second pass: no cancellation for tensors far from zero mean
        c = flat[i:i + CHUNK].to(torch.float64) - mean
        var += float((c * c).sum())
    std = math.sqrt(var / n)
    beyond = 0
    if std > 0:
        for i in range(0, n, CHUNK):
            c = flat[i:i + CHUNK].to(torch.float64)
            beyond += int(((c - mean).abs() > 3 * std).sum())
    return mean, std, lo, hi, beyond / n


def _select(names: list[str], spec: ModelSpec | None, pattern: str) -> list[str]:
    from .ops.reinit import ROLE_NAMES

    roles = ROLE_NAMES.get(pattern) if spec is not None else None
    if roles:
        return [n for n in names if (i := spec.arch.classify(n)) is not None and i.role in roles]
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def _natural(name: str):
    import re

    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def inspect_checkpoint(source: str | Path, tensors: str = "*", method: str | InitMethod | None = None,
                       std: float | None = None) -> Inspection:
    """Statistics of the tensors of `source` whose name matches `tensors` (a glob or a role name)."""
    path = resolve_source(str(source))
    ckpt = open_checkpoint(path)
    try:
        spec = ModelSpec.from_config(ckpt.config, where=str(path / "config.json"))
    except SurgeryError:
        spec = None
    m = InitMethod(method) if method is not None else None
    if m is not None and spec is None:
        raise SurgeryError(f"--method needs a model family surgery knows; model_type is {ckpt.config.get('model_type')!r}",
                           where=str(path))
    names = sorted(_select(list(ckpt.tensors), spec, tensors), key=_natural)
    if not names:
        raise SurgeryError(f"--tensors {tensors!r} matches no tensor; names look like {next(iter(ckpt.tensors))!r}",
                           where=str(path))
    out = []
    for name in names:
        meta = ckpt.tensors[name]
        t = ckpt.load(name)
        mean, sd, lo, hi, beyond = tensor_stats(t)
        predicted = None
        if m is not None:
            info = spec.arch.classify(name)
            if info is not None:
                if spec.tied and info.role.value == "embed":  # the shared tensor: see ops/reinit.py
                    info = type(info)(tied_rule_role(m, True), info.kind, info.layer, info.head)
                predicted = draw_for(m, spec, info, tuple(meta.shape), std)
            elif spec.arch.fused_parts(name) is not None:  # Phi-3's qkv_proj: predicted when every part draws alike
                layer, kind, roles = spec.arch.fused_parts(name)
                draws = {draw_for(m, spec, TensorInfo(r, kind, layer), tuple(meta.shape), std) for r in roles}
                predicted = draws.pop() if len(draws) == 1 else None
        out.append(TensorStats(name, tuple(meta.shape), str(meta.dtype).replace("torch.", ""), t.numel(),
                               mean, sd, lo, hi, beyond, predicted))
        del t
    return Inspection(path, spec, m, out, ckpt)


def format_table(result: Inspection, width: int | None = None) -> str:
    with_pred = result.method is not None
    head = ["tensor", "shape", "dtype", "mean", "std", "min", "max", ">3std"]
    if with_pred:
        head += [f"{result.method.value} std", "ratio", "draw"]
    rows = [head]
    for s in result.stats:
        r = [s.name, "x".join(map(str, s.shape)), s.dtype, f"{s.mean:+.3e}", f"{s.std:.3e}", f"{s.min:+.3e}",
             f"{s.max:+.3e}", f"{100 * s.beyond_3std:.3f}%"]
        if with_pred:
            p = s.predicted
            if p is None:
                r += ["", "", "(not a known role)"]
            else:
                ratio = s.ratio
                r += [f"{p.expected_std:.3e}", f"{ratio:.3f}" if ratio is not None else "", p.describe()]
        rows.append(r)
    lines = text_table(rows, right=set(range(3, 8)) | ({8, 9} if with_pred else set()), width=width, wrap=(0,))
    total = sum(s.numel for s in result.stats)
    lines.append(f"{len(result.stats)} tensor(s), {total:,} values, from {result.path}")
    if with_pred:
        lines.append("ratio: measured std / the std the scheme's draw has (a truncated normal's own std)")
    return "\n".join(lines)


def _matplotlib():
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed
    except ImportError:
        raise SurgeryError("--plot needs matplotlib: pip install 'model-surgery[plot]' (or pip install matplotlib)") from None
    return Figure


def check_plot_path(out: str | Path) -> Path:
    """A PNG file name in an existing directory (no directory is created behind the user's back)."""
    out = Path(out).expanduser()
    if out.suffix.lower() != ".png":
        raise SurgeryError("--plot writes a PNG: give a file name ending in .png", where=str(out))
    if not out.parent.is_dir():
        what = "is not a directory" if out.parent.exists() else "does not exist"
        raise SurgeryError(f"--plot: the directory {out.parent} {what}; create it first", where=str(out))
    if out.is_dir():
        raise SurgeryError("--plot: is a directory; give a file name ending in .png", where=str(out))
    return out


def plot(result: Inspection, out: str | Path, bins: int = 120, max_plots: int = MAX_PLOTS, log: bool = False) -> Path:
    """One histogram per tensor (density), with the scheme's predicted density drawn over it.

    `log`: a logarithmic density axis, where a normal is a parabola and a truncation a cliff: the
    tails tell `hf`'s plain normal from a truncated one, which a linear axis hides (seeds/000).
    """
    import torch

    import numpy as np

    Figure = _matplotlib()
    out = check_plot_path(out)
    stats = result.stats[:max_plots]
    cols = min(4, len(stats))
    rows = math.ceil(len(stats) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows + 0.6), layout="constrained")
    title = f"{result.path.name}: {len(result.stats)} tensor(s)"
    if result.method is not None:
        title += f", predicted by {result.method.value}"
    if len(result.stats) > len(stats):
        title += f" (first {len(stats)} shown)"
    fig.suptitle(title)
    for k, s in enumerate(stats):
        ax = fig.add_subplot(rows, cols, k + 1)
        t = result.checkpoint.load(s.name).detach().reshape(-1).to(torch.float32)
        short = s.name if len(s.name) <= 42 else "..." + s.name[-39:]
        ax.set_title(f"{short}\nstd {s.std:.3g}, >3std {100 * s.beyond_3std:.2f}%", fontsize=8)
        ax.tick_params(labelsize=7)
        pred = s.predicted
        if s.std == 0 or s.min == s.max:
            ax.axvline(s.min, color="C0", lw=2, label=f"data: all {s.min:g}")
            if pred is not None and pred.dist == "constant":
                ax.axvline(pred.value, color="C1", ls="--", lw=1.5, label=f"predicted {pred.value:g}")
            ax.set_xlim(s.min - 1, s.max + 1)
            ax.set_yticks([])
            ax.legend(fontsize=6)
            continue
        half = 4.5 * max(s.std, pred.expected_std if pred is not None else 0)
        if pred is not None and pred.bound is not None:
            half = max(half, 1.25 * pred.bound)
        lo, hi = s.mean - half, s.mean + half
        counts = torch.histc(t, bins=bins, min=lo, max=hi).double()
        width = (hi - lo) / bins
        density = (counts / (s.numel * width)).numpy()
        edges = np.linspace(lo, hi, bins + 1)
        ax.stairs(density, edges, color="C0", label="data")
        x = np.linspace(lo, hi, 600)
        top = float(density.max())
        if pred is not None and pred.dist != "constant":
            y = pred.pdf(x)
            top = max(top, float(y.max()))
            ax.plot(x, y, color="C1", lw=1.3, label=f"{result.method.value}:\n{pred.describe()}")
            if pred.bound is not None:
                for edge in (-pred.bound, pred.bound):
                    ax.axvline(edge, color="C3", ls=":", lw=1)
        elif pred is not None:
            ax.axvline(pred.value, color="C1", ls="--", lw=1.3, label=f"predicted {pred.value:g}")
        else:
            y = np.exp(-0.5 * ((x - s.mean) / s.std) ** 2) / (s.std * math.sqrt(2 * math.pi))
            ax.plot(x, y, color="C2", ls="--", lw=1.1, label="normal fit")
        ax.set_xlim(lo, hi)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(top * 1e-4, top * 8)
        else:
            ax.set_ylim(0, 1.45 * top)
        ax.legend(fontsize=6, loc="upper left", frameon=False)
        del t
    fig.savefig(out, dpi=110)
    return out


def _positive(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text}: a std is a positive finite number")
    return value


def add_inspect_parser(sub) -> None:
    """Register `surgery inspect` on the CLI's subparsers."""
    p = sub.add_parser("inspect", help="per-tensor statistics of a checkpoint, optionally against an init scheme")
    p.add_argument("checkpoint", help="directory, hub id or builtin:NAME")
    p.add_argument("--tensors", default="*", metavar="GLOB",
                   help="fnmatch glob over parameter names, or a role (embed, lm_head, attn.q, mlp.down, norm, ...)")
    p.add_argument("--method", choices=[m.value for m in InitMethod],
                   help="show the std this init scheme predicts for each tensor, and draw its density")
    p.add_argument("--std", type=_positive, help="the base std override the scheme was run with (reinit's std:)")
    p.add_argument("--plot", metavar="FILE.png", help="write histograms with the predicted density over them")
    p.add_argument("--log", action="store_true", help="logarithmic density axis in --plot (shows the tails)")
    p.set_defaults(handler=run_inspect)


def run_inspect(args) -> int:
    if args.plot:
        _matplotlib()  # fail before reading any tensor
        check_plot_path(args.plot)
    result = inspect_checkpoint(args.checkpoint, args.tensors, args.method, args.std)
    print(format_table(result, terminal_width()))
    if args.plot:
        out = plot(result, args.plot, log=args.log)
        print(f"wrote {out}")
    return 0
