"""A cache of the source's reference passes: a second run of a recipe on the same source skips them.

What is stored: the source's evaluation in the compute dtype (final hidden states, log-sum-exp, top-1, loss:
what `compare` needs besides the lm_head, which is read from the source again) and its noise-floor
comparisons (the probe dtype, one storage rounding). An entry's key is everything its answer depends on: the
pass's key, the source's content hash, the token ids' hash, the device type, the storage dtype, and the
surgery, torch and transformers versions; an entry is read only if its stored key equals it exactly.
Tensors go to safetensors, scalars to json (never pickle), each file written whole then renamed into place.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from .. import __version__
from ..io import digest
from ..runtime.evaluation import Comparison, Evaluation

DEFAULT = "~/.cache/surgery/verify"


def cache_dir() -> Path:
    return Path(os.environ.get("SURGERY_CACHE") or DEFAULT).expanduser()


def ids_hash(ids: torch.Tensor) -> str:
    t = ids.detach().to("cpu", torch.int64).contiguous().reshape(-1)
    return digest.hexdigest(t.view(torch.uint8).numpy()) + f":{list(ids.shape)}"


def _finite(x):
    """json without NaN/Infinity literals: those as strings, read back by `_float`."""
    return x if not isinstance(x, float) or math.isfinite(x) else repr(x)


def _float(x):
    return float(x) if isinstance(x, str) else x


class PassCache:
    """The source's cached passes for one (source content, token ids, device type, storage) on this machine."""

    def __init__(self, source_hash: str, ids: torch.Tensor, device: torch.device, storage: str | None,
                 root: Path | None = None):
        self.root = root or cache_dir()
        self.base = {"source": source_hash, "ids": ids_hash(ids), "device": torch.device(device).type,
                     "storage": storage, "surgery": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__}

    def _key(self, what: str, key: tuple) -> tuple[str, Path]:
        text = json.dumps({**self.base, "what": what, "pass": list(key)}, sort_keys=True)
        return text, self.root / digest.hexdigest(text.encode())[:40]

    def _write(self, path: Path, write) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=path.suffix)
            os.close(fd)
            try:
                write(tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError:  # a read-only or full cache only costs the next run its time
            pass

    # the source's evaluation ---------------------------------------------------------------------
    def evaluation_path(self, key: tuple) -> tuple[str, Path]:
        text, base = self._key("evaluation", key)
        return text, base.with_suffix(".safetensors")

    def has_evaluation(self, key: tuple) -> bool:
        return self._evaluation_tensors(key) is not None

    def _evaluation_tensors(self, key: tuple):
        text, path = self.evaluation_path(key)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if meta.get("key") != text:
                return None
            return path, json.loads(meta["scalars"])
        except Exception:  # a torn or foreign file is a miss
            return None

    def evaluation(self, key: tuple, streamed, device: torch.device) -> Evaluation | None:
        found = self._evaluation_tensors(key)
        if found is None:
            return None
        path, scalars = found
        t = load_file(str(path), device=str(device) if torch.device(device).type != "cpu" else "cpu")
        return Evaluation(_float(scalars["loss"]), t["hidden"], t["lse"], t["top1"], t["top_logit"], int(scalars["vocab"]),
                          streamed())

    def put_evaluation(self, key: tuple, ev: Evaluation) -> None:
        text, path = self.evaluation_path(key)
        tensors = {n: getattr(ev, n).detach().to("cpu").contiguous() for n in ("hidden", "lse", "top1", "top_logit")}
        meta = {"key": text, "scalars": json.dumps({"loss": _finite(ev.loss), "vocab": ev.vocab})}
        self._write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    # the source's noise floor --------------------------------------------------------------------
    def comparisons(self, key: tuple) -> dict[str, Comparison | None] | None:
        text, base = self._key("floor", key)
        path = base.with_suffix(".json")
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if found.get("key") != text:
            return None
        return {n: None if c is None else Comparison(**{f: _float(v) for f, v in c.items()})
                for n, c in found["comparisons"].items()}

    def put_comparisons(self, key: tuple, comparisons: dict[str, Comparison | None]) -> None:
        text, base = self._key("floor", key)
        body = {"key": text, "comparisons": {n: None if c is None else {f: _finite(v) for f, v in asdict(c).items()}
                                             for n, c in comparisons.items()}}
        self._write(base.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(body)))
