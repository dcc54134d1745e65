"""`surgery convert SRC OUT --to hf|mistral`: a recipe with no ops, built in code.

A plain copy into the other layout (transformers <-> Mistral native), verified like any run:
the output is loaded by stock transformers and must give the source's loss within float rounding.
"""
from __future__ import annotations

import argparse
import sys


def convert_recipe(source: str, output: str, to: str, dtype: str = "auto"):
    """The LoadedRecipe of a conversion (no ops)."""
    from .recipe.loader import validate_recipe
    from .recipe.paths import resolve_paths

    data = {
        "name": f"convert-to-{to}",
        "description": f"Convert {source} to the {'transformers' if to == 'hf' else 'Mistral native'} layout (no ops).",
        "source": source,
        "output": {"path": output, "format": to, "dtype": dtype},
        "ops": [],
    }
    resolve_paths(data, {}, {("source",): "surgery convert", ("output",): "surgery convert"}, {}, "surgery convert")
    return validate_recipe(data, "surgery convert")


def add_convert_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("convert", help="copy a model into another layout (hf <-> mistral native), verified")
    p.add_argument("source", help="source directory, hub id or builtin:NAME")
    p.add_argument("output", help="output directory")
    p.add_argument("--to", required=True, choices=["hf", "mistral"], help="hf: transformers layout; mistral: native release layout")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="output dtype")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--force", action="store_true", help="replace a previous output of surgery (a directory holding only what surgery wrote)")
    p.add_argument("--no-verify", action="store_true", help="skip the loss and logit checks")
    p.set_defaults(func=run_convert)
    return p


def run_convert(args) -> int:
    from . import api
    from .cli import finish

    loaded = convert_recipe(args.source, args.output, args.to, args.dtype)
    result = api.run(loaded, device=args.device, force=args.force, verify=not args.no_verify, progress=True)
    return finish(result, f" ({args.to})")


__all__ = ["add_convert_parser", "convert_recipe", "run_convert"]
