"""The sync session state machine and the wire codec, in memory: no sockets, no files."""

from __future__ import annotations

import msgpack
import pytest
from repld.protocol import messages as wire
from repld.protocol.errors import ProtocolError
from repld.protocol.record import Kind, Record
from repld.protocol.session import (
    ApplyPage,
    Closed,
    Established,
    Identity,
    ServeBlocks,
    Session,
    State,
)
from repld.protocol.version import VersionVector

TREE = "6a1f0000-0000-4000-8000-000000000001"
A_ID = "aaaaaaaa-0000-4000-8000-000000000000"
B_ID = "bbbbbbbb-0000-4000-8000-000000000000"


class Side:
    """A replica reduced to what a session needs: records by seq, and a peer mark."""

    def __init__(self, rid: str, name: str, tree: str = TREE):
        self.id = Identity(tree, rid, name)
        self.records: dict[str, Record] = {}
        self.seq = 0
        self.seen = 0
        self.fail_paths: set[str] = set()
        self.session: Session | None = None

    def write(self, path: str, content: str) -> None:
        self.seq += 1
        old = self.records.get(path)
        version = (old.version if old else VersionVector()).bump(self.id.replica_id)
        self.records[path] = Record(path, path, Kind.FILE, version, size=len(content),
                                    sha256=f"{hash(content) & (2**256 - 1):064x}", seq=self.seq)  # fmt: skip

    def since(self, after: int, limit: int) -> list[Record]:
        return sorted((r for r in self.records.values() if r.seq > after), key=lambda r: r.seq)[
            :limit
        ]

    def start(self, seen_of: str = "") -> Session:
        self.session = Session(self.id, seq=self.seq, seen=self.seen, window=2, seen_of=seen_of)
        return self.session


def pump(a: Side, b: Side, *, page: int = 2, rounds: int = 200) -> int:
    """Run two sessions back to back until neither has anything to say."""
    sa, sb = a.start(b.id.replica_id), b.start(a.id.replica_id)
    sent: list[int] = []
    queues: dict[int, list[wire.Message]] = {id(a): [sb.hello()], id(b): [sa.hello()]}
    for _ in range(rounds):
        moved = False
        for me, other in ((a, b), (b, a)):
            s = me.session
            assert s is not None
            inbox, queues[id(me)] = queues[id(me)], []
            for msg in inbox:
                moved = True
                # Through the codec, as on the wire.
                out = s.receive(wire.decode(wire.encode(msg)))
                queues[id(other)] += out.send
                for act in out.actions:
                    if isinstance(act, ApplyPage):
                        ok = True
                        for r in act.records:
                            if r.path in me.fail_paths:
                                ok = False
                                continue
                            mine = me.records.get(r.path)
                            if mine is None or r.version.dominates(mine.version):
                                me.seq += 1
                                me.records[r.path] = r.with_(seq=me.seq)
                        res = s.applied(act.upto, ok)
                        queues[id(other)] += res.send
                        me.seen = s.seen
            s.local_changed(me.seq)
            while (after := s.page_from()) is not None:
                recs = me.since(after, page)
                upto = recs[-1].seq if len(recs) == page else me.seq
                queues[id(other)].append(s.page(tuple(recs), upto, len(me.since(upto, 10**6))))
                sent.append(len(recs))
                moved = True
        if not moved:
            return sum(sent)
    raise AssertionError("sessions did not settle")


def contents(side: Side) -> dict[str, str]:
    return {p: r.sha256 for p, r in side.records.items()}


def test_two_sessions_converge_and_remember_how_far_they_got() -> None:
    a, b = Side(A_ID, "a"), Side(B_ID, "b")
    for i in range(7):
        a.write(f"a{i}", f"from a {i}")
    b.write("b0", "from b")
    pump(a, b)
    assert contents(a) == contents(b) and len(contents(a)) == 8
    assert a.session is not None and b.session is not None
    assert a.session.in_sync and b.session.in_sync
    assert b.seen == a.seq  # b holds all of a's records...
    # ...so a second meeting sends only what changed since (and its echo back).
    a.write("a0", "edited")
    before = b.seq
    assert pump(a, b) == 2
    assert contents(a) == contents(b)
    assert b.seq == before + 1


def test_a_mark_for_another_replica_is_not_trusted() -> None:
    """A peer re-initialised under the same name: what we had seen of the old one means nothing."""
    a, b = Side(A_ID, "a"), Side(B_ID, "b")
    for i in range(3):
        a.write(f"f{i}", str(i))
    b.seen = a.seq  # as if b had seen all of a: but it counted another replica's sequence
    sa, sb = a.start(B_ID), b.start("cccccccc-0000-4000-8000-000000000000")
    sa.receive(sb.hello())
    sb.receive(sa.hello())
    assert sa.page_from() == 0  # a streams from the start
    assert sb.seen == 0 and sb.received_upto == 0


def test_a_failed_page_is_not_marked_seen_and_is_sent_again_on_retry() -> None:
    a, b = Side(A_ID, "a"), Side(B_ID, "b")
    for i in range(5):
        a.write(f"f{i}", str(i))
    b.fail_paths = {"f1"}
    pump(a, b)
    sb = b.session
    assert sb is not None
    assert "f1" not in b.records and "f4" in b.records  # later pages still applied
    assert b.seen < a.records["f1"].seq  # the mark stops before the failure
    assert not sb.in_sync
    # Everything from the failed page on comes again, but only the failed page is still
    # needed (the later ones went in): f1's page, f1 at least.
    assert 1 <= sb.need()[0] < 4, sb.need()
    b.fail_paths = set()
    out = sb.retry()
    assert [type(m) for m in out.send] == [wire.Resend]
    # The peer answers the resend with the pages from the failure on, in a new epoch.
    sa = a.session
    assert sa is not None
    sa.receive(out.send[0])
    after = sa.page_from()
    assert after == b.seen
    recs = tuple(a.since(after, 100))
    page = sa.page(recs, a.seq)
    assert page.epoch == 1
    res = sb.receive(page)
    assert any(isinstance(x, ApplyPage) for x in res.actions)


def test_pages_from_before_a_resend_are_dropped() -> None:
    b = Side(B_ID, "b")
    s = b.start()
    s.receive(Side(A_ID, "a").start().hello())
    s.failed_from = 0
    s.retry()
    stale = wire.Records((), 5, epoch=0)
    assert s.receive(stale).actions == []


def test_different_trees_refuse_on_both_sides() -> None:
    a = Side(A_ID, "a")
    other = Side(B_ID, "b", tree="77777777-0000-4000-8000-000000000000")
    sa, so = a.start(), other.start()
    out = sa.receive(so.hello())
    assert sa.state is State.CLOSED
    err = out.send[0]
    assert isinstance(err, wire.Error) and err.fatal and "tree" in err.message
    assert any(isinstance(x, Closed) and x.fatal for x in out.actions)
    so.receive(err)
    assert so.state is State.CLOSED


def test_before_the_peers_hello_its_old_stream_is_dropped_but_blocks_are_served() -> None:
    """A restarted session may still receive what the peer's previous one sent: dropped
    silently (the new session streams it again), while block requests are still served."""
    a = Side(A_ID, "a")
    a.write("f", "x")
    s = Side(B_ID, "b").start()
    out = s.receive(wire.Records((a.records["f"],), a.seq))
    assert out.send == [] and out.actions == [] and s.state is State.HELLO_SENT
    out = s.receive(wire.GetBlocks(1, "0" * 64, "f", 0, 10))
    assert isinstance(out.actions[0], ServeBlocks)
    s.receive(a.start(B_ID).hello(reply=True))
    assert s.state is State.ESTABLISHED
    out = s.receive(wire.Records((a.records["f"],), a.seq))
    assert any(isinstance(x, ApplyPage) for x in out.actions)


def test_a_message_a_state_does_not_allow_is_answered_with_an_error() -> None:
    s = Side(A_ID, "a").start()
    s.receive(Side(B_ID, "b").start().hello())
    out = s.receive(Side(B_ID, "b").start().hello())  # a second hello on a live session
    assert isinstance(out.send[0], wire.Error) and out.actions == []


def test_hello_from_our_own_replica_id_is_refused() -> None:
    s = Side(A_ID, "a").start()
    out = s.receive(Side(A_ID, "copy").start().hello())
    assert s.state is State.CLOSED and not any(isinstance(x, Established) for x in out.actions)


def test_a_page_with_records_outside_its_range_is_a_protocol_error() -> None:
    a, b = Side(A_ID, "a"), Side(B_ID, "b")
    a.write("f", "x")
    s = b.start()
    s.receive(a.start().hello())
    with pytest.raises(ProtocolError):
        s.receive(wire.Records((a.records["f"].with_(seq=9),), 3))


def test_a_stream_started_again_from_an_older_point_loses_nothing() -> None:
    """Two hellos crossed and the peer began its stream again from an older point: a page we
    hold already is acknowledged and skipped; one that straddles our position gives what is new
    in it (dropping it whole lost those records for good: the next page moved past them)."""
    a, b = Side(A_ID, "a"), Side(B_ID, "b")
    for i in range(6):
        a.write(f"f{i}", str(i))
    recs = [a.records[f"f{i}"] for i in range(6)]  # seqs 1..6
    s = b.start()
    s.receive(a.start().hello())
    first = s.receive(wire.Records(tuple(recs[:4]), 4))  # we hold up to 4
    assert [type(x) for x in first.actions] == [ApplyPage]
    again = s.receive(wire.Records(tuple(recs[:2]), 2))  # the restarted stream: old news
    assert not again.actions and [type(m) for m in again.send] == [wire.Ack]
    straddle = s.receive(wire.Records(tuple(recs[2:6]), 6))  # 3..6: only 5 and 6 are new
    (page,) = straddle.actions
    assert isinstance(page, ApplyPage) and [r.path for r in page.records] == ["f4", "f5"]
    assert s.received_upto == 6


# -- the codec ------------------------------------------------------------------------------------


def test_every_message_survives_the_codec() -> None:
    rec = Record("d/ü x", "g", Kind.FILE, VersionVector.of({A_ID: 3}), mode=0o755, mtime_ns=5,
                 size=3, sha256="ab" * 32, blocks=b"\x01" * 32, modified_by=A_ID, seq=4)  # fmt: skip
    msgs: list[wire.Message] = [
        wire.Hello(TREE, A_ID, "a", 4, 2, send=False),
        wire.Records((rec,), 4, 10, 2000, 1),
        wire.Records((rec,), 4, content={"ab" * 32: b"abc"}),
        wire.Ack(4, 1, 2),
        wire.Ack(4, held=(wire.Held(B_ID, 3, "k" * 40), wire.Held(A_ID, 1))),
        wire.Resend(3, 2),
        wire.GetBlocks(7, "ab" * 32, "d/ü x", 0, 3),
        wire.Blocks(7, b"abc"),
        wire.GetFiles(8, (("ab" * 32, "d/ü x"), ("cd" * 32, "e"))),
        wire.Files(8, (3, -1, 2), b"abcde"),
        wire.Error("gone", "no", req=7),
        wire.Bye("done"),
        wire.Ping(4),
    ]
    for m in msgs:
        assert wire.decode(wire.encode(m)) == m


@pytest.mark.parametrize(
    "frames, needle",
    [
        ([b"\xc1garbage"], "msgpack"),
        ([msgpack.packb([99, "hello", {}])], "wire version"),
        ([msgpack.packb([wire.WIRE_VERSION, "launch", {}])], "unknown message type"),
        ([msgpack.packb([wire.WIRE_VERSION, "ack", {"upto": -1}])], "ack.upto"),
        ([msgpack.packb([wire.WIRE_VERSION, "ack", {"upto": 1, "evil": 2}])], "unknown fields"),
        ([msgpack.packb([wire.WIRE_VERSION, "ack", {"upto": 1, "held": [["r", -1, ""]]}])],
         "held sequence"),
        ([msgpack.packb([wire.WIRE_VERSION, "ack", {"upto": 1, "held": [["", 1, ""]]}])],
         "empty replica id"),
        ([msgpack.packb([wire.WIRE_VERSION, "ack", {"upto": 1, "held": {"r": 1}}])], "ack.held"),
        ([msgpack.packb([wire.WIRE_VERSION, "ack", {"upto": 1, "held": [["r", 1, ""]] * 2000}])],
         "at most"),
        ([msgpack.packb([wire.WIRE_VERSION, "hello", {"tree_id": "t"}])], "missing"),
        (
            [
                msgpack.packb(
                    [
                        wire.WIRE_VERSION,
                        "getblocks",
                        {
                            "req": 1,
                            "sha256": "a",
                            "path": "../etc/passwd",
                            "offset": 0,
                            "length": 1,
                        },
                    ]
                )
            ],
            "not allowed",
        ),  # fmt: skip
        (
            [
                msgpack.packb(
                    [
                        wire.WIRE_VERSION,
                        "getblocks",
                        {"req": 1, "sha256": "a", "path": "f", "offset": 0, "length": 1 << 30},
                    ]
                )
            ],
            "length",
        ),  # fmt: skip
        ([msgpack.packb([wire.WIRE_VERSION, "records", {"records": [["x"]], "upto": 1}])], "16 fields"),
        ([msgpack.packb([wire.WIRE_VERSION, "blocks", {"req": 1}])], "data frame"),
        ([msgpack.packb([wire.WIRE_VERSION, "files", {"req": 1, "sizes": [1]}])], "data frame"),
        ([msgpack.packb([wire.WIRE_VERSION, "files", {"req": 1, "sizes": [2, -1]}]), b"abc"],
         "add up"),
        ([msgpack.packb([wire.WIRE_VERSION, "files", {"req": 1, "sizes": [-2]}]), b""],
         "files size"),
        ([msgpack.packb([wire.WIRE_VERSION, "getfiles", {"req": 1, "files": []}])], "1 to"),
        ([msgpack.packb([wire.WIRE_VERSION, "getfiles", {"req": 1,
                                                         "files": [["ab", "../x"]]}])],
         "not allowed"),
        ([msgpack.packb([wire.WIRE_VERSION, "getfiles", {"req": 1, "files": [["ab"]]}])],
         "entries"),
        ([msgpack.packb([wire.WIRE_VERSION, "records", {"records": [], "upto": 1,
                                                        "content": [b"x"]}])], "content"),
        ([msgpack.packb([wire.WIRE_VERSION, "records", {"records": [], "upto": 1,
                                                        "content": {"ab": b"x"}}])], "content"),
        ([msgpack.packb([wire.WIRE_VERSION, "records", {"records": [], "upto": 1,
                                                        "content": {"ab" * 32: "text"}}])],
         "content"),
        ([msgpack.packb([wire.WIRE_VERSION, "records", {
            "records": [], "upto": 1, "content": {"ab" * 32: b"x" * (wire.INLINE_MAX + 1)}}])],
         "bytes for one file"),
        ([b"x" * (wire.MAX_MESSAGE + 1)], "limit"),
        ([], "frames"),
    ],
)
def test_malformed_messages_are_protocol_errors(frames: list[bytes], needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        wire.decode(frames)


def test_a_record_with_an_unsafe_path_is_refused() -> None:
    rec = Record("ok", "g", Kind.FILE, VersionVector.of({A_ID: 1}), sha256="ab" * 32)
    item = wire.record_to_wire(rec)
    for bad in (b"/etc/passwd", b"a/../../b", b"", b"a\x00b"):
        item[0] = bad
        with pytest.raises(ProtocolError):
            wire.record_from_wire(item)


def test_pages_lost_in_transit_are_asked_for_again_and_a_lost_ack_is_repeated() -> None:
    a, b = Side(A_ID, "a"), Side(B_ID, "b")
    for i in range(3):
        a.write(f"f{i}", str(i))
    sa, sb = a.start(B_ID), b.start(A_ID)
    sa.receive(sb.hello())
    sb.receive(sa.hello())
    assert sa.state is State.ESTABLISHED and sb.state is State.ESTABLISHED
    sa.local_changed(a.seq)
    after = sa.page_from()
    assert after == 0
    sa.page(tuple(a.since(0, 10)), a.seq)  # sent, and lost on the way
    assert not sa.in_sync and sa.page_from() is None  # waiting for an Ack that never comes
    # b heard of a's records (its ping says how far a is) and none came: it asks again.
    assert sb.receive(sa.ping()).send == [wire.Ack(0, 1, 0)]  # where it stands, again
    out = sb.ask_again()
    assert [type(m) for m in out.send] == [wire.Resend]
    sa.receive(out.send[0])
    recs = tuple(a.since(sa.page_from() or 0, 10))
    acts = sb.receive(sa.page(recs, a.seq)).actions
    assert [type(x) for x in acts] == [ApplyPage]
    ack = sb.applied(a.seq, True).send
    # That Ack is lost too: b repeats where it stands when a pings, and a is in sync.
    assert not sa.in_sync
    for msg in sb.receive(sa.ping()).send:
        sa.receive(msg)
    assert ack and sa.in_sync
    assert sb.ask_again().send == []  # nothing missing: nothing asked


def test_a_page_is_acknowledged_with_what_it_brings_before_it_is_applied() -> None:
    """A big file takes a while to apply; meanwhile the sender must know the peer needs it."""
    a, b = Side(A_ID, "a"), Side(B_ID, "b")
    a.write("big", "x" * 1000)
    sa, sb = a.start(B_ID), b.start(A_ID)
    sa.receive(sb.hello())
    sb.receive(sa.hello())
    sa.local_changed(a.seq)
    out = sb.receive(sa.page(tuple(a.since(0, 10)), a.seq))
    assert [type(x) for x in out.actions] == [ApplyPage]
    assert out.send == [wire.Ack(0, 1, 1000)]  # nothing applied yet, one file of 1000 bytes
    sa.receive(out.send[0])
    assert sa.peer_need_files == 1 and sa.peer_need_bytes == 1000 and not sa.in_sync
    for msg in sb.applied(a.seq, True).send:
        sa.receive(msg)
    assert sa.peer_need_files == 0 and sa.in_sync



def test_a_path_that_fails_for_good_counts_once_not_every_page_after_it() -> None:
    """One file that cannot be applied (unreadable here, say) is one file needed; the pages
    applied after it need nothing (a trial saw need_files grow to 134, 3 GiB)."""
    a, b = Side(A_ID, "a"), Side(B_ID, "b")
    a.write("bad", "x" * 100)
    a.write("good", "y" * 10)
    sa, sb = a.start(B_ID), b.start(A_ID)
    sa.receive(sb.hello())
    sb.receive(sa.hello())
    sa.local_changed(a.seq)
    sb.receive(sa.page(tuple(a.since(0, 10)), a.seq))
    sb.applied(a.seq, False, (1, 100))  # "bad" failed, "good" went in
    assert sb.need() == (1, 100)
    for i in range(5):  # later pages, applied: they add nothing
        first = a.seq
        a.write(f"later{i}", "z" * 1000)
        sa.local_changed(a.seq)
        sb.receive(sa.page(tuple(a.since(first, 10)), a.seq))
        sb.applied(a.seq, True)
    assert sb.need() == (1, 100)
    # Asked for again (every 10 s): counted anew as it comes.
    assert [type(m) for m in sb.retry().send] == [wire.Resend]
    assert sb.need()[0] >= 1


def test_a_goodbye_is_said_as_the_peers():
    """A trial read `beta: session ended: shutting down` as this side stopping."""
    a, b = Side(A_ID, "a"), Side(B_ID, "b")
    sa, sb = a.start(B_ID), b.start(A_ID)
    sa.receive(sb.hello())
    sb.receive(sa.hello())
    bye = sb.close("shutting down").send
    (closed,) = [x for m in bye for x in sa.receive(m).actions if isinstance(x, Closed)]
    assert closed.reason == "the peer said goodbye (shutting down)" and not closed.fatal
