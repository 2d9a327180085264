"""Reconcile one local record with one remote record: the rules of DESIGN.md "Conflicts".

- equal versions, or the local one dominates: nothing to do;
- the remote one dominates: the local replica takes the remote record;
- concurrent but the same content (or both deleted): the versions merge, nothing is a conflict;
- concurrent, one side deleted: the modification wins, nothing is lost (unless the live side is
  what a joining replica found in its root, untouched since, and exactly what was deleted: then
  it was an old copy, and the deletion wins);
- concurrent, different content: a conflict. Without a preference every replica picks the same
  winner from the two records alone (a directory beats anything else, then anything beats what a
  joining replica found in its root, then the newer mtime, then the larger replica id, then that
  replica's later change, then the larger content hash: see ``_winner_key``, which also picks
  the metadata of a same-content merge); the loser is kept
  beside the winner as a conflict copy whose name and record derive only from the losing version,
  so two replicas that resolve the same conflict independently produce the same copy, once. The
  resolved version is the merge of both, so it dominates both and a third replica never sees the
  conflict again.

A preference (``--prefer``, or a prefer-* policy) is a choice only one replica makes, so its result
also gets a new event by the resolving replica: it then dominates any resolution that another
replica may have reached independently.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .record import Action, Kind, Record, conflict_copy_path, derived_guid, losing_edit
from .version import Order


class Policy(enum.Enum):
    KEEP_BOTH = "keep-both"
    NEWEST = "newest"
    # A replica's conflict_policy: its own edit wins (or loses) against another replica's; a
    # conflict between two other replicas' edits, which it only relays, is kept both ways.
    PREFER_LOCAL = "prefer-local"
    PREFER_REMOTE = "prefer-remote"
    # `--prefer local|remote` given to one sync: that side wins, whoever made its version.
    CHOOSE_LOCAL = "--prefer local"
    CHOOSE_REMOTE = "--prefer remote"


class Side(enum.Enum):
    LOCAL = "local"
    REMOTE = "remote"


@dataclass(frozen=True, slots=True)
class Conflict:
    path: str
    winner: Side
    winner_record: Record
    loser_record: Record
    copy: Record | None  # the conflict copy to create, or None when the loser is dropped
    reason: str


@dataclass(frozen=True, slots=True)
class Resolution:
    order: Order
    result: Record | None  # what the local record becomes; None: it stays as it is
    conflict: Conflict | None = None
    note: str = ""


def _winner_key(r: Record) -> tuple[int, int, int, str, int, str, int, str, str]:
    """Orders two records alike on every replica, from replicated fields only.

    A directory first (it may hold files); then anything over what a joining replica found in
    its root (Action.ADOPT: perhaps an old copy, whatever its mtime says; a home restored with
    `cp -r` has every mtime new), so the tree's version keeps the name.

    After kind and mtime: the replica that made the change, then its sequence number when it did
    (so of two changes by one replica the later one wins: a chmod keeps the mtime and the content,
    and must still beat the mode it changed), then content, mode and guid, so that two records
    never tie unless they describe the same thing the same way.
    """
    return (1 if r.kind is Kind.DIR else 0, 0 if r.action is Action.ADOPT else 1, r.mtime_ns,
            r.modified_by, r.origin_seq, r.content_id(), r.mode, r.kind.value, r.guid)  # fmt: skip


OTHERS_BITS = 0o077  # the permission bits of group and others


def _metadata_winner(local: Record, remote: Record) -> Record:
    """Of two concurrent records with the same content, the one whose metadata stands: the
    one whose last change the other's version has not seen, when only one is; else the
    deterministic winner. (A record's version counts its maker's change at most as high as the
    record says, so "seen" is sure; "not seen" may be a merge's overestimate, and then both
    may look unseen: the rule falls back, it never guesses wrong.)"""
    local_seen = remote.version.get(local.modified_by) >= local.version.get(local.modified_by)
    remote_seen = local.version.get(remote.modified_by) >= remote.version.get(remote.modified_by)
    if remote_seen and not local_seen:
        return local
    if local_seen and not remote_seen:
        return remote
    return max(local, remote, key=_winner_key)


def _what_was_deleted(alive: Record, dead: Record) -> bool:
    """Whether ``alive`` is the content the tombstone ``dead`` was the deletion of (a tombstone
    keeps the last content's hash or target)."""
    return alive.kind is dead.kind and dead.with_(deleted=False).same_content(alive) and (
        alive.kind is not Kind.FILE or bool(alive.sha256)
    )


def conflict_copy_record(loser: Record, path: str) -> Record:
    """The record of the copy that keeps a losing version; identical on every replica."""
    copy_path = conflict_copy_path(path, loser)
    return loser.with_(
        path=copy_path,
        guid=derived_guid(loser.guid, losing_edit(loser)),
        action=Action.CREATE,
        seq=0,
        replicated_ns=0,
        ino=0,
    )


def reconcile(
    local: Record | None,
    remote: Record,
    *,
    replica: str,
    policy: Policy = Policy.KEEP_BOTH,
) -> Resolution:
    """Decide what the local replica ``replica`` does with ``remote``'s record for the same path."""
    if local is None:
        return Resolution(Order.DOMINATED, remote, note="new")
    order = local.version.compare(remote.version)
    if order is Order.EQUAL and not local.same_content(remote):
        # Equal histories must mean equal content; if they do not, resolve it as a conflict rather
        # than silently keep two different files "in sync". (A damaged database; or, by design, a
        # directory that came back alive over its tombstone with the tombstone's version, because
        # a file new to the deleter arrived in it: then the directory beats the deletion.)
        order = Order.CONCURRENT
    if order in (Order.EQUAL, Order.DOMINATES):
        return Resolution(order, None)
    if order is Order.DOMINATED:
        return Resolution(order, remote)

    merged = local.version.merge(remote.version)
    if local.same_content(remote):
        # Nothing to fight over. Metadata (mode, mtime) comes from the side whose change the
        # other has not seen (a chmod here against a merge there that only added a lost
        # conflict), else from the deterministic winner, so both replicas end up with the same
        # record.
        # (Two joiners' adopted copies that merge stay adopted: the tree's version, when it
        # comes, still wins over them; one adopted copy and the tree's merge into the tree's.)
        base = _metadata_winner(local, remote)
        note = "same content, versions merged"
        if (Action.ADOPT in (local.action, remote.action) and local.mode != remote.mode
                and local.kind is not Kind.SYMLINK):  # fmt: skip
            # Found at a join with other permissions than the tree's: the owner's bits (and
            # the sticky bit) of the record that stands, and for group and others only what
            # both allow. A key made private on one machine only was made readable again by
            # the tree's mode, with no word (a trial); all bits ANDed took the x bit of a
            # script on the tree's own machine, as a trial found next.
            mode = (base.mode & ~OTHERS_BITS) | (local.mode & remote.mode & OTHERS_BITS)
            note += (f"; its modes differed ({local.mode:04o}, {remote.mode:04o}): group and "
                     f"others get only what both allowed, {mode:04o}")  # fmt: skip
            base = base.with_(mode=mode)
        if local.same_metadata(remote):
            return Resolution(order, base.with_(version=merged), note=note)
        # Different metadata: the result is a state neither side had under that version, and
        # another replica may merge the same versions from other records (one that lost a
        # conflict to either side): a version of its own keeps two different results of one
        # merge from ever looking equal. (Replicas that make this same merge reach the same
        # metadata, and their two versions then merge without a new one.)
        return Resolution(order, base.with_(version=merged.bump(replica)), note=note)
    if local.deleted or remote.deleted:
        alive, dead = (remote, local) if local.deleted else (local, remote)
        if alive.action is Action.ADOPT:
            result = dead.with_(version=merged)
            if _what_was_deleted(alive, dead):
                # Found at a join, untouched since, and exactly what the other side deleted: an
                # old copy of a deleted file, not a modification. Both sides decide the same.
                return Resolution(order, result, note="deleted (found at a join)")
            # Found at a join and not what was deleted (an older version, most likely, of a
            # file edited and then deleted): the deletion stands at the name, and the content
            # is kept beside it. Nothing deleted comes back; nothing is lost.
            reason = "deleted in the tree; what a joining replica had is kept beside it"
            side = Side.LOCAL if dead is local else Side.REMOTE
            copy = conflict_copy_record(alive, local.path)
            conflict = Conflict(local.path, side, dead, alive, copy, reason)
            return Resolution(order, result, conflict, note=reason)
        return Resolution(order, alive.with_(version=merged), note="modification beats deletion")

    has_dir = Kind.DIR in (local.kind, remote.kind)  # a directory always wins: it holds files
    # What a joining replica found in its root never loses silently, whatever the policy: the
    # tree's version keeps the name, the adopted one is kept beside it.
    adopted = Action.ADOPT in (local.action, remote.action)
    fixed = has_dir or adopted  # decided by the rule, not by a preference or a policy
    if policy in (Policy.PREFER_LOCAL, Policy.PREFER_REMOTE) and local.modified_by != replica:
        # Neither edit is this replica's (it holds another replica's, relayed): a preference
        # for its own edits says nothing here (a trial saw a relayed, older edit win so).
        policy = Policy.KEEP_BOTH
    if policy in (Policy.PREFER_LOCAL, Policy.CHOOSE_LOCAL) and not fixed:
        winner_side, reason = Side.LOCAL, "prefer local"
    elif policy in (Policy.PREFER_REMOTE, Policy.CHOOSE_REMOTE) and not fixed:
        winner_side, reason = Side.REMOTE, "prefer remote"
    else:
        local_wins = _winner_key(local) > _winner_key(remote)
        winner_side = Side.LOCAL if local_wins else Side.REMOTE
        if has_dir:
            reason = "a directory stays: it may hold files"
        elif (local.action is Action.ADOPT) != (remote.action is Action.ADOPT):
            reason = "the tree's version stays; the other was found at a join"
        elif local.mtime_ns != remote.mtime_ns:
            reason = "newer modification"
        else:
            reason = "tie broken by id"
    winner, loser = (local, remote) if winner_side is Side.LOCAL else (remote, local)

    chosen = policy not in (Policy.KEEP_BOTH, Policy.NEWEST) and not fixed
    # A loser dropped with no copy (a preference, or `newest`): the result carries an event of
    # this decision, so that on the loser's replica, where the settled version lands over that
    # edit, it brings two events at least and cannot pass for an edit made on top of it: the
    # edit is kept there as a version (see Applier), where one event would replace it unkept.
    dropped = not fixed and policy is not Policy.KEEP_BOTH
    version = merged.bump(replica) if dropped else merged
    # Two joiners' different adopted copies: the one kept at the name is still only adopted,
    # and the tree's version, when it comes, still wins over it.
    both_adopted = local.action is Action.ADOPT and remote.action is Action.ADOPT
    result = winner.with_(version=version, action=Action.ADOPT if both_adopted else Action.UPDATE)
    if chosen:
        result = result.with_(modified_by=replica, origin_seq=0)
    # A file or symlink that loses to a directory is kept whatever the policy: the directory
    # did not win by being newer, and "newest" must not drop a newer edit.
    keep = policy is Policy.KEEP_BOTH or fixed
    copy = conflict_copy_record(loser, local.path) if keep else None
    conflict = Conflict(local.path, winner_side, winner, loser, copy, reason)
    return Resolution(order, result, conflict, note=reason)
