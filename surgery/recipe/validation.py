"""A recipe's schema errors as one line: the most specific problem, where it is, and what is allowed."""
from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError

from ..errors import SurgeryError
from ..ops import OPS, op_names
from . import schema
from .positions import locate


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
    if len(loc) >= 2 and loc[0] == "ops":
        op = data["ops"][loc[1]] if isinstance(data.get("ops"), list) else None
        name = op.get("op") if isinstance(op, dict) else None
        for cls in OPS:
            if cls.model_fields["op"].annotation.__args__[0] == name:
                return cls
        return None
    return {(): schema.Recipe, ("verify",): schema.VerifySpec, ("output",): schema.OutputSpec, ("source",): schema.SourceSpec}.get(loc)


def validation_error(e: ValidationError, data: dict, file: str, positions: dict, overridden: dict) -> SurgeryError:
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
