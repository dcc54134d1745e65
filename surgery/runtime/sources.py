"""Tensor sources: named tensors in transformers layout plus their config, read one tensor when needed.

A checkpoint directory (safetensors, pickles or Mistral's native layout), a `ModelState` of lazy tensors
(each tensor computed from the source when its layer runs, so a per-op step needs no materialised model),
or a transformers model in memory.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Protocol

from ..io.checkpoint import InMemoryCheckpoint
from ..io.resolve import open_checkpoint
from ..lazy import evaluate
from ..rowwise import has_rows
from .build import disk_layout

if TYPE_CHECKING:
    import torch


class TensorSource(Protocol):
    """Named tensors in transformers layout plus the config they belong to. A source may also have
    `buffers(model) -> {name: tensor}`: buffers of the built model to replace (`verify.reference.WrittenRope`)."""

    where: str
    config: dict

    def names(self) -> Iterable[str]: ...

    def load(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor: ...


class CheckpointSource:
    """A checkpoint reader (`Checkpoint`, `NativeCheckpoint`, `InMemoryCheckpoint`): one tensor read at a time."""

    def __init__(self, reader, where: str | None = None):
        self.reader = reader
        self.config = reader.config
        self.where = where or str(getattr(reader, "path", "checkpoint"))

    def names(self):
        return self.reader.tensors.keys()

    def load(self, name, device, dtype):
        t = self.reader.load(name)
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

    def rows(self, name) -> tuple[int, ...] | None:
        """The shape of `name` where its rows can be read alone (`load_rows`), else None."""
        meta = self.reader.tensors.get(name)
        return tuple(meta.shape) if meta is not None and meta.shape and has_rows(self.reader) else None

    def load_rows(self, name, start, stop, device, dtype):
        """Rows [start, stop) of `name`, only those converted: a head read block by block is never whole."""
        return self.reader.load_rows(name, start, stop).to(device=device, dtype=dtype)


class StateSource:
    """A `ModelState`: each tensor computed from its lazy graph when its layer runs."""

    def __init__(self, state, reader, where: str = "state"):
        self.tensors = state.output()  # as a checkpoint stores them (fused parts joined)
        self.reader, self.where = reader, where
        self.config = state.spec.config

    def names(self):
        return self.tensors.keys()

    def load(self, name, device, dtype):
        return evaluate(self.tensors[name], self.reader, device, dtype)


def open_source(path: Path) -> CheckpointSource:
    """A checkpoint directory (transformers or Mistral native layout) as a tensor source."""
    return CheckpointSource(open_checkpoint(Path(path)), str(path))


def model_source(model) -> CheckpointSource:
    """A transformers model in memory as a tensor source (notebooks, tests)."""
    return CheckpointSource(InMemoryCheckpoint(model.config.to_dict(), disk_layout(model, dict(model.state_dict()))), "<memory>")
