"""Recipe libraries: the built-in `recipes/`, `SURGERY_RECIPES_PATH`, `--library DIR`, and the Hub.

A recipe is found by path, by file name (`stablelm_grow`), by its `name:` field, or as
`hf://ORG/REPO/path.yaml` fetched through huggingface_hub.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from ..errors import SurgeryError

BUILTIN = Path(__file__).resolve().parent.parent / "recipes"


def library_dirs(extra: list[str] | None = None) -> list[Path]:
    env = [p for p in os.environ.get("SURGERY_RECIPES_PATH", "").split(os.pathsep) if p]
    dirs = [Path(d).expanduser() for d in (list(extra or []) + env)] + [BUILTIN]
    for d in dirs[:-1]:
        if not d.is_dir():
            what = "is not a directory" if d.exists() else "does not exist"
            raise SurgeryError(f"recipe library directory {what}", where=str(d))
    return dirs


def find_recipe(ref: str, libraries: list[str] | None = None) -> Path:
    if ref.startswith("hf://"):
        return fetch_hub_recipe(ref)
    p = Path(ref).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise SurgeryError("is a directory; give a recipe file (.yaml) or a library name", where=ref)
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
    except (yaml.YAMLError, OSError, RecursionError):
        return None
    return data.get("name") if isinstance(data, dict) else None


def fetch_hub_recipe(ref: str) -> Path:
    """hf://ORG/REPO/path/to/recipe.yaml[@revision]"""
    from ..io.resolve import fetch_hub_file

    body = ref[len("hf://"):]
    body, _, revision = body.partition("@")
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        raise SurgeryError("hub recipes are hf://ORG/REPO/path/to/recipe.yaml[@revision]", where=ref)
    return fetch_hub_file("/".join(parts[:2]), "/".join(parts[2:]), revision or None, where=ref,
                          what="the recipe")


SCHEMA_LINE = "# yaml-language-server: $schema="
INSTALLED_SCHEMA = Path(__file__).resolve().parent / "recipe.schema.json"  # packaged copy of schema/recipe.schema.json


def copy_recipe(path: Path, dest: Path) -> Path:
    """Copy a library recipe to edit it; its `$schema` line then points at the installed schema.

    Shipped recipes point at the schema relative to the repository (`../../schema/...`), which is
    wrong anywhere else; the copy gets the schema file's absolute file:// URI instead.
    """
    dest = dest.expanduser()
    if dest.is_dir():
        dest = dest / path.name
    if dest.exists() or dest.is_symlink():
        raise SurgeryError("destination exists; not overwriting", where=str(dest))
    if not dest.parent.is_dir():
        what = "is not a directory" if dest.parent.exists() else "does not exist"
        raise SurgeryError(f"cannot copy there: {dest.parent} {what}", where=str(dest))
    lines = path.read_text().splitlines(keepends=True)
    if lines and lines[0].startswith(SCHEMA_LINE):
        schema = INSTALLED_SCHEMA.resolve()
        lines[0] = (f"{SCHEMA_LINE}{schema.as_uri()}\n" if schema.is_file()
                    else "# `surgery schema > recipe.schema.json` writes the recipe schema for editors\n")
    try:
        with open(dest, "x") as f:
            f.write("".join(lines))
    except OSError as e:
        raise SurgeryError(f"cannot write the copy: {e.strerror}", where=str(dest)) from None
    return dest
