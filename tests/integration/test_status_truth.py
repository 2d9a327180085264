"""What `repld status` says while a big change travels: scripts wait on `in_sync`."""

from __future__ import annotations

import datetime as dt
import os

from daemons import Cluster


def test_the_sender_does_not_say_in_sync_while_the_peer_still_fetches(tmp_path):
    with Cluster(tmp_path) as cluster:
        a, b = cluster.make("a", "b")
        cluster.start()
        cluster.wait_converged(what="two empty replicas")
        big = tmp_path / "big.bin"
        with open(big, "wb") as f:
            for _ in range(96):
                f.write(os.urandom(1 << 20))
        want = big.stat().st_size
        os.rename(big, a.root / "big.bin")  # as a download finishing into the tree
        # Once a has recorded it, a's view of b must stay "not in sync" until b has it all.
        cluster.wait_until(
            lambda: " create " in a("log", "big.bin", check=False).stdout, what="a to record it"
        )
        samples = []

        states = []

        def arrived() -> bool:
            st = a.status()
            peer = st and next(p for p in st["peers"] if p["name"] == "b")
            there = (b.root / "big.bin").exists() and (b.root / "big.bin").stat().st_size == want
            samples.append(
                (bool(peer and peer["in_sync"]), there, peer and peer["peer_need_files"])
            )
            if st and not there:
                states.append(st["state"])
            return there and samples[-1][0]

        cluster.wait_until(arrived, what="b to have the file and a to know it", timeout=60)
        early = [s for s in samples if s[0] and not s[1]]
        assert not early, f"a said b was in sync before b had the file: {samples}"
        assert any(need for _, there, need in samples if not there) or samples[0][1]
        # Sending is syncing: a said "idle" while b fetched the file from it (a trial's note).
        assert not states or "syncing" in states, states
        cluster.wait_until(lambda: a.status()["state"] == "idle", what="a idle once b has it")


def test_counts_are_exact_as_soon_as_nothing_more_is_on_its_way(tmp_path):
    """b relays a's new files to c, which is paused and takes nothing: b is in sync with a,
    not with c. Its counts were refreshed at most once a second then, and `status` said
    "in sync with a" with an old file count (found by a new-user trial)."""
    with Cluster(tmp_path) as cluster:
        a, b, c = cluster.make("a", "b", "c", links=[("a", "b"), ("b", "c")])
        cluster.start()
        cluster.wait_converged(what="three empty replicas")
        c("pause")
        (a.root / "d").mkdir()
        n = 1500
        for i in range(n):
            (a.root / "d" / f"f{i:04}").write_text(f"{i}\n")
        snapshots = []

        def b_in_sync_with_a() -> bool:
            st = b.status()
            peer = st and next(p for p in st["peers"] if p["name"] == "a")
            on_disk = len(os.listdir(b.root / "d")) if (b.root / "d").is_dir() else 0
            if peer and peer["in_sync"] and st["state"] == "idle" and on_disk == n:
                snapshots.append(st)
                return True
            return False

        cluster.wait_until(b_in_sync_with_a, what="b to take a's files", timeout=60)
        assert snapshots[0]["local"]["files"] == n, snapshots[0]["local"]
        assert not next(p for p in snapshots[0]["peers"] if p["name"] == "c")["in_sync"]


def test_a_file_that_fails_at_every_try_leaves_the_daemon_idle_with_the_error(tmp_path):
    """b cannot apply a deletion (it cannot keep the file's content as a version): nothing is
    on its way, so b says "idle" and lists the error, not "syncing" for as long as the failure
    lasts (a script waiting for idle waited for ever)."""
    with Cluster(tmp_path) as cluster:
        a, b = cluster.make("a", "b")
        (a.root / "precious.txt").write_text("precious\n")
        cluster.start()
        cluster.wait_converged(what="one file")
        (b.state / "versions").write_text("not a folder\n")
        (a.root / "precious.txt").unlink()

        def failed_and_idle() -> bool:
            st = b.status()
            return bool(st and st["errors"] and st["state"] == "idle")

        cluster.wait_until(failed_and_idle, what="b to fail the deletion and say idle", timeout=30)
        st = b.status()
        assert [e["path"] for e in st["errors"]] == ["precious.txt"], st["errors"]
        peer = next(p for p in st["peers"] if p["name"] == "a")
        assert peer["need_files"] == 1 and not peer["in_sync"], peer
        assert (b.root / "precious.txt").exists()
        (b.state / "versions").unlink()
        cluster.wait_converged(what="the deletion, once b can keep the file")


def test_a_restarted_daemon_says_when_it_last_synced_with_a_peer_that_is_away(tmp_path):
    """The laptop is off; the desktop's daemon restarts: `status` said the laptop was "never"
    seen, as if the two had never met. It says when they last synced."""
    with Cluster(tmp_path) as cluster:
        a, b = cluster.make("a", "b")
        (a.root / "note.txt").write_text("hello\n")
        cluster.start()
        cluster.wait_converged(what="one file")
        before = a.peer_status("b")["last_seen"]
        assert before, a.status()
        cluster.stop(a, b)
        cluster.start(a)
        peer = cluster.wait_until(lambda: a.peer_status("b"), what="a's status")
        assert not peer["connected"], peer
        assert peer["last_seen"], peer
        apart = dt.datetime.fromisoformat(peer["last_seen"]) - dt.datetime.fromisoformat(before)
        assert abs(apart.total_seconds()) < 30, (peer, before)
        assert "never" not in a("status").stdout


def test_a_peers_one_shot_sync_counts_as_heard_from(tmp_path):
    """A newcomer's trial: m1 ran `repld sync laptop` against laptop's daemon, and laptop's
    status kept an older last_seen for m1 (the link went with the sync's end)."""
    with Cluster(tmp_path) as cluster:
        a, b = cluster.make("a", "b")
        cluster.start(a)
        before = dt.datetime.now(dt.UTC).replace(microsecond=0)
        (b.root / "from-b.txt").write_text("b\n")
        b("sync", "a")
        peer = cluster.wait_until(lambda: a.peer_status("b"), what="a's status")
        assert peer["last_seen"], peer
        assert dt.datetime.fromisoformat(peer["last_seen"]) >= before, (peer, before)
        assert (a.root / "from-b.txt").exists()
