"""Recipe libraries: the built-in `recipes/`, `SURGERY_RECIPES_PATH`, `--library DIR`, and the Hub.

A recipe is found by path, by file name (`stablelm_grow`), by its `name:` field, or as
`hf://ORG/REPO/path.yaml` fetched through huggingface_hub.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import SurgeryError

BUILTIN = Path(__file__).resolve().parent.parent / "recipes"


def library_dirs(extra: list[str] | None = None) -> list[Path]:
    env = [p for p in os.environ.get("SURGERY_RECIPES_PATH", "").split(os.pathsep) if p]
    dirs = [Path(d).expanduser() for d in (list(extra or []) + env)] + [BUILTIN]
    for d in dirs[:-1]:
        if not d.is_dir():
            raise SurgeryError("recipe library directory does not exist", where=str(d))
    return dirs


def find_recipe(ref: str, libraries: list[str] | None = None) -> Path:
    if ref.startswith("hf://"):
        return fetch_hub_recipe(ref)
    p = Path(ref).expanduser()
    if p.is_file():
        return p
    if p.suffix in (".yaml", ".yml") and (os.sep in ref or p.parent != Path(".")):
        raise SurgeryError("recipe file not found", where=ref)
    for d in library_dirs(libraries):
        for cand in (d / ref, d / f"{ref}.yaml", d / f"{ref}.yml"):
            if cand.is_file():
                return cand
        for entry in sorted(d.glob("*.y*ml")):
            if _declared_name(entry) == ref:
                return entry
    raise SurgeryError(f"no recipe file or library recipe named {ref!r}; `surgery recipes list` shows the library", where=ref)


def _declared_name(path: Path) -> str | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError):
        return None
    return data.get("name") if isinstance(data, dict) else None


def fetch_hub_recipe(ref: str) -> Path:
    """hf://ORG/REPO/path/to/recipe.yaml[@revision]"""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    body = ref[len("hf://"):]
    body, _, revision = body.partition("@")
    parts = body.split("/")
    if len(parts) < 3:
        raise SurgeryError("hub recipes are hf://ORG/REPO/path/to/recipe.yaml[@revision]", where=ref)
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return Path(huggingface_hub.hf_hub_download(repo, filename, revision=revision or None, etag_timeout=10))
    except (HfHubHTTPError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SurgeryError(f"cannot fetch the recipe from the Hugging Face Hub ({type(e).__name__}: {reason[:160]}); "
                           f"download it and pass its path", where=ref) from None


@dataclass
class LibraryEntry:
    name: str
    path: Path
    library: Path
    description: str
    ops: list[str]
    test_source: str | None
    source: str
    test_overrides: list[str]


def entries(libraries: list[str] | None = None) -> list[LibraryEntry]:
    out: list[LibraryEntry] = []
    seen: set[str] = set()
    for d in library_dirs(libraries):
        for path in sorted(d.glob("*.y*ml")):
            from .loader import load_recipe

            try:
                r = load_recipe(path, libraries=libraries).recipe
            except SurgeryError:
                continue
            if path.stem in seen:
                continue  # an earlier library shadows a later one
            seen.add(path.stem)
            desc = (r.description or "").strip().splitlines()[0] if r.description else ""
            out.append(LibraryEntry(path.stem, path, d, desc, [o.op for o in r.ops], r.test_source, r.source_spec.path,
                                   r.test_overrides))
    return out


def guess_test_source(source: str) -> str | None:
    """The builtin of the same family, for recipes that name no test_source."""
    if source.startswith("builtin:"):
        return source
    s = source.lower()
    for key, builtin in (("stablelm", "builtin:tiny-stablelm"), ("mistral", "builtin:tiny-mistral-hf"),
                         ("llama", "builtin:tiny-llama")):
        if key in s:
            return builtin
    return None
