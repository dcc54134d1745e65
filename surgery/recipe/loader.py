"""Loading a recipe: YAML with positions, `--set` overrides, and errors that point at file:line:column."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import SurgeryError
from .schema import Recipe


@dataclass
class LoadedRecipe:
    recipe: Recipe
    file: str
    data: dict
    positions: dict[tuple, tuple[int, int]] = field(default_factory=dict)
    overridden: dict[tuple, str] = field(default_factory=dict)

    def where(self, loc: tuple | None) -> str:
        return locate(self.file, self.positions, self.overridden, loc or ())

    def error(self, err: SurgeryError) -> SurgeryError:
        """Attach the recipe position to an error raised while compiling against a model."""
        if err.where is None and err.loc:
            err.where = self.where(err.loc)
        return err


def locate(file: str, positions: dict, overridden: dict, loc: tuple) -> str:
    for n in range(len(loc), -1, -1):
        key = tuple(loc[:n])
        if key in overridden:
            return f"{overridden[key]}"
        if key in positions:
            line, col = positions[key]
            return f"{file}:{line}:{col}"
    return file


def _positions(node: yaml.Node, path: tuple, out: dict) -> None:
    out[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            _positions(v, path + (key,), out)
            out[path + (key, "__key__")] = (k.start_mark.line + 1, k.start_mark.column + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _positions(v, path + (i,), out)


def parse_yaml(text: str, file: str) -> tuple[Any, dict]:
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        raise SurgeryError(f"malformed YAML: {e.problem or e.context}", where=where) from None
    except yaml.YAMLError as e:
        raise SurgeryError(f"malformed YAML: {e}", where=file) from None
    positions: dict = {}
    if node is not None:
        _positions(node, (), positions)
    return data, positions


def apply_set(data: dict, assignment: str, overridden: dict) -> None:
    """`--set ops.0.num_heads=48`: a dotted path into the recipe, the value parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    where = f"--set {assignment}"
    if not sep or not key.strip():
        raise SurgeryError("expected KEY=VALUE with a dotted KEY such as ops.0.num_heads", where=where)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
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
        else:
            raise SurgeryError(f"{'.'.join(parts[:i])} is a value, not a mapping or list", where=where)
        path.append(idx)
        if last:
            cur[idx] = value
        else:
            cur = cur[idx]
    overridden[tuple(path)] = where


def load_recipe(
    path: str | Path,
    sets: list[str] | None = None,
    source: str | None = None,
    output: str | None = None,
    text: str | None = None,
) -> LoadedRecipe:
    file = str(path)
    if text is None:
        p = Path(path)
        if not p.is_file():
            raise SurgeryError("recipe file not found", where=file)
        text = p.read_text()
    data, positions = parse_yaml(text, file)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SurgeryError("a recipe is a YAML mapping (name:, source:, ops:, ...)", where=f"{file}:1:1")
    overridden: dict = {}
    for s in sets or []:
        apply_set(data, s, overridden)
    if source is not None:
        data["source"] = source
        overridden[("source",)] = "--source"
    if output is not None:
        if isinstance(data.get("output"), dict):
            data["output"]["path"] = output
        else:
            data["output"] = output
        overridden[("output",)] = "--output"
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise validation_error(e, data, file, positions, overridden) from None
    return LoadedRecipe(recipe, file, data, positions, overridden)


def _real_loc(data: Any, loc: tuple) -> tuple[tuple, tuple]:
    """Drop pydantic's union/tag markers from `loc`: keep only steps that exist in the data."""
    real: list = []
    cur = data
    rest = list(loc)
    while rest:
        step = rest.pop(0)
        if isinstance(cur, dict) and step in cur:
            real.append(step)
            cur = cur[step]
        elif isinstance(cur, list) and isinstance(step, int) and step < len(cur):
            real.append(step)
            cur = cur[step]
        elif isinstance(cur, dict) and not rest:
            return tuple(real), (step,)
    return tuple(real), ()


def _model_for(loc: tuple, data: dict):
    """The pydantic model class that validates the mapping at `loc` (for allowed keys)."""
    from ..ops import OPS
    from . import schema

    if len(loc) >= 2 and loc[0] == "ops":
        op = data["ops"][loc[1]] if isinstance(data.get("ops"), list) else None
        name = op.get("op") if isinstance(op, dict) else None
        for cls in OPS:
            if cls.model_fields["op"].annotation.__args__[0] == name:
                return cls
        return None
    return {(): schema.Recipe, ("verify",): schema.VerifySpec, ("output",): schema.OutputSpec, ("source",): schema.SourceSpec}.get(loc)


def validation_error(e: ValidationError, data: dict, file: str, positions: dict, overridden: dict) -> SurgeryError:
    from ..ops import op_names

    errs = e.errors()
    # Prefer the most specific error (longest location), which is what the user must fix.
    err = max(errs, key=lambda x: (x["type"] != "missing", len(x["loc"])))
    real, missing_key = _real_loc(data, tuple(err["loc"]))
    typ = err["type"]
    field_name = ".".join(str(p) for p in real + missing_key) or "recipe"
    if typ == "extra_forbidden":
        key = real[-1]
        parent = real[:-1]
        cls = _model_for(parent, data)
        allowed = [k for k in cls.model_fields if k != "op"] if cls else []
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        where = locate(file, positions, overridden, parent + (key, "__key__"))
        return SurgeryError(f"unknown key {key!r}{hint}; allowed: {', '.join(allowed)}", loc=real, where=where)
    if typ == "union_tag_invalid" or typ == "union_tag_not_found":
        tag = err.get("ctx", {}).get("tag")
        names = op_names()
        if tag is None:
            return SurgeryError(f"each op needs an 'op:' key; allowed: {', '.join(names)}", loc=real,
                                where=locate(file, positions, overridden, real))
        close = difflib.get_close_matches(str(tag), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return SurgeryError(f"unknown op {tag!r}{hint}; allowed: {', '.join(names)}", loc=real + ("op",),
                            where=locate(file, positions, overridden, real + ("op",)))
    if typ == "missing":
        return SurgeryError(f"missing required key {missing_key[0] if missing_key else field_name!r}", loc=real + missing_key,
                            where=locate(file, positions, overridden, real))
    msg = err["msg"]
    if err.get("ctx", {}).get("expected"):
        msg += f" (allowed: {err['ctx']['expected']})"
    got = err.get("input")
    if not isinstance(got, (dict, list)):
        msg += f", got {got!r}"
    return SurgeryError(msg, loc=real, where=locate(file, positions, overridden, real))
