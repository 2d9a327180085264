"""Shared test configuration: hypothesis profiles (REPLD_HYPOTHESIS_PROFILE=nightly for long runs)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent / "integration"))

settings.register_profile("default", deadline=None)
settings.register_profile(
    "nightly", deadline=None, max_examples=1000, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("REPLD_HYPOTHESIS_PROFILE", "default"))


# --- property tests (tests/integration/test_property.py) -------------------------------------
# The stateful replication property drives real files and real SQLite, so its example counts are
# its own: "property-<profile>" derives from the profile loaded above (REPLD_HYPOTHESIS_PROFILE).
settings.register_profile(
    "property-default",
    parent=settings.get_profile("default"),
    max_examples=300,  # about 40 s on two cores when it passes
    stateful_step_count=40,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "property-nightly",
    parent=settings.get_profile("nightly"),
    max_examples=5000,  # about 15-20 min
    stateful_step_count=60,
)


def pytest_configure(config):  # type: ignore[no-untyped-def]
    config.addinivalue_line(
        "markers",
        "property: hypothesis stateful property tests (REPLD_HYPOTHESIS_PROFILE=nightly: long run)",
    )

@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs (root only), unmounted at the end."""
    from helpers import tmpfs

    at = tmp_path / "small"
    at.mkdir()
    with tmpfs(at, "4m"):
        yield at


@pytest.fixture
def small_ext4(tmp_path):
    """An 8 MiB ext4 file system on a loop device (root only), unmounted at the end: a disk
    that fills up as a USB stick's does (a tmpfs fails differently)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a loop device needs root")
    image, at = tmp_path / "small.img", tmp_path / "small-ext4"
    at.mkdir()
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    for cmd in (["mkfs.ext4", "-q", "-F", str(image)], ["mount", "-o", "loop", str(image), str(at)]):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip(f"{cmd[0]} is not installed")
        if proc.returncode != 0:
            pytest.skip(f"cannot make a small ext4 here: {proc.stderr.strip()}")
    try:
        yield at
    finally:
        subprocess.run(["umount", str(at)], check=False)
