"""A recipe file with its `extends` chain merged in: what the file says, before overrides."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import SurgeryError
from .library import find_recipe
from .paths import path_base
from .positions import parse_yaml


def read_document(ref: str | Path, libraries: list[str] | None = None, seen: tuple = (),
                  bases: dict | None = None) -> tuple[dict, dict, str]:
    """A recipe file with its `extends` chain merged in: (data, positions, file).

    `bases`, when given, receives each file's directory for relative paths (see `path_base`).
    """
    path = find_recipe(str(ref), libraries)
    file = str(path)
    if bases is not None:
        bases[file] = path_base(path)
    if file in seen:
        raise SurgeryError(f"extends forms a cycle: {' -> '.join(seen + (file,))}", where=file)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise SurgeryError("not a text file (a recipe is UTF-8 YAML)", where=file) from None
    except OSError as e:
        raise SurgeryError(f"cannot read the recipe: {e.strerror}", where=file) from None
    data, positions = parse_yaml(text, file)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SurgeryError("a recipe is a YAML mapping (name:, source:, ops:, ...)", where=f"{file}:1:1")
    base_ref = data.pop("extends", None)
    if base_ref is None:
        if "ops+" in data:
            raise SurgeryError("ops+ appends to the ops of an extended recipe; this recipe extends none",
                               where=positions.get(("ops+", "__key__"), file))
        return data, positions, file
    if not isinstance(base_ref, str):
        raise SurgeryError("extends takes a recipe name or path", where=positions.get(("extends",), file))
    here = positions.get(("extends",), file)
    try:
        base_path = find_extended(base_ref, path.parent, libraries)
    except SurgeryError as e:
        raise SurgeryError(f"extends {base_ref!r}: {e.message}", where=here) from None
    if str(base_path) in seen + (file,):
        raise SurgeryError(f"extends forms a cycle: {' -> '.join(seen + (file, str(base_path)))}", where=here)
    try:
        base, base_pos, _ = read_document(base_path, libraries, seen + (file,), bases)
    except SurgeryError as e:
        raise e.located(positions.get(("extends",), file)) from None
    merged, merged_pos = merge(base, base_pos, data, positions)
    return merged, merged_pos, file


def find_extended(ref: str, recipe_dir: Path, libraries: list[str] | None) -> Path:
    """`extends: REF`: a file next to the extending recipe (`base` finds `base.yaml`), then the library."""
    if ref.startswith("hf://"):
        return find_recipe(ref, libraries)
    local = recipe_dir / Path(ref).expanduser()
    for cand in (local, local.with_name(local.name + ".yaml"), local.with_name(local.name + ".yml")):
        if cand.is_file():
            return cand
    if "/" in ref or os.sep in ref:
        raise SurgeryError(f"no such recipe file next to the extending recipe ({recipe_dir})")
    return find_recipe(ref, libraries)


def merge(base: dict, base_pos: dict, child: dict, child_pos: dict, path: tuple = ()) -> tuple[dict, dict]:
    """Mappings merge key by key, lists and values replace; `ops+:` appends to the base's ops."""
    out = dict(base)
    pos = {k: v for k, v in base_pos.items()}
    for key, value in child.items():
        kpath = path + (key,)
        if key == "ops+" and not path:
            start = len(base.get("ops") or [])
            out["ops"] = list(base.get("ops") or []) + list(value or [])
            for k, v in child_pos.items():
                if k[:1] == ("ops+",) and len(k) > 1 and isinstance(k[1], int):
                    pos[("ops", start + k[1]) + k[2:]] = v
            continue
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            sub, _ = merge(base[key], {}, value, {}, kpath)
            out[key] = sub
        else:
            out[key] = value
            pos = {k: v for k, v in pos.items() if k[: len(kpath)] != kpath}
        pos.update({k: v for k, v in child_pos.items() if k[: len(kpath)] == kpath})
    return out, pos
