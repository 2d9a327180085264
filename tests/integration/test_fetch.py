"""The receiving side of block transfers, on a real store and real files: a big file's blocks are
checked and written to its partial file by worker threads while more arrive, and a block that
does not match its hash is refused without ever reaching the partial file.

The peer is played by a function that answers each block request from a local copy of the
file (optionally corrupting one block), as the daemon's loop would deliver the replies.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest
from repld.daemon.errors import ReplError
from repld.daemon.fetch import (
    PARTIAL_MAX_AGE,
    PARTIAL_MIN,
    REQUEST_BYTES,
    SPOOL_AHEAD,
    Link,
    Transfers,
    _Reader,
)
from repld.daemon.store import Store
from repld.protocol.messages import Blocks, GetBlocks
from repld.protocol.record import Kind, Record, block_size_for
from repld.protocol.version import VersionVector

# A big file (kept resumable) of more requests than the workers take at once, ragged at the end.
SIZE = PARTIAL_MIN + (SPOOL_AHEAD + 4) * REQUEST_BYTES + 12345


def record_of(content: bytes) -> Record:
    bs = block_size_for(len(content))
    blocks = b"".join(
        hashlib.sha256(content[i : i + bs]).digest() for i in range(0, len(content), bs)
    )
    return Record(
        path="dir/big.bin", guid="g1", kind=Kind.FILE, version=VersionVector.of({"r1": 1}),
        mode=0o644, mtime_ns=1, size=len(content), sha256=hashlib.sha256(content).hexdigest(),
        blocks=blocks,
    )  # fmt: skip


class Peer:
    """Answers GetBlocks from ``content`` (``corrupt_at``: that byte flipped), delivering the
    replies when the transfer runs the daemon's loop (``pump``)."""

    def __init__(self, content: bytes, corrupt_at: int | None = None):
        self.content = content
        self.corrupt_at = corrupt_at
        self.replies: deque[Blocks] = deque()
        self.transfers: Transfers | None = None

    def send(self, req: GetBlocks) -> bool:
        data = bytearray(self.content[req.offset : req.offset + req.length])
        if self.corrupt_at is not None and req.offset <= self.corrupt_at < req.offset + req.length:
            data[self.corrupt_at - req.offset] ^= 0xFF
        self.replies.append(Blocks(req.req, bytes(data)))
        return True

    def pump(self, _timeout: float) -> None:
        assert self.transfers is not None
        while self.replies:
            self.transfers.arrived(self.replies.popleft())


@pytest.fixture
def stores() -> Iterator[list[Store]]:
    """Stores a test made, closed after it (each holds its lock file open)."""
    made: list[Store] = []
    yield made
    for store in made:
        store.close()


def open_fetch(
    tmp_path: Path, peer: Peer, stores: list[Store]
) -> tuple[Transfers, Record, _Reader]:
    store = Store.create(tmp_path / "state" / "repld.db")
    stores.append(store)
    t = Transfers(store, tmp_path / "root", tmp_path / "state" / "partial", peer.pump)
    peer.transfers = t
    rec = record_of(peer.content)
    t.prefetch(Link("peer", peer.send, lambda: True), [(rec, rec.path)])
    return t, rec, t.open(rec, rec.path)


def read_all(reader: _Reader) -> bytes:
    got = bytearray()
    while chunk := reader.read():
        got += chunk
    return bytes(got)


def test_a_big_file_is_checked_and_spooled_whole(tmp_path: Path, stores: list[Store]) -> None:
    content = os.urandom(SIZE)
    t, rec, reader = open_fetch(tmp_path, Peer(content), stores)
    got = read_all(reader)
    spool = reader.take_spool()
    reader.close()
    t.close()
    assert got == content
    assert spool.read_bytes() == content
    assert reader.blocks_checked  # every block was checked: no second pass over the file needed
    assert t.stats.fetched_bytes == len(content)
    # Written with direct I/O (the file system of tmp_path takes it), its padded last block
    # trimmed off again.
    assert t.direct


def test_a_file_system_without_direct_io_gets_the_same_file(
    tmp_path: Path, stores: list[Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    import repld.daemon.fetch as fetch

    monkeypatch.setattr(fetch, "open_direct", lambda path: None)  # as on such a file system
    content = os.urandom(SIZE)
    t, rec, reader = open_fetch(tmp_path, Peer(content), stores)
    while reader.read():
        pass
    spool = reader.take_spool()
    reader.close()
    t.close()
    assert spool.read_bytes() == content
    assert not t.direct


def test_without_room_for_a_partial_copy_the_file_is_fetched_without_one(
    tmp_path: Path, stores: list[Store]
) -> None:
    """The partial file only makes a transfer resumable: a state directory without room for
    it must not keep the file from coming (it is written straight into the tree)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    partial = tmp_path / "state" / "partial"
    partial.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(partial)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        content = os.urandom(SIZE)  # more than the 16 MiB there
        t, rec, reader = open_fetch(tmp_path, Peer(content), stores)
        assert reader.spool is None
        got = read_all(reader)
        reader.close()
        t.close()
        assert got == content
        assert os.listdir(partial) == []
    finally:
        subprocess.run(["umount", "-l", str(partial)], check=False)


def test_a_corrupt_block_is_refused_and_never_spooled(tmp_path: Path, stores: list[Store]) -> None:
    good = 3 * REQUEST_BYTES  # requests before the one with the bad byte
    bad = good + 7
    content = bytearray(os.urandom(SIZE))
    content[bad] = 0x00  # arrives as 0xFF; a hole in the partial file reads as 0x00
    t, rec, reader = open_fetch(tmp_path, Peer(bytes(content), corrupt_at=bad), stores)
    with pytest.raises(ReplError, match="does not match its hash"):
        while reader.read():
            pass
        reader.take_spool()
    reader.close()
    t.close()
    # The partial file stays for a resume, with the good blocks before the bad one in it, and
    # the bad block's bytes nowhere.
    spooled = (tmp_path / "state" / "partial" / rec.sha256).read_bytes()
    assert spooled[:good] == content[:good]
    assert len(spooled) <= bad or spooled[bad] == 0x00


def test_partial_files_untouched_for_a_week_are_deleted_at_start(tmp_path: Path) -> None:
    partial = tmp_path / "state" / "partial"
    partial.mkdir(parents=True)
    stale, recent = partial / ("a" * 64), partial / ("b" * 64)
    for f in (stale, recent):
        f.write_bytes(b"x" * 1000)
    week_ago = time.time() - PARTIAL_MAX_AGE - 60
    os.utime(stale, (week_ago, week_ago))
    with Store.create(tmp_path / "state" / "repld.db") as store:
        Transfers(store, tmp_path, partial, lambda _t: None)
    assert not stale.exists()
    assert recent.exists()  # a transfer that may still resume


def test_a_peer_gone_mid_file_stops_the_whole_apply_at_once(tmp_path: Path, stores: list[Store]):
    """A peer that ends the session (or goes silent) is the page's trouble, not each file's:
    PeerLost, which the applier does not turn into one error per file, and no 30 s wait."""
    from repld.daemon.errors import ApplyStopped, PeerLost

    content = os.urandom(SIZE)
    alive = [True]
    peer = Peer(content)
    store = Store.create(tmp_path / "state" / "repld.db")
    stores.append(store)
    t = Transfers(store, tmp_path / "root", tmp_path / "state" / "partial", lambda _t: None)
    peer.transfers = t
    rec = record_of(content)
    t.prefetch(Link("peer", lambda req: True, lambda: alive[0]), [(rec, rec.path)])
    reader = t.open(rec, rec.path)
    alive[0] = False  # the Bye arrives: no reply will come
    start = time.monotonic()
    with pytest.raises(PeerLost, match="lost the connection to peer") as caught:
        reader.read()
    assert time.monotonic() - start < 5
    assert isinstance(caught.value, ApplyStopped)
    reader.close()
    t.close()


def test_a_resumed_transfer_reads_what_the_partial_holds_and_fetches_the_rest_in_bulk(
    tmp_path: Path, stores: list[Store]
) -> None:
    """A cut transfer left a partial file with holes (blocks are written as they come): what
    is in it is read back, and the holes and the rest are fetched in full-sized requests, many
    in flight, not one block per round trip."""
    content = os.urandom(SIZE)
    rec = record_of(content)
    partial = tmp_path / "state" / "partial"
    partial.mkdir(parents=True)
    mib = 1 << 20
    fd = os.open(partial / rec.sha256, os.O_WRONLY | os.O_CREAT, 0o600)
    os.pwrite(fd, content[: 3 * mib], 0)
    os.pwrite(fd, content[6 * mib : 7 * mib], 6 * mib)  # a hole from 3 to 6 MiB
    os.close(fd)
    requests: list[GetBlocks] = []
    peak = [0]
    peer = Peer(content)
    send = peer.send

    def counted(req: GetBlocks) -> bool:
        requests.append(req)
        peak[0] = max(peak[0], len(peer.replies) + 1)
        return send(req)

    peer.send = counted  # type: ignore[method-assign]
    t, rec, reader = open_fetch(tmp_path, peer, stores)
    got = read_all(reader)
    spool = reader.take_spool()
    reader.close()
    t.close()
    assert got == content and spool.read_bytes() == content
    assert t.stats.resumed_bytes == 4 * mib
    assert t.stats.fetched_bytes == SIZE - 4 * mib
    rest = SIZE - 7 * mib
    assert len(requests) == 3 + -(-rest // REQUEST_BYTES), [r.length for r in requests]
    assert peak[0] > 1


def test_a_partial_file_of_a_replaced_version_is_deleted_even_after_a_restart(
    tmp_path: Path, stores: list[Store]
) -> None:
    """A big file changed (or was deleted) while it was being fetched: the partial file of the
    version that will never be wanted again goes, not a week later."""
    v1 = os.urandom(SIZE)
    t, rec1, reader = open_fetch(tmp_path, Peer(v1), stores)
    reader.read()  # a first chunk, then the transfer is cut
    reader.close()
    t.close()
    partial = tmp_path / "state" / "partial"
    assert (partial / rec1.sha256).exists()  # kept for a resume of that version
    # Its note names the path, for the owner's eyes only (as the partial file).
    for name in (rec1.sha256, f"{rec1.sha256}.path"):
        assert (partial / name).stat().st_mode & 0o077 == 0, name
    # A restart; then a new version of the same path is fetched.
    v2 = v1[:-1] + bytes([v1[-1] ^ 1])
    t2 = Transfers(stores[0], tmp_path / "root", partial, lambda _t: None)
    rec2 = record_of(v2)
    peer2 = Peer(v2)
    peer2.transfers = t2
    t2.pump = peer2.pump
    t2.prefetch(Link("peer", peer2.send, lambda: True), [(rec2, rec2.path)])
    r2 = t2.open(rec2, rec2.path)
    r2.read()
    assert not (partial / rec1.sha256).exists() and (partial / rec2.sha256).exists()
    r2.close()
    # The path is then deleted (or written some other way): its partial goes too.
    t2.forget(rec2.path)
    assert sorted(p.name for p in partial.iterdir()) == []
    t2.close()


def test_the_blocks_of_the_biggest_files_can_be_asked_for(tmp_path: Path, stores: list[Store]) -> None:
    """Files over 8,388,608,000 bytes have blocks of 8 MiB (16 MiB from twice that): a trial's
    never arrived, every request refused by the sender's 4 MiB limit. A block is checked whole
    against its hash, so a request asks for whole blocks: the limit is the biggest block."""
    from repld.protocol import messages as wire
    from repld.protocol.record import MAX_BLOCK

    store = Store.create(tmp_path / "state" / "repld.db")
    stores.append(store)
    t = Transfers(store, tmp_path / "root", tmp_path / "state" / "partial", lambda _t: None)
    for size in (8_388_608_001, 40 << 30):
        bs = block_size_for(size)
        assert bs > 4 << 20
        n = (size + bs - 1) // bs
        rec = Record(path="huge.img", guid="g", kind=Kind.FILE, version=VersionVector.of({"r": 1}),
                     mode=0o644, mtime_ns=1, size=size, sha256="0" * 64, blocks=bytes(32) * n)  # fmt: skip
        chunks = t._plan(rec, rec.path).chunks
        assert sum(c.length for c in chunks) == size
        assert max(c.length for c in chunks) <= wire.MAX_BLOCK_REQUEST == MAX_BLOCK
        for c in chunks[:2] + chunks[-1:]:
            msg = wire.GetBlocks(1, rec.sha256, rec.path, c.offset, c.length)
            assert wire.decode(wire.encode(msg)) == msg  # what the sender checks, accepted
    t.close()


def test_no_room_points_at_the_versions_kept_on_the_same_disk(tmp_path: Path) -> None:
    """A trial filled a disk whose versions folder held a deleted 10 MB file: the "no room"
    error stayed until `repld versions --delete`, which it did not mention."""
    from repld.daemon.fetch import _versions_hint

    root, versions = tmp_path / "root", tmp_path / "state" / "versions"
    root.mkdir()
    versions.mkdir(parents=True)
    assert _versions_hint(versions, str(root)) == ""  # none kept: nothing to say
    (versions / "old.txt~20261123-051500").write_bytes(b"x" * 1000)
    hint = _versions_hint(versions, str(root))
    assert str(versions) in hint and "repld versions --delete" in hint, hint
    assert _versions_hint(None, str(root)) == ""


def test_the_wal_file_shrinks_back_after_a_big_transaction(tmp_path: Path) -> None:
    """A trial: after a sync of 60k changes (then a prune), a daemon's repld.db-wal stayed at
    73 MB for as long as it ran. Once checkpointed, it is cut back to WAL_KEPT."""
    from repld.daemon.store import WAL_KEPT

    store = Store.create(tmp_path / "repld.db")
    wal = tmp_path / "repld.db-wal"
    try:
        with store.transaction():
            for i in range(40_000):
                rec = record_of(i.to_bytes(4, "big") * 64)
                store.put(rec.with_(path=f"d{i // 500}/f{i}", guid=f"g{i}"), local=True)
        assert wal.stat().st_size > 2 * WAL_KEPT  # as big as that transaction
        store.execute("PRAGMA wal_checkpoint(PASSIVE)")  # (SQLite does this by itself, later)
        with store.transaction():
            store.put(record_of(b"one more").with_(path="last", guid="gl"), local=True)
        assert wal.stat().st_size <= WAL_KEPT, wal.stat().st_size
    finally:
        store.close()
