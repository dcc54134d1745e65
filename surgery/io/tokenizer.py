"""Tokenizers, read by the libraries that own them.

Weight surgery never needs a tokenizer; verification needs one to turn text into ids. A Mistral
native release ships `tekken.json` (current releases, read with mistral-common, Mistral's own
library) or a sentencepiece `tokenizer.model[.vN]` (read with mistral-common, or with
sentencepiece itself when mistral-common is not installed: mistral-common encodes these with
sentencepiece too). Whatever settings the file uses (normalisation, model type), its own library
applies them. A transformers folder is read with `AutoTokenizer`.

An hf output of a native source also gets a `tokenizer.json`, made by transformers' own converters
(`convert_tekken_tokenizer`; the sentencepiece extractor, which needs protobuf). It is checked
against the native tokenizer on probe strings, and skipped with a warning when it cannot be made
or does not encode alike: the weights and their verification do not depend on it.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import SurgeryError
from .native_params import is_native

TEKKEN = "tekken.json"
_SPM = re.compile(r"^tokenizer\.model(\.v\d+(m\d+)?)?$")
# Probe strings for a converted tokenizer: whitespace runs, tabs, newlines, accents, full-width
# letters (what normalisation rules change), digits. Special-token literals are left out: HF
# tokenizers parse them in text by design, Mistral's do not.
_PROBES = ("Hello world", "  two  spaces\tand a tab\nnew line", "Ünïcødé ✓ 1234", "ＡＢＣ full width", "x=1;  y = 22\n\n\tz")
INSTALL_MISTRAL = "pip install mistral-common"


def native_tokenizer_file(folder: Path) -> Path | None:
    """The tokenizer a native release ships: tekken.json, else the newest tokenizer.model.vN, else tokenizer.model."""
    folder = Path(folder)
    if (folder / TEKKEN).is_file():
        return folder / TEKKEN
    spm = [f for f in folder.iterdir() if f.is_file() and _SPM.match(f.name)] if folder.is_dir() else []
    if not spm:
        return None
    return max(spm, key=lambda f: (len(f.name), f.name))  # tokenizer.model.v3 before tokenizer.model


@dataclass
class NativeTokenizer:
    file: Path
    encode: Callable[[str], list[int]]  # text -> ids, BOS first, as the model reads a document
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None


def _special(tok, name: str) -> int | None:
    try:
        v = int(getattr(tok, name))
    except Exception:  # mistral-common raises when a tokenizer has no such token
        return None
    return v if v >= 0 else None


def read_native_tokenizer(file: Path) -> NativeTokenizer:
    """A tekken.json or sentencepiece model, read by mistral-common (sentencepiece for .model files without it)."""
    file = Path(file)
    where = str(file)
    try:
        from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    except ImportError:
        if file.name == TEKKEN:
            raise SurgeryError(f"reading tekken.json needs Mistral's mistral-common: {INSTALL_MISTRAL}", where=where) from None
        return _sentencepiece(file)
    try:
        tok = Tekkenizer.from_file(file) if file.name == TEKKEN else SentencePieceTokenizer(file)
    except Exception as e:  # mistral-common raises assertions, ValueErrors and its own exceptions for bad files
        raise SurgeryError(f"mistral-common cannot read this tokenizer ({type(e).__name__}: {str(e)[:160]})", where=where) from None
    return NativeTokenizer(file, lambda text: tok.encode(text, bos=True, eos=False),
                           _special(tok, "bos_id"), _special(tok, "eos_id"), _special(tok, "pad_id"))


def _sentencepiece(file: Path) -> NativeTokenizer:
    try:
        import sentencepiece as spm
    except ImportError:
        raise SurgeryError(f"reading {file.name} needs sentencepiece or mistral-common: {INSTALL_MISTRAL}", where=str(file)) from None
    try:
        sp = spm.SentencePieceProcessor(model_file=str(file))
    except (RuntimeError, OSError) as e:
        raise SurgeryError(f"sentencepiece cannot read this tokenizer ({str(e)[:160]})", where=str(file)) from None
    bos, eos, pad = (i if i >= 0 else None for i in (sp.bos_id(), sp.eos_id(), sp.pad_id()))
    return NativeTokenizer(file, lambda text: ([bos] if bos is not None else []) + sp.encode(text), bos, eos, pad)


def text_encoder(folder: Path) -> Callable[[str], list[int]]:
    """How verification turns text into ids for a checkpoint folder.

    A native folder is read by its native tokenizer, a transformers folder by AutoTokenizer; a
    folder with only the other kind's files (a native release written from a transformers source,
    a transformers folder holding only tokenizer.model) by what it has.
    """
    folder = Path(folder)
    file = native_tokenizer_file(folder)
    hf_files = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    if file is not None and (is_native(folder) or not hf_files):
        return read_native_tokenizer(file).encode
    try:
        tok = _auto_tokenizer(folder)
    except Exception as e:  # transformers raises many types for a missing tokenizer
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise SurgeryError(f"cannot load the source tokenizer ({type(e).__name__}{': ' + why if why else ''}); verification "
                           "needs one: set verify.data: random (seeded token ids), or pass --no-verify", where=str(folder)) from None
    return lambda text: list(tok(text)["input_ids"])


def _auto_tokenizer(folder: Path):
    from ..modeling import load_tokenizer  # AutoTokenizer, without a remote-code prompt for patched outputs

    return load_tokenizer(folder)


def special_token_ids(folder: Path) -> dict[str, int | None]:
    """bos/eos/pad ids of a native folder: generation_config.json (transformers' record), else its tokenizer."""
    folder = Path(folder)
    gen = folder / "generation_config.json"
    if gen.is_file():
        try:
            g = json.loads(gen.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            g = {}
        ids = {k: g.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in g}
        if ids:
            return ids
    file = native_tokenizer_file(folder)
    if file is None:
        return {}
    try:
        tok = read_native_tokenizer(file)
    except SurgeryError:
        return {}
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def hf_tokenizer_from_native(file: Path):
    """transformers' own conversion of a native tokenizer file (a TokenizersBackend that adds BOS)."""
    from transformers import TokenizersBackend
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # chat-template and byte-fallback notices are not ours to print
    try:
        if file.name == TEKKEN:
            from transformers.integrations.mistral import convert_tekken_tokenizer

            tok = convert_tekken_tokenizer(str(file))
        else:
            with tempfile.TemporaryDirectory() as tmp:  # transformers looks for exactly `tokenizer.model`
                shutil.copyfile(file, Path(tmp) / "tokenizer.model")
                tok = TokenizersBackend.from_pretrained(tmp)
    finally:
        hf_logging.set_verbosity(level)
    tok.add_bos_token = True
    tok.update_post_processor()
    return tok


def add_hf_tokenizer(out_dir: Path) -> bool:
    """Give an output whose only tokenizer is native a tokenizer.json (transformers' conversion), or warn."""
    out_dir = Path(out_dir)
    file = native_tokenizer_file(out_dir)
    if file is None or (out_dir / "tokenizer.json").exists() or (out_dir / "tokenizer_config.json").exists():
        return False
    try:
        native = read_native_tokenizer(file)
        tok = hf_tokenizer_from_native(file)
        bad = next((p for p in _PROBES if list(tok(p)["input_ids"]) != native.encode(p)), None)
        if bad is not None:
            raise ValueError(f"it encodes {bad!r} differently from {file.name}")
        tok.save_pretrained(str(out_dir))
    except Exception as e:  # a convenience only: the weights are written and verified either way
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}" if str(e).strip() else type(e).__name__
        hint = " (pip install protobuf)" if "protobuf" in str(e).lower() else ""
        print(f"warning: output: no tokenizer.json written; transformers cannot convert {file.name} ({reason}){hint}; "
              f"the weights and their verification do not depend on it", file=sys.stderr)
        return False
    for f in ("tokenizer.json", "tokenizer_config.json"):
        _drop_local_keys(out_dir / f)
    return True


def _drop_local_keys(path: Path) -> None:
    """save_pretrained records where it loaded from (`is_local`, ...): meaningless in a published folder."""
    if path.name != "tokenizer_config.json" or not path.is_file():
        return
    cfg = json.loads(path.read_text())
    for k in ("is_local", "local_files_only", "vocab_file"):
        cfg.pop(k, None)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
