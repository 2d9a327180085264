"""Reconcile rules of DESIGN.md "Conflicts", one test per case."""

import pytest
from repld.protocol.reconcile import Policy, Side, reconcile
from repld.protocol.record import Kind, Record, conflict_original, loser_digest
from repld.protocol.version import Order, VersionVector

A = "aaaaaaaa-1111-1111-1111-111111111111"
B = "bbbbbbbb-2222-2222-2222-222222222222"
C = "cccccccc-3333-3333-3333-333333333333"
SHA1, SHA2 = "1" * 64, "2" * 64


def rec(version, *, sha=SHA1, by=A, mtime=100, deleted=False, kind=Kind.FILE, path="d/report.txt",
        target=""):
    return Record(path, "guid-1", kind, VersionVector.of(version), deleted=deleted, mode=0o644,
                  mtime_ns=mtime, size=5, sha256=sha if kind is Kind.FILE else "", modified_by=by,
                  target=target)


def test_equal_is_nothing():
    r = rec({A: 1})
    assert reconcile(r, r, replica=A).result is None


def test_local_dominates_is_nothing():
    assert reconcile(rec({A: 2}), rec({A: 1}), replica=A).result is None


def test_remote_dominates_is_taken():
    remote = rec({A: 1, B: 1}, sha=SHA2, by=B)
    res = reconcile(rec({A: 1}), remote, replica=A)
    assert res.order is Order.DOMINATED and res.result == remote and res.conflict is None


def test_new_path_is_taken():
    remote = rec({B: 1}, by=B)
    assert reconcile(None, remote, replica=A).result == remote


def meta(r: Record) -> tuple[object, ...]:
    return (r.kind, r.deleted, r.sha256, r.mode, r.mtime_ns, r.guid, r.modified_by)


def test_same_content_merges_without_conflict():
    same_meta = reconcile(rec({A: 2}), rec({A: 1, B: 1}, by=B), replica=A)
    assert same_meta.conflict is None
    assert same_meta.result.version == VersionVector.of({A: 2, B: 1})

    local, remote = rec({A: 2}), rec({A: 1, B: 1}, by=B, mtime=200)
    res = reconcile(local, remote, replica=A)
    there = reconcile(remote, local, replica=B)
    assert res.conflict is None and there.conflict is None
    # Metadata comes from the same record on both sides (here the newer mtime) ...
    assert meta(res.result) == meta(there.result) == meta(remote)
    # ... under a version of the merging replica's own, which dominates both: a merge of these
    # versions from other records elsewhere is never taken for this one.
    assert res.result.version == VersionVector.of({A: 3, B: 1})
    assert there.result.version == VersionVector.of({A: 2, B: 2})
    # The two replicas' results agree: they merge without another version.
    again = reconcile(res.result, there.result, replica=A)
    assert again.result.version == VersionVector.of({A: 3, B: 2}) and again.conflict is None


def test_same_content_merge_ties_on_mode_and_guid_alike_everywhere():
    """A chmod keeps mtime and content: the merged metadata must still be the same on every
    replica (it was whichever record was local), and the later change by one replica wins."""
    old = rec({A: 1, B: 1}, kind=Kind.DIR).with_(mode=0o755, origin_seq=3)
    chmod = rec({A: 2}, kind=Kind.DIR).with_(mode=0o700, origin_seq=7)  # by A, later
    for local, remote in ((old, chmod), (chmod, old)):
        res = reconcile(local, remote, replica=C)
        assert res.conflict is None and res.result.mode == 0o700
        assert res.result.version == VersionVector.of({A: 2, B: 1, C: 1})
    # Records that differ in nothing the key looked at before but mode or guid.
    x = rec({A: 2}).with_(mode=0o644, guid="g1")
    y = rec({A: 1, B: 1}).with_(mode=0o755, guid="g2")
    assert meta(reconcile(x, y, replica=A).result) == meta(reconcile(y, x, replica=B).result)


def test_a_chmod_beats_a_merge_that_never_saw_it():
    """Found by the property test: C chmodded A's file; elsewhere A's file had won a conflict
    against B's symlink (its version merged B's, content and mode unchanged). Merging the two,
    the chmod stands, whatever the replica ids; and a replica that merged the same versions the
    other way (its own record losing) gets a version that the chmod's merge is not equal to."""
    created = rec({A: 1}, by=A)
    chmod = created.with_(version=VersionVector.of({A: 1, C: 1}), mode=0o755, modified_by=C)
    won_over_b = created.with_(version=VersionVector.of({A: 1, B: 1}))  # still A's change
    for by_id in (A, "0" * 8, "f" * 8):  # the deterministic key would pick either
        a = created.with_(modified_by=by_id, version=VersionVector.of({by_id: 1}))
        c = chmod.with_(version=VersionVector.of({by_id: 1, C: 1}))
        w = won_over_b.with_(modified_by=by_id, version=VersionVector.of({by_id: 1, B: 1}))
        assert a.mode == w.mode == 0o644
        for local, remote in ((c, w), (w, c)):
            res = reconcile(local, remote, replica=C)
            assert res.result.mode == 0o755
            assert res.result.version.dominates(c.version.merge(w.version))


def test_both_deleted_merges():
    res = reconcile(rec({A: 2}, deleted=True), rec({A: 1, B: 1}, deleted=True, by=B), replica=A)
    assert res.conflict is None and res.result.deleted
    assert res.result.version == VersionVector.of({A: 2, B: 1})


@pytest.mark.parametrize("local_deleted", [True, False])
def test_modification_beats_deletion(local_deleted):
    deleted = rec({A: 2}, deleted=True)
    modified = rec({A: 1, B: 1}, sha=SHA2, by=B)
    local, remote = (deleted, modified) if local_deleted else (modified, deleted)
    res = reconcile(local, remote, replica=A)
    assert res.conflict is None
    assert not res.result.deleted and res.result.sha256 == SHA2
    assert res.result.version.dominates(deleted.version)
    assert res.result.version.dominates(modified.version)


def test_conflict_has_same_outcome_on_both_replicas():
    a = rec({A: 2}, sha=SHA1, by=A, mtime=100)
    b = rec({A: 1, B: 1}, sha=SHA2, by=B, mtime=200)
    on_a = reconcile(a, b, replica=A)
    on_b = reconcile(b, a, replica=B)
    assert on_a.conflict and on_b.conflict
    assert on_a.result == on_b.result  # same winner, same version, independently
    assert on_a.result.sha256 == SHA2  # newer mtime wins
    assert on_a.conflict.winner is Side.REMOTE and on_b.conflict.winner is Side.LOCAL
    assert on_a.conflict.copy == on_b.conflict.copy  # one copy, same name and record
    copy = on_a.conflict.copy
    assert copy.sha256 == SHA1 and copy.version == a.version
    assert copy.path == f"d/report.conflict-aaaaaaaa-{loser_digest(a)[:8]}.txt"
    assert conflict_original(copy.path) == "d/report.txt"
    v = on_a.result.version
    assert v.dominates(a.version) and v.dominates(b.version)


def test_resolution_does_not_reconflict_on_third_replica():
    a = rec({A: 2}, sha=SHA1, by=A)
    b = rec({A: 1, B: 1}, sha=SHA2, by=B, mtime=200)
    resolved = reconcile(a, b, replica=A).result
    for third in (a, b, rec({A: 1})):  # a replica that saw only one side, or neither
        res = reconcile(third, resolved, replica=C)
        assert res.order is Order.DOMINATED and res.conflict is None


def test_tie_is_broken_by_replica_id():
    a = rec({A: 2}, sha=SHA1, by=A, mtime=100)
    b = rec({A: 1, B: 1}, sha=SHA2, by=B, mtime=100)
    assert reconcile(a, b, replica=A).result.sha256 == SHA2  # B > A
    assert reconcile(b, a, replica=B).result.sha256 == SHA2


def test_dir_beats_file_and_file_is_kept():
    d = rec({A: 2}, kind=Kind.DIR, by=A, mtime=1)
    f = rec({A: 1, B: 1}, sha=SHA2, by=B, mtime=999)
    res = reconcile(f, d, replica=B, policy=Policy.PREFER_LOCAL)
    assert res.result.kind is Kind.DIR
    assert res.conflict.copy is not None and res.conflict.copy.sha256 == SHA2


def test_symlink_conflict_copy_named_by_target_hash():
    a = rec({A: 2}, kind=Kind.SYMLINK, target="x", by=A)
    b = rec({A: 1, B: 1}, kind=Kind.SYMLINK, target="y", by=B, mtime=200)
    res = reconcile(a, b, replica=A)
    assert res.result.target == "y" and res.conflict.copy.target == "x"


@pytest.mark.parametrize(
    "policy,expect", [(Policy.PREFER_LOCAL, SHA1), (Policy.PREFER_REMOTE, SHA2)]
)
def test_preference_wins_and_dominates_any_independent_resolution(policy, expect):
    a = rec({A: 2}, sha=SHA1, by=A, mtime=100)
    b = rec({A: 1, B: 1}, sha=SHA2, by=B, mtime=200)
    res = reconcile(a, b, replica=A, policy=policy)
    assert res.result.sha256 == expect and res.conflict.copy is None
    independent = reconcile(b, a, replica=C).result  # someone else resolving by the rule
    assert res.result.version.dominates(independent.version)


def test_newest_policy_drops_loser_deterministically():
    a = rec({A: 2}, sha=SHA1, mtime=300)
    b = rec({A: 1, B: 1}, sha=SHA2, by=B, mtime=200)
    res = reconcile(a, b, replica=A, policy=Policy.NEWEST)
    other = reconcile(b, a, replica=B, policy=Policy.NEWEST).result
    assert res.result.sha256 == other.sha256 == SHA1 and res.conflict.copy is None
    assert res.result.mtime_ns == other.mtime_ns
    # Each decision is an event of its own (see the next test); the two merge with no conflict.
    assert res.result.version.get(A) == 3 and other.version.get(B) == 2
    again = reconcile(res.result, other, replica=A, policy=Policy.NEWEST)
    assert again.conflict is None and again.result.sha256 == SHA1


def test_a_loser_dropped_by_newest_elsewhere_cannot_pass_for_an_edit_on_top():
    """The settled version brings the losing replica two events at least (the winner's edit
    and the decision), so that replica keeps its dropped edit as a version (a trial found it
    kept nowhere: one event looks like an edit made on top of it)."""
    mine = rec({A: 1, B: 1}, sha=SHA2, by=B, mtime=200)  # B's edit
    theirs = rec({A: 2}, sha=SHA1, mtime=300)  # A's concurrent, newer edit
    settled = reconcile(theirs, mine, replica=A, policy=Policy.NEWEST).result
    unseen = sum(max(0, n - mine.version.get(r)) for r, n in settled.version)
    assert unseen >= 2, settled.version


@pytest.mark.parametrize("policy", list(Policy))
def test_a_newer_file_that_loses_to_a_directory_is_kept_under_every_policy(policy):
    older_dir = rec({A: 2}, kind=Kind.DIR, mtime=100)
    newer_file = rec({A: 1, B: 1}, sha=SHA2, by=B, mtime=900)
    for local, remote, me in ((older_dir, newer_file, A), (newer_file, older_dir, B)):
        res = reconcile(local, remote, replica=me, policy=policy)
        assert res.result.kind is Kind.DIR
        assert res.conflict.copy is not None and res.conflict.copy.sha256 == SHA2
        assert "newer" not in res.conflict.reason  # the directory is the older one


def test_an_adopted_old_copy_of_a_deleted_file_is_deleted_on_both_sides():
    from repld.protocol.record import Action

    tomb = rec({A: 3}, sha=SHA1, deleted=True)  # a deleted it; its last content was SHA1
    found = rec({C: 1}, sha=SHA1, by=C).with_(action=Action.ADOPT)  # c joined with that copy
    here = reconcile(found, tomb, replica=C)
    there = reconcile(tomb, found, replica=A)
    assert here.result.deleted and there.result.deleted
    assert here.result == there.result  # the same decision on both sides
    # Another content (an older version of a file edited, then deleted): the deletion stands
    # at the name, the content is kept beside it, the same on both sides.
    other = rec({C: 1}, sha=SHA2, by=C).with_(action=Action.ADOPT)
    here, there = reconcile(other, tomb, replica=C), reconcile(tomb, other, replica=A)
    assert here.result.deleted and there.result.deleted and here.result == there.result
    assert here.conflict.copy == there.conflict.copy and here.conflict.copy.sha256 == SHA2
    # Edited after the join, it is a modification: it stays.
    edited = rec({C: 2}, sha=SHA1, by=C).with_(action=Action.UPDATE)
    assert not reconcile(edited, tomb, replica=C).result.deleted


@pytest.mark.parametrize("policy", list(Policy))
def test_an_adopted_version_is_never_dropped_and_never_takes_the_name(policy):
    from repld.protocol.record import Action

    tree = rec({A: 2}, sha=SHA1, mtime=100)
    found = rec({C: 1}, sha=SHA2, by=C, mtime=900).with_(action=Action.ADOPT)  # newer mtime
    for local, remote, me in ((found, tree, C), (tree, found, A)):
        res = reconcile(local, remote, replica=me, policy=policy)
        assert res.result.sha256 == SHA1  # the tree's version keeps the name
        assert res.conflict.copy is not None and res.conflict.copy.sha256 == SHA2


def test_two_joiners_different_old_copies_stay_adopted_and_lose_to_the_tree():
    from repld.protocol.record import Action

    b_copy = rec({B: 1}, sha=SHA1, by=B, mtime=800).with_(action=Action.ADOPT)
    c_copy = rec({C: 1}, sha=SHA2, by=C, mtime=900).with_(action=Action.ADOPT)
    settled = reconcile(b_copy, c_copy, replica=B).result
    assert settled.action is Action.ADOPT
    tree = rec({A: 2}, sha="3" * 64, mtime=100)
    for policy in Policy:
        res = reconcile(settled, tree, replica=B, policy=policy)
        assert res.result.sha256 == "3" * 64 and res.conflict.copy is not None, policy


def test_two_joiners_old_copies_that_merge_stay_adopted():
    from repld.protocol.record import Action

    b_copy = rec({B: 1}, sha=SHA1, by=B).with_(action=Action.ADOPT)
    c_copy = rec({C: 1}, sha=SHA1, by=C).with_(action=Action.ADOPT)
    merged = reconcile(b_copy, c_copy, replica=B).result
    assert merged.action is Action.ADOPT
    tomb = rec({A: 3}, sha=SHA1, deleted=True)  # the tree deleted what both had
    assert reconcile(merged, tomb, replica=B).result.deleted


def test_equal_versions_with_different_content_are_a_conflict():
    a, b = rec({A: 1}, sha=SHA1), rec({A: 1}, sha=SHA2, mtime=200)
    res = reconcile(a, b, replica=A)
    assert res.conflict is not None


def test_a_copy_found_at_a_join_keeps_only_the_permissions_both_sides_allow():
    """A key made private (0600) on the joining machine only went back to the tree's 0644,
    with no word (a trial). Of two modes for one content, where one side found it at a join,
    the result allows only what both do, on both sides, and says so."""
    from repld.protocol.record import Action

    tree = rec({A: 1})  # 0644
    found = rec({C: 1}, by=C).with_(action=Action.ADOPT, mode=0o600)
    results = []
    for local, remote, me in ((found, tree, C), (tree, found, A)):
        res = reconcile(local, remote, replica=me)
        assert res.conflict is None and res.result.mode == 0o600, res
        assert "group and others get only what both allowed, 0600" in res.note
        results.append(res.result)
    # The two merges then meet: the same content and mode, nothing more to do or to bump.
    again = reconcile(results[0], results[1], replica=C)
    assert again.result is not None and again.result.mode == 0o600
    assert again.result.version == results[0].version.merge(results[1].version)
    # The owner's bits are the tree's: a script stays executable for its owner (a trial:
    # ANDed whole, 0755 and 0644 gave 0644 on both sides); group and others lose x, as one
    # side did not allow it.
    script = rec({A: 1}).with_(mode=0o755)
    found_script = rec({C: 1}, by=C).with_(action=Action.ADOPT, mode=0o644)
    for local, remote, me in ((found_script, script, C), (script, found_script, A)):
        assert reconcile(local, remote, replica=me).result.mode == 0o744
    # Without a join, a concurrent chmod is decided as before: one mode wins whole.
    chmod = rec({B: 1}, by=B).with_(mode=0o600)
    res = reconcile(rec({A: 1}).with_(mode=0o755), chmod, replica=A)
    assert res.result.mode in (0o600, 0o755)
