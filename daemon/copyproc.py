"""A second process that copies the content of new files from a replica on this machine.

A one-shot sync into an empty replica spends about half its time in the system calls of copying
each file (open the source, an unnamed temporary file in the target directory, read, hash,
write, chmod, utime), the rest in bookkeeping (planning, checks, the database). Threads cannot
run the two side by side (the GIL hands itself over at every one of those calls; a trial made
the sync 70% slower); a second process can, on the second core.

The applier sends it, for each new file, the source's path, the target directory and what the
record says (size, SHA-256, mode, mtime); it answers in the same order with the descriptor of a
filled and checked unnamed temporary file (passed over the Unix socket), or with a failure, and
the applier then does everything else as for a file it wrote itself: made durable, linked to
its name, recorded. A failure is not explained here: the applier copies that file itself, which
fails again the usual way (or succeeds: a target directory that refuses unnamed files).

The process is forked, so it starts in a few milliseconds with nothing to import. Fork only
while no other thread of this process runs (a lock another thread held would stay held in the
child): the command line's sync is one thread, and the applier forks it while none of its own
runs. It touches nothing of its parent's but the socket, and leaves at the end of the socket
(the parent closing it, exiting or being killed).
"""

from __future__ import annotations

import functools
import logging
import os
import select
import signal
import socket

import msgpack

from .diskio import copy_hashed, open_regular

log = logging.getLogger(__name__)

CHUNK_JOBS = 32  # files per message, each way
CHUNK_BYTES = 64 << 10  # and at most about this much (a SEQPACKET message must fit the buffer)
MAX_MESSAGE = 1 << 20


class CopyProcess:
    """The parent's end. ``submit`` queues a job and returns its number; ``take`` returns the
    descriptor of a job (or None: it failed, or the process is gone) once it is done, and the
    caller owns it. Jobs are done in the order they are submitted."""

    def __init__(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child: coverage does not follow it)
            code = 1
            try:
                mine.close()
                _serve(theirs)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        self._sock = mine
        self._next = 0
        self._unsent: list[list] = []
        self._unsent_bytes = 0
        self._done: dict[int, int | None] = {}
        self._answered = 0  # jobs answered so far (in order)
        self._sent = 0
        self._lost = False

    def submit(self, source: bytes, target_dir: bytes, size: int, sha256: str, mode: int,
               mtime_ns: int) -> int:  # fmt: skip
        n = self._next
        self._next += 1
        self._unsent.append([source, target_dir, size, sha256, mode, mtime_ns])
        self._unsent_bytes += len(source) + len(target_dir) + 100
        if len(self._unsent) >= CHUNK_JOBS or self._unsent_bytes >= CHUNK_BYTES:
            self._send()
        return n

    def take(self, job: int) -> int | None:
        """The descriptor job ``job`` made, or None; waits for it if need be."""
        if job >= self._sent:
            self._send()
        while job not in self._done and not self._lost:
            self._receive(block=True)
        return self._done.pop(job, None)

    def close(self) -> None:
        """End the process and let go of every descriptor not taken."""
        for fd in self._done.values():
            if fd is not None:
                os.close(fd)
        self._done.clear()
        self._sock.close()  # the child reads the end and leaves
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass

    def _send(self) -> None:
        if not self._unsent or self._lost:
            self._unsent, self._unsent_bytes = [], 0
            return
        msg = msgpack.packb(self._unsent)
        while True:
            # Never blocked on a send while the child waits to send an answer: read answers
            # whenever the socket is full.
            try:
                self._sock.send(msg, socket.MSG_DONTWAIT)
                break
            except BlockingIOError:
                select.select([self._sock], [self._sock], [])
                self._receive(block=False)
            except OSError as e:
                log.info("copy process: %s; copying in this process", e.strerror)
                self._lost = True
                break
        self._sent += len(self._unsent)
        self._unsent, self._unsent_bytes = [], 0

    def _receive(self, block: bool) -> None:
        try:
            flags = socket.MSG_CMSG_CLOEXEC | (0 if block else socket.MSG_DONTWAIT)
            msg, fds, _flags, _addr = socket.recv_fds(self._sock, MAX_MESSAGE, CHUNK_JOBS, flags)
        except BlockingIOError:
            return
        except OSError:
            msg, fds = b"", []
        if not msg:
            if not self._lost:
                log.info("copy process %d ended; copying in this process", self.pid)
            self._lost = True  # the child died: what it did not answer is copied by the caller
            for fd in fds:
                os.close(fd)
            return
        given = iter(fds)
        for ok in msgpack.unpackb(msg):
            self._done[self._answered] = next(given) if ok else None
            self._answered += 1


def _serve(sock: socket.socket) -> None:  # pragma: no cover (runs in the child)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it, by closing the socket
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    while msg := sock.recv(MAX_MESSAGE):
        answers, fds = [], []
        for job in msgpack.unpackb(msg):  # [source, target dir, size, sha256, mode, mtime_ns]
            try:
                fd = _copy(*job)
            except (OSError, ValueError):
                answers.append(False)
            else:
                answers.append(True)
                fds.append(fd)
        try:
            socket.send_fds(sock, [msgpack.packb(answers)], fds)
        finally:
            for fd in fds:
                os.close(fd)


def _copy(source: bytes, target_dir: bytes, size: int, sha256: str, mode: int,
          mtime_ns: int) -> int:  # fmt: skip  # pragma: no cover (runs in the child)
    """An unnamed temporary file in ``target_dir`` holding ``source``'s first ``size`` bytes,
    which must hash to ``sha256``, with ``mode`` and ``mtime_ns``; the open descriptor."""
    src = open_regular(source)
    try:
        fd = os.open(target_dir, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            sha, done = copy_hashed(functools.partial(os.read, src), fd, size)
            if (sha, done) != (sha256, size):
                raise ValueError("not the recorded content")
            os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        except BaseException:
            os.close(fd)
            raise
    finally:
        os.close(src)
    return fd
