"""`surgery verify OUT` without --against: OUT against the source its surgery_recipe.yaml records.

The run recorded the source (path or hub id, revision) and its content hash; the source found there
now must hash the same, or the comparison would judge OUT against some other model. The recipe's
verify settings (data, max_tokens) are the defaults, and its promise says how to judge: the same
function (exact promises) or within its tolerance (approximate).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import SurgeryError

RECIPE = "surgery_recipe.yaml"
_HASH = re.compile(r"^# source content blake3 \([^)]*\): ([0-9a-f]{64})$", re.M)


@dataclass
class Recorded:
    source: str
    revision: str | None
    content_hash: str | None
    verify: dict


def read_recorded(output: Path) -> Recorded:
    """The source, revision, content hash and verify settings an output of surgery records."""
    path = Path(output) / RECIPE
    if not path.is_file():
        why = "no such directory" if not Path(output).is_dir() else f"no {RECIPE}, so no recorded source"
        raise SurgeryError(f"{why}; pass --against SOURCE", where=str(output))
    text = path.read_text()
    try:
        doc = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as e:  # safe_load shares what aliases name: only nesting can exhaust it
        raise SurgeryError(f"not valid YAML ({' '.join(str(e).split())[:120] or 'nested too deeply'}); pass --against SOURCE",
                           where=str(path)) from None
    src = doc.get("source") if isinstance(doc, dict) else None
    if isinstance(src, str):
        src = {"path": src}
    if not isinstance(src, dict) or not isinstance(src.get("path"), str):
        raise SurgeryError("records no source; pass --against SOURCE", where=str(path))
    m = _HASH.search(text)
    verify = doc.get("verify") if isinstance(doc.get("verify"), dict) else {}
    return Recorded(src["path"], src.get("revision"), m.group(1) if m else None, verify)


def recorded_reference(output: Path) -> tuple[Path, Recorded]:
    """The recorded source's directory, refused in one line when it is missing or its content changed."""
    from .card import source_content_hash
    from .io.resolve import resolve_source

    rec = read_recorded(output)
    name = rec.source + (f"@{rec.revision}" if rec.revision else "")
    where = str(Path(output) / RECIPE)
    try:
        source_dir = resolve_source(rec.source, rec.revision)
        if not source_dir.is_dir():
            raise SurgeryError("not a directory")
        found = source_content_hash(source_dir)
    except SurgeryError as e:
        raise SurgeryError(f"the recorded source {name} cannot be read ({e.message}); pass --against SOURCE",
                           where=where) from None
    if rec.content_hash is None:
        raise SurgeryError(f"records no content hash of its source {name}, so it cannot be told the same; "
                           "pass --against SOURCE", where=where)
    if found != rec.content_hash:
        raise SurgeryError(f"the recorded source {name} has changed since the output was made (content hash "
                           f"{found[:12]}..., recorded {rec.content_hash[:12]}...); pass --against SOURCE to compare "
                           "with it anyway", where=where)
    return source_dir, rec


def verify_as_run(output: Path, device: str = "auto"):
    """OUT judged exactly as the run that wrote it judged it: its recorded recipe's plan against the recorded
    source, and that plan's verification schedule (`verify.run.verify_plan`), on the recipe's data and tokens:
    the same passes, rules and bounds `surgery plan` lists, so a later check is never looser than the run's."""
    from .execute import pick_device
    from .plan import compile_plan
    from .recipe.loader import load_recipe
    from .runtime.progress import Progress
    from .verify.data import calibration_ids
    from .verify.run import verify_plan

    source_dir, rec = recorded_reference(Path(output))
    loaded = load_recipe(Path(output) / RECIPE)
    print(f"reference: {rec.source}, the source {output} records (content hash matches); judged as the run judged it: "
          "its recipe's verification", file=sys.stderr, flush=True)
    p = compile_plan(loaded, source_dir)
    v, show, dev = loaded.recipe.verify, Progress(True), pick_device(device)
    ids = calibration_ids(source_dir, v.data, v.max_tokens, p.initial.spec.vocab_size, loaded.recipe.seed)
    if any(s.promise.pruning is not None for s in p.steps):  # the run's choice of units, made again on the same data
        p = compile_plan(loaded, source_dir, p.checkpoint, ids, measure=True, device=dev, progress=show)
    return verify_plan(p, Path(output), dev, ids, show)


def fill_defaults(args) -> None:
    """`surgery verify`'s reference, data, max_tokens and tolerance where not given: --against keeps the
    command's own defaults; without it, the recorded source and the recipe's verify settings."""
    if args.against:
        args.data = args.data or "builtin:python-license"
        args.max_tokens = args.max_tokens or 2048
        return
    source_dir, rec = recorded_reference(Path(args.output))
    args.against = str(source_dir)
    args.data = args.data or str(rec.verify.get("data", "builtin:python-license"))
    args.max_tokens = args.max_tokens or int(rec.verify.get("max_tokens", 2048))
    how = "as the same function"
    if args.tolerance is None:
        how = _judged_by(Path(args.output), source_dir, rec, args)
    print(f"reference: {rec.source}, the source {args.output} records (content hash matches); judged {how}",
          file=sys.stderr, flush=True)


def _judged_by(output: Path, source_dir: Path, rec: Recorded, args) -> str:
    """The recipe's promise decides: exact kinds as the same function, approximate within its tolerance;
    a re-initialisation or a prune is not meant to keep the source's function, so it needs --tolerance."""
    from .ops import Exactness
    from .plan import compile_plan
    from .recipe.loader import load_recipe

    loaded = load_recipe(output / RECIPE)
    exactness = compile_plan(loaded, source_dir).promise.exactness
    if exactness == Exactness.APPROXIMATE:
        args.tolerance = float(rec.verify.get("tolerance", loaded.recipe.verify.tolerance))
        return f"as an approximation within the recipe's tolerance {args.tolerance:g}"
    if exactness in (Exactness.REINIT, Exactness.PRUNED):
        raise SurgeryError(f"its recipe's promise is {exactness.value}, not the source's function: a comparison with "
                           "the source has nothing to judge it by; pass --tolerance T to bound its change from the source",
                           where=str(output))
    return f"as the same function ({exactness.value})"
