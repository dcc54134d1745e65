"""The output's tokenizer when the vocabulary grows: the source's, with new tokens added by the library.

Tokens are added with `tokenizers`' `AddedToken` through transformers' `add_tokens` and written with
`save_pretrained`, never by editing JSON. New tokens always take new model rows: their ids start at
the model's old `vocab_size`, so every old row (and every old token's logit) stays untouched. A
tokenizer shorter than the model (Qwen pads its embedding past the tokenizer) first gets reserved
special placeholders for the unused rows, as Llama 3 ships its reserved tokens.

Added tokens, special or not, are matched anywhere in the text before the model splits it (no
`single_word` or `lstrip` flags are set), so a token can only be added where that match takes the
place of whole old tokens: `split_changes` says where it would not.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

from ..errors import SurgeryError
from .native_params import is_native

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
RESERVED = "<|surgery_reserved_{}|>"
# Ordinary text every new token is probed on (verification's default text), besides the token itself
PROBE_TEXT = Path(__file__).resolve().parent.parent / "assets" / "python-license.txt"
PROBE_WHERE = "the Python license text"


@dataclass(frozen=True)
class NewToken:
    content: str
    special: bool
    id: int


def has_tokenizer(folder: Path | None) -> bool:
    from .tokenizer import native_tokenizer_file

    if folder is None or not Path(folder).is_dir():
        return False
    return any((Path(folder) / f).is_file() for f in TOKENIZER_FILES) or native_tokenizer_file(folder) is not None


def load_tokenizer(folder: Path):
    """A folder's tokenizer as a fast transformers tokenizer, the kind that can take new tokens.

    A transformers folder is read with AutoTokenizer. A native tokenizer (tekken.json,
    tokenizer.model) with no tokenizer.json beside it is converted by transformers' own converters
    (`hf_tokenizer_from_native`, checked against the native tokenizer on probe strings).
    """
    from .tokenizer import _PROBES, _auto_tokenizer, hf_tokenizer_from_native, native_tokenizer_file, read_native_tokenizer

    folder = Path(folder)
    native = native_tokenizer_file(folder)
    hf = (folder / "tokenizer.json").is_file() or ((folder / "tokenizer_config.json").is_file() and not is_native(folder))
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if native is not None and not hf:
            tok = hf_tokenizer_from_native(native)
            bad = next((p for p in _PROBES if list(tok(p)["input_ids"]) != read_native_tokenizer(native).encode(p)), None)
            if bad is not None:
                raise ValueError(f"the conversion encodes {bad!r} differently from {native.name}")
            return _with_chat_template(tok, folder)
        tok = _auto_tokenizer(folder)
    except SurgeryError:
        raise
    except Exception as e:  # transformers raises many types for a tokenizer it cannot build
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}" if str(e).strip() else type(e).__name__
        hint = " (pip install protobuf)" if "protobuf" in str(e).lower() else ""
        raise SurgeryError(f"cannot load the tokenizer as a transformers tokenizer to add tokens to it ({reason}){hint}",
                           where=str(folder)) from None
    finally:
        hf_logging.set_verbosity(level)
    if not getattr(tok, "is_fast", False):
        raise SurgeryError("the tokenizer has no fast (tokenizers) version; grow_vocab writes tokenizer.json", where=str(folder))
    return tok


def _with_chat_template(tok, folder: Path):
    """A tokenizer converted from a native file keeps a chat template the folder ships."""
    import json

    cfg = folder / "tokenizer_config.json"
    try:
        template = json.loads(cfg.read_text()).get("chat_template") if cfg.is_file() else None
    except (ValueError, OSError):
        template = None
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    if template and not getattr(tok, "chat_template", None):
        tok.chat_template = template
    return tok


def splits_special_tokens(tok) -> bool:
    return bool(getattr(tok, "split_special_tokens", False))


def add_tokens(tok, tokens: list[NewToken]) -> None:
    """Add `tokens`, each on its planned id; rows before an id that no token names get reserved placeholders."""
    from tokenizers import AddedToken

    for t in tokens:
        if len(tok) < t.id:
            tok.add_tokens([AddedToken(RESERVED.format(i), special=True, normalized=False) for i in range(len(tok), t.id)],
                           special_tokens=True)
        tok.add_tokens([AddedToken(t.content, special=t.special, normalized=not t.special)], special_tokens=t.special)
        got = tok.convert_tokens_to_ids(t.content)
        if got != t.id:
            raise AssertionError(f"token {t.content!r} got id {got}, planned {t.id}")


def write_tokenizer(source_dir: Path, out_dir: Path, tokens: list[NewToken]) -> list[str]:
    """The source tokenizer plus `tokens`, saved into `out_dir` (replacing the copied files); returns the files written."""
    from .tokenizer import _drop_local_keys, native_tokenizer_file

    tok = load_tokenizer(source_dir)
    add_tokens(tok, tokens)
    # A native tokenizer (tokenizer.model[.vN], tekken.json) cannot hold the new tokens: a copy would disagree
    while (stale := native_tokenizer_file(out_dir)) is not None:
        stale.unlink()
    files = sorted(str(Path(p).name) for p in tok.save_pretrained(str(out_dir)))
    _drop_local_keys(Path(out_dir) / "tokenizer_config.json")
    return files


def split_changes(tok, tokens: list[NewToken], texts: dict[str, str | None] | None = None) -> dict[int, str]:
    """Why adding `tokens` to `tok` would change how existing text is split: {index in tokens: reason}.

    Each token is probed alone, after a space, and in `texts` ({text: where it comes from}; default the
    Python license). Every match of a new token must replace a run of two or more whole old tokens,
    or one old token that also held the whitespace before it (the space then becomes its own token,
    as any word added to a byte-level BPE): otherwise it cuts an old token apart, and the old
    tokenizer's split of that text is lost. A match replacing exactly one old token is a token the
    tokenizer already has: that text would leave its trained id for a new, untrained one. The text
    around the matches must keep its old ids. `tok` is used up: the tokens are added to it (a copy of a
    150k-token vocabulary would cost seconds).
    """
    if texts is None:
        texts = {PROBE_TEXT.read_text(): PROBE_WHERE}
    probes: dict[str, str | None] = {}
    for t in tokens:
        probes.setdefault(t.content, None)
        if not t.content[:1].isspace():
            probes.setdefault(" " + t.content, None)
    probes.update(texts)
    before = _encode(tok, list(probes))
    empty = next((i for i, t in enumerate(tokens) if not t.special and _normalized(tok, t.content) == ""), None)
    if empty is not None:
        return {empty: f"{tokens[empty].content!r} is normalised to nothing by the tokenizer: it could never be matched in text"}
    add_tokens(tok, tokens)
    try:
        after = _encode(tok, list(probes))
    except BaseException as e:  # tokenizers panics (a Rust PanicException) on some tokens a normaliser changes
        if type(e).__name__ != "PanicException":
            raise
        named = ", ".join(repr(t.content) for t in tokens[:3]) + (", ..." if len(tokens) > 3 else "")
        return {0: f"{named}: tokenizers fails on text with {'these' if len(tokens) > 1 else 'it'} added ({str(e).strip()[:80]})"}
    first = min(t.id for t in tokens)
    index = {t.id: i for i, t in enumerate(tokens)}
    found: dict[int, str] = {}
    alone = {text: new for text, new in zip(probes, after)}
    for i, t in enumerate(tokens):
        if alone[t.content].ids != [t.id]:
            found[i] = (f"{t.content!r} would not be encoded as its new id {t.id}: with it added the tokenizer encodes it as "
                        f"{alone[t.content].tokens} {alone[t.content].ids}")
    for (text, where), old, new in zip(probes.items(), before, after):
        for nid, reason in _changes(text, old, new, first):
            i = index.get(nid)
            if i is not None and i not in found:
                found[i] = f"{tokens[i].content!r} {reason}" + (f" (in {where})" if where else "")
    return found


def _normalized(tok, text: str) -> str:
    norm = tok.backend_tokenizer.normalizer
    return norm.normalize_str(text) if norm is not None else text


def _encode(tok, texts: list[str]):
    b = tok.backend_tokenizer
    b.post_processor = None  # no BOS, and offsets as the model splits the text (ByteLevel's trim_offsets moves them)
    return b.encode_batch(texts, add_special_tokens=False)


def _changes(text: str, old, new, first: int):
    """(new id, reason) for each match of a new token (id >= first) in `text` that does not take the place of whole old tokens."""
    starts = [a for a, _ in old.offsets]
    ends = [b for _, b in old.offsets]
    regions = []
    for nid, (s, e) in zip(new.ids, new.offsets):
        if nid < first:
            continue
        over = range(bisect.bisect_right(ends, s), bisect.bisect_left(starts, e))  # old tokens overlapping [s, e)
        if not over:
            continue
        start = min(s, starts[over[0]])
        cut = next((k for k in over if ends[k] > e or (starts[k] < s and not text[starts[k]:s].isspace())), None)
        if cut is not None:
            yield nid, (f"would change how existing text is split: added tokens are matched anywhere in the text, so in "
                        f"{_around(text, starts[cut], ends[cut])!r} it would cut the source's token "
                        f"{old.tokens[cut]!r} (id {old.ids[cut]}) apart")
        elif len(over) == 1:
            k = over[0]
            yield nid, (f"is already in the vocabulary: the source tokenizer encodes {text[start:e]!r} as the one token "
                        f"{old.tokens[k]!r} (id {old.ids[k]}); added, that text would leave its trained row for a new, untrained one")
        regions.append((start, e, nid))

    region_starts = [a for a, _, _ in regions]

    def kept(enc):
        def inside(o):
            r = bisect.bisect_right(region_starts, o[0]) - 1
            return r >= 0 and o[1] <= regions[r][1]
        return [(i, o, t) for i, o, t in zip(enc.ids, enc.offsets, enc.tokens) if not inside(o)]

    was, now = kept(old), kept(new)  # ids compared, not offsets: a normaliser may give a space to either side
    k = next((k for k, (x, y) in enumerate(zip(was, now)) if x[0] != y[0]), min(len(was), len(now)))
    if regions and (k < len(was) or k < len(now)):
        x, y = (was[k] if k < len(was) else None), (now[k] if k < len(now) else None)
        at = min(z[1][0] for z in (x, y) if z)
        a, b, nid = min(regions, key=lambda r: abs(r[0] - at))
        piece = lambda z: f"{z[2]!r} (id {z[0]})" if z else "nothing"
        yield nid, (f"would change how the text next to it is split: in {_around(text, min(a, at), max(b, at + 1))!r} the "
                    f"source's token {piece(x)} would become {piece(y)}")


def _around(text: str, start: int, end: int, pad: int = 12) -> str:
    """The text around [start, end), within its line."""
    a = text.rfind("\n", max(0, start - pad), start) + 1 or max(0, start - pad)
    z = text.find("\n", end, end + pad)
    return text[a:z if z >= 0 else min(len(text), end + pad)]
