"""The daemon's engine: one loop that owns the database, the peer sockets and the tree.

One thread runs ``Node.run``: it polls the ROUTER socket peers dial into, a DEALER socket per
configured peer, the watcher's wake-up pipe and the control thread's command pipe. Everything that
reads or writes the database or the tree happens on this thread, so there are no locks around
them. While it waits for file content (inside the applier), ``pump`` keeps serving other peers'
block requests and queues everything else for later, so two peers fetching from each other never
wait on each other.

What travels, and why it is safe, is in ``protocol/session.py``; this module moves bytes, turns
pages of records into applied steps, and keeps the status that ``repld status`` shows.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from ..protocol import messages as wire
from ..protocol.errors import ProtocolError, WireMismatch
from ..protocol.plan import Op, Step, plan_record
from ..protocol.reconcile import Policy
from ..protocol.record import (
    Kind,
    Record,
    conflict_original,
    escape,
    is_placeholder,
    mode_of,
)
from ..protocol.session import (
    ApplyPage,
    BlocksArrived,
    Closed,
    Established,
    Identity,
    Output,
    PeerError,
    ServeBlocks,
    Session,
    State,
)
from . import config as configmod
from .applier import Applier, ApplyStats
from .control import iso_time
from .errors import (
    NOT_REPLICATED,
    ConfigError,
    DeletesDeferred,
    MassDelete,
    PeerLost,
    ReplError,
    RolledBack,
    RootChanged,
    ScanStopped,
    StoreError,
)
from .fetch import STOPPING, UNLESS_HELD, VERSION_GONE, Transfers, answer, inline_content
from .fetch import Link as FetchLink
from .ignore import IGNORE_FILE
from .localsync import pull_steps, resend_lost
from .mounts import Mounts, not_mounted_message
from .replica import Replica, list_conflicts, load_keys
from .scanner import kind_of
from .versions import expire, keeper_for
from .watcher import Watcher

log = logging.getLogger(__name__)

WIRE_MISMATCH = "it runs another repld version"  # a peer's error, once its messages say so
PAGE_RECORDS = 1000
PAGE_BYTES = 4 << 20
PING_EVERY = 2.0
REWATCH_EVERY = 30.0  # seconds between attempts to watch again a root whose watch was lost
ROOT_CHECK_EVERY = 2.0  # seconds between looks at the root: still the replica's own directory?
ACKS_EVERY = 5.0  # seconds between writes of how far peers acknowledged our records
COUNTS_EVERY = 1.0  # seconds between counts of the tree, and of what a peer lacks, as they change
ROUTER_SILENCE = 30.0  # a dialled-in peer silent this long is taken as gone
PUBLISH_WHILE_FETCHING = 0.5  # seconds between status updates while a file's content arrives
RETRY_EVERY = 10.0  # failed pages are asked for again this often
SCAN_TICK_EVERY = 0.5  # seconds between on_tick calls from inside a long scan
DEFER_DELETES = 20  # deletions in one batch of watcher events that wait for a whole scan
SETTLE_DELETES = 2.0  # seconds of quiet after such a batch before that scan
SETTLE_LONGEST = 10.0  # ...or this long after the first such batch, quiet or not
DELETES_WINDOW = 60.0  # deletions recorded by path scans count together over this long
HELLO_AGAIN_EVERY = 15.0  # a dialled connection with no session says hello again this often
HELLO_PACE = 1.0  # s: a peer's hellos start a new session at most this often per link
SERVE_PENDING = 64 << 20  # bytes of content replies to one peer not yet on the wire, at most
SERVE_WAITING = 256  # requests of one peer waiting for those to go
DEBOUNCE_QUIET = 0.02
DEBOUNCE_LONGEST = 0.25
DEGRADED_SCAN_EVERY = 60.0
APPLIED_MAX = 20_000  # echoes of our own writes remembered (see Node._applied)
HWM = 10000
LINK_GRACE = 1.0  # seconds a non-preferred link waits for the preferred one to come up
REDIAL_EVERY = 0.05  # seconds between ZeroMQ's own redials of a peer (RECONNECT_IVL)
REDIAL_MAX = 8.0  # the longest pause before dialling again a peer whose handshakes fail
HANDSHAKE_WARN_EVERY = 60.0  # seconds between warnings about one link's failing handshakes
HANDSHAKE_SECONDS = 30.0  # a dialled peer that takes the connection must answer within this
ZAP_DOMAIN = "repld"


@dataclass
class Options:
    """How this node syncs; the defaults are the daemon's, a one-shot sync narrows them."""

    send: bool = True
    receive: bool = True
    dry_run: bool = False
    policy: Policy | None = None  # None: the config's
    within: Callable[[str], bool] | None = None
    listen: bool = True
    watch: bool = True
    only_peer: str | None = None
    hold_send: bool = False  # send ours only once we hold theirs (--prefer: resolve first)
    keep_steps: bool = False  # list what was applied (NodeStats.done_steps: `sync PEER -v`)


@dataclass
class PeerLink:
    """One connection to a peer: a DEALER we dialled, or a ROUTER identity that dialled us."""

    peer: configmod.Peer
    dealer: zmq.Socket[bytes] | None = None
    monitor: zmq.Socket[bytes] | None = None
    rid: bytes = b""
    session: Session | None = None
    connected: bool = False  # the transport is up (CURVE handshake done)
    last_seen: float = 0.0  # monotonic
    last_seen_wall: float = 0.0
    last_ping: float = 0.0
    last_retry: float = 0.0
    established_at: float = 0.0
    records_at: float = 0.0  # when a page of records last arrived on this link
    last_hello: float = -10.0  # when we last started a session on this link
    # The peer's hellos start a session at most once a HELLO_PACE (a peer that floods them
    # would have every record streamed again each time): the latest one waits here.
    hello_at: float = -10.0
    hello_waiting: wire.Hello | None = None
    # Replies of content sent to the peer (tracker, bytes) that ZeroMQ may not have put on the
    # wire yet, and requests that wait until it has (see Node._serve).
    unsent: deque[tuple[Any, int]] = field(default_factory=deque)
    serve_waiting: deque[wire.GetBlocks | wire.GetFiles] = field(default_factory=deque)
    tracker: Any = None  # the last tracked send's, for _serve
    error: str = ""  # the last error that ended a session, for status
    # The peer took us off its list (error NOT_ADMITTED): said in status, and hellos go on
    # (HELLO_AGAIN_EVERY), for it may list us again.
    error_passes: bool = False
    mismatch_told: float = float("-inf")  # when it was last told it speaks another wire version
    unanswered: str = ""  # the dial finds nothing listening there (see _monitor); for status
    # The last page's count of what the peer still lacks: (when counted, the page's upto,
    # records, bytes); see Node._still_to_send.
    still_to_send: tuple[float, int, int, int] | None = None
    acked_saved: int = -1  # the peer's acknowledgement of our records, as last written down
    held_saved: tuple[Any, ...] = ()  # the peer's last `held`, as last written down
    complaints: deque[float] = field(default_factory=deque)  # times we answered with an error
    # Handshakes that keep failing (see Node._handshake_failed): the pause before the next
    # dial (0: the last handshake succeeded), when that dial is due (monotonic; None: dialled),
    # failures in a row, and when the last warning was logged, what it said, and how many
    # repeats were not logged since.
    redial_wait: float = 0.0
    bye_heard: bool = False  # the peer ended the session while a page was being applied
    redial_at: float | None = None
    failures: int = 0
    warned_at: float | None = None
    warned: str = ""
    suppressed: int = 0

    @property
    def label(self) -> str:
        return self.peer.name

    def unsent_bytes(self) -> int:
        while self.unsent and self.unsent[0][0].done:
            self.unsent.popleft()
        return sum(n for _, n in self.unsent)

    @property
    def established(self) -> bool:
        return self.session is not None and self.session.state is State.ESTABLISHED


@dataclass
class PathError:
    path: str
    error: str
    peer: str = ""


def _listed(step: Step) -> bool:
    """Whether `sync PEER -v` (or -n) lists ``step``: what changes a file, and a record-only
    step that settles a conflict (--prefer local wins here with nothing to write, and the other
    side's edit is overwritten there)."""
    return step.op is not Op.RECORD or step.conflict is not None


@dataclass
class NodeStats:
    applied: ApplyStats = field(default_factory=ApplyStats)
    dry_steps: list[Step] = field(default_factory=list)
    done_steps: list[Step] = field(default_factory=list)  # with Options.keep_steps


REFUSED_KEPT = 8  # keys refused lately, for `repld status` (the most recent ones)


SERVING_FOR = 2.0  # s after a peer last fetched from us that status still says "syncing"
NOT_ADMITTED = "not-admitted"  # the error code of a peer that took our key off its list
NOT_ADMITTED_TEXT = ("{} no longer admits this replica's key (its config changed): to sync "
                     "again, add this replica there with `repld peer add`")  # fmt: skip
# How a peer's status note starts when its address does not answer (a note, not a refusal).
UNANSWERED = "nothing answers at"


@dataclass
class _Refused:
    count: int
    last: float  # time.time() of the last refusal


class _KeyCheck:
    """ZAP callback: admits exactly the public keys of the configured peers (reloadable), and
    notes the keys it refused, which only the dialling side would otherwise hear of: a replica
    not added here yet, or known here under another key (re-initialised, mistyped)."""

    def __init__(self, keys: set[bytes]):
        self.keys = frozenset(keys)
        self._lock = threading.Lock()
        self._refused: dict[str, _Refused] = {}

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:  # pyzmq passes the key Z85-encoded
            return True
        text = key.decode("ascii", "replace")
        with self._lock:  # (called on the authenticator's thread)
            seen = self._refused.pop(text, None)
            self._refused[text] = _Refused((seen.count if seen else 0) + 1, time.time())
            while len(self._refused) > REFUSED_KEPT:
                del self._refused[next(iter(self._refused))]
        if seen is None:
            log.warning("refused a connection from public key %s: it is no peer's key here; if "
                        "it is a replica of this tree, admit it with `repld peer add NAME "
                        "ENDPOINT '%s'`", text, text)  # fmt: skip
        return False

    def refused(self) -> list[dict[str, Any]]:
        """The keys refused lately that are still no peer's key, most recent last."""
        with self._lock:
            items = list(self._refused.items())
        return [{"key": k, "count": r.count, "last": iso_time(r.last)} for k, r in items
                if k.encode() not in self.keys]  # fmt: skip


class Node:
    def __init__(
        self,
        replica: Replica,
        *,
        options: Options | None = None,
        ctx: zmq.Context[Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.rep = replica
        self.cfg = replica.cfg
        self.store = replica.store
        self.opts = options or Options()
        self.ctx = ctx or zmq.Context.instance()
        self.clock = clock
        self.me = Identity(self.store.tree_id, self.store.replica_id, self.cfg.name)
        self.keys = load_keys(self.cfg)
        self.state = "starting"
        self.paused = False
        self._deletes_held = ""  # why a scan's deletions are held back (see _hold_deletes)
        self._settle_at: float | None = None  # a whole scan due once deletions settle
        self._settle_since: float | None = None  # when deletions were first deferred to it
        self._store_error = ""  # why the last scan could not be recorded (a full disk)
        self._recent_deletes: deque[tuple[float, int]] = deque()  # (when, how many) by path scans
        self.links: list[PeerLink] = []
        self.by_rid: dict[bytes, PeerLink] = {}
        self.errors: dict[str, PathError] = {}
        self._keeper = keeper_for(self.cfg.root, self.cfg.versions_dir, self.cfg.keep_versions)
        self.stats = NodeStats()
        self.router: zmq.Socket[bytes] | None = None
        self.auth: ThreadAuthenticator | None = None
        self.keycheck = _KeyCheck(set())
        self.poller = zmq.Poller()
        self._inbox: deque[tuple[PeerLink, list[bytes], wire.Message | None]] = deque()
        self._served_at = -SERVING_FOR  # when a peer last fetched blocks from this replica
        self._serving_waits = False  # requests wait for their peer to read (see _serve)
        # Connections told their key is no longer admitted here (see _no_longer_admitted).
        self._told_not_admitted: set[bytes] = set()
        self._pumping = False
        self._pump_published = 0.0
        self._page_in: tuple[PeerLink, int] | None = None  # link of the page applied, bytes then
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.watcher: Watcher | None = None
        self.commands: deque[tuple[str, dict[str, Any]]] = deque()
        self._commands_lock = threading.Lock()
        self.snapshot: dict[str, Any] = {}
        self._snapshot_lock = threading.Lock()
        self._counts = (0, 0, 0, 0)
        self._counts_seq = -1
        self._counts_at = -COUNTS_EVERY  # monotonic time of the last count
        self._acks_at = 0.0  # ...and of the last write of peers' acknowledgements
        self._root_error = ""  # why the root is not the replica's own directory, while it is not
        # Why nothing is exchanged: a peer has seen more of our records than this database has
        # (restored from a backup): see RolledBack.
        self._rolled_back = ""
        # Which peer said so (its name and entry): taking it off the list undoes its word.
        self._rolled_back_by: tuple[str, configmod.Peer | None] = ("", None)
        self._root_checked = 0.0
        self._rewatched_at = -REWATCH_EVERY
        self._next_full_scan: float | None = None  # monotonic; None: no periodic scan due
        self._next_unwatched_scan: float | None = None  # of the directories beyond the limit
        self._rid_by_name: dict[str, str] | None = None  # see _replica_of
        # When each peer (by name) was last heard from: before this run, when it last synced
        # with this replica (a daemon's session, `repld sync`, a bundle); then, when a link to
        # it last brought anything (kept when the link goes: a peer's one-shot `repld sync`).
        self._heard_at: dict[str, float] = {}
        # What we wrote, so its inotify echo is not rescanned: path -> (deleted, kind, size,
        # mtime_ns, mode, symlink target). An optimisation only (a missed echo costs one scan of the path), so it
        # is kept small: the oldest half goes when it grows past APPLIED_MAX (many echoes never
        # come, e.g. for files written into a directory before its watch was added).
        self._applied: dict[str, tuple[bool, Kind, int, int, int, str]] = {}
        self._db_id: tuple[int, int] | None = None  # the database file's (device, inode)
        self.fatal = ""  # why the daemon must stop (its loop ends)
        self._mounts_missing: set[str] = set()  # mount points of the tree not mounted now
        self.transfers = Transfers(self.store, self.cfg.root, self.cfg.state / "partial", self.pump)
        self.transfers.versions_dir = self.cfg.versions_dir
        self.on_tick: Callable[[], None] | None = None  # systemd glue: status and watchdog
        self._scan_ticked = 0.0
        self.stop_requested = False  # from a signal handler: a whole scan stops (_scan_tick)
        self._mismatch_said: dict[str, str] = {}  # peer -> the wire mismatch logged for it
        self.max_wait = PING_EVERY / 2  # longest idle poll (shorter when a watchdog needs petting)

    # -- setting up -----------------------------------------------------------------------------

    def start(self) -> None:
        self.open()
        self.first_scan()

    def open(self) -> None:
        """Sockets, watches: everything but the first scan."""
        self._db_id = _file_id(self.store.db_path)
        self._setup_auth()
        if self.opts.listen:
            self._bind()
        for peer in self.cfg.peers:
            if self.opts.only_peer is None or peer.name == self.opts.only_peer:
                self._dial(peer)
        self.poller.register(self._wake_r, zmq.POLLIN)
        self._watch()
        self.state = "scanning"
        self.publish()

    def first_scan(self) -> None:
        self.state = "scanning"
        self.publish()
        self.full_scan()
        self.state = "error" if self._root_error else "idle"
        self.publish()

    # -- the root -------------------------------------------------------------------------------

    def _root_ok(self) -> bool:
        """Whether the root is the replica's own directory (see Replica.check_root). While it
        is not, nothing is scanned or applied, the state is "error", and status says why; once
        it is back (a disk mounted again), a full scan catches up."""
        try:
            self.rep.check_root()
        except RootChanged as e:
            if self._root_error != str(e):
                log.error("%s", e)
                self._root_error = str(e)
            self.errors[""] = PathError("", str(e))
            self.state = "error"
            return False
        if self._root_error:
            log.warning("the root %s is back; scanning it", self.cfg.root)
            self._root_error = ""
            self.errors.pop("", None)
            self.state = "idle"
            self._watch()
            self.request_full_scan()
        return True

    def _cannot_record(self, e: Exception) -> None:
        """A scan could not commit what it found (the state directory's disk is full, say):
        nothing of it was recorded. The daemon carries on (peers are still served, and a full
        disk may be made room on) and scans the whole tree again in a while, since the
        watcher's hints of that scan are spent."""
        if self._store_error != str(e):
            log.error("%s; scanning again every %g s until it can be recorded", e, RETRY_EVERY)
        if "" not in self.errors or self.errors[""].error == self._store_error:
            self.errors[""] = PathError("", str(e))  # (not over the root's or the breaker's)
        self._store_error = str(e)
        self._next_full_scan = self.clock() + RETRY_EVERY

    def _hold_deletes(self, e: MassDelete, paths: list[str] | None = None) -> None:
        """The circuit breaker tripped (see Replica._check_deletes): the deletions of that scan
        are not recorded; everything else it found is, at once (a scan without them). Other
        changes still travel, both ways; the next whole scan that finds no mass deletion (or
        `repld scan --accept-deletes`) lifts the hold."""
        if self._deletes_held != str(e):
            log.error("%s", e)
        self._deletes_held = str(e)
        self.errors[""] = PathError("", str(e))
        try:
            stats = self.rep.scan(paths=paths, clean_temp=False, skip_deletes=True)
        except (RootChanged, MassDelete):
            return
        except (StoreError, sqlite3.Error) as e:
            self._cannot_record(e)
            return
        self._scan_done(stats, paths)

    def _accept_root(self) -> None:
        """`repld scan --accept-root`: the directory at the root now is the tree."""
        try:
            self.rep.check_root(accept=True)
        except RootChanged as e:
            log.error("%s", e)  # not there at all: nothing to accept
            return
        log.warning("the root %s was accepted as this replica's tree", self.cfg.root)
        had_error = bool(self._root_error)
        self._root_ok()  # (rewatches when the root was in error)
        if not had_error:
            self._watch()
        self.full_scan()

    def _setup_auth(self) -> None:
        self.keycheck = _KeyCheck({p.public_key.encode() for p in self.cfg.peers})
        self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("repld.daemon.zap"))
        self.auth.start()
        self.auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self.keycheck)

    def _secure(self, s: zmq.Socket[bytes]) -> None:
        s.curve_secretkey = self.keys.secret.encode()
        s.curve_publickey = self.keys.public.encode()
        s.linger = 0
        s.sndhwm = HWM
        s.rcvhwm = HWM
        s.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE + wire.MAX_BLOCK_REQUEST + 4096)
        s.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 8000)
        s.setsockopt(zmq.HEARTBEAT_TTL, 8000)

    def _bind(self) -> None:
        r = self.ctx.socket(zmq.ROUTER)
        self._secure(r)
        r.curve_server = True
        r.zap_domain = ZAP_DOMAIN.encode()
        r.setsockopt(zmq.ROUTER_MANDATORY, 1)
        r.setsockopt(zmq.ROUTER_HANDOVER, 1)
        try:
            r.bind(self.cfg.listen.replace("0.0.0.0", "*"))
        except zmq.ZMQError as e:
            r.close()
            if e.errno == errno.EADDRINUSE:
                fix = ("is another program (another repld?) using that port? Choose another port "
                       "here")  # fmt: skip
            elif e.errno == errno.EADDRNOTAVAIL:
                fix = ("no network interface of this machine has that address: give one it has "
                       "(`ip -brief address`), or 0.0.0.0 for all of them")  # fmt: skip
            elif e.errno == errno.EACCES:
                fix = "ports below 1024 need root: choose a port of 1024 or more"
            else:
                fix = ("is the host a name this machine cannot resolve, or not one of its "
                       "addresses? Give an address of this machine, or 0.0.0.0 for all")  # fmt: skip
            raise ConfigError(  # exit 2: the fix is in the config (or in whatever took the port)
                f"cannot listen on {self.cfg.listen}: {e.strerror}; {fix}",
                file=self.cfg.path,
                key="listen",
            ) from None
        self.router = r
        self.poller.register(r, zmq.POLLIN)
        log.info("listening on %s", self.cfg.listen)

    def _dial(self, peer: configmod.Peer) -> None:
        if peer.public_key == self.keys.public:  # (`peer add` refuses it; a config edited by hand)
            log.error("peer %s in %s has this replica's own public key, so it is not dialled: "
                      "give it the other replica's (`repld id` there prints it)",
                      peer.name, self.cfg.path)  # fmt: skip
            return
        s = self.ctx.socket(zmq.DEALER)
        self._secure(s)
        s.curve_serverkey = peer.public_key.encode()
        s.setsockopt(zmq.IMMEDIATE, 1)
        s.setsockopt(zmq.RECONNECT_IVL, round(REDIAL_EVERY * 1000))
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        s.setsockopt(zmq.HANDSHAKE_IVL, round(HANDSHAKE_SECONDS * 1000))
        mon = s.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_CONNECT_RETRIED
        )
        s.connect(peer.endpoint)
        link = PeerLink(peer, dealer=s, monitor=mon)
        self.links.append(link)
        self.poller.register(s, zmq.POLLIN)
        self.poller.register(mon, zmq.POLLIN)

    def close(self) -> None:
        self._save_acks()
        for link in self.links:
            if link.session is not None and link.established:
                self._send_out(link, link.session.close("shutting down"))
        if self.watcher is not None:
            self.watcher.stop()
        self.transfers.close()
        for link in self.links:
            for s in (link.monitor, link.dealer):
                if s is not None:
                    s.close(linger=0)
        if self.router is not None:
            self.router.close(linger=100)
        if self.auth is not None:
            self.auth.stop()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def reload(self, cfg: configmod.Config) -> None:
        """Take new peers, ignore rules and versioning from a reloaded config without a
        restart."""
        self.cfg = cfg
        self.rep.cfg = cfg
        self._keeper = keeper_for(cfg.root, cfg.versions_dir, cfg.keep_versions)
        self.transfers.versions_dir = cfg.versions_dir
        self.keycheck.keys = frozenset(p.public_key.encode() for p in cfg.peers)
        self._told_not_admitted.clear()
        wanted = {p.name: p for p in cfg.peers}
        if self._rolled_back and wanted.get(self._rolled_back_by[0]) != self._rolled_back_by[1]:
            # Only that peer said this replica was rolled back (it may be wrong, or hostile:
            # a peer's hello is its word), and it is taken off the list: sync again.
            log.warning("%s is no longer a peer (or has another key): its word that this "
                        "replica's database was rolled back no longer stops it",
                        self._rolled_back_by[0])  # fmt: skip
            self._rolled_back, self._rolled_back_by = "", ("", None)
        for link in list(self.links):
            if wanted.get(link.peer.name) != link.peer:
                why = "its entry changed in" if link.peer.name in wanted else "it was removed from"
                if link.peer.name not in wanted and link.established:
                    # Said as a refusal is (its status shows it until it is admitted again);
                    # a plain goodbye left its status with no word of why, half the time.
                    self._send(link, wire.Error(NOT_ADMITTED, NOT_ADMITTED_TEXT.format(cfg.name),
                                                fatal=True))  # fmt: skip
                    self.keycheck.callback("", link.peer.public_key.encode())  # noted refused
                    if link.rid:
                        self._told_not_admitted.add(link.rid)
                self._drop_link(link, f"{why} {cfg.name}'s config")
        dialled = {link.peer.name for link in self.links if link.dealer is not None}
        for name, peer in wanted.items():
            if name not in dialled and (self.opts.only_peer in (None, name)):
                self._dial(peer)
        self._refresh_watches()
        self.request_full_scan()

    def _watch(self) -> None:
        """Start watching the root, or start again: watches follow inodes, so after the root
        was replaced or came back they must be made anew."""
        if not self.opts.watch:
            return
        if self.watcher is not None:
            self.watcher.stop()
        self.watcher = Watcher(self.cfg.root, self._wake_w, exclude=(self.cfg.state,),
                               ignored=self.rep.ignore(),
                               rescan_every=DEGRADED_SCAN_EVERY)  # fmt: skip
        if not self.watcher.start():
            if not self.cfg.root.is_dir():
                # (Said by the root check, which looks for it every ROOT_CHECK_EVERY.)
                log.info("%s: the root is not there; watched once it is", self.watcher.degraded)
                return
            # (The watch limit was told already, with its fix.)
            log.warning("%s; falling back to a full scan every %g s",
                        self.watcher.degraded, DEGRADED_SCAN_EVERY)  # fmt: skip

    def _watch_lost(self, now: float) -> bool:
        """The watcher stopped for a reason that may have passed (the root moved away and back,
        replaced by a symlink meanwhile): worth starting again, once a REWATCH_EVERY. Not when
        inotify is missing or the watch limit is reached: that lasts, and was said already."""
        w = self.watcher
        if not self.opts.watch or w is None or w.alive:
            return False
        lasting = w.degraded.startswith(("cannot use inotify", "inotify watch limit"))
        return not lasting and now - self._rewatched_at >= REWATCH_EVERY

    def _refresh_watches(self) -> None:
        """New ignore rules for the watches, and another try at what could not be watched."""
        if self.watcher is not None and self.watcher.alive:
            self.watcher.refresh(self.rep.ignore())

    def _drop_link(self, link: PeerLink, reason: str) -> None:
        if link.session is not None and link.established:
            self._send_out(link, link.session.close(reason))
        for s in (link.monitor, link.dealer):
            if s is not None:
                self.poller.unregister(s)
                s.close(linger=0)
        if link.rid:
            self.by_rid.pop(link.rid, None)
        # Closing the session of a link the peer dialled in on ends it (see _act, Closed),
        # which takes the link off the list already.
        if link in self.links:
            self.links.remove(link)

    # -- the loop -------------------------------------------------------------------------------

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"c")
        except OSError:
            pass

    def command(self, name: str, **args: Any) -> None:
        """Queue a command from another thread (the control socket)."""
        with self._commands_lock:
            self.commands.append((name, args))
        self.wake()

    def run(self, stop: threading.Event, *, until: Callable[[], bool] | None = None,
            deadline: float | None = None) -> None:  # fmt: skip
        """Loop until ``stop`` is set (or ``until()`` is true, or the monotonic ``deadline``)."""
        while not stop.is_set() and not self.fatal:
            if until is not None and until():
                return
            if deadline is not None and self.clock() > deadline:
                return
            self.step(self._timeout())

    def _timeout(self) -> float:
        t = min(PING_EVERY / 2, self.max_wait)
        if self.watcher is not None:
            due = self.watcher.due(DEBOUNCE_QUIET, DEBOUNCE_LONGEST)
            if due is not None:
                t = min(t, due)
        if self._counts_seq != self.store.committed_seq:
            t = min(t, max(0.0, self._counts_at + COUNTS_EVERY - self.clock()))
        for link in self.links:
            if link.redial_at is not None:
                t = min(t, max(0.0, link.redial_at - self.clock()))
        if self._settle_at is not None:
            t = min(t, max(0.0, self._settle_at - self.clock()))
        if self._inbox:
            t = 0
        return t

    def step(self, timeout: float) -> None:
        self._poll(timeout, defer=False)
        while self._inbox:
            link, frames, msg = self._inbox.popleft()
            self._handle(link, frames, msg)
        if self._drain_wake():
            self._run_commands()
        if self.watcher is not None and not self.paused:
            due = self.watcher.due(DEBOUNCE_QUIET, DEBOUNCE_LONGEST)
            if due is not None and due <= 0:
                full, paths = self.watcher.take()
                if IGNORE_FILE in paths:
                    self._refresh_watches()
                    full = True  # what the new rules no longer ignore is there to be found
                if full:
                    self.full_scan()
                else:
                    self.scan([p for p in paths if not self._our_echo(p)])
        now = self.clock()
        pending = self.watcher.due(DEBOUNCE_QUIET, DEBOUNCE_LONGEST) if self.watcher else None
        quiet = pending is None
        # (Not quiet for ever: a trial's busy replica, writing all along, recorded none of its
        # deletions for as long as it wrote, and the batches of changes that held one with them;
        # a peer's edit meanwhile then brought a deleted file back.)
        overdue = self._settle_since is not None and now - self._settle_since >= SETTLE_LONGEST
        if (
            self._settle_at is not None and not self.paused
            and (now >= self._settle_at and quiet or overdue)
        ):  # fmt: skip
            self._settle_at = self._settle_since = None
            self.full_scan()
        if self.rep.rules_widened:
            self._ask_again()
        self._timers()
        self._send_pages()
        self.publish()
        if self.on_tick is not None:
            self.on_tick()

    def pump(self, timeout: float) -> None:
        """Wait for replies while the applier waits for content; serve block requests meanwhile."""
        self._poll(timeout, defer=True)
        self._timers(quick=True)
        now = self.clock()
        if now - self._pump_published >= PUBLISH_WHILE_FETCHING:
            # A big file takes a while: status shows the bytes coming in meanwhile.
            self._pump_published = now
            self.publish()
        if self.on_tick is not None:
            self.on_tick()

    def _poll(self, timeout: float, *, defer: bool) -> None:
        if self._serving_waits:
            self._serving_waits = self._serve_waiting()
            if self._serving_waits:
                timeout = min(timeout, 0.01)  # (a reply on the wire sets off no event here)
        events = dict(self.poller.poll(timeout * 1000))
        if not events:
            return
        if self.router is not None and self.router in events:
            self._recv_router(defer)
        for link in list(self.links):
            if link.monitor is not None and link.monitor in events:
                self._monitor(link)
            if link.dealer is not None and link.dealer in events:
                self._recv_dealer(link, defer)

    def _drain_wake(self) -> bool:
        got = False
        try:
            while os.read(self._wake_r, 4096):
                got = True
        except BlockingIOError:
            pass
        return got

    # -- bytes in -------------------------------------------------------------------------------

    def _recv_router(self, defer: bool) -> None:
        assert self.router is not None
        for _ in range(1000):
            try:
                parts = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            rid = parts[0].bytes
            user = parts[-1].get("User-Id") if len(parts) > 1 else None
            frames = _frames(parts[1:])
            link = self.by_rid.get(rid)
            if link is None:
                peer = next((p for p in self.cfg.peers if p.public_key == user), None)
                if peer is None:
                    self._no_longer_admitted(rid, user)
                    continue
                link = PeerLink(peer, rid=rid, connected=True)
                self.by_rid[rid] = link
                self.links.append(link)
            self._incoming(link, frames, defer)

    def _no_longer_admitted(self, rid: bytes, key: str | None) -> None:
        """A replica ZAP admitted on a connection made before this config dropped its key
        (`repld peer remove`, a key changed): that connection lives on, and ZAP is not asked
        again. Told once, as a refusal at connection time would be (its status says so), and
        its key noted as refused here (status prints the `peer add` line that admits it)."""
        if rid in self._told_not_admitted:
            return
        self._told_not_admitted.add(rid)
        if key:
            self.keycheck.callback("", key.encode())
        msg = wire.Error(NOT_ADMITTED, NOT_ADMITTED_TEXT.format(self.cfg.name), fatal=True)
        if self.router is not None:
            try:
                self.router.send_multipart([rid, *wire.encode(msg)], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def _recv_dealer(self, link: PeerLink, defer: bool) -> None:
        assert link.dealer is not None
        for _ in range(1000):
            try:
                frames = _frames(link.dealer.recv_multipart(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                return
            self._incoming(link, frames, defer)

    def _incoming(self, link: PeerLink, frames: list[bytes], defer: bool) -> None:
        link.last_seen = self.clock()
        link.last_seen_wall = self._heard_at[link.peer.name] = time.time()
        if defer:
            # Inside the applier: only block traffic is handled now, the rest after this page.
            try:
                msg = wire.decode(frames)
            except ProtocolError:
                msg = None
            if isinstance(msg, (wire.GetBlocks, wire.GetFiles)) and link.established:
                self._serve(link, msg)
                return
            if isinstance(msg, (wire.Blocks, wire.Files)) or (
                isinstance(msg, wire.Error) and msg.req
            ):
                self.transfers.arrived(msg)
                return
            if isinstance(msg, wire.Bye) or (isinstance(msg, wire.Error) and msg.fatal):
                link.bye_heard = True  # the session ends after this page: fetch no more on it
            self._inbox.append((link, frames, msg))
            return
        if self._inbox:
            # What came in while a page was being applied goes first: handled now, a later page
            # would be applied before an earlier one, which would then be taken for a page held
            # already, and its records never asked for again (a trial: replicas different for
            # good, every side saying it was in sync).
            self._inbox.append((link, frames, None))
            return
        self._handle(link, frames, None)

    def _handle(self, link: PeerLink, frames: list[bytes], msg: wire.Message | None) -> None:
        if msg is None:
            try:
                msg = wire.decode(frames)
            except WireMismatch as e:
                self._wire_mismatch(link, e.version)
                return
            except ProtocolError as e:
                kind, req = wire.message_type(frames)
                self._complain(link, "malformed", f"malformed message: {e}", req=req)
                if link.session is not None and kind == "records":
                    # Carrying on would acknowledge the next page, and the records of this one
                    # would never come again: the session ends, and the next streams from
                    # what was taken (a fault that repeats shows in status, nothing is lost).
                    link.error = f"a page of records it sent was malformed: {e}"
                    link.error_passes = True  # (until a session is made again)
                    self._end_session(link, link.error)
                return
        if isinstance(msg, wire.Hello):
            self._start_session(link, msg)
            return
        if link.session is None:
            if isinstance(msg, (wire.GetBlocks, wire.GetFiles)):
                self._serve(link, msg)
            elif not isinstance(msg, (wire.Error, wire.Bye, wire.Blocks, wire.Files)):
                # The peer thinks a session is on; ours ended (a disconnect we saw and it did
                # not): start a new one, which streams again from our marks.
                self._restart(link, self._replica_of(link.peer.name))
            return
        try:
            out = link.session.receive(msg)
        except ProtocolError as e:
            self._complain(link, "protocol", str(e))
            return
        self._send_out(link, out)

    def _wire_mismatch(self, link: PeerLink, version: object) -> None:
        """A message in another version of the wire protocol: the peer runs another repld.
        Said in its status and logged once (not as a malformed message, and not at each of its
        hellos), and answered at most once a minute (a repld of this version or later names
        the mismatch too; an older one logs that it cannot read the answer). Its hellos are
        still answered now and then: once both run the same version, they sync."""
        text = (f"{WIRE_MISMATCH}: it speaks wire protocol {version!r:.20}, this one "
                f"{wire.WIRE_VERSION}; nothing is exchanged until both machines run the same "
                "repld version (`repld --version` on each)")  # fmt: skip
        if link.error != text:
            if self._mismatch_said.get(link.peer.name) != text:  # (once, not once a link)
                log.warning("%s: %s", link.label, text, extra={"PEER": link.label})
                self._mismatch_said[link.peer.name] = text
            link.error, link.error_passes = text, True  # (cleared by a session)
        if link.session is not None:
            self._end_session(link, text)
        now = self.clock()
        if now - link.mismatch_told >= 60:
            link.mismatch_told = now
            self._send(link, wire.Error("wire", text, fatal=True))

    def _complain(self, link: PeerLink, code: str, text: str, req: int = 0) -> None:
        """Log and answer a bad message, but at most 10 times a minute per link: garbage in a
        flood must not turn into a flood of log lines and replies."""
        now = self.clock()
        while link.complaints and now - link.complaints[0] > 60:
            link.complaints.popleft()
        if len(link.complaints) >= 10:
            return
        link.complaints.append(now)
        log.warning("%s: %s", link.label, text, extra={"PEER": link.label})
        self._send(link, wire.Error(code, text, req=req))  # (req: a request's, it can match)

    def _monitor(self, link: PeerLink) -> None:
        assert link.monitor is not None
        while True:
            try:
                ev = recv_monitor_message(link.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = ev["event"]
            if kind == zmq.EVENT_CONNECT_RETRIED:
                # Nothing accepts the connection there (refused, or no route): said in the
                # peer's status, which would else say only "not connected" (a wrong port looks
                # the same as a machine that is off). Not an error that ends anything.
                if not link.unanswered:
                    link.unanswered = (
                        f"{UNANSWERED} {link.peer.endpoint} (since "
                        f"{iso_time(time.time())}): the machine off or asleep, its daemon "
                        "stopped, or a wrong address or port"
                    )
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                link.connected = True
                link.unanswered = ""
                link.error = ""
                log.info(
                    "%s: connected to %s%s",
                    link.label,
                    link.peer.endpoint,
                    f" after {link.failures} failed handshake(s)" if link.failures else "",
                    extra={"PEER": link.label},
                )
                link.redial_wait, link.failures = 0.0, 0
                self._start_session(link, None)
            elif kind == zmq.EVENT_DISCONNECTED:
                if link.connected:
                    log.info("%s: disconnected", link.label, extra={"PEER": link.label})
                link.connected = False
                self._end_session(link, "disconnected")
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._handshake_failed(
                    link,
                    f"{link.peer.endpoint} refused our key: add this replica on {link.peer.name} "
                    "with `repld peer add` (see `repld id`)",
                )
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and ev["value"] == errno.EAGAIN:
                # Its handshake timed out: something took the connection (the kernel does, for
                # a process that is stopped) and never answered. A trial's laptop, asleep
                # (SIGSTOP), was reported as a key mismatch; a wrong key fails at once (EPIPE).
                self._handshake_failed(
                    link,
                    f"{link.peer.endpoint} took the connection but did not answer within "
                    f"{HANDSHAKE_SECONDS:g} s: the machine asleep or overloaded, or its daemon "
                    "stopped (not ended)",
                )
            elif kind in (
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
            ):
                self._handshake_failed(
                    link,
                    f"handshake with {link.peer.endpoint} failed: its public key is not the one "
                    f"listed here for {link.peer.name} (see `repld id` there), or it went away "
                    "in the middle",
                )

    def _handshake_failed(self, link: PeerLink, error: str) -> None:
        """A dial whose handshake failed: a key that is wrong on one side or the other, and
        stays wrong until someone edits a config.

        Left to ZeroMQ (4.3), a peer that refused our key is never dialled again (not even once
        it has been told our key), and one we know under a wrong key is dialled every
        REDIAL_EVERY, forever: a warning 20 times a second, and the CPU to go with it. So the
        dealer lets go of the endpoint, and ``_timers`` dials it again after a pause that
        doubles with each failure in a row, up to REDIAL_MAX (back to none once a handshake
        succeeds); and the warning is logged once every HANDSHAKE_WARN_EVERY per link, then
        with how many repeats went unlogged (the peer's status shows the error meanwhile)."""
        now = self.clock()
        link.error = error
        link.failures += 1
        if link.warned_at is None or error != link.warned:
            log.warning("%s: %s", link.label, error, extra={"PEER": link.label})
            link.warned_at, link.warned, link.suppressed = now, error, 0
        elif now - link.warned_at >= HANDSHAKE_WARN_EVERY:
            log.warning("%s: %s (again: %d more time(s) in the last %.0f s)", link.label,
                        error, link.suppressed + 1, now - link.warned_at,
                        extra={"PEER": link.label})  # fmt: skip
            link.warned_at, link.suppressed = now, 0
        else:
            link.suppressed += 1
        if link.dealer is None or link.redial_at is not None:
            return  # (already let go of: a late event of the same failure)
        try:
            link.dealer.disconnect(link.peer.endpoint)
        except zmq.ZMQError:
            pass  # ZeroMQ let go of it itself (it does after a refusal)
        link.redial_wait = min(max(2 * link.redial_wait, 2 * REDIAL_EVERY), REDIAL_MAX)
        link.redial_at = now + link.redial_wait
        log.debug("%s: %d failed handshake(s) in a row; dialling again in %.2g s", link.label,
                  link.failures, link.redial_wait, extra={"PEER": link.label})  # fmt: skip

    def _redial(self, now: float) -> None:
        """Dial again the peers whose pause after a failed handshake is over."""
        for link in self.links:
            if link.redial_at is not None and now >= link.redial_at and link.dealer is not None:
                link.redial_at = None
                link.dealer.connect(link.peer.endpoint)

    # -- sessions -------------------------------------------------------------------------------

    def _new_session(self, link: PeerLink, peer_replica: str | None) -> Session:
        seen = self.store.peer_mark(peer_replica).seen_seq if peer_replica else 0
        link.bye_heard = False
        return Session(
            self.me,
            seq=self.store.committed_seq,
            seen=seen,
            seen_of=peer_replica or "",
            send=self.opts.send,
            receive=self.opts.receive,
        )

    def _start_session(self, link: PeerLink, hello: wire.Hello | None) -> None:
        """A new connection (``hello`` None: we speak first), or the peer's hello.

        A hello that is not a reply starts a new session on both sides: we answer it with a
        reply, and a reply is never answered, so two sides that both restart cannot bounce
        hellos forever.
        """
        if hello is None:
            # Who answers is known only from its hello: guess from the name we last saw it
            # under; the session starts over from nothing if the guess was wrong.
            link.session = self._new_session(link, self._replica_of(link.peer.name))
            link.last_hello = self.clock()
            self._send(link, link.session.hello())
            return
        if self._impostor(link, hello):
            return
        s = link.session
        if hello.reply:
            if s is not None and s.state is State.HELLO_SENT:
                if s.seen_of != hello.replica_id and self.store.peer_mark(hello.replica_id).seen_seq:
                    # We guessed the wrong replica: ask again, knowing who it is this time.
                    self._restart(link, hello.replica_id)
                    return
                self._send_out(link, s.receive(hello))
            elif s is None or s.state is State.CLOSED:
                self._restart(link, hello.replica_id)
            return  # a duplicate reply on a live session: nothing to do
        now = self.clock()
        if now - link.hello_at < HELLO_PACE:
            link.hello_waiting = hello  # taken by _timers once the pace allows
            return
        link.hello_at, link.hello_waiting = now, None
        if s is not None and s.state is State.ESTABLISHED:
            log.info("%s: new session (the peer restarted or reconnected)", link.label,
                     extra={"PEER": link.label})  # fmt: skip
        s = self._new_session(link, hello.replica_id)
        link.session = s
        self._send(link, s.hello(reply=True))
        self._send_out(link, s.receive(hello))

    def _impostor(self, link: PeerLink, hello: wire.Hello) -> bool:
        """Whether ``hello`` claims the replica id of another configured peer (known here from
        syncing with it under its own key): a peer may not speak for another, whose marks
        here it would move (a hostile peer's trial cut an honest one off so). The session is
        not started, and the claim is answered and logged (see _complain)."""
        known = self._replica_of(link.peer.name)
        if hello.replica_id == known:
            return False
        mark = self.store.peer_mark(hello.replica_id)
        other = self.cfg.peer(mark.name) if mark.name and mark.name != link.peer.name else None
        if other is None or other.public_key == link.peer.public_key:
            return False  # (two names for one machine, one key: no impostor)
        self._complain(link, "impostor", f"its hello claims to be replica {hello.replica_id}, "
                       f"which is {mark.name}'s here (another peer, another key): refused")  # fmt: skip
        return True

    def _restart(self, link: PeerLink, replica_id: str | None) -> None:
        """Start a new session on a live connection (at most every 2 s per link)."""
        if self.clock() - link.last_hello < 2.0:
            return
        link.last_hello = self.clock()
        link.session = self._new_session(link, replica_id)
        self._send(link, link.session.hello())

    def _ask_again(self) -> None:
        """The ignore rules changed so that paths they ignored may be replicated now, and the
        records of those paths were skipped when they came: start every session anew from each
        peer's first record (what is here already merges as equal)."""
        self.rep.rules_widened = False
        try:
            self.store.forget_seen()  # again: a page applied since may have moved a mark
        except (ReplError, sqlite3.Error) as e:
            log.warning("ignore rules changed, but the peers cannot be asked again: %s", e)
            return
        for link in self.links:
            s = link.session
            if s is not None and s.state in (State.ESTABLISHED, State.HELLO_SENT):
                # (A hello on its way carries the old mark: it is asked again too.)
                log.info("%s: ignore rules changed: asking for every record again", link.label,
                         extra={"PEER": link.label})  # fmt: skip
                link.last_hello = float("-inf")
                self._restart(link, s.peer.replica_id if s.peer is not None else s.seen_of or None)

    def _replica_of(self, name: str) -> str | None:
        """The replica last seen under ``name`` (a re-initialised peer leaves an older mark).

        Read from the database once; sessions keep it current (status asks every loop)."""
        if self._rid_by_name is None:
            self._rid_by_name = {}
            for m in sorted(self.store.peer_marks(), key=lambda m: m.last_sync_ns):
                self._rid_by_name[m.name] = m.replica_id
                heard = self._heard_at.get(m.name, 0.0)
                self._heard_at[m.name] = max(heard, m.last_sync_ns / 1e9)
        return self._rid_by_name.get(name)

    def _last_heard(self, name: str) -> float:
        """When the peer ``name`` was last heard from (see _heard_at); 0.0: never."""
        self._replica_of(name)  # (reads the marks' times into _heard_at, the first time)
        return self._heard_at.get(name, 0.0)

    def _end_session(self, link: PeerLink, reason: str) -> None:
        self._save_acks([link])
        if link.session is not None and link.session.state is not State.CLOSED:
            link.session.state = State.CLOSED
            link.session.close_reason = reason
        link.session = None
        if link.dealer is None:
            self.by_rid.pop(link.rid, None)
            if link in self.links:
                self.links.remove(link)

    def _send_out(self, link: PeerLink, out: Output) -> None:
        s = link.session
        for msg in out.send:
            if link.session is not s:
                return
            self._send(link, msg)
        for action in out.actions:
            if link.session is not s:
                # A send failed and ended the session (a peer stopped or gone): what is left
                # (a page to apply, blocks to serve) belonged to it, and comes again with the
                # next one.
                log.debug("%s: session ended; %d action(s) dropped", link.label,
                          len(out.actions))  # fmt: skip
                return
            self._act(link, action)

    def _act(self, link: PeerLink, action: object) -> None:
        if isinstance(action, Established):
            h = action.peer
            # (Its `seen` counts this replica's records only if it says so: a dialler that
            # guessed another replica, one this replica was before a rejoin, counts that one's.)
            ours = h.seen_of == self.store.replica_id
            if ours and h.seen > self.store.committed_seq and not self._rolled_back:
                self._rolled_back = str(RolledBack(link.peer.name, h.seen,
                                                   self.store.committed_seq, self.cfg.path))
                self._rolled_back_by = (link.peer.name, link.peer)
                log.error("%s", self._rolled_back)
                for other in list(self.links):
                    if other is not link and other.session is not None:
                        self._end_session(other, "this replica's database was rolled back")
            if self._rolled_back:
                link.error = self._rolled_back  # (a one-shot sync says it and exits)
                self._end_session(link, "this replica's database was rolled back")
                return
            log.info("%s: in session with %s (%s) on %s, its seq %d, it has seen ours up to %d",
                     link.label, h.name, h.replica_id[:8],
                     "our connection to it" if link.dealer is not None else "its connection to us",
                     h.seq, h.seen)  # fmt: skip
            link.established_at = self.clock()
            self._mismatch_said.pop(link.peer.name, None)  # (said again if it comes again)
            if link.error_passes:
                link.error, link.error_passes = "", False
            # How far it has our records (from its hello), for `repld export --since` it.
            acked = link.session.confirmed_upto if link.session else 0
            with self.store.transaction():
                self.store.set_peer_mark(h.replica_id, name=link.peer.name, acked_seq=acked)
            link.acked_saved = acked
            if self._rid_by_name is not None:
                self._rid_by_name[link.peer.name] = h.replica_id
            for other in list(self.links):
                # A peer that dialled in again (it restarted): its old link is dead.
                if (other is not link and other.dealer is None and link.dealer is None
                        and other.session is not None and other.session.peer is not None
                        and other.session.peer.replica_id == h.replica_id):  # fmt: skip
                    self._end_session(other, "replaced by a new connection")
        elif isinstance(action, ApplyPage):
            link.records_at = self.clock()
            self._apply_page(link, action)
            link.records_at = self.clock()  # (a long page is not a silence)
        elif isinstance(action, ServeBlocks):
            self._served_at = self.clock()
            self._serve(link, action.request)
        elif isinstance(action, BlocksArrived):
            self.transfers.arrived(action.reply)
        elif isinstance(action, PeerError):
            log.warning(
                "%s: the peer reports: %s",
                link.label,
                action.error.message,
                extra={"PEER": link.label},
            )
            if action.error.fatal:
                link.error = action.error.message
                link.error_passes = action.error.code == NOT_ADMITTED
        elif isinstance(action, Closed):
            if action.fatal:
                link.error = action.reason
                log.error("%s: %s", link.label, action.reason, extra={"PEER": link.label})
            else:
                log.info(
                    "%s: session ended: %s", link.label, action.reason, extra={"PEER": link.label}
                )
            self._save_acks([link])
            link.session = None
            if link.dealer is None:
                self._end_session(link, action.reason)

    def _serve(self, link: PeerLink, req: wire.GetBlocks | wire.GetFiles) -> None:
        """Answer a request for content, unless the replies sent to this peer and not yet on
        the wire hold SERVE_PENDING bytes already: then it waits (see _serve_waiting). A peer
        that asks and never reads (a trial's hostile one: 1.7 GB here for 100 requests of 16
        MiB) gets no more than that, and no more than SERVE_WAITING requests wait; honest ones
        have far fewer in flight."""
        if link.unsent_bytes() >= SERVE_PENDING:
            if len(link.serve_waiting) >= SERVE_WAITING:
                link.serve_waiting.popleft()  # (dropped: an honest asker would ask again)
            link.serve_waiting.append(req)
            self._serving_waits = True
            return
        reply = answer(self.store, self.cfg.root, req)
        size = len(reply.data) if isinstance(reply, (wire.Blocks, wire.Files)) else 0
        self._send(link, reply, track=size >= (64 << 10))
        if size and link.tracker is not None:
            link.unsent.append((link.tracker, size))
            link.tracker = None

    def _serve_waiting(self) -> bool:
        """Answer the requests that waited for their peer to read earlier replies; whether any
        still wait."""
        waiting = False
        for link in self.links:
            while link.serve_waiting and link.unsent_bytes() < SERVE_PENDING:
                self._serve(link, link.serve_waiting.popleft())
            waiting = waiting or bool(link.serve_waiting)
        return waiting

    def _send(self, link: PeerLink, msg: wire.Message, *, track: bool = False) -> bool:
        frames = wire.encode(msg)
        # Zero-copy pays off only for big frames; for small ones its bookkeeping costs more.
        copy = sum(len(f) for f in frames) < (64 << 10)
        track = track and not copy
        try:
            if link.dealer is not None:
                sent = link.dealer.send_multipart(frames, zmq.NOBLOCK, copy=copy, track=track)
            elif self.router is not None:
                sent = self.router.send_multipart([link.rid, *frames], zmq.NOBLOCK, copy=copy,
                                                  track=track)  # fmt: skip
            else:
                return False
            if track:
                link.tracker = sent  # (a MessageTracker: done once ZeroMQ let go of the data)
        except zmq.ZMQError as e:
            if e.errno in (zmq.EAGAIN, zmq.EHOSTUNREACH):
                if link.session is not None:
                    log.info(
                        "%s: cannot send (%s): peer gone",
                        link.label,
                        e.strerror,
                        extra={"PEER": link.label},
                    )
                    self._end_session(link, "peer unreachable")
                return False
            raise
        return True

    # -- streaming our records ------------------------------------------------------------------

    def _active(self, link: PeerLink) -> bool:
        """With two links to one replica (both dialled), only the one dialled by the smaller
        replica id carries records; both sides pick the same one without talking about it."""
        s = link.session
        if s is None or s.peer is None:
            return False
        other = next(
            (o for o in self.links if o is not link and o.established and o.session is not None
             and o.session.peer is not None and o.session.peer.replica_id == s.peer.replica_id),
            None,
        )  # fmt: skip
        we_dial_preferred = self.me.replica_id < s.peer.replica_id
        preferred = (link.dealer is not None) == we_dial_preferred
        if other is None:
            # The preferred link may be a moment away (both sides dial at start): give it a
            # second before streaming everything twice; after that, any link will do.
            return preferred or self.clock() - link.established_at > LINK_GRACE
        return preferred

    def _send_pages(self) -> None:
        top = self.store.committed_seq
        for link in self.links:
            s = link.session
            if s is None:
                continue
            s.local_changed(top)
            if not self._active(link):
                continue
            if self.opts.hold_send and not s.received_all:
                continue
            peer = s.peer.replica_id if s.peer is not None else ""
            while (after := s.page_from()) is not None:
                ahead = self.store.page_since(after, PAGE_RECORDS + 1)
                recs = ahead[:PAGE_RECORDS]
                if not recs:
                    page = s.page((), top)
                else:
                    size, n = 0, 0
                    content: dict[str, bytes] = {}
                    inline = 0  # bytes of it
                    for r in recs:
                        n += 1
                        # (A version's text is up to 58 bytes a replica: 10k of them made a
                        # page over the receiver's limit, refused and sent again for ever.)
                        size += (200 + len(r.blocks) + len(r.path) + len(r.target)
                                 + 60 * len(r.version.entries))  # fmt: skip
                        if size > PAGE_BYTES:
                            break
                        if (
                            r.modified_by != peer  # (it has this version, or had it)
                            and r.sha256 not in content and inline + r.size <= wire.INLINE_PAGE
                        ):  # fmt: skip
                            data = inline_content(self.cfg.root, r)
                            if data is not None:
                                content[r.sha256] = data
                                size += len(data)
                                inline += len(data)
                    cut = n == PAGE_RECORDS or size > PAGE_BYTES
                    if cut and _move_split(ahead, n):
                        n += 1  # the old path's tombstone: the peer renames, not copies
                    recs = ahead[:n]
                    upto = recs[-1].seq if cut else top
                    files, nbytes = self._still_to_send(link, after, upto, top, recs)
                    # (Placeholders are ours alone; the page still covers their numbers.)
                    page = s.page(tuple(r for r in recs if not is_placeholder(r)), upto,
                                  files, nbytes, content)  # fmt: skip
                if not self._send(link, page):
                    break

    def _still_to_send(
        self, link: PeerLink, after: int, upto: int, top: int, recs: list[Record]
    ) -> tuple[int, int]:
        """How many records (and bytes of live files) the peer will still lack after this page,
        for its status. Counted by the database at most once a COUNTS_EVERY per link: a count
        passes over every record after ``upto``, and once a page it made streaming 100k records
        quadratic. In between: the last count less what the pages since then held (close; new
        local changes show at the next count)."""
        if upto >= top:
            return 0, 0
        now = self.clock()
        last = link.still_to_send
        if last is not None and last[1] == after and now - last[0] < COUNTS_EVERY:
            files = max(0, last[2] - len(recs))
            live = sum(r.size for r in recs if not r.deleted)
            nbytes = max(0, last[3] - live)
            link.still_to_send = (last[0], upto, files, nbytes)
        else:
            files, nbytes = self.store.count_since(upto)
            link.still_to_send = (now, upto, files, nbytes)
        return files, nbytes

    # -- applying a peer's records --------------------------------------------------------------

    def _policy(self) -> Policy:
        return self.opts.policy or self.cfg.conflict_policy

    def _apply_page(self, link: PeerLink, page: ApplyPage) -> None:
        s = link.session
        if s is None or s.peer is None:
            return  # (the session ended: the page is asked for again by the next one)
        peer_id = s.peer.replica_id
        me = self.store.replica_id
        top = self.store.seq
        if (forged := next((r for r in page.records if r.version.get(me) > top), None)):
            # This replica's own events count up to its sequence number: a record that claims
            # more of them was made up (a hostile peer's trial: the next edit here counted past
            # what the wire takes, and every peer refused this replica's pages for good). Or
            # this replica was rolled back, which the hello says, and which stops it anyway.
            text = (f"a record it sent, {escape(forged.path)}, claims edits of this replica "
                    f"that it never made ({forged.version.get(me)}, it is at {top}): refused")
            self._complain(link, "malformed", text)
            link.error, link.error_passes = text, True
            self._end_session(link, text)
            return
        policy = self._policy()
        # What planning and applying the page will ask of the store, in a few queries.
        self.store.read_ahead([r.path for r in page.records],
                              [r.sha256 for r in page.records if r.sha256])  # fmt: skip
        behind: list[Record] = []
        steps = list(pull_steps(self.rep, page.records, policy=policy, within=self.opts.within,
                                behind=behind))  # fmt: skip
        ok = True
        stats_errors: list[tuple[str, str]] = []  # of an apply that went to the end
        if not self.opts.dry_run and steps and (self._root_error or self.paused):
            ok = False  # asked for again once the root is back, or the daemon resumed
        elif self.opts.dry_run:
            self.stats.dry_steps.extend(filter(_listed, Applier.planned_moves(self.store, steps)))
        elif steps:
            self.state = "syncing"
            self.publish()
            remote = {r.path: r for r in page.records}
            fetch_link = FetchLink(link.label, lambda m: self._send(link, m),
                                   lambda: link.session is s and s.state is State.ESTABLISHED
                                   and not link.bye_heard)  # fmt: skip
            writes = [st for st in steps if st.op is Op.WRITE and st.record.kind is Kind.FILE]
            local = self.store.hashes_present({st.record.sha256 for st in writes})
            self.transfers.prefetch(
                fetch_link,
                [(st.record, st.source or st.path) for st in writes
                 if st.record.sha256 not in local],
                page.content,
                [r for r in page.records if r.deleted and r.kind is Kind.FILE],
            )  # fmt: skip

            def replan(step: Step) -> list[Step]:
                self.rep.scan(paths=[step.path], strict_deletes=bool(self._deletes_held))
                rec = remote.get(step.path) or remote.get(conflict_original(step.path) or "")
                if rec is None:
                    return []
                # (For a conflict copy, rec is its original's record: planned at its own path.)
                return plan_record(self.store.get(rec.path), rec, replica=me, policy=policy,
                                   local_lookup=self.store.get)  # fmt: skip

            applier = Applier(
                self.store,
                self.cfg.root,
                lambda rec: self.transfers.open(rec, rec.path),  # type: ignore[arg-type,return-value]
                via=link.peer.name,
                replan=replan,
                keep_steps=True,
                check_root=self.rep.check_root,
                keeper=self._keeper,
            )
            root_lost = False  # or the peer: the apply stopped in the middle of the page
            self._page_in = (link, self.transfers.stats.arrived_bytes)
            try:
                stats = applier.apply(steps)
            except RootChanged:
                # The root went away in the middle (a disk unplugged): what was applied before is
                # recorded; the rest of the page is asked for again once the root is back.
                stats, root_lost = applier.stats, True
                self._root_ok()
            except MassDelete as e:
                # A rescan of a path the page found changed found most of the tree gone.
                stats, root_lost = applier.stats, True
                self.state = "idle"
                self._hold_deletes(e)
            except (StoreError, sqlite3.Error) as e:
                # The database cannot take it (a full disk): the page is asked for again later.
                stats, root_lost = applier.stats, True
                self.state = "idle"
                log.error("%s: %s; this page is asked for again in %g s", link.label, e,
                          RETRY_EVERY, extra={"PEER": link.label})  # fmt: skip
            except PeerLost as e:
                # Likewise the peer: the rest of the page comes again with the next session.
                stats, root_lost = applier.stats, True
                self.state = "idle"
                log.info("%s: %s; the rest of this page is asked for again later", link.label, e,
                         extra={"PEER": link.label})  # fmt: skip
            finally:
                self.transfers.reset()
                self._page_in = None
            self._count(stats)
            self._log_applied(link.peer.name, stats)
            if len(self._applied) > APPLIED_MAX:
                for path in list(itertools.islice(self._applied, APPLIED_MAX // 2)):
                    del self._applied[path]
            if self.opts.keep_steps:
                self.stats.done_steps.extend(filter(_listed, stats.done))
            for st in stats.done:
                r = st.record
                self.transfers.forget(st.path)
                self._applied.pop(st.path, None)  # (re)inserted last: the newest
                self._applied[st.path] = (r.deleted, r.kind, r.size, r.mtime_ns, r.mode, r.target)
            stopped = 0  # files left for the next start (SIGTERM): said once, not each
            for path, err in stats.errors:
                prev = self.errors.get(path)
                if VERSION_GONE in err and prev is not None and prev.error.startswith(err):
                    err += UNLESS_HELD  # asked again, and still no newer version came
                # (A page retried every 10 s fails the same way each time: said once. A file
                # that changed again on the peer while it was fetched is no trouble at all.)
                level = logging.DEBUG if prev is not None and prev.error == err else logging.WARNING
                if VERSION_GONE in err and level == logging.WARNING:
                    level = logging.INFO
                if STOPPING in err:
                    stopped += 1
                    level = logging.DEBUG
                self.errors[path] = PathError(path, err, link.peer.name)
                said = err if err.startswith(path) else f"{escape(path)}: {err}"
                log.log(level, "%s: %s", link.peer.name, said,
                        extra={"PEER": link.peer.name, "PATH": path})  # fmt: skip
            if stopped:
                log.info("%s: %d file(s) not fetched: repld is stopping; the next start takes "
                         "them", link.peer.name, stopped, extra={"PEER": link.peer.name})  # fmt: skip
            failed = {p for p, _ in stats.errors}
            for st in stats.done if root_lost else steps:
                if st.path in self.errors and st.path not in failed:
                    del self.errors[st.path]
            ok = not stats.errors and not root_lost
            if not root_lost:
                self.state = "idle"
                stats_errors = stats.errors
        if behind and not self.opts.dry_run:
            try:
                resend_lost(self.rep, behind,
                            max(s.confirmed_upto, self.store.peer_mark(peer_id).acked_seq))  # fmt: skip
            except (ReplError, sqlite3.Error) as e:
                log.warning("%s: could not send records again: %s", link.label, e)
        if self.opts.within is not None or self.opts.dry_run:
            ok = False  # a subtree sync or a dry run must not move the mark past what it skipped
        seen_before = s.seen
        still_needed = None  # (files, bytes) of the page not applied: None, all of it
        if not ok and stats_errors:
            sizes = {r.path: r.size for r in page.records if not r.deleted}
            still_needed = (len(stats_errors), sum(sizes.get(p, 0) for p, _ in stats_errors))
        out = s.applied(page.upto, ok, still_needed)
        if ok and s.received_all and s.failed_from is None:
            # Caught up with this peer, nothing failed: a version it no longer had when asked
            # was superseded by what came since (a trial: a conflict copy replaced within a
            # second, its error left in status for good, "not in sync" on both sides).
            for path, e in list(self.errors.items()):
                if e.peer == link.peer.name and VERSION_GONE in e.error:
                    del self.errors[path]
        if s.seen != seen_before:
            with self.store.transaction():
                self.store.set_peer_mark(peer_id, name=link.peer.name, seen_seq=s.seen)
        self._send_out(link, out)

    def _log_applied(self, peer: str, stats: ApplyStats) -> None:
        """What a page changed here, for the journal: a line per page, a line per conflict,
        and (with --debug) a line per path."""
        for st in stats.done:
            log.debug("%s: %s", peer, st.describe())
            c = st.conflict
            if c is not None:
                kept = (f"the other version kept as {c.copy.path}" if c.copy
                        else "no conflict copy: the other is kept in its replica's "
                        "`repld versions`")  # fmt: skip
                # (The step may be the copy's own, written first: the conflict is on c.path.)
                log.warning("%s: conflict on %s: %s version wins (%s); %s", peer, c.path,
                            c.winner.value, c.reason, kept, extra={"PEER": peer, "PATH": c.path})  # fmt: skip
        if stats.written or stats.deleted or stats.conflicts or stats.moved:
            moved = f", {stats.moved:d} moved" if stats.moved else ""
            log.info("%s: %d file(s) written (%s bytes)%s, %d deleted, %d conflict(s)", peer,
                     stats.written, f"{stats.written_bytes:,}", moved, stats.deleted,
                     stats.conflicts)  # fmt: skip

    def _count(self, stats: ApplyStats) -> None:
        a = self.stats.applied
        a.written += stats.written
        a.written_bytes += stats.written_bytes
        a.copied_locally += stats.copied_locally
        a.copied_locally_bytes += stats.copied_locally_bytes
        a.moved += stats.moved
        a.deleted += stats.deleted
        a.recorded += stats.recorded
        a.conflicts += stats.conflicts
        a.kept_dirs += stats.kept_dirs

    # -- scanning -------------------------------------------------------------------------------

    def scan(self, paths: list[str]) -> None:
        if not paths or self._root_error:
            return
        # Said before, not after: hashing a big new file takes a while, and until its record
        # is committed, status must not say idle and in sync.
        was, self.state = self.state, "scanning"
        self.publish()
        try:
            # (While a burst of deletions settles, any deletion is part of it; and deletions
            # that trickle in count together over a minute, or a slow script deleting one file
            # at a time would never be judged.)
            now = self.clock()
            while self._recent_deletes and self._recent_deletes[0][0] < now - DELETES_WINDOW:
                self._recent_deletes.popleft()
            recent = sum(n for _, n in self._recent_deletes)
            defer = 1 if self._settle_at is not None else max(1, DEFER_DELETES - recent)
            stats = self.rep.scan(paths=paths, clean_temp=False, defer_deletes=defer,
                                  strict_deletes=bool(self._deletes_held))  # fmt: skip
        except RootChanged:
            self._root_ok()  # says why, and stops scanning and applying until it is back
            return
        except (StoreError, sqlite3.Error) as e:
            self._cannot_record(e)
            return
        except DeletesDeferred:
            # Many deletions in one batch of events: an rm -rf may be under way, and the watcher
            # hands it over in pieces, each a small part of the tree. A whole scan judges it
            # once the tree has been quiet a moment (see Replica._check_deletes), or has not been
            # for SETTLE_LONGEST.
            self._settle_at = self.clock() + SETTLE_DELETES
            if self._settle_since is None:
                self._settle_since = self.clock()
            return
        except MassDelete as e:
            self._hold_deletes(e, paths)
            return
        finally:
            if self.state == "scanning":
                self.state = was
            if self._deletes_held:
                # Files put back come through the watcher as paths: a whole scan, once the
                # tree is quiet, sees whether the hold still holds.
                self._settle_at = self.clock() + SETTLE_DELETES
        if stats.deleted:
            self._recent_deletes.append((self.clock(), stats.deleted - stats.moved))
        self._scan_done(stats, paths)

    def _our_echo(self, path: str) -> bool:
        """Whether an inotify event for ``path`` is only the echo of our own write."""
        wrote = self._applied.pop(path, None)
        if wrote is None:
            return False
        deleted, kind, size, mtime_ns, mode, target = wrote
        full = os.path.join(self.cfg.root, path)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            return deleted
        except OSError:
            return False
        if deleted or kind_of(st.st_mode) is not kind:
            return False
        if kind is Kind.FILE:
            return (st.st_size, st.st_mtime_ns, mode_of(st.st_mode)) == (size, mtime_ns, mode)
        if kind is Kind.SYMLINK:
            # (A link made again with another target is an edit: `ln -sfn` right after the
            # link arrived, in a directory whose watch did not exist yet when it did.)
            try:
                return os.fsencode(os.readlink(full)) == os.fsencode(target)
            except (OSError, UnicodeError):
                return False
        return mode_of(st.st_mode) == mode

    def _scan_tick(self, _stats: object) -> None:
        """A long scan feeds systemd's watchdog (and asks for start-up time) as it goes, and
        stops if the daemon is to stop: a trial's SIGTERM waited for a whole first scan (15 s
        for 20k files; a home directory's would outlast systemd's stop timeout)."""
        if self.stop_requested:
            raise ScanStopped("the daemon stops")
        now = self.clock()
        if self.on_tick is not None and now - self._scan_ticked >= SCAN_TICK_EVERY:
            self._scan_ticked = now
            self.on_tick()

    def full_scan(self, *, rehash: bool = False, accept_deletes: bool = False) -> None:
        if self._root_error:
            return
        self._applied.clear()
        try:
            stats = self.rep.scan(paths=None, clean_temp=True, rehash=rehash,
                                  accept_deletes=accept_deletes,
                                  strict_deletes=bool(self._deletes_held),
                                  progress=self._scan_tick)  # fmt: skip
        except RootChanged:
            self._root_ok()
            return
        except ScanStopped:
            log.info("the scan is stopped, nothing of it recorded: the next start scans again")
            return
        except (StoreError, sqlite3.Error) as e:
            self._cannot_record(e)
            return
        except MassDelete as e:
            every = self._full_scan_every()  # not again at once: the next one is due as usual
            self._next_full_scan = None if every is None else self.clock() + every
            self._hold_deletes(e)
            return
        if self._store_error:
            log.warning("changes are recorded again")
            if "" in self.errors and self.errors[""].error == self._store_error:
                del self.errors[""]
            self._store_error = ""
        if self._deletes_held:
            # A whole scan without a mass deletion: accepted, or the files are back.
            log.warning("the deletions held back are %s", "recorded" if accept_deletes
                        else "gone (the files are back)")  # fmt: skip
            self._deletes_held = ""
            self.errors.pop("", None)
        every = self._full_scan_every()
        self._next_full_scan = None if every is None else self.clock() + every
        self._scan_done(stats)
        expire(self.cfg.versions_dir, self.cfg.keep_versions_days)
        if self.opts.watch and not self.opts.dry_run:  # the daemon, not a one-shot sync
            self._auto_prune()

    def _auto_prune(self) -> None:
        from .prune import auto_prune

        try:
            pruned = auto_prune(self.rep)
        except (ReplError, sqlite3.Error) as e:
            log.warning("prune: %s", e)
            return
        if pruned is not None and (pruned.dropped or pruned.history_dropped):
            log.info("prune: %d tombstone(s) every replica has seen, older than %g days, "
                     "dropped (%d kept); %d old history event(s)", pruned.dropped,
                     self.cfg.prune_after_days, pruned.tombstones, pruned.history_dropped)  # fmt: skip

    def _full_scan_every(self) -> float | None:
        """Seconds between full scans: the config's (0: never), at most a minute while the
        tree should be watched but is not (watch limit reached, watcher thread dead)."""
        every = self.cfg.scan_interval or None
        if self.opts.watch and (self.watcher is None or not self.watcher.alive):
            every = min(every or DEGRADED_SCAN_EVERY, DEGRADED_SCAN_EVERY)
        return every

    def _scan_done(self, stats: Any, paths: list[str] | None = None) -> None:
        """Take a scan's errors into status, and forget those of earlier scans that no longer
        hold: an error of a path this scan covered (the whole tree when ``paths`` is None, else
        each path and what is below it) that it did not report again is gone, as the path is
        (a fifo removed) or the trouble is (a file readable again). A path's error from a sync
        (it names the peer) stays until a sync of that path succeeds; the root's ("") until
        _root_ok finds the root back."""
        still = {p for p, _ in stats.errors} | {p for p, _ in stats.skipped}
        scanned = set(paths or ())
        whole = paths is None or "" in scanned or "." in scanned
        below = tuple(f"{p}/" for p in scanned)
        for path, e in list(self.errors.items()):
            if not path or e.peer or path in still:
                continue
            if whole or path in scanned or path.startswith(below):
                del self.errors[path]
        for path, err in stats.errors:
            self.errors[path] = PathError(path, err)
        for path, why in stats.skipped:  # not failures, but status is where a user looks
            self.errors[path] = PathError(path, NOT_REPLICATED + why)
        if stats.events:
            log.info("scan: %d change(s) recorded", stats.events)
            self._send_pages()

    def request_full_scan(self) -> None:
        if self.watcher is not None:
            self.watcher.request_full_scan()
        else:
            self._next_full_scan = self.clock()

    # -- timers and commands --------------------------------------------------------------------

    def _check_mounts(self) -> None:
        """A disk mounted again at a mount point of the tree sends no inotify event: look (a
        stat per mount point), and scan it and watch it again when it is back."""
        mounts = Mounts(self.store, str(self.cfg.root))
        missing = {m for m in mounts.known if mounts.missing(m)}
        said = {p for p, e in self.errors.items() if e.error == not_mounted_message(p)}
        back = sorted((self._mounts_missing | said) - missing)
        self._mounts_missing = missing
        if back and not self._root_error:
            log.info("mounted again: %s; scanning it", ", ".join(back))
            self._refresh_watches()
            self.scan(back)

    def _check_database(self) -> None:
        """The database must still be the one opened: a state directory deleted (or replaced)
        under the daemon takes everything recorded since with it, and syncing on would only
        record more that is lost. The daemon stops, saying so."""
        if self._db_id is None or _file_id(self.store.db_path) == self._db_id:
            return
        if not self.store.db_path.parent.exists() and not self.cfg.root.exists():
            # Both gone at once: the disk that holds them (a USB disk with its config, state
            # and tree), unmounted or unplugged; nothing is lost, nothing to rejoin.
            self.fatal = (
                f"the disk that holds this replica's database ({self.store.db_path.parent}) "
                f"and its tree ({self.cfg.root}) is gone, unmounted or unplugged: stopping. "
                "Nothing is lost: mount it again, then start repld again (`repld --config "
                f"{self.cfg.path} run`, or its service)"
            )
            log.error("%s", self.fatal)
            return
        self.fatal = (
            f"{self.store.db_path}: this replica's database was deleted or replaced while repld "
            "ran; what it recorded since is lost with it. Stopping: make it anew with `repld "
            f"--config {self.cfg.path} rejoin --tree-id {self.store.tree_id}` (the config and "
            "its peers stay; what is in the root is adopted, nothing is lost), or restore the "
            "state directory and `repld rejoin`"
        )
        log.error("%s", self.fatal)

    def _save_acks(self, links: list[PeerLink] | None = None) -> None:
        """Write down how far each peer has acknowledged our records: a few seconds late at
        most, and at the end of a session. It only saves `repld export --since PEER` from
        carrying what PEER has already, so a failure is logged, never raised."""
        chosen = self.links if links is None else links
        moved = [
            (link, link.session)
            for link in chosen
            if link.session is not None and link.session.peer is not None
            and link.session.confirmed_upto != link.acked_saved
        ]  # fmt: skip
        # What peers said of how far other replicas hold our records (see Store.held_for).
        told = [
            (link, link.session)
            for link in chosen
            if link.session is not None and link.session.peer is not None
            and link.session.peer_held and link.session.peer_held is not link.held_saved
        ]  # fmt: skip
        try:
            if moved or told:
                with self.store.transaction():
                    for link, s in moved:
                        assert s is not None and s.peer is not None
                        self.store.set_peer_mark(s.peer.replica_id, acked_seq=s.confirmed_upto)
                        link.acked_saved = s.confirmed_upto
                    for link, s in told:
                        assert s is not None and s.peer is not None
                        self.store.note_held(s.peer.replica_id, s.peer_held)
                        link.held_saved = s.peer_held
            # And what our Acks say of it to each peer, of its records: nothing, with ignore
            # rules of this replica's own (their paths' records never went on from here, so
            # what the replicas past this one hold of them is not this one's to tell).
            keys = self._peer_keys()
            for link in chosen:
                s = link.session
                if s is not None and s.peer is not None and s.state is State.ESTABLISHED:
                    s.held = () if self.cfg.ignore else self.store.held_for(s.peer.replica_id,
                                                                             keys)  # fmt: skip
        except (ReplError, sqlite3.Error) as e:
            log.warning("could not write down how far peers have our records: %s", e)

    def _peer_keys(self) -> dict[str, str]:
        """The public keys of the configured peers met, by replica id (said along in Acks, so
        that a replica can tell a peer it has not met yet by its key)."""
        by_name = {m.name: m.replica_id for m in self.store.peer_marks()}
        return {by_name[p.name]: p.public_key for p in self.cfg.peers if p.name in by_name}

    def _timers(self, quick: bool = False) -> None:
        now = self.clock()
        self._redial(now)
        for link in list(self.links):
            if link.hello_waiting is not None and not quick and now - link.hello_at >= HELLO_PACE:
                # (Not from inside a page's apply, `quick`: a new session then would replace
                # the one whose page is being applied.)
                self._start_session(link, link.hello_waiting)
            s = link.session
            if (
                (s is None or s.state is State.HELLO_SENT)
                and link.dealer is not None and link.connected and not quick
                and (not link.error or link.error_passes)
                and now - link.last_hello >= HELLO_AGAIN_EVERY
            ):  # fmt: skip
                # Connected, but no session: the peer ended ours (it took us off its peers, and
                # may list us again), or never answered our hello. Ask now and then: without
                # this, a side that cannot dial back would wait for a restart.
                self._start_session(link, None)
                s = link.session
            if s is None:
                continue
            if s.state is State.ESTABLISHED and now - link.last_ping >= PING_EVERY:
                link.last_ping = now
                self._send(link, s.ping())
            if link.dealer is None and now - link.last_seen > ROUTER_SILENCE:
                log.info("%s: silent for %g s, taken as gone", link.label, ROUTER_SILENCE)
                self._end_session(link, "silent")
                continue
            # (A dry run or a subtree sync marks every page failed, so as not to move the mark
            # past what it did not apply: asking for the pages again would only repeat them.)
            one_shot_partial = self.opts.dry_run or self.opts.within is not None
            if self.paused:
                continue  # what was refused meanwhile is asked for again at resume
            if (not quick and s.failed_from is not None and not one_shot_partial
                    and now - link.last_retry >= RETRY_EVERY):  # fmt: skip
                link.last_retry = now
                self._send_out(link, s.retry())
            elif (
                not quick
                and s.received_upto < s.peer_seq
                and now - max(link.records_at, link.established_at, link.last_retry)
                >= RETRY_EVERY
            ):
                # Records announced, none arriving: ask for them again (see Session.ask_again).
                link.last_retry = now
                self._send_out(link, s.ask_again())
        if quick:
            return
        if now - self._root_checked >= ROOT_CHECK_EVERY:  # a stat; the loop wakes anyway
            self._root_checked = now
            self._check_database()
            self._check_mounts()
            if self._root_ok() and self._watch_lost(now):
                self._rewatched_at = now
                log.warning("the watch on %s was lost; watching it again", self.cfg.root)
                self._watch()
                self.request_full_scan()
        if now - self._acks_at >= ACKS_EVERY:
            self._acks_at = now
            self._save_acks()
        every = self._full_scan_every()
        due = self._next_full_scan
        if every is not None and (due is None or due > now + every):
            self._next_full_scan = due = now + every  # the watcher died since the last scan
        if not self.paused and due is not None and now >= due:
            self.full_scan()
        w = self.watcher
        if w is not None and w.alive and w.unwatched and not self.paused:
            # Directories beyond the watch limit: rescanned on a timer instead.
            if self._next_unwatched_scan is None:
                self._next_unwatched_scan = now + DEGRADED_SCAN_EVERY
            elif now >= self._next_unwatched_scan:
                self._next_unwatched_scan = now + DEGRADED_SCAN_EVERY
                self.scan(w.unwatched_now())

    def _run_commands(self) -> None:
        while True:
            with self._commands_lock:
                if not self.commands:
                    return
                name, args = self.commands.popleft()
            if self.paused and name in ("rescan", "rescan-full", "accept-deletes", "sync-now"):
                log.info("%s ignored: paused (resume scans the tree)", name)
                continue
            if name == "rescan":
                self._refresh_watches()
                self.full_scan()
            elif name == "accept-deletes":  # `repld scan --accept-deletes`
                self.full_scan(accept_deletes=True)
            elif name == "rescan-full":  # `repld scan --full`: every file read again
                self._refresh_watches()
                self.full_scan(rehash=True)
            elif name == "accept-root":
                self._accept_root()
            elif name == "pause":
                self.paused = True
                self.state = "paused"
            elif name == "resume":
                self.paused = False
                self.state = "idle"
                self.request_full_scan()
                for link in self.links:  # the pages refused while paused
                    if link.session is not None and link.session.failed_from is not None:
                        link.last_retry = self.clock()
                        self._send_out(link, link.session.retry())
            elif name == "sync-now":
                self.full_scan()
                for link in self.links:
                    if link.session is not None:
                        self._send_out(link, link.session.retry())
            elif name == "prune":  # `repld prune` while the daemon holds the database
                from .prune import prune

                forget = [str(f) for f in args.get("forget", ())]
                pruned = prune(self.rep, forget=forget)
                if forget:
                    log.info("prune: no longer waiting for replica(s) %s", ", ".join(forget))
                log.info("prune: %d tombstone(s) every replica has seen dropped, %d kept",
                         pruned.dropped, pruned.tombstones)  # fmt: skip
            elif name == "reload":
                cb = args.get("callback")
                if callable(cb):
                    cb()

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        peers = self._peer_status()
        failed = Counter(e.peer for e in self.errors.values() if e.peer)
        # Counting the tree is a pass over every record. While records are still coming in
        # (every batch commits), that is at most once a COUNTS_EVERY, and the loop wakes up for
        # the next count; once nothing more is on its way here (a peer may still be taking
        # what this replica relays), every change is counted.
        now = self.clock()
        settled = (
            all(p["need_files"] == 0 or not p["connected"] for p in peers)
            and not self._inbox
            and self.state == "idle"
        )
        stale = self._counts_seq != self.store.committed_seq
        if stale and (settled or now - self._counts_at >= COUNTS_EVERY):
            self._counts = (*self.store.counts(), len(list_conflicts(self.store)))
            self._counts_seq = self.store.committed_seq
            self._counts_at = now
        files, dirs, size, conflicts = self._counts
        t = self.transfers.stats
        a = self.stats.applied
        return {
            "replica_id": self.store.replica_id,
            "name": self.cfg.name,
            "tree_id": self.store.tree_id,
            "root": str(self.cfg.root),
            "state": "error"
            if self._rolled_back
            else "paused"
            if self.paused
            # (A burst of deletions waits for a whole scan once the tree is quiet.)
            else "scanning"
            if self._settle_at is not None and self.state == "idle"
            # Files on their way here, or a peer fetching from this one lately (sending is
            # syncing too; a peer that needs files and fetches none, paused, is not). Files
            # that failed and wait for a retry (listed in errors) are not on their way.
            else "syncing"
            if self.state == "idle" and (
                now - self._served_at < SERVING_FOR
                or any(p["connected"] and p["need_files"] > failed[p["name"]] for p in peers)
            )
            else self.state,
            "pid": os.getpid(),
            "local": {
                "files": files,
                "dirs": dirs,
                "bytes": size,
                "sequence": self.store.committed_seq,
            },
            "conflicts": conflicts,
            "deletes_held": bool(self._deletes_held),
            "errors": [{"path": "", "error": self._rolled_back}] * bool(self._rolled_back)
            + [{"path": e.path, "error": e.error} for e in self.errors.values()],
            "peers": peers,
            "refused": self.keycheck.refused(),
            "watching": self.watcher is not None and self.watcher.alive,
            # Directories beyond the inotify watch limit, rescanned every minute instead.
            "unwatched_dirs": len(self.watcher.unwatched) if self.watcher is not None else 0,
            "transfer": {
                "files_written": a.written,
                "deleted": a.deleted,
                "bytes_written": a.written_bytes,
                "fetched_bytes": t.fetched_bytes,
                # Blocks of fetched files found here, and whole files copied from one here.
                "reused_bytes": t.reused_bytes + a.copied_locally_bytes,
                "resumed_bytes": t.resumed_bytes,
                "conflicts_resolved": a.conflicts,
            },
        }

    def _peer_status(self) -> list[dict[str, Any]]:
        peers = []
        by_name: dict[str, list[PeerLink]] = {}
        for link in self.links:
            by_name.setdefault(link.peer.name, []).append(link)
        for p in self.cfg.peers:
            links = by_name.get(p.name, [])
            live = [lk for lk in links if lk.established]
            best = next((lk for lk in live if self._active(lk)), live[0] if live else None)
            s = best.session if best is not None else None
            rid = (
                s.peer.replica_id
                if s is not None and s.peer is not None
                else self._replica_of(p.name)
            )
            need_files, need_bytes = s.need() if s is not None else (0, 0)
            if self._page_in is not None and self._page_in[0] is best:
                # The page being applied: what of its content is here already (a big file
                # comes in for a while) is needed no more.
                got = self.transfers.stats.arrived_bytes - self._page_in[1]
                need_bytes = max(0, need_bytes - got)
            seen = self._last_heard(p.name)
            # (An error that passes, such as "no longer admits this replica's key", is over
            # once a session is on, if only on the other link to it: a peer that re-added us.)
            errs = [lk.error for lk in links if lk.error and not (s is not None and lk.error_passes)]
            errs += [lk.unanswered for lk in links if lk.unanswered and s is None]
            peers.append(
                {
                    "name": p.name,
                    "replica_id": rid,
                    "endpoint": p.endpoint,
                    "connected": s is not None,
                    "last_seen": iso_time(seen) if seen else None,
                    "need_files": need_files,
                    "need_bytes": need_bytes,
                    "peer_need_files": s.peer_need_files if s is not None else 0,
                    "in_sync": bool(
                        s is not None
                        and s.in_sync
                        and self.state != "scanning"  # a change may be on its way
                        and self._settle_at is None  # deletions wait for a whole scan
                        and not self._root_error  # nothing is applied or scanned meanwhile
                        and not self.paused  # likewise
                        and not self._deletes_held  # local deletions not sent
                        and not any(e.peer == p.name for e in self.errors.values())
                    ),  # fmt: skip
                    "error": errs[0] if errs else None,
                }
            )
        return peers

    def publish(self) -> None:
        snap = self.status()
        with self._snapshot_lock:
            self.snapshot = snap

    def read_snapshot(self) -> dict[str, Any]:
        with self._snapshot_lock:
            return dict(self.snapshot)


def _move_split(recs: list[Record], n: int) -> bool:
    """Whether a page of ``recs[:n]`` would end between a moved file's new record and its old
    path's tombstone (the scanner records them one after the other): apart, the peer would
    copy the file, then delete the original and keep it as a version."""
    if not 0 < n < len(recs):
        return False
    new, old = recs[n - 1], recs[n]
    return (not new.deleted and old.deleted and new.guid == old.guid and new.kind is Kind.FILE
            and old.path != new.path)  # fmt: skip


def _frames(parts: list[zmq.Frame]) -> list[bytes]:
    """A message's frames as the codec takes them: the head as bytes, a data frame (block
    content, up to a MiB) as a view of ZeroMQ's buffer, not copied once more."""
    return [p.bytes if i == 0 else p.buffer for i, p in enumerate(parts)]  # type: ignore[misc]


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
