"""Versions: what another replica's change deletes or rewrites here is kept for a while."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from helpers import Rep, make_replicas, snapshot
from repld.daemon.versions import _NAME_RE, STAMP, _numbered, version_name


def versions(rep: Rep, *paths: str) -> list[dict]:
    return json.loads(rep("versions", "--json", *paths).stdout)


def set_option(rep: Rep, line: str) -> None:
    text = rep.config.read_text()
    key = line.split("=")[0].strip()
    lines = [ln for ln in text.splitlines() if not ln.startswith(f"{key} ")]
    rep.config.write_text("\n".join([line, *lines]) + "\n")


def test_a_file_a_peer_deletes_is_kept_and_can_be_restored(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "docs").mkdir()
    (a.root / "docs" / "report.odt").write_text("the report\n")
    (a.root / "docs" / "report.odt").chmod(0o640)
    (a.root / ".bashrc").write_text("alias l=ls\n")
    (a.root / "stays.txt").write_text("stays\n")
    a.sync(b)
    (a.root / "docs" / "report.odt").unlink()
    (a.root / ".bashrc").unlink()
    a.sync(b)
    assert not (b.root / "docs" / "report.odt").exists()

    kept = {v["path"]: v for v in versions(b)}
    assert sorted(kept) == [".bashrc", "docs/report.odt"]
    report = Path(kept["docs/report.odt"]["file"])
    assert report.parent == b.state / "versions" / "docs"
    assert report.name.startswith("report~") and report.name.endswith(".odt")
    assert report.read_text() == "the report\n" and kept["docs/report.odt"]["size"] == 11
    assert versions(a) == []  # a deleted them itself: its own changes are not versions
    assert [v["path"] for v in versions(b, "docs")] == ["docs/report.odt"]
    text = b("versions").stdout
    assert "docs/report.odt" in text and "cp -p" in text

    # Restoring is a copy back into the tree; the next sync takes it everywhere.
    shutil.copy2(report, b.root / "docs" / "report.odt")  # what `repld versions` suggests
    b.sync(a)
    assert (a.root / "docs" / "report.odt").read_text() == "the report\n"
    assert snapshot(a.root) == snapshot(b.root)


def test_keep_versions_all_keeps_what_a_peer_rewrote_and_off_keeps_nothing(tmp_path):
    a, b, c = make_replicas(tmp_path, "a", "b", "c")
    (a.root / "notes.txt").write_text("first\n")
    (a.root / "gone.txt").write_text("gone\n")
    a.sync(b)
    a.sync(c)
    set_option(b, 'keep_versions = "all"')
    set_option(c, 'keep_versions = "off"')
    (a.root / "notes.txt").write_text("second, longer\n")
    (a.root / "gone.txt").unlink()
    a.sync(b)
    a.sync(c)
    assert (b.root / "notes.txt").read_text() == "second, longer\n"
    kept = {v["path"]: Path(v["file"]).read_text() for v in versions(b)}
    assert kept == {"notes.txt": "first\n", "gone.txt": "gone\n"}
    assert versions(c) == [] and not (c.state / "versions").exists()
    assert (c.root / "notes.txt").read_text() == "second, longer\n"
    # With the default ("deleted"), a rewrite is not kept.
    (a.root / "notes.txt").write_text("third\n")
    set_option(b, 'keep_versions = "deleted"')
    a.sync(b)
    assert {v["path"] for v in versions(b)} == {"notes.txt", "gone.txt"}  # no new one


def test_versions_older_than_the_configured_days_are_deleted(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "x.txt").write_text("x\n")
    a.sync(b)
    old = b.state / "versions" / "sub" / f"old~{time.strftime(STAMP, time.localtime(time.time() - 3 * 86400))}.txt"
    recent = b.state / "versions" / f"recent~{time.strftime(STAMP)}.txt"
    old.parent.mkdir(parents=True)
    old.write_text("old\n")
    recent.write_text("recent\n")
    set_option(b, "keep_versions_days = 2")
    (a.root / "x.txt").unlink()
    a.sync(b)
    assert not old.exists() and not old.parent.exists()  # and its folder, left empty
    assert recent.exists()
    assert sorted(v["path"] for v in versions(b)) == ["recent.txt", "x.txt"]


def test_a_deletion_whose_file_cannot_be_kept_is_not_made(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "precious.txt").write_text("precious\n")
    (a.root / "pd" / "sub").mkdir(parents=True)
    (a.root / "pd" / "sub" / "p1").write_text("p1\n")
    (a.root / "pd" / "p2").write_text("p2\n")
    a.sync(b)
    (b.state / "versions").write_text("a file where the versions folder goes\n")
    (a.root / "precious.txt").unlink()
    shutil.rmtree(a.root / "pd")
    proc = a.sync(b, check=False)
    assert proc.returncode == 1
    assert "precious.txt: its current content could not be kept in" in proc.stderr
    assert "must be a directory (something else is there)" in proc.stderr
    assert 'keep_versions = "off"' in proc.stderr
    assert (b.root / "precious.txt").read_text() == "precious\n"
    assert (b.root / "pd" / "sub" / "p1").read_text() == "p1\n"
    # The directories that still hold those files are not "kept as new": they would come
    # back on the replica that deleted them.
    assert "kept, it still holds files" not in proc.stderr
    # Asked, `repld versions` says why there are none, and what waits on it.
    listed = b("versions")
    assert "no versions of any file kept" in listed.stdout
    assert "is not a directory" in listed.stderr and "deletions from other replicas wait" \
        in listed.stderr
    a.sync(b, check=False)
    assert not (a.root / "pd").exists()
    # Once the way is clear, the next sync makes the deletions, and keeps the files.
    (b.state / "versions").unlink()
    a.sync(b)
    assert not (b.root / "precious.txt").exists() and not (b.root / "pd").exists()
    assert not (a.root / "pd").exists()
    assert sorted(v["path"] for v in versions(b)) == ["pd/p2", "pd/sub/p1", "precious.txt"]
    assert snapshot(a.root) == snapshot(b.root)


def test_a_file_replaced_by_a_symlink_is_kept(tmp_path):
    """A dotfile manager on another machine makes ~/.bashrc a symlink: its content leaves
    the tree here, as with a deletion."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / ".bashrc").write_text("my settings\n")
    a.sync(b)
    (a.root / ".bashrc").unlink()
    (a.root / ".bashrc").symlink_to("dotfiles/bashrc")
    a.sync(b)
    assert os.readlink(b.root / ".bashrc") == "dotfiles/bashrc"
    (kept,) = versions(b)
    assert kept["path"] == ".bashrc" and Path(kept["file"]).read_text() == "my settings\n"


def test_a_name_that_looks_like_a_version_keeps_its_own_time(tmp_path):
    """settings.conf~20240101-120000 (a rotated file): its version must read back as that
    path, kept now, and outlive the next expiry (it read as kept in 2024, and was deleted)."""
    a, b = make_replicas(tmp_path, "a", "b")
    name = "settings.conf~20240101-120000"
    (a.root / name).write_text("only copy\n")
    a.sync(b)
    (a.root / name).unlink()
    set_option(b, "keep_versions_days = 2")
    a.sync(b)
    b.sync(a)  # expires what is older than 2 days
    (kept,) = versions(b)
    assert kept["path"] == name and kept["kept"].startswith(time.strftime("%Y-%m-%d"))
    assert Path(kept["file"]).read_text() == "only copy\n"


@pytest.mark.parametrize("name", [
    "report.odt", ".bashrc", "Makefile", "archive.tar.gz", "a b.txt", "settings.conf~20240101-120000",
    "v~20261122-150003.txt", "x~20261122-150003-1", "notes.txt-1", "weird.ext~", "dots...",
    "new\nline.txt", "ends with\n",  # (a trial: such versions could never be listed)
])
def test_version_names_read_back_as_the_path_and_time_they_were_kept_at(name):
    when = time.mktime(time.strptime("20261122-150003", STAMP))
    (v,) = [m for m in [_NAME_RE.match(version_name(name, when))] if m]
    assert f"{v['stem']}{v['ext'] or ''}" == name
    assert v["stamp"] == "20261122-150003" and v["n"] is None
    assert _NAME_RE.match(_numbered(version_name(name, when), 2))["n"] == "2"


def test_a_version_copied_to_a_full_disk_leaves_no_half_copy(tmp_path, small_tmpfs):
    """State on another (small) file system: versions are copies there, and one that does not
    fit is no version at all; the deletion waits, saying to make room."""
    (a,) = make_replicas(tmp_path, "a")
    u = Rep("u", tmp_path / "u", tmp_path / "u.toml")
    u.root.mkdir()
    u("init", u.root, "--name", "u", "--state", small_tmpfs / "u.state", "--tree-id", a.tree_id())
    (a.root / "big.bin").write_bytes(os.urandom(6 << 20))  # more than the 4 MiB there
    a.sync(u)
    (a.root / "big.bin").unlink()
    proc = a.sync(u, check=False)
    assert proc.returncode == 1 and "make room there" in proc.stderr
    assert (u.root / "big.bin").stat().st_size == 6 << 20
    assert versions(u) == []
    assert not [p for p in (small_tmpfs / "u.state" / "versions").rglob("*") if p.is_file()]


def test_bad_keep_versions_settings_are_config_errors(tmp_path):
    (a,) = make_replicas(tmp_path, "a")
    set_option(a, 'keep_versions = "some"')
    proc = a("versions", check=False)
    assert proc.returncode == 2 and "keep_versions" in proc.stderr and "deleted" in proc.stderr
    set_option(a, 'keep_versions = "all"')
    set_option(a, "keep_versions_days = 0")
    proc = a("versions", check=False)
    assert proc.returncode == 2 and "keep_versions_days" in proc.stderr
    set_option(a, "keep_versions_days = 30")
    for bad in ("-1", '"30"', "true"):
        set_option(a, f"prune_after_days = {bad}")
        proc = a("prune", check=False)
        assert proc.returncode == 2 and "prune_after_days" in proc.stderr, (bad, proc.stderr)
        assert "0: the daemon never prunes by itself" in proc.stderr
    set_option(a, "prune_after_days = 0.5")
    assert a("prune").returncode == 0


def test_restore_puts_the_newest_version_back_where_nothing_is(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "docs" / "old").mkdir(parents=True)
    (a.root / "docs" / "plan.txt").write_text("plan v1\n")
    (a.root / "docs" / "old" / "draft.txt").write_text("draft\n")
    (a.root / "docs" / "old" / "draft.txt").chmod(0o600)
    (a.root / "top.txt").write_text("top\n")
    a.sync(b)
    (a.root / "docs" / "plan.txt").unlink()
    a.sync(b)
    (a.root / "docs" / "plan.txt").write_text("plan v2\n")
    a.sync(b)
    (a.root / "docs" / "plan.txt").unlink()
    shutil.rmtree(a.root / "docs" / "old")
    (a.root / "top.txt").unlink()
    a.sync(b)
    assert not (b.root / "docs" / "old").exists()
    assert sorted(v["path"] for v in versions(b)) == [
        "docs/old/draft.txt", "docs/plan.txt", "docs/plan.txt", "top.txt"]

    # Something at the name is never replaced: that path is skipped, and said.
    (b.root / "top.txt").write_text("new top\n")
    proc = b("versions", "top.txt", "--restore", check=False)
    assert proc.returncode == 1, proc
    assert "not restored: top.txt: something else is there now" in proc.stderr
    assert (b.root / "top.txt").read_text() == "new top\n"

    out = b("versions", "docs", "--restore").stdout
    assert "restored docs/plan.txt" in out and "restored docs/old/draft.txt" in out
    assert "`repld scan` records them" in out
    assert (b.root / "docs" / "plan.txt").read_text() == "plan v2\n"  # the newest
    draft = b.root / "docs" / "old" / "draft.txt"
    assert draft.read_text() == "draft\n" and draft.stat().st_mode & 0o777 == 0o600
    draft.write_text("edited after the restore\n")  # a copy: the version stays as it was
    kept = [v for v in versions(b, "docs/old") if v["path"] == "docs/old/draft.txt"]
    assert Path(kept[0]["file"]).read_text() == "draft\n"
    assert not [p for p in (b.root / "docs").rglob("*") if p.name.startswith(".repld-tmp")]
    b.sync(a)
    assert (a.root / "docs" / "plan.txt").read_text() == "plan v2\n"
    assert (a.root / "docs" / "old" / "draft.txt").read_text() == "edited after the restore\n"

    assert b("versions", "--restore", check=False).returncode == 2  # which PATH?
    assert b("versions", "nothing", "--restore", check=False).returncode == 2


def test_restore_never_puts_back_a_version_older_than_the_one_recorded(tmp_path):
    """A trial: b deleted report.txt (a kept that version), then wrote it anew; an rm -rf on
    a, held by the circuit breaker, and `versions docs --restore` there put the old version
    back, which the next scan took for an edit of the new one: it replaced the new one on
    every replica, and b, which keeps no version of what an edit replaces, lost it."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "docs").mkdir()
    (a.root / "docs" / "report.txt").write_text("old content\n")
    for i in range(150):
        (a.root / f"f{i:03}.txt").write_text(f"file {i}\n")
    a.sync(b)
    (b.root / "docs" / "report.txt").unlink()
    b.sync(a)
    (b.root / "docs" / "report.txt").write_text("CURRENT important content\n")
    b.sync(a)
    assert (a.root / "docs" / "report.txt").read_text() == "CURRENT important content\n"
    assert [v["path"] for v in versions(a)] == ["docs/report.txt"]  # the old content

    shutil.rmtree(a.root / "docs")
    for i in range(150):
        (a.root / f"f{i:03}.txt").unlink()
    proc = a("scan", check=False)
    assert proc.returncode == 1 and "--accept-deletes" in proc.stderr  # held
    proc = a("versions", "docs", "--restore", check=False)
    assert proc.returncode == 1, proc
    assert "not restored: docs/report.txt: the tree has a newer version of it" in proc.stderr
    assert "`cp -an`" in proc.stderr
    assert not (a.root / "docs" / "report.txt").exists()
    # What it says to do: the newer one copied back from another replica's tree.
    shutil.copytree(b.root, a.root, dirs_exist_ok=True)
    a.sync(b)
    for rep in (a, b):
        assert (rep.root / "docs" / "report.txt").read_text() == "CURRENT important content\n"

    # Deleted here and recorded: the version kept is older than what was deleted, and says so.
    (a.root / "docs" / "report.txt").unlink()
    a("scan")
    out = a("versions", "docs/report.txt", "--restore").stdout
    assert "restored docs/report.txt" in out and "an older version than the one deleted" in out
    assert (a.root / "docs" / "report.txt").read_text() == "old content\n"
    # Once more: the same content is there already, which is no failure.
    out = a("versions", "docs/report.txt", "--restore").stdout
    assert "already there: 1 file(s)" in out
    proc = a("versions", "f000.txt", check=False)
    assert "Changes made on this replica keep nothing here" in proc.stdout, proc


def test_an_edit_that_loses_a_conflict_with_no_copy_is_kept(tmp_path):
    """--prefer remote (or conflict_policy newest) drops this replica's edit with no conflict
    copy: its content leaves the tree as a deletion's would, and is kept the same way."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "notes.txt").write_text("v1\n")
    a.sync(b)
    (a.root / "notes.txt").write_text("a's edit, about to lose\n")
    (b.root / "notes.txt").write_text("b's edit wins\n")
    out = a.sync(b, "--prefer", "remote", "-v").stdout
    assert "no conflict copy: the loser is in its replica's `repld versions`" in out
    assert (a.root / "notes.txt").read_text() == "b's edit wins\n"
    kept = versions(a)
    assert [v["path"] for v in kept] == ["notes.txt"]
    assert Path(kept[0]["file"]).read_text() == "a's edit, about to lose\n"
    assert versions(b) == []  # b's own edit won: nothing of b's left its tree

    # The other way round: --prefer local from a drops b's edit, which the sync's other pass
    # then writes over on b. Kept on b, where it was made (a trial found it in neither).
    (a.root / "notes.txt").write_text("a's edit wins this time\n")
    (b.root / "notes.txt").write_text("b's edit, about to lose\n")
    a.sync(b, "--prefer", "local")
    assert (b.root / "notes.txt").read_text() == "a's edit wins this time\n"
    kept = versions(b)
    assert [v["path"] for v in kept] == ["notes.txt"], kept
    assert Path(kept[0]["file"]).read_text() == "b's edit, about to lose\n"



def test_an_edit_dropped_by_newest_on_another_replica_is_kept_where_it_was_made(tmp_path):
    """c settles a conflict with conflict_policy newest against d's edit, which it got through
    x; the settled version reaches d later, from x. d keeps its dropped edit as a version (a
    trial found it kept nowhere: one event more looked like an edit made on top of it)."""
    from test_sync import newer, set_policy

    c, d, x = make_replicas(tmp_path, "c", "d", "x")
    (c.root / "notes.txt").write_text("v1\n")
    c.sync(d)
    c.sync(x)
    set_policy(c, "newest")
    (d.root / "notes.txt").write_text("d's older edit, dropped by newest\n")
    (c.root / "notes.txt").write_text("c's newer edit\n")
    newer(c.root / "notes.txt", than=d.root / "notes.txt")
    d.sync(x)  # x relays d's edit
    c.sync(x)  # c meets the conflict: its own edit is the newer, no copy
    x.sync(d)  # the settled version reaches d
    assert (d.root / "notes.txt").read_text() == "c's newer edit\n"
    texts = [Path(v["file"]).read_text() for v in versions(d)]
    assert texts == ["d's older edit, dropped by newest\n"], texts
    assert not list(c.root.glob("notes.conflict-*"))


def test_delete_frees_the_room_versions_take(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "big.bin").write_bytes(os.urandom(300_000))
    (a.root / "keep.txt").write_text("keep\n")
    (a.root / "gone.txt").write_text("gone\n")
    a.sync(b)
    (a.root / "big.bin").unlink()
    (a.root / "gone.txt").unlink()
    a.sync(b)
    assert sorted(v["path"] for v in versions(b)) == ["big.bin", "gone.txt"]
    out = b("versions", "big.bin", "--delete").stdout
    assert "deleted 1 version(s) of big.bin" in out and "KiB freed" in out, out
    assert [v["path"] for v in versions(b)] == ["gone.txt"]
    assert "deleted 1 version(s) from" in b("versions", "--delete").stdout
    assert versions(b) == [] and not list((b.state / "versions").iterdir())
    proc = b("versions", "--delete", "--restore", check=False)
    assert proc.returncode == 2 and "not both" in proc.stderr
    assert (b.root / "keep.txt").read_text() == "keep\n"


def test_a_deletion_of_a_long_name_or_deep_path_is_made_with_or_without_a_version(tmp_path):
    """NAME~STAMP of a 255-byte name is past a file name's limit, and the versions directory's
    path before a deep path past a path's: both deletions failed every 10 s for good, with
    advice about permissions (a trial). The long name is kept, shortened; the deep path
    cannot be, and its deletion goes ahead all the same."""
    a, b = make_replicas(tmp_path, "a", "b")
    long_name = "€" * 83 + ".txt"  # 253 bytes
    (a.root / long_name).write_text("long\n")
    deep = a.root
    while len(os.fsencode(deep)) < 3900:
        deep = deep / ("d" * 200)
    deep.mkdir(parents=True)
    (deep / "deep.txt").write_text("deep\n")
    a.sync(b)
    rel_deep = (deep / "deep.txt").relative_to(a.root)
    assert (b.root / rel_deep).read_text() == "deep\n"
    (a.root / long_name).unlink()
    (deep / "deep.txt").unlink()
    a.sync(b)  # exit 0: nothing failed
    assert not (b.root / long_name).exists() and not (b.root / rel_deep).exists()
    (kept,) = versions(b)
    assert kept["path"].startswith("€" * 50) and kept["path"].endswith(".txt")
    assert Path(kept["file"]).read_text() == "long\n"
    assert snapshot(a.root) == snapshot(b.root)


def test_restoring_a_directory_brings_back_its_last_removal_not_older_ones(tmp_path):
    """A trial: after an `rm -rf` on another machine, `versions DIR --restore` brought back every
    file ever deleted under DIR (on purpose, weeks before) and none of its symlinks. The
    symlinks are kept now, and a directory's restore takes what its newest removal took."""
    a, b = make_replicas(tmp_path, "a", "b")
    docs = a.root / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "keep.txt").write_text("keep\n")
    (docs / "sub" / "deep.txt").write_text("deep\n")
    (docs / "old.txt").write_text("deleted on purpose\n")
    os.symlink("keep.txt", docs / "link")
    a.sync(b)
    (docs / "old.txt").unlink()
    a.sync(b)
    (kept,) = [Path(v["file"]) for v in versions(b, "docs/old.txt")]
    kept.rename(kept.parent / version_name("old.txt", time.time() - 3600))  # an hour before
    shutil.rmtree(docs)
    a.sync(b)
    assert not (b.root / "docs").exists()

    out = b("versions", "docs", "--restore").stdout
    assert "restored docs/keep.txt" in out and "restored docs/link" in out, out
    assert "left out: 1 older version(s)" in out and "--all" in out, out
    assert os.readlink(b.root / "docs" / "link") == "keep.txt"
    assert (b.root / "docs" / "sub" / "deep.txt").read_text() == "deep\n"
    assert not (b.root / "docs" / "old.txt").exists()
    proc = b("versions", "docs", "--restore", "--all", check=False)
    assert "restored docs/old.txt" in proc.stdout, proc.stdout
    assert proc.returncode == 0 and "already there: 3 file(s)" in proc.stdout, proc  # as kept
    assert (b.root / "docs" / "old.txt").read_text() == "deleted on purpose\n"
    b.sync(a)
    assert snapshot(a.root) == snapshot(b.root)


def test_an_edit_that_lost_on_another_replica_is_kept_where_it_was_made(tmp_path):
    """A trial: p settled a conflict against q's edit with no copy (`import --prefer local`,
    as with `sync PEER --prefer local` against a peer's daemon); when p's version reached q,
    q's edit was written over and kept nowhere, though the message said it was in its
    replica's versions. q keeps it now."""
    from test_sync import newer

    p, q = make_replicas(tmp_path, "p", "q")
    (p.root / "f.txt").write_text("base\n")
    p.sync(q)
    (q.root / "f.txt").write_text("q's edit, to lose\n")
    (p.root / "f.txt").write_text("p's edit\n")
    newer(q.root / "f.txt", than=p.root / "f.txt")  # (q's is the newer: only --prefer drops it)
    q("export", tmp_path / "q.bundle")
    p("import", tmp_path / "q.bundle", "--prefer", "local")  # decided on p, no copy
    assert (p.root / "f.txt").read_text() == "p's edit\n"
    p("export", tmp_path / "p.bundle", "--since", "q")
    q("import", tmp_path / "p.bundle")
    assert (q.root / "f.txt").read_text() == "p's edit\n"
    kept = versions(q, "f.txt")
    assert [Path(v["file"]).read_text() for v in kept] == ["q's edit, to lose\n"], kept
    # An edit made on top of q's, as any later edit is, is no loss: nothing more is kept.
    (q.root / "f.txt").write_text("q again\n")
    q.sync(p)
    (p.root / "f.txt").write_text("p again, having seen q's\n")
    p.sync(q)
    assert len(versions(q, "f.txt")) == 1


def test_a_deletion_on_a_full_disk_goes_through_without_its_version(small_ext4, caplog):
    """A trial's USB replica (tree and state on one disk) filled up, and its daemon then could
    not apply the deletions that would have freed it: not even a hard link to keep each file
    fitted, so each deletion waited, for good. It goes through now, unkept, saying so."""
    import logging

    from repld.daemon.versions import Keep, Keeper
    from test_sync import fill

    root, where = small_ext4 / "home", small_ext4 / "state" / "versions"
    (root / "docs").mkdir(parents=True)
    for i in range(30):
        (root / "docs" / f"f{i:02}").write_bytes(os.urandom(50_000))
    fill(small_ext4, 0)  # the disk fills up with something else
    keeper = Keeper(root, where, Keep.DELETED)
    with caplog.at_level(logging.WARNING):
        for i in range(30):  # (the first ones may still find room for a link)
            keeper.removing(f"docs/f{i:02}", os.lstat(root / "docs" / f"f{i:02}"))
    assert "deleted without a version kept" in caplog.text
