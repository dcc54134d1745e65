"""The files a recipe names, made absolute where they are local: a recipe's paths are relative to its file."""
from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import constants as hub_constants

from .library import BUILTIN


def path_base(recipe_file: Path) -> Path:
    """The directory relative paths in this recipe file are taken from.

    A recipe's own directory; but the current directory for the built-in library and hub recipes,
    whose files live inside the installed package or the download cache, not among the user's files.
    """
    real = Path(recipe_file).resolve()
    if real.is_relative_to(BUILTIN.resolve()) or real.is_relative_to(Path(hub_constants.HF_HUB_CACHE).resolve()):
        return Path.cwd()
    return Path(os.path.abspath(recipe_file)).parent


# Where a recipe names files: (location in the recipe, kind). A mapping form keeps the path under `path`.
PATH_FIELDS = ((("source",), "source"), (("test_source",), "source"), (("output",), "output"), (("verify", "data"), "data"))
SCHEME = re.compile(r"^[A-Za-z][\w+.-]+:")  # builtin:NAME, hf://..., a keyword with a colon (not C:\)
DATA_KEYWORDS = ("random",)


def _is_local_source(value: str, base: Path) -> bool:
    """A source names a local directory when written as a path or when one exists there; else a hub id."""
    if SCHEME.match(value):
        return False
    if value.startswith((".", "/", "~")) or os.path.isabs(value):
        return True
    return (base / value).exists()


def resolve_paths(data: dict, positions: dict, overridden: dict, bases: dict, file: str) -> None:
    """Make every local path in the recipe absolute, in place.

    Paths written in a recipe file are relative to that file's directory (`path_base`); paths from
    the command line (`--output`, `--source`, `--set`) to the current directory. Absolute paths make
    the resolved recipe written beside an output rerun to the same place from anywhere.
    """
    for loc, kind in PATH_FIELDS:
        parent = data
        for k in loc[:-1]:
            parent = parent.get(k) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        holder, key = parent, loc[-1]
        if isinstance(holder.get(key), dict) and kind != "data":
            holder, key, loc = holder[key], "path", loc + ("path",)
        value = holder.get(key)
        if not isinstance(value, str) or not value.strip():
            continue
        from_cli = any(loc[:n] in overridden for n in range(1, len(loc) + 1))
        base = Path.cwd() if from_cli else _defining_base(loc, positions, bases, file)
        if kind == "source" and not _is_local_source(value, base):
            continue
        if kind == "data" and (SCHEME.match(value) or value in DATA_KEYWORDS):
            continue
        holder[key] = os.path.normpath(base / Path(value).expanduser())


def _defining_base(loc: tuple, positions: dict, bases: dict, file: str) -> Path:
    for n in range(len(loc), 0, -1):
        where = positions.get(loc[:n])
        if where:
            return bases.get(where.rsplit(":", 2)[0], bases.get(file, Path.cwd()))
    return bases.get(file, Path.cwd())
