"""The library's recipes listed: each one loaded, with its ops and the tiny model `surgery check` runs it on."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import SurgeryError
from .library import library_dirs
from .loader import load_recipe


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
    declared: str = ""  # the recipe's `name:`, which finds it too


def entries(libraries: list[str] | None = None, broken: list[tuple[Path, SurgeryError]] | None = None) -> list[LibraryEntry]:
    """Every loadable recipe of the libraries; those that do not load go to `broken` when given."""
    out: list[LibraryEntry] = []
    seen: set[str] = set()
    for d in library_dirs(libraries):
        for path in sorted(d.glob("*.y*ml")):
            if path.stem in seen or not path.is_file():
                continue  # an earlier library shadows a later one
            seen.add(path.stem)
            try:
                r = load_recipe(path, libraries=libraries).recipe
            except SurgeryError as e:
                if broken is not None:
                    broken.append((path, e))
                continue
            desc = (r.description or "").strip().splitlines()[0] if r.description else ""
            out.append(LibraryEntry(path.stem, path, d, desc, [o.op for o in r.ops], r.test_source, r.source_spec.path,
                                   r.test_overrides, r.name))
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
