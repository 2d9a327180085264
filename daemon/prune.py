"""Dropping tombstones every replica this one knows of has seen, and saying who holds the
others back.

A tombstone (the record of a deleted path) is what keeps the deletion from being undone by a
replica that still has the file: its live record is older than the tombstone, so it loses. A
tombstone may be dropped once every replica of the tree holds it (or something newer) for that
path. What this replica can prove is narrow: a replica it synced with directly (a daemon peer,
a one-shot sync, a bundle) has acknowledged this replica's records up to a sequence number, so
it holds every tombstone recorded here up to that number (and the deletions it made itself); of
a replica it knows only from the version vectors of its records (its edits came through
another replica), or from the config (a peer not met yet), it can prove nothing, and while
there is one, nothing is dropped.

Nor, directly, of a replica it never synced with (a chain A-B-C: A and C never meet). So each
replica keeps, for each peer whose records it applies, checkpoints "having applied the peer's
records up to its number N, my own number was M" (Store._checkpoint). A replica that holds
B's records up to M holds A's up to N (or something newer on their paths): B says so to A,
about every replica it knows (in its Acks to A, or at a one-shot sync), and A counts it
(``HOW_THROUGH``). Along a chain the word passes hop by hop, each translating into its
neighbour's numbers, so every replica of a connected tree can tell, in time, what every other
one it has heard of holds.

What it cannot know is a replica it has never heard of (one that has changed nothing and never
synced with it). Dropping a tombstone is still safe for the user's data: the worst such a
replica can do is bring a deleted file back (its live record is then new here), never lose
one; and the replicas that keep the tombstone delete it again. The daemon prunes by itself
after each periodic scan, the tombstones of deletions older than ``prune_after_days`` (30 by
default; see auto_prune); `repld prune` drops them all, whatever their age.

A replica that is gone for good (a machine sold, a disk wiped) would hold every later tombstone
back forever: `repld prune --forget REPLICA` stops waiting for it. That is noted in the meta
table (``forgotten``: replica id -> the sequence number and time it was forgotten at), and
undone by itself when the replica turns up again: a sync with it after that time, or an edit of
its made after that time. Were it to come back with an old copy of the
tree, what it brings back is files deleted since, never a loss.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from ..protocol.version import VersionVector, short_id
from .control import iso_time
from .errors import ReplError, UsageError
from .replica import Replica
from .store import PRUNED_FLOOR, Store

FORGOTTEN = "forgotten"  # meta key: {replica id: [sequence number, time ns, name]}

HOW_SYNCED = "synced"  # a daemon peer, a one-shot sync or a bundle: it acknowledged our records
HOW_CONFIGURED = "configured"  # a peer in the config this replica has not exchanged records with
HOW_HEARD_OF = "heard of"  # only in the version vectors or the history of records
HOW_THROUGH = "through a peer"  # not synced with, but a peer said how far it holds our records


@dataclass(frozen=True)
class Holder:
    """One other replica of the tree, and what it has provably seen of the tombstones here."""

    name: str  # "" when this replica knows it only by its id
    replica_id: str  # "" for a configured peer not met yet
    how: str  # HOW_*
    last_sync: int  # ns; 0 if never
    acked_seq: int  # the highest of this replica's sequence numbers it acknowledged
    unseen: int | None  # tombstones here it has not provably seen; None: cannot tell
    newest_unseen: str | None  # the path of the newest of those
    via: str = ""  # the peer that said how far it holds this replica's records, if one did


@dataclass(frozen=True)
class PruneReport:
    tombstones: int
    tombstone_bytes: int  # about: what their rows take in the database
    holders: list[Holder]
    # (path, seq, version) of the tombstones every holder has seen
    droppable_rows: list[tuple[str, int, str]]
    dropped: int = 0
    history_dropped: int = 0  # events of live paths, older than one every replica has seen
    forgotten: list[Holder] = dataclasses.field(default_factory=list)  # not waited for

    @property
    def droppable(self) -> int:
        return len(self.droppable_rows)

    @property
    def blocked_by(self) -> list[Holder]:
        """The replicas whose knowledge this replica cannot tell: while any, none is dropped."""
        return [h for h in self.holders if h.how not in (HOW_SYNCED, HOW_THROUGH)]

    def to_json(self) -> dict[str, object]:
        return {
            "tombstones": self.tombstones,
            "tombstone_bytes": self.tombstone_bytes,
            "droppable": self.droppable,
            "dropped": self.dropped,
            "history_dropped": self.history_dropped,
            "replicas": [_holder_json(h) for h in self.holders],
            "forgotten": [_holder_json(h) for h in self.forgotten],
        }


def _holder_json(h: Holder) -> dict[str, object]:
    return asdict(h) | {"last_sync": iso_time(h.last_sync / 1e9) if h.last_sync else None}


def forgotten(store: Store) -> dict[str, tuple[int, int, str]]:
    """The replicas `prune --forget` stopped waiting for: id -> (sequence number here and
    time when it was, name then)."""
    try:
        raw = json.loads(store.meta(FORGOTTEN) or "{}")
        return {str(k): (int(v[0]), int(v[1]), str(v[2])) for k, v in raw.items()}
    except (ValueError, TypeError, IndexError, AttributeError):
        return {}  # a note this version cannot read: wait for everyone, as without one


def prune_report(rep: Replica, forget: Iterable[str] = ()) -> PruneReport:
    """What prune would drop, and why not the rest; ``forget``: replica ids to stop waiting
    for, as if already noted (see `forget_ids`)."""
    store = rep.store
    me = store.replica_id
    count, size = _tombstones(store)
    holders: list[Holder] = []
    met: set[str] = {me}
    names: set[str] = set()
    marks = store.peer_marks()
    held = store.held()  # what peers said of replicas this one may not have met
    name_of = {m.replica_id: m.name for m in marks}
    configured = {p.name for p in rep.cfg.peers}
    for m in marks:
        if m.replica_id in met:
            continue
        met.add(m.replica_id)
        names.add(m.name)
        acked, via = m.acked_seq, ""
        # A peer's word for a replica that syncs with this one under its own key (a
        # configured peer) is not taken over that replica's own: a hostile peer's trial had
        # a tombstone dropped that the other had never seen.
        if (m.replica_id in held and held[m.replica_id][0] > acked
                and m.name not in configured):  # fmt: skip
            acked, via = held[m.replica_id][0], name_of.get(held[m.replica_id][1], "a peer")
        unseen, newest = _unseen_after(rep, acked, m.replica_id)
        holders.append(Holder(m.name, m.replica_id, HOW_SYNCED, m.last_sync_ns, acked,
                              unseen, newest, via))  # fmt: skip

    def through(rid: str, name: str) -> Holder | None:
        """A replica not synced with, but that a peer says holds this one's records."""
        if rid not in held:
            return None
        upto, by, _key = held[rid]
        unseen, newest = _unseen_after(rep, upto, rid)
        return Holder(name, rid, HOW_THROUGH, 0, upto, unseen, newest,
                      name_of.get(by, short_id(by)))  # fmt: skip

    by_key = {key: rid for rid, (_u, _v, key) in held.items() if key}
    for p in rep.cfg.peers:
        if p.name not in names:
            rid = by_key.get(p.public_key, "")
            h = through(rid, p.name) if rid and rid not in met else None
            if h is not None:
                met.add(rid)
            holders.append(h or Holder(p.name, "", HOW_CONFIGURED, 0, 0, None, None))
    for rid in sorted(_heard_of(rep) - met):
        holders.append(through(rid, "") or Holder("", rid, HOW_HEARD_OF, 0, 0, None, None))
    gone = _still_gone(rep, holders, set(forget))
    waited = [h for h in holders if not h.replica_id or h.replica_id not in gone]
    return PruneReport(int(count), int(size), waited, _seen_by_all(rep, waited),
                       forgotten=[h for h in holders if h.replica_id and h.replica_id in gone])


def _still_gone(rep: Replica, holders: list[Holder], forget: set[str]) -> set[str]:
    """Of the replicas forgotten (before, or now: ``forget``), those that have not turned up
    since: no sync with it, no edit it made after it was forgotten."""
    gone = set(forget)
    for rid, (_seq, when, _name) in forgotten(rep.store).items():
        h = next((h for h in holders if h.replica_id == rid), None)
        if h is None or h.last_sync > when:
            continue
        # (Its events' times are its own clock's: an event it made since, relayed; not one of
        # before, relayed only now.)
        (later,) = rep.store.execute(
            "SELECT COUNT(*) FROM history WHERE origin = ? AND time_ns > ?", (rid, when)
        ).fetchone()
        if not later:
            gone.add(rid)
    return gone


def forget_ids(rep: Replica, names: Iterable[str]) -> list[str]:
    """The replica ids that the names or ids (8 hex digits will do) given to `--forget` stand
    for; a ReplError naming the one that cannot be forgotten, and why."""
    report = prune_report(rep)
    known = report.holders + report.forgotten
    ids: list[str] = []
    for given in names:
        want = given.strip().lower()
        if want in (rep.cfg.name.lower(), rep.store.replica_id) or (
            len(want) >= 8 and rep.store.replica_id.replace("-", "").startswith(want)
        ):
            raise ReplError(f"--forget {given}: that is this replica")
        found = [h for h in known if h.name and h.name.lower() == want]
        if not found and len(want.replace("-", "")) >= 8:
            found = [h for h in known if h.replica_id
                     and h.replica_id.replace("-", "").startswith(want.replace("-", ""))]  # fmt: skip
        listed = ", ".join(sorted(h.name or short_id(h.replica_id) for h in known)) or "none"
        if not found:
            raise UsageError(f"--forget {given}: no replica of that name or id is known here "
                             f"(known: {listed}); `repld prune` lists them")  # fmt: skip
        if len(found) > 1:  # a name reused (a reinstall): the one not forgotten yet, if one
            live = [h for h in found if h not in report.forgotten]
            found = live if len(live) == 1 else found
        if len(found) > 1:
            raise UsageError(f"--forget {given}: more than one replica matches; give more of "
                             "its id (`repld prune --json` shows them whole)")  # fmt: skip
        h = found[0]
        if h.how == HOW_CONFIGURED or (
            any(p.name == h.name for p in rep.cfg.peers) and superseded_by(report, h) is None
        ):
            raise ReplError(f"--forget {given}: {h.name} is a configured peer; if it is gone "
                            f"for good, first `repld peer remove {h.name}`")  # fmt: skip
        ids.append(h.replica_id)
    return ids


def superseded_by(report: PruneReport, h: Holder) -> Holder | None:
    """The replica that synced under ``h``'s name after ``h`` last did, with another id (``h``
    was reinstalled, or rejoined: its old id will not sync again), or None."""
    if h.how != HOW_SYNCED or not h.name:
        return None
    return next((o for o in report.holders if o.how == HOW_SYNCED and o.name == h.name
                 and o.replica_id != h.replica_id and o.last_sync > h.last_sync), None)  # fmt: skip


def _seen_by_all(rep: Replica, holders: list[Holder],
                 before_ns: int | None = None) -> list[tuple[str, int, str]]:  # fmt: skip
    """The tombstones every replica in ``holders`` has provably seen (none while one of them
    is a replica this one cannot tell about); only those of deletions made before
    ``before_ns``, if given."""
    if any(h.how not in (HOW_SYNCED, HOW_THROUGH) for h in holders):
        return []
    rows = rep.store.execute(
        "SELECT path, seq, version, modified_by, changed_ns FROM records WHERE deleted = 1"
    )
    return [
        (str(path), int(seq), str(version))
        for path, seq, version, by, when in rows
        if (before_ns is None or when < before_ns)
        and all(seq <= h.acked_seq or by == h.replica_id for h in holders)
    ]


# The history events every replica has seen a later event of (the parameter: the sequence
# number every one has acknowledged): the newest of a path stays (what `repld log` says of its
# current state), and so does the newest every replica has seen while a later one is on its way.
_OLD_EVENTS = (
    "seq < (SELECT MAX(h.seq) FROM history AS h WHERE h.path = history.path AND h.seq <= ?)"
)


def prune(rep: Replica, *, dry_run: bool = False, forget: Iterable[str] = (),
          before_ns: int | None = None) -> PruneReport:  # fmt: skip
    """Drop the tombstones every replica this one knows of has seen, with the history of
    their paths (nothing is at those paths anywhere any more), and of the other paths' history
    the events every one of them has seen a later event of (a file's history would otherwise
    grow with every save); the report says what was. ``forget``: replica ids (`forget_ids`)
    not to wait for any more, from now on (not noted on a dry run). ``before_ns``: only the
    tombstones of deletions made before then (the daemon's own prunes: see auto_prune)."""
    forget = list(forget)
    report = prune_report(rep, forget)
    if before_ns is not None:
        report = dataclasses.replace(report,
                                     droppable_rows=_seen_by_all(rep, report.holders, before_ns))  # fmt: skip
    store = rep.store
    if forget and not dry_run:
        notes = forgotten(store)
        now = time.time_ns()
        with store.transaction():
            for h in report.forgotten:
                if h.replica_id in forget:
                    notes[h.replica_id] = (store.seq, now, h.name)
                    # Should it sync again after all, all of its records are asked for: what
                    # it still has of files deleted since (their tombstones dropped here)
                    # comes back, rather than staying there alone for good.
                    store.execute("UPDATE peers SET seen_seq = 0 WHERE replica_id = ?",
                                  (h.replica_id,))  # fmt: skip
            store.set_meta(FORGOTTEN, json.dumps(notes))
    if report.blocked_by:
        return report
    seen_by_all = min((h.acked_seq for h in report.holders), default=store.seq)
    # (The daemon's own prunes leave `repld log` its recent events too.)
    old_events = _OLD_EVENTS + ("" if before_ns is None else " AND time_ns < ?")
    params: tuple[int, ...] = (seen_by_all,) if before_ns is None else (seen_by_all, before_ns)
    if dry_run:
        # As the real run counts them: the events of the paths whose tombstones go are not
        # among those (they go with their tombstones).
        gone = {path for path, _seq, _version in report.droppable_rows}
        history = sum(path not in gone for (path,) in store.execute(
            f"SELECT path FROM history WHERE {old_events}", params))  # fmt: skip
        return dataclasses.replace(report, history_dropped=history)
    me = store.replica_id
    dropped = 0
    floor = store.pruned_floor
    with store.transaction():
        for path, seq, version in report.droppable_rows:
            # (Still that tombstone: nothing recorded since the report was made.)
            if not store.execute("DELETE FROM records WHERE path = ? AND seq = ? AND deleted = 1",
                                 (path, seq)).rowcount:  # fmt: skip
                continue
            # Another replica may keep this tombstone a while: a file made at this path here
            # later must count higher for this replica, or the tombstone would delete it.
            floor = max(floor, VersionVector.decode(version).get(me))
            store.execute("DELETE FROM history WHERE path = ?", (path,))
            dropped += 1
        if floor > store.pruned_floor:
            store.set_meta(PRUNED_FLOOR, str(floor))
        history = store.execute(f"DELETE FROM history WHERE {old_events}", params).rowcount
        store.trim_checkpoints()
    count, size = _tombstones(store)
    return dataclasses.replace(report, dropped=dropped, tombstones=count, tombstone_bytes=size,
                               history_dropped=history)  # fmt: skip


def _tombstones(store: Store) -> tuple[int, int]:
    """How many tombstones, and about how many bytes of database their rows take."""
    count, size = store.execute(
        "SELECT COUNT(*), COALESCE(SUM(LENGTH(path) + LENGTH(version) + 150), 0) "
        "FROM records WHERE deleted = 1"
    ).fetchone()
    return int(count), int(size)


def _unseen_after(rep: Replica, acked: int, rid: str) -> tuple[int, str | None]:
    """Tombstones recorded here after sequence ``acked``, and the path of the newest, but for
    the deletions replica ``rid`` made itself (it has those, acknowledged or not)."""
    n, top = rep.store.execute(
        "SELECT COUNT(*), MAX(seq) FROM records WHERE deleted = 1 AND seq > ? "
        "AND modified_by != ?",
        (acked, rid),
    ).fetchone()
    if not n:
        return 0, None
    (path,) = rep.store.execute("SELECT path FROM records WHERE seq = ?", (top,)).fetchone()
    return int(n), str(path)


def _heard_of(rep: Replica) -> set[str]:
    """Every replica id in the history's origins and the records' version vectors."""
    ids = {str(o) for (o,) in rep.store.execute("SELECT DISTINCT origin FROM history")}
    for (v,) in rep.store.execute("SELECT DISTINCT version FROM records"):
        ids.update(r for r, _ in VersionVector.decode(str(v)))
    ids.discard("")
    return ids


def auto_prune(rep: Replica) -> PruneReport | None:
    """The daemon's own prune, after each periodic scan: the tombstones every replica has seen
    of deletions older than ``prune_after_days`` (a replica offline longer, or a copy of the
    tree joined later, still finds them), and the old history events. None when it is off."""
    days = rep.cfg.prune_after_days
    if not days:
        return None
    return prune(rep, before_ns=time.time_ns() - int(days * 86400 * 10**9))
