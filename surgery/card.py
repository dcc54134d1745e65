"""What a run writes beside the weights for people: the resolved recipe and the model card."""
from __future__ import annotations

from pathlib import Path

import yaml

from . import __version__
from .io.checkpoint import SourceDigest
from .io.native_params import is_native
from .io.resolve import is_hub_id
from .plan import Plan, format_plan
from .recipe.loader import LoadedRecipe
from .report import Report


HASH_COVERS = "config file bytes + every tensor's name, dtype, shape and bytes"


def config_file(source_dir: Path) -> Path:
    return Path(source_dir) / ("params.json" if is_native(source_dir) else "config.json")


def source_content_hash(source_dir: str | Path) -> str:
    """The source content hash a run records, computed by reading a checkpoint directory on its own.

    Same value as the `# source content blake3` line of an output's surgery_recipe.yaml made from it:
    equal hashes mean the same config and the same bytes in every tensor.
    """
    from .io.resolve import open_checkpoint

    return SourceDigest(open_checkpoint(Path(source_dir))).content_hash(config_file(Path(source_dir)))


def resolved_recipe(loaded: LoadedRecipe, p: Plan) -> dict:
    data = loaded.recipe.model_dump(mode="json", exclude_none=True)
    src = loaded.recipe.source_spec
    data["source"] = {"path": src.path, **({"revision": src.revision} if src.revision else {})}
    return data


def write_resolved_recipe(loaded: LoadedRecipe, p: Plan, out_dir: Path, source_hash: str) -> None:
    """`source_hash`: `SourceDigest.content_hash` of the reader the run wrote through (no second read)."""
    header = (
        f"# Resolved by surgery {__version__} from {loaded.file}\n"
        f"# source content blake3 ({HASH_COVERS}): {source_hash}\n"
    )
    body = yaml.safe_dump(resolved_recipe(loaded, p), sort_keys=False)
    (out_dir / "surgery_recipe.yaml").write_text(header + body)


def write_model_card(loaded: LoadedRecipe, p: Plan, out_dir: Path, report: Report | None, seconds: float,
                     interrupted: bool = False) -> None:
    """`interrupted`: verification was stopped (Ctrl-C); the weights are complete but not verified."""
    src = loaded.recipe.source_spec.path
    failed = report is not None and not report.passed
    front = ["---"] + ([f"base_model: {src}"] if is_hub_id(src) else []) + ["tags:", "- surgery"]
    front += ["- surgery-verification-failed"] if failed else []
    front += ["- surgery-verification-interrupted"] if interrupted else []
    lines = front + ["---", "", f"# {loaded.recipe.name}", ""]
    if failed:
        lines += [f"> **Verification FAILED**: {report.rule}. This checkpoint did not keep the recipe's promise; it is "
                  "kept for inspection only and is not verified.", ""]
    if interrupted:
        lines += ["> **Not verified**: verification was interrupted. The weights are complete; `surgery verify` on this "
                  "directory compares them with the source recorded in surgery_recipe.yaml.", ""]
    if loaded.recipe.description:
        lines += [loaded.recipe.description.strip(), ""]
    took = f"in {format_seconds(seconds)}" + (f" (verification {format_seconds(report.seconds)})" if report else "")
    lines += [f"Made with surgery {__version__} from `{src}` {took}.", "",
              f"Promise: **{p.promise.exactness.value}**: {p.promise.reason}.", ""]
    if p.final.spec.live_width:
        lines += ["This checkpoint ships its model code (`modeling_surgery.py`): load it with "
                  "`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` (and the tokenizer with "
                  "`AutoTokenizer.from_pretrained(path, trust_remote_code=True)`). Its model_type is "
                  "`surgery_stablelm`, so loading without `trust_remote_code` stops with an error instead of "
                  "building stock StableLM, which would compute a different function.", ""]
    if report is not None:
        lines += ["## Verification", "", "```", report.table(), "```", "", "Details: [surgery_report.md](surgery_report.md).", ""]
    lines += ["## Recipe", "", "```yaml", (out_dir / "surgery_recipe.yaml").read_text().rstrip(), "```", "",
              "## Plan", "", "```", format_plan(p), "```", ""]
    (out_dir / "README.md").write_text("\n".join(lines))


def format_seconds(s: float) -> str:
    """A duration with three significant digits: 0.0412 s, 3.27 s, 125 s."""
    return f"{s:.3g} s" if s < 100 else f"{s:.0f} s"
