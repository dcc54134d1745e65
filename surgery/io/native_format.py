"""Writing Mistral's native release layout: consolidated.safetensors, params.json and tokenizer.model.

The tensors take their native names (`native_layout`), wq and wk rows go back to native code's
interleaved rotary pairs, and a tied embedding is also written as `output.weight` (native
checkpoints always hold their output matrix). Everything goes into one file, as releases ship it.
"""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

from ..arch import TensorRole as R
from ..errors import SurgeryError
from ..execute import OutputTensor, output_tensors
from ..state import ModelState
from .native_layout import WEIGHTS_FILE, hf_to_native, to_native_rotary
from .native_params import PARAMS_FILE, native_params
from .writer import PlannedTensor


class MistralFormat:
    """Mistral's native release; `source` is the checkpoint read (its params.json passthrough fields and
    tokenizer.model carry over)."""

    def __init__(self, dtype: str = "auto", source=None):
        self.dtype = dtype
        self.source = source

    @classmethod
    def for_output(cls, out, source) -> "MistralFormat":
        return cls(out.dtype, source)

    def params(self, spec) -> dict:
        return native_params(spec, getattr(self.source, "passthrough", None))

    def tensors(self, state: ModelState) -> list[OutputTensor]:
        spec = state.spec
        self.params(spec)  # refuses what native code cannot run
        biases = [n for n, info, _ in state.items() if info.kind != "weight"]
        if biases:
            raise SurgeryError(f"Mistral's native format has no biases, but the model has {len(biases)} (e.g. {biases[0]!r}); "
                               f"write format: hf", where="output.format")
        out: dict[str, OutputTensor] = {}
        for name, node, d in output_tensors(state, self.dtype):
            info = state.info(name)
            native = hf_to_native(name)
            if native is None:
                raise SurgeryError(f"tensor {name!r} has no place in Mistral's native format; write format: hf", where="output.format")
            heads = {R.ATTN_Q: spec.num_heads, R.ATTN_K: spec.num_kv_heads}.get(info.role)
            rotary = None if heads is None else functools.partial(to_native_rotary, n_heads=heads, head_dim=spec.head_dim)
            out[native] = OutputTensor(native, node, d, rotary)
            if info.role == R.EMBED and spec.tied:
                out["output.weight"] = OutputTensor("output.weight", node, d)
        return list(out.values())

    def files(self, planned: list[PlannedTensor]) -> list[tuple[str, list[PlannedTensor]]]:
        return [(WEIGHTS_FILE, planned)]

    def finish(self, state: ModelState, out_dir: Path, files: list[tuple[str, list[PlannedTensor]]]) -> None:
        (out_dir / PARAMS_FILE).write_text(json.dumps(self.params(state.spec), indent=2) + "\n")
        src = getattr(self.source, "path", None)
        if src is not None and Path(src).is_dir():
            for f in sorted(Path(src).glob("tokenizer.model*")):
                shutil.copyfile(f, out_dir / f.name)
