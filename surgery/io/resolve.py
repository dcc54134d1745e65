"""Where a source lives: `builtin:NAME`, a local directory, or a Hugging Face Hub id."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import SurgeryError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*", "params.json", "*.pth"]


def builtin_names() -> list[str]:
    return sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file() or (p / "params.json").is_file())


def resolve_source(source: str, revision: str | None = None) -> Path:
    """Return a local directory for `source`, downloading hub ids through huggingface_hub."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        path = ASSETS / name
        if not path.is_dir() or name not in builtin_names():
            raise SurgeryError(f"unknown builtin {name!r}; available: {', '.join(builtin_names())}")
        return path
    path = Path(source).expanduser()
    if path.exists():
        return path
    if HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        return download(source, revision)
    raise SurgeryError(f"{source!r} is neither an existing directory, builtin:NAME, nor a hub id ORG/NAME")


def download(repo_id: str, revision: str | None) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return Path(
            huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS, etag_timeout=10)
        )
    except (HfHubHTTPError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SurgeryError(
            f"cannot fetch {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {reason[:200]}); "
            f"download it elsewhere and pass --source PATH"
        ) from None


def open_checkpoint(path: Path):
    """A checkpoint directory in either layout: Mistral native (params.json) or transformers."""
    from .checkpoint import Checkpoint
    from .native import NativeCheckpoint, is_native

    return NativeCheckpoint(path) if is_native(path) else Checkpoint(path)
