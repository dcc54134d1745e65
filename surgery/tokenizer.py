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

from .errors import SurgeryError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
RESERVED = "<|surgery_reserved_{}|>"


@dataclass(frozen=True)
class NewToken:
    content: str
    special: bool
    id: int


def has_tokenizer(source_dir: Path | None) -> bool:
    return source_dir is not None and Path(source_dir).is_dir() and any((Path(source_dir) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(source_dir: Path):
    """The source's tokenizer as a fast transformers tokenizer (a native tokenizer.model is converted)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .io.native import is_native, native_tokenizer

    if is_native(source_dir):
        return native_tokenizer(source_dir)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(source_dir))
    except Exception as e:  # transformers raises many types for a tokenizer it cannot build
        sp = Path(source_dir) / "tokenizer.model"
        if sp.is_file() and not (Path(source_dir) / "tokenizer.json").is_file():
            # sentencepiece only, and transformers' converter wants protobuf: build it from sentencepiece's API
            return _with_chat_template(native_tokenizer(source_dir), Path(source_dir))
        raise SurgeryError(f"cannot load the source tokenizer to add tokens to it ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})", where=str(source_dir)) from None
    finally:
        hf_logging.set_verbosity(level)
    if not getattr(tok, "is_fast", False):
        raise SurgeryError("the source tokenizer has no fast (tokenizers) version; grow_vocab writes tokenizer.json",
                           where=str(source_dir))
    return tok


def _with_chat_template(tok, source_dir: Path):
    """A tokenizer rebuilt from tokenizer.model keeps the source's chat template."""
    import json

    cfg = source_dir / "tokenizer_config.json"
    try:
        template = json.loads(cfg.read_text()).get("chat_template") if cfg.is_file() else None
    except (ValueError, OSError):
        template = None
    jinja = source_dir / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    if template:
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
    tok = load_tokenizer(source_dir)
    add_tokens(tok, tokens)
    stale = Path(out_dir) / "tokenizer.model"
    if stale.is_file():  # sentencepiece cannot hold the new tokens: a stale copy would disagree with tokenizer.json
        stale.unlink()
    return sorted(str(Path(p).name) for p in tok.save_pretrained(str(out_dir)))
