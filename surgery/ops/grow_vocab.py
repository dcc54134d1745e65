"""grow_vocab: new tokens in the tokenizer and new rows in every vocabulary-sized tensor.

New tokens take new rows appended after the model's `vocab_size` (then padding rows up to
`pad_to_multiple_of`); old rows are not touched. Input ids of old tokens reach the same embedding
rows and the hidden states never see the new rows, so every old token's logit is exactly what it
was. Only the softmax normaliser changes: on text without new tokens the loss per position moves by
log(1 + sum_new exp(z_new) / sum_old exp(z_old)), the probability mass the new rows take, and by
nothing else. Verification computes that expected change from the output's own logits and compares.
That holds for text the grown tokenizer splits as the old one did: a token the old tokenizer already
has as one id (" the" is Ġthe), or whose matches would cut old tokens apart ("he" in "the"), is
refused while planning (`split_changes`).

Rows are initialised per tensor (embedding, lm_head, and any vocabulary-sized bias):
`mean` the old rows' mean (transformers' `mean_resizing`); `hewitt` that mean plus a draw from
N(0, 1e-9 * covariance of the old rows) (Hewitt 2021; transformers draws the same distribution),
seeded; `subword` the mean of the rows of the pieces the old tokenizer splits the token into
(the right start for real words; padding rows get the mean); `zeros`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..arch import Axis, TensorRole as R
from ..errors import SurgeryError
from ..lazy import generator
from ..state import ModelState, NewSlice
from ..io.grown_tokenizer import RESERVED, NewToken, add_tokens, has_tokenizer, load_tokenizer, split_changes, splits_special_tokens
from .base import Exactness, Op, OpContext, Promise
from .slices import Fill, append_dest, grow_axis

if TYPE_CHECKING:  # torch loads where data is touched: plans and `surgery validate` start without it
    import torch

# transformers' _init_added_embeddings_weights_with_mean: covariance scaled by this before sampling
HEWITT_SCALE = 1e-9
COV_BLOCK = 4096  # rows per block of the covariance sum


class VocabInit(str, Enum):
    MEAN = "mean"
    HEWITT = "hewitt"
    SUBWORD = "subword"
    ZEROS = "zeros"


class TokenSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    content: str = Field(min_length=1)
    special: bool = Field(False, description="a control token: marked special, matched whole, skipped when decoding")


def _chunks(blocks: Iterable[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """Consecutive row blocks (each flattened to (rows, values per row), at least float32) re-cut into `size` rows:
    the chunks of the whole tensor's `split(size)` wherever the blocks cut, so sums over them have its bits."""
    import torch

    carry = None
    for t in blocks:
        t = t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)
        t = t.to(torch.promote_types(t.dtype, torch.float32))
        if carry is not None:
            t = torch.cat([carry, t])
            carry = None
        cut = t.shape[0] - t.shape[0] % size
        for a in range(0, cut, size):
            yield t[a:a + size]
        if cut < t.shape[0]:
            carry = t[cut:].clone()
    if carry is not None:
        yield carry


def new_rows(blocks: Callable[[], Iterable[torch.Tensor]], init: VocabInit, count: int, pieces: list[list[int] | None],
             seed: tuple) -> torch.Tensor:
    """`count` new rows in float64 for a vocabulary-sized tensor whose old rows `blocks()` yields in order (whole, or
    row blocks: the same bits); `pieces[i]` are token i's subword ids. Sums run in float64 per COV_BLOCK rows, in
    order, so the old rows are read a block at a time and never held whole."""
    import torch

    wanted = {i for ids in pieces if ids for i in ids} if init == VocabInit.SUBWORD else set()
    total, rows, picked = None, 0, {}
    for chunk in _chunks(blocks(), COV_BLOCK):
        s = chunk.sum(dim=0, dtype=torch.float64)
        total = s if total is None else total + s
        for i in wanted:
            if rows <= i < rows + chunk.shape[0]:
                picked[i] = chunk[i - rows].to(torch.float64)
        rows += chunk.shape[0]
    if total is None:
        raise ValueError("a vocabulary-sized tensor with no rows")
    mean = total / rows
    if init == VocabInit.ZEROS:
        return mean.new_zeros((count, mean.numel()))
    out = mean.expand(count, mean.numel()).clone()
    if init == VocabInit.SUBWORD:
        for i, ids in enumerate(pieces):
            if ids:
                out[i] = torch.stack([picked[j] for j in ids]).mean(dim=0)
    elif init == VocabInit.HEWITT:
        # float32 for the V x d^2 product (it is scaled by 1e-9 before use), float64 for the factorisation
        centre = mean.float()
        cov = torch.zeros((mean.numel(), mean.numel()), dtype=torch.float32, device=mean.device)
        for chunk in _chunks(blocks(), COV_BLOCK):
            c = chunk.float() - centre
            cov.addmm_(c.T, c)
        cov = cov.double() / rows
        root, info = torch.linalg.cholesky_ex(cov)
        if info:  # singular: a square root from the eigendecomposition (clamped at zero)
            vals, vecs = torch.linalg.eigh(cov)
            root = vecs * vals.clamp(min=0).sqrt()
        z = torch.randn((count, mean.numel()), generator=generator(*seed), dtype=torch.float64).to(mean.device)
        out = out + math.sqrt(HEWITT_SCALE) * z @ root.T
    return out


@dataclass(frozen=True)
class VocabRows(Fill):
    """The new rows of a vocabulary-sized tensor by `init` (`new_rows`), appended along its vocabulary
    axis by `grow_axis`: the old rows stay where they are (and are copied by the writer as they are).
    Along axis 0 they are computed from the old rows' row blocks (`statistics`), so an 8B model's
    embedding is read a block at a time, never widened to float32 whole."""

    init: VocabInit = VocabInit.MEAN
    pieces: tuple = ()  # per new row: the subword ids it averages (init: subword), or None

    @property
    def fixed(self) -> tuple[float, ...]:
        return (0.0,) if self.init == VocabInit.ZEROS else ()

    @property
    def lazy_kind(self) -> str:
        """Zeros are a move; the other rows are statistics of the old rows, rounded once, and whatever they are,
        the old tokens' logits are not theirs and the loss is judged against their own measured mass."""
        return "move" if self.init == VocabInit.ZEROS else "stats_fill"

    def in_row_blocks(self, axis: int) -> bool:
        return axis == 0

    def statistics(self, n: int, blocks: Callable[[], Iterable[torch.Tensor]]) -> tuple:
        """Every new row, in float64 (they are few: one per new token or padding row)."""
        return (new_rows(blocks, self.init, len(self.pieces), list(self.pieces), self.seed),)

    def block(self, shape, stats: tuple, start: int, stop: int, dtype: torch.dtype, device) -> torch.Tensor:
        return stats[0][start:stop].reshape((stop - start,) + tuple(shape[1:])).to(device=device, dtype=dtype)

    def values(self, old: torch.Tensor, axis: int, n: int, stats=None, start: int = 0, rows=None) -> torch.Tensor:
        """From the old rows in float32 at least: the same bits whether they came as float32 or in a half dtype,
        and the same as `block`'s from the old rows' row blocks."""
        import torch
        if n != len(self.pieces):
            raise AssertionError(f"{n} new rows asked of a fill planned for {len(self.pieces)}")
        moved = old.movedim(axis, 0)
        shape = (n,) + tuple(moved.shape[1:])
        wide = torch.promote_types(old.dtype, torch.float32)
        return self.block(shape, self.statistics(old.numel(), lambda: (moved,)), 0, n, wide, old.device).movedim(0, axis)


class GrowVocab(Op):
    op: Literal["grow_vocab"]
    add_tokens: list[Union[str, TokenSpec]] = Field(
        default_factory=list, description="new tokens: a string, or {content, special: true} for a control token")
    pad_to_multiple_of: Optional[int] = Field(None, ge=1, description="pad the vocabulary (rows) to a multiple of this")
    init: VocabInit = VocabInit.MEAN

    reads = ("vocab_size", "tokenizer", "embed", "lm_head")
    writes = ("vocab_size", "tokenizer", "embed", "lm_head")
    summary = "add tokens (and padding rows); old tokens' logits unchanged, the loss moves by the new rows' probability mass"

    @field_validator("add_tokens")
    @classmethod
    def _distinct(cls, tokens):
        contents = [cls.token(t).content for t in tokens]
        dup = next((c for i, c in enumerate(contents) if c in contents[:i]), None)
        if dup is not None:
            raise ValueError(f"token {dup!r} is listed twice")
        return tokens

    @model_validator(mode="after")
    def _something_to_do(self):
        if not self.add_tokens and self.pad_to_multiple_of is None:
            raise ValueError("give add_tokens, pad_to_multiple_of, or both")
        return self

    def label(self) -> str:
        parts = [f"+{len(self.add_tokens)} tokens"] if self.add_tokens else []
        if self.pad_to_multiple_of:
            parts.append(f"pad_to_multiple_of={self.pad_to_multiple_of}")
        return f"{self.op}({', '.join(parts + [f'init={self.init.value}'])})"

    @staticmethod
    def token(t: Union[str, TokenSpec]) -> TokenSpec:
        return t if isinstance(t, TokenSpec) else TokenSpec(content=t)

    def apply(self, state: ModelState, ctx: OpContext) -> Promise:
        spec = state.spec
        old = spec.vocab_size
        tokens = [self.token(t) for t in self.add_tokens]
        source_dir = ctx.source_dir
        added = list(spec.meta.added_tokens)
        notes: list[str] = []
        pieces: list[list[int] | None] = [None] * len(tokens)
        if tokens and has_tokenizer(source_dir):
            tok = load_tokenizer(source_dir)
            vocab = tok.get_vocab()
            earlier = {a.content for a in added}
            for i, t in enumerate(tokens):
                if t.content in vocab or t.content in earlier:
                    where = f"id {vocab[t.content]}" if t.content in vocab else "an earlier grow_vocab"
                    raise SurgeryError(f"token {t.content!r} is already in the vocabulary ({where})", loc=("add_tokens", i))
                if t.special and splits_special_tokens(tok):
                    raise SurgeryError(f"the source tokenizer splits special tokens in text (split_special_tokens), so "
                                       f"{t.content!r} would never be encoded as one id; add it with special: false",
                                       loc=("add_tokens", i))
            source_rows = old if spec.meta.source_vocab_size is None else spec.meta.source_vocab_size
            if len(tok) > source_rows:
                raise SurgeryError(f"the tokenizer has {len(tok)} tokens but the model only {source_rows} rows",
                                   where=str(source_dir))
            named = max([a.id + 1 for a in added], default=len(tok))  # the tokenizer's length after earlier ops
            if named < old:
                notes.append(f"the tokenizer names {named} of {old} rows: ids {named}..{old - 1} become reserved special "
                             f"tokens ({RESERVED.format('ID')}) so the new tokens take new rows")
            if self.init == VocabInit.SUBWORD:
                pieces = [tok(t.content, add_special_tokens=False)["input_ids"] for t in tokens]
                pieces = [[i for i in p if i < old] or None for p in pieces]
            add_tokens(tok, added)  # the tokenizer as earlier grow_vocab ops leave it
            problems = split_changes(tok, [NewToken(t.content, t.special, old + i) for i, t in enumerate(tokens)])
            if problems:
                i = min(problems)
                raise SurgeryError(f"token {problems[i]}", loc=("add_tokens", i))
        elif tokens and source_dir is not None:
            raise SurgeryError("the source has no tokenizer to add tokens to", loc=("add_tokens",))
        elif self.init == VocabInit.SUBWORD and tokens:
            raise SurgeryError("init: subword needs the source tokenizer (none here: a model in memory)", loc=("init",))
        elif tokens:
            notes.append("no tokenizer (a model in memory): rows only, no tokenizer is written")

        new = old + len(tokens)
        if self.pad_to_multiple_of:
            new = -(-new // self.pad_to_multiple_of) * self.pad_to_multiple_of
        count = new - old
        pieces = pieces + [None] * (count - len(tokens))
        for i, t in enumerate(tokens):
            added.append(NewToken(t.content, t.special, old + i))
        if count == 0:
            return Promise(Exactness.EXACT, f"the vocabulary ({old}) is already a multiple of {self.pad_to_multiple_of}: nothing to add")

        label = f"grow_vocab: vocab {old} -> {new} ({self.init.value})"
        for name, info, node in list(state.items()):
            for axis, ax in enumerate(info.axes):
                if ax != Axis.VOCAB:
                    continue
                rows = VocabRows("vocab", ctx.seed_parts(name, "vocab"), init=self.init,
                                 pieces=tuple(tuple(p) if p else None for p in pieces))
                grow_axis(state, name, axis, new, append_dest(old), rows, label)
                # Gradient check: output rows get gradient from the softmax whatever the text; input rows
                # of added tokens get it where the token occurs (verification feeds them in). Padding
                # rows of an embedding are reached by no token (tied, the check runs the embedding alone).
                rows = list(range(old, new)) if (info.role == R.LM_HEAD or info.kind == "bias") \
                    else list(range(old, old + len(tokens)))
                if rows:
                    state.new_slices.append(NewSlice(name, axis, rows, "grow_vocab"))
        spec.config["vocab_size"] = new
        spec.meta.added_tokens = added
        if spec.meta.source_vocab_size is None:
            spec.meta.source_vocab_size = old
        if tokens:
            shown = [f"{a.content!r} -> {a.id}" + (" (special)" if a.special else "") for a in added[-len(tokens):]]
            notes.insert(0, "ids: " + ", ".join(shown[:8]) + (f", ... ({len(shown) - 8} more)" if len(shown) > 8 else ""))
        if count > len(tokens):
            notes.append(f"{count - len(tokens)} padding row(s) with no token (ids {old + len(tokens)}..{new - 1}): "
                         "their logits take probability mass like a new token's")
        if self.init == VocabInit.ZEROS:
            notes.append("init: zeros gives the new rows logit 0 (plus any bias), which may take much more mass than the mean")
        if self.init == VocabInit.SUBWORD and tokens and any(p is None for p in pieces[:len(tokens)]):
            notes.append("tokens the old tokenizer does not split into old pieces start at the mean")
        return Promise(
            Exactness.EXACT_OLD_TOKENS,
            f"every old token's logit unchanged; the loss on text without new tokens moves by log(1 + the {count} new "
            "rows' share of the softmax normaliser), and by nothing else",
            notes,
        )
