"""Moving bytes between files inside the kernel, and starting their writeback early.

An untouched tensor goes from the source file to the output without passing through Python
(copy_file_range, else sendfile, else a buffer where neither copies between files), and the disk
is asked to start writing each range as soon as it is complete (Linux's sync_file_range).
"""
from __future__ import annotations

import errno
import functools
import os
import sys
from pathlib import Path

from ..errors import SurgeryError

CHUNK = 4 << 20  # bytes moved through a buffer at a time where the kernel copies nothing
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}


def copy_range(src: Path, src_offset: int, dst_fd: int, dst_offset: int, n: int) -> None:
    """Copy n bytes of `src` into `dst_fd` at `dst_offset` inside the kernel (copy_file_range, else sendfile),
    else through a buffer (where neither copies between files: macOS's sendfile writes to sockets only)."""
    with open(src, "rb", buffering=0) as f:
        copy_fd_range(f.fileno(), src, src_offset, dst_fd, dst_offset, n)


def copy_fd_range(fd: int, src: Path, src_offset: int, dst_fd: int, dst_offset: int, n: int) -> None:
    """`copy_range` from an open source file `fd` (`src` names it in errors)."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < n:
                k = os.copy_file_range(fd, dst_fd, n - done, src_offset + done, dst_offset + done)
                if not k:
                    raise SurgeryError("file ends inside tensor data (truncated?)", where=str(src))
                done += k
            return
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
    try:
        if not hasattr(os, "sendfile"):
            raise OSError(errno.ENOSYS, "no sendfile")
        os.lseek(dst_fd, dst_offset + done, os.SEEK_SET)
        while done < n:
            k = os.sendfile(dst_fd, fd, src_offset + done, n - done)
            if not k:
                raise SurgeryError("file ends inside tensor data (truncated?)", where=str(src))
            done += k
    except OSError as e:
        if e.errno not in _NO_KERNEL_COPY and e.errno != errno.ENOTSOCK:
            raise
        while done < n:
            block = os.pread(fd, min(n - done, CHUNK), src_offset + done)
            if not block:
                raise SurgeryError("file ends inside tensor data (truncated?)", where=str(src))
            written = 0
            while written < len(block):
                written += os.pwrite(dst_fd, block[written:], dst_offset + done + written)
            done += len(block)


@functools.cache
def _sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # a libc without it
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, n: int) -> None:
    """Ask the kernel to start writing a byte range to disk now, without waiting (Linux's sync_file_range).

    The disk then works while the next tensors are computed, and the fsync that ends each shard waits
    only for the last few: a shard's writeback no longer starts when it is complete. Elsewhere a no-op.
    """
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, offset, n, _SYNC_FILE_RANGE_WRITE)  # advisory: an error leaves it to fsync
