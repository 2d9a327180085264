"""Two repld daemons on a big tree: peak memory, time and CPU of the initial sync, then idle CPU.

Replica A holds N small files (default 100k, 1-8 KiB each, 100 per directory) and is `repld init`ed;
B starts empty with A's tree id; both daemons are launched and timed until B's daemon reports
every file and both report in sync (`repld status --json`), then B's tree is checked against
A's (paths and sizes). Reported per daemon: peak RSS (VmHWM), CPU seconds, and the CPU used while
idle for 10 s afterwards. The issue's target: under 150 MiB per daemon at 100k files.

    sudo .venv/bin/python bench/bench_memory.py              # 100k files, a few minutes
    sudo .venv/bin/python bench/bench_memory.py --files 10000

Runs on a journaled ext4 image on a loop device, like the other benchmarks here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import (
    BenchError,
    Runner,
    add_area_options,
    build_small_tree,
    command_line,
    drive,
    find_repld,
    flush_fs,
    git_state,
    host_line,
    problems_section,
)

CONVERGE_TIMEOUT_S = 1800
IDLE_S = 10.0


class Daemon:
    def __init__(self, label: str, cmd: list[str], log: Path):
        self.label = label
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        self.pid = self.proc.pid

    def proc_status(self, key: str) -> float:
        """A /proc/PID/status value in MiB (VmHWM, VmRSS)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        raise BenchError(f"{self.label}: no {key} in /proc/{self.pid}/status")

    def cpu(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        tick = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / tick  # utime + stime

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class MemoryBench:
    def __init__(self, area: Path, fs: str, runner: Runner, args: argparse.Namespace):
        self.area = area
        self.fs = fs
        self.r = runner
        self.args = args
        self.exe = str(find_repld(args.repld))
        self.problems: list[str] = []
        self.rows: list[tuple[str, str]] = []
        self.daemons: list[Daemon] = []

    def cmd(self, side: str, *args: str) -> list[str]:
        return [self.exe, "--config", str(self.area / f"{side}.toml"), *args]

    def status(self, side: str) -> dict | None:
        res = subprocess.run(self.cmd(side, "status", "--json"), capture_output=True, text=True,
                             timeout=60)  # fmt: skip
        return json.loads(res.stdout) if res.returncode in (0, 1) and res.stdout else None

    def run_all(self) -> None:
        n = self.args.files
        self.r.note(f"building {n} small files ...")
        tree = build_small_tree(self.area / "a", n, self.args.seed)
        (self.area / "b").mkdir()
        t0 = time.perf_counter()
        self.r.untimed(self.cmd("a", "init", str(self.area / "a"), "--name", "a",
                                "--listen", "tcp://127.0.0.1:27431"))  # fmt: skip
        self.rows.append(("`repld init` of A (not counted below)",
                          f"{time.perf_counter() - t0:.2f} s"))  # fmt: skip
        ident = {s: json.loads(self.r.untimed(self.cmd(s, "id", "--json"))) for s in ("a",)}
        self.r.untimed(self.cmd("b", "init", str(self.area / "b"), "--name", "b",
                                "--listen", "tcp://127.0.0.1:27432",
                                "--tree-id", ident["a"]["tree_id"]))  # fmt: skip
        ident["b"] = json.loads(self.r.untimed(self.cmd("b", "id", "--json")))
        self.r.untimed(self.cmd("a", "peer", "add", "--", "b", "tcp://127.0.0.1:27432",
                                ident["b"]["public_key"]))  # fmt: skip
        self.r.untimed(self.cmd("b", "peer", "add", "--", "a", "tcp://127.0.0.1:27431",
                                ident["a"]["public_key"]))  # fmt: skip
        flush_fs()
        self.r.note("launching both daemons ...")
        start = time.perf_counter()
        for side in ("a", "b"):
            self.daemons.append(Daemon(side.upper(), self.cmd(side, "run"),
                                       self.area / f"{side}.log"))  # fmt: skip
        deadline = start + CONVERGE_TIMEOUT_S
        while True:
            st = self.status("b")
            if st is not None and st["local"]["files"] == n and st["peers"][0]["in_sync"]:
                sa = self.status("a")
                if sa is not None and sa["peers"][0]["in_sync"]:
                    break
            if time.perf_counter() > deadline:
                raise BenchError(f"B did not get all {n} files within {CONVERGE_TIMEOUT_S} s")
            for d in self.daemons:
                if d.proc.poll() is not None:
                    raise BenchError(f"{d.label}'s daemon exited {d.proc.returncode}; see {d.log}")
            time.sleep(0.5)
        took = time.perf_counter() - start
        self.r.note(f"in sync after {took:.1f} s; checking B's tree ...")
        self.check_tree(tree.files, self.area / "a", self.area / "b")
        self.rows.append((f"initial sync of {n} files ({tree.total_bytes / 2**20:.0f} MiB), "
                          "from launch until both report in sync", f"{took:.1f} s"))  # fmt: skip
        for d in self.daemons:
            self.rows.append((f"peak RSS, daemon {d.label}", f"{d.proc_status('VmHWM'):.1f} MiB"))
            self.rows.append((f"CPU, daemon {d.label}, initial sync", f"{d.cpu():.1f} s"))
        before = [d.cpu() for d in self.daemons]
        time.sleep(IDLE_S)  # measuring idleness itself: nothing to poll for
        for d, b in zip(self.daemons, before, strict=True):
            share = (d.cpu() - b) / IDLE_S * 100
            rss = d.proc_status("VmRSS")
            self.rows.append((f"CPU while idle, daemon {d.label} ({IDLE_S:g} s)", f"{share:.2f} %"))
            self.rows.append((f"RSS when idle, daemon {d.label}", f"{rss:.1f} MiB"))

    def check_tree(self, files: list[Path], a: Path, b: Path) -> None:
        missing = [p for p in files if not (b / p.relative_to(a)).is_file()
                   or (b / p.relative_to(a)).stat().st_size != p.stat().st_size]  # fmt: skip
        if missing:
            self.problems.append(f"{len(missing)} files missing or of the wrong size on B, "
                                 f"e.g. {missing[0].relative_to(a)}")  # fmt: skip

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()

    def render(self) -> str:
        lines = [
            "# repld daemons on a big tree: memory, time, CPU",
            "",
            f"- command: `{command_line()}`",
            f"- repld: `{self.exe}`{git_state()}",
            f"- file system: {self.fs}",
            f"- host: {host_line()}",
            "",
            "| measure | value |",
            "|---|---:|",
            *[f"| {k} | {v} |" for k, v in self.rows],
        ]
        return "\n".join(lines) + "\n" + problems_section(self.problems)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=100_000, help="small files on A (default 100k)")
    add_area_options(p)
    args = p.parse_args()
    made: list[MemoryBench] = []

    def make(area: Path, fs: str, runner: Runner) -> MemoryBench:
        made.append(MemoryBench(area, fs, runner, args))
        return made[0]

    return drive("memory", args, make, cleanup=lambda: [m.stop() for m in made])


if __name__ == "__main__":
    sys.exit(main())
