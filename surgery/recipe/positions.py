"""Recipe YAML with positions: every value's file:line:column, for errors that point at it.

Duplicate keys are refused (YAML would keep only the last), and an unquoted `+N` stays the relative
size "+N" (`RecipeYamlLoader`).
"""
from __future__ import annotations

from typing import Any

import yaml

from ..errors import SurgeryError


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


MAX_VALUES = 100_000  # a recipe holds a few hundred; aliases nested ten deep (a "billion laughs") hold 10^9


def parse_yaml(text: str, file: str) -> tuple[Any, dict]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _check_size(node, file)
        data = load_yaml(text)
        positions: dict = {}
        if node is not None:
            _positions(node, (), file, positions)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        raise SurgeryError(f"malformed YAML: {e.problem or e.context}", where=where) from None
    except yaml.reader.ReaderError as e:  # its text spans two lines
        raise SurgeryError(f"malformed YAML: unacceptable character #x{e.character:04x} at position {e.position}",
                           where=file) from None
    except yaml.YAMLError as e:
        raise SurgeryError(f"malformed YAML: {' '.join(str(e).split())}", where=file) from None
    except RecursionError:
        raise SurgeryError("malformed YAML: nested too deeply", where=file) from None
    return data, positions


def _check_size(root: yaml.Node, file: str) -> None:
    """Refuse a document whose values, aliases expanded, number more than MAX_VALUES (an alias inside itself never
    ends): building it whole took all the memory there was."""
    stack, count = [root], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise SurgeryError(f"malformed YAML: its anchors and aliases expand to more than {MAX_VALUES} values "
                               f"(or an alias refers to itself)", where=file)
        if isinstance(node, yaml.MappingNode):
            stack.extend(v for pair in node.value for v in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
