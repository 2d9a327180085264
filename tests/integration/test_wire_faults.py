"""A peer that sends what no repld should: one real daemon, and this test speaking for the other
replica over real CurveZMQ with its keys (made by `repld init`), message by message.

- A record with an empty version is a placeholder: a directory a replica made only to hold an
  entry that came from a peer. Replicas sent them (a trial: after a kill -9 in the middle of a
  new tree, and under busy live changes), and the receiver refused the whole page as malformed.
  They are dropped now, and the rest of the page is taken.
- A malformed page used to be skipped: the next page was taken and acknowledged, so the
  records of the bad one (deletions, in the trial) never came again, and both sides said they
  were in sync. The session now ends instead, and the next one streams from what was taken.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import msgpack
import pytest
import zmq
from daemons import Cluster
from repld.daemon import config as configmod
from repld.daemon import node as node_mod
from repld.daemon.replica import load_keys
from repld.daemon.service import sync_with_peer
from repld.protocol import messages as wire
from repld.protocol.errors import ReplError
from repld.protocol.record import Kind, Record
from repld.protocol.version import VersionVector


@pytest.fixture
def cluster(tmp_path):
    with Cluster(tmp_path) as c:
        yield c


class FakePeer:
    """Replica ``me``'s keys and identity on a DEALER to the daemon of ``them``."""

    def __init__(self, me, them):
        keys = load_keys(configmod.load(me.config))
        self.me, self.them = me, them
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.curve_publickey = keys.public.encode()
        self.sock.curve_secretkey = keys.secret.encode()
        self.sock.curve_serverkey = them.public_key.encode()
        self.sock.linger = 0
        self.sock.connect(them.endpoint)

    def close(self) -> None:
        self.sock.close()

    def send(self, msg) -> None:
        self.sock.send_multipart(wire.encode(msg))

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def hello(self, seq: int, reply: bool = False) -> None:
        self.send(wire.Hello(self.me.ident["tree_id"], self.me.replica_id, self.me.name, seq, 0,
                             seen_of=self.them.replica_id, reply=reply))  # fmt: skip

    def answer(self, msg, content: dict[str, bytes]) -> None:
        """Answer a request for content (GetBlocks, GetFiles) from ``content`` (by SHA-256)."""
        if isinstance(msg, wire.GetFiles):
            parts = [content.get(sha) for sha, _ in msg.files]
            self.send(wire.Files(msg.req, tuple(-1 if p is None else len(p) for p in parts),
                                 b"".join(p for p in parts if p)))  # fmt: skip
        else:
            self.send(wire.Blocks(msg.req, content[msg.sha256][msg.offset:msg.offset + msg.length]))

    def wait_for(self, kind, timeout: float = 20.0, what: str = ""):
        """The next message of type ``kind`` from the daemon (others are noted and skipped)."""
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            if not self.sock.poll(int(max(0.0, deadline - time.monotonic()) * 1000) + 1):
                continue
            msg = wire.decode(self.sock.recv_multipart())
            if isinstance(msg, kind):
                return msg
            seen.append(type(msg).__name__)
        raise AssertionError(f"no {kind} from the daemon ({what}); got {seen}")


def directory(path: str, who: str, n: int, seq: int, version: VersionVector | None = None):
    v = VersionVector.of({who: n}) if version is None else version
    return Record(path, f"guid-{path}", Kind.DIR, v, mode=0o755, seq=seq)


def greeted(cluster) -> tuple:
    """Replicas a and b, b's daemon running, and a FakePeer speaking for a, in session."""
    a, b = cluster.make("a", "b")
    cluster.start(b)
    peer = FakePeer(a, b)
    peer.hello(seq=9)
    peer.wait_for(wire.Hello, what="b's answer to our hello")
    return a, b, peer


def tampered(rec: Record, field: int, value) -> list[bytes]:
    """The frames of a page holding ``rec`` with its wire field ``field`` set to ``value``."""
    frames = wire.encode(wire.Records((rec,), upto=rec.seq))
    top = msgpack.unpackb(frames[0], raw=False)
    top[2]["records"][0][field] = value
    return [msgpack.packb(top)]


def test_placeholders_are_dropped_and_a_malformed_page_is_not_skipped(cluster):
    a, b = cluster.make("a", "b")
    cluster.start(b)
    peer = FakePeer(a, b)
    try:
        peer.hello(seq=4)
        hello = peer.wait_for(wire.Hello, what="b's answer to our hello")
        assert hello.seen == 0
        rid = a.replica_id
        good = directory("first", rid, 1, 1)
        placeholder = directory("held-only", rid, 0, 2, VersionVector())
        later = directory("later", rid, 3, 3)
        # Page 1: a record with a path no replica may send, among good ones: malformed.
        bad = wire.encode(wire.Records((good, later), upto=3))
        top = msgpack.unpackb(bad[0], raw=False)
        top[2]["records"][1][0] = b"../outside"
        peer.send_raw([msgpack.packb(top)])
        err = peer.wait_for(wire.Error, what="the complaint about the bad page")
        assert "malformed" in err.message
        # Page 2 would be taken and acknowledged on top of it: b ends the session instead
        # and greets us again, from what it took (nothing).
        peer.send(wire.Records((directory("after", rid, 4, 4),), upto=4))
        again = peer.wait_for(wire.Hello, what="a new session after the bad page")
        assert again.seen == 0, again
        assert not (b.root / "after").exists() and not (b.root / "first").exists()
        peer.hello(seq=4, reply=True)
        # The stream again from the start, with a placeholder in it (an older replica's):
        # dropped; the rest of the page is taken.
        peer.send(wire.Records((good, placeholder, later, directory("after", rid, 4, 4)),
                               upto=4))  # fmt: skip
        # (The first Ack says what b still needs, before it applies the page.)
        while (ack := peer.wait_for(wire.Ack, what="the page applied")).upto < 4:
            assert ack.upto == 0, ack
        cluster.wait_until(lambda: all((b.root / d).is_dir() for d in ("first", "later", "after")),
                           30, "b to make the three directories")  # fmt: skip
        assert not (b.root / "held-only").exists()
        assert "held-only" not in b("dump").stdout
    finally:
        peer.close()


def test_a_placeholder_is_never_sent(cluster):
    """b takes one file of a's by a subtree sync: its parents are placeholders on b (their
    records come with the next full sync). b's daemon streams to c without them: c took the
    whole page as malformed when they were sent."""
    a, b, c = cluster.make("a", "b", "c", links=[("b", "c")])
    (a.root / "d" / "e").mkdir(parents=True)
    (a.root / "d" / "e" / "f.txt").write_text("deep\n")
    a("scan")
    b("sync", a.config, "d/e/f.txt")
    assert (b.root / "d" / "e" / "f.txt").read_text() == "deep\n"
    cluster.start(b, c)
    cluster.wait_until(lambda: (c.root / "d" / "e" / "f.txt").exists(), 30, "f.txt on c")
    assert (c.root / "d" / "e" / "f.txt").read_text() == "deep\n"
    for r in (b, c):
        log = r.log.read_text(errors="replace")
        assert "malformed" not in log and "empty version" not in log, log


def file_record(path: str, content: bytes, who: str, n: int, seq: int, guid: str) -> Record:
    import hashlib

    return Record(path, guid, Kind.FILE, VersionVector.of({who: n}), mode=0o644,
                  mtime_ns=1_700_000_000_000_000_000, size=len(content),
                  sha256=hashlib.sha256(content).hexdigest(),
                  blocks=hashlib.sha256(content).digest(), modified_by=who, origin_seq=seq,
                  seq=seq)  # fmt: skip


def test_a_move_through_a_symlink_the_peer_just_sent_stays_inside_the_root(cluster, tmp_path):
    """A trial's hostile peer wrote a file of its choosing outside the root (it could have been
    ~/.ssh/authorized_keys): a file it had sent, then in one page the same file at
    LINK/outside/x, a symlink LINK to a directory outside, and the first file's deletion. The
    apply renames a moved file rather than copy it, and the rename went through the symlink,
    installed after the new path was checked."""
    a, b = cluster.make("a", "b")
    outside = tmp_path / "outside"
    (outside / "target").mkdir(parents=True)
    cluster.start(b)
    peer = FakePeer(a, b)
    try:
        rid = a.replica_id
        bait = b"the peer's content\n"
        first = file_record("bait.txt", bait, rid, 1, 1, "guid-bait")
        peer.hello(seq=4)
        peer.wait_for(wire.Hello, what="b's answer")
        peer.send(wire.Records((first,), upto=1))
        # b fetches the content of bait.txt from us.
        while True:
            msg = peer.wait_for((wire.GetBlocks, wire.GetFiles, wire.Ack),
                                what="b fetching bait.txt")  # fmt: skip
            if isinstance(msg, wire.Ack):
                if msg.upto >= 1:
                    break
                continue
            peer.answer(msg, {first.sha256: bait})
        cluster.wait_until(lambda: (b.root / "bait.txt").exists(), 30, "bait.txt on b")
        moved = file_record("lnk/target/stolen.txt", bait, rid, 1, 2, "guid-bait")
        link = Record("lnk", "guid-lnk", Kind.SYMLINK, VersionVector.of({rid: 1}),
                      mode=0o777, target=str(outside), modified_by=rid, origin_seq=3, seq=3)  # fmt: skip
        gone = first.with_(deleted=True, version=VersionVector.of({rid: 2}), origin_seq=4, seq=4)
        peer.send(wire.Records((moved, link, gone), upto=4))
        while peer.wait_for(wire.Ack, what="the second page applied").upto < 4:
            pass
        assert not (outside / "target" / "stolen.txt").exists(), "written outside the root"
        assert os.listdir(outside / "target") == []
        assert not (b.root / "bait.txt").exists() or (b.root / "bait.txt").read_bytes() == bait
    finally:
        peer.close()


def test_a_peer_that_wrongly_says_we_were_rolled_back_stops_us_until_it_is_removed(cluster):
    """A hello that claims to have seen more of our records than we ever made stops every
    exchange (a database restored from a backup would reuse version numbers): a trial's
    hostile peer did it with one message, until a restart. Taking that peer off the list lifts
    it, and says so."""
    a, b, c = cluster.make("a", "b", "c", links=[("a", "b"), ("b", "c")])
    cluster.start(b, c)
    peer = FakePeer(a, b)
    try:
        peer.send(wire.Hello(a.ident["tree_id"], a.replica_id, "a", 0, 10**15,
                             seen_of=b.replica_id))  # fmt: skip
        cluster.wait_until(lambda: b.status()["state"] == "error", 30, "b to stop")
        (err,) = [e["error"] for e in b.status()["errors"] if not e["path"]]
        assert "a has seen this replica's records up to number" in err
        assert "`repld peer remove a`" in err, err
        b("peer", "remove", "a")
        cluster.wait_until(lambda: b.status()["state"] != "error", 30, "b to sync again")
        (c.root / "after.txt").write_text("still syncing\n")
        cluster.wait_until(lambda: (b.root / "after.txt").exists(), 30, "c's file on b")
        assert "no longer stops it" in b.log.read_text(errors="replace")
    finally:
        peer.close()


def test_a_hello_counting_another_replicas_records_does_not_stop_us(cluster):
    """`seen` counts the records of the replica named in `seen_of`: a hello that counts
    another one's (a dialler's guess, a replica this one was before a rejoin; or a hostile
    peer's made-up id) said nothing of ours, yet stopped every exchange (a trial)."""
    import uuid

    a, b, c = cluster.make("a", "b", "c", links=[("a", "b"), ("b", "c")])
    cluster.start(b, c)
    peer = FakePeer(a, b)
    try:
        peer.send(wire.Hello(a.ident["tree_id"], a.replica_id, "a", 0, 10**6,
                             seen_of=str(uuid.uuid4())))  # fmt: skip
        peer.wait_for(wire.Hello, what="b's answer")
        (c.root / "after.txt").write_text("still syncing\n")
        cluster.wait_until(lambda: (b.root / "after.txt").exists(), 30, "c's file on b")
        assert b.status()["state"] != "error", b.status()
    finally:
        peer.close()


def test_a_malformed_request_for_blocks_is_answered_with_its_number(cluster):
    """The asker matches an error to its request by number: answered without one, a refused
    request waited out the 30 s stall timeout (a trial), with every other file behind it."""
    a, b = cluster.make("a", "b")
    cluster.start(b)
    peer = FakePeer(a, b)
    try:
        peer.hello(seq=0)
        peer.wait_for(wire.Hello, what="b's answer")
        frames = wire.encode(wire.GetBlocks(7, "0" * 64, "x", 0, 1))
        top = msgpack.unpackb(frames[0], raw=False)
        top[2]["length"] = 0  # no request may ask for nothing
        peer.send_raw([msgpack.packb(top)])
        err = peer.wait_for(wire.Error, what="the refusal")
        assert err.req == 7 and "malformed" in err.message, err
    finally:
        peer.close()


def _until_acked(peer: FakePeer, upto: int, what: str) -> list[object]:
    """Every message from the daemon until it acknowledges our records up to ``upto``."""
    got: list[object] = []
    while True:
        msg = peer.wait_for(object, what=what)
        got.append(msg)
        if isinstance(msg, wire.Ack) and msg.upto >= upto:
            return got


def test_small_files_come_inside_their_page_and_wrong_content_is_asked_for(cluster):
    """Small files travel with their records (one message for hundreds of files instead of a
    request and a reply each). What the receiver takes from the page is checked as a fetched
    block is: content that is not the record's is never written, and is asked for instead."""
    a, b = cluster.make("a", "b")
    cluster.start(b)
    peer = FakePeer(a, b)
    try:
        rid = a.replica_id
        peer.hello(seq=3)
        peer.wait_for(wire.Hello, what="b's answer")
        files = {f"small-{i}.txt": f"small file {i}\n".encode() * (i + 1) for i in range(2)}
        recs = tuple(file_record(p, data, rid, 1, n, f"guid-{p}")
                     for n, (p, data) in enumerate(files.items(), 1))  # fmt: skip
        content = {r.sha256: files[r.path] for r in recs}
        # Page 1: both files with their content, and nothing answered: b needs nothing more.
        peer.send(wire.Records(recs, upto=2, content=content))
        got = _until_acked(peer, 2, "b to apply the page with content")
        assert not [m for m in got if isinstance(m, (wire.GetBlocks, wire.GetFiles))], got
        for path, data in files.items():
            assert (b.root / path).read_bytes() == data
        # Page 2: content that is not the record's (same size): b asks for it, and writes
        # what the record says.
        right = b"the record's content\n"
        wrong = b"something else, sent\n"
        assert len(right) == len(wrong)
        rec = file_record("checked.txt", right, rid, 1, 3, "guid-checked")
        peer.send(wire.Records((rec,), upto=3, content={rec.sha256: wrong}))
        asked = peer.wait_for((wire.GetBlocks, wire.GetFiles), what="b asking for checked.txt")
        assert rec.sha256 in ((asked.sha256,) if isinstance(asked, wire.GetBlocks)
                              else [sha for sha, _ in asked.files])  # fmt: skip
        peer.answer(asked, {rec.sha256: right})
        _until_acked(peer, 3, "b to apply the second page")
        assert (b.root / "checked.txt").read_bytes() == right
    finally:
        peer.close()


def test_a_page_carries_the_content_of_small_files_the_peer_lacks(cluster):
    """b streams its own small files with their content, not a big one's (fetched block by
    block), and not the content of a file that came from the peer it streams to (it has it)."""
    a, b = cluster.make("a", "b")
    (b.root / "mine.txt").write_bytes(b"b's small file\n")
    (b.root / "big.bin").write_bytes(os.urandom(wire.INLINE_MAX + 1))
    b("scan")
    cluster.start(b)
    peer = FakePeer(a, b)
    try:
        rid = a.replica_id
        theirs = b"a's file, sent to b\n"
        rec = file_record("theirs.txt", theirs, rid, 1, 1, "guid-theirs")
        peer.hello(seq=1)
        pages: list[wire.Records] = []
        hello_seen = False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = peer.wait_for(object, what="b's records")
            if isinstance(msg, wire.Hello) and not hello_seen:
                hello_seen = True
                peer.send(wire.Records((rec,), upto=1, content={rec.sha256: theirs}))
            elif isinstance(msg, wire.Records):
                pages.append(msg)
                peer.send(wire.Ack(msg.upto))
            if any(r.path == "theirs.txt" for p in pages for r in p.records):
                break
        by_path = {r.path: (r, p) for p in pages for r in p.records}
        mine, page = by_path["mine.txt"]
        assert page.content.get(mine.sha256) == b"b's small file\n"
        big, page = by_path["big.bin"]
        assert big.sha256 not in page.content
        echo, page = by_path["theirs.txt"]  # (b relays what it applied; a has that version)
        assert echo.modified_by == rid and echo.sha256 not in page.content
        assert (b.root / "theirs.txt").read_bytes() == theirs
    finally:
        peer.close()


def test_small_files_are_asked_for_many_at_a_time(cluster):
    """Small files that did not come with their page are asked for in one GetFiles (one
    message each way for dozens of files, instead of a request and a reply each); one the
    sender no longer has is an error for that file only, and the rest are written."""
    a, b = cluster.make("a", "b")
    cluster.start(b)
    peer = FakePeer(a, b)
    try:
        rid = a.replica_id
        files = {f"d/f{i:02}.txt": f"file {i}\n".encode() * (i + 1) for i in range(20)}
        recs = tuple(file_record(p, data, rid, 1, n, f"guid-{p}")
                     for n, (p, data) in enumerate(files.items(), 1))  # fmt: skip
        gone = recs[7]
        have = {r.sha256: files[r.path] for r in recs if r is not gone}
        peer.hello(seq=len(recs))
        peer.wait_for(wire.Hello, what="b's answer")
        peer.send(wire.Records((directory("d", rid, 1, 1),) + recs, upto=len(recs) + 1))
        asked = peer.wait_for(wire.GetFiles, what="b asking for the files")
        assert len(asked.files) == len(recs)
        assert [p for _, p in asked.files] == [r.path for r in recs]
        peer.answer(asked, have)
        cluster.wait_until(lambda: sum((b.root / p).exists() for p in files) == len(files) - 1,
                           30, "every file but the gone one on b")  # fmt: skip
        written = [p for p in files if (b.root / p).exists()]
        assert sorted(written) == sorted(p for p in files if p != gone.path)
        for p in written:
            assert (b.root / p).read_bytes() == files[p]
        errors = b.status()["errors"]
        assert [e["path"] for e in errors] == [gone.path], errors
    finally:
        peer.close()


def test_a_daemon_serves_many_small_files_in_one_reply(cluster):
    a, b = cluster.make("a", "b")
    contents = {f"s{i}.txt": f"small {i}\n".encode() * (i + 1) for i in range(5)}
    for p, data in contents.items():
        (b.root / p).write_bytes(data)
    b("scan")
    cluster.start(b)
    peer = FakePeer(a, b)
    try:
        peer.hello(seq=0)
        peer.wait_for(wire.Hello, what="b's answer")
        import hashlib

        asked = [(hashlib.sha256(d).hexdigest(), p) for p, d in contents.items()]
        asked.insert(2, ("0" * 64, "missing.txt"))  # not there: -1, the rest still served
        peer.send(wire.GetFiles(9, tuple(asked)))
        reply = peer.wait_for(wire.Files, what="b's reply")
        assert reply.req == 9
        sizes = list(reply.sizes)
        assert sizes[2] == -1
        data = bytes(reply.data)
        at = 0
        for (_, p), size in zip(asked, sizes, strict=True):
            if size < 0:
                continue
            assert data[at:at + size] == contents[p], p
            at += size
        assert at == len(data)
    finally:
        peer.close()


def test_records_that_would_crash_the_daemon_are_refused_and_it_goes_on(cluster):
    """A hostile-peer trial: a version counter written with "²" (str.isdigit takes it, int()
    does not) or with 5000 digits, and a symlink whose target holds a NUL, each stopped the
    daemon with a traceback. A modified_by with a "/" would put a conflict copy's name in
    another directory. Each page is refused as malformed, the daemon goes on."""
    a, b, peer = greeted(cluster)
    rid = a.replica_id
    try:

        def bad_page(field: int, value, kind=Kind.DIR) -> list[bytes]:
            rec = directory("bad", rid, 1, 1)
            if kind is Kind.SYMLINK:
                rec = Record("bad", "guid-bad", Kind.SYMLINK, VersionVector.of({rid: 1}),
                             mode=0o777, target="x", seq=1)  # fmt: skip
            return tampered(rec, field, value)

        for frames in (bad_page(3, f"{rid}:\u00b2"), bad_page(3, f"{rid}:" + "9" * 5000),
                       bad_page(10, b"a\0b", Kind.SYMLINK), bad_page(11, "../../x")):  # fmt: skip
            peer.send_raw(frames)
            err = peer.wait_for(wire.Error, what="the complaint about the bad page")
            assert "malformed" in err.message, err
            peer.send(wire.Records((directory("after", rid, 1, 1),), upto=1))
            peer.wait_for(wire.Hello, what="a new session after the bad page")
            peer.hello(seq=9, reply=True)
        assert b.status() is not None, "the daemon stopped"
        peer.send(wire.Records((directory("good", rid, 1, 1),), upto=1))
        cluster.wait_until(lambda: (b.root / "good").is_dir(), 30, "b to take a good page")
        assert not (b.root / "bad").exists() and not (b.root / "after").exists()
        assert "Traceback" not in b.log.read_text()
    finally:
        peer.close()


def test_a_peer_cannot_speak_for_another_peers_replica(cluster):
    """A hostile-peer trial: a, admitted by b, said hello as c's replica (c being b's other
    peer) with a huge sequence number; b took it, moved its marks for c, and c, back online,
    was told it had been rolled back: nothing synced until a rejoin. b refuses the claim."""
    a, b, c = cluster.make("a", "b", "c", links=[("a", "b"), ("b", "c")])
    cluster.start(b, c)
    (c.root / "from-c.txt").write_text("c\n")
    cluster.wait_until(lambda: (b.root / "from-c.txt").exists(), 30, "c's file on b")
    cluster.stop(c)
    peer = FakePeer(a, b)
    try:
        peer.send(wire.Hello(a.ident["tree_id"], c.replica_id, "c", 1 << 62, 0,
                             seen_of=b.replica_id))  # fmt: skip
        err = peer.wait_for(wire.Error, what="b refusing the claim")
        assert "c's here" in err.message, err
        peer.send(wire.Records((), upto=1 << 62))  # (taken with the claim, it moved c's mark)
        cluster.start(c)
        (c.root / "after.txt").write_text("c again\n")
        cluster.wait_until(lambda: (b.root / "after.txt").exists(), 30, "c's new file on b")
        assert c.status()["state"] != "error", c.status()
        assert "claims to be replica" in b.log.read_text()
    finally:
        peer.close()


def test_a_flood_of_hellos_starts_a_session_at_most_once_a_second(cluster):
    """A hostile-peer trial: each hello started a new session that streamed every record again,
    with two log lines: 20000 hellos, 25000 lines and 800 MB. The latest waits its turn."""
    a, b = cluster.make("a", "b")
    for i in range(50):
        (b.root / f"f{i}").write_text(f"{i}\n")
    cluster.start(b)
    peer = FakePeer(a, b)
    try:
        start = time.monotonic()
        for _ in range(300):
            peer.hello(seq=0)
        hellos = 0
        while time.monotonic() - start < 3.0:
            if peer.sock.poll(100) and isinstance(wire.decode(peer.sock.recv_multipart()),
                                                  wire.Hello):  # fmt: skip
                hellos += 1
        assert 1 <= hellos <= 5, hellos
        assert b.log.read_text().count("new session") <= 5
        assert b.status() is not None
    finally:
        peer.close()


def test_a_peer_that_asks_for_content_and_never_reads_gets_only_so_much(cluster):
    """A hostile-peer trial: 100 requests for 16 MiB that the peer never read took the daemon
    to 1.7 GB (every reply queued for it). Replies not yet on the wire are capped; the rest of
    the requests wait, and are all answered once the peer reads."""
    import hashlib

    from repld.daemon.node import SERVE_PENDING

    a, b = cluster.make("a", "b")
    data = os.urandom(16 << 20)
    (b.root / "big.bin").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    cluster.start(b)
    peer = FakePeer(a, b)
    peer.sock.rcvhwm = 1
    try:
        n = 40  # 640 MiB asked for
        for i in range(n):
            peer.send(wire.GetBlocks(i + 1, sha, "big.bin", 0, len(data)))

        def rss_mib() -> float:
            status = open(f"/proc/{b.proc.pid}/status").read()
            return int(next(ln.split()[1] for ln in status.splitlines()
                            if ln.startswith("VmRSS:"))) / 1024  # fmt: skip

        peak, deadline = 0.0, time.monotonic() + 3.0
        while time.monotonic() < deadline:  # (sampled while b has the requests)
            peak = max(peak, rss_mib())
            b.status()
        assert peak < 120 + 3 * SERVE_PENDING / (1 << 20), peak
        got = 0
        deadline = time.monotonic() + 60
        while got < n and time.monotonic() < deadline:
            if peer.sock.poll(1000):
                msg = wire.decode(peer.sock.recv_multipart())
                if isinstance(msg, wire.Blocks):
                    assert bytes(msg.data) == data
                    got += 1
        assert got == n, got
    finally:
        peer.close()


def test_records_claiming_absurd_sizes_or_our_own_edits_are_refused(cluster):
    """A second hostile-peer trial: a directory record of size 2**63-1 made the daemon, and the
    honest peer it relayed it to, fail at every start (SUM overflowed); a file record of 2**62
    bytes took the daemon's loop minutes and gigabytes to plan; a record claiming 2**62 edits
    of the victim itself made its next edit count past what the wire takes, and its peers
    refused its pages for good."""
    a, b, peer = greeted(cluster)
    rid = a.replica_id
    try:
        peer.send_raw(tampered(directory("huge", rid, 1, 1), 7, (1 << 63) - 1))
        assert "malformed" in peer.wait_for(wire.Error, what="the size refused").message
        peer.send(wire.Records((directory("after", rid, 1, 1),), upto=1))
        peer.wait_for(wire.Hello, what="a new session")
        peer.hello(seq=9, reply=True)
        # A record that claims edits of b itself that b never made.
        forged = directory("forged", rid, 1, 2, VersionVector.of({b.replica_id: 1 << 40,
                                                                   rid: 2}))  # fmt: skip
        peer.send(wire.Records((forged,), upto=2))
        err = peer.wait_for(wire.Error, what="the forged record refused")
        assert "never made" in err.message, err
        assert not (b.root / "forged").exists()
        peer.send(wire.Records((directory("after", rid, 1, 1),), upto=1))
        peer.wait_for(wire.Hello, what="a new session after the forged page")
        peer.hello(seq=9, reply=True)
        # A file the size of no disk: said to have no room, at once, the daemon responsive.
        big = file_record("big.bin", b"tiny\n", rid, 1, 2, "guid-big")
        big = Record(big.path, big.guid, big.kind, big.version, mode=0o644,
                     mtime_ns=big.mtime_ns, size=wire.MAX_FILE_SIZE, sha256=big.sha256,
                     blocks=big.blocks, modified_by=rid, origin_seq=2, seq=2)  # fmt: skip
        peer.send(wire.Records((big,), upto=2))

        def no_room() -> bool:
            st = b.status()
            return any("no room" in e["error"] for e in st["errors"] if e["path"] == "big.bin")

        cluster.wait_until(no_room, 30, "b to say it has no room for big.bin")
        assert b.status() is not None and "Traceback" not in b.log.read_text()
    finally:
        peer.close()


def test_a_peers_word_does_not_drop_a_tombstone_another_peer_has_not_seen(cluster):
    """A second hostile-peer trial: a's Ack said c (b's other peer, offline) held all of b's
    records; b's prune then dropped the tombstone of a file c still had, and c kept it for
    good, both saying they were in sync. And an Ack naming 1024 made-up replicas was stored
    and said onwards, over what a peer takes in one Ack."""
    a, b, c = cluster.make("a", "b", "c", links=[("a", "b"), ("b", "c")])
    (b.root / "doomed.txt").write_text("to be deleted\n")
    cluster.start(b, c)
    cluster.wait_until(lambda: (c.root / "doomed.txt").exists(), 30, "doomed.txt on c")
    cluster.stop(c)
    (b.root / "doomed.txt").unlink()
    cluster.wait_until(lambda: " D " in next((ln for ln in b("dump").stdout.splitlines()
                                              if ln.startswith("doomed.txt ")), ""),
                       30, "b to record the deletion")  # fmt: skip
    peer = FakePeer(a, b)
    try:
        peer.hello(seq=0)
        hello = peer.wait_for(wire.Hello, what="b's answer")
        made_up = tuple(wire.Held(f"fake{i:04}", 1 << 40, "") for i in range(1000))
        peer.send(wire.Ack(hello.seq, held=(wire.Held(c.replica_id, 10**15, c.public_key),
                                            *made_up)))  # fmt: skip
        from repld.daemon.store import HELD_KEPT, Store

        def held() -> int:
            with Store(b.state / "repld.db", write=False) as store:
                return len(store.held())

        cluster.wait_until(held, 30, "b to take the Ack")
    finally:
        peer.close()
    out = b("prune").stdout
    assert "1 tombstone" in out and "kept" in out, out
    assert "doomed.txt" in b("dump").stdout
    assert held() <= HELD_KEPT
    cluster.start(c)
    cluster.wait_until(lambda: not (c.root / "doomed.txt").exists(), 30, "c to take the deletion")


def in_wire_version(frames: list[bytes], version: int) -> list[bytes]:
    """``frames`` as a repld speaking wire protocol ``version`` would send them."""
    top = msgpack.unpackb(frames[0], raw=False)
    top[0] = version
    return [msgpack.packb(top), *frames[1:]]


def test_a_peer_running_another_repld_version_is_named_as_such(cluster):
    """A peer of another wire version (an upgrade done on one machine only) was logged as
    sending "malformed" messages, 20 lines at a time, while status said it was not connected
    with no error: the user had no hint to upgrade the other machine (a trial). Status now
    says so, the log once, and once it speaks this version they sync."""
    a, b = cluster.make("a", "b")
    cluster.start(b)
    peer = FakePeer(a, b)
    try:
        old_hello = wire.Hello(b.ident["tree_id"], a.replica_id, "a", 0, 0,
                               seen_of=b.replica_id)  # fmt: skip
        for _ in range(5):
            peer.send_raw(in_wire_version(wire.encode(old_hello), wire.WIRE_VERSION - 1))
        told = peer.wait_for(wire.Error, what="b's answer in its own version")
        assert told.code == "wire" and told.fatal

        def error():
            (st,) = [p for p in b.status()["peers"] if p["name"] == "a"]
            return st["error"] or ""

        cluster.wait_until(lambda: "another repld version" in error(), 20, "b to name it")
        assert f"wire protocol {wire.WIRE_VERSION - 1}, this one {wire.WIRE_VERSION}" in error()
        assert "`repld --version`" in error()
        log = b.log.read_text(errors="replace")
        assert log.count("another repld version") == 1, log
        assert "malformed" not in log, log
        # One answer a minute, whatever it sends: five hellos, one Error.
        assert not peer.sock.poll(500)
        # The same version now (the other machine upgraded): a session, and no error.
        peer.hello(seq=0)
        peer.wait_for(wire.Hello, what="b's answer to a hello in its version")
        cluster.wait_until(lambda: error() == "", 20, "the error to go")
    finally:
        peer.close()


def test_a_sync_with_a_peer_running_another_repld_version_says_so(cluster):
    """`repld sync PEER` against a daemon of another wire version said "cannot reach a ... (is
    its daemon running ...)" after 15 s (a trial): now it names the mismatch."""
    a, b = cluster.make("a", "b")
    keys = load_keys(configmod.load(a.config))
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.curve_server = True
    router.curve_publickey = keys.public.encode()
    router.curve_secretkey = keys.secret.encode()
    router.linger = 0
    router.bind(a.endpoint)
    answered = []

    def old_a() -> None:  # answers b's hello as a repld one wire version older would
        if router.poll(20_000):
            who, *frames = router.recv_multipart()
            hello = wire.Hello(a.ident["tree_id"], a.replica_id, "a", 0, 0,
                               seen_of=b.replica_id, reply=True)  # fmt: skip
            older = in_wire_version(wire.encode(hello), wire.WIRE_VERSION - 1)
            router.send_multipart([who, *older])
            answered.append(wire.decode(frames))

    t = threading.Thread(target=old_a)
    t.start()
    try:
        res = b("sync", "a", check=False)
    finally:
        t.join()
        router.close()
    assert answered and isinstance(answered[0], wire.Hello)
    assert res.returncode == 1, res
    assert "another repld version" in res.stderr, res.stderr
    assert f"wire protocol {wire.WIRE_VERSION - 1}" in res.stderr, res.stderr
    assert "cannot reach" not in res.stderr


def test_a_peer_that_takes_the_connection_and_never_answers_is_not_a_key_mismatch(
    cluster, monkeypatch
):
    """A laptop asleep (its daemon stopped, SIGSTOP) still takes connections (the kernel
    does), and never answers the handshake: a trial saw it reported as "its public key is not
    the one listed here". A handshake that times out now says what it is."""
    a, b = cluster.make("a", "b")
    silent = socket.create_server(("127.0.0.1", a.port))  # listens, never speaks
    monkeypatch.setattr(node_mod, "HANDSHAKE_SECONDS", 1.0)
    try:
        with pytest.raises(ReplError) as e:
            sync_with_peer(b.config, "a", timeout=60)
    finally:
        silent.close()
    assert "took the connection but did not answer within 1 s" in str(e.value), e.value
    assert "public key" not in str(e.value)
