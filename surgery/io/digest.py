"""The integrity hash of tensors, files and the source: BLAKE3.

Every output byte is hashed twice (its tensor's digest and its file's), and on this project's
2-core machine SHA-256 (1.5 GB/s a core, with SHA-NI) was the largest cost of a copy; BLAKE3 is a
cryptographic hash too, at 5.7 GB/s a core here (AVX-512), and its digests match `b3sum`'s.
Reports written before the switch record SHA-256 (`files_sha256`); `surgery verify --integrity`
still checks those with SHA-256.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from blake3 import blake3

ALGORITHM = "blake3"
BLOCK = 16 << 20


def new(data=b""):
    """A fresh hasher (`update`, `hexdigest`); releases the GIL on large buffers, like hashlib."""
    return blake3(data)


def hexdigest(data) -> str:
    return blake3(data).hexdigest()


def file_hexdigest(path: Path, algorithm: str = ALGORITHM) -> str:
    """A file's digest read in 16 MiB blocks; `algorithm` "sha256" for reports written before BLAKE3."""
    h = new() if algorithm == ALGORITHM else hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(directory: Path, skip: tuple[str, ...] = (), known: dict[str, str] | None = None,
                 algorithm: str = ALGORITHM) -> dict[str, str]:
    """The digest of every file of an output (BLAKE3 unless told), read in 16 MiB blocks unless already `known`."""
    out = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in skip):
        rel = str(f.relative_to(directory))
        out[rel] = known[rel] if known and rel in known else file_hexdigest(f, algorithm)
    return out
