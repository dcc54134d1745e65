"""What every op is: a strict pydantic config that knows how to change a ModelState.

An op is written once against tensor roles and axes (see `surgery.arch`), never per family.
`apply` is pure over lazy tensors, so the same code gives the plan (shapes only) and the run.
"""
from __future__ import annotations

import enum
import re
from pathlib import Path
from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict

from ..errors import SurgeryError
from ..state import ModelState


class Exactness(str, enum.Enum):
    EXACT = "exact"  # stock transformers code computes the same function
    EXACT_SHIPPED_CODE = "exact with shipped code"  # exact with the model code written into the output
    # old tokens' logits exact; the loss moves by the probability mass of new vocabulary rows (grow_vocab)
    EXACT_OLD_TOKENS = "exact on the old tokens"
    APPROXIMATE = "approximate"  # the function moves; verified against the recipe tolerance
    REINIT = "re-initialisation"  # the function is replaced on purpose; checked by initial loss
    # units removed on purpose: the loss change is measured and set beside a seeded random prune's, not bounded
    PRUNED = "pruned"


# Ops after which the model is a new reference: later ops promise relative to the state they leave.
RESETS = (Exactness.REINIT, Exactness.PRUNED)


@dataclass(frozen=True)
class RotaryPairs:
    """Where a step moved the rotary frequency pairs (rotate_half pairs k and k + head_dim/2): the input's
    pair i is the output's pair `to[i]`. `rounded`: the written rope parameters give those frequencies
    back only up to float32 rounding, as the plan says there (verification measures what that does on
    the reference and allows for it); otherwise they are the same float32 numbers."""
    to: tuple[int, ...]
    rounded: str | None = None


@dataclass
class Promise:
    exactness: Exactness
    reason: str
    notes: list[str] = field(default_factory=list)
    pruning: "object | None" = None  # a prune's choice (surgery.ops.prune.Pruning), for the plan and the report
    rotary: RotaryPairs | None = None  # grow_head_dim with full rotary


@dataclass
class OpContext:
    seed: int
    index: int  # position of the op in the recipe, part of every random draw's seed
    source_dir: Path | None = None  # the source checkpoint's folder (its tokenizer); None for a model in memory
    calibration: object | None = None  # surgery.calibration.Calibration, for ops that learn from data
    # Measure data-driven choices (pruning importance) now; False while only planning (`surgery plan`):
    # those choices are then made when the run starts, before any weight is written.
    measure: bool = False

    def seed_parts(self, *parts) -> tuple:
        return (self.seed, self.index, *parts)


class Init(str, enum.Enum):
    ZEROS = "zeros"  # pure padding: new parameters are zero
    TRAINABLE = "trainable"  # readers drawn from the source tensor's statistics, writers zero


_SIZE = re.compile(r"^\s*(?:(x)\s*(\d+(?:\.\d+)?)|([+-])\s*(\d+))\s*$")


# Beyond any model's size (widths, vocabularies: a Llama-3-405B MLP is 53248 wide), and below what planning can hold:
# a size of 1e20 built index lists that long and the run was killed for memory. Layers: one lazy node per tensor each.
MAX_SIZE = 1 << 20
MAX_LAYERS = 1 << 14


def resolve_size(value: int | str, current: int, field_name: str) -> int:
    """An absolute int, or relative: "x1.25" (multiply) / "+8" (add) / "-8" (remove)."""
    if isinstance(value, bool):
        raise SurgeryError("must be an integer or a relative size like 'x1.25' or '+8'", loc=(field_name,))
    if isinstance(value, int):
        new = current + value if value < 0 else value  # YAML reads an unquoted -8 as an int: "remove 8"
    else:
        m = _SIZE.match(value)
        if not m:
            raise SurgeryError(f"{value!r} is not a size: use an integer, 'xFACTOR', '+N' or '-N'", loc=(field_name,))
        if m.group(1):
            exact = current * float(m.group(2))
            new = round(exact)
            if abs(exact - new) > 1e-9:
                raise SurgeryError(f"{value} of {current} is {exact:g}, not an integer", loc=(field_name,))
        else:
            new = current + int(m.group(4)) * (1 if m.group(3) == "+" else -1)
    relative = f" ({value} from {current})" if not isinstance(value, int) or value < 0 else ""
    if new <= 0:
        raise SurgeryError(f"must be positive, got {new}{relative}", loc=(field_name,))
    limit = MAX_LAYERS if field_name == "num_layers" else MAX_SIZE
    if new > limit:
        raise SurgeryError(f"{new}{relative} is beyond any model's {field_name}: at most {limit}", loc=(field_name,))
    return new


def checked_indices(values: list[int], upper: int, field_name: str, outside: str, noun: str | None = None) -> list[int]:
    """`values`, each in 0..upper-1 (else `outside`, formatted with {value} and {last}, located at the entry) and,
    with a `noun`, each listed once ("{noun} {value} is listed twice")."""
    seen: set[int] = set()
    for i, v in enumerate(values):
        if not 0 <= v < upper:
            raise SurgeryError(outside.format(value=v, last=upper - 1), loc=(field_name, i))
        if noun is not None and v in seen:
            raise SurgeryError(f"{noun} {v} is listed twice", loc=(field_name, i))
        seen.add(v)
    return list(values)


def _size_value(v):
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError("must be an integer or a relative size like 'x1.25' or '+8'")
    return v


SizeValue = Annotated[Union[int, str], BeforeValidator(_size_value)]


class Op(BaseModel):
    """Base of every op config. Subclasses set `op: Literal[...]` and implement `apply`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Config fields and tensor groups, for the op graph (edges: a later op reads what an earlier writes).
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""

    def apply(self, state: ModelState, ctx: OpContext) -> Promise:  # pragma: no cover - abstract
        raise NotImplementedError

    def label(self) -> str:
        args = self.model_dump(mode="json", exclude={"op"}, exclude_defaults=True, by_alias=True)
        inner = ", ".join(f"{k}={v}" for k, v in args.items())
        return f"{self.op}({inner})" if inner else self.op
