"""Loading a recipe: YAML with positions, `--set` overrides, and errors that point at file:line:column."""
from __future__ import annotations

import difflib
import os
import re
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
    positions: dict[tuple, str] = field(default_factory=dict)  # path in the recipe -> "file:line:col"
    overridden: dict[tuple, str] = field(default_factory=dict)  # path -> "--set ..." that set it

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
            return overridden[key]
        if key in positions:
            return positions[key]
    return file


def _positions(node: yaml.Node, path: tuple, file: str, out: dict) -> None:
    out[path] = f"{file}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for k, v in node.value:
            here = f"{file}:{k.start_mark.line + 1}:{k.start_mark.column + 1}"
            if isinstance(k, yaml.ScalarNode) and k.value in seen:
                raise SurgeryError(f"duplicate key {k.value!r} (first at line {seen[k.value]}); YAML would keep only the last",
                                   where=here)
            seen[k.value] = k.start_mark.line + 1
            _positions(v, path + (k.value,), file, out)
            out[path + (k.value, "__key__")] = f"{file}:{k.start_mark.line + 1}:{k.start_mark.column + 1}"
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _positions(v, path + (i,), file, out)


class RecipeYamlLoader(yaml.SafeLoader):
    """`yaml.safe_load`, except that an unquoted `+N` stays the relative size "+N".

    YAML reads the plain scalar `+200` as the integer 200, which would silently turn "grow by 200"
    into "grow to 200". The scalar's source text still has its sign, so keep it.
    """


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode):
    value = loader.construct_yaml_int(node)
    if node.style is None and node.value.lstrip().startswith("+"):
        return f"+{value}"
    return value


RecipeYamlLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def load_yaml(text: str) -> Any:
    """One YAML document through RecipeYamlLoader (a SafeLoader: Python tags are errors)."""
    loader = RecipeYamlLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_yaml(text: str, file: str) -> tuple[Any, dict]:
    try:
        data = load_yaml(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        raise SurgeryError(f"malformed YAML: {e.problem or e.context}", where=where) from None
    except yaml.YAMLError as e:
        raise SurgeryError(f"malformed YAML: {e}", where=file) from None
    positions: dict = {}
    if node is not None:
        _positions(node, (), file, positions)
    return data, positions


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


def read_document(ref: str | Path, libraries: list[str] | None = None, seen: tuple = (),
                  bases: dict | None = None) -> tuple[dict, dict, str]:
    """A recipe file with its `extends` chain merged in: (data, positions, file).

    `bases`, when given, receives each file's directory for relative paths (see `path_base`).
    """
    from .library import find_recipe

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


def path_base(recipe_file: Path) -> Path:
    """The directory relative paths in this recipe file are taken from.

    A recipe's own directory; but the current directory for the built-in library and hub recipes,
    whose files live inside the installed package or the download cache, not among the user's files.
    """
    from huggingface_hub.constants import HF_HUB_CACHE

    from .library import BUILTIN

    real = Path(recipe_file).resolve()
    if real.is_relative_to(BUILTIN.resolve()) or real.is_relative_to(Path(HF_HUB_CACHE).resolve()):
        return Path.cwd()
    return Path(os.path.abspath(recipe_file)).parent


# Where a recipe names files: (location in the recipe, kind). A mapping form keeps the path under `path`.
PATH_FIELDS = ((("source",), "source"), (("test_source",), "source"), (("output",), "output"), (("verify", "data"), "data"))
_SCHEME = re.compile(r"^[A-Za-z][\w+.-]+:")  # builtin:NAME, hf://..., a keyword with a colon (not C:\)
DATA_KEYWORDS = ("random",)


def _is_local_source(value: str, base: Path) -> bool:
    """A source names a local directory when written as a path or when one exists there; else a hub id."""
    if _SCHEME.match(value):
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
        if kind == "data" and (_SCHEME.match(value) or value in DATA_KEYWORDS):
            continue
        holder[key] = os.path.normpath(base / Path(value).expanduser())


def _defining_base(loc: tuple, positions: dict, bases: dict, file: str) -> Path:
    for n in range(len(loc), 0, -1):
        where = positions.get(loc[:n])
        if where:
            return bases.get(where.rsplit(":", 2)[0], bases.get(file, Path.cwd()))
    return bases.get(file, Path.cwd())


def check_paths(loaded: "LoadedRecipe", data: bool = True) -> None:
    """What `validate` can check without reading a model: a local source and the verification data exist."""
    src = loaded.recipe.source_spec.path
    if os.path.isabs(src) and not Path(src).exists():  # made absolute by resolve_paths: a local directory
        raise SurgeryError(f"source directory not found: {src} (paths in a recipe are relative to the recipe file)",
                           where=loaded.where(("source",)))
    value = loaded.recipe.verify.data
    if not data or _SCHEME.match(value) or value in DATA_KEYWORDS or Path(value).exists():
        return
    raise SurgeryError(f"verification data not found: {value} (paths in a recipe are relative to the recipe file); use "
                       f"builtin:python-license, a text file, a directory of .txt files, or a dataset saved with datasets' "
                       f"save_to_disk", where=loaded.where(("verify", "data")))


def find_extended(ref: str, recipe_dir: Path, libraries: list[str] | None) -> Path:
    """`extends: REF`: a file next to the extending recipe (`base` finds `base.yaml`), then the library."""
    from .library import find_recipe

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


def load_recipe(
    path: str | Path,
    sets: list[str] | None = None,
    source: str | None = None,
    output: str | None = None,
    libraries: list[str] | None = None,
) -> LoadedRecipe:
    """Read, merge `extends`, apply overrides, substitute `vars`, make paths absolute, validate."""
    bases: dict = {}
    data, positions, file = read_document(path, libraries, bases=bases)
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
    variables = data.pop("vars", None) or {}
    if not isinstance(variables, dict):
        raise SurgeryError("vars is a mapping of names to values", where=positions.get(("vars",), file))
    data = substitute(data, variables, positions, overridden, file)
    resolve_paths(data, positions, overridden, bases, file)
    return validate_recipe(data, file, positions, overridden)


def validate_recipe(data: dict, file: str, positions: dict | None = None, overridden: dict | None = None) -> LoadedRecipe:
    """A recipe mapping (from YAML or built in code) validated, errors pointing at `file`."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise validation_error(e, data, file, positions or {}, overridden or {}) from None
    return LoadedRecipe(recipe, file, data, positions or {}, overridden or {})


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
        allowed = [f.alias or k for k, f in cls.model_fields.items() if k != "op"] if cls else []
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
    msg = err["msg"].removeprefix("Value error, ")
    if err.get("ctx", {}).get("expected"):
        msg += f" (allowed: {err['ctx']['expected']})"
    got = err.get("input")
    if not isinstance(got, (dict, list)):
        msg += f", got {got!r}"
    return SurgeryError(msg, loc=real, where=locate(file, positions, overridden, real))
