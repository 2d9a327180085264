"""Content transfer: files read from peers block by block, and block requests served to them.

The receiving side: ``Transfers.prefetch`` takes the files a page will write, in the order the
applier will write them, and keeps many block requests in flight so a link runs at disk speed;
``Transfers.open`` gives the applier a reader for one file. A block is used from a local source
when one has it (the old version of the same file, or the partial file a cut transfer left
behind), else fetched; every block is checked against its SHA-256 before it is used (the applier
then checks the whole file). Big files are also written to ``partial/<sha256>`` in the state
directory as blocks arrive, so a transfer cut by a crash or a lost peer resumes where it stopped.
Checking and writing those blocks is handed to two worker threads (hashlib and pwrite let go of
the GIL), so that while they hash and write, the daemon's loop goes on receiving. Where the file
system allows it they write with direct I/O: a big file costs no copy into the page cache and
leaves no dirty pages to flush, which on a machine short of CPU is most of the cost of writing it.

The serving side: ``serve`` reads a block range of any local file whose recorded content has the
asked-for hash and is still intact on disk.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..protocol.messages import INLINE_MAX, MAX_FILES, Blocks, Error, Files, GetBlocks, GetFiles
from ..protocol.record import DIGEST_SIZE, MIN_BLOCK, Kind, Record, block_size_for
from .diskio import (
    free_bytes,
    human_size,
    open_direct,
    open_regular,
    pwrite_direct,
    start_writeback,
)
from .errors import PeerLost, ReplError
from .store import Store

log = logging.getLogger(__name__)

REQUEST_BYTES = 1 << 20  # one request asks for up to this much of one file
MAX_IN_FLIGHT = 64  # requests
BATCH_FILES = 64  # small files (INLINE_MAX or less) asked for in one GetFiles...
BATCH_BYTES = 256 << 10  # ...and at most this much of them
BATCHES_IN_FLIGHT = 4
MAX_BUFFERED = 16 << 20  # bytes requested or received and not yet written: bounds memory
PARTIAL_MIN = 4 << 20  # files this big keep a resumable partial copy
STALL_TIMEOUT = 30.0  # seconds without any reply before a transfer is given up
SPOOL_WORKERS = 2  # threads checking and writing blocks of big files
SPOOL_AHEAD = 8  # chunks of one file handed to them and not yet written (memory: 8 MiB)
PARTIAL_MAX_AGE = 7 * 24 * 3600  # seconds untouched before a partial file is given up on
GONE_FILES = 64  # files a page deletes whose blocks may be taken for its new files
BIG_PLAN_BLOCKS = 4096  # a file of more blocks is planned only if the disk has room for it


@dataclass
class TransferStats:
    fetched_bytes: int = 0
    reused_bytes: int = 0  # blocks taken from local files instead of fetched
    resumed_bytes: int = 0  # blocks taken from a partial file of a cut transfer
    files: int = 0

    @property
    def arrived_bytes(self) -> int:
        """Content that is here, however it came."""
        return self.fetched_bytes + self.reused_bytes + self.resumed_bytes


@dataclass
class _Chunk:
    offset: int
    length: int
    local: tuple[str, int] | None = None  # (absolute path, offset) of a local copy to try first
    inline: bytes | None = None  # the content, sent inside the page of records (a small file)
    req: int = 0  # the request that asked for it last


@dataclass
class _File:
    rec: Record
    hint: str  # the path to ask the peer for
    chunks: list[_Chunk]
    partial: Path | None = None
    requested: int = 0  # chunks requested so far (in order)
    done: bool = False  # opened or dropped: request nothing more for it


@dataclass
class _Request:
    req: int
    file: _File
    chunk: _Chunk
    sent: float
    data: bytes | None = None
    error: str = ""
    link_trouble: bool = False  # the error is the link's (gone, mute), not this file's
    batch: int = 0  # the GetFiles that asked for it with other small files, if one did


Send = Callable[[GetBlocks], bool]
Pump = Callable[[float], None]


@dataclass
class Link:
    """What a transfer needs of a peer link: a way to send requests and to wait for replies."""

    name: str
    send: Send
    alive: Callable[[], bool]


class Transfers:
    def __init__(self, store: Store, root: Path, partial_dir: Path, pump: Pump):
        self.store = store
        self.root = str(root)
        self.partial_dir = partial_dir
        self.pump = pump  # runs the daemon's loop for up to N seconds (replies arrive through it)
        self.stats = TransferStats()
        self._queue: deque[_File] = deque()  # files the applier will open, in order
        self._to_request: deque[_File] = deque()  # files with chunks not yet requested
        self._requests: OrderedDict[int, _Request] = OrderedDict()
        self._batches: dict[int, list[int]] = {}  # GetFiles in flight -> its files' requests
        self._batched = 0  # requests that belong to one of those
        self._next_req = 1
        self._buffered = 0
        self._workers: ThreadPoolExecutor | None = None
        self._link: Link | None = None
        self.stopping = False  # set on SIGTERM: finish the current file, fetch no more
        self.direct = True  # big files are written with direct I/O until that fails once
        self.versions_dir: Path | None = None  # where removed files are kept (for a message)
        self._forget_stale_partials()
        # Which version of a path has a partial file (path -> SHA-256), noted beside it in
        # partial/<sha256>.path so that it outlives a restart: a partial of a version that
        # was replaced or deleted since is of no use, and is deleted (see forget).
        self._partial_of: dict[str, str] = {}
        self._load_partial_paths()

    def _forget_stale_partials(self) -> None:
        """Partial files of transfers that never finished (the file changed again, was deleted,
        or its peer never came back) are kept for a resume for a week, then deleted."""
        old = time.time() - PARTIAL_MAX_AGE
        gone = 0
        try:
            entries = list(os.scandir(self.partial_dir))
        except OSError:
            return
        for e in entries:
            try:
                if e.is_file(follow_symlinks=False) and e.stat().st_mtime < old:
                    os.unlink(e.path)
                    gone += not e.name.endswith(".path")  # (a note beside a partial file)
            except OSError:
                pass
        if gone:
            log.info("deleted %d partial file(s) untouched for %d days in %s",
                     gone, PARTIAL_MAX_AGE // 86400, self.partial_dir)  # fmt: skip

    def no_direct(self, why: str) -> None:
        """Direct I/O does not work here: write big files through the page cache from now on."""
        if self.direct:
            self.direct = False
            log.info("%s: big files are written through the page cache", why)

    def _load_partial_paths(self) -> None:
        try:
            entries = [e for e in os.scandir(self.partial_dir) if e.name.endswith(".path")]
        except OSError:
            return
        for e in entries:
            sha = e.name.removesuffix(".path")
            try:
                if os.path.exists(self.partial_dir / sha):
                    self._partial_of[Path(e.path).read_text(encoding="utf-8",
                                                            errors="surrogateescape")] = sha
                else:
                    os.unlink(e.path)
            except OSError:
                pass

    def _note_partial(self, path: str, sha: str) -> None:
        """A partial file of ``sha`` is being written for ``path``: one of another version of
        the same path is of no use any more."""
        old = self._partial_of.get(path)
        if old == sha:
            return
        self._partial_of[path] = sha
        if old is not None:
            self._drop_partial(old)
        note = self.partial_dir / f"{sha}.path"
        try:
            # Owner-only, as the partial file: a path names what the tree holds.
            fd = os.open(note, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with open(fd, "wb") as f:
                f.write(path.encode("utf-8", "surrogateescape"))
        except OSError:
            pass  # only a note: without it the partial still goes after a week

    def _drop_partial(self, sha: str) -> None:
        """Delete the partial file of ``sha``, unless a path still wants that version."""
        if sha in self._partial_of.values() or any(f.rec.sha256 == sha for f in self._queue):
            return
        for name in (sha, f"{sha}.path"):
            try:
                os.unlink(self.partial_dir / name)
            except OSError:
                pass

    def forget(self, path: str) -> None:
        """A version of ``path`` was applied (a file, a deletion, anything): a partial file of
        another version of it is of no use, and one of this version is complete or in place."""
        old = self._partial_of.pop(path, None)
        if old is not None:
            self._drop_partial(old)

    # -- planning -------------------------------------------------------------------------------

    def prefetch(self, link: Link, files: list[tuple[Record, str]],
                 content: dict[str, bytes] | None = None,
                 gone: list[Record] | None = None) -> None:  # fmt: skip
        """The files (record, path at the peer) that the applier will ask for, in order, the
        content of some small ones that came with their records (by SHA-256), and the files
        the same page deletes (their tombstones): blocks of the files they delete here may be
        in the new ones (a file moved and edited at once, which its replica saw as a new file
        and a deletion; a file deleted and written again)."""
        self.reset()
        self._link = link
        spare = self._blocks_of_gone(gone) if gone and files else {}
        for rec, hint in files:
            if rec.kind is Kind.FILE and rec.size:
                f = self._plan(rec, hint, content, spare)
                self._queue.append(f)
                self._to_request.append(f)
        self._issue()

    def workers(self) -> ThreadPoolExecutor:
        if self._workers is None:
            self._workers = ThreadPoolExecutor(SPOOL_WORKERS, thread_name_prefix="repld-spool")
        return self._workers

    def close(self) -> None:
        """Let the worker threads go (every reader waits for its own blocks before it closes)."""
        if self._workers is not None:
            self._workers.shutdown(wait=True)
            self._workers = None

    def reset(self) -> None:
        self._queue.clear()
        self._to_request.clear()
        self._requests.clear()
        self._batches.clear()
        self._batched = 0
        self._buffered = 0

    def _blocks_of_gone(self, gone: list[Record]) -> dict[int, dict[bytes, tuple[str, int]]]:
        """Where the blocks of the files that ``gone`` deletes are here: block size -> digest
        -> (absolute path, offset). Only files of more than one block (a single block changed
        is a new block), the biggest GONE_FILES of them."""
        spare: dict[int, dict[bytes, tuple[str, int]]] = {}
        big = sorted((r for r in gone if r.size > MIN_BLOCK), key=lambda r: -r.size)
        for r in big[:GONE_FILES]:
            old = self.store.get(r.path)
            if old is None or old.deleted or old.kind is not Kind.FILE or not old.blocks:
                continue
            bs = block_size_for(old.size)
            where = spare.setdefault(bs, {})
            abs_old = os.path.join(self.root, old.path)
            for i in range(0, len(old.blocks), DIGEST_SIZE):
                where.setdefault(old.blocks[i : i + DIGEST_SIZE], (abs_old, i // DIGEST_SIZE * bs))
        return spare

    def _plan(self, rec: Record, hint: str, content: dict[str, bytes] | None = None,
              spare: dict[int, dict[bytes, tuple[str, int]]] | None = None) -> _File:  # fmt: skip
        data = content.get(rec.sha256) if content else None
        if data is not None and len(data) == rec.size:
            return _File(rec, hint, [_Chunk(0, rec.size, inline=data)])
        bs = block_size_for(rec.size)
        if rec.size > bs * BIG_PLAN_BLOCKS:
            # (Planned block by block, a record that claims a size no disk here holds would
            # take the loop minutes and gigabytes: a hostile peer's, 2**62 bytes. The reader
            # says there is no room, see _Reader.)
            free = free_bytes(self.root)
            if free is not None and free < rec.size:
                return _File(rec, hint, [], done=True)
        digests = [rec.blocks[i : i + DIGEST_SIZE] for i in range(0, len(rec.blocks), DIGEST_SIZE)]
        nblocks = (rec.size + bs - 1) // bs
        local: dict[bytes, tuple[str, int]] = {}
        old = self.store.get(rec.path)
        if old is not None and not old.deleted and old.kind is Kind.FILE and old.blocks:
            if block_size_for(old.size) == bs:
                abs_old = os.path.join(self.root, old.path)
                for i in range(0, len(old.blocks), DIGEST_SIZE):
                    local.setdefault(
                        old.blocks[i : i + DIGEST_SIZE], (abs_old, i // DIGEST_SIZE * bs)
                    )
        partial = None
        held: list[tuple[int, int]] = []  # what a partial file of a cut transfer holds
        if rec.size >= PARTIAL_MIN:
            partial = self.partial_dir / rec.sha256
            held = _data_ranges(partial)
        chunks: list[_Chunk] = []
        for i in range(nblocks):
            off, length = i * bs, min(bs, rec.size - i * bs)
            d = digests[i] if len(digests) == nblocks else b""
            src = local.get(d) if d else None
            if src is None and d and spare and bs in spare:
                src = spare[bs].get(d)
            if src is None and partial is not None and _within(held, off, length):
                src = (str(partial), off)
            if src is not None:
                chunks.append(_Chunk(off, length, src))
            elif (
                chunks and chunks[-1].local is None and chunks[-1].length + length <= REQUEST_BYTES
            ):
                chunks[-1].length += length  # coalesce neighbouring remote blocks
            else:
                chunks.append(_Chunk(off, length))
        return _File(rec, hint, chunks, partial)

    # -- requests -------------------------------------------------------------------------------

    def _issue(self) -> None:
        link = self._link
        if link is None:
            return
        while self._to_request:
            f = self._to_request[0]
            if _small(f):
                if len(self._batches) >= BATCHES_IN_FLIGHT or self._buffered >= MAX_BUFFERED:
                    return
                self._request_files()
                continue
            while f.requested < len(f.chunks) and not f.done:
                if (len(self._requests) - self._batched >= MAX_IN_FLIGHT
                        or self._buffered >= MAX_BUFFERED):  # fmt: skip
                    return
                chunk = f.chunks[f.requested]
                f.requested += 1
                if chunk.local is not None or chunk.inline is not None:
                    continue  # read when written, fetched only if that copy fails
                self._request(f, chunk)
            self._to_request.popleft()

    def _request(self, f: _File, chunk: _Chunk) -> _Request:
        assert self._link is not None
        req = self._next_req
        self._next_req += 1
        r = _Request(req, f, chunk, time.monotonic())
        self._requests[req] = r
        chunk.req = req
        self._buffered += chunk.length
        ok = self._link.send(GetBlocks(req, f.rec.sha256, f.hint, chunk.offset, chunk.length))
        if not ok:
            r.error = f"cannot send to {self._link.name}"
            r.link_trouble = True
        return r

    def _request_files(self) -> None:
        """One GetFiles for the small files at the head of the queue (see _small)."""
        assert self._link is not None
        batch = self._next_req
        self._next_req += 1
        asked: list[tuple[str, str]] = []
        reqs: list[int] = []
        size = 0
        now = time.monotonic()
        while self._to_request and len(asked) < min(BATCH_FILES, MAX_FILES):
            f = self._to_request[0]
            if not _small(f) or (asked and size + f.rec.size > BATCH_BYTES):
                break
            self._to_request.popleft()
            f.requested = 1
            r = _Request(self._next_req, f, f.chunks[0], now, batch=batch)
            self._next_req += 1
            self._requests[r.req] = r
            f.chunks[0].req = r.req
            self._buffered += r.chunk.length
            self._batched += 1
            asked.append((f.rec.sha256, f.hint))
            reqs.append(r.req)
            size += f.rec.size
        self._batches[batch] = reqs
        if not self._link.send(GetFiles(batch, tuple(asked))):
            for req in reqs:
                self._requests[req].error = f"cannot send to {self._link.name}"
                self._requests[req].link_trouble = True

    def _files_arrived(self, reqs: list[int], reply: Files | Error) -> None:
        if isinstance(reply, Error) or len(reply.sizes) != len(reqs):
            why = (reply.message if isinstance(reply, Error)
                   else f"{len(reply.sizes)} files sent for {len(reqs)} asked")  # fmt: skip
            for req in reqs:
                if (r := self._requests.get(req)) is not None:
                    r.error = why
            return
        view = memoryview(reply.data)
        at = 0
        for req, size in zip(reqs, reply.sizes, strict=True):
            piece = None if size < 0 else view[at : at + size]
            at += max(size, 0)
            r = self._requests.get(req)
            if r is None:
                continue  # given up on meanwhile
            if piece is None:
                r.error = VERSION_GONE
            else:
                r.data = piece  # type: ignore[assignment]  # (a view of the reply: no copy)
                self.stats.fetched_bytes += size

    def arrived(self, reply: Blocks | Files | Error) -> None:
        reqs = self._batches.pop(reply.req, None)
        if reqs is not None:
            if isinstance(reply, (Files, Error)):
                self._files_arrived(reqs, reply)
            return
        if isinstance(reply, Files):
            return  # (a reply to a batch given up on)
        r = self._requests.get(reply.req)
        if r is None:
            return  # a reply to a request given up on
        if isinstance(reply, Error):
            r.error = reply.message
        else:
            r.data = reply.data
            self.stats.fetched_bytes += len(reply.data)

    # -- the applier's side ---------------------------------------------------------------------

    def open(self, rec: Record, hint: str) -> _Reader:
        if self.stopping:
            raise ReplError(f"{rec.path}: {STOPPING}")
        # Files before this one in the queue were skipped by the applier: drop their requests.
        while self._queue and self._queue[0].rec is not rec:
            if self._queue[0].rec.sha256 == rec.sha256 and self._queue[0].hint == hint:
                break
            self._drop(self._queue.popleft())
        if self._queue:
            f = self._queue.popleft()
        else:
            f = self._plan(rec, hint)
        try:
            return _Reader(self, f)
        except ReplError:
            self._drop(f)  # (requests sent ahead for it)
            raise

    def _drop(self, f: _File) -> None:
        f.done = True
        for req, r in list(self._requests.items()):
            if r.file is f:
                self._buffered -= r.chunk.length
                self._batched -= r.batch != 0
                del self._requests[req]

    def _wait(self, f: _File, chunk: _Chunk) -> bytes:
        """The data of a remote chunk of the current file, requesting it if need be."""
        r = self._requests.get(chunk.req)
        if r is None or r.chunk is not chunk:
            r = self._request(f, chunk)
        req = r.req
        link = self._link
        last = time.monotonic()
        seen = self.stats.fetched_bytes
        while r.data is None and not r.error:
            if link is None or not link.alive():
                r.error = f"lost the connection to {link.name if link else 'the peer'}"
                r.link_trouble = True
                break
            self._issue()
            self.pump(0.5)
            if self.stats.fetched_bytes != seen:
                seen, last = self.stats.fetched_bytes, time.monotonic()
            elif time.monotonic() - last > STALL_TIMEOUT:
                r.error = f"{link.name} sent nothing for {STALL_TIMEOUT:g} s"
                r.link_trouble = True
        del self._requests[req]
        self._buffered -= chunk.length
        self._batched -= r.batch != 0
        self._issue()
        if r.error and (link is None or not link.alive() or r.link_trouble):
            # The peer is gone or mute: the rest of the page would fail file by file.
            raise PeerLost(r.error)
        if r.error:
            raise ReplError(f"{f.rec.path}: {r.error}")
        assert r.data is not None
        if len(r.data) != chunk.length:
            raise ReplError(f"{f.rec.path}: {len(r.data)} bytes sent for {chunk.length} asked")
        return r.data


class _Reader:
    """A file-like object the applier reads a remote file's content from, block by block.

    A big file is also written, block by block, to its partial file (``spool``): that copy lets
    a cut transfer resume, and once every block is in it the applier can take it whole
    (``take_spool``) instead of writing the same bytes a second time.
    """

    def __init__(self, transfers: Transfers, f: _File):
        self.t = transfers
        self.f = f
        self.bs = block_size_for(f.rec.size)
        self.i = 0
        self._partial_fd: int | None = None
        self._closed = False
        self._jobs: deque[Future[None]] = deque()  # blocks being checked and spooled
        self._failed = False  # a block was refused or not written: the spool has a gap
        # Whether every block read so far was checked against its recorded hash: then the
        # content is the sender's, and hashing the whole file again proves nothing new.
        self.blocks_checked = len(f.rec.blocks) == DIGEST_SIZE * (
            (f.rec.size + self.bs - 1) // self.bs
        )
        # The same file opened for direct I/O (O_DIRECT), where the file system allows it: the
        # blocks of a big file go to the disk without a copy in the page cache (no copy to make,
        # no dirty pages to write back later, and what is in the cache for everything else stays).
        self._direct_fd: int | None = None
        self._no_room = False  # a write to the partial file found its disk full
        if f.partial is not None and not _room_for(f.partial, f.rec.size):
            # The partial file only makes a cut transfer resumable: without room for it in
            # the state directory, the file is written straight into the tree (as small files
            # are), checked block by block as it arrives.
            log.info("%s: no room for a resumable copy in %s (%d bytes); fetching it straight "
                     "into the tree", f.rec.path, f.partial.parent, f.rec.size)  # fmt: skip
            transfers.forget(f.rec.path)  # whatever partial copy the path had
            transfers._drop_partial(f.rec.sha256)  # and one of this version: room matters more
            f.partial = None
        if f.rec.size > INLINE_MAX and not _in_place(f.partial, transfers.root):
            # Written straight into the tree, or copied there from another disk, the new version
            # takes its whole size there (beside the old one until it is renamed over it).
            # Without that room, fetching it would only fill the disk and fail, and every retry
            # would fetch it again.
            free = free_bytes(transfers.root)
            if free is not None and free < f.rec.size:
                raise ReplError(
                    f"{f.rec.path}: no room for it in {transfers.root} ({human_size(f.rec.size)} "
                    f"needed, {human_size(free)} free); it is fetched once there is room"
                    + _versions_hint(transfers.versions_dir, transfers.root)
                )
        if f.partial is not None:
            f.partial.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._partial_fd = os.open(f.partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            transfers._note_partial(f.rec.path, f.rec.sha256)
            if transfers.direct:
                try:
                    self._direct_fd = open_direct(f.partial)
                except OSError:
                    self._direct_fd = None
                if self._direct_fd is None:
                    transfers.no_direct(f"{f.partial.parent} does not take direct I/O")

    def _digest(self, offset: int) -> bytes:
        i = offset // self.bs * DIGEST_SIZE
        return self.f.rec.blocks[i : i + DIGEST_SIZE]

    def _verified(self, offset: int, data: bytes) -> bool:
        """Every block in ``data`` (which starts at ``offset``) has its recorded hash."""
        view = memoryview(data)
        for at in range(0, len(data), self.bs):
            # (A record without block hashes has blocks_checked False from the start.)
            want = self._digest(offset + at)
            if want and hashlib.sha256(view[at : at + self.bs]).digest() != want:
                return False
        return True

    def _local(self, chunk: _Chunk) -> bytes | None:
        assert chunk.local is not None
        path, offset = chunk.local
        try:
            fd = open_regular(path)
        except OSError:
            return None
        try:
            data = os.pread(fd, chunk.length, offset)
        finally:
            os.close(fd)
        if len(data) != chunk.length or not self._verified(chunk.offset, data):
            return None
        return data

    def read(self, n: int = -1) -> bytes:
        if self.i >= len(self.f.chunks):
            return b""
        chunk = self.f.chunks[self.i]
        self.i += 1
        if chunk.inline is not None:
            data, chunk.inline = chunk.inline, None
            if self._verified(chunk.offset, data):
                self.t.stats.fetched_bytes += len(data)
                self._spool(data, chunk.offset, check=False)
                return data
            # Not what its record says (the peer is wrong): asked for like any other.
        data = self._local(chunk) if chunk.local is not None else None
        if data is not None:
            if self.f.partial is not None and chunk.local and chunk.local[0] == str(self.f.partial):
                self.t.stats.resumed_bytes += len(data)  # already in the partial file
            else:
                self.t.stats.reused_bytes += len(data)
                self._spool(data, chunk.offset, check=False)  # checked by _local
            return data
        data = self.t._wait(self.f, chunk)
        if self._partial_fd is None:
            self._check(data, chunk.offset)
        else:
            # Checked on a worker, and written only if good: the applier adopts the spool only
            # after take_spool has waited for every block; one that used the bytes instead
            # (a spool on another file system) checks the whole file's hash itself.
            self._spool(data, chunk.offset, check=True)
        return data

    def _check(self, data: bytes, offset: int) -> None:
        if not self._verified(offset, data):
            raise ReplError(f"{self.f.rec.path}: a block from the peer does not match its hash")

    def _spool(self, data: bytes, offset: int, *, check: bool) -> None:
        """Hand a block to the workers to check (``check``) and write to the spool; an error of
        an earlier block is raised here, or by ``take_spool``."""
        if self._partial_fd is None:
            return
        while len(self._jobs) >= SPOOL_AHEAD:
            self._done(self._jobs.popleft())
        self._jobs.append(self.t.workers().submit(self._spool_job, data, offset, check))

    def _spool_job(self, data: bytes, offset: int, check: bool) -> None:
        if check:
            self._check(data, offset)
        try:
            self._write_spool(data, offset)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self._no_room = True
            raise ReplError(f"{self.f.rec.path}: no room left in {self.f.partial.parent} for "
                            f"its partial copy ({e.strerror}); the next try fetches it "
                            "straight into the tree if there is room there") from None

    def _write_spool(self, data: bytes, offset: int) -> None:
        direct = self._direct_fd
        if direct is not None and self.t.direct:
            if pwrite_direct(direct, data, offset):
                return
            self.t.no_direct(f"{self.f.partial}: a direct write at {offset} was refused")
        fd = self._partial_fd
        assert fd is not None  # closed only once every job is done
        done = os.pwrite(fd, data, offset)
        if done != len(data):  # (a regular file takes less only when its disk is full)
            raise OSError(errno.ENOSPC, f"only {done} of {len(data)} bytes written")
        start_writeback(fd, offset, len(data))

    def _done(self, job: Future[None]) -> None:
        try:
            job.result()
        except BaseException:
            self._failed = True
            raise

    def _settle(self) -> None:
        """Wait for every block handed to the workers; raise the first one's error."""
        error: BaseException | None = None
        while self._jobs:
            try:
                self._done(self._jobs.popleft())
            except BaseException as e:  # noqa: BLE001 - every job is waited for, then raised
                error = error or e
        if error is not None:
            raise error

    def _close_direct(self) -> None:
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None

    @property
    def spool(self) -> Path | None:
        """The partial file this reader writes, until ``take_spool`` hands it over."""
        return self.f.partial

    def take_spool(self) -> Path:
        """Hand over the partial file, complete now (every block was read, so every block is in
        it, verified): the caller renames it into place, and it is no longer this reader's."""
        assert self.spool is not None and self.i >= len(self.f.chunks)
        self._settle()
        self._close_direct()
        if self._partial_fd is not None:
            if os.fstat(self._partial_fd).st_size > self.f.rec.size:
                os.ftruncate(self._partial_fd, self.f.rec.size)  # a padded direct write
            os.close(self._partial_fd)
            self._partial_fd = None
        spool, self.f.partial = self.f.partial, None
        return spool

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._partial_fd is not None:
            try:
                self._settle()  # no worker may write to a closed descriptor
            except Exception as e:  # noqa: BLE001 - the file itself fails or succeeds on its own
                log.warning("%s: partial copy %s incomplete: %s",
                            self.f.rec.path, self.f.partial, e)  # fmt: skip
            self._close_direct()
            os.close(self._partial_fd)
            self._partial_fd = None
            complete = self.i >= len(self.f.chunks) and not self._failed
            if (complete or self._no_room) and self.f.partial is not None:
                # (A partial copy that filled its disk is deleted too: the room matters more,
                # to this daemon's database first.)
                try:
                    os.unlink(self.f.partial)  # complete: the applier has the whole file
                except OSError:
                    pass
        self.t.stats.files += 1

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _small(f: _File) -> bool:
    """A small file not asked for yet, none of it here: asked for whole, with others."""
    return (
        f.requested == 0 and not f.done and len(f.chunks) == 1 and f.rec.size <= INLINE_MAX
        and f.chunks[0].local is None and f.chunks[0].inline is None
    )  # fmt: skip


def _data_ranges(path: Path) -> list[tuple[int, int]]:
    """The (start, end) byte ranges of ``path`` that hold data, holes left out (blocks of a
    partial file are written as they come, two at a time, so a cut one may have holes): only
    those are read back, and the rest is fetched in full-sized requests, many in flight."""
    try:
        fd = open_regular(path)
    except OSError:
        return []
    ranges: list[tuple[int, int]] = []
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break  # no data after pos
                return [(0, size)]  # no SEEK_DATA here: take it all as written
            end = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, end))
            pos = end
    except OSError:
        return []
    finally:
        os.close(fd)
    return ranges


def _within(ranges: list[tuple[int, int]], offset: int, length: int) -> bool:
    return any(start <= offset and offset + length <= end for start, end in ranges)


STOPPING = "not fetched, repld is stopping; the next start takes it"

# Why a block request was refused when the file changed on the peer after its record was sent:
# nothing wrong, the newer version's record follows (the node logs it quietly).
VERSION_GONE = (
    "the peer has that version no more (changed or deleted since); the newer one comes next"
)
# (What follows VERSION_GONE in status: a peer that holds back a mass deletion has the files
# gone from disk and their records alive, and no newer record comes until it is settled.)
UNLESS_HELD = (
    ", unless the peer holds its deletion back (its mass-delete circuit breaker: `repld status` "
    "there says so)"
)

ROOM_SPARE = 64 << 20  # bytes a partial file leaves free on its file system


def _room_for(partial: Path, size: int) -> bool:
    """Whether the file system of ``partial`` has room for the rest of it, and some to spare
    (the database lives there too)."""
    try:
        have = os.stat(partial).st_size
    except OSError:
        have = 0
    free = free_bytes(partial.parent if partial.parent.exists() else partial.parent.parent)
    # (Cannot tell: try, and a full disk is handled when it comes.)
    return free is None or free >= size - have + ROOM_SPARE


def _versions_hint(versions: Path | None, root: str) -> str:
    """For a "no room" message: the versions kept on the tree's disk take room there too."""
    try:
        if versions is None or os.stat(versions).st_dev != os.stat(root).st_dev:
            return ""
        with os.scandir(versions) as it:
            if next(it, None) is None:
                return ""
    except OSError:
        return ""
    return (f" (files removed here are kept on that disk too, in {versions}: `repld versions` "
            "lists them, `repld versions --delete` frees their room)")


def _in_place(partial: Path | None, root: Path) -> bool:
    """Whether a partial copy is on the tree's file system: then it is renamed into the tree
    when complete, and the room it needs was checked for it (``_room_for``)."""
    if partial is None:
        return False
    try:
        return os.stat(partial.parent).st_dev == os.stat(root).st_dev
    except OSError:
        return False


# -- serving --------------------------------------------------------------------------------------


def answer(store: Store, root: Path, req: GetBlocks | GetFiles) -> Blocks | Files | Error:
    """The reply to a peer's request for content."""
    if isinstance(req, GetFiles):
        return serve_files(store, root, req)
    return serve(store, root, req)


def serve(store: Store, root: Path, req: GetBlocks) -> Blocks | Error:
    """The asked-for bytes of a local file with that content, if one is intact on disk."""
    data = _content(store, root, req.sha256, req.path, store.get(req.path),
                    req.offset, req.length)  # fmt: skip
    return Error("gone", VERSION_GONE, req=req.req) if data is None else Blocks(req.req, data)


def serve_files(store: Store, root: Path, req: GetFiles) -> Files:
    """The whole content of each asked-for small file, as ``serve`` would give it (-1 for one
    not here as recorded any more)."""
    recs = store.get_many([path for _, path in req.files])
    sizes: list[int] = []
    parts: list[bytes] = []
    for sha, path in req.files:
        data = _content(store, root, sha, path, recs.get(path))
        sizes.append(-1 if data is None else len(data))
        if data:
            parts.append(data)
    return Files(req.req, tuple(sizes), b"".join(parts))


def _content(store: Store, root: Path, sha: str, path: str, rec: Record | None,
             offset: int = 0, length: int | None = None) -> bytes | None:  # fmt: skip
    """``length`` bytes at ``offset`` (None: the whole of a small file) of a local file whose
    recorded content is ``sha`` and is intact on disk: the one at ``path`` (its record ``rec``)
    if it still is, else any other, the file having been moved or copied since."""
    here = [rec] if rec is not None and not rec.deleted and rec.sha256 == sha else []
    for cand in itertools.chain(here, (o for o in store.live_with_hash(sha) if o.path != path)):
        if length is None and cand.size > INLINE_MAX:
            continue
        data = _read_intact(root, cand, offset, cand.size if length is None else length)
        if data is not None:
            return data
    return None


def inline_content(root: Path, rec: Record) -> bytes | None:
    """The content of a small file, to send inside the page of its record, if it is still on
    disk as recorded (else the peer asks for it as for any file, and hears why it is gone)."""
    if rec.deleted or not 0 < rec.size <= INLINE_MAX:
        return None
    return _read_intact(root, rec, 0, rec.size)


def _read_intact(root: Path, rec: Record, offset: int, length: int) -> bytes | None:
    if rec.kind is not Kind.FILE or offset + length > rec.size:
        return None
    try:
        fd = open_regular(os.path.join(root, rec.path))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        # (Not the ctime: a file scanned within a clock tick of its last change counts as
        # touched since, and would be refused until the next scan. The asker checks every
        # block's hash, and an edit that kept size and mtime is the scan's to find.)
        if (st.st_size, st.st_mtime_ns) != (rec.size, rec.mtime_ns):
            return None  # changed since it was scanned: the scan will announce the new version
        data = os.pread(fd, length, offset)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) == length else None
