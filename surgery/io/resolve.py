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


def is_hub_id(source: str) -> bool:
    """ORG/NAME that names no local path: what a model card's `base_model` may hold."""
    return bool(HUB_ID.match(source)) and not source.startswith((".", "/", "~")) and not Path(source).expanduser().exists()


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
    if is_hub_id(source):
        return download(source, revision)
    raise SurgeryError(f"{source!r} is neither an existing directory, builtin:NAME, nor a hub id ORG/NAME")


def download(repo_id: str, revision: str | None) -> Path:
    import huggingface_hub

    try:
        return Path(
            huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS, etag_timeout=10)
        )
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one line
        name = repo_id + (f"@{revision}" if revision else "")
        raise hub_error(e, f"cannot fetch {name} from the Hugging Face Hub",
                        "download it elsewhere and pass --source PATH") from None


def fetch_hub_file(repo_id: str, filename: str, revision: str | None, where: str, what: str = "the file") -> Path:
    """One file from the Hub, or the cached copy; fails in one line at once when the Hub is unreachable.

    hf_hub_download retries a failed look-up with backoff (five tries, ~25 s) when nothing is cached;
    one look-up without retries first tells an unreachable Hub apart, and the cache answers then.
    """
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    what = f"cannot fetch {what} from the Hugging Face Hub"
    hint = "download it and pass its path"
    try:
        if not constants.HF_HUB_OFFLINE:
            try:
                url = huggingface_hub.hf_hub_url(repo_id, filename, revision=revision)
                huggingface_hub.get_hf_file_metadata(url, timeout=10)
            except HfHubHTTPError as answer:
                if answer.response is None or answer.response.status_code < 500:
                    raise
                lookup = answer
            except Exception as unreachable:  # noqa: BLE001
                lookup = unreachable
            else:
                lookup = None
            if lookup is not None:  # the Hub is down or unreachable: the cache, or one line at once
                try:
                    return Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision,
                                                                local_files_only=True))
                except Exception:  # noqa: BLE001
                    raise hub_error(lookup, what, hint).located(where) from None
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, etag_timeout=10))
    except SurgeryError:
        raise
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, what, hint).located(where) from None


def hub_error(e: Exception, what: str, hint: str) -> SurgeryError:
    """One complete line for a failed hub call: what failed, why (named, never cut), and what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    chain = []
    err: BaseException | None = e
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    if constants.HF_HUB_OFFLINE or any(isinstance(x, OfflineModeIsEnabled) for x in chain):
        why = "not in the local cache, and HF_HUB_OFFLINE is set"
    elif isinstance(e, GatedRepoError):
        why = "the repository is gated: accept its terms on the Hub and log in (hf auth login)"
    elif isinstance(e, RepositoryNotFoundError):
        why = "no such repository on the Hub (or it is private: log in with hf auth login)"
    elif isinstance(e, RevisionNotFoundError):
        why = "no such revision in the repository"
    elif isinstance(e, RemoteEntryNotFoundError):
        why = "no such file in the repository"
    elif isinstance(e, HfHubHTTPError) and e.response is not None:
        why = f"the Hub answered HTTP {e.response.status_code}"
    else:
        root = chain[-1]
        detail = " ".join(str(root).split()) or type(root).__name__
        why = f"cannot reach {constants.ENDPOINT} ({detail}) and it is not in the local cache"
    return SurgeryError(f"{what}: {why}; {hint}")


def open_checkpoint(path: Path):
    """A checkpoint directory in either layout: Mistral native (params.json) or transformers."""
    from .checkpoint import Checkpoint
    from .native import NativeCheckpoint
    from .native_params import is_native

    return NativeCheckpoint(path) if is_native(path) else Checkpoint(path)
