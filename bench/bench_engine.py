#!/usr/bin/env python3
"""Benchmark of repld's replica engine against the usual tools, in one run.

What it measures (wall time with ``time.perf_counter`` and the peak RSS of the child process and
its descendants, from ``os.wait4``):

a. ``repld init`` of a 100k-file tree (the first scan hashes every file) against
   ``find -type f -print0 | xargs -0 sha256sum`` on the same tree; the target is within 2x.
b. ``repld scan`` of that tree with nothing changed; the target is under 2 s. For scale,
   ``find -printf`` that stats every file is shown too.
c. ``repld scan`` after 1% of the files were touched (half of them also appended to).
d. A one-shot ``repld sync`` of a 10k-file tree into an empty replica against ``cp -a``,
   ``cp -a && sync``, ``rsync -a`` and a first ``unison`` run, each into a fresh empty directory;
   then the same for a tree of a few 64 MiB files against ``cp -a && sync`` and ``rsync -a``.
   Ratios are against rsync. repld flushes the file system (syncfs) before it records what it
   wrote, so ``cp -a && sync`` is its like-for-like comparison; ``cp -a`` and ``rsync -a`` only
   fill the page cache. Each sync is run ``--repeat`` times (3 by default), the tools taking
   turns (round r starts with the r-th tool), and a row gives the median of its runs (all of them
   in its notes): on a shared virtual machine one run in five or so takes up to twice as long,
   whichever tool it falls on, and a single run per tool made the ratio a draw.

Everything runs hot: ``sync`` runs before every measurement (plus after deleting the previous
tool's target) so one run's write-back does not land in the next one's timing, and then every
file of the tree the command reads is read once, untimed, right before it starts. A tree written
or read a few seconds earlier is not enough: the virtual machines this was written on page out
page-cache pages left untouched for about two seconds (DAMON proactive reclaim, see
``/sys/kernel/mm/damon``), so whichever tool ran right after another one read the same tree got
a hot cache and the one after a pause a half-cold one.

Why a loop device: the root file system of the machines this was written on is ext4 *without a
journal*; there, creating many files after deleting many is ~10x slower and erratic, which would
measure the file system rather than the tools. So by default the script makes a sparse image file,
formats it as ordinary journaled ext4 (``mkfs.ext4``'s defaults), loop-mounts it and runs
everything inside (configs and databases too); it unmounts and deletes it at the end. This needs
root. ``--no-loop DIR`` runs in a plain directory instead (no root needed).

The table goes to stdout and to ``bench/out/engine-<timestamp>.md``; every command run, its exit
status and the tail of its output go to the ``.log`` file next to it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    MIB,
    BenchError,
    Run,
    Runner,
    TreeInfo,
    add_area_options,
    build_large_tree,
    build_small_tree,
    cell,
    command_line,
    drive,
    find_repld,
    flush_fs,
    git_state,
    host_line,
    problems_section,
    q,
    tail,
    warm_tree,
)

SCAN_TARGET_S = 2.0
INIT_TARGET_RATIO = 2.0


# -- measuring ----------------------------------------------------------------------------------


@dataclass
class Row:
    case: str
    tool: str
    seconds: float
    rss_mib: float
    reference: bool = False
    notes: list[str] = field(default_factory=list)
    stdout: str = field(default="", repr=False)


# -- building the trees -------------------------------------------------------------------------


def change_some(tree: TreeInfo, fraction: float, seed: int) -> tuple[int, int]:
    """Touch ``fraction`` of the files (mtime +10 s); append a line to half of them.
    Returns (touched only, appended)."""
    rng = random.Random(seed)
    chosen = rng.sample(tree.files, max(1, round(len(tree.files) * fraction)))
    appended = 0
    for n, path in enumerate(chosen):
        if n % 2 == 0:
            with open(path, "ab") as f:
                f.write(b"appended by bench_engine\n")
            appended += 1
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))
    return len(chosen) - appended, appended


# -- the benchmark ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    small: int  # files in the tree that is synced
    big: int  # files in the tree that is scanned
    large_count: int
    large_size: int


class Bench:
    def __init__(self, area: Path, repld: Path, sizes: Sizes, seed: int, runner: Runner,
                 header: str, repeat: int = 3):  # fmt: skip
        self.area = area
        self.header = header
        self.repld = repld
        self.sizes = sizes
        self.seed = seed
        self.repeat = repeat
        self.r = runner
        self.rows: list[Row] = []
        self.problems: list[str] = []
        self.cfg_dir = area / "cfg"
        self.targets = area / "targets"
        self.cfg_dir.mkdir()
        self.targets.mkdir()

    def render(self) -> str:
        return self.header + "\n" + table(self.rows) + problems_section(self.problems)

    # -- helpers

    def repld_cmd(self, config: Path, *args: str) -> list[str]:
        return [str(self.repld), "--config", str(config), *args]

    def measure(self, case: str, tool: str, cmd: Sequence[str], *, reference: bool = False,
                env: dict[str, str] | None = None, warm: Path | None = None) -> Row:  # fmt: skip
        run = self.timed(case, tool, cmd, env=env, warm=warm)
        row = Row(case, tool, run.seconds, run.rss_mib, reference, stdout=run.stdout)
        self.rows.append(row)
        return row

    def timed(self, case: str, tool: str, cmd: Sequence[str], *,
              env: dict[str, str] | None = None, warm: Path | None = None) -> Run:  # fmt: skip
        flush_fs()
        if warm is not None:
            self.warm(warm)  # last, just before the command: see the module's docstring
        self.r.note(f"{case}: {tool} ...")
        run = self.r.run(cmd, env=env)
        self.r.note(f"{case}: {tool}: {run.seconds:.2f} s, {run.rss_mib:.1f} MiB")
        return run

    def taking_turns(self, case: str, tools: list[tuple[str, Callable[[int], Run]]],
                     reference: str) -> list[Row]:  # fmt: skip
        """Run each tool ``self.repeat`` times, round r starting with the r-th tool; one row
        per tool with the median time, the peak RSS of its runs, and every run in its notes."""
        runs: dict[str, list[Run]] = {name: [] for name, _ in tools}
        first = len(self.rows)  # these rows go before any a run adds (the sync with nothing to do)
        for r in range(self.repeat):
            k = r % len(tools)
            for name, run in tools[k:] + tools[:k]:
                runs[name].append(run(r))
        rows = []
        for name, _ in tools:
            got = runs[name]
            seconds = statistics.median(run.seconds for run in got)
            rss = max(run.rss_mib for run in got)
            row = Row(case, name, seconds, rss, name == reference, stdout=got[0].stdout)
            if len(got) > 1:
                each = ", ".join(f"{run.seconds:.2f}" for run in got)
                row.notes.append(f"median of {len(got)}: {each} s")
            rows.append(row)
        self.rows[first:first] = rows
        return rows

    def fresh_target(self, name: str) -> Path:
        """Delete every old target (and its flush), then return a path that does not exist."""
        for old in self.targets.iterdir():
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        flush_fs()
        return self.targets / name

    def verify(self, src: Path, dst: Path, tool: str) -> None:
        res = subprocess.run(["diff", "-rq", str(src), str(dst)], capture_output=True, text=True)
        if res.returncode != 0:
            msg = f"{tool}: target differs from source:\n{tail(res.stdout + res.stderr, 10)}"
            self.problems.append(msg)  # (listed under the table, as **copy differs**)
            self.r.note(msg)

    def warm(self, tree: Path) -> None:
        """An untimed read of every file, so every tool starts from the same hot cache."""
        warm_tree(tree)

    # -- cases

    def run_all(self) -> None:
        s = self.sizes
        src = self.area / "src"
        self.r.note(f"building {s.big} small files ...")
        big = build_small_tree(src / "tree100k", s.big, self.seed)
        self.r.note(f"building {s.small} small files ...")
        small = build_small_tree(src / "tree10k", s.small, self.seed + 1)
        self.r.note(f"building {s.large_count} files of {s.large_size / MIB:g} MiB ...")
        large = build_large_tree(src / "large", s.large_count, s.large_size, self.seed + 2)
        flush_fs()
        self.r.note(
            f"trees: {len(big.files)} files / {big.dirs} dirs / {big.total_bytes / MIB:.1f} MiB; "
            f"{len(small.files)} files / {small.dirs} dirs / {small.total_bytes / MIB:.1f} MiB; "
            f"{len(large.files)} x {s.large_size / MIB:g} MiB"
        )
        self.case_init_and_scan(big)
        self.case_sync_small(small)
        self.case_sync_large(large)

    def case_init_and_scan(self, tree: TreeInfo) -> None:
        n = len(tree.files)
        label = _count(n)
        case = f"a. first scan, {label} files"
        ref = self.measure(case, "find | xargs sha256sum",
                           ["sh", "-c", f"find {q(tree.root)} -type f -print0 "
                                        f"| xargs -0 sha256sum > /dev/null"],
                           reference=True, warm=tree.root)  # fmt: skip
        config = self.cfg_dir / "scan.toml"
        row = self.measure(case, "repld init", self.repld_cmd(config, "init", str(tree.root),
                                                              "--name", "scan"),
                           warm=tree.root)  # fmt: skip
        ratio = row.seconds / ref.seconds
        row.notes.append(f"{n / row.seconds:,.0f} files/s; target <= {INIT_TARGET_RATIO:g}x: "
                         + ("met" if ratio <= INIT_TARGET_RATIO else "**missed**"))  # fmt: skip

        case = f"b. rescan, nothing changed, {label} files"
        self.measure(case, "find -printf (stat each)",
                     ["sh", "-c", f"find {q(tree.root)} -printf '%s %T@\\n' > /dev/null"],
                     reference=True, warm=tree.root)  # fmt: skip
        row = self.measure(case, "repld scan", self.repld_cmd(config, "scan"), warm=tree.root)
        events = _summary(row.stdout)
        row.notes.append(f"target < {SCAN_TARGET_S:g} s: "
                         + ("met" if row.seconds < SCAN_TARGET_S else "**missed**"))  # fmt: skip
        if events and not events.endswith(": 0 created, 0 updated, 0 deleted (0 B hashed)"):
            self.problems.append(f"scan of an unchanged tree recorded changes: {events}")
            row.notes.append(f"**{events}**")

        touched, appended = change_some(tree, 0.01, self.seed + 3)
        case = f"c. rescan, 1% changed ({touched} touched, {appended} appended)"
        row = self.measure(case, "repld scan", self.repld_cmd(config, "scan"), warm=tree.root)
        row.notes.append(_summary(row.stdout))

    def sync_repld(self, case: str, tree: TreeInfo, tag: str) -> Callable[[int], Run]:
        """A run of: replica A on ``tree`` (made by the first run), a new replica B on a fresh
        empty directory, A's sync into B timed; the first run also times a second sync, with
        nothing to do."""
        a_cfg = self.cfg_dir / f"{tag}-a.toml"

        def run(r: int) -> Run:
            if r == 0:
                self.r.untimed(self.repld_cmd(a_cfg, "init", str(tree.root), "--name", "a"))
            tree_id = _json_field(self.r.untimed(self.repld_cmd(a_cfg, "id", "--json")),
                                  "tree_id")  # fmt: skip
            b_cfg = self.cfg_dir / f"{tag}{r}-b.toml"
            dst = self.fresh_target(f"repld-{tag}")
            dst.mkdir()
            self.r.untimed(self.repld_cmd(b_cfg, "init", str(dst), "--name", "b",
                                          "--tree-id", tree_id))  # fmt: skip
            done = self.timed(case, "repld sync", self.repld_cmd(a_cfg, "sync", str(b_cfg)),
                              warm=tree.root)  # fmt: skip
            self.verify(tree.root, dst, "repld sync")
            if r == 0:  # A second sync with nothing to do: cheap, and worth knowing.
                again = self.measure(f"{case} (again, nothing to do)", "repld sync",
                                     self.repld_cmd(a_cfg, "sync", str(b_cfg)),
                                     warm=tree.root)  # fmt: skip
                again.notes.append("both sides rescanned")
            return done

        return run

    def copying(self, case: str, tree: TreeInfo, tool: str, script: str, name: str, *,
                mkdir: bool = False, env: dict[str, str] | None = None,
                before: Callable[[], None] | None = None) -> Callable[[int], Run]:  # fmt: skip
        """A run of ``script`` (``{src}`` and ``{dst}`` in it: the tree and a fresh target)."""

        def run(r: int) -> Run:
            dst = self.fresh_target(name)
            if mkdir:
                dst.mkdir()
            if before is not None:
                before()
            cmd = ["sh", "-c", script.format(src=q(tree.root), dst=q(dst))]
            done = self.timed(case, tool, cmd, env=env, warm=tree.root)
            self.verify(tree.root, dst, tool)
            return done

        return run

    def case_sync_small(self, tree: TreeInfo) -> None:
        case = f"d. sync {_count(len(tree.files))} files into empty replica"
        home = self.area / "unison-home"

        def fresh_home() -> None:  # a first run each time: no archive from an earlier one
            shutil.rmtree(home, ignore_errors=True)
            home.mkdir()

        env = {**os.environ, "HOME": str(home), "UNISON": str(home / ".unison")}
        rows = self.taking_turns(case, [
            ("repld sync", self.sync_repld(case, tree, "small")),
            ("cp -a", self.copying(case, tree, "cp -a", "cp -a {src} {dst}", "cp")),
            ("cp -a && sync", self.copying(case, tree, "cp -a && sync",
                                           "cp -a {src} {dst} && sync", "cp-sync")),
            ("rsync -a", self.copying(case, tree, "rsync -a", "rsync -a {src}/ {dst}/", "rsync")),
            ("unison (first run)", self.copying(
                case, tree, "unison (first run)", "unison {src} {dst} -batch -auto -silent",
                "unison", mkdir=True, env=env, before=fresh_home)),
        ], reference="rsync -a")  # fmt: skip
        for row in rows:
            row.notes.append(f"{len(tree.files) / row.seconds:,.0f} files/s")
        self.fresh_target("none")

    def case_sync_large(self, tree: TreeInfo) -> None:
        s = self.sizes
        case = f"e. sync {s.large_count} x {s.large_size / MIB:g} MiB into empty replica"
        rows = self.taking_turns(case, [
            ("repld sync", self.sync_repld(case, tree, "large")),
            ("cp -a && sync", self.copying(case, tree, "cp -a && sync",
                                           "cp -a {src} {dst} && sync", "cp-sync")),
            ("rsync -a", self.copying(case, tree, "rsync -a", "rsync -a {src}/ {dst}/", "rsync")),
        ], reference="rsync -a")  # fmt: skip
        for row in rows:
            row.notes.append(f"{tree.total_bytes / MIB / row.seconds:,.0f} MiB/s")
        self.fresh_target("none")


def _count(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def _summary(stdout: str) -> str:
    """The last line of a repld scan's output: 'NAME: N created, N updated, N deleted (...)'."""
    lines = stdout.strip().splitlines()
    return lines[-1] if lines else ""


def _json_field(text: str, key: str) -> str:
    value = json.loads(text)[key]
    if not isinstance(value, str):
        raise BenchError(f"`repld id --json` gave a {type(value).__name__} for {key}")
    return value


# -- the report ---------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    refs: dict[str, Row] = {}
    for row in rows:
        if row.reference:
            refs[row.case] = row
    out = [
        "| case | tool | seconds | peak RSS MiB | ratio vs reference | notes |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        ref = refs.get(row.case)
        if row.reference:
            ratio = "1.00 (ref)"
        elif ref is not None:
            ratio = f"{row.seconds / ref.seconds:.2f}"
        else:
            ratio = "—"
        notes = cell("; ".join(n for n in row.notes if n))
        case, tool = cell(row.case), cell(row.tool)
        out.append(f"| {case} | {tool} | {row.seconds:.2f} | {row.rss_mib:.1f} | "
                   f"{ratio} | {notes} |")  # fmt: skip
    return "\n".join(out) + "\n"


def header(args: argparse.Namespace, repld: Path, fs: str, runner: Runner) -> str:
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    return (
        f"# repld engine benchmark, {now}\n\n"
        f"- command: `{command_line()}`\n"
        f"- repld: `{repld}`{git_state()}\n"
        f"- file system: {fs}\n"
        f"- host: {host_line()}\n"
        f"- sizes: {'--quick (1/10)' if args.quick else 'full'}; hot cache; `sync` before each "
        f"measurement; the syncs (d, e): the median of {args.repeat} runs, the tools taking "
        f"turns; the rest: one run per row\n"
        f"- peak RSS: "
        + (
            "the command and its descendants, measured by GNU time (%M) around it\n"
            if runner.gnu_time
            else "os.wait4 rusage (no GNU time): includes this script's own RSS, an upper bound\n"
        )
    )


# -- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Run as root (for the loop device): sudo .venv/bin/python bench/bench_engine.py",
    )
    p.add_argument("--quick", action="store_true",
                   help="1/10 of every size (1k/10k small files, 6.4 MiB large files)")  # fmt: skip
    p.add_argument("--large-count", type=int, default=4, help="number of large files (default 4)")
    p.add_argument("--large-mib", type=float, default=64, help="size of each large file (64)")
    p.add_argument("--repeat", type=int, default=3, metavar="N",
                   help="runs of each sync (d, e), the tools taking turns; a row gives the "
                   "median (default 3)")  # fmt: skip
    add_area_options(p)
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat {args.repeat}: at least 1 run")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    scale = 10 if args.quick else 1
    sizes = Sizes(
        small=10_000 // scale,
        big=100_000 // scale,
        large_count=args.large_count,
        large_size=int(args.large_mib * MIB / scale),
    )

    def make(area: Path, fs: str, runner: Runner) -> Bench:
        repld = find_repld(args.repld)
        return Bench(area, repld, sizes, args.seed, runner, header(args, repld, fs, runner),
                     repeat=args.repeat)

    return drive("engine", args, make)


if __name__ == "__main__":
    sys.exit(main())
