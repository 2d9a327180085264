"""Paths, names, escaping and the planner."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from repld.protocol.errors import UnsafePathError
from repld.protocol.plan import Op, plan_pull, plan_record
from repld.protocol.reconcile import conflict_copy_record
from repld.protocol.record import (
    Kind,
    Record,
    block_size_for,
    check_path,
    conflict_copy_path,
    conflict_original,
    escape,
    loser_digest,
    unescape,
)
from repld.protocol.version import VersionVector

A = "aaaaaaaa-1111-1111-1111-111111111111"
B = "bbbbbbbb-2222-2222-2222-222222222222"


@pytest.mark.parametrize(
    "bad", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "a/./b", "a/", "a\0b", "a/\udcff"]
)
def test_unsafe_paths_are_refused(bad):
    with pytest.raises(UnsafePathError):
        check_path(bad)


@pytest.mark.parametrize("good", ["a", "a b/c\nd", "é/ü.txt", ".bashrc", "..hidden", "a/...b"])
def test_safe_paths(good):
    assert check_path(good) == good


@given(st.text())
def test_escape_round_trips_and_is_one_token(text):
    e = escape(text)
    assert " " not in e and "\n" not in e
    assert unescape(e) == text


def test_escape_of_undecodable_bytes():
    name = b"caf\xe9".decode("utf-8", "surrogateescape")
    assert escape(name) == "caf\\xe9" and unescape("caf\\xe9") == name


def _file(path, by=A, sha="1" * 64):
    return Record(path, "g", Kind.FILE, VersionVector.of({by: 1}), modified_by=by, sha256=sha)


@pytest.mark.parametrize("path,copy", [
    ("notes.txt", "notes.conflict-aaaaaaaa-{h}.txt"),
    ("d/archive.tar.gz", "d/archive.tar.conflict-aaaaaaaa-{h}.gz"),
    (".bashrc", ".bashrc.conflict-aaaaaaaa-{h}"),
    ("Makefile", "Makefile.conflict-aaaaaaaa-{h}"),
])
def test_conflict_copy_names(path, copy):
    copy = copy.format(h=loser_digest(_file(path))[:8])
    assert conflict_copy_path(path, _file(path)) == copy
    assert conflict_original(copy) == path
    assert conflict_original(path) is None


@pytest.mark.parametrize("path", ["notes", ".bashrc", "notes.txt", "d/archive.tar.gz"])
def test_conflict_original_of_a_copy_of_a_copy(path):
    """A copy of a copy names the copy as its original, whatever the extension (found by the
    property test: for extensionless names the new mark went before the old one)."""
    copy = conflict_copy_path(path, _file(path))
    copy_of_copy = conflict_copy_path(copy, _file(copy, by=B))
    assert conflict_original(copy_of_copy) == copy and conflict_original(copy) == path
    assert conflict_copy_path(copy_of_copy, _file(path)) != copy_of_copy


def test_conflict_copy_name_derives_from_the_losing_edit():
    """One edit gets one copy wherever it loses, whatever version it travels under (it may
    have won a conflict elsewhere first: its version merged with the other's); another edit of
    the same replica, even back to the same content, gets another copy, so none lands on an
    earlier copy's path (which may hold a history, say a tombstone)."""
    first = _file("notes.txt")
    merged = first.with_(version=first.version.merge(VersionVector.of({B: 3})))
    assert conflict_copy_path("notes.txt", first) == conflict_copy_path("notes.txt", merged)
    again = first.with_(version=first.version.bump(A))  # A's next edit, the same content
    assert conflict_copy_path("notes.txt", first) != conflict_copy_path("notes.txt", again)
    by_b = first.with_(modified_by=B, version=first.version.bump(B))
    assert conflict_copy_path("notes.txt", first) != conflict_copy_path("notes.txt", by_b)


@pytest.mark.parametrize("name", [
    "N" * 240 + ".txt",
    "é" * 125 + ".md",  # 2 bytes a character
    "x" * 200 + "." + "e" * 54,  # an extension too long to keep
    "🙂" * 63,  # 4 bytes a character, no extension
])
def test_conflict_copy_of_a_long_name_still_fits_a_file_name(name):
    """A copy whose name the file system refuses would leave the losing edit nowhere."""
    copy = conflict_copy_path(f"d/{name}", _file(name))
    head, base = copy.split("/")
    assert head == "d" and len(base.encode()) <= 255
    assert ".conflict-aaaaaaaa-" in base
    assert conflict_copy_path(f"d/{name}", _file(name)) == copy  # the same on every replica
    assert base[:20] == name[:20]


def test_block_sizes_grow_with_file():
    assert block_size_for(0) == 128 * 1024
    assert block_size_for(10 << 30) // (128 * 1024) >= 32
    assert (10 << 30) / block_size_for(10 << 30) <= 2000


def test_plan_new_file_dir_symlink_and_tombstone():
    remote = [
        Record("d", "g1", Kind.DIR, VersionVector.of({B: 1}), mode=0o755, modified_by=B),
        _file("d/f", by=B),
        Record("l", "g2", Kind.SYMLINK, VersionVector.of({B: 1}), target="d/f", modified_by=B),
        Record("gone", "g3", Kind.FILE, VersionVector.of({B: 2}), deleted=True, modified_by=B),
    ]
    steps = list(plan_pull(lambda p: None, remote, replica=A))
    assert [(s.op, s.path) for s in steps] == [
        (Op.MKDIR, "d"), (Op.WRITE, "d/f"), (Op.SYMLINK, "l"), (Op.RECORD, "gone")]


def test_plan_delete_is_deferred_and_expects_local_state():
    local = _file("f", by=A)
    tomb = local.with_(version=local.version.bump(B), deleted=True, modified_by=B)
    (step,) = plan_record(local, tomb, replica=A)
    assert step.op is Op.DELETE and step.deferred and step.expected == local


def test_plan_conflict_writes_copy_first():
    local = _file("f", by=A, sha="1" * 64)
    remote = Record("f", "g", Kind.FILE, VersionVector.of({B: 1}), modified_by=B,
                    sha256="2" * 64, mtime_ns=5)  # fmt: skip
    steps = plan_record(local, remote, replica=A, local_lookup=lambda p: None)
    assert [s.op for s in steps] == [Op.WRITE, Op.WRITE]
    assert steps[0].path.startswith("f.conflict-aaaaaaaa-") and steps[0].record.sha256 == "1" * 64
    assert steps[1].path == "f" and steps[1].conflict is not None


def test_plan_metadata_only():
    local = _file("f").with_(mode=0o644)
    remote = local.with_(version=local.version.bump(B), mode=0o755)
    (step,) = plan_record(local, remote, replica=A)
    assert step.op is Op.META


def test_plan_subtree_filter():
    remote = [_file("a/x", by=B), _file("b/y", by=B)]
    steps = list(plan_pull(lambda p: None, remote, replica=A, within=lambda p: p.startswith("a/")))
    assert [s.path for s in steps] == ["a/x"]


@pytest.mark.parametrize("copy_first", [False, True])
def test_plan_pull_sees_the_conflict_copies_it_planned_earlier_in_the_pass(copy_first):
    """Planned steps are recorded only when applied: a lookup of the copy's path during the same
    pass must see the planned copy, not what the database held before (found by the property
    test: a copy written to disk was recorded as deleted, or written twice)."""
    local = _file("f", by=A, sha="1" * 64)
    remote = Record("f", "g", Kind.FILE, VersionVector.of({B: 1}), modified_by=B,
                    sha256="2" * 64, mtime_ns=5)  # fmt: skip
    copy = conflict_copy_record(local, "f")  # what the remote holds too, having resolved it alike
    db = {"f": local}  # never updated during the pass, like a database before the batch commits
    stream = [copy, remote] if copy_first else [remote, copy]
    steps = list(plan_pull(db.get, stream, replica=A))
    assert sorted((s.op.value, s.path) for s in steps) == [("write", "f"), ("write", copy.path)]
    # A later record of the copy's path (the remote deleted it) is planned against the copy.
    gone = copy.with_(version=copy.version.bump(B), deleted=True, modified_by=B)
    steps = list(plan_pull(db.get, [remote, gone], replica=A))
    assert [(s.op, s.path) for s in steps] == [
        (Op.WRITE, copy.path), (Op.WRITE, "f"), (Op.DELETE, copy.path)]
    assert steps[2].expected == copy
