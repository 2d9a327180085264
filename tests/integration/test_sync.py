"""The one-shot sync between two or three replicas on this machine, through the real command."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    REPLD,
    Appender,
    Rep,
    conflict_copies,
    files_bytes,
    make_replicas,
    snapshot,
    sync_in_process,
    wait_for,
)
from repld.daemon import applier as applier_mod
from repld.daemon.errors import ChangedOnDisk

NAMES = ["with space.txt", "new\nline.txt", "ünïcødé €.md", "tab\there", "back\\slash"]


def newer(path: Path, *, than: Path) -> None:
    """Give ``path`` an mtime one second after ``than``'s, so "newest wins" has a clear answer."""
    t = than.stat().st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(t, t))


def populate(root: Path) -> None:
    (root / "docs" / "deep" / "er").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "docs" / "a.txt").write_text("alpha\n")
    (root / "docs" / "deep" / "er" / "b.bin").write_bytes(os.urandom(300_000))  # several blocks
    for n in NAMES:
        (root / "docs" / n).write_text(f"content of {n!r}\n")
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    (root / "link").symlink_to("docs/a.txt")
    (root / "dangling").symlink_to("/nowhere/at/all")


def test_initial_sync_copies_everything_both_ways(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    populate(a.root)
    (b.root / "from-b.txt").write_text("b was here\n")
    a.sync(b)
    assert snapshot(a.root) == snapshot(b.root)
    assert (b.root / "docs" / "new\nline.txt").read_text() == "content of 'new\\nline.txt'\n"
    assert os.readlink(b.root / "dangling") == "/nowhere/at/all"
    assert os.access(b.root / "run.sh", os.X_OK)
    # A second sync has nothing left to do.
    out = a.sync(b, "-n").stdout
    assert "0 actions planned" in out


def test_a_sync_of_many_files_copies_each_exactly(tmp_path):
    """Enough new files that a second process copies most of them (see copyproc): every name,
    mode, mtime and byte arrives, and the next scan and sync find nothing to do."""
    a, b = make_replicas(tmp_path, "a", "b")
    names = NAMES + ["empty", "big.bin"]
    for i in range(300):
        d = a.root / f"d{i % 7}" / f"sub{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        name = names[i % len(names)]
        data = b"" if name == "empty" else os.urandom(3_000_000 if i == 297 else i * 37)
        (d / f"{i:03}-{name}").write_bytes(data)
        os.chmod(d / f"{i:03}-{name}", (0o600, 0o755, 0o444, 0o640)[i % 4])
    a.sync(b)
    assert snapshot(a.root) == snapshot(b.root)
    assert len([p for p in b.root.rglob("*") if p.is_file()]) == 300
    assert "0 created, 0 updated, 0 deleted (0 B hashed)" in b("scan").stdout
    assert "0 actions planned" in a.sync(b, "-n").stdout


def test_a_fifo_where_a_recorded_file_was_is_its_deletion_and_nothing_hangs(tmp_path):
    """A FIFO put where a recorded file was (on the source, or where the target has the same
    content to copy from): opening it to read would wait for a writer forever. And the file is
    gone from the tree as repld sees it: its peers delete it (they waited for ever for a newer
    version that never came, and kept it; found by a trial)."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "same.txt").write_text("same\n")
    a.sync(b)
    (b.root / "same.txt").unlink()  # b's copy of the content becomes a FIFO, unscanned
    os.mkfifo(b.root / "same.txt")
    (a.root / "again.txt").write_text("same\n")  # b would copy it from its own same.txt
    (a.root / "f.txt").write_text("recorded\n")
    (a.root / "other.txt").write_text("other\n")
    a.sync(b)
    (a.root / "f.txt").unlink()
    os.mkfifo(a.root / "f.txt")
    proc = subprocess.run([*REPLD, "--config", str(a.config), "sync", str(b.config)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not replicated: f.txt: a FIFO" in proc.stderr, proc.stderr
    assert (b.root / "again.txt").read_text() == "same\n"  # from a, not from the FIFO
    assert (b.root / "other.txt").read_text() == "other\n"
    assert not (b.root / "f.txt").exists()  # deleted, as on a
    assert not (a.root / "same.txt").exists()  # deleted, as on b: kept in a's versions
    assert "same.txt" in a("versions").stdout
    for rep in (a, b):
        assert stat.S_ISFIFO(os.lstat(rep.root / ("f.txt" if rep is a else "same.txt")).st_mode)
    assert "0 actions planned" in a.sync(b, "-n").stdout


def test_a_directory_replaced_by_a_fifo_is_deleted_with_its_files_on_the_peer(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "pe").mkdir()
    (a.root / "pe" / "a").write_text("1\n")
    (a.root / "pe" / "b").write_text("2\n")
    a.sync(b)
    shutil.rmtree(a.root / "pe")
    os.mkfifo(a.root / "pe")
    out = a.sync(b).stdout
    assert "2 deleted" in out or "3 deleted" in out, out
    assert not (b.root / "pe").exists()
    assert "not replicated: pe: a FIFO" in a("scan").stderr
    assert "0 actions planned" in a.sync(b, "-n").stdout


def test_a_fifo_where_a_directory_of_the_path_goes_is_named_in_the_error(tmp_path):
    """It said "changed on disk since the last scan (d is not a directory); it will be synced
    next time", at every sync, for ever."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "d").mkdir()
    (a.root / "d" / "x").write_text("x\n")
    a.sync(b)
    shutil.rmtree(b.root / "d")
    os.mkfifo(b.root / "d")
    (a.root / "d" / "y").write_text("new on a\n")
    for _ in range(2):
        proc = subprocess.run([*REPLD, "--config", str(a.config), "sync", str(b.config)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert ("error: b: d/y: a FIFO is at d, where a directory of its path goes, "
                "which repld does not replicate (nor replace): move it away") in proc.stderr, \
            proc.stderr  # fmt: skip
        assert "next time" not in proc.stderr, proc.stderr
    assert (a.root / "d" / "y").read_text() == "new on a\n"  # a's new file stays
    assert not (a.root / "d" / "x").exists()  # deleted on b: kept in a's versions
    os.unlink(b.root / "d")
    a.sync(b)
    assert (b.root / "d" / "y").read_text() == "new on a\n"


def test_a_path_too_long_for_the_system_is_said_to_be_so(tmp_path):
    """A tree deeper than PATH_MAX (4096 bytes) under the root: what is below the limit syncs,
    and the rest is "not replicated" because of its length (it said "cannot stat: File name
    too long", which reads as a disk error)."""
    a, b = make_replicas(tmp_path, "a", "b")
    fd = os.open(a.root, os.O_RDONLY)
    try:
        for i in range(25):  # 25 x 201 bytes
            name = f"d{i:02}" + "x" * 197
            os.mkdir(name, dir_fd=fd)
            new = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = new
        with open(os.open("deep.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
            f.write("deep\n")
    finally:
        os.close(fd)
    proc = subprocess.run([*REPLD, "--config", str(a.config), "sync", str(b.config)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "its path is too long for this system" in proc.stderr, proc.stdout + proc.stderr
    assert "cannot stat" not in proc.stdout + proc.stderr
    assert (b.root / ("d00" + "x" * 197)).is_dir()


def test_a_fifo_or_socket_where_a_file_goes_is_reported_and_left_alone(tmp_path):
    """Where a new file or a new version goes, the target has something repld does not
    replicate: an error that says what and what to do (it looped until RecursionError: each
    try planned the file again and tried again), the rest synced, the thing left as it is."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "replaced.txt").write_text("v1\n")
    a.sync(b)
    (a.root / "incoming.txt").write_text("new here\n")
    (a.root / "replaced.txt").write_text("v2\n")
    (a.root / "stays.txt").write_text("stays\n")
    os.mkfifo(b.root / "incoming.txt")
    (b.root / "replaced.txt").unlink()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(b.root / "replaced.txt"))
        proc = subprocess.run([*REPLD, "--config", str(a.config), "sync", str(b.config)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: b: incoming.txt: a FIFO is there, which repld does not replicate" \
        in proc.stderr, proc.stderr  # fmt: skip
    assert "error: b: replaced.txt: a socket is there" in proc.stderr, proc.stderr
    assert "b: 1 files written" in proc.stdout and "2 failed (below)" in proc.stdout
    assert (b.root / "stays.txt").read_text() == "stays\n"
    assert stat.S_ISFIFO(os.lstat(b.root / "incoming.txt").st_mode)
    assert stat.S_ISSOCK(os.lstat(b.root / "replaced.txt").st_mode)
    # Moved away, they are written at the next sync.
    (b.root / "incoming.txt").unlink()
    (b.root / "replaced.txt").unlink()
    a.sync(b)
    assert snapshot(a.root) == snapshot(b.root)


def test_a_path_that_keeps_changing_under_the_apply_fails_instead_of_looping(tmp_path, monkeypatch):
    """Planned again once after a change under it, then an error until the next apply."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "busy.txt").write_text("busy\n")
    (a.root / "calm.txt").write_text("calm\n")

    def always_taken(self, fd, step):
        if step.path == "busy.txt":
            raise ChangedOnDisk(step.path, "something new is there")
        real(self, fd, step)

    real = applier_mod.Applier._link_unnamed
    monkeypatch.setattr(applier_mod.Applier, "_link_unnamed", always_taken)
    report = sync_in_process(a, b)
    assert [p for p, _ in report.errors] == ["busy.txt"], report.errors
    assert "it will be synced next time" in report.errors[0][1]
    assert (b.root / "calm.txt").read_text() == "calm\n"
    monkeypatch.undo()
    a.sync(b)
    assert snapshot(a.root) == snapshot(b.root)


def fill(where: Path, leave: int) -> Path:
    """Fill ``where``'s file system but for about ``leave`` bytes (as root sees it)."""
    filler = where / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def test_a_full_state_disk_is_said_and_is_no_bus_error(tmp_path, small_ext4):
    """SQLite maps its WAL index; on a disk with a few KiB left its pages are holes, and the
    first touch killed every command with SIGBUS ("Bus error"), until room was made."""
    (a,) = make_replicas(tmp_path, "a")
    b = Rep("b", tmp_path / "b", tmp_path / "b.toml")
    b.root.mkdir()
    b("init", b.root, "--name", "b", "--tree-id", a.tree_id(), "--state", small_ext4 / "b.state")
    (a.root / "f.txt").write_text("waits for room\n")
    filler = fill(small_ext4, 9 << 10)
    for proc in (a.sync(b, check=False), b("dump", check=False)):
        assert proc.returncode == 1, (proc.returncode, proc.stderr)
        assert "is full" in proc.stderr and "Make room there" in proc.stderr, proc.stderr
    filler.unlink()
    a.sync(b)
    assert (b.root / "f.txt").read_text() == "waits for room\n"


def test_every_kind_of_change_propagates(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    populate(a.root)
    a.sync(b)
    (a.root / "docs" / "a.txt").write_text("alpha, edited\n")
    (a.root / "run.sh").chmod(0o700)
    os.rename(a.root / "docs" / "deep", a.root / "moved-deep")
    (a.root / "docs" / "with space.txt").unlink()
    (a.root / "link").unlink()
    (a.root / "link").write_text("was a symlink, now a file\n")
    (a.root / "empty").rmdir()
    (a.root / "empty").symlink_to("docs")
    a.sync(b)
    assert snapshot(a.root) == snapshot(b.root)
    assert not (b.root / "docs" / "deep").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="a directory of mode 000 is scanned by root only")
def test_a_directory_of_mode_000_keeps_its_mode_everywhere(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "locked").mkdir()
    (a.root / "locked").chmod(0)
    (a.root / "sub").mkdir()
    (a.root / "sub" / "inner").mkdir()
    (a.root / "sub" / "inner" / "f").write_text("f")
    (a.root / "sub" / "inner").chmod(0)  # made as the parent of a file on the other side
    a.sync(b)
    a.sync(b)  # b would record a mode it made up as its own change, and send it back
    for r in (a, b):
        assert stat.S_IMODE((r.root / "locked").stat().st_mode) == 0
        assert stat.S_IMODE((r.root / "sub" / "inner").stat().st_mode) == 0
    assert "0 actions planned" in a.sync(b, "-n").stdout


def as_a_user(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """The CLI with a user's file permissions: as root, without the capabilities that let
    root write anywhere (a read-only directory of its own refuses it then, as it would any
    user); as anyone else, as it is."""
    from helpers import REPLD

    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is needed to drop root's overrides")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", "--bounding-set", caps, "--inh-caps", caps, "--"]
    return subprocess.run([*prefix, *REPLD, *map(str, args)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_read_only_directories_are_filled_and_emptied_and_stay_read_only(tmp_path):
    """Go's module cache, an archive unpacked read-only: directories without write permission
    that hold files. A user's sync must still write (and later delete) what is in them, and
    leave them read-only."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "mod" / "pkg@v1").mkdir(parents=True)
    (a.root / "mod" / "pkg@v1" / "go.mod").write_text("module pkg\n")
    (a.root / "mod" / "pkg@v1" / "go.mod").chmod(0o444)
    (a.root / "mod" / "pkg@v1").chmod(0o555)
    (a.root / "mod").chmod(0o555)
    proc = as_a_user("--config", a.config, "sync", b.config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (b.root / "mod" / "pkg@v1" / "go.mod").read_text() == "module pkg\n"
    for d in ("mod", "mod/pkg@v1"):
        assert stat.S_IMODE((b.root / d).stat().st_mode) == 0o555
    assert "0 actions planned" in as_a_user("--config", a.config, "sync", b.config, "-n").stdout
    # Edited and then removed on b (made writable first, as `go clean -modcache` does).
    for d in (b.root / "mod", b.root / "mod" / "pkg@v1"):
        d.chmod(0o755)
    shutil.rmtree(b.root / "mod")
    proc = as_a_user("--config", b.config, "sync", a.config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (a.root / "mod").exists()


def test_a_file_its_owner_made_unreadable_has_its_mode_replicated(tmp_path):
    """`chmod 000 f` by a user (no root overrides): the scan could not hash it, so the mode
    change never replicated and every sync failed with "cannot read" (a trial)."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "m0").write_text("secret\n")
    (a.root / "other").write_text("other\n")
    assert as_a_user("--config", a.config, "sync", b.config).returncode == 0
    (a.root / "m0").chmod(0)
    for _ in range(2):
        proc = as_a_user("--config", a.config, "sync", b.config)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "cannot read" not in proc.stdout + proc.stderr
        assert stat.S_IMODE((b.root / "m0").stat().st_mode) == 0
    assert (b.root / "m0").read_text() == "secret\n"  # (read as root: the content is kept)
    assert "0 actions planned" in as_a_user("--config", a.config, "sync", b.config,
                                            "-n").stdout  # fmt: skip


def test_setuid_and_setgid_bits_are_not_replicated(tmp_path):
    """A hostile-peer trial wrote a root-owned setuid file on a daemon run as root. Like
    Syncthing and Unison, repld replicates permissions and the sticky bit, not setuid or
    setgid: a peer's record that has them (an older repld's, a hostile one's) is taken
    without them."""
    import hashlib

    from repld.protocol.messages import record_from_wire, record_to_wire
    from repld.protocol.record import Kind, Record
    from repld.protocol.version import VersionVector

    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "tool").write_text("#!/bin/sh\necho hi\n")
    (a.root / "tool").chmod(0o6755)
    (a.root / "shared").mkdir()
    (a.root / "shared").chmod(0o2775)
    (a.root / "tmp").mkdir()
    (a.root / "tmp").chmod(0o1777)
    a.sync(b)
    assert stat.S_IMODE((b.root / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((b.root / "shared").stat().st_mode) == 0o775
    assert stat.S_IMODE((b.root / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((a.root / "tool").stat().st_mode) == 0o6755  # a's own: as it was
    assert "0 actions planned" in a.sync(b, "-n").stdout  # nothing to send back and forth
    data = b"x"
    rec = Record("evil", "g", Kind.FILE, VersionVector.of({"p": 1}), mode=0o4777, size=1,
                 sha256=hashlib.sha256(data).hexdigest(), blocks=hashlib.sha256(data).digest())
    assert record_from_wire(record_to_wire(rec)).mode == 0o777


def test_dry_run_changes_nothing_anywhere(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    populate(a.root)
    a.sync(b)
    (a.root / "docs" / "a.txt").write_text("A's edit\n")
    (b.root / "docs" / "a.txt").write_text("B's concurrent edit\n")
    (b.root / "docs" / "new.txt").write_text("new on b\n")
    (a.root / "run.sh").unlink()
    before = [files_bytes(tmp_path)]
    before_snap = (snapshot(a.root), snapshot(b.root))
    before_dirs = dir_mtimes(a.root) | dir_mtimes(b.root)
    out = a.sync(b, "--dry-run").stdout
    assert "conflict" in out and "new.txt" in out and "run.sh" in out
    assert files_bytes(tmp_path) == before[0]  # trees, databases, configs, keys: byte for byte
    assert (snapshot(a.root), snapshot(b.root)) == before_snap
    # Not even a file made and deleted again in a tree. (The databases' directories are
    # touched: SQLite makes and removes its -wal and -shm files when it opens and closes one.)
    assert dir_mtimes(a.root) | dir_mtimes(b.root) == before_dirs


def dir_mtimes(top: Path) -> dict[str, int]:
    return {d: os.stat(d).st_mtime_ns for d, _, _ in os.walk(top)}


def test_a_scan_with_nothing_changed_leaves_the_root_alone(tmp_path):
    """The file-system check (a probe file made and deleted in the root) runs at init and when
    the root is on another file system, not at every scan."""
    (a,) = make_replicas(tmp_path, "a")
    populate(a.root)
    a("scan")
    before = dir_mtimes(a.root)
    out = a("scan").stdout
    assert "0 created, 0 updated, 0 deleted" in out
    assert dir_mtimes(a.root) == before


@pytest.mark.parametrize("flag", ["--pull-only", "--push-only"])
def test_one_way_sync_leaves_other_side_untouched(tmp_path, flag):
    a, b = make_replicas(tmp_path, "a", "b")
    populate(a.root)
    (b.root / "only-b.txt").write_text("b\n")
    changed, untouched = (a, b) if flag == "--pull-only" else (b, a)
    before = files_bytes(untouched.root)
    a.sync(b, flag)
    assert files_bytes(untouched.root) == before
    # The untouched side's database records its own scan (the versions it handed over must be
    # committed, or it would reuse them), and nothing of the other side.
    dump = untouched("dump").stdout
    assert ("only-b.txt" in dump) == (flag == "--pull-only")
    assert ("docs/a.txt" in dump) == (flag == "--push-only")
    if flag == "--pull-only":
        assert (a.root / "only-b.txt").read_text() == "b\n"
    else:
        assert (b.root / "docs" / "a.txt").read_text() == "alpha\n"
    # A full sync afterwards converges.
    a.sync(b)
    assert snapshot(a.root) == snapshot(b.root)


def test_concurrent_edits_keep_both_one_copy_everywhere(tmp_path):
    a, b, c = make_replicas(tmp_path, "a", "b", "c")
    (a.root / "notes.txt").write_text("original\n")
    a.sync(b)
    a.sync(c)
    (a.root / "notes.txt").write_text("edited on a\n")
    (b.root / "notes.txt").write_text("edited on b\n")
    newer(b.root / "notes.txt", than=a.root / "notes.txt")
    a.sync(b)
    copies = conflict_copies(a.root)
    assert len(copies) == 1
    contents = {(a.root / "notes.txt").read_text(), (a.root / copies[0]).read_text()}
    assert contents == {"edited on a\n", "edited on b\n"}
    assert snapshot(a.root) == snapshot(b.root)
    # c resolves nothing again: it only receives the outcome.
    c.sync(b)
    c.sync(a)
    assert snapshot(c.root) == snapshot(a.root)
    assert conflict_copies(c.root) == copies
    conflicts = a("conflicts", "--json").stdout
    assert "notes.txt" in conflicts


def test_a_conflict_on_a_name_near_the_length_limit_keeps_both_edits(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    name = "N" * 240 + ".txt"  # NAME.conflict-... would be 270 bytes: more than a name may hold
    (a.root / name).write_text("base\n")
    a.sync(b)
    (a.root / name).write_text("edited on a, precious\n")
    (b.root / name).write_text("edited on b\n")
    newer(b.root / name, than=a.root / name)
    a.sync(b)
    for r in (a, b):
        copies = conflict_copies(r.root)
        assert len(copies) == 1 and len(copies[0].encode()) <= 255
        assert (r.root / copies[0]).read_text() == "edited on a, precious\n"
        assert (r.root / name).read_text() == "edited on b\n"
    assert snapshot(a.root) == snapshot(b.root)
    # The shortened copy still names its original for `conflicts` and `resolve`.
    listed = json.loads(a("conflicts", "--json").stdout)
    assert [(c["path"], c["path_exists"]) for c in listed] == [(name, True)]
    (copy,) = conflict_copies(a.root)
    proc = a("resolve", copy, "--keep", "remote", check=False)  # the copy is a's own: refused...
    assert proc.returncode == 2
    hint = f"To keep the other replica's version instead, name the file: `resolve {name} --keep"
    assert f"{hint} remote`" in proc.stderr, proc.stderr
    a("resolve", copy, "--keep", "local")  # the copy holds a's own edit
    assert (a.root / name).read_text() == "edited on a, precious\n"
    assert conflict_copies(a.root) == [] and sorted(p.name for p in a.root.iterdir()) == [name]


def test_a_conflict_whose_copy_cannot_be_written_is_left_for_the_next_sync(tmp_path, monkeypatch):
    """Settling a conflict records the losing version as seen: never before its copy is safe."""
    from repld.daemon import localsync
    from repld.daemon.replica import open_replica

    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "notes.txt").write_text("original\n")
    a.sync(b)
    (a.root / "notes.txt").write_text("edited on a, newer\n")
    (b.root / "notes.txt").write_text("edited on b\n")
    newer(a.root / "notes.txt", than=b.root / "notes.txt")
    opener = localsync._opener

    def failing(rep):
        fetch = opener(rep)

        def open_or_fail(rec):
            if rec.path == "notes.txt":  # the loser's content, read for its copy
                raise OSError(5, "Input/output error")
            return fetch(rec)

        return open_or_fail

    monkeypatch.setattr(localsync, "_opener", failing)
    with open_replica(a.config) as left, open_replica(b.config) as right:
        report = localsync.sync(left, right, direction=localsync.Direction.PULL)
    failed = dict(report.errors)
    assert "could not be written" in failed["notes.txt"], report.errors
    assert conflict_copies(a.root) == []
    monkeypatch.undo()
    a.sync(b)  # b's edit was not recorded as seen and lost: this time it is kept
    for r in (a, b):
        (copy,) = conflict_copies(r.root)
        assert (r.root / copy).read_text() == "edited on b\n"
        assert (r.root / "notes.txt").read_text() == "edited on a, newer\n"


def test_what_a_replica_ignores_is_not_written_there(tmp_path):
    """A replica's own ignore rules hold for what comes from others too: a file written where
    it ignores would never be scanned again, and its later edits would block every sync."""
    a, b = make_replicas(tmp_path, "a", "b")
    text = b.config.read_text()
    assert "ignore = []" in text
    b.config.write_text(text.replace("ignore = []", 'ignore = ["*.tmp", "cache/"]'))
    (a.root / "cache" / "deep").mkdir(parents=True)
    (a.root / "cache" / "deep" / "blob").write_text("a's cache\n")
    (a.root / "notes.tmp").write_text("a's scratch\n")
    (a.root / "kept.txt").write_text("replicated\n")
    (b.root / "notes.tmp").write_text("b's own scratch\n")
    a.sync(b)
    assert (b.root / "kept.txt").read_text() == "replicated\n"
    assert not (b.root / "cache").exists()
    assert (b.root / "notes.tmp").read_text() == "b's own scratch\n"
    (a.root / "notes.tmp").write_text("a's scratch, edited\n")
    (b.root / "notes.tmp").write_text("b's scratch, edited\n")
    out = a.sync(b).stdout  # no error, no conflict, and again nothing lands on b
    assert "0 conflicts" in out
    assert (b.root / "notes.tmp").read_text() == "b's scratch, edited\n"
    assert (a.root / "notes.tmp").read_text() == "a's scratch, edited\n"
    assert not (b.root / "cache").exists()


def test_an_edit_that_kept_size_and_mtime_is_seen_by_the_next_scan(tmp_path):
    """Size and mtime as recorded (a tool that restores the mtime, `cp -p` over the file): the
    file's ctime says it was touched since it was read, so the scan reads it again. Before,
    the sync found out only by failing that file (the source side), and a peer's edit wrote
    over it with nothing kept (the target side: a trial)."""
    a, b = make_replicas(tmp_path, "a", "b")
    f = a.root / "same-size.txt"
    f.write_text("original\n")
    (a.root / "other.txt").write_text("other\n")
    a.sync(b)
    st = f.stat()
    f.write_text("EDITED!!\n")  # same size...
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # ...same mtime
    assert "update  same-size.txt" in a("scan", "-v").stdout
    a.sync(b)
    assert (b.root / "same-size.txt").read_text() == "EDITED!!\n"
    # On the side a peer's edit goes to: b edits its copy that way, a edits too.
    g = b.root / "same-size.txt"
    st = g.stat()
    g.write_text("B EDIT!!\n")
    os.utime(g, ns=(st.st_atime_ns, st.st_mtime_ns))
    f.write_text("a's newer edit\n")
    a.sync(b)
    texts = sorted(p.read_text() for p in b.root.iterdir() if p.name.startswith("same-size"))
    assert texts == ["B EDIT!!\n", "a's newer edit\n"], texts  # a conflict: both kept
    assert snapshot(a.root) == snapshot(b.root)
    # A file only chmod'ed back and forth, or linked elsewhere, is read again, once.
    f2 = a.root / "other.txt"
    f2.chmod(0o600)
    f2.chmod(0o644)
    assert "other.txt" not in a("scan", "-v").stdout
    assert a.sync(b).returncode == 0


def test_what_cannot_be_replicated_is_said_once_and_fails_nothing(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "fine.txt").write_text("fine\n")
    os.mkfifo(a.root / "a-fifo")
    bad = os.fsencode(a.root) + b"/caf\xe9.txt"  # a Latin-1 name: not UTF-8
    with open(bad, "wb") as f:
        f.write(b"latin-1 name\n")
    # An mtime past 2262 (ext4 takes them up to 2446) is more nanoseconds than SQLite's 64
    # bits: the scan died on it with a traceback, and the daemon at every start (a trial).
    (a.root / "far-future").write_text("from 2300\n")
    year_2300 = 10_413_792_000 * 10**9
    os.utime(a.root / "far-future", ns=(year_2300, year_2300))
    (a.root / "dir-2300").mkdir()
    os.utime(a.root / "dir-2300", ns=(year_2300, year_2300))  # a directory's is clamped
    for proc in (a("scan"), a.sync(b)):  # exit 0 (run() checks it)
        notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("not replicated:")]
        assert sorted(notes) == [
            "not replicated: a-fifo: a FIFO (named pipe), not a regular file, directory or "
            "symlink (a line `/a-fifo` in .repldignore silences this)",
            "not replicated: caf\\xe9.txt: its name is not valid UTF-8; rename it to replicate it",
            "not replicated: far-future: its modification time (the year 2300) is outside what "
            "repld records (1678 to 2261): `touch` it to replicate it",
        ], proc.stderr
        assert ".repldignore" in proc.stderr and "WARNING" not in proc.stderr
    assert (b.root / "fine.txt").exists() and not (b.root / "a-fifo").exists()
    assert (b.root / "dir-2300").is_dir() and not (b.root / "far-future").exists()
    (a.root / ".repldignore").write_text("/a-fifo\n")  # as it says
    assert "a-fifo" not in a("scan").stderr
    (a.root / ".repldignore").unlink()
    (a.root / "a-fifo").unlink()
    os.unlink(bad)
    (a.root / "far-future").touch()
    assert "not replicated" not in a.sync(b).stderr
    assert (b.root / "far-future").read_text() == "from 2300\n"


def test_independent_resolutions_agree(tmp_path):
    """a and b conflict; c meets a, d meets b: both resolve alone, then meet without a new copy."""
    a, b, c, d = make_replicas(tmp_path, "a", "b", "c", "d")
    (a.root / "f.txt").write_text("v0\n")
    for r in (b, c, d):
        a.sync(r)
    (a.root / "f.txt").write_text("a's\n")
    (b.root / "f.txt").write_text("b's\n")
    newer(b.root / "f.txt", than=a.root / "f.txt")
    c.sync(a, "--pull-only")
    d.sync(b, "--pull-only")
    c.sync(b)  # c holds a's version, b holds b's: conflict resolved here
    d.sync(a)  # and independently here
    c.sync(d)
    assert snapshot(c.root) == snapshot(d.root)
    assert len(conflict_copies(c.root)) == 1


def test_prefer_local_settles_without_copy_and_third_replica_follows(tmp_path):
    a, b, c = make_replicas(tmp_path, "a", "b", "c")
    (a.root / "f.txt").write_text("v0\n")
    a.sync(b)
    a.sync(c)
    (a.root / "f.txt").write_text("a wins\n")
    (b.root / "f.txt").write_text("b loses\n")
    b.sync(c, "--pull-only")  # c will learn b's version through b
    out = a.sync(b, "--prefer", "local", "-v").stdout
    # Said with the names: "local" on a line about b would read as b.
    assert "a <- record  f.txt  [conflict: a's version wins (prefer a)" in out, out
    assert (b.root / "f.txt").read_text() == "a wins\n"
    assert conflict_copies(a.root) == conflict_copies(b.root) == []
    c.sync(b)
    assert (c.root / "f.txt").read_text() == "a wins\n"
    assert conflict_copies(c.root) == []


def set_policy(rep, policy: str) -> None:
    text, n = re.subn(r"(?m)^conflict_policy = .*$", f'conflict_policy = "{policy}"',
                      rep.config.read_text())  # fmt: skip
    assert n == 1
    rep.config.write_text(text)


def test_the_changing_sides_conflict_policy_applies_without_prefer(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "f.txt").write_text("v0\n")
    (a.root / "g.txt").write_text("v0\n")
    a.sync(b)
    (a.root / "f.txt").write_text("older edit on a\n")
    (b.root / "f.txt").write_text("newer edit on b\n")
    newer(b.root / "f.txt", than=a.root / "f.txt")
    set_policy(a, "newest")  # the pass into a settles it: b's newer edit, no copy
    a.sync(b)
    assert (a.root / "f.txt").read_text() == (b.root / "f.txt").read_text() == "newer edit on b\n"
    assert conflict_copies(a.root) == conflict_copies(b.root) == []

    (a.root / "g.txt").write_text("a's edit\n")
    (b.root / "g.txt").write_text("b's newer edit\n")
    newer(b.root / "g.txt", than=a.root / "g.txt")
    set_policy(a, "keep-both")
    set_policy(b, "prefer-local")  # b's own edit wins when b is the side that changes
    b.sync(a)  # b's config runs it: the pass into b comes first
    assert (a.root / "g.txt").read_text() == (b.root / "g.txt").read_text() == "b's newer edit\n"
    assert conflict_copies(a.root) == conflict_copies(b.root) == []
    # --prefer still overrides the config.
    (a.root / "g.txt").write_text("a again\n")
    (b.root / "g.txt").write_text("b again\n")
    b.sync(a, "--prefer", "remote")
    assert (a.root / "g.txt").read_text() == (b.root / "g.txt").read_text() == "a again\n"
    assert conflict_copies(a.root) == conflict_copies(b.root) == []


def test_an_edit_that_wins_on_one_replica_and_loses_on_another_gets_one_copy(tmp_path):
    """A trial (four writers at once): a's edit won against b's on x, its version merged with
    b's, and lost to d's on a and on x: two copies of a's edit under two names, one per version
    it travelled under. A copy is named by the losing edit: one copy mesh-wide."""
    a, b, d, x = make_replicas(tmp_path, "a", "b", "d", "x")
    (a.root / "f.txt").write_text("v0\n")
    for r in (b, d, x):
        a.sync(r)
    (b.root / "f.txt").write_text("b's edit, the oldest\n")
    (a.root / "f.txt").write_text("a's edit\n")
    (d.root / "f.txt").write_text("d's edit, the newest\n")
    newer(a.root / "f.txt", than=b.root / "f.txt")
    newer(d.root / "f.txt", than=a.root / "f.txt")
    a.sync(x)  # x holds a's edit
    x.sync(b)  # a's edit wins against b's there: merged with b's version
    a.sync(d)  # a's edit loses to d's on a and d
    x.sync(d)  # ...and, under its merged version, on x
    for one, other in ((a, b), (a, x), (d, x), (b, d)):
        one.sync(other)
    for r in (a, b, d, x):
        assert snapshot(r.root) == snapshot(a.root)
    texts = sorted((a.root / c).read_text() for c in conflict_copies(a.root))
    assert texts == ["a's edit\n", "b's edit, the oldest\n"], texts
    assert (a.root / "f.txt").read_text() == "d's edit, the newest\n"


def test_prefer_local_speaks_for_this_replicas_edits_not_for_those_it_relays(tmp_path):
    """A trial: d, set to prefer-local, held c's edit (relayed) when a's concurrent edit came,
    and c's older edit won with no copy on every replica. Neither edit was d's: both are kept."""
    a, c, d = make_replicas(tmp_path, "a", "c", "d")
    (a.root / "f.txt").write_text("v0\n")
    a.sync(c)
    a.sync(d)
    (c.root / "f.txt").write_text("c's older edit\n")
    (a.root / "f.txt").write_text("a's newer edit\n")
    newer(a.root / "f.txt", than=c.root / "f.txt")
    c.sync(d)  # d holds c's edit now
    set_policy(d, "prefer-local")
    d.sync(a)
    texts = sorted(p.read_text() for p in d.root.glob("f*.txt"))
    assert texts == ["a's newer edit\n", "c's older edit\n"], texts
    assert (d.root / "f.txt").read_text() == "a's newer edit\n"  # the newer keeps the name
    assert snapshot(a.root) == snapshot(d.root)
    # d's own edit is still d's to prefer.
    (d.root / "f.txt").write_text("d's own edit\n")
    (a.root / "f.txt").write_text("a's newer edit again\n")
    newer(a.root / "f.txt", than=d.root / "f.txt")
    d.sync(a)
    assert (a.root / "f.txt").read_text() == "d's own edit\n"
    assert len(conflict_copies(a.root)) == 1  # the one from before, no new one


def test_newest_never_drops_a_newer_edit_for_an_older_directory(tmp_path):
    h, u = make_replicas(tmp_path, "h", "u")
    (h.root / "t3").write_text("orig\n")
    set_policy(h, "newest")
    h.sync(u)
    (h.root / "t3").unlink()
    (h.root / "t3").mkdir()
    (u.root / "t3").write_text("newer precious edit\n")
    newer(u.root / "t3", than=h.root / "t3")
    h.sync(u)
    assert snapshot(h.root) == snapshot(u.root)
    assert (h.root / "t3").is_dir()
    (copy,) = conflict_copies(h.root)
    assert (h.root / copy).read_text() == "newer precious edit\n"


def test_a_directory_taken_off_the_ignore_rules_comes_over_at_the_next_sync(tmp_path):
    h, u = make_replicas(tmp_path, "h", "u")
    (h.root / ".repldignore").write_text("cache/\n")
    (h.root / "cache").mkdir()
    (h.root / "cache" / "a").write_text("important\n")
    h.sync(u)
    assert not (u.root / "cache").exists()
    (h.root / ".repldignore").write_text("")
    h.sync(u)  # one sync: the rules that arrive in it apply to what arrives with them
    assert (u.root / "cache" / "a").read_text() == "important\n"
    assert snapshot(h.root) == snapshot(u.root)


def test_edits_made_under_a_rule_come_over_in_the_sync_that_lifts_it(tmp_path):
    """u edits and deletes files its rules ignore; h lifts the rules: the one sync that takes
    the new rules to u also brings u's edits and deletion back, and says it did."""
    h, u = make_replicas(tmp_path, "h", "u")
    (h.root / "notes").mkdir()
    (h.root / "notes" / "b.log").write_text("b v1\n")
    (h.root / "build" / "sub").mkdir(parents=True)
    (h.root / "build" / "x.o").write_text("x v1\n")
    (h.root / "build" / "sub" / "y.o").write_text("y v1\n")
    h.sync(u)
    (h.root / ".repldignore").write_text("*.log\nbuild/\n")
    h.sync(u)
    (u.root / "notes" / "b.log").write_text("b edited on u\n")
    (u.root / "build" / "sub" / "y.o").write_text("y edited on u\n")
    (u.root / "build" / "x.o").unlink()
    (h.root / ".repldignore").write_text("")
    h.sync(u)
    assert snapshot(h.root) == snapshot(u.root)
    assert (h.root / "notes" / "b.log").read_text() == "b edited on u\n"
    assert (h.root / "build" / "sub" / "y.o").read_text() == "y edited on u\n"
    assert not (h.root / "build" / "x.o").exists()
    assert not conflict_copies(h.root)
    assert "0 files written" in h.sync(u).stdout  # settled in that one sync


def test_an_ignored_directory_on_both_sides_merges_once_the_rule_goes(tmp_path):
    h, u = make_replicas(tmp_path, "h", "u")
    (u.root / "cache").mkdir()
    (u.root / "cache" / "x").write_text("x on u\n")
    (u.root / "cache" / "y").write_text("y on u\n")
    u("scan")  # recorded on u before the rule reaches it
    (h.root / ".repldignore").write_text("cache/\n")
    (h.root / "cache").mkdir()
    (h.root / "cache" / "x").write_text("x on h\n")
    (h.root / "cache" / "z").write_text("z on h\n")
    h.sync(u)
    assert not (h.root / "cache" / "y").exists() and not (u.root / "cache" / "z").exists()
    (h.root / ".repldignore").write_text("")
    h.sync(u)
    assert snapshot(h.root) == snapshot(u.root)
    assert (u.root / "cache" / "z").read_text() == "z on h\n"
    assert (h.root / "cache" / "y").read_text() == "y on u\n"
    (copy,) = conflict_copies(h.root / "cache")
    assert sorted([(h.root / "cache" / "x").read_text(), (h.root / "cache" / copy).read_text()]) == [
        "x on h\n", "x on u\n"]
    assert "0 files written" in h.sync(u).stdout  # settled


def test_a_newer_symlink_beats_an_older_file_edit_and_keeps_its_time(tmp_path):
    h, u = make_replicas(tmp_path, "h", "u")
    (h.root / "s1").write_text("v0\n")
    h.sync(u)
    (h.root / "s1").write_text("older edit of the file\n")
    old = (h.root / "s1").stat().st_mtime_ns
    (u.root / "s1").unlink()
    (u.root / "s1").symlink_to("elsewhere")
    t = old + 5_000_000_000  # the symlink came five seconds later
    os.utime(u.root / "s1", ns=(t, t), follow_symlinks=False)
    h.sync(u)
    for r in (h, u):
        assert os.readlink(r.root / "s1") == "elsewhere", r.name
        assert os.lstat(r.root / "s1").st_mtime_ns == t, r.name
        (copy,) = conflict_copies(r.root)
        assert (r.root / copy).read_text() == "older edit of the file\n"


def test_a_replica_joined_again_over_its_old_files_brings_no_deleted_file_back(tmp_path):
    """A state directory lost, or a machine reinstalled with its home kept: `init --tree-id`
    over the old files. Those that were deleted elsewhere since stay deleted; the same content
    merges quietly; what differs is kept beside the tree's version; what is new comes over."""
    import shutil

    a, b = make_replicas(tmp_path, "a", "b")
    for name in ("d13.txt", "d14.txt", "same.txt", "restored.txt"):
        (a.root / name).write_text(f"{name} as it was\n")
    a.sync(b)
    old = tmp_path / "c"
    shutil.copytree(b.root, old, symlinks=True)  # what the old machine's disk still holds
    (a.root / "d13.txt").unlink()
    (a.root / "d14.txt").write_text("d14 edited on a\n")
    newer(a.root / "d14.txt", than=old / "d14.txt")
    (a.root / "restored.txt").write_text("restored.txt edited on a\n")
    newer(old / "restored.txt", than=a.root / "restored.txt")  # as a `cp -r` restore leaves it
    a.sync(b)
    (old / "only-on-c.txt").write_text("written there meanwhile\n")
    c = Rep("c", old, tmp_path / "c.toml")
    out = c("init", old, "--name", "c", "--tree-id", a.tree_id()).stdout
    assert "adopted" in out, out
    c.sync(a)
    a.sync(b)
    for r in (a, b, c):
        assert not (r.root / "d13.txt").exists(), r.name
        assert (r.root / "d14.txt").read_text() == "d14 edited on a\n", r.name
        assert (r.root / "only-on-c.txt").read_text() == "written there meanwhile\n", r.name
        # The tree's version keeps the name even against a newer mtime; the old one is kept.
        assert (r.root / "restored.txt").read_text() == "restored.txt edited on a\n", r.name
        copies = sorted((r.root / c).read_text() for c in conflict_copies(r.root))
        assert copies == ["d14.txt as it was\n", "restored.txt as it was\n"], r.name
    assert snapshot(a.root) == snapshot(b.root) == snapshot(c.root)
    assert "0 actions planned" in c.sync(a, "-n").stdout


def test_a_file_made_private_on_a_joining_machine_stays_private(tmp_path):
    """Two homes already alike: the joining one had made its key private (0600), the tree's
    copy was 0644, and the join made it 0644 on both, saying only "same content" (a trial)."""
    import shutil

    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "key").write_text("secret\n")
    (a.root / "key").chmod(0o644)
    (a.root / "dir").mkdir(mode=0o755)
    a("scan")
    old = tmp_path / "c"
    shutil.copytree(a.root, old, symlinks=True)
    (old / "key").chmod(0o600)
    (old / "dir").chmod(0o700)
    c = Rep("c", old, tmp_path / "c.toml")
    c("init", old, "--name", "c", "--tree-id", a.tree_id())
    out = c.sync(a, "-v").stdout
    assert "group and others get only what both allowed, 0600" in out, out
    c.sync(a)  # (the two merges meet: nothing more)
    for r in (a, c):
        assert stat.S_IMODE((r.root / "key").stat().st_mode) == 0o600, r.name
        assert stat.S_IMODE((r.root / "dir").stat().st_mode) == 0o700, r.name
    assert not conflict_copies(a.root) and snapshot(a.root) == snapshot(c.root)
    assert "0 actions planned" in c.sync(a, "-n").stdout


def test_a_file_made_a_directory_against_an_edit_settles_in_one_sync(tmp_path):
    h, u = make_replicas(tmp_path, "h", "u")
    (h.root / "t2").write_text("orig\n")
    (h.root / "f").write_text("orig\n")
    h.sync(u)
    (h.root / "t2").unlink()
    (h.root / "t2").mkdir()
    (h.root / "t2" / "x").write_text("inside\n")  # recorded before t2 is recorded again
    (u.root / "t2").write_text("edited on u\n")
    (u.root / "f").unlink()  # on u, f becomes a directory with a file in it...
    (u.root / "f").mkdir()
    (u.root / "f" / "y").write_text("in f on u\n")
    (h.root / "f").write_text("edited on h\n")  # ...while h edits it
    proc = h.sync(u)  # one sync, no error
    assert proc.returncode == 0 and "error" not in proc.stderr, proc.stderr
    assert snapshot(h.root) == snapshot(u.root)
    assert (u.root / "t2" / "x").read_text() == "inside\n"
    assert (h.root / "f" / "y").read_text() == "in f on u\n"
    assert len(conflict_copies(h.root)) == 2
    assert "0 actions planned" in h.sync(u, "-n").stdout


def test_git_gc_deleting_its_loose_objects_is_no_mass_deletion(tmp_path):
    """A trial: in a tree that was mostly a git repository, `git gc` (its loose objects packed,
    then deleted) tripped the circuit breaker, and nothing of it replicated until `repld scan
    --accept-deletes`. git's object store is git's to churn: it does not count. An `rm -rf` of
    the repository still does (its other files count)."""
    import shutil

    a, b = make_replicas(tmp_path, "a", "b")
    objects = a.root / "proj" / ".git" / "objects"
    for i in range(300):
        d = objects / f"{i % 256:02x}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:038x}").write_bytes(os.urandom(40))
    for i in range(150):
        (a.root / "proj" / f"src{i}.c").write_text(f"{i}\n")
    a.sync(b)
    loose = [p for p in objects.iterdir() if p.name != "pack"]
    for d in loose:
        shutil.rmtree(d)
    (objects / "pack").mkdir()
    (objects / "pack" / "pack-1.pack").write_bytes(os.urandom(12_000))
    proc = a.sync(b, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not any(p.name != "pack" for p in (b.root / "proj" / ".git" / "objects").iterdir())
    assert (b.root / "proj" / ".git" / "objects" / "pack" / "pack-1.pack").exists()
    shutil.rmtree(a.root / "proj")  # the whole repository: the breaker holds it
    proc = a.sync(b, check=False)
    assert proc.returncode == 1 and "more than half of the tree" in proc.stderr, proc.stderr
    assert len(list((b.root / "proj").glob("*.c"))) == 150


def test_most_of_the_tree_deleted_at_once_is_held_back_until_accepted(tmp_path):
    import shutil

    a, b = make_replicas(tmp_path, "a", "b")
    for d in range(3):
        (a.root / f"d{d}").mkdir()
        for i in range(50):
            (a.root / f"d{d}" / f"f{i}").write_text(f"{d} {i}\n")
    (a.root / "keep.txt").write_text("kept\n")
    a.sync(b)
    for d in range(3):
        shutil.rmtree(a.root / f"d{d}")  # an rm -rf in the wrong place
    proc = a.sync(b, check=False)
    assert proc.returncode == 1, proc.stderr
    # The command to run names this replica's config (copied as it is, it must not act on
    # the default replica: a trial).
    assert f"`repld --config {a.config} scan --accept-deletes`" in proc.stderr, proc.stderr
    assert len(list((b.root / "d1").iterdir())) == 50  # nothing deleted there
    proc = a("scan", check=False)
    assert proc.returncode == 1 and "more than half of the tree" in proc.stderr
    a("scan", "--accept-deletes")
    a.sync(b)
    assert sorted(p.name for p in b.root.iterdir()) == ["keep.txt"]
    # Fewer deletions, or less than half of the tree, go through as usual.
    for i in range(10):
        (a.root / f"g{i}").write_text("g\n")
    a.sync(b)
    for i in range(10):
        (a.root / f"g{i}").unlink()
    a.sync(b)
    assert sorted(p.name for p in b.root.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("verbose", [False, True])
def test_a_directory_made_a_file_against_edits_inside_it_settles_without_an_error(
    tmp_path, verbose
):
    import shutil

    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "d").mkdir()
    (a.root / "d" / "x").write_text("x\n")
    a.sync(b)
    shutil.rmtree(a.root / "d")
    (a.root / "d").write_text("file now\n")
    (b.root / "d" / "new").write_text("new\n")
    (b.root / "d" / "x").write_text("x edited\n")
    proc = a.sync(b, *(["-v"] if verbose else []))
    assert proc.returncode == 0 and "error" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if " <- " in ln]
    assert len(lines) == len(set(lines)), proc.stdout  # each step listed once
    assert snapshot(a.root) == snapshot(b.root)
    assert (a.root / "d" / "new").read_text() == "new\n"
    (copy,) = conflict_copies(a.root)
    assert (a.root / copy).read_text() == "file now\n"


def test_an_old_copy_of_a_file_edited_then_deleted_does_not_come_back_at_its_name(tmp_path):
    import shutil

    (a,) = make_replicas(tmp_path, "a")
    (a.root / "e.txt").write_text("v1\n")
    a("scan")
    old = tmp_path / "b"
    shutil.copytree(a.root, old, symlinks=True)  # a backup, restored later on a new machine
    (a.root / "e.txt").write_text("v2\n")
    a("scan")
    (a.root / "e.txt").unlink()
    a("scan")
    b = Rep("b", old, tmp_path / "b.toml")
    b("init", old, "--name", "b", "--tree-id", a.tree_id())
    b.sync(a)
    for r in (a, b):
        assert not (r.root / "e.txt").exists(), r.name
        (copy,) = conflict_copies(r.root)
        assert (r.root / copy).read_text() == "v1\n", r.name
    assert "0 actions planned" in b.sync(a, "-n").stdout


def test_delete_against_modify_keeps_modification(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "keep.txt").write_text("v1\n")
    a.sync(b)
    (a.root / "keep.txt").unlink()
    (b.root / "keep.txt").write_text("v2 matters\n")
    a.sync(b)
    assert (a.root / "keep.txt").read_text() == (b.root / "keep.txt").read_text() == "v2 matters\n"


def test_deleted_directory_with_unknown_file_is_kept(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "proj" / "src").mkdir(parents=True)
    (a.root / "proj" / "src" / "old.c").write_text("old\n")
    a.sync(b)
    import shutil

    shutil.rmtree(a.root / "proj")
    (b.root / "proj" / "src" / "new.c").write_text("written on b meanwhile\n")
    a.sync(b)
    a.sync(b)
    assert (b.root / "proj" / "src" / "new.c").read_text() == "written on b meanwhile\n"
    assert not (b.root / "proj" / "src" / "old.c").exists()
    assert snapshot(a.root) == snapshot(b.root)


def test_deleted_files_never_come_back_through_a_chain(tmp_path):
    a, b, c = make_replicas(tmp_path, "a", "b", "c")
    (a.root / "secret.txt").write_text("delete me\n")
    a.sync(b)
    b.sync(c)
    (a.root / "secret.txt").unlink()
    a.sync(b)
    c.sync(b)  # c still had it; b's tombstone wins
    assert not (c.root / "secret.txt").exists()
    c.sync(a)
    b.sync(a)
    for r in (a, b, c):
        assert not (r.root / "secret.txt").exists()


def test_subtree_sync_touches_only_that_subtree(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "music").mkdir()
    (a.root / "music" / "song.ogg").write_text("la la\n")
    (a.root / "work").mkdir()
    (a.root / "work" / "plan.txt").write_text("plan\n")
    a.sync(b, "music")
    assert (b.root / "music" / "song.ogg").exists()
    assert not (b.root / "work").exists()
    a.sync(b)  # the rest comes with a full sync: nothing was skipped for good
    assert snapshot(a.root) == snapshot(b.root)


def test_a_copied_file_is_copied_from_the_local_one(tmp_path):
    """(A moved one is renamed: see test_moves.)"""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "big.bin").write_bytes(os.urandom(1 << 20))
    a.sync(b)
    shutil.copy2(a.root / "big.bin", a.root / "copy.bin")
    out = a.sync(b).stdout
    assert "1 from local copies" in out
    assert snapshot(a.root) == snapshot(b.root)


def test_different_trees_refuse(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    (a,) = make_replicas(tmp_path / "x", "a")  # two separate trees
    (b,) = make_replicas(tmp_path / "y", "b")
    (a.root / "f").write_text("f")
    proc = a.sync(b, check=False)
    assert proc.returncode == 2  # what was given is the mistake
    assert "different trees" in proc.stderr
    assert not (b.root / "f").exists()


def test_log_shows_origin_and_relay(tmp_path):
    a, b, c = make_replicas(tmp_path, "a", "b", "c")
    (a.root / "f.txt").write_text("1\n")
    a.sync(b)
    b.sync(c)
    import json

    events = json.loads(c("log", "f.txt", "--json").stdout)["events"]
    assert events[-1]["origin"] == json.loads(a("id", "--json").stdout)["replica_id"]
    assert events[-1]["via"] == "b"
    assert events[-1]["action"] == "create"


def test_resolve_keeps_this_replicas_version_or_the_others_or_both(tmp_path):
    """--keep local is this replica's version, whether it won (the file at the name) or lost
    (the conflict copy, marked "(this replica)" by `repld conflicts`)."""
    a, b = make_replicas(tmp_path, "a", "b")
    names = ("x.txt", "y.txt", "z.txt", "w.txt")
    for name in names:
        (a.root / name).write_text("base\n")
    a.sync(b)
    for name in names:
        (a.root / name).write_text(f"a {name}\n")
        (b.root / name).write_text(f"b {name}\n")
        newer(b.root / name, than=a.root / name)  # b's edits win: a's are the copies
    a.sync(b)
    assert len(conflict_copies(a.root)) == 4
    assert "(this replica)" in a("conflicts").stdout
    a("resolve", "x.txt", "--keep", "local")  # a's own edit, from its copy
    a("resolve", "y.txt", "--keep", "remote")  # b's, at the name already
    b("resolve", "z.txt", "--keep", "local")  # b's own, at the name
    a("resolve", "w.txt", "--keep", "both")
    assert (a.root / "x.txt").read_text() == "a x.txt\n"
    assert (a.root / "y.txt").read_text() == "b y.txt\n"
    assert (b.root / "z.txt").read_text() == "b z.txt\n"
    a.sync(b)
    assert conflict_copies(a.root) == conflict_copies(b.root) == []
    assert "no conflicts" in a("conflicts").stdout
    assert snapshot(a.root) == snapshot(b.root)
    assert (b.root / "x.txt").read_text() == "a x.txt\n"
    kept = {p.name: p.read_text() for p in b.root.iterdir() if p.name.startswith("w.")}
    assert len(kept) == 2 and kept.pop("w.txt") == "b w.txt\n"
    assert kept == {"w.a.txt": "a w.txt\n"}  # under w.<replica's name>.txt, an ordinary file
    # A PATH in neither replica is a mistake on the command line.
    assert a("resolve", "nothing-here.txt", "--keep", "local", check=False).returncode == 2


def test_resolve_keep_both_with_two_copies_of_one_replicas_edits(tmp_path):
    """A trial: a file that lost twice to the same replica's edits has two copies of that
    replica's; `--keep both` renamed the first to NAME.<replica>.EXT, then stopped on the
    second (the name taken), half done. Each gets a name of its own now."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "x.txt").write_text("base\n")
    a.sync(b)
    for n in (1, 2):
        (a.root / "x.txt").write_text(f"a {n}\n")
        (b.root / "x.txt").write_text(f"b {n}\n")
        newer(b.root / "x.txt", than=a.root / "x.txt")  # b wins: a's edits are the copies
        a.sync(b)
    assert len(conflict_copies(a.root)) == 2
    out = a("resolve", "x.txt", "--keep", "both").stdout
    kept = sorted(p.name for p in a.root.iterdir() if p.name.startswith("x."))
    assert len(kept) == 3 and "x.txt" in kept and "x.a.txt" in kept, (kept, out)
    (other,) = [k for k in kept if k not in ("x.txt", "x.a.txt")]
    assert other.startswith("x.a-") and other.endswith(".txt"), kept
    assert {(a.root / k).read_text() for k in kept} == {"b 2\n", "a 1\n", "a 2\n"}
    a.sync(b)
    assert conflict_copies(a.root) == conflict_copies(b.root) == []
    assert snapshot(a.root) == snapshot(b.root)


def test_opposite_resolves_on_two_replicas_meet_as_a_conflict_not_a_loss(tmp_path):
    """a keeps its edit, b keeps its own (or both), before they sync again: a trial lost b's
    edit everywhere, because keeping what is at the name recorded nothing there and a's
    decision then won silently."""
    a, b = make_replicas(tmp_path, "a", "b")
    for name in ("x.txt", "y.txt"):
        (a.root / name).write_text("base\n")
    a.sync(b)
    for name in ("x.txt", "y.txt"):
        (a.root / name).write_text(f"a's edit of {name}\n")
        (b.root / name).write_text(f"b's edit of {name}\n")
        newer(b.root / name, than=a.root / name)  # b's wins the name, a's is the copy
    a.sync(b)
    a("resolve", "x.txt", "--keep", "local")  # a's copy takes the name
    b("resolve", "x.txt", "--keep", "local")  # b's stays at the name
    a("resolve", "y.txt", "--keep", "local")
    b("resolve", "y.txt", "--keep", "both")  # a's copy renamed, b's stays at the name
    a.sync(b)
    a.sync(b)
    assert snapshot(a.root) == snapshot(b.root)
    contents = sorted(p.read_text() for p in a.root.iterdir())
    for name in ("x.txt", "y.txt"):
        assert f"a's edit of {name}\n" in contents and f"b's edit of {name}\n" in contents
    assert any(".conflict-" in p.name and p.name.startswith("x.") for p in a.root.iterdir())


def test_a_conflict_copy_moved_with_its_directory_stays_its_makers(tmp_path):
    """c moved the directory: the copy's record is c's event now, but the version in it is
    still the one its name says. `conflicts` credited it to c, and resolve --keep local on the
    replica whose edit it holds refused (a trial)."""
    a, b, c = make_replicas(tmp_path, "a", "b", "c")
    (a.root / "proj").mkdir()
    (a.root / "proj" / "index").write_text("base\n")
    a.sync(b)
    b.sync(c)
    (a.root / "proj" / "index").write_text("a's edit\n")
    (b.root / "proj" / "index").write_text("b's edit\n")
    newer(a.root / "proj" / "index", than=b.root / "proj" / "index")  # a's wins: b's the copy
    a.sync(b)
    b.sync(c)
    os.rename(c.root / "proj", c.root / "moved")
    c.sync(b)
    c.sync(a)
    (copy,) = conflict_copies(b.root / "moved")
    b_id = b.identity()["replica_id"]
    assert copy.startswith(f"index.conflict-{b_id[:8]}")
    for rep in (a, b, c):
        (row,) = json.loads(rep("conflicts", "--json").stdout)
        assert row["copy_replica"] == b_id, (rep.name, row)
    assert "(this replica)" in b("conflicts").stdout
    b("resolve", "moved/index", "--keep", "local")
    assert (b.root / "moved" / "index").read_text() == "b's edit\n"


def test_names_as_repld_prints_them_can_be_pasted_back(tmp_path):
    """`repld conflicts` and `log` print a space as \\s (one token per name); that form,
    pasted into `resolve` or `log`, names the file (it said "not in this replica")."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "my notes.txt").write_text("base\n")
    a.sync(b)
    (a.root / "my notes.txt").write_text("a's\n")
    (b.root / "my notes.txt").write_text("b's\n")
    newer(b.root / "my notes.txt", than=a.root / "my notes.txt")
    a.sync(b)
    listed = a("conflicts").stdout
    assert "my\\snotes.txt" in listed
    printed = listed.split()[0]
    assert "my\\snotes.txt" in a("log", printed).stdout
    a("resolve", printed, "--keep", "remote")
    a.sync(b)
    assert conflict_copies(a.root) == conflict_copies(b.root) == []
    assert (a.root / "my notes.txt").read_text() == (b.root / "my notes.txt").read_text() == "b's\n"
    proc = a("resolve", printed, "--keep", "local", check=False)  # settled already: a mistake
    assert proc.returncode == 2 and "no conflict to resolve" in proc.stderr


def test_resolve_keep_local_keeps_an_edit_made_here_after_the_conflict(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "x.txt").write_text("base\n")
    a.sync(b)
    (a.root / "x.txt").write_text("a's edit\n")
    (b.root / "x.txt").write_text("b's edit\n")
    newer(b.root / "x.txt", than=a.root / "x.txt")
    a.sync(b)  # a's edit lost: its copy is a's
    (a.root / "x.txt").write_text("a's newest edit, made on b's version\n")  # the name is a's now
    a("scan")
    (copy,) = conflict_copies(a.root)
    proc = a("resolve", "x.txt", "--keep", "remote", check=False)  # b's is not here any more
    assert proc.returncode == 2 and "this replica's own" in proc.stderr, proc.stderr
    # The copy is a's too, and so is the name: the one named is the one kept.
    a("resolve", "x.txt", "--keep", "local")
    assert (a.root / "x.txt").read_text() == "a's newest edit, made on b's version\n"
    assert conflict_copies(a.root) == []


def test_resolve_on_a_replica_that_made_neither_version_asks_which(tmp_path):
    """b only relayed a's and c's edits: "local" and "remote" cannot say which one to keep,
    and must not throw one of them away."""
    a, b, c = make_replicas(tmp_path, "a", "b", "c")
    (a.root / "r.txt").write_text("base\n")
    a.sync(b)
    b.sync(c)
    (a.root / "r.txt").write_text("a's edit\n")
    (c.root / "r.txt").write_text("c's edit\n")
    newer(c.root / "r.txt", than=a.root / "r.txt")  # c's wins the name, a's is the copy
    a.sync(b)
    c.sync(b)
    (copy,) = conflict_copies(b.root)
    for side in ("local", "remote"):
        proc = b("resolve", "r.txt", "--keep", side, check=False)
        assert proc.returncode == 2, proc.stdout
        assert "no version here was made on this replica" in proc.stderr
        assert f"{copy} is a's" in proc.stderr and "the file at the name is c's" in proc.stderr
    assert (b.root / copy).read_text() == "a's edit\n"  # nothing was removed
    b("resolve", copy, "--keep", "remote")  # a's version, named
    assert (b.root / "r.txt").read_text() == "a's edit\n"
    b.sync(a)
    b.sync(c)
    for r in (a, b, c):
        assert (r.root / "r.txt").read_text() == "a's edit\n"
        assert conflict_copies(r.root) == []


def test_ignored_paths_stay_local(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / ".repldignore").write_text("*.tmp\ncache/\n")
    (a.root / "cache").mkdir()
    (a.root / "cache" / "x").write_text("x")
    (a.root / "w.tmp").write_text("x")
    (a.root / "keep.txt").write_text("x")
    a.sync(b)
    assert (b.root / "keep.txt").exists() and (b.root / ".repldignore").exists()
    assert not (b.root / "cache").exists() and not (b.root / "w.tmp").exists()


def _writing_a_temp_file(pid: int, root: Path) -> bool:
    """Whether ``pid`` holds a temporary file under ``root`` open: a named one, or an unnamed
    one (O_TMPFILE), which /proc shows as ``DIR/#INODE (deleted)``."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{root}/") and (
            "/.repld-tmp-" in target or target.endswith(" (deleted)")
        ):
            return True
    return False


def test_kill_during_sync_leaves_no_partial_file_and_next_sync_repairs(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    src = a.root / "data"
    src.mkdir()
    blobs = {}
    for i in range(60):
        blobs[f"data/f{i:03}.bin"] = data = os.urandom(4 << 20)
        (a.root / f"data/f{i:03}.bin").write_bytes(data)
    a("scan")
    for kill_when in ("temp", "renamed"):
        proc = subprocess.Popen([*REPLD, "--config", str(a.config), "sync", str(b.config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        seen = False
        while time.monotonic() < deadline and proc.poll() is None and not seen:
            names = os.listdir(b.root / "data") if (b.root / "data").exists() else []
            if kill_when == "temp":
                seen = _writing_a_temp_file(proc.pid, b.root)
            else:
                seen = any(not n.startswith(".repld-tmp-") for n in names)
        assert seen and proc.poll() is None, "the sync ended before it could be killed mid-way"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        # No file under a real name is partial: it is either absent or exactly the source.
        for path in (b.root / "data").glob("*") if (b.root / "data").exists() else []:
            if not path.name.startswith(".repld-tmp-"):
                assert path.read_bytes() == blobs[f"data/{path.name}"], path
    a.sync(b)
    assert snapshot(a.root) == snapshot(b.root)
    assert not list((b.root / "data").glob(".repld-tmp-*"))
    assert conflict_copies(b.root) == []
    b("dump")  # the database reads back whole


def test_peer_changes_to_files_gone_here_unrecorded_apply_without_a_scan(tmp_path):
    """What a daemon meets when a peer's records arrive before its own watcher has recorded a
    local `mv` (or while the circuit breaker holds the deletions): files its records say are
    here are gone, parents and all. An edit from the peer comes back (a modification beats a
    deletion) and a deletion from the peer is simply recorded, with no scan of the gone path
    (which found a whole tree gone under its parent and tripped the breaker at every try)."""
    from repld.daemon.localsync import _pass
    from repld.daemon.replica import open_replica
    from repld.protocol.reconcile import Policy

    a, b = make_replicas(tmp_path, "a", "b")
    for d in range(10):
        (a.root / "dirA" / f"s{d}").mkdir(parents=True)
        for i in range(20):
            (a.root / "dirA" / f"s{d}" / f"f{i}.txt").write_text(f"{d} {i}\n")
    a.sync(b)
    (a.root / "dirA").rename(a.root / "dirB")  # not scanned on a
    (b.root / "dirA" / "s3" / "f7.txt").write_text("edited on b\n")
    (b.root / "dirA" / "s4" / "f1.txt").unlink()
    b("scan")

    with open_replica(a.config) as into, open_replica(b.config) as src:
        report = _pass(into, src, Policy.KEEP_BOTH, None, False, True, None)
    assert report.stats.errors == []
    assert (a.root / "dirA" / "s3" / "f7.txt").read_text() == "edited on b\n"
    assert "delete by" in a("log", "dirA/s4/f1.txt").stdout
    # a's own scan then records the move, the rest of dirA as gone, and nothing is lost.
    a("scan", "--accept-deletes")
    a.sync(b)
    assert snapshot(a.root) == snapshot(b.root)
    assert (b.root / "dirB" / "s3" / "f7.txt").read_text() == "3 7\n"
    assert (b.root / "dirA" / "s3" / "f7.txt").read_text() == "edited on b\n"


def test_a_replica_restored_from_an_old_backup_is_refused_until_it_rejoins(tmp_path):
    """b's state directory is put back from a backup older than what a has seen of b: b's new
    changes would reuse version numbers a knows for other content (one edit here never
    reached a; another would be overwritten by the older one). The sync refuses, names the
    way out; `repld rejoin` then loses nothing and takes in what b missed."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "f.txt").write_text("v1\n")
    a.sync(b)
    backup = tmp_path / "b.state.backup"
    shutil.copytree(b.state, backup)
    (b.root / "f.txt").write_text("v2, edited on b after the backup\n")
    (b.root / "g.txt").write_text("made on b after the backup\n")
    a.sync(b)  # a has seen b's records past the backup now
    shutil.rmtree(b.state)
    shutil.copytree(backup, b.state)  # the restore
    (b.root / "h.txt").write_text("made on b after the restore\n")

    refused = a.sync(b, check=False)
    assert refused.returncode != 0
    assert "restored from an older backup" in refused.stderr, refused.stderr
    assert "rejoin" in refused.stderr
    assert not (a.root / "h.txt").exists()  # nothing was exchanged

    out = b("rejoin").stdout
    assert "joined tree" in out and "before-rejoin" in out
    assert list(b.state.glob("repld.db.before-rejoin-*"))
    a.sync(b)
    a.sync(b)
    assert snapshot(a.root) == snapshot(b.root)
    assert (a.root / "h.txt").read_text() == "made on b after the restore\n"
    assert (a.root / "f.txt").read_text() == "v2, edited on b after the backup\n"
    assert conflict_copies(a.root) == []

    # b's old self never syncs again: b does not wait for it to prune, and a says how to
    # stop waiting (a trial found both waiting forever, a with a promise that never comes).
    (a.root / "g.txt").unlink()
    a.sync(b)
    assert "dropped 1 tombstone" in b("prune").stdout
    text = a("prune").stdout
    assert "1 tombstone kept" in text and "b has synced since as" in text, text
    assert f"`repld --config {a.config} prune --forget" in text, text
    old_id = next(r["replica_id"] for r in json.loads(a("prune", "--json").stdout)["replicas"]
                  if r["unseen"])  # fmt: skip
    assert "dropped 1 tombstone" in a("prune", "--forget", old_id[:8]).stdout


def test_a_dry_run_lists_what_changes_files_and_counts_the_rest(tmp_path):
    """A new replica's dry run against one with many deletions printed one `record ... [new]`
    line per tombstone, burying the few files it would write (found by a new-user trial)."""
    a, c = make_replicas(tmp_path, "a", "c")
    for i in range(30):
        (a.root / f"old{i:02}").write_text("old\n")
    a("scan")
    for i in range(30):
        (a.root / f"old{i:02}").unlink()
    (a.root / "kept.txt").write_text("kept\n")
    a("scan")
    out = c.sync(a, "-n").stdout
    lines = [ln for ln in out.splitlines() if " <- " in ln]
    assert [ln.split() for ln in lines] == [["c", "<-", "write", "kept.txt", "[new]"]], out
    assert "dry run: 1 actions planned (and 30 records to take that change no file" in out
    verbose = c.sync(a, "-n", "-v").stdout
    assert sum(ln.split()[2:3] == ["record"] for ln in verbose.splitlines()) == 30
    c.sync(a)
    assert sorted(p.name for p in c.root.iterdir()) == ["kept.txt"]


def test_a_file_a_program_here_is_writing_is_neither_replaced_nor_removed_under_it(tmp_path):
    """Replaced by rename (or unlinked) while a program here has it open for writing, the file
    would take that program's next writes with it: a log, `tee -a`, a download. The change
    waits until the program closes it; then nothing written is lost (a conflict keeps both)."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "app.log").write_text("start\n")
    (a.root / "scratch.txt").write_text("deleted on a\n")
    a.sync(b)
    with Appender(b.root / "app.log", b.root / "scratch.txt") as writer:
        writer.line("b line 1")
        wait_for(lambda: "b line 1" in (b.root / "app.log").read_text(), "the first line")
        b("scan")
        (a.root / "app.log").write_text("start\nedited on a\n")
        (a.root / "scratch.txt").unlink()
        proc = a.sync(b, check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert re.search(r"error: b: app\.log: open for writing by process \d+ \(python", proc.stderr)
        assert "replaced by the new version once it is closed" in proc.stderr
        assert "error: b: scratch.txt: open for writing" in proc.stderr and "removed once" \
            in proc.stderr  # fmt: skip
        assert (b.root / "scratch.txt").exists()
        writer.line("b line 2")
    assert (b.root / "app.log").read_text() == "start\nb line 1\nb line 2\n"
    a.sync(b)
    assert snapshot(a.root) == snapshot(b.root)
    texts = {p.read_text() for p in b.root.iterdir() if p.name.startswith("app")}
    # Both kept: all the program wrote, and a's edit (and, as the sync met them, b's version
    # of the moment, a conflict copy made while the program still had the file open).
    assert {"start\nb line 1\nb line 2\n", "start\nedited on a\n"} <= texts, texts
    assert not (b.root / "scratch.txt").exists()


def test_the_kernel_answers_whether_a_file_is_being_written_before_proc_is_read(
    tmp_path, monkeypatch
):
    """Looking through /proc costs a stat per descriptor of every process (76 ms with 20,000
    open): a lease answers "nobody writes it" in a few system calls, and /proc is read only
    to name the program that does."""
    from repld.daemon.diskio import written_elsewhere

    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "f.txt").write_text("v1\n")
    (a.root / "g.txt").write_text("v1\n")
    a.sync(b)
    assert written_elsewhere(str(b.root / "f.txt")) is False
    with Appender(b.root / "g.txt"):
        wait_for(lambda: written_elsewhere(str(b.root / "g.txt")), "the writer to open g.txt")
    assert written_elsewhere(str(b.root / "g.txt")) is False  # closed

    looked: list[int] = []
    real = applier_mod.OpenFiles

    def counted() -> object:
        looked.append(1)
        return real()

    monkeypatch.setattr(applier_mod, "OpenFiles", counted)
    (a.root / "f.txt").write_text("v2\n")
    (a.root / "g.txt").unlink()
    report = sync_in_process(a, b)
    assert not report.errors and looked == [], (report.errors, looked)
    assert (b.root / "f.txt").read_text() == "v2\n" and not (b.root / "g.txt").exists()


def test_a_users_file_that_only_looks_like_a_temporary_file_is_kept_and_synced(tmp_path):
    """A trial: files named .repld-tmp-SOMETHING were deleted by every scan, never synced and
    never reported. Only repld's own temporary names (the prefix, then 8 and 8 hex digits) are
    leftovers of a crash; anything else is a file like any other."""
    a, b = make_replicas(tmp_path, "a", "b")
    mine = {".repld-tmp-lookalike": "mine\n", ".repld-tmp-restore-notes.txt": "notes\n",
            ".repld-tmp-0123abcd-89abcdeg": "not hex\n"}  # fmt: skip
    for name, text in mine.items():
        (a.root / name).write_text(text)
    leftover = a.root / ".repld-tmp-0123abcd-89abcdef"  # as a crash in the middle leaves it
    leftover.write_text("half a file")
    a("scan")
    a.sync(b)
    for name, text in mine.items():
        assert (a.root / name).read_text() == text
        assert (b.root / name).read_text() == text
    assert not leftover.exists()
    assert not (b.root / leftover.name).exists()


def test_a_file_named_like_a_conflict_copy_is_no_conflict(tmp_path):
    """A trial: a user's report.conflict-deadbeef-12345678.txt was listed as a conflict, and
    `resolve` of it renamed it over report.txt on every replica. Only copies repld made are
    conflicts (their guid is derived from the losing version)."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "report.txt").write_text("the report\n")
    (a.root / "report.conflict-deadbeef-12345678.txt").write_text("mine, named so\n")
    a.sync(b)
    assert "no conflicts" in a("conflicts").stdout
    assert json.loads(b("conflicts", "--json").stdout) == []
    proc = a("resolve", "report.conflict-deadbeef-12345678.txt", "--keep", "local", check=False)
    assert proc.returncode == 2, proc
    assert (a.root / "report.txt").read_text() == "the report\n"
    assert (a.root / "report.conflict-deadbeef-12345678.txt").read_text() == "mine, named so\n"


@pytest.mark.parametrize("damage", ["emptied", "corrupted"])
def test_a_damaged_database_is_named_and_rejoin_brings_the_replica_back(tmp_path, damage):
    """A trial: an emptied database said "cannot open the database (no such table: meta); its
    directory must be writable, and its file system not full" (and the failed open wrote to
    it); a corrupted one said "database error: database disk image is malformed", naming
    neither the file nor a way out. Both name the file and `repld rejoin --tree-id`, which
    then works, losing nothing in the root."""
    a, b = make_replicas(tmp_path, "a", "b")
    for i in range(400):
        (a.root / f"f{i:03}.txt").write_text(f"{i}\n" * 50)
    a.sync(b)
    (b.root / "new-on-b.txt").write_text("made on b, never synced\n")
    db = b.state / "repld.db"
    for extra in ("-wal", "-shm"):
        db.with_name(db.name + extra).unlink(missing_ok=True)
    if damage == "emptied":
        db.write_bytes(b"")
    else:
        size = db.stat().st_size
        with open(db, "r+b") as f:
            for at in range(4096, size, 4096):  # every page but the first (the header)
                f.seek(at)
                f.write(os.urandom(512))
    for cmd in (["scan"], ["sync", str(a.config)], ["status"]):
        proc = b(*cmd, check=False)
        text = proc.stdout + proc.stderr
        if cmd == ["status"]:
            assert proc.returncode == 3, text  # no daemon: nothing opened the database
            continue
        assert proc.returncode == 2, text  # (a service is not restarted for nothing)
        assert f"{db}: the database is damaged" in text, (cmd, text)
        assert "rejoin --tree-id" in text and "Traceback" not in text, text
    if damage == "emptied":
        assert db.stat().st_size == 0  # the failed opens wrote nothing into it
        refused = b("rejoin", check=False)
        assert refused.returncode == 2 and "--tree-id TREE_ID" in refused.stderr, refused.stderr
    out = b("rejoin", "--tree-id", a.tree_id()).stdout
    assert "joined tree" in out and ".damaged-" in out, out
    assert list(b.state.glob("repld.db.damaged-*"))
    a.sync(b)
    a.sync(b)
    assert snapshot(a.root) == snapshot(b.root)
    assert (a.root / "new-on-b.txt").read_text() == "made on b, never synced\n"
    assert conflict_copies(a.root) == []


def test_rejoin_keeps_the_history_the_old_database_still_tells(tmp_path):
    """A trial: after a rejoin, an old copy of a file edited elsewhere since became a conflict
    copy, and so did an edit made here. The old database (a backup, or a damaged one) still
    says which version each file here is: an old copy is only behind, and an edit made here
    since is an edit of that version."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "edited-on-a.txt").write_text("v1\n")
    (a.root / "edited-on-b.txt").write_text("v1\n")
    (a.root / "same.txt").write_text("same\n")
    a.sync(b)
    backup = tmp_path / "b.state.backup"
    shutil.copytree(b.state, backup)
    (b.root / "after-backup.txt").write_text("made on b after the backup\n")
    a.sync(b)  # a has seen b's records past the backup now
    (a.root / "edited-on-a.txt").write_text("v2, edited on a\n")
    shutil.rmtree(b.state)
    shutil.copytree(backup, b.state)  # the restore
    (b.root / "edited-on-b.txt").write_text("v2, edited on b after the restore\n")
    out = b("rejoin").stdout
    assert "2 paths found as the old database recorded them, 1 changed since" in out, out
    a.sync(b)
    a.sync(b)
    assert snapshot(a.root) == snapshot(b.root)
    assert conflict_copies(a.root) == [], conflict_copies(a.root)
    assert (b.root / "edited-on-a.txt").read_text() == "v2, edited on a\n"
    assert (a.root / "edited-on-b.txt").read_text() == "v2, edited on b after the restore\n"
    assert (a.root / "after-backup.txt").exists()


def test_a_lost_key_pair_is_made_anew_by_rejoin_and_backups_never_overwrite(tmp_path):
    """A trial deleted curve.secret: every command said "it is made by `repld init`", which
    refuses an existing config, and `rejoin` (README: "a new key pair is made if the old one
    is gone") made none. Two rejoins in one second kept one backup, the second's."""
    (a,) = make_replicas(tmp_path, "a")
    (a.root / "f.txt").write_text("kept\n")
    a("scan")
    before = a.identity()["public_key"]
    (a.state / "keys" / "curve.secret").unlink()
    assert a.identity()["public_key"] == before  # `id` shows only the public one
    proc = a("run", check=False)  # what needs the secret one says what to do
    assert proc.returncode == 2 and "rejoin` makes a new key pair" in proc.stderr, proc.stderr
    out = a("rejoin").stdout
    assert "new key pair" in out and "peer add a" in out, out
    after = a.identity()["public_key"]
    assert after != before and len(after) == 40
    assert not a("rejoin").stdout.count("new key pair")  # a key pair that is there stays
    backups = sorted(p.name for p in a.state.iterdir() if ".before-rejoin-" in p.name
                     and not p.name.endswith(("-wal", "-shm")))  # fmt: skip
    assert len(backups) == 2, backups
    assert (a.root / "f.txt").read_text() == "kept\n"
