"""glibc's allocator tuned for this workload: few arenas for the command's threads, freed layer-sized blocks back to the system."""
from __future__ import annotations

import os
import sys


def return_freed_memory() -> None:
    """Make glibc give freed blocks above 1 MiB back to the system.

    glibc serves blocks below a threshold from its heap, and raises that threshold (up to 32 MiB)
    each time a larger block is freed: a layer's weights and activations then come from a heap that
    fragments and never shrinks, and resident memory grew by ~25 MB per layer streamed (1.5 GB after
    24 layers of a 1 GB model). A fixed threshold keeps it flat. Elsewhere (macOS, musl) a no-op.
    """
    global _RETURNING
    if _RETURNING:
        return
    _RETURNING = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: fixed, which also stops its dynamic growth
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD: free heap tops above 1 MiB go back too
    except (OSError, AttributeError):
        pass


_RETURNING = False


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Two glibc malloc arenas for the command's threads, unless MALLOC_ARENA_MAX says otherwise.

    The executor's compute, writing and hashing threads each took an arena of their own, and freed
    tensor memory kept in one arena cannot serve another thread: a streaming grow_mlp's peak memory
    rose with the checkpoint's size (float32, 0.5 -> 4 GB: 474 -> 619 MiB). Set before any thread starts.
    """
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-8, arenas)  # M_ARENA_MAX; a libc without it (musl) has no such arenas
    except (OSError, AttributeError):
        pass
