"""The output's tokenizer when the vocabulary grows: the source's, with new tokens added by the library.

Tokens are added with `tokenizers`' `AddedToken` through transformers' `add_tokens` and written with
`save_pretrained`, never by editing JSON. New tokens always take new model rows: their ids start at
the model's old `vocab_size`, so every old row (and every old token's logit) stays untouched. A
tokenizer shorter than the model (Qwen pads its embedding past the tokenizer) first gets reserved
special placeholders for the unused rows, as Llama 3 ships its reserved tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import SurgeryError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
RESERVED = "<|surgery_reserved_{}|>"


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
    from .native import is_native
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
