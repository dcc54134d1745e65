"""`surgery check`: every recipe of a library, run on a tiny model of its family, keeps its promise."""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import SurgeryError
from ..text_table import fit_lines, text_table
from .listing import entries, guess_test_source


@dataclass
class CheckResult:
    name: str
    source: str
    promise: str
    rel_change: float | None
    dead: int
    passed: bool
    seconds: float
    problem: str = ""


def stored_as(source: str, dtype: str, where: Path) -> str:
    """A copy of `source` with every floating tensor stored in `dtype`, in its own format (Mistral native stays native)."""
    from .. import api
    from ..io.resolve import resolve_source
    from .loader import validate_recipe

    native = (resolve_source(source) / "params.json").is_file()
    out = where / f"{source.replace(':', '_').replace('/', '_')}-{dtype}"
    if not out.exists():
        loaded = validate_recipe({"name": f"as-{dtype}", "source": source, "ops": [],
                                  "output": {"path": str(out), "dtype": dtype, "format": "mistral" if native else "hf"}},
                                 f"{source} as {dtype}")
        api.run(loaded, verify=False)
    return str(out)


def check_library(libraries: list[str] | None = None, names: list[str] | None = None,
                  own_only: bool = False, source_dtype: str | None = None) -> list[CheckResult]:
    """Run the recipes of `libraries` (with the built-in ones unless `own_only`), or only `names`; with
    `source_dtype`, each on a copy of its test source stored in that dtype.

    A recipe that does not load is a failed check, not a skipped one; an unknown name is bad input.
    """
    from .. import api

    broken: list = []
    found = entries(libraries, broken)
    if own_only:
        mine = {Path(d).expanduser().resolve() for d in libraries or []}
        found = [e for e in found if e.library.resolve() in mine]
        broken = [(path, err) for path, err in broken if path.parent.resolve() in mine]
    known = sorted([e.name for e in found] + [path.stem for path, _ in broken])
    unknown = [n for n in names or [] if n not in known and n not in {e.declared for e in found}]
    if unknown:
        raise SurgeryError(f"no recipe named {', '.join(map(repr, unknown))} in the checked libraries; known: "
                           f"{', '.join(known) or '(none)'}", where="--only")
    if not known:
        where = ", ".join(libraries or []) or "the built-in library"
        raise SurgeryError("no recipe files (*.yaml) to check", where=where)
    results = [CheckResult(path.stem, "-", "-", None, 0, False, 0.0, f"does not load: {err}")
               for path, err in broken if not names or path.stem in names]
    copies = tempfile.TemporaryDirectory(prefix="surgery-check-sources-")
    try:
        for e in found:
            if names and e.name not in names and e.declared not in names:
                continue
            t0 = time.perf_counter()
            src = e.test_source or guess_test_source(e.source)
            if src is None:
                results.append(CheckResult(e.name, "-", "-", None, 0, False, 0.0, "no test_source and no builtin of its family"))
                continue
            shown = src if source_dtype is None else f"{src} as {source_dtype}"
            with tempfile.TemporaryDirectory(prefix="surgery-check-") as tmp:
                try:
                    run_on = src if source_dtype is None else stored_as(src, source_dtype, Path(copies.name))
                    r = api.run(e.path, source=run_on, output=str(Path(tmp) / "out"), libraries=libraries,
                                sets=e.test_overrides)
                except SurgeryError as err:
                    results.append(CheckResult(e.name, shown, "-", None, 0, False, time.perf_counter() - t0, str(err)))
                    continue
            rep = r.report
            results.append(CheckResult(e.name, shown, r.plan.promise.exactness.value, rep.rel_change, len(rep.dead_slices),
                                       rep.passed, time.perf_counter() - t0, "" if rep.passed else rep.rule))
    finally:
        copies.cleanup()
    return results


def format_results(results: list[CheckResult], width: int | None = None) -> str:
    rows = [("recipe", "test source", "promise", "rel change", "dead", "ok", "s")]
    for r in results:
        rows.append((r.name, r.source, r.promise, "-" if r.rel_change is None else f"{r.rel_change:+.2e}", str(r.dead),
                     "yes" if r.passed else "NO", f"{r.seconds:.1f}"))
    lines = text_table(rows, width=width)
    lines += fit_lines([f"{r.name}: {r.problem}" for r in results if r.problem], width)
    ok = sum(r.passed for r in results)
    lines.append(f"{ok} passed, {len(results) - ok} failed")
    return "\n".join(lines)
