"""The floor under a surgery run on this machine: moving its bytes, and hashing them as every run does, nothing else.

    python benchmarks/floor.py copy SOURCE OUTPUT             # the floor under `surgery run` with no ops
    python benchmarks/floor.py write SOURCE OUTPUT --bytes N  # under a growth whose output holds N bytes

Every surgery run records the BLAKE3 of each output tensor and of each output file (`tensor_blake3`,
`files_blake3`) and of each source tensor (the source's content hash), and fsyncs what it wrote. This
script does that much work in the cheapest pattern surgery could do it, and nothing else: no torch or
transformers start-up, no plan, no conversion, no random draws, no NaN check.

- copy: each source file is moved by the kernel (copy_file_range, as cp and surgery move untouched
  tensors); a second thread reads it back from the page cache and hashes it twice (the output
  tensor's and file's digests; the first is also the source tensor's, as surgery adopts it).
- write: the same for every source byte (as if a growth could place all of them by kernel copies),
  then the N - source bytes a growth adds written from a buffer in memory, 32 MiB at a time, each
  block hashed twice on the second thread as the writer goes.

A lower bound, then: a surgery time target below this floor's time (against cp + sync for the same
bytes) cannot be met on this machine by any implementation that keeps those digests; `run.py --shape`
reports the floor beside each target.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from blake3 import blake3

BLOCK = 32 << 20  # bytes written from memory at a time: at least surgery's (a 16 MiB float32 row block, 8-16 MiB stored)
READ = 4 << 20  # bytes read back at a time (surgery's writer reads back in 4 MiB chunks)
FILE = 10**9  # bytes per output file (the benchmark's shard size)


def read_and_hash(path: Path) -> list[str]:
    """A file's bytes read once through one reused buffer, fed to two BLAKE3 hashers (its tensors' and its own)."""
    hs = [blake3(), blake3()]
    buf = memoryview(bytearray(READ))
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            for h in hs:
                h.update(buf[:k])
    return [h.hexdigest() for h in hs]


def copy(source: Path, output: Path, hasher: ThreadPoolExecutor) -> list:
    """Every source file moved by the kernel into `output`, each read back and hashed twice on `hasher`."""
    jobs = []
    for src in sorted(source.glob("*.safetensors")):
        dst = output / src.name
        with open(src, "rb", buffering=0) as fi, open(dst, "wb", buffering=0) as fo:
            n, done = src.stat().st_size, 0
            while done < n:
                done += os.copy_file_range(fi.fileno(), fo.fileno(), n - done, done, done)
            jobs.append(hasher.submit(read_and_hash, dst))
            os.fsync(fo.fileno())
    return jobs


def write(output: Path, nbytes: int, hasher: ThreadPoolExecutor) -> None:
    """`nbytes` of new files written from memory, each block hashed twice on `hasher` (two blocks may wait)."""
    data = memoryview(os.urandom(BLOCK))
    left, i = nbytes, 0
    while left > 0:
        size, i = min(FILE, left), i + 1
        tensor, file = blake3(), blake3()
        with open(output / f"floor-{i:05d}.bin", "wb", buffering=0) as f:
            done, pending = 0, []
            while done < size:
                view = data[:min(BLOCK, size - done)]
                done += os.pwrite(f.fileno(), view, done)
                if len(pending) >= 2:
                    pending.pop(0).result()
                pending.append(hasher.submit(lambda v=view: (tensor.update(v), file.update(v))))
            for p in pending:
                p.result()
            os.fsync(f.fileno())
        left -= size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["copy", "write"])
    ap.add_argument("source", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--bytes", type=int, help="write: bytes of output to write")
    args = ap.parse_args(argv)
    if args.mode == "write" and not args.bytes:
        ap.error("write needs --bytes")
    args.output.mkdir(parents=True, exist_ok=False)
    with ThreadPoolExecutor(1) as hasher:
        jobs = copy(args.source, args.output, hasher)
        if args.mode == "write":
            copied = sum(f.stat().st_size for f in args.output.iterdir())
            write(args.output, max(0, args.bytes - copied), hasher)
        for j in jobs:
            j.result()
    return 0


if __name__ == "__main__":
    sys.exit(main())
