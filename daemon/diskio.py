"""Two calls of the C library that Python's os module lacks: syncfs(2) and sync_file_range(2)."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

SYNC_FILE_RANGE_WRITE = 2  # from <fcntl.h>: start writing the range, do not wait


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "sync_file_range"):
        libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                         ctypes.c_uint]  # fmt: skip
    return libc


def syncfs(path: Path | str) -> None:
    """Flush the file system holding ``path`` (falls back to a global sync)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc().syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing these bytes of ``fd`` to disk now, without waiting for it:
    an fdatasync later finds little left to do, and the disk works while the rest of a big file
    arrives instead of after it. Only a hint: where the call is missing or fails, nothing
    happens."""
    libc = _libc()
    if hasattr(libc, "sync_file_range"):
        libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)
