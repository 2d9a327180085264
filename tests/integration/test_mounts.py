"""A file system mounted inside the tree that is not mounted any more is not a mass deletion.

A trial unmounted a disk mounted at a directory of the tree: every replica deleted its files
(the mass-delete breaker did not fire: a small part of the tree). These tests mount a real ext4
image inside the tree (a loop device: root only) and unmount it under a one-shot sync and
under a running daemon.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemons import Cluster
from helpers import make_replicas, snapshot

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("mkfs.ext4"), reason="needs root and mkfs.ext4"
)


class Disk:
    """An ext4 image, mounted at ``at`` (inside a tree) and unmounted at will."""

    def __init__(self, image: Path, at: Path):
        self.image, self.at = image, at

    def mount(self) -> None:
        subprocess.run(["mount", "-o", "loop", str(self.image), str(self.at)], check=True,
                       capture_output=True)  # fmt: skip

    def umount(self) -> None:
        subprocess.run(["umount", str(self.at)], check=True, capture_output=True)

    @property
    def mounted(self) -> bool:
        return os.path.ismount(self.at)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Callable[[Path], Disk]]:
    made: list[Disk] = []

    def make(at: Path) -> Disk:
        image = tmp_path / f"disk{len(made)}.img"
        with open(image, "wb") as f:
            f.truncate(16 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
        at.mkdir(exist_ok=True)
        d = Disk(image, at)
        d.mount()
        shutil.rmtree(at / "lost+found")
        made.append(d)
        return d

    yield make
    for d in made:
        if d.mounted:
            subprocess.run(["umount", "-l", str(d.at)], check=False)


def test_an_unmounted_disk_in_the_tree_deletes_nothing_and_takes_nothing(tmp_path, disk):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "home.txt").write_text("on the root's file system\n")
    d = disk(a.root / "media")
    for n in range(5):
        (d.at / f"song{n}.ogg").write_text(f"song {n}\n")
    a.sync(b)
    assert (b.root / "media" / "song0.ogg").exists()

    d.umount()
    proc = a.sync(b, check=False)
    assert proc.returncode == 1, proc.stdout
    assert "a file system was mounted at media and is not now" in proc.stderr, proc.stderr
    assert sorted(p.name for p in (b.root / "media").iterdir()) == [f"song{n}.ogg" for n in range(5)]
    # Nor is anything written where the disk is not: it would hide under it once mounted.
    (b.root / "media" / "new.ogg").write_text("new on b\n")
    (b.root / "home2.txt").write_text("elsewhere in the tree\n")
    proc = b.sync(a, check=False)
    assert proc.returncode == 1 and "media/new.ogg" in proc.stderr, proc.stderr
    assert list((a.root / "media").iterdir()) == []
    assert (a.root / "home2.txt").exists()  # the rest of the tree syncs

    d.mount()
    a.sync(b)
    assert (a.root / "media" / "new.ogg").read_text() == "new on b\n"
    assert snapshot(a.root) == snapshot(b.root)

    # Gone for good: said so, and what was on it is deleted everywhere.
    d.umount()
    assert a("scan", check=False).returncode == 1
    out = a("scan", "--accept-deletes").stdout
    assert "6 deleted" in out, out
    a.sync(b)
    assert list((b.root / "media").iterdir()) == []
    assert "not mounted" not in a.sync(b).stderr


def test_a_daemon_holds_the_deletions_while_a_disk_is_unmounted(tmp_path, disk):
    with Cluster(tmp_path) as cluster:
        a, b = cluster.make("a", "b")
        d = disk(a.root / "media")
        (d.at / "photo.jpg").write_text("a photo\n")
        cluster.start()
        cluster.wait_converged(what="the disk's file on b")
        d.umount()

        def said() -> bool:
            st = a.status() or {}
            return any("a file system was mounted at media" in e["error"]
                       for e in st.get("errors", []))  # fmt: skip

        cluster.wait_until(said, what="a's status to say the disk is not mounted")
        (a.root / "after.txt").write_text("the rest syncs\n")
        cluster.wait_until(lambda: (b.root / "after.txt").exists(), what="after.txt on b")
        assert (b.root / "media" / "photo.jpg").read_text() == "a photo\n"
        (b.root / "media" / "from-b.jpg").write_text("b's photo\n")  # held back on a
        cluster.wait_until(lambda: any(e["path"] == "media/from-b.jpg" for e in
                                       (a.status() or {}).get("errors", [])),
                           what="a to refuse writing under the unmounted disk")  # fmt: skip
        assert list((a.root / "media").iterdir()) == []
        d.mount()  # no inotify event says so: the daemon looks every 2 s
        cluster.wait_until(lambda: not said(), what="a to find the disk back")
        cluster.wait_converged(what="the disk back")
        assert (a.root / "media" / "from-b.jpg").read_text() == "b's photo\n"
        assert (b.root / "media" / "photo.jpg").exists()
