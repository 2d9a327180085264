"""The sync plan: from remote records to the steps that bring the local replica up to date.

``plan_pull`` is the one planner that the one-shot sync and the daemon share. It takes the remote
records (streamed, in the remote's sequence order), looks up the local record for each path and
yields ``Step`` objects: what to write, create, delete or merely record. Planning is pure: the
caller applies the steps (or, for a dry run, prints them).

Steps that remove things (deletions, and a directory replaced by something else) are ``deferred``:
the caller applies them after all others and in reverse path order, so that children go before
their parents and a renamed file's old copy is still there to copy blocks from.

The caller's lookup reads what the local replica has recorded, but the steps planned so far in a
pass may not be applied (recorded) yet. A path comes once in a remote stream, so only a conflict
copy can be planned twice in one pass (as a copy, and as the remote's own record of that path, or
as copies of two conflicts): ``plan_pull`` remembers the records it planned at conflict-copy paths
and looks those up first, never a stale record. They are few; memory stays bounded.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .reconcile import Conflict, Policy, reconcile
from .record import Kind, Record, conflict_original, escape, escape_note
from .version import Order


class Op(enum.Enum):
    WRITE = "write"  # file content comes from a local copy or from the peer
    MKDIR = "mkdir"
    SYMLINK = "symlink"
    DELETE = "delete"
    META = "meta"  # mode / mtime only
    RECORD = "record"  # the database only: merged version, a tombstone never seen here


@dataclass(frozen=True, slots=True)
class Step:
    op: Op
    path: str
    record: Record  # the local record once the step is done
    expected: Record | None  # the local record the disk must still match, else rescan first
    conflict: Conflict | None = None
    deferred: bool = False
    note: str = ""
    source: str = ""  # where the peer holds the content, when not at ``path`` (conflict copies)

    def describe(self, sides: tuple[str, str] | None = None) -> str:
        """One line: paths escaped (a name may hold a newline). ``sides``: the names of the
        replica the step is for and of the other one, said instead of "local" and "remote"
        (which read backwards on a line about the other side of a sync)."""
        text = f"{self.op.value:7} {escape(self.path)}"
        if self.conflict is not None:
            c = self.conflict
            kept = (f", loser kept as {escape(c.copy.path)}" if c.copy
                    else ", no conflict copy: the loser is in its replica's `repld versions`"
                    if c.reason.startswith("prefer") or c.winner.value == "remote"
                    else ", no conflict copy: the other edit is dropped (newest)")
            winner, reason = c.winner.value, c.reason
            if sides is not None:
                name = dict(zip(("local", "remote"), sides, strict=True))
                winner = f"{name[winner]}'s version"
                side = reason.removeprefix("prefer ")
                if side in name and side != reason:
                    reason = f"prefer {name[side]}"
            text += f"  [conflict: {winner} wins ({reason}){kept}]"
        elif self.note:
            text += f"  [{escape_note(self.note)}]"
        return text


def steps_for(local: Record | None, result: Record, *, note: str = "") -> Step:
    """The one step that turns the local state ``local`` into ``result``."""
    live = local is not None and not local.deleted
    if result.deleted:
        if not live:
            return Step(Op.RECORD, result.path, result, local, note=note or "tombstone")
        return Step(Op.DELETE, result.path, result, local, deferred=True, note=note)
    assert local is None or local.path == result.path
    if live and local is not None and local.kind is Kind.DIR and result.kind is not Kind.DIR:
        op = Op.WRITE if result.kind is Kind.FILE else Op.SYMLINK
        return Step(op, result.path, result, local, deferred=True, note=note or "replaces dir")
    if result.kind is Kind.DIR:
        if live and local is not None and local.kind is Kind.DIR:
            op = Op.RECORD if local.mode == result.mode else Op.META
            return Step(op, result.path, result, local, note=note)
        return Step(Op.MKDIR, result.path, result, local, note=note)
    if result.kind is Kind.SYMLINK:
        if live and local is not None and local.same_content(result):
            return Step(Op.RECORD, result.path, result, local, note=note)
        return Step(Op.SYMLINK, result.path, result, local, note=note)
    if live and local is not None and local.same_content(result):
        op = Op.RECORD if local.same_metadata(result) else Op.META
        return Step(op, result.path, result, local, note=note)
    return Step(Op.WRITE, result.path, result, local, note=note)


def plan_record(
    local: Record | None,
    remote: Record,
    *,
    replica: str,
    policy: Policy = Policy.KEEP_BOTH,
    local_lookup: Callable[[str], Record | None] | None = None,
) -> list[Step]:
    """Steps for one remote record (a conflict copy first, then the path itself)."""
    res = reconcile(local, remote, replica=replica, policy=policy)
    if res.result is None:
        return []
    steps: list[Step] = []
    if res.conflict is not None and res.conflict.copy is not None:
        copy = res.conflict.copy
        existing = local_lookup(copy.path) if local_lookup else None
        if existing is None or existing.version.compare(copy.version) is Order.DOMINATED:
            steps.append(
                Step(
                    Op.WRITE if copy.kind is Kind.FILE else Op.SYMLINK,
                    copy.path,
                    copy,
                    existing,
                    note=f"conflict copy of {remote.path}",
                    source=remote.path,
                )
            )
    step = steps_for(local, res.result, note=res.note)
    if res.conflict is not None:
        step = Step(step.op, step.path, step.record, step.expected, res.conflict, step.deferred,
                    step.note)  # fmt: skip
    steps.append(step)
    return steps


def plan_pull(
    local_lookup: Callable[[str], Record | None],
    remote_records: Iterable[Record],
    *,
    replica: str,
    policy: Policy = Policy.KEEP_BOTH,
    within: Callable[[str], bool] | None = None,
    ignored: Callable[[Record], bool] | None = None,
    behind: Callable[[Record, Record], None] | None = None,
) -> Iterator[Step]:
    """Steps that bring the local replica up to date with ``remote_records``.

    ``within`` limits the plan to some paths (a subtree sync); records outside it are skipped,
    and so is the removal of a file moved from inside to outside (until a sync covers both).
    So are those ``ignored`` says this replica ignores (its own `ignore` rules): such a path is
    none of its business, and a file written there would never be scanned again.
    ``behind(local, remote)`` is told of every remote record older than the local one (the
    other replica has not got this one's newer version, or has lost it).
    """
    planned: dict[str, Record] = {}  # conflict-copy paths planned in this pass -> their record

    def lookup(path: str) -> Record | None:
        rec = planned.get(path)
        return rec if rec is not None else local_lookup(path)

    moved_out: dict[str, Record] = {}
    if within is not None:
        # A file moved from inside the subtree to outside it: its new path is not synced now,
        # and removing the old one alone would take the file from this replica until a sync
        # that covers both ends. Both halves wait for that one.
        remote_records = list(remote_records)
        moved_out = {r.guid: r for r in remote_records
                     if not r.deleted and r.kind is Kind.FILE and not within(r.path)}  # fmt: skip

    for remote in remote_records:
        if within is not None and not within(remote.path):
            continue
        if remote.deleted and (dest := moved_out.get(remote.guid)) is not None:
            here = lookup(dest.path)
            if here is None or not here.version.descends(dest.version):
                continue
        if ignored is not None and ignored(remote):
            continue
        local = lookup(remote.path)
        if (behind is not None and local is not None
                and local.version.compare(remote.version) is Order.DOMINATES):  # fmt: skip
            behind(local, remote)
        for step in plan_record(local, remote, replica=replica, policy=policy,
                                local_lookup=lookup):  # fmt: skip
            if step.path != remote.path or conflict_original(step.path) is not None:
                planned[step.path] = step.record
            yield step
