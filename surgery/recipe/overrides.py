"""What changes a recipe before it is validated: `--set KEY=VALUE` assignments and `${name}` variables."""
from __future__ import annotations

import re
from typing import Any

import yaml

from ..errors import SurgeryError
from .positions import load_yaml, locate


def apply_set(data: dict, assignment: str, overridden: dict) -> None:
    """`--set ops.0.num_heads=48`: a dotted path into the recipe, the value parsed as YAML (`+8` stays relative)."""
    key, sep, raw = assignment.partition("=")
    where = f"--set {assignment}"
    if not sep or not key.strip():
        raise SurgeryError("expected KEY=VALUE with a dotted KEY such as ops.0.num_heads", where=where)
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    path: list = []
    cur: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):
            if not part.isdigit() or int(part) >= len(cur):
                raise SurgeryError(f"{'.'.join(parts[:i]) or 'recipe'} has {len(cur)} entries; {part!r} is not an index of it", where=where)
            idx: Any = int(part)
        elif isinstance(cur, dict):
            idx = part
            if not last and idx not in cur:
                cur[idx] = {}
                overridden[tuple(path) + (idx,)] = where
            if not last and idx in ("source", "output") and isinstance(cur[idx], str):
                cur[idx] = {"path": cur[idx]}  # the short form of a mapping with a path
        else:
            raise SurgeryError(f"{'.'.join(parts[:i])} is a value, not a mapping or list", where=where)
        path.append(idx)
        if last:
            cur[idx] = value
        else:
            cur = cur[idx]
    overridden[tuple(path)] = where


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def substitute(data: Any, variables: dict, positions: dict, overridden: dict, file: str, path: tuple = ()) -> Any:
    """`${name}` from `vars:`; a string that is exactly one reference takes the variable's type."""
    if isinstance(data, dict):
        return {k: substitute(v, variables, positions, overridden, file, path + (k,)) for k, v in data.items()}
    if isinstance(data, list):
        return [substitute(v, variables, positions, overridden, file, path + (i,)) for i, v in enumerate(data)]
    if isinstance(data, str) and "${" in data:
        for name in _VAR.findall(data):
            if name not in variables:
                known = ", ".join(sorted(variables)) or "none defined"
                raise SurgeryError(f"unknown variable ${{{name}}}; vars: {known}", loc=path,
                                   where=locate(file, positions, overridden, path))
        whole = _VAR.fullmatch(data)
        if whole:
            return variables[whole.group(1)]
        return _VAR.sub(lambda m: str(variables[m.group(1)]), data)
    return data
