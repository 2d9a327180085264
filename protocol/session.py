"""The sync session with one peer, as a state machine: messages in, messages and actions out.

A session is symmetric: both sides send ``Hello``, then each streams the other its records after
the sequence number the other said it has seen, in pages, with at most ``window`` pages waiting
for an ``Ack``. The receiver hands each page to the daemon (``ApplyPage``); once applied, the
daemon calls ``applied()``, which acknowledges it. ``seen`` (what we hold of the peer's records)
advances only over pages that applied without error; when one failed, ``retry()`` asks the peer
to stream again from there, and applying a record twice changes nothing. Block requests and
replies pass through as actions: the daemon owns files and transfers.

States and transitions live in ``_TRANSITIONS``: anything else a peer sends is a protocol error,
answered with an ``Error`` and ignored, except in ``CLOSED``.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from .errors import ProtocolError
from .messages import (
    PROTOCOL,
    Ack,
    Blocks,
    Bye,
    Error,
    Files,
    GetBlocks,
    GetFiles,
    Held,
    Hello,
    Message,
    Ping,
    Records,
    Resend,
)
from .record import Record


class State(enum.Enum):
    HELLO_SENT = "hello-sent"  # waiting for the peer's hello
    ESTABLISHED = "established"
    CLOSED = "closed"


_TRANSITIONS: dict[State, dict[type[Message], State]] = {
    # Before the peer's hello, what its previous session still sends is dropped (the new
    # session streams it again from our mark); block traffic is served and delivered anyway.
    State.HELLO_SENT: {Hello: State.ESTABLISHED, Error: State.HELLO_SENT, Bye: State.CLOSED,
                       Ping: State.HELLO_SENT, Records: State.HELLO_SENT, Ack: State.HELLO_SENT,
                       Resend: State.HELLO_SENT, GetBlocks: State.HELLO_SENT,
                       Blocks: State.HELLO_SENT, GetFiles: State.HELLO_SENT,
                       Files: State.HELLO_SENT},
    State.ESTABLISHED: {Records: State.ESTABLISHED, Ack: State.ESTABLISHED,
                        Resend: State.ESTABLISHED, GetBlocks: State.ESTABLISHED,
                        Blocks: State.ESTABLISHED, GetFiles: State.ESTABLISHED,
                        Files: State.ESTABLISHED, Error: State.ESTABLISHED,
                        Ping: State.ESTABLISHED, Bye: State.CLOSED},
    State.CLOSED: {},
}  # fmt: skip


# -- what the session asks the daemon to do -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Established:
    peer: Hello


@dataclass(frozen=True, slots=True)
class ApplyPage:
    records: tuple[Record, ...]
    upto: int
    content: dict[str, bytes] = field(default_factory=dict, hash=False)  # see Records.content


@dataclass(frozen=True, slots=True)
class ServeBlocks:
    request: GetBlocks | GetFiles


@dataclass(frozen=True, slots=True)
class BlocksArrived:
    reply: Blocks | Files | Error


@dataclass(frozen=True, slots=True)
class PeerError:
    """The peer reported an error; ``fatal`` ones closed the session."""

    error: Error


@dataclass(frozen=True, slots=True)
class Closed:
    reason: str
    fatal: bool = False  # a mismatch that retrying will not fix (tree id, protocol)


Action = Established | ApplyPage | ServeBlocks | BlocksArrived | PeerError | Closed


@dataclass
class Output:
    send: list[Message] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Identity:
    tree_id: str
    replica_id: str
    name: str


class Session:
    def __init__(
        self,
        me: Identity,
        *,
        seq: int,
        seen: int,
        send: bool = True,
        receive: bool = True,
        window: int = 4,
        seen_of: str = "",
    ):
        self.me = me
        self.state = State.HELLO_SENT
        self.peer: Hello | None = None
        self.local_seq = seq  # our newest sequence number
        self.seen = seen  # the peer's records we hold, contiguous and applied without error
        self.seen_of = seen_of  # the replica `seen` counts; "" when we do not know who answers
        self.send_records = send
        self.receive_records = receive
        self.window = window
        # Sending side.
        self.sent_upto = 0  # the peer's position in our stream
        self.send_epoch = 0
        self.acked_upto = 0
        # Our records the peer has provably applied: its own mark (from its hello), or an Ack
        # that needs nothing more. (An Ack's upto alone counts pages handled, failed or not.)
        self.confirmed_upto = 0
        self.start_upto = 0  # where the peer stood in our stream when the session began
        self._in_flight: deque[int] = deque()  # `upto` of each page sent and not yet acked
        self.peer_need_files = 0
        self.peer_need_bytes = 0
        self.peer_acked_all = False
        # How far other replicas hold the peer's records, as the peer last said (see Held).
        self.peer_held: tuple[Held, ...] = ()
        # Receiving side.
        self.held: tuple[Held, ...] = ()  # said in every Ack: the daemon keeps it current
        self.received_upto = seen  # pages given to the daemon, applied or not
        self.peer_seq = 0  # the peer's newest sequence number, as far as we know
        self._pending: deque[tuple[int, int, int]] = deque()  # (upto, files, bytes) not yet applied
        self._failed_need = (0, 0)  # files and bytes of pages that failed, until asked again
        self.remaining_files = 0  # after the newest page received, as the peer counted them
        self.remaining_bytes = 0
        self.failed_from: int | None = None  # `seen` when a page first failed; retry from there
        self.epoch = 0  # pages from before our last Resend are dropped
        self.close_reason = ""

    # -- starting and ending -------------------------------------------------------------------

    def hello(self, *, reply: bool = False) -> Hello:
        return Hello(
            reply=reply,
            tree_id=self.me.tree_id,
            replica_id=self.me.replica_id,
            name=self.me.name,
            seq=self.local_seq,
            seen=self.seen,
            seen_of=self.seen_of,
            send=self.send_records,
            receive=self.receive_records,
        )

    def close(self, reason: str) -> Output:
        out = Output()
        if self.state is not State.CLOSED:
            out.send.append(Bye(reason))
            self._closed(out, reason)
        return out

    def _closed(self, out: Output, reason: str, fatal: bool = False) -> None:
        self.state = State.CLOSED
        self.close_reason = reason
        out.actions.append(Closed(reason, fatal))

    # -- messages in ---------------------------------------------------------------------------

    def receive(self, msg: Message) -> Output:
        out = Output()
        allowed = _TRANSITIONS[self.state]
        if type(msg) not in allowed:
            if self.state is not State.CLOSED and not isinstance(msg, Error):
                out.send.append(
                    Error(
                        "unexpected",
                        f"{type(msg).__name__} not expected in state {self.state.value}",
                    )  # fmt: skip
                )
            return out
        before, self.state = self.state, allowed[type(msg)]
        if before is State.HELLO_SENT and isinstance(msg, (Records, Ack, Resend, Ping)):
            return out  # the peer's previous session: dropped, see _TRANSITIONS
        handler = getattr(self, f"_on_{type(msg).__name__.lower()}")
        handler(msg, out)
        return out

    def _on_hello(self, msg: Hello, out: Output) -> None:
        problem = ""
        if msg.protocol != PROTOCOL:
            problem = f"protocol {msg.protocol!r} not spoken here (this side speaks {PROTOCOL})"
        elif msg.tree_id != self.me.tree_id:
            problem = (
                f"replica {msg.name} ({msg.replica_id[:8]}) belongs to tree {msg.tree_id}, "
                f"this replica ({self.me.name}) to tree {self.me.tree_id}: refusing to sync"
            )
        elif msg.replica_id == self.me.replica_id:
            problem = f"peer {msg.name} has this replica's own id {msg.replica_id}: a copied state directory?"
        if problem:
            out.send.append(Error("refused", problem, fatal=True))
            self._closed(out, problem, fatal=True)
            return
        self.peer = msg
        self.peer_seq = msg.seq
        if msg.replica_id != self.seen_of:
            # We counted for another replica (a peer re-initialised under the same name, or
            # none known): it streams everything from the start, so we expect that.
            self.seen = self.received_upto = 0
        # What it holds of ours counts only if it says so of this replica; else start over.
        start = msg.seen if msg.seen_of == self.me.replica_id and msg.seen <= self.local_seq else 0
        self.sent_upto = self.acked_upto = self.confirmed_upto = self.start_upto = start
        self.peer_acked_all = self.acked_upto >= self.local_seq
        out.actions.append(Established(msg))

    def _on_records(self, msg: Records, out: Output) -> None:
        if not self.receive_records:
            out.send.append(Error("unexpected", "records sent to a side that asked for none"))
            return
        if msg.epoch != self.epoch:
            return  # sent before the peer saw our Resend: the resent stream covers it
        for r in msg.records:
            if r.seq > msg.upto:
                raise ProtocolError(f"{r.path}: seq {r.seq} after the page's end {msg.upto}")
        if msg.upto <= self.received_upto:
            # A page we hold already: the peer started its stream again from an older point
            # (two hellos crossed, a session restarted on its side). Acknowledged, not applied
            # twice; dropping it as an error would be harmless, but a page that straddles
            # what we hold must not be: see below.
            out.send.append(self._ack(self.seen))
            return
        # Of a page that starts before what we hold, only what is new to us: dropping it whole
        # would lose the records past our position, and the next page would move past them.
        records = tuple(r for r in msg.records if r.seq > self.received_upto)
        size = sum(r.size for r in records if not r.deleted)
        self._pending.append((msg.upto, len(records), size))
        self.received_upto = msg.upto
        self.peer_seq = max(self.peer_seq, msg.upto)
        self.remaining_files = msg.remaining_files
        self.remaining_bytes = msg.remaining_bytes
        out.actions.append(ApplyPage(records, msg.upto, msg.content))
        # What we need, said now rather than once the page is applied (a big file can take a
        # while): the sender's status must not count us as in sync meanwhile.
        out.send.append(self._ack(self.seen))

    def _on_ack(self, msg: Ack, out: Output) -> None:
        while self._in_flight and self._in_flight[0] <= msg.upto:
            self._in_flight.popleft()
        self.acked_upto = max(self.acked_upto, msg.upto)
        if not msg.need_files:
            self.confirmed_upto = max(self.confirmed_upto, msg.upto)
        self.peer_need_files = msg.need_files
        self.peer_need_bytes = msg.need_bytes
        if msg.held:
            self.peer_held = msg.held
        self.peer_acked_all = self.acked_upto >= self.local_seq and not msg.need_files

    def _on_resend(self, msg: Resend, out: Output) -> None:
        if msg.after > self.local_seq:
            raise ProtocolError(f"resend after {msg.after}, beyond our newest {self.local_seq}")
        self.sent_upto = msg.after
        self.send_epoch = msg.epoch
        self._in_flight.clear()
        self.peer_acked_all = False

    def _on_getblocks(self, msg: GetBlocks, out: Output) -> None:
        out.actions.append(ServeBlocks(msg))

    def _on_blocks(self, msg: Blocks, out: Output) -> None:
        out.actions.append(BlocksArrived(msg))

    def _on_getfiles(self, msg: GetFiles, out: Output) -> None:
        out.actions.append(ServeBlocks(msg))

    def _on_files(self, msg: Files, out: Output) -> None:
        out.actions.append(BlocksArrived(msg))

    def _on_error(self, msg: Error, out: Output) -> None:
        if msg.req:
            out.actions.append(BlocksArrived(msg))
            return
        out.actions.append(PeerError(msg))
        if msg.fatal:
            self._closed(out, msg.message, fatal=True)

    def _on_ping(self, msg: Ping, out: Output) -> None:
        self.peer_seq = max(self.peer_seq, msg.seq)
        if self.state is State.ESTABLISHED and self.receive_records and not self._pending:
            # Where we stand, again: an Ack lost in a session restart would otherwise leave
            # the peer waiting for it (and reporting us out of sync) until the next change.
            out.send.append(self._ack(self.received_upto))

    def _on_bye(self, msg: Bye, out: Output) -> None:
        # Its words, said as its: "shutting down" alone reads as this side stopping.
        self._closed(out, f"the peer said goodbye ({msg.reason})" if msg.reason
                     else "the peer said goodbye")  # fmt: skip

    # -- our side of the stream ----------------------------------------------------------------

    def local_changed(self, seq: int) -> None:
        """Our database reached ``seq``: there may be more to send."""
        self.local_seq = seq
        if self.acked_upto < seq:
            self.peer_acked_all = False

    def page_from(self) -> int | None:
        """Where our next page starts (records after this number), or None if none is due."""
        if self.state is not State.ESTABLISHED or self.peer is None:
            return None
        if not (self.send_records and self.peer.receive):
            return None
        if len(self._in_flight) >= self.window or self.sent_upto >= self.local_seq:
            return None
        return self.sent_upto

    def page(self, records: tuple[Record, ...], upto: int, remaining_files: int = 0,
             remaining_bytes: int = 0, content: dict[str, bytes] | None = None) -> Records:  # fmt: skip
        """The page that follows ``page_from()``; ``upto`` is the last seq the page covers;
        ``content``: that of some of its small files (see Records.content)."""
        assert upto > self.sent_upto
        self.sent_upto = upto
        self._in_flight.append(upto)
        return Records(records, upto, remaining_files, remaining_bytes, self.send_epoch,
                       content or {})  # fmt: skip

    # -- the receiving side --------------------------------------------------------------------

    def applied(self, upto: int, ok: bool, failed: tuple[int, int] | None = None) -> Output:
        """The daemon has applied the page up to ``upto``; ``ok`` if every record applied, else
        ``failed``: the files and bytes that did not (None: the whole page, say)."""
        out = Output()
        while self._pending and self._pending[0][0] <= upto:
            _, files, size = self._pending.popleft()
            if not ok:  # still needed; a page applied after a failure needs nothing more
                files, size = failed if failed is not None else (files, size)
                self._failed_need = (self._failed_need[0] + files, self._failed_need[1] + size)
                failed = (0, 0)  # (counted once, with the page's first part)
        if ok and self.failed_from is None:
            self.seen = max(self.seen, upto)
        elif not ok and self.failed_from is None:
            self.failed_from = self.seen
        if self.state is State.ESTABLISHED:
            out.send.append(self._ack(upto))
        return out

    def _ack(self, upto: int) -> Ack:
        return Ack(upto, *self.need(), held=self.held)

    def need(self) -> tuple[int, int]:
        """Files and bytes we still expect from the peer: an upper bound (some may be equal)."""
        files = sum(p[1] for p in self._pending) + self.remaining_files + self._failed_need[0]
        if not files and self.received_upto < self.peer_seq:
            files = 1  # announced but not streamed yet: at least one
        size = sum(p[2] for p in self._pending) + self.remaining_bytes + self._failed_need[1]
        if self.failed_from is not None:
            files = max(files, 1)
        return files, size

    def retry(self) -> Output:
        """Ask the peer to stream again from the first page that failed."""
        if self.failed_from is None or self.state is not State.ESTABLISHED or self._pending:
            return Output()
        after, self.failed_from = self.failed_from, None
        self._failed_need = (0, 0)  # the pages come again, and are counted as they arrive
        return self._resend(after)

    def ask_again(self) -> Output:
        """Ask the peer to stream again from what we hold, when it announced records (in its
        hello or pings) that never came and nothing is on its way: pages dropped while a
        session restarted."""
        if (
            self.state is not State.ESTABLISHED
            or self._pending
            or self.failed_from is not None
            or self.received_upto >= self.peer_seq
            or not self.receive_records
            or self.peer is None
            or not self.peer.send
        ):
            return Output()
        return self._resend(self.received_upto)

    def _resend(self, after: int) -> Output:
        """A Resend from ``after``, in a new epoch: any late page of the old stream is dropped."""
        self.received_upto = after
        self.remaining_files = self.remaining_bytes = 0
        self.epoch += 1
        out = Output()
        out.send.append(Resend(after, self.epoch))
        return out

    def ping(self) -> Ping:
        return Ping(self.local_seq)

    @property
    def caught_up(self) -> bool:
        """We hold every record the peer has sent or announced, and applied them all."""
        return self.received_all and self.failed_from is None

    @property
    def received_all(self) -> bool:
        """Every record the peer announced has reached us and been handled (applied or not)."""
        if self.peer is not None and not (self.peer.send and self.receive_records):
            return self.state is State.ESTABLISHED
        return (
            self.state is State.ESTABLISHED
            and self.received_upto >= self.peer_seq
            and not self._pending
            and not self.remaining_files
        )

    @property
    def in_sync(self) -> bool:
        return self.caught_up and (self.peer_acked_all or not (self.peer and self.peer.receive))
