"""Verification data: the text a run is judged on, tokenized by the source's tokenizer, or seeded random ids."""
from __future__ import annotations

import builtins
from pathlib import Path

import torch

from ..errors import SurgeryError
from ..io.grown_tokenizer import NewToken

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def license_text() -> str:
    """The Python license as the running interpreter prints it (the article's data)."""
    printer = getattr(builtins, "license", None)
    try:
        printer._Printer__setup()
        text = "\n".join(printer._Printer__lines)
        if len(text) > 1000:
            return text
    except AttributeError:
        pass
    return (ASSETS / "python-license.txt").read_text()


def load_text(data: str) -> str:
    if data == "builtin:python-license":
        return license_text()
    p = Path(data).expanduser()
    if p.is_dir() and any((p / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        return dataset_text(p)
    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise SurgeryError("directory holds no .txt files", where=f"verify.data {data}")
        return "\n\n".join(f.read_text(errors="replace") for f in files)
    if p.is_file():
        return p.read_text(errors="replace")
    raise SurgeryError("not found: use builtin:python-license, a text file, a directory of .txt files, or a dataset saved "
                       "with datasets' save_to_disk", where=f"verify.data {data}")


def dataset_text(path: Path, max_chars: int = 2_000_000) -> str:
    """The text column of a local dataset (`datasets.save_to_disk`); `datasets` is optional."""
    try:
        import datasets
    except ImportError:
        raise SurgeryError("a dataset directory needs the `datasets` package: pip install datasets", where=str(path)) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["validation"] if "validation" in ds else ds[sorted(ds)[0]]
    column = "text" if "text" in ds.column_names else next(
        (c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")), None)
    if column is None:
        raise SurgeryError(f"no text column in the dataset (columns: {', '.join(ds.column_names)})", where=str(path))
    parts, size = [], 0
    for row in ds:
        parts.append(row[column])
        size += len(row[column])
        if size >= max_chars:
            break
    return "\n\n".join(parts)


def tokenize(source_dir: Path, data: str, max_tokens: int) -> torch.Tensor:
    from ..io.tokenizer import text_encoder

    encode = text_encoder(source_dir)
    ids = torch.tensor([encode(load_text(data))], dtype=torch.long)[:, :max_tokens]
    if ids.shape[1] < 2:
        raise SurgeryError("verification data gives fewer than 2 tokens", where=f"verify.data {data}")
    return ids


def calibration_ids(source_dir: Path, data: str, max_tokens: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """The verification tokens: the data tokenized by the source's tokenizer, or `random` seeded ids
    (for a model that ships no tokenizer)."""
    if data == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (1, max_tokens), generator=g)
    ids = tokenize(source_dir, data, max_tokens)
    if int(ids.max()) >= vocab_size:  # the embedding would be indexed past its end (an IndexError mid-verification)
        raise SurgeryError(f"the source's tokenizer gives token id {int(ids.max())} on this data, but the model's "
                           f"vocab_size is {vocab_size}: tokenizer and model disagree (verify.data: random needs no tokenizer)",
                           where=f"verify.data {data}")
    return ids


def with_new_tokens(ids: torch.Tensor, added: list[NewToken] | None) -> torch.Tensor:
    """Ids for the gradient check: added tokens first, so their input rows can get gradient too."""
    if not added:
        return ids
    new = torch.tensor([[a.id for a in added]], dtype=ids.dtype)
    return torch.cat([new, ids], dim=1)
