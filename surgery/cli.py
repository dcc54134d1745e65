"""The command line: parse arguments, call `surgery.api`, turn errors into exit codes.

Exit 0: done. Exit 1: the surgery ran but verification failed. Exit 2: bad input (one line).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from .errors import SurgeryError, VerificationFailed


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe file")
    p.add_argument("--source", help="override the recipe's source (directory, hub id or builtin:NAME)")
    p.add_argument("--output", help="override the recipe's output directory")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value by dotted path, e.g. ops.0.num_heads=48 (repeatable)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="surgery", description="Declarative, verified model surgery.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="execute a recipe and verify the result")
    _overrides(p)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (overrides the recipe)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-verify", action="store_true", help="skip the loss and logit checks")

    p = sub.add_parser("plan", help="print what a recipe will do, without reading any weight")
    _overrides(p)
    p = sub.add_parser("validate", help="check a recipe against the schema")
    _overrides(p)
    return ap


def _run(args) -> int:
    from . import api
    from .plan import format_plan

    kw = dict(sets=args.sets, source=args.source, output=args.output)
    if args.command == "validate":
        loaded = api.validate(args.recipe, **kw)
        print(f"{loaded.file}: ok ({len(loaded.recipe.ops)} ops)")
        return 0
    if args.command == "plan":
        print(format_plan(api.plan(args.recipe, **kw)))
        return 0
    result = api.run(args.recipe, device=args.device, force=args.force, verify=not args.no_verify,
                     progress=sys.stderr.isatty(), **kw)
    if result.report is not None:
        print(result.report.table())
    print(f"wrote {result.output}")
    if result.report is not None and not result.report.passed:
        raise VerificationFailed(f"verification failed: {result.report.rule}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    debug = args.debug or os.environ.get("SURGERY_DEBUG") == "1"
    try:
        return _run(args)
    except SurgeryError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except VerificationFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; the output was not written", file=sys.stderr)
        return 130
