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

What it cannot know is a replica it has never heard of (one that has changed nothing and never
synced with it). Dropping a tombstone is still safe for the user's data: the worst such a
replica can do is bring a deleted file back (its live record is then new here), never lose
one; and the replicas that keep the tombstone delete it again. The daemon does not prune by
itself: `repld prune` does, when asked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from ..protocol.version import VersionVector
from .control import iso_time
from .replica import Replica
from .store import PRUNED_FLOOR, Store

HOW_SYNCED = "synced"  # a daemon peer, a one-shot sync or a bundle: it acknowledged our records
HOW_CONFIGURED = "configured"  # a peer in the config this replica has not exchanged records with
HOW_HEARD_OF = "heard of"  # only in the version vectors or the history of records


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


@dataclass(frozen=True)
class PruneReport:
    tombstones: int
    tombstone_bytes: int  # about: what their rows take in the database
    holders: list[Holder]
    # (path, seq, version) of the tombstones every holder has seen
    droppable_rows: list[tuple[str, int, str]]
    dropped: int = 0
    history_dropped: int = 0  # events of live paths, older than one every replica has seen

    @property
    def droppable(self) -> int:
        return len(self.droppable_rows)

    @property
    def blocked_by(self) -> list[Holder]:
        """The replicas whose knowledge this replica cannot tell: while any, none is dropped."""
        return [h for h in self.holders if h.how != HOW_SYNCED]

    def to_json(self) -> dict[str, object]:
        return {
            "tombstones": self.tombstones,
            "tombstone_bytes": self.tombstone_bytes,
            "droppable": self.droppable,
            "dropped": self.dropped,
            "history_dropped": self.history_dropped,
            "replicas": [
                asdict(h) | {"last_sync": iso_time(h.last_sync / 1e9) if h.last_sync else None}
                for h in self.holders
            ],
        }


def prune_report(rep: Replica) -> PruneReport:
    store = rep.store
    me = store.replica_id
    count, size = _tombstones(store)
    holders: list[Holder] = []
    met: set[str] = {me}
    names: set[str] = set()
    for m in store.peer_marks():
        if m.replica_id in met:
            continue
        met.add(m.replica_id)
        names.add(m.name)
        unseen, newest = _unseen_after(rep, m.acked_seq, m.replica_id)
        holders.append(Holder(m.name, m.replica_id, HOW_SYNCED, m.last_sync_ns, m.acked_seq,
                              unseen, newest))  # fmt: skip
    for p in rep.cfg.peers:
        if p.name not in names:
            holders.append(Holder(p.name, "", HOW_CONFIGURED, 0, 0, None, None))
    for rid in sorted(_heard_of(rep) - met):
        holders.append(Holder("", rid, HOW_HEARD_OF, 0, 0, None, None))
    return PruneReport(int(count), int(size), holders, _seen_by_all(rep, holders))


def _seen_by_all(rep: Replica, holders: list[Holder]) -> list[tuple[str, int, str]]:
    """The tombstones every replica in ``holders`` has provably seen (none while one of them
    is a replica this one cannot tell about)."""
    if any(h.how != HOW_SYNCED for h in holders):
        return []
    rows = rep.store.execute(
        "SELECT path, seq, version, modified_by FROM records WHERE deleted = 1"
    )
    return [
        (str(path), int(seq), str(version))
        for path, seq, version, by in rows
        if all(seq <= h.acked_seq or by == h.replica_id for h in holders)
    ]


# The history events every replica has seen a later event of (the parameter: the sequence
# number every one has acknowledged): the newest of a path stays (what `repld log` says of its
# current state), and so does the newest every replica has seen while a later one is on its way.
_OLD_EVENTS = (
    "seq < (SELECT MAX(h.seq) FROM history AS h WHERE h.path = history.path AND h.seq <= ?)"
)


def prune(rep: Replica, *, dry_run: bool = False) -> PruneReport:
    """Drop the tombstones every replica this one knows of has seen, with the history of
    their paths (nothing is at those paths anywhere any more), and of the other paths' history
    the events every one of them has seen a later event of (a file's history would otherwise
    grow with every save); the report says what was."""
    report = prune_report(rep)
    if report.blocked_by:
        return report
    store = rep.store
    seen_by_all = min((h.acked_seq for h in report.holders), default=store.seq)
    if dry_run:
        (history,) = store.execute(f"SELECT COUNT(*) FROM history WHERE {_OLD_EVENTS}",
                                   (seen_by_all,)).fetchone()  # fmt: skip
        return dataclasses.replace(report, history_dropped=int(history))
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
        history = store.execute(f"DELETE FROM history WHERE {_OLD_EVENTS}",
                                (seen_by_all,)).rowcount  # fmt: skip
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
