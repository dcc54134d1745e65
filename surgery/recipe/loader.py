"""Loading a recipe: its document (`extends` merged), `--set` overrides and `vars`, local paths made
absolute, validated against the schema, with the position of every value kept for errors."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from ..errors import SurgeryError
from .document import read_document
from .overrides import apply_set, substitute
from .paths import DATA_KEYWORDS, SCHEME, resolve_paths
from .positions import locate
from .schema import Recipe
from .validation import validation_error


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


def check_paths(loaded: LoadedRecipe, data: bool = True) -> None:
    """What `validate` can check without reading a model: a local source and the verification data exist."""
    src = loaded.recipe.source_spec.path
    if os.path.isabs(src) and not Path(src).exists():  # made absolute by resolve_paths: a local directory
        raise SurgeryError(f"source directory not found: {src} (paths in a recipe are relative to the recipe file)",
                           where=loaded.where(("source",)))
    value = loaded.recipe.verify.data
    if not data or SCHEME.match(value) or value in DATA_KEYWORDS or Path(value).exists():
        return
    raise SurgeryError(f"verification data not found: {value} (paths in a recipe are relative to the recipe file); use "
                       f"builtin:python-license, a text file, a directory of .txt files, or a dataset saved with datasets' "
                       f"save_to_disk", where=loaded.where(("verify", "data")))
