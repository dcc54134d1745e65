"""Writing Mistral's native release layout: consolidated.safetensors, params.json and tokenizer.model."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from ..errors import SurgeryError
from .native_layout import WEIGHTS_FILE, hf_to_native, to_native_rotary
from .native_params import PARAMS_FILE, native_params


def write_native(state, reader, out_dir: Path, device: torch.device, dtype: str = "auto",
                 progress: bool = False) -> dict[str, str]:
    """consolidated.safetensors + params.json (+ tokenizer.model copied) for `state`; returns each tensor's digest (`io.digest`)."""
    from tqdm import tqdm

    from ..arch import TensorRole as R
    from ..execute import FiniteReader, compute_dtype_for, output_tensors, streaming_threads
    from ..lazy import evaluate
    from .writer import PlannedTensor, ShardWriter

    spec = state.spec
    params = native_params(spec, getattr(reader, "passthrough", None))
    biases = [n for n, info, _ in state.items() if info.kind != "weight"]
    if biases:
        raise SurgeryError(f"Mistral's native format has no biases, but the model has {len(biases)} (e.g. {biases[0]!r}); "
                           f"write format: hf", where="output.format")
    jobs: dict[str, tuple] = {}
    for name, node, d in output_tensors(state, dtype):
        info = state.info(name)
        native = hf_to_native(name)
        if native is None:
            raise SurgeryError(f"tensor {name!r} has no place in Mistral's native format; write format: hf", where="output.format")
        heads = {R.ATTN_Q: spec.num_heads, R.ATTN_K: spec.num_kv_heads}.get(info.role)
        jobs[native] = (node, d, heads)
        if info.role == R.EMBED and spec.tied:  # native checkpoints always hold their output matrix
            jobs["output.weight"] = (node, d, None)
    planned = [PlannedTensor(n, node.shape, d) for n, (node, d, _) in jobs.items()]
    cd = compute_dtype_for(state)
    finite = FiniteReader(reader)  # NaN/Inf source tensors are refused by name, as write_weights does
    out_dir = Path(out_dir)
    writer = ShardWriter(out_dir / WEIGHTS_FILE, planned)
    digests: dict[str, str] = {}
    bar = tqdm(total=sum(p.nbytes for p in planned), unit="B", unit_scale=True, desc="writing",
               disable=not (progress and sys.stderr.isatty()), leave=False)
    try:
        with streaming_threads(busy=1):  # the hashing thread
            for p in planned:
                node, d, heads = jobs[p.name]
                t = evaluate(node, finite, device, cd)
                if heads is not None:
                    t = to_native_rotary(t, heads, spec.head_dim)
                writer.write(p.name, t.to(dtype=d) if t.is_floating_point() else t)
                bar.update(p.nbytes)
        writer.close()
        digests.update(writer.digests)
    finally:
        bar.close()
        writer.abort()
    (out_dir / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")
    src = getattr(reader, "path", None)
    if src is not None and Path(src).is_dir():
        for f in sorted(Path(src).glob("tokenizer.model*")):
            shutil.copyfile(f, out_dir / f.name)
    return digests
