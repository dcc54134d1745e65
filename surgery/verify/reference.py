"""A reference and its noise floor: the model later steps are compared with, and how far rounding alone moves it
(in the probe dtype, one storage rounding of every weight, its rotary frequencies as a candidate writes them)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lazy import generator
from ..runtime.build import skeleton
from ..runtime.evaluation import Evaluation, compare, evaluate
from ..runtime.progress import QUIET, Progress
from ..runtime.sources import TensorSource
from .rules import NoiseFloor


def probe_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a reference's compute noise is measured against: float64, or float32 for a float64 model."""
    return torch.float64 if dtype != torch.float64 else torch.float32


@dataclass
class Reference:
    """What later steps are compared with: the source, or the state right after the last reset, measured."""
    label: str
    evaluation: Evaluation  # in the compute dtype
    floor: NoiseFloor
    source: TensorSource | None = None


class WrittenRope:
    """A reference run with the rotary frequencies a candidate's config gives the reference's pairs
    (`RotaryPairs.to`: pair i of the reference is the candidate's pair to[i]), computed by transformers
    from that config: what the float32 rounding of the written rope parameters alone does to it.

    `rounding_only`: each of those frequencies f is within float32 rounding of the reference's own.
    Each side computes theta ** -e in float32 with e, theta, the power and the reciprocal each rounded
    (unit roundoff u): a relative error up to (|ln f| + 4) u per side if the power is correctly
    rounded; 4 (|ln f| + 4) u in all allows each side twice that. Frequencies further apart are a
    different model, not rounding, and get no allowance."""

    def __init__(self, inner: TensorSource, candidate_config: dict, to: tuple[int, ...]):
        self.inner, self.config, self.where = inner, inner.config, inner.where
        theirs = skeleton(candidate_config, torch.float32, torch.device("cpu")).named_buffers()
        self.frequencies = {n: b[list(to)].clone() for n, b in theirs if n.endswith("inv_freq")}
        self.key = tuple((n, tuple(b.tolist())) for n, b in sorted(self.frequencies.items()))
        own = dict(skeleton(inner.config, torch.float32, torch.device("cpu")).named_buffers())
        u = torch.finfo(torch.float32).eps / 2
        self.rounding_only = bool(self.frequencies) and all(
            n in own and own[n].shape == f.shape
            and bool(((f.double() / own[n].double() - 1).abs() <= 4 * (own[n].double().log().abs() + 4) * u).all())
            for n, f in self.frequencies.items())

    def names(self):
        return self.inner.names()

    def load(self, name, device, dtype):
        return self.inner.load(name, device, dtype)

    def buffers(self, model) -> dict[str, torch.Tensor]:
        return {n: self.frequencies[n] for n, b in model.named_buffers()
                if n in self.frequencies and b.shape == self.frequencies[n].shape}


class DitheredSource:
    """Another source whose every weight is multiplied by (1 + d), d uniform in [-u, u] with u the unit
    roundoff of `dtype`: one rounding into `dtype` as the standard model of floating point has it,
    seeded per tensor name (a tied head sees its embedding's dither)."""

    def __init__(self, inner: TensorSource, dtype: torch.dtype, seed: int = 0):
        self.inner, self.u, self.seed = inner, torch.finfo(dtype).eps / 2, seed
        self.config, self.where = inner.config, inner.where

    def names(self):
        return self.inner.names()

    def load(self, name, device, dtype):
        w = self.inner.load(name, device, dtype)
        if not w.is_floating_point():
            return w
        d = 2 * torch.rand(w.shape, generator=generator("dither", self.seed, name), dtype=w.dtype) - 1
        return w.mul_(1 + self.u * d.to(w.device))


def measure_reference(label: str, source: TensorSource, ids: torch.Tensor, device: torch.device, dtype: torch.dtype,
                      storage: str | None, progress: Progress = QUIET) -> Reference:
    """Evaluate a reference and measure its noise floor (each model streamed layer by layer), as a run's passes do."""
    ev = evaluate(source, ids, device, dtype, progress, f"evaluating {label}")
    stored = None
    if storage is not None:
        stored = compare(ev, evaluate(DitheredSource(source, getattr(torch, storage)), ids, device, dtype, progress,
                                      f"noise floor: {label} with {storage} rounding"))
    probe = probe_dtype(dtype)
    measured = evaluate(source, ids, device, probe, progress, f"noise floor: {label} in {str(probe)[6:]}")
    return Reference(label, ev, NoiseFloor(compare(ev, measured), stored, storage), source)
