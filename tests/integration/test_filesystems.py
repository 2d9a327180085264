"""A replica on a file system that would damage the tree is refused, before anything is written.

exFAT (like FAT, the usual format of USB disks) keeps no file modes and ignores case in names.
Synced as if it were a Linux file system, it sent mode 0777 for every file back to the home
directory, and of README.md and readme.md it kept one and had the other deleted everywhere.
These tests mount a real exFAT image (Debian's exfatprogs and exfat-fuse; FUSE, as this kernel
has no exFAT driver) and check that `repld init` and `repld sync` say so and change nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import make_replicas, run, snapshot

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("mkfs.exfat") and shutil.which("mount.exfat-fuse")),
    reason="needs root, mkfs.exfat (exfatprogs) and mount.exfat-fuse (exfat-fuse)",
)

Mount = Callable[[Path], None]


@pytest.fixture
def exfat(tmp_path: Path) -> Iterator[Mount]:
    """An empty exFAT file system mounted at a fresh directory; what to mount it on later."""
    image = tmp_path / "usb.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.exfat", str(image)], check=True, capture_output=True)
    loop = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    mounted: list[Path] = []

    def mount(at: Path) -> None:
        proc = subprocess.run(["mount.exfat-fuse", loop, str(at)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount exFAT through FUSE here: {proc.stderr.strip()}")
        mounted.append(at)

    try:
        yield mount
    finally:
        for at in mounted:
            subprocess.run(["umount", str(at)], capture_output=True)
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def test_init_on_exfat_is_refused_and_writes_nothing(tmp_path: Path, exfat: Mount) -> None:
    usb = tmp_path / "usb"
    usb.mkdir()
    exfat(usb)
    config = tmp_path / "usb.toml"
    proc = run("--config", config, "init", usb, "--name", "usb", check=False)
    assert proc.returncode == 2, proc.stderr
    assert str(usb) in proc.stderr
    assert "keeps no file modes" in proc.stderr and "ignores case" in proc.stderr
    assert "format a USB disk as ext4" in proc.stderr
    assert not config.exists()
    assert os.listdir(usb) == []  # the probe file is gone too


def test_sync_into_a_replica_now_on_exfat_is_refused(tmp_path: Path, exfat: Mount) -> None:
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "README.md").write_text("upper")
    (a.root / "readme.md").write_text("lower")
    (a.root / "run.sh").write_text("#!/bin/sh\n")
    (a.root / "run.sh").chmod(0o755)
    before = snapshot(a.root)
    exfat(b.root)  # b's disk was reformatted, or another disk mounted in its place
    proc = a.sync(b, check=False)
    assert proc.returncode == 2, proc.stderr
    assert str(b.root) in proc.stderr and "ignores case" in proc.stderr
    assert snapshot(a.root) == before
    assert os.listdir(b.root) == []
