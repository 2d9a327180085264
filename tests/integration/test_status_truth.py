"""What `repld status` says while a big change travels: scripts wait on `in_sync`."""

from __future__ import annotations

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

        def arrived() -> bool:
            peer = a.peer_status("b")
            there = (b.root / "big.bin").exists() and (b.root / "big.bin").stat().st_size == want
            samples.append(
                (bool(peer and peer["in_sync"]), there, peer and peer["peer_need_files"])
            )
            return there and samples[-1][0]

        cluster.wait_until(arrived, what="b to have the file and a to know it", timeout=60)
        early = [s for s in samples if s[0] and not s[1]]
        assert not early, f"a said b was in sync before b had the file: {samples}"
        assert any(need for _, there, need in samples if not there) or samples[0][1]
