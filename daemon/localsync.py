"""One-shot sync between two replicas on this machine (Plan 9's syncdb, fixed).

Both replicas are scanned, then each pass pulls into one side the other side's records after the
last sequence number it has seen from it, plans them with the shared planner and applies them.
``both`` runs two passes (left pulls, then right pulls; the second pass relays what the first
brought in, in sequence order, as a peer would). A dry run does all the scanning and planning in
transactions that are rolled back, so it changes nothing anywhere, and prints the plan.

A one-way sync (``PULL``/``PUSH``) changes the files of one side only, but it commits the scan of
the other (the source): the versions it hands over must be ones the source has recorded for good.
A scan rolled back would give the source's next events the same versions again, for different
content, and a later edit of what was handed over would then silently beat them.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import BinaryIO

from ..protocol.plan import Op, Step, plan_pull, plan_record
from ..protocol.reconcile import Policy
from ..protocol.record import Kind, Record, escape, is_placeholder, subtree_filter
from .applier import Applier, ApplyStats, SourceChanged
from .diskio import open_regular
from .errors import ReplError, RolledBack, TreeMismatchError, UsageError
from .replica import Replica
from .scanner import ScanStats
from .store import PAGE
from .versions import Keeper, keeper_for

log = logging.getLogger(__name__)


class Direction(enum.Enum):
    BOTH = "both"
    PULL = "pull"  # only the local (left) replica changes
    PUSH = "push"  # only the target (right) replica changes


@dataclass
class PassReport:
    into: str  # name of the replica that changes
    source: str = ""  # name of the one it takes the changes from
    steps: list[Step] = field(default_factory=list)
    stats: ApplyStats = field(default_factory=ApplyStats)


@dataclass
class SyncReport:
    scans: dict[str, ScanStats] = field(default_factory=dict)
    passes: list[PassReport] = field(default_factory=list)
    dry_run: bool = False

    @property
    def errors(self) -> list[tuple[str, str]]:
        return [(path, why) for _, path, why in self.named_errors]

    @property
    def named_errors(self) -> list[tuple[str, str, str]]:
        """(the replica it happened on, path, why) of each error."""
        out = [(name, *e) for name, s in self.scans.items() for e in s.errors]
        return out + [(p.into, *e) for p in self.passes for e in p.stats.errors]


def _opener(replica: Replica) -> Callable[[Record], BinaryIO]:
    root = str(replica.root)

    def fetch(rec: Record) -> BinaryIO:
        try:
            fd = open_regular(f"{root}/{rec.path}")
        except OSError as e:
            # Gone, or something else is there now (a directory, a symlink, a FIFO): the
            # source's record is out of date, and its next scan says what is there.
            raise SourceChanged(
                f"{rec.path}: changed in {root} since it was scanned ({e.strerror}); the next "
                "sync takes what is there"
            ) from None
        # Unbuffered: the applier reads what the record says is there, one read for a small file.
        return open(fd, "rb", buffering=0)

    return fetch


def prefer_policy(prefer: str | None, into_left: bool, default: Policy) -> Policy:
    """The policy of a pass into one side: ``--prefer`` if given, else ``default``, the
    ``conflict_policy`` of the replica that changes (as its daemon would use it)."""
    if prefer is None:
        return default
    # "local" is the left replica (the one whose config runs the command).
    left_wins = prefer == "local"
    return Policy.CHOOSE_LOCAL if left_wins == into_left else Policy.CHOOSE_REMOTE


def sync(
    left: Replica,
    right: Replica,
    *,
    direction: Direction = Direction.BOTH,
    dry_run: bool = False,
    prefer: str | None = None,
    paths: list[str] | None = None,
    verbose: bool = False,
    progress: Callable[[ApplyStats], None] | None = None,
) -> SyncReport:
    if left.store.tree_id != right.store.tree_id:
        raise TreeMismatchError(
            f"{left.cfg.path} and {right.cfg.path} are replicas of different trees "
            f"({left.store.tree_id} vs {right.store.tree_id}); refusing to sync them. "
            "A new replica joins a tree with `repld init ROOT --tree-id ID`."
        )
    if left.store.replica_id == right.store.replica_id:
        raise UsageError(
            f"{left.cfg.path} and {right.cfg.path} are the same replica (replica id "
            f"{left.store.replica_id}): one state directory copied to make the other? Two copies "
            "of one replica must not both be used; make the copy a replica of its own with "
            f"`repld --config {right.cfg.path} rejoin` (its files are adopted, nothing is lost)"
        )
    for one, other in ((left, right), (right, left)):
        seen = other.store.peer_mark(one.store.replica_id).seen_seq
        if seen > one.store.seq:
            raise RolledBack(other.cfg.name, seen, one.store.seq, one.cfg.path)
    within = subtree_filter(paths)

    report = SyncReport(dry_run=dry_run)
    changes_left = not dry_run and direction is not Direction.PUSH
    changes_right = not dry_run and direction is not Direction.PULL
    with ExitStack() as stack:
        # A dry run scans and plans inside transactions that are rolled back at the end: files and
        # databases stay as they were. A one-way sync leaves the source's files alone (no pass
        # into it, no temporary files cleaned) but commits its scan: see the module docstring.
        if dry_run:
            stack.enter_context(left.store.transaction(commit=False))
            stack.enter_context(right.store.transaction(commit=False))
        _not_nested(left, right)  # (it reads the ignore rules, which a replica notes: see there)
        def scan(rep: Replica) -> ScanStats:
            return rep.scan(
                paths=[p.strip("/") for p in paths] if paths else None,
                verbose=verbose,
                clean_temp=changes_left if rep is left else changes_right,
            )

        for rep in (left, right):
            report.scans[rep.cfg.name] = scan(rep)
        passes = []
        if direction in (Direction.BOTH, Direction.PULL):
            passes.append((left, right, True))
        if direction in (Direction.BOTH, Direction.PUSH):
            passes.append((right, left, False))
        for rep in (left, right):
            rep.rules_widened = False  # (the scan forgot the marks already: the passes see it)
        widened: list[Replica] = []
        for into, src, into_left in passes:
            policy = prefer_policy(prefer, into_left, into.cfg.conflict_policy)
            done = _pass(into, src, policy, within, dry_run, verbose, progress)
            if not dry_run and rules_widened(into):
                # The pass brought ignore rules that let through paths whose records it
                # skipped under the old ones: once more, from the first record.
                widened.append(into)
                _rerun(done, _pass(into, src, policy, within, dry_run, verbose, progress))
            report.passes.append(done)
        for rep in widened:
            # Its scan ran under the old rules: what changed on its disk where they no longer
            # reach (an edit, a deletion made while the path was ignored) is recorded now, and
            # goes to the other side in this sync, not the next.
            _add_scan(report.scans[rep.cfg.name], scan(rep))
            for i, (into, src, into_left) in enumerate(passes):
                if src is rep:
                    policy = prefer_policy(prefer, into_left, into.cfg.conflict_policy)
                    _rerun(report.passes[i], _pass(into, src, policy, within, dry_run, verbose,
                                                   progress))  # fmt: skip
        if len(passes) == 2 and not dry_run:
            st = report.passes[1].stats
            if st.conflicts or st.kept_dirs:
                # The second pass made changes of its own there (conflict copies, directories
                # kept alive): bring them back now, not at the next sync.
                into, src, into_left = passes[0]
                policy = prefer_policy(prefer, into_left, into.cfg.conflict_policy)
                _rerun(report.passes[0], _pass(into, src, policy, within, dry_run, verbose,
                                               progress))  # fmt: skip
        if not dry_run and within is None:
            for into, src in ((left, right), (right, left)):
                _seen_already(into, src)
        if not dry_run:
            # What a daemon's Acks carry: how far the replicas each one has met hold the
            # other's records (see Store.held_for), for prune to count them.
            for one, other in ((left, right), (right, left)):
                if other.cfg.ignore:
                    continue  # (see Node._save_acks: not its to tell)
                held = other.store.held_for(one.store.replica_id)
                if held:
                    with one.store.transaction():
                        one.store.note_held(other.store.replica_id, held)
    return report


def _seen_already(into: Replica, src: Replica) -> None:
    """Mark as seen by ``into`` the records of ``src`` after its mark that hold the same
    versions as ``into``'s (what the pass into ``src`` just wrote there, taken from ``into``):
    the next sync would read each back only to find it equal (a second sync of 10k files took
    as long as 0.3 s doing so)."""
    seen = into.store.peer_mark(src.store.replica_id).seen_seq
    upto = into.store.same_records_upto(src.cfg.db_path, seen, src.store.seq)
    if upto > seen:
        with into.store.transaction():
            into.store.set_peer_mark(src.store.replica_id, name=src.cfg.name, seen_seq=upto)
        with src.store.transaction():
            src.store.set_peer_mark(into.store.replica_id, name=into.cfg.name, acked_seq=upto)


def _add_scan(first: ScanStats, again: ScanStats) -> None:
    """Count a second scan of a replica in its first one's report."""
    for name in ("created", "updated", "deleted", "moved", "hashed_bytes"):
        setattr(first, name, getattr(first, name) + getattr(again, name))
    first.files = again.files
    first.errors = again.errors  # (what the first found and the second no longer does is gone)
    first.skipped = again.skipped
    first.changes += again.changes


def _rerun(first: PassReport, again: PassReport) -> None:
    """Report a pass run once more as part of the first: a path that failed the first time
    and went through the second is no error, and a step is listed once."""
    redone = again.stats.done_paths
    first.stats.errors = [(p, why) for p, why in first.stats.errors if p not in redone]
    first.stats.merge(again.stats)
    listed: set[str] = set()
    steps = []
    for st in reversed(first.steps + again.steps):
        if st.describe() not in listed:  # (the same step done twice; never a different one)
            listed.add(st.describe())
            steps.append(st)
    first.steps = steps[::-1]


def rules_widened(rep: Replica) -> bool:
    """Whether ``rep``'s ignore rules changed since it last looked (a sync or an import wrote
    ROOT/.repldignore) so that what they ignored may pass now; then every peer's records are
    asked for again (the marks are forgotten: see Replica.ignore)."""
    rep.ignore()
    widened, rep.rules_widened = rep.rules_widened, False
    if widened:
        rep.store.forget_seen()  # again: a pass may have set its mark after the rules changed
    return widened


def _not_nested(left: Replica, right: Replica) -> None:
    """One root inside the other (and not ignored there) would be copied into itself, one more
    level at every sync."""
    lroot, rroot = left.root.resolve(), right.root.resolve()
    for outer, inner in ((left, rroot), (right, lroot)):
        top = outer.root.resolve()
        if inner == top or top in inner.parents:
            rel = inner.relative_to(top).as_posix()
            if rel != "." and outer.ignore().covers(rel, True):
                continue
            raise ReplError(
                f"the root {inner} lies inside the other replica's root {top}: a sync would "
                f"copy the tree into itself. Put the replica elsewhere, or ignore "
                f"{rel!r} in {top}/.repldignore"
            )


def pull_steps(
    into: Replica,
    records: Iterable[Record],
    *,
    policy: Policy,
    within: Callable[[str], bool] | None = None,
    behind: list[Record] | None = None,
) -> Iterator[Step]:
    """The steps that bring ``into`` up to date with another replica's ``records`` (from a
    replica here, a peer's page, a bundle): the shared planner, with what ``into`` ignores left
    out. ``behind`` collects the local records newer than the other replica's (see
    `resend_lost`)."""
    ignore = into.ignore()
    return plan_pull(
        into.store.get, records, replica=into.store.replica_id, policy=policy, within=within,
        ignored=lambda r: ignore.covers(r.path, r.kind is Kind.DIR),
        behind=None if behind is None else lambda local, _remote: behind.append(local),
    )  # fmt: skip


def resend_lost(into: Replica, behind: list[Record], acked: int) -> list[str]:
    """The paths where the other replica sent an older record than this one's, although it
    acknowledged this one's (its sequence number is at most ``acked``): it lost it since (it
    pruned a tombstone, then took the file back from a replica that had never seen the
    deletion). Each such record is given a new sequence number, so the next stream to every
    replica carries it again; else the two would differ for good, each thinking the other up
    to date."""
    lost = {r.path: r.seq for r in behind if r.seq <= acked}
    if not lost:
        return []
    sent: list[str] = []
    with into.store.transaction():
        for path, seq in lost.items():
            now = into.store.get(path)
            if now is not None and now.seq == seq and into.store.resend(path):
                sent.append(path)
    for path in sent:
        log.info("%s: the other replica had this replica's version and has an older one now "
                 "(a tombstone pruned there?): sent again", escape(path))  # fmt: skip
    return sent


def pull_applier(
    into: Replica,
    fetch: Callable[[Record], BinaryIO],
    source: Callable[[str], Record | None],
    *,
    via: str,
    policy: Policy,
    verbose: bool,
    progress: Callable[[ApplyStats], None] | None,
    source_root: str | None = None,
    source_keeper: Keeper | None = None,
) -> Applier:
    """The applier for ``pull_steps`` from a source whose records ``source`` looks up by path:
    a local file that changed under it is scanned, and the source's record planned again.
    ``source_root``: ``fetch`` reads the files of a replica on this machine there, and
    ``source_keeper`` keeps its versions (of an edit there that loses a conflict here)."""
    me = into.store.replica_id

    def replan(step: Step) -> list[Step]:
        into.scan(paths=[step.path])
        remote = source(step.path)
        if remote is None:
            return []
        return plan_record(
            into.store.get(step.path), remote, replica=me, policy=policy,
            local_lookup=into.store.get,
        )  # fmt: skip

    return Applier(
        into.store,
        into.root,
        fetch,
        via=via,
        replan=replan,
        keep_steps=verbose,
        on_progress=progress,
        check_root=into.check_root,
        source_root=source_root,
        keeper=keeper_for(into.root, into.cfg.versions_dir, into.cfg.keep_versions),
        source_keeper=source_keeper,
    )


def _pass(
    into: Replica,
    src: Replica,
    policy: Policy,
    within: Callable[[str], bool] | None,
    dry_run: bool,
    verbose: bool,
    progress: Callable[[ApplyStats], None] | None,
) -> PassReport:
    report = PassReport(into=into.cfg.name, source=src.cfg.name)
    mark = into.store.peer_mark(src.store.replica_id)
    top = src.store.seq

    def remote_records() -> Iterator[Record]:
        seq = mark.seen_seq
        while page := [r for r in src.store.page_since(seq, PAGE) if r.seq <= top]:
            # What the planner and the applier will ask about this page, in two queries.
            into.store.read_ahead([r.path for r in page], [r.sha256 for r in page if r.sha256])
            yield from (r for r in page if not is_placeholder(r))  # (src's own: never sent)
            seq = page[-1].seq

    behind: list[Record] = []
    steps = pull_steps(into, remote_records(), policy=policy, within=within, behind=behind)
    if dry_run:
        steps = Applier.planned_moves(into.store, list(steps))
        report.steps = [s for s in steps if s.op is not Op.RECORD or verbose]
        return report
    applier = pull_applier(into, _opener(src), src.store.get, via=src.cfg.name, policy=policy,
                           verbose=verbose, progress=progress, source_root=str(src.root),
                           source_keeper=keeper_for(src.root, src.cfg.versions_dir,
                                                    src.cfg.keep_versions))  # fmt: skip
    report.stats = applier.apply(steps)
    report.steps = report.stats.done
    resend_lost(into, behind, into.store.peer_mark(src.store.replica_id).acked_seq)
    if report.stats.stale_sources:
        # Changed since their scan without a change of size or mtime: read them again next time.
        with src.store.transaction():
            for path in report.stats.stale_sources:
                src.store.set_ino(path, 0)
    if not report.stats.errors and within is None:
        # Everything up to `top` is applied: next time, start after it. A failed path or a
        # subtree sync leaves the mark where it was, so nothing is skipped next time.
        with into.store.transaction():
            into.store.set_peer_mark(src.store.replica_id, name=src.cfg.name, seen_seq=top)
        with src.store.transaction():
            src.store.set_peer_mark(into.store.replica_id, name=into.cfg.name, acked_seq=top)
    return report
