"""What the applier removes or creates is durable before the records that say so are committed.

Were the tombstone committed first, a crash before the file system wrote the removal would
bring the file back under a tombstone, and the next scan would record it as a new file that
every replica then gets again: a deleted file come back. Here the applier's directory fsync
(and syncfs, for many) is watched: when it runs, the database must still hold the file alive;
after the sync, the tombstone is there. Likewise a directory made to hold a new file has its
own entry flushed, not only the file's.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import make_replicas
from repld.daemon import applier as applier_mod
from repld.daemon import localsync
from repld.daemon.replica import open_replica


def alive_in_db(config: Path, path: str) -> bool:
    with open_replica(config, write=False) as rep:
        rec = rep.store.get(path)
        return rec is not None and not rec.deleted


@pytest.mark.parametrize("count", [1, 40])  # a few removals: directory fsyncs; many: one syncfs
def test_a_removal_is_durable_before_its_tombstone(tmp_path, monkeypatch, count):
    a, b = make_replicas(tmp_path, "a", "b")
    names = [f"d{i % 12}/f{i}.txt" for i in range(count)]
    for name in names:
        (a.root / name).parent.mkdir(exist_ok=True)
        (a.root / name).write_text(name)
    a.sync(b)
    for name in names:
        (a.root / name).unlink()
    a("scan")

    flushed_while_alive: list[str] = []

    def watch(real):  # type: ignore[no-untyped-def]
        def flush(path):  # type: ignore[no-untyped-def]
            real(path)
            flushed_while_alive.extend(
                n for n in names if not (b.root / n).exists() and alive_in_db(b.config, n)
            )

        return flush

    monkeypatch.setattr(applier_mod, "_fsync_dir", watch(applier_mod._fsync_dir))
    monkeypatch.setattr(applier_mod, "syncfs", watch(applier_mod.syncfs))
    with open_replica(a.config) as ra, open_replica(b.config) as rb:
        localsync.sync(ra, rb, direction=localsync.Direction.PUSH)

    assert not any((b.root / n).exists() for n in names)
    assert not any(alive_in_db(b.config, n) for n in names)  # tombstones, after
    # Every file was flushed gone from disk while the database still held it alive.
    assert set(flushed_while_alive) == set(names)


def test_directories_made_for_a_few_files_are_durable_too(tmp_path, monkeypatch):
    """A live edit's few files are flushed one by one (fdatasync, then their directory): a
    directory made to hold them must have its own entry flushed too, up to one that existed."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "old").mkdir()
    a.sync(b)
    (a.root / "old/new/deeper").mkdir(parents=True)
    (a.root / "old/new/deeper/f.txt").write_text("x")
    a("scan")
    fsynced: list[str] = []

    def fsync_dir(path: str) -> None:
        fsynced.append(os.path.relpath(path, b.root))
        real(path)

    real = applier_mod._fsync_dir
    monkeypatch.setattr(applier_mod, "_fsync_dir", fsync_dir)
    with open_replica(a.config) as ra, open_replica(b.config) as rb:
        localsync.sync(ra, rb, direction=localsync.Direction.PUSH)
    assert (b.root / "old/new/deeper/f.txt").read_text() == "x"
    assert {"old", "old/new", "old/new/deeper"} <= set(fsynced)


def test_children_tombstones_come_before_the_file_that_replaced_their_directory(tmp_path):
    """Relays stream records in sequence order, and a replica that gets the file before its
    old directory's children are gone keeps the directory and makes the file a conflict copy:
    so the receiver must record the children's tombstones first."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "D").mkdir()
    for i in range(3):
        (a.root / f"D/f{i}").write_text(str(i))
    a.sync(b)
    for i in range(3):
        (a.root / f"D/f{i}").unlink()
    (a.root / "D").rmdir()
    (a.root / "D").write_text("the new file")
    a("scan")
    with open_replica(a.config) as ra, open_replica(b.config) as rb:
        localsync.sync(ra, rb, direction=localsync.Direction.PUSH)
    assert (b.root / "D").read_text() == "the new file"
    with open_replica(b.config, write=False) as rb:
        seq = {r.path: r.seq for r in rb.store.page_since(0, 1000)}
    assert all(seq[f"D/f{i}"] < seq["D"] for i in range(3)), seq
