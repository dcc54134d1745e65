"""The command line: parse arguments, call `surgery.api`, turn errors into exit codes.

Exit 0: done. Exit 1: the surgery ran but verification failed. Exit 2: bad input (one line).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from . import DISTRIBUTION, __version__, interrupt
from .errors import SurgeryError, VerificationFailed
from .runtime.memory import limit_malloc_arenas
from .text_table import fit_lines, terminal_width, text_table


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other bad input (subcommands inherit it)."""

    def error(self, message: str):
        flag, sep, what = message.partition(": ")
        where = flag.split()[-1].split("/")[0] if sep and flag.startswith("argument -") else self.prog
        print(f"error: {where}: {what if where != self.prog else message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _library(p: argparse.ArgumentParser) -> None:
    p.add_argument("--library", action="append", default=[], metavar="DIR",
                   help="extra recipe library directory (also SURGERY_RECIPES_PATH); repeatable")


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe file, library name, or hf://ORG/REPO/path.yaml")
    p.add_argument("--source", help="override the recipe's source (directory, hub id or builtin:NAME)")
    p.add_argument("--output", help="override the recipe's output directory")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value by dotted path, e.g. ops.0.num_heads=48 (repeatable)")
    _library(p)


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="surgery", description="Declarative, verified model surgery.")
    ap.add_argument("--version", action="version", version=f"surgery {__version__} (distribution {DISTRIBUTION})")
    ap.add_argument("--debug", action="store_true", help="show tracebacks (also SURGERY_DEBUG=1)")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="execute a recipe and verify the result")
    _overrides(p)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (overrides the recipe)")
    p.add_argument("--force", action="store_true", help="replace a previous output of surgery (a directory holding only what surgery wrote)")
    p.add_argument("--no-verify", action="store_true", help="skip the loss and logit checks")

    p = sub.add_parser("plan", help="print what a recipe will do, without reading any weight")
    _overrides(p)
    p.add_argument("--measure", action="store_true",
                   help="also make the choices that need weights or data (which units a prune drops), as a run does")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N, for --measure (overrides the recipe)")
    p = sub.add_parser("validate", help="check a recipe against the schema")
    _overrides(p)

    p = sub.add_parser("recipes", help="the recipe library: list, show, cp")
    rsub = p.add_subparsers(dest="recipes_command", required=True)
    q = rsub.add_parser("list", help="name, ops, exactness and description of every library recipe")
    _library(q)
    q = rsub.add_parser("show", help="print a library recipe")
    q.add_argument("name")
    _library(q)
    q = rsub.add_parser("cp", help="copy a library recipe to edit it")
    q.add_argument("name")
    q.add_argument("dest")
    _library(q)

    sub.add_parser("schema", help="print the recipe JSON Schema (for editors)")

    p = sub.add_parser("check", help="run every recipe of a library on a tiny model and check its promise")
    p.add_argument("library_dir", nargs="?", help="check this directory's recipes only (default: the built-in "
                   "recipes and SURGERY_RECIPES_PATH)")
    p.add_argument("--only", action="append", default=[], metavar="NAME[,NAME...]",
                   help="check only these recipes (repeatable, or comma-separated)")
    p.add_argument("--source-dtype", choices=["float32", "bfloat16", "float16"],
                   help="run each recipe on a copy of its test source stored in this dtype (as real releases are)")

    for register in _extensions():
        register(sub)
    _debug_everywhere(sub)
    return ap


def _debug_everywhere(sub) -> None:
    """`--debug` after the subcommand too (`surgery run r.yaml --debug`); SUPPRESS keeps a leading one."""
    for p in set(sub.choices.values()):
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                _debug_everywhere(action)


def _extensions():
    """Commands that live in their own modules (each adds its parser and a `func`)."""
    out = []
    for mod, name in (("surgery.inspect", "add_inspect_parser"), ("surgery.convert", "add_convert_parser"),
                      ("surgery.verify.pair", "add_verify_parser")):
        try:
            module = __import__(mod, fromlist=[name])
        except ModuleNotFoundError:
            continue
        out.append(getattr(module, name))
    return out


def _recipes(args) -> int:
    from .plan import compile_plan
    from .io.resolve import resolve_source
    from .recipe.library import copy_recipe, find_recipe
    from .recipe.listing import entries, guess_test_source
    from .recipe.loader import load_recipe

    if args.recipes_command == "list":
        rows = [("name", "architecture", "ops", "exactness", "description")]
        unplanned, broken = [], []
        for e in entries(args.library, broken):
            src = e.test_source or guess_test_source(e.source)
            arch, exact = "?", "?"
            if src is None:
                unplanned.append(f"{e.name}: no test_source and no builtin of its source's family")
            else:
                try:
                    loaded = load_recipe(e.path, libraries=args.library, source=src, sets=e.test_overrides)
                    p = compile_plan(loaded, resolve_source(src))
                    arch, exact = p.initial.spec.arch.name, p.promise.exactness.value
                except SurgeryError as err:
                    unplanned.append(f"{e.name}: planning on {src} failed: {err}")
            rows.append((e.name, arch, ", ".join(e.ops) or "(copy)", exact, e.description))
        width = terminal_width()
        lines = text_table(rows, width=width, wrap=(4, 2, 3))
        if unplanned:
            notes = ["? = not planned on a test model, so architecture and exactness depend on the source it is "
                     "run on (`surgery plan NAME --source S` tells):"] + [f"  {u}" for u in unplanned]
            lines += fit_lines(notes, width, indent="    ")
        if broken:
            lines += fit_lines(["not listed, they do not load:"] + [f"  {path}: {err}" for path, err in broken],
                               width, indent="    ")
        print("\n".join(lines))
        return 0
    path = find_recipe(args.name, args.library)
    if args.recipes_command == "show":
        print(path.read_text(), end="")
        return 0
    dest = copy_recipe(path, Path(args.dest))
    print(f"copied {path.name} to {dest}")
    return 0


def _run(args) -> int:
    if args.command == "recipes":
        return _recipes(args)
    if args.command == "schema":
        from .recipe.schema import json_schema

        print(json.dumps(json_schema(), indent=2))
        return 0
    if args.command == "check":
        from .recipe.check import check_library, format_results

        names = [n.strip() for arg in args.only for n in arg.split(",") if n.strip()]
        if args.only and not names:
            raise SurgeryError("give recipe names, e.g. --only stablelm_grow,llama_grow_mlp", where="--only")
        results = check_library([args.library_dir] if args.library_dir else None, names or None,
                                own_only=bool(args.library_dir), source_dtype=args.source_dtype)
        print(format_results(results, terminal_width()))
        return 0 if all(r.passed for r in results) else 1
    handler = getattr(args, "func", None) or getattr(args, "handler", None)
    if handler is not None:
        return handler(args)
    kw = dict(sets=args.sets, source=args.source, output=args.output, libraries=args.library)
    if args.command == "validate":  # api.validate's two steps, without importing the pipeline (torch) behind api
        from .recipe.loader import check_paths, load_recipe

        loaded = load_recipe(args.recipe, **kw)
        check_paths(loaded)
        print(f"{loaded.file}: ok ({len(loaded.recipe.ops)} ops)")
        return 0
    from . import api

    if args.command == "plan":
        from .plan import format_plan
        from .runtime.progress import Progress
        from .verify.schedule import Rate, schedule

        loaded = api.load(args.recipe, **kw)
        measure = dict(measure=True, device=args.device or loaded.recipe.device, progress=Progress(True)) if args.measure else {}
        p = api.plan(loaded, **measure)
        rate = Rate.assumed(p.initial.active_parameters, loaded.recipe.verify.max_tokens, threads=os.cpu_count() or 1)
        print("\n".join([format_plan(p, warnings=True), ""] + schedule(p).describe(rate)))
        return 0
    result = api.run(args.recipe, device=args.device, force=args.force, verify=not args.no_verify,
                     progress=True, **kw)  # bars on a terminal, one summary line per phase always
    return finish(result)


def finish(result, what: str = "") -> int:
    """Print a run's verification table; a broken promise is exit 1, and the output stays for inspection."""
    if result.report is not None:
        print(result.report.table(width=terminal_width(watched=True)))
    if result.report is not None and not result.report.passed:
        kept = (f"; the previous output at {result.output.with_name(result.output.name[:-len('.failed')])} is untouched"
                if result.output.name.endswith(".failed") else "")
        raise VerificationFailed(f"verification failed: {result.report.rule}; the output is kept at {result.output} "
                                 f"for inspection, not verified (its README.md and surgery_report.md say FAILED){kept}")
    print(f"wrote {result.output}{what}" + ("" if result.report is not None else " (not verified: --no-verify)"))
    return 0


def entry() -> None:
    """The `surgery` command: `main`, then an exit that skips the interpreter's teardown.

    Unloading torch's operator libraries at exit took half a second of every run; by the time
    `main` returns every output file is written, fsynced and closed, so there is nothing to tear down.
    """
    limit_malloc_arenas()
    interrupt.install()
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return e.code if isinstance(e.code, int) else 2
    debug = getattr(args, "debug", False) or os.environ.get("SURGERY_DEBUG") == "1"
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
    except KeyboardInterrupt as e:
        print(interrupt.message(e), file=sys.stderr)
        return 130
    except BrokenPipeError:  # `surgery inspect ... | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as e:  # a path the checks above missed: still one line, not a traceback
        if debug:
            traceback.print_exc()
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback with --debug
        if debug:
            traceback.print_exc()
        print(f"error: internal error ({type(e).__name__}: {' '.join(str(e).split())}); --debug shows the traceback; "
              f"please report it", file=sys.stderr)
        return 3
