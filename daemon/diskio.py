"""Disk primitives Python's os module lacks: syncfs(2), sync_file_range(2), and writes that go
around the page cache (O_DIRECT) for big files."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import hashlib
import mmap
import os
import signal
import stat
import threading
from collections.abc import Callable
from pathlib import Path

SYNC_FILE_RANGE_WRITE = 2  # from <fcntl.h>: start writing the range, do not wait


def human_size(n: float) -> str:
    """``n`` bytes for people: 0 B, 12.3 KiB, 4.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def free_bytes(path: Path | str) -> int | None:
    """Room left for an unprivileged user on the file system of ``path``; None if unknown."""
    try:
        vfs = os.statvfs(path)
    except OSError:
        return None
    return vfs.f_bavail * vfs.f_frsize


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "sync_file_range"):
        libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                         ctypes.c_uint]  # fmt: skip
    return libc


def _leases_usable() -> bool:
    """Whether this process may take a lease to ask the kernel about a file's writers: a lease
    that another process breaks sends the holder SIGIO, whose default action ends the process;
    ignored here once (only the main thread may set a handler)."""
    global _LEASES
    if _LEASES is None:
        try:
            if signal.getsignal(signal.SIGIO) not in (signal.SIG_IGN,):
                signal.signal(signal.SIGIO, signal.SIG_IGN)
            _LEASES = True
        except (ValueError, OSError):  # not the main thread
            _LEASES = signal.getsignal(signal.SIGIO) == signal.SIG_IGN
    return _LEASES


_LEASES: bool | None = None


def written_elsewhere(path: str) -> bool | None:
    """Whether some process has the regular file ``path`` open for writing, as the kernel
    tells it (a read lease cannot be taken on a file open for writing), in a few system calls:
    True or False; None when it cannot tell (not the file's owner and no CAP_LEASE, a file
    system without leases, no main thread to ignore SIGIO): then look through /proc
    (OpenFiles). The lease is let go at once."""
    if not _leases_usable():
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        return True if e.errno == errno.EAGAIN else None
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


class OpenFiles:
    """The regular files the processes this user may look at (its own; every one for root)
    have open, as /proc showed them when this was made: to see whether a file about to be
    replaced or removed is still being written by a program here (a log, a download, `tee
    -a`). Replaced by rename, its writer would go on writing into the old file, unlinked: every
    later write lost. One pass over every descriptor, then a lookup per file."""

    def __init__(self) -> None:
        self._open: dict[tuple[int, int], list[tuple[str, str]]] = {}
        me = str(os.getpid())
        try:
            pids = [e.name for e in os.scandir("/proc") if e.name.isdigit() and e.name != me]
        except OSError:
            return
        for pid in pids:
            try:
                with os.scandir(f"/proc/{pid}/fd") as it:
                    fds = [e.name for e in it]
            except OSError:
                continue  # gone, or another user's
            for fd in fds:
                try:
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    self._open.setdefault((st.st_dev, st.st_ino), []).append((pid, fd))

    def writer(self, st: os.stat_result) -> str | None:
        """Who has the file ``st`` is the lstat of open for writing ("process PID (COMMAND)"),
        if any."""
        for pid, fd in self._open.get((st.st_dev, st.st_ino), ()):
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    flags = next((int(ln.split()[1], 8) for ln in f if ln.startswith("flags:")), 0)
                if flags & os.O_ACCMODE not in (os.O_WRONLY, os.O_RDWR):
                    continue
                with open(f"/proc/{pid}/comm") as f:
                    return f"process {pid} ({f.read().strip()})"
            except (OSError, ValueError):
                continue
        return None


def syncfs(path: Path | str) -> None:
    """Flush the file system holding ``path`` (falls back to a global sync)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc().syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device",
          stat.S_IFBLK: "a device", stat.S_IFDIR: "a directory"}  # fmt: skip


def special_kind(mode: int) -> str | None:
    """What a FIFO, a socket or a device is called in a message; None for anything else."""
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return _KINDS[stat.S_IFMT(mode)]
    return None


def open_regular(path: str | os.PathLike[str] | bytes) -> int:
    """A descriptor to read the regular file at ``path``, opened without following a symlink
    and without blocking: a FIFO put where a file was would block a plain open for reading
    until some writer came, forever. Anything but a regular file is an OSError (EINVAL, its
    strerror saying what is there)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = _KINDS.get(stat.S_IFMT(mode), "something else")
        raise OSError(errno.EINVAL, f"not a regular file but {what}", os.fsdecode(path))
    return fd


COPY_CHUNK = 1 << 20


def copy_hashed(read: Callable[[int], bytes], fd: int, size: int) -> tuple[str, int]:
    """Write to ``fd`` what ``read`` gives, up to ``size`` bytes and no more (a small file is
    one read, with no megabyte buffer allocated for it); the SHA-256 of what was written and
    its length, which the caller compares with the record: a source changed since its record
    fails that check, one that only grew past it gives the recorded bytes."""
    h, done = hashlib.sha256(), 0
    while done < size and (chunk := read(min(COPY_CHUNK, size - done))):
        h.update(chunk)
        done += len(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]
    return h.hexdigest(), done


AT_FDCWD = -100
RENAME_NOREPLACE = 1  # from <linux/fs.h>


def rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` in one step, failing with FileExistsError if ``dst`` exists
    (renameat2 with RENAME_NOREPLACE; os.rename would replace it). Where the file system or the C
    library lacks it: OSError with EINVAL or ENOSYS, nothing renamed."""
    libc = _libc()
    if not hasattr(libc, "renameat2"):
        raise OSError(errno.ENOSYS, "renameat2 is not available", src)
    if libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst),
                      RENAME_NOREPLACE) != 0:  # fmt: skip
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src, None, dst)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing these bytes of ``fd`` to disk now, without waiting for it:
    an fdatasync later finds little left to do, and the disk works while the rest of a big file
    arrives instead of after it. Only a hint: where the call is missing or fails, nothing
    happens."""
    libc = _libc()
    if hasattr(libc, "sync_file_range"):
        libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


# -- direct I/O -----------------------------------------------------------------------------------

DIRECT_ALIGN = 4096  # offsets, lengths and buffers of O_DIRECT writes: any device's logical block

_buffers = threading.local()


def open_direct(path: Path | str) -> int | None:
    """A second descriptor of an existing file that writes around the page cache (O_DIRECT),
    or None where the file system does not take direct I/O (tmpfs before Linux 6.6, some FUSE
    file systems): the caller then writes as usual."""
    flags = getattr(os, "O_DIRECT", 0)
    if not flags:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC | flags)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


def pwrite_direct(fd: int, data: bytes | memoryview, offset: int) -> bool:
    """Write ``data`` at ``offset`` through a descriptor from ``open_direct``: the bytes go from
    this thread's aligned buffer to the disk, without a copy in the page cache to write back
    later. A last piece whose length is not a multiple of DIRECT_ALIGN is padded with zeros, so
    the file can end up to DIRECT_ALIGN - 1 bytes too long: the caller truncates it to its
    size. False, with nothing written, when this offset or this file system does not allow it
    (write it the usual way then)."""
    if offset % DIRECT_ALIGN:
        return False
    n = len(data)
    padded = -(-n // DIRECT_ALIGN) * DIRECT_ALIGN
    buf = getattr(_buffers, "buf", None)
    if buf is None or len(buf) < padded:
        buf = _buffers.buf = mmap.mmap(-1, max(padded, 1 << 20))  # page-aligned, reused
    view = memoryview(buf)
    try:
        view[:n] = data
        if padded > n:
            view[n:padded] = bytes(padded - n)
        try:
            done = os.pwrite(fd, view[:padded], offset)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return False  # an alignment this device does not take
            raise
    finally:
        view.release()
    if done != padded:
        # (A regular file takes less only when its disk is full.)
        raise OSError(errno.ENOSPC, f"only {done} of {padded} bytes written")
    return True
