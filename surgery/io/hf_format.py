"""Writing transformers' layout: safetensors shards of at most `shard_size`, their index, and config.json."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..execute import OutputTensor, output_tensors
from ..modeling import MODELING_FILE, patched_output_config
from ..state import ModelState
from .writer import PlannedTensor, assign_shards, parse_size, shard_file_names, write_index


class HfFormat:
    """The state's tensors under their own names, in the order `output_tensors` gives, cut into shards."""

    def __init__(self, dtype: str = "auto", shard_size: str | int = "5GB"):
        self.dtype = dtype
        self.shard_size = shard_size

    @classmethod
    def for_output(cls, out, source) -> "HfFormat":
        return cls(out.dtype, out.shard_size)

    def tensors(self, state: ModelState) -> list[OutputTensor]:
        return [OutputTensor(name, node, d) for name, node, d in output_tensors(state, self.dtype)]

    def files(self, planned: list[PlannedTensor]) -> list[tuple[str, list[PlannedTensor]]]:
        shards = assign_shards(planned, parse_size(self.shard_size))
        return list(zip(shard_file_names(len(shards)), shards))

    def finish(self, state: ModelState, out_dir: Path, files: list[tuple[str, list[PlannedTensor]]]) -> None:
        write_index(out_dir, [shard for _, shard in files], [name for name, _ in files])
        write_config(state, out_dir, self.dtype)


def write_config(state: ModelState, out_dir: Path, dtype: str) -> dict:
    config = dict(state.spec.config)
    # A source's own remote code was written for the model before surgery: never pass it on.
    config.pop("auto_map", None)
    if config.get("surgery_live_width"):
        config = patched_output_config(config)
    if dtype != "auto":
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if config.get("surgery_live_width"):
        shutil.copyfile(Path(__file__).parent.parent / "modeling" / MODELING_FILE, out_dir / MODELING_FILE)
    return config
