"""The ``repld`` command line. Every error ends here as one message and an exit code:
0 ok, 1 failure, 2 usage or configuration error, 3 daemon not running."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import re
import shlex
import socket
import sqlite3
import stat
import sys
import threading
import time
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..protocol.errors import ReplError
from ..protocol.plan import Op
from ..protocol.record import check_path, escape, escape_note, unescape
from ..protocol.version import VersionVector, short_id
from . import config as configmod
from . import control
from .applier import ApplyStats
from .diskio import human_size as _human
from .errors import (
    NOT_REPLICATED,
    ConfigError,
    DaemonNotRunning,
    DamagedDatabase,
    StoreBusy,
    UsageError,
)
from .ignore import IGNORE_FILE
from .localsync import Direction, SyncReport, sync
from .logfmt import one_line
from .replica import (
    Replica,
    init,
    list_conflicts,
    load_keys,
    open_replica,
    original_of,
    rejoin,
)
from .scanner import ScanStats
from .versions import Version, expire

if TYPE_CHECKING:
    from .prune import PruneReport

log = logging.getLogger("repld")

EPILOG = """\
examples:
  repld init ~/                          make this home directory a replica (a new tree)
  repld id                               what a peer needs to admit this replica
  repld peer add desktop tcp://desktop.lan:7437 KEY
                                         admit a peer (run the same on the other side)
  repld run                              the daemon: watch, sync with every peer it reaches
  repld status                           ask the daemon how it is doing
  repld --config /media/usb/repld.toml init /media/usb/home --tree-id ID
                                         a second replica of the same tree, on a USB disk
  repld sync /media/usb/repld.toml -n    show what a sync would do, change nothing
  repld sync /media/usb/repld.toml       bring both replicas in sync
  repld sync desktop -n                  what one exchange with peer desktop would bring
                                         (with this replica's daemon stopped)
  repld log Documents/report.odt         where each version of a file came from
  repld conflicts                        conflicting edits kept side by side
  repld versions Documents               files a peer's change deleted or replaced here, kept 30 days
  repld export /media/usb/x.bundle --since desktop
                                         changes desktop lacks, as a file to carry there
  repld import /media/usb/x.bundle       apply a bundle another replica exported

The config file is $REPLD_CONFIG, else $XDG_CONFIG_HOME/repld/config.toml; --config chooses
another, so several replicas can live on one machine. Exit codes: 0 ok, 1 failure,
2 usage or configuration error, 3 daemon not running.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse counts an optional `PATH ...` among the missing arguments; it is not.
        message = message.replace(", PATH", "")
        self.print_usage(sys.stderr)
        print(f"repld: {message}", file=sys.stderr)
        raise SystemExit(2)


PEER_ADD_TEXT = """\
Admit a peer: only replicas whose public key is listed may connect, and this
replica dials the endpoint given. `repld id` on the peer prints the exact line
to run here; run the same on the peer for this replica. A running daemon takes
the new peer at once. A peer added again under its name with the same key has
moved: only its endpoint changes.

Put the key in single quotes: Z85 keys hold characters such as $, ! and & that
the shell would otherwise take for its own, e.g.
  repld peer add desktop tcp://desktop.lan:7437 'rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7'
"""


STATUS_TEXT = """\
Ask the running daemon how it is doing; exit 3 if none runs for this config.

The text form says the state (starting, scanning, idle, syncing, paused, error),
the tree's size, each peer (connected, last seen, what it still needs), the
conflicts, deletions held back by the circuit breaker, and each path that could
not be synced, with why.

--json prints one object: state, local {files, dirs, bytes, sequence},
conflicts, deletes_held, errors [{path, error}], peers [{name, replica_id,
endpoint, connected, last_seen, need_files, need_bytes, peer_need_files,
in_sync, error}], refused [{key, count, last}], transfer {...}, pid, watching,
unwatched_dirs. README ("Status") says what each means.

Examples:
  repld status
  repld status --json | jq '.peers[] | {name, in_sync}'
"""


def _global_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--config and --debug after the command too (`repld status --config X`), as users type
    them; given before it, they are kept (SUPPRESS: no default to override them with)."""
    p.add_argument("--config", type=Path, metavar="FILE", default=argparse.SUPPRESS,
                   help="the replica's config file (also before the command)")  # fmt: skip
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="log debugging detail to stderr")  # fmt: skip
    return p


LISTED = 20  # files gone from the disk that `export` lists one by one, without -v


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from ..protocol.messages import WIRE_VERSION

    try:
        mine = version("repld")
    except PackageNotFoundError:
        mine = "(not installed)"
    return f"repld {mine}, wire protocol {WIRE_VERSION}"


class _Version(argparse.Action):
    """--version, looked up only when asked for (a lookup costs every command some time)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(_version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="repld",
        description="Keep a directory tree identical on every machine you use, peer to peer.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="the replica's config file")
    p.add_argument("--debug", action="store_true", help="log debugging detail to stderr")
    p.add_argument("--version", action=_Version, nargs=0,
                   help="the version of repld, and of its wire protocol (peers must share it)")  # fmt: skip
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def cmd(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        return _global_options(sub.add_parser(
            name, help=help, description=description or help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        ))  # fmt: skip

    c = cmd(
        "init",
        "make ROOT a replica: write the config, make keys, record every file",
        "Make ROOT a replica: write the config file, make a CurveZMQ key pair, create the "
        "database and record every existing file as created here. Without --tree-id this "
        "starts a new tree; to add a replica to an existing tree, pass the tree id that "
        "`repld id` prints on a replica of it (files already in ROOT are then adopted: at the "
        "first sync the same content merges, an old copy of what the tree deleted is deleted, "
        "and different content is kept beside the tree's version).",
    )
    c.add_argument("root", type=Path, metavar="ROOT",
                   help="the directory to replicate (it must exist), e.g. ~")  # fmt: skip
    c.add_argument("--name", help="this replica's name (default: the host name; for a second "
                   "replica on this machine, the host name and the root's name)")
    c.add_argument("--listen", metavar="ENDPOINT", help="default tcp://0.0.0.0:7437")
    c.add_argument("--tree-id", metavar="ID", help="join this existing tree")
    c.add_argument("--state", type=Path, metavar="DIR",
                   help="where the database and keys live (default: ~/.local/state/repld for "
                        "the default config, else NAME.state beside a config NAME.toml)")  # fmt: skip
    c.add_argument("--force", action="store_true",
                   help="even if ROOT is already another replica's root (noted there by its "
                        "init), whose config still exists")  # fmt: skip
    c.add_argument("--json", action="store_true", help="print the new replica's identity as JSON")

    c = cmd("id", "print this replica's identity: ids, public key, endpoint")
    c.add_argument("--json", action="store_true", help="as JSON, for scripts")

    c = cmd("peer", "add, list or remove peers (stored in the config file)")
    psub = c.add_subparsers(dest="peer_command", metavar="ACTION", parser_class=_Parser)
    psub.required = True
    a = psub.add_parser(
        "add",
        help="admit a peer: NAME ENDPOINT PUBLIC_KEY (from its `repld id`)",
        description=PEER_ADD_TEXT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a.add_argument("name", help="what to call the peer here (letters, digits, '.', '_', '-')")
    a.add_argument("endpoint", help="tcp://HOST:PORT")
    a.add_argument("public_key", help="the 40-character key that `repld id` prints on the peer")
    _global_options(a)
    a = _global_options(psub.add_parser(
        "list", help="list peers",
        description="List the peers in the config: name, endpoint and public key, one a line "
                    "(--json: a list of objects with those three fields). `repld status` says "
                    "how each one is doing."))  # fmt: skip
    a.add_argument("--json", action="store_true", help="as JSON, for scripts")
    a = _global_options(psub.add_parser(
        "remove", help="forget a peer (a running daemon drops it at once)",
        description="Take a peer off the config: its key is no longer admitted and it is no "
                    "longer dialled (a running daemon drops it at once, and tells it so). To "
                    "give a peer that moved its new address, `repld peer add` it again with the "
                    "same key instead."))  # fmt: skip
    a.add_argument("name", help="the peer's name, as `repld peer list` shows it")

    cmd(
        "run",
        "the daemon, in the foreground: watch the tree, sync with every peer it can reach",
        "Run the daemon in the foreground (what systemd starts). It scans the tree, watches it "
        "with inotify, listens on the config's `listen` endpoint and dials every [[peer]]; "
        "changes go both ways as soon as they are seen. SIGTERM or Ctrl-C stops it; SIGHUP "
        "reloads the config (peers, ignore rules). Logs go to stderr (--debug for detail).",
    )
    c = cmd("status", "ask the running daemon how it is doing (exit 3 if it is not running)",
            STATUS_TEXT)
    c.add_argument("--json", action="store_true",
                   help="the machine-readable form scripts use (its fields: above)")  # fmt: skip
    cmd("pause", "tell the daemon to stop recording local changes and applying its peers' "
                 "changes until resumed (it still answers peers' requests for content)")
    cmd("resume", "tell a paused daemon to carry on (it rescans first)")
    cmd("rescan", "tell the daemon to scan the whole tree now")

    c = cmd(
        "scan",
        "record what changed on disk since the last scan",
        "Compare the tree with the database and record one event per changed path. "
        "With PATHs, scan only those (and what is below them). A file is read only if its "
        "size, mtime, mode or inode changed, or its ctime moved since it was last read (an "
        "edit that kept size and mtime moves it); --full reads every file. If the daemon "
        "runs, it is asked to scan instead.",
    )
    c.add_argument("-v", "--verbose", action="store_true", help="print each change")
    c.add_argument(
        "--full",
        action="store_true",
        help="read and hash every file, also those whose stat did not change (finds what "
        "nothing on disk shows, such as a disk's silent corruption; slow: the whole tree is "
        "read)",
    )
    c.add_argument(
        "--accept-root",
        action="store_true",
        help="take the directory now at the root as this replica's tree, after it was replaced "
        "(restored from a backup, say): files missing from it count as deleted",
    )
    c.add_argument(
        "--accept-deletes",
        action="store_true",
        help="record the deletions even if more than half of the tree is gone at once (the "
        "circuit breaker holds such a scan back: an rm -rf in the wrong place would empty "
        "every replica)",
    )
    c.add_argument("paths", nargs="*", metavar="PATH")

    c = cmd(
        "sync",
        "sync with a peer or another replica now (TARGET: a peer name or a config file)",
        "Bring this replica and TARGET in sync once: changes go both ways, newer versions "
        "replace older ones, concurrent edits are conflicts that keep both versions.\n\n"
        "TARGET is either a configured peer's name (one exchange over the network; the peer's "
        "daemon must be running) or the config file of another replica on this machine (for "
        "instance on a USB disk). PATHs limit the sync to those subtrees. If this replica's "
        "daemon is running, `repld sync PEER` asks it to sync now and waits until it is in "
        "sync; the options (--dry-run, --pull-only, --push-only, --prefer, PATHs) are for an "
        "exchange of the command's own, and a sync with a replica on this machine always is: "
        "those need this replica's daemon stopped (`repld status` shows what the daemon does).",
    )
    c.add_argument("target", metavar="TARGET")
    c.add_argument("-n", "--dry-run", action="store_true", help="print the plan, change nothing")
    d = c.add_mutually_exclusive_group()
    d.add_argument("--pull-only", action="store_true", help="change only this replica")
    d.add_argument("--push-only", action="store_true", help="change only the target replica")
    c.add_argument("--prefer", choices=["local", "remote"],
                   help="settle conflicts for this side (local) or the target (remote); "
                        "without it, each side's conflict_policy applies")  # fmt: skip
    c.add_argument("-v", "--verbose", action="store_true", help="print each action")
    c.add_argument("paths", nargs="*", metavar="PATH",
                   help="only these subtrees (relative to the current directory inside the "
                        "tree, else to its root)")  # fmt: skip

    c = cmd("log", "the history of PATH: each event, which replica made it, when")
    c.add_argument("path", metavar="PATH", help="a file, directory or symlink of the tree")
    c.add_argument("--json", action="store_true", help="as JSON, for scripts")

    c = cmd("conflicts", "list conflict copies waiting for a decision")
    c.add_argument("--json", action="store_true", help="as JSON, for scripts")

    c = cmd(
        "resolve",
        "settle a conflict: keep the local version, the other one, or both",
        "PATH is the file or its conflict copy. --keep local keeps this replica's version (the "
        "file at the name, or the conflict copy when it holds this replica's losing edit: "
        "`repld conflicts` marks those '(this replica)') and removes the other; --keep remote "
        "keeps the other replica's version; --keep both renames the copy to NAME.<replica>.EXT "
        "so both stay as ordinary files. The decision is recorded as ordinary changes, so every "
        "replica follows it (with the daemon running, the daemon records it). On a replica "
        "that made neither version (it relayed a conflict between two others), name the copy "
        "to keep: `repld resolve COPY --keep remote`.",
    )
    c.add_argument("path", metavar="PATH", help="the file, or one of its conflict copies")
    c.add_argument("--keep", required=True, choices=["local", "remote", "both"],
                   help="local: this replica's version; remote: the other one; both: keep "
                        "both as ordinary files")  # fmt: skip

    c = cmd(
        "versions",
        "list the files another replica's change deleted or replaced here, kept for a while",
        "Before a change from another replica removes a file here (a deletion, a file replaced "
        "by a directory or a symlink; with keep_versions = \"all\" also a newer version written "
        "over it), "
        "the file is kept in STATE/versions/ under its path, with the time in its name, for "
        "keep_versions_days (30 by default). This lists them, newest first, with where each "
        "is. --restore copies the newest version of each PATH back to its place (never over "
        "anything there), or copy one by hand: the next scan records it as an edit and every "
        "replica gets it. --delete deletes them (room on a full disk). Nothing of this "
        "replica's own changes is kept (those were yours to make here), but for an edit that "
        "loses a conflict with no conflict copy (--prefer, conflict_policy newest).",
    )
    c.add_argument("paths", nargs="*", metavar="PATH",
                   help="only versions of this file, or of files under this directory")  # fmt: skip
    c.add_argument("--restore", action="store_true",
                   help="copy the newest version of each PATH back to its place, where nothing "
                        "is now; for a directory PATH, the files and symlinks its newest "
                        "removal took (an `rm -rf` elsewhere), not those removed before it")  # fmt: skip
    c.add_argument("--all", action="store_true",
                   help="with --restore of a directory: every file ever removed from it (the "
                        "newest version of each), older removals too")  # fmt: skip
    c.add_argument("--delete", action="store_true",
                   help="delete the versions listed (of each PATH, or every one): room on a full "
                        "disk, before keep_versions_days would")  # fmt: skip
    c.add_argument("--json", action="store_true", help="as JSON, for scripts")

    cmd("dump", "print the database as text, one escaped line per record")

    c = cmd(
        "rejoin",
        "give this replica a new database, as if it joined its tree anew (after a restore)",
        "For a replica whose state directory was restored from an older backup, or copied from "
        "another machine: its peers have seen more of its records than its database holds "
        "(the daemon says so and exchanges nothing). The database is moved aside (kept as "
        "repld.db.before-rejoin-DATE), the config and the keys stay (peers need no telling), "
        "and a first scan adopts every file in the root as a joining replica does: at the next "
        "sync each one is checked against the tree, what the tree has newer comes in, what it "
        "deleted goes, and anything of this replica's that differs is kept as a conflict copy. "
        "Run it with the daemon stopped. A replica whose state directory was deleted (no "
        "database at all) rejoins with --tree-id: the config and its peers stay, a new key "
        "pair is made if the old one is gone (peers must then be given the new public key).",
    )
    c.add_argument("--tree-id", metavar="ID",
                   help="the tree's id (`repld id` on another replica), when the database is "
                   "gone")  # fmt: skip

    c = cmd(
        "prune",
        "drop the tombstones every replica has seen; say which replicas hold the rest back",
        "Tombstones (the records of deleted paths) are what keeps a deletion from coming back "
        "from a replica that has not seen it. This drops those every other replica this one "
        "knows of has provably seen (with the history of their paths), and the events of "
        "files' histories every one of them has seen a later event of, and lists, for each "
        "replica, how many of the rest it has seen: a replica this one synced with (as a daemon "
        "peer, by `repld sync` or by a bundle) has acknowledged them up to a point; one never "
        "synced with directly (the far end of a chain) is counted as the replicas between say; "
        "of one it knows only from its edits, or a peer it has not met yet, that no one has "
        "told of, it cannot tell, and then none is dropped. A replica never heard of here (one "
        "that never changed anything and never synced with this one) could at worst bring a "
        "deleted file back, never lose one. With the daemon running, it asks "
        "the daemon to drop them. The daemon also prunes by itself, after each periodic scan, "
        "the tombstones of deletions older than prune_after_days (30) in the config.",
    )
    c.add_argument("-n", "--dry-run", action="store_true",
                   help="say what would be dropped, drop nothing")  # fmt: skip
    c.add_argument("--forget", action="append", default=[], metavar="REPLICA",
                   help="stop waiting for REPLICA (a name or id as the list shows it), a replica "
                   "gone for good (a machine sold or wiped): it holds no tombstone back from "
                   "now on. Remove it as a peer first if it is one. Should it sync again, it "
                   "counts again; at worst it brings back files deleted since. Repeatable")  # fmt: skip
    c.add_argument("--json", action="store_true", help="as JSON, for scripts")

    c = cmd(
        "export",
        "write changes to a bundle file, for a replica no network reaches",
        "Write this replica's changes, with the content of every file they need, to FILE: "
        "everything, or with --since PEER only what PEER has not acknowledged yet (what it got "
        "from syncs and bundles before). Carry FILE over (a USB stick, mail) and run `repld "
        "import FILE` on a replica of the same tree there. The bundle is written under a "
        "temporary name and renamed when complete; it holds file content, so it is made "
        "readable by you only. Works while the daemon runs (it exports what the daemon has "
        "recorded); otherwise it scans first.",
    )
    c.add_argument("file", type=Path, metavar="FILE")
    c.add_argument("--since", metavar="PEER",
                   help="only changes PEER has not acknowledged (a peer name from `repld peer "
                   "list`, or the name of a replica synced with before)")  # fmt: skip
    c.add_argument("--force", action="store_true",
                   help="replace FILE even when it holds another replica's bundle (without "
                   "it, only this replica's own earlier bundle is replaced)")  # fmt: skip
    c.add_argument("-v", "--verbose", action="store_true",
                   help=f"list every file left out (else the first {LISTED} gone from the "
                   "disk)")  # fmt: skip

    c = cmd(
        "import",
        "apply a bundle file written by `repld export` on another replica",
        "Apply the changes in FILE as a sync from the replica that exported it would: newer "
        "versions replace older ones, concurrent edits become conflicts that keep both "
        "versions, nothing is overwritten that changed here since the last scan. Importing the "
        "same bundle twice changes nothing the second time. The daemon must be stopped "
        "(`systemctl --user stop repld`), as for a sync with a local replica.",
    )
    c.add_argument("file", type=Path, metavar="FILE")
    c.add_argument("-n", "--dry-run", action="store_true", help="print the plan, change nothing")
    c.add_argument("--prefer", choices=["local", "remote"],
                   help="settle conflicts for this replica (local) or the bundle's (remote); "
                        "without it, the config's conflict_policy applies")  # fmt: skip
    c.add_argument("-v", "--verbose", action="store_true", help="print each action")
    return p


# -- helpers ------------------------------------------------------------------------------------


def _fmt_time(ns: int) -> str:
    return control.iso_time(ns / 1e9) if ns else "-"


class Progress:
    """A one-line progress display on stderr, only when stderr is a terminal."""

    def __init__(self, what: str):
        self.what = what
        self.on = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, stats: Any) -> None:
        if not self.on or time.monotonic() - self.last < 0.25:
            return
        self.last = time.monotonic()
        if isinstance(stats, str):
            text = stats
        elif isinstance(stats, ScanStats):
            text = f"{stats.files} files seen, {stats.events} changes, {_human(stats.hashed_bytes)} hashed"
        else:
            text = f"{stats.written} files written ({_human(stats.written_bytes)}), {stats.deleted} deleted"
        print(f"\r{self.what}: {text}\x1b[K", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.on and self.last:
            print("\r\x1b[K", end="", file=sys.stderr, flush=True)


def _config_path(args: argparse.Namespace) -> Path:
    return args.config or configmod.default_config_path()


_UNENCODABLE = re.compile("[\ud800-\udfff]")


def _print_json(obj: Any) -> None:
    """``obj`` as JSON in UTF-8. A name that is not valid UTF-8 holds its undecodable bytes as
    lone surrogates (U+DC80-U+DCFF, Python's surrogateescape): they are written as \\udcXX
    escapes, so the output stays valid UTF-8 and a reader gets the same string back."""
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    print(_UNENCODABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text))


def _scan_summary(name: str, st: ScanStats) -> str:
    return (
        f"{name}: {st.created} created, {st.updated} updated, {st.deleted} deleted "
        f"({_human(st.hashed_bytes)} hashed)"
    )


# -- commands -----------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    progress = Progress("first scan")
    t0 = time.monotonic()
    ignore_file = args.root.expanduser() / IGNORE_FILE
    had_ignore = ignore_file.exists()
    cfg, stats = init(
        _config_path(args), args.root, name=args.name, listen=args.listen,
        tree_id=args.tree_id, state=args.state, progress=progress, force=args.force,
    )  # fmt: skip
    progress.done()
    with Replica(cfg, write=False) as rep:
        ident = _identity(rep)
    if args.json:
        _print_json({**ident, "config": str(cfg.path), "root": str(cfg.root),
                     "state": str(cfg.state), "files": stats.files})  # fmt: skip
        return 0
    print(f"replica {cfg.name} ({short_id(ident['replica_id'])}) of tree {ident['tree_id']}")
    print(f"root:   {cfg.root}")
    print(f"config: {cfg.path}")
    print(f"state:  {cfg.state}")
    if not had_ignore and ignore_file.exists():
        print(f"wrote {ignore_file}: the default ignore rules for a home directory (caches, "
              "trash, swap and lock files, __pycache__, node_modules); edit it to taste, it is "
              "replicated")  # fmt: skip
    took = f"({_human(stats.hashed_bytes)}) in {time.monotonic() - t0:.1f} s"
    if args.tree_id and stats.created:
        print(f"adopted {stats.created} paths found in the root {took}: at the first sync, those "
              "with the tree's content merge quietly, those the tree deleted since are deleted "
              "if unchanged, and those that differ are kept beside the tree's version as "
              "conflict copies; nothing is lost")  # fmt: skip
    else:
        print(f"recorded {stats.created} paths {took}")
    for path, err in stats.errors:
        print(f"warning: {escape(path)}: {err}", file=sys.stderr)
    _print_skipped(stats.skipped)
    print(f"public key: {ident['public_key']}")
    print("To add a replica of this tree elsewhere: repld init ROOT --tree-id " + ident["tree_id"])
    return 0


def _identity(rep: Replica) -> dict[str, Any]:
    keys = load_keys(rep.cfg, public_only=True)
    return {
        "replica_id": rep.store.replica_id,
        "name": rep.cfg.name,
        "tree_id": rep.store.tree_id,
        "public_key": keys.public,
        "endpoint": rep.cfg.listen,
    }


def cmd_id(args: argparse.Namespace) -> int:
    with open_replica(args.config, write=False) as rep:
        ident = _identity(rep)
    if args.json:
        _print_json(ident)
    else:
        for k, v in ident.items():
            print(f"{k + ':':12} {v}")
        endpoint = str(ident["endpoint"])
        dial = _dialable(endpoint)
        print()
        if dial != endpoint:
            print(f"(this replica listens on {endpoint}, every address of this machine: "
                  f"{dial.split('//')[1].rsplit(':', 1)[0]} below is its host name; any address "
                  "the peer can reach will do)")  # fmt: skip
        print(f"to admit this replica on a peer (keep the single quotes):\n"
              f"  repld peer add {ident['name']} {dial} '{ident['public_key']}'")  # fmt: skip
    return 0


def _dialable(endpoint: str) -> str:
    """The endpoint a peer would dial: a wildcard listen address becomes this host's name."""
    m = configmod.ENDPOINT_RE.match(endpoint)
    if m is None or m.group(1) not in ("*", "0.0.0.0", "[::]"):
        return endpoint
    return f"tcp://{socket.gethostname()}:{m.group(2)}"


def cmd_peer(args: argparse.Namespace) -> int:
    cfg = configmod.load(args.config, need_root=False)
    if args.peer_command == "list":
        if args.json:
            _print_json([{"name": p.name, "endpoint": p.endpoint, "public_key": p.public_key}
                         for p in cfg.peers])  # fmt: skip
        elif not cfg.peers:
            print("no peers; add one with: repld peer add NAME tcp://HOST:PORT PUBLIC_KEY")
        else:
            for p in cfg.peers:
                print(f"{p.name:16} {p.endpoint:32} {p.public_key}")
        return 0
    if args.peer_command == "add":
        try:
            name = configmod.check_name(args.name)
            endpoint = configmod.check_endpoint(args.endpoint)
            key = configmod.check_public_key(args.public_key)
        except ConfigError as e:  # a mistake on the command line, not in the config file
            raise UsageError(f"peer add: {str(e).split(': ', 1)[1]}") from None
        if key == load_keys(cfg, public_only=True).public:
            raise UsageError(
                "that public key is this replica's own (`repld id` here prints it); give the "
                "key that `repld id` prints on the other machine"
            )
        if (known := cfg.peer(name)) is not None and known.public_key == key:
            # The same peer at another address (a laptop on another network, a new port).
            if known.endpoint == endpoint:
                print(f"peer {name} is at {endpoint} already: nothing changed")
                return 0
            configmod.set_peer_endpoint(cfg, name, endpoint)
            print(f"peer {name}: its endpoint is now {endpoint} (was {known.endpoint})")
            _hint_reload(cfg)
            return 0
        if known is not None:
            raise UsageError(
                f"a peer named {name!r} exists already, with another public key; if that "
                f"machine was set up anew, `repld peer remove {name}` first, then add it"
            )
        if name == cfg.name:
            raise UsageError(
                f"{name!r} is this replica's own name (`name` in {cfg.path}): call the peer "
                f"something else here, e.g. `repld peer add {name}-2 ...` (the name is only "
                "how this replica calls it); two replicas of one name make logs hard to read, "
                "so renaming one of them (its `name`) is better still"
            )
        if any(p.public_key == key for p in cfg.peers):
            other = next(p.name for p in cfg.peers if p.public_key == key)
            raise UsageError(f"that public key is peer {other!r} already")
        configmod.add_peer(cfg, configmod.Peer(name, endpoint, key))
        print(f"added peer {name} at {endpoint}")
        if (host := _unresolved_host(endpoint)) is not None:
            print(f"note: the name {host} does not resolve here now: a typo, or a name known "
                  "only on another network (the daemon keeps trying it)", file=sys.stderr)  # fmt: skip
        _hint_reload(cfg)
        return 0
    if not cfg.peer(args.name):
        known = ", ".join(p.name for p in cfg.peers) or "none"
        raise UsageError(f"no peer named {args.name!r} in {cfg.path} (peers: {known})")
    configmod.remove_peer(cfg, args.name)
    print(f"removed peer {args.name}")
    _hint_reload(cfg)
    return 0


def _unresolved_host(endpoint: str) -> str | None:
    """The host name of a tcp:// endpoint if it does not resolve (None: it does, it is an
    address, or the endpoint is not tcp)."""
    import ipaddress
    import socket as socketmod

    if not endpoint.startswith("tcp://"):
        return None
    host = endpoint.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if host in ("", "*"):
        return None
    failed: list[bool] = []

    def look_up() -> None:
        try:
            socketmod.getaddrinfo(host, None)
        except (socketmod.gaierror, UnicodeError):
            failed.append(True)

    # (A resolver that does not answer would hold the command up: 2 s, then no note.)
    t = threading.Thread(target=look_up, daemon=True)
    t.start()
    t.join(2.0)
    return host if failed else None


def _hint_reload(cfg: configmod.Config) -> None:
    """A running daemon takes the new peer list at once."""
    try:
        control.request(cfg, "reload", timeout=5.0)
    except DaemonNotRunning:
        return
    except ReplError as e:
        print(f"the daemon did not reload ({e}); `systemctl --user reload repld` applies the change")
        return
    print("the running daemon reloaded its config")


def cmd_run(args: argparse.Namespace) -> int:
    from . import service  # the daemon's imports (zmq, watchdog) only for what needs them

    cfg = configmod.load(args.config, need_root=False)
    try:
        running = control.request(cfg, "status", timeout=2.0)["status"]
    except ReplError:
        pass  # none answers (DaemonNotRunning), or one that is not well: the lock decides
    else:
        pid = running.get("pid")
        raise ReplError(
            f"a daemon already runs for {cfg.path}" + (f" (pid {pid})" if pid else "")
            + f"; `{configmod.command_for(cfg)} status` asks it how it is doing"
        )
    return service.run(args.config, debug=args.debug)


def _daemon_config(args: argparse.Namespace) -> configmod.Config:
    """The config, to reach the daemon: a mistake in it made since the daemon read it is a
    warning here (the daemon goes on with what it read), not a wall between user and daemon.
    With no daemon answering, the mistake is the error (exit 2), as for any command."""
    cfg, error = configmod.where_the_daemon_is(args.config)
    if error is not None:
        try:
            control.request(cfg, "status", timeout=2.0)
        except DaemonNotRunning:
            raise error from None
        print(f"repld: warning: {error}; the running daemon keeps the config it read before "
              "(fix the file, then `kill -HUP` the daemon or restart it)", file=sys.stderr)  # fmt: skip
    return cfg


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _daemon_config(args)
    status = control.request(cfg, "status")["status"]
    if args.json:
        _print_json(status)
        return 0
    print(format_status(status))
    return 0


def format_status(st: dict[str, Any]) -> str:
    """The human view of `repld status --json`."""
    loc = st["local"]
    peers = st["peers"]
    up = sum(1 for p in peers if p["connected"])
    synced = all(p["in_sync"] for p in peers if p["connected"]) and up > 0
    lines = [
        f"{st['name']} ({short_id(st['replica_id'])}) at {st['root']}: {st['state']}"
        + (f", in sync with {up} of {len(peers)} peers" if synced else f", {up} of {len(peers)} peers connected"),
        f"  local: {loc['files']} files, {loc['dirs']} directories, {_human(loc['bytes'])}, "
        f"sequence {loc['sequence']}",
    ]
    if not st.get("watching", True) and st["state"] == "error" and control.replica_error(st):
        lines.append("  watching: off until the root is back (see the error below)")
    elif not st.get("watching", True):
        lines.append("  watching: off (inotify unavailable or its limit reached): periodic full scans")
    elif st.get("unwatched_dirs"):
        lines.append(
            f"  watching: {st['unwatched_dirs']} directories beyond the inotify watch limit, "
            "rescanned every minute (see the log for the fix)"
        )
    for p in peers:
        if p["connected"]:
            state = "in sync" if p["in_sync"] else (
                f"needs {p['need_files']} files ({_human(p['need_bytes'])}) from it, "
                f"it needs {p['peer_need_files']}"
            )
            lines.append(f"  peer {p['name']} ({p['endpoint']}): connected, {state}")
        else:
            seen = p["last_seen"] or "never"
            why = f"; {p['error']}" if p.get("error") else ""
            lines.append(f"  peer {p['name']} ({p['endpoint']}): not connected, last seen {seen}{why}")
    for r in st.get("refused", []):
        lines.append(
            f"  refused: {r['count']} connection(s) from public key '{r['key']}', no peer's key "
            f"here (last {r['last']}); if it is a replica of this tree, admit it: "
            f"repld peer add NAME ENDPOINT '{r['key']}' (a peer listed here under an old key: "
            "`repld peer remove NAME` first)"
        )
    if st["conflicts"]:
        lines.append(f"  conflicts: {st['conflicts']} (see `repld conflicts`)")
    for e in st["errors"][:20]:
        where = f"{escape(e['path'])}: " if e["path"] else ""  # "": the replica as a whole
        lines.append(f"  error: {where}{e['error']}")
    if len(st["errors"]) > 20:
        lines.append(f"  ... and {len(st['errors']) - 20} more errors (`repld status --json`)")
    return "\n".join(lines)


def cmd_control(args: argparse.Namespace) -> int:
    cfg = _daemon_config(args)
    if args.command == "rescan" and _paused(cfg):
        raise ReplError("the daemon is paused: it records nothing until `repld resume`, which "
                        "scans the tree first")  # fmt: skip
    control.request(cfg, args.command)
    print(f"{args.command}: done" if args.command != "rescan" else "rescan: started")
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    progress = Progress("scanning")
    try:
        rep = open_replica(args.config)
    except StoreBusy:
        # The daemon holds the database: it scans (the whole tree; it watches the rest anyway).
        cfg = configmod.load(args.config, need_root=False)
        for given, path in zip(args.paths, _tree_paths(cfg.root, args.paths) or [], strict=False):
            if not os.path.lexists(cfg.root / path):
                raise UsageError(f"{given}: no such file or directory in {cfg.root}") from None
        command = ("accept-root" if args.accept_root else "accept-deletes" if args.accept_deletes
                   else "rescan-full" if args.full else "rescan")  # fmt: skip
        if _paused(cfg):
            raise ReplError("the daemon is paused: it records nothing until `repld resume`, "
                            "which scans the tree first") from None  # fmt: skip
        control.request(cfg, command)
        if args.accept_root and args.accept_deletes:
            control.request(cfg, "accept-deletes")
        status = control.request(cfg, "status")["status"]
        whole = control.replica_error(status)
        if status["state"] == "error" and whole and not args.accept_root:
            raise ReplError(whole) from None  # not the replica's root: nothing is scanned
        what = {"accept-deletes": "to record the deletions it held back (and scan the tree)",
                "accept-root": "to take this directory as its root and scan it"}.get(
            "accept-root" if args.accept_root else command, "to scan the tree")  # fmt: skip
        print(f"asked the running daemon {what}; `repld status` shows when it is done")
        if args.verbose:
            print("(-v lists changes only when this command scans; the daemon's journal lists "
                  "what it records: `journalctl --user -u repld`, or its log)")  # fmt: skip
        return 0
    with rep:
        paths = _tree_paths(rep.root, args.paths)
        for given, path in zip(args.paths, paths or [], strict=False):
            if not os.path.lexists(rep.root / path) and rep.store.get(path) is None:
                raise UsageError(
                    f"{given}: not in the tree {rep.root} (nothing there, nothing recorded)"
                )
        if args.accept_root:
            rep.check_root(accept=True)
        stats = rep.scan(paths, verbose=args.verbose, clean_temp=True, progress=progress,
                         rehash=args.full, accept_deletes=args.accept_deletes)  # fmt: skip
    progress.done()
    for change in stats.changes:
        print(_change(change, 7))
    print(_scan_summary(rep.cfg.name, stats))
    for path, err in stats.errors:
        print(f"error: {escape(path)}: {err}", file=sys.stderr)
    _print_skipped(stats.skipped)
    return 1 if stats.errors else 0


def _not_the_same_replica(mine: Path, other: Path) -> None:
    """Two config files of one replica (a copy of the config): said as such, not as the
    database being in use by another process."""
    try:
        a = configmod.load(mine, need_root=False).state.resolve()
        b = configmod.load(other, need_root=False).state.resolve()
    except ConfigError:
        return  # said when each is opened, with its own message
    if a == b:
        raise UsageError(f"{other} and {mine} are configs of the same replica (state {a}); "
                         "give another replica's config")  # fmt: skip


def _print_skipped(skipped: list[tuple[str, str]]) -> None:
    """Paths no sync can replicate: said on every run (they are not errors: the exit code
    does not change), with the way to stop hearing about them."""
    for path, why in skipped:
        print(f"not replicated: {escape(path)}: {why}", file=sys.stderr)
    if skipped:
        print(f"(a pattern in ROOT/{IGNORE_FILE} stops these notices)", file=sys.stderr)


def cmd_sync(args: argparse.Namespace) -> int:
    target = Path(args.target)
    if not target.is_file():
        cfg = configmod.load(args.config, need_root=False)  # (a missing root: said later)
        if cfg.peer(args.target):
            return _sync_peer(args)
        if target.exists() and not target.is_dir():
            raise UsageError(f"{args.target} is not a regular file: sync takes the other "
                             "replica's config file, or the name of a peer")  # fmt: skip
        if target.is_dir():
            found = sorted(str(p) for p in target.glob("*.toml") if p.is_file())
            hint = f" (there: {', '.join(found)})" if found else ""
            raise UsageError(
                f"{args.target} is a directory: sync takes the other replica's config file, "
                f"the one `repld init` wrote{hint}, or the name of a peer"
            )
        raise UsageError(
            f"{args.target}: no such config file, and no peer of that name in {cfg.path}"
        )
    direction = Direction.PULL if args.pull_only else Direction.PUSH if args.push_only else Direction.BOTH
    progress = Progress("syncing")
    dry = args.dry_run
    if target.resolve() == _config_path(args).resolve():
        raise UsageError(f"{args.target} is this replica's own config; give another replica's")
    _not_the_same_replica(_config_path(args), target)
    with _open_stopped(args.config, "a sync with another replica's config", dry_run=dry) as left, \
            _open_stopped(target, "a sync with its config", dry_run=dry) as right:  # fmt: skip
        paths = _tree_paths(left.root, args.paths)
        for given, path in zip(args.paths, paths or [], strict=False):
            if not any(os.path.lexists(r.root / path) or r.store.get(path) for r in (left, right)):
                raise UsageError(f"{given}: in neither replica (nothing there, nothing recorded); "
                                 "a PATH limits the sync to a subtree of the tree")  # fmt: skip
        report = sync(
            left, right, direction=direction, dry_run=args.dry_run, prefer=args.prefer,
            paths=paths, verbose=args.verbose or args.dry_run, progress=progress,
        )  # fmt: skip
        progress.done()
        _print_sync(report, args.verbose)
        if not dry:
            for r in (left, right):
                expire(r.cfg.versions_dir, r.cfg.keep_versions_days)
    return 1 if report.errors else 0


def _sync_peer(args: argparse.Namespace) -> int:
    from . import service

    paths = _tree_paths(configmod.load(args.config, need_root=False).root, args.paths)
    report = service.sync_with_peer(
        args.config, args.target, dry_run=args.dry_run, pull_only=args.pull_only,
        push_only=args.push_only, prefer=args.prefer, paths=paths,
    )  # fmt: skip
    me = report.status.get("name") or "this replica"
    peer = args.target
    if args.verbose or args.dry_run:
        for step in report.steps:
            print(f"{me} <- {step.describe(sides=(me, peer))}")
    if args.verbose and report.by_daemon:
        print(f"{me}: the running daemon did this exchange, so its changes are not listed "
              "here: its log has a line per change with --debug, `repld log PATH` has a "
              "file's history")  # fmt: skip
    if args.dry_run:
        print(f"dry run: {len(report.steps)} actions planned here, nothing changed")
        if report.offered is not None:
            print(f"{peer}: {report.offered} changes from here it has not seen would be offered; "
                  f"what it takes is planned there (`repld sync {me} -n` on {peer}, with "
                  "its daemon stopped)")  # fmt: skip
    elif report.status:
        t = report.status["transfer"]
        if not args.push_only:
            print(
                f"{me}: {t['files_written']} files written ({_human(t['bytes_written'])}, "
                f"{_human(t['fetched_bytes'])} fetched), {t.get('deleted', 0)} deleted, "
                f"{t['conflicts_resolved']} conflicts resolved"
            )
        if report.sent is not None:
            print(f"{peer}: {report.sent} changes sent from here and acknowledged (its daemon "
                  "applies them)")  # fmt: skip
        elif args.paths and not args.pull_only:
            print(f"{peer}: nothing sent: with a peer, a PATH limits only what this replica "
                  "takes; its own changes go with the next sync without PATH (or the "
                  "daemons)")  # fmt: skip
    # Paths no sync can replicate are notices, as a sync with a local replica gives them: a
    # FIFO or a Latin-1 name made every `sync PEER` exit 1 for as long as it stayed (a trial).
    notices = [e for e in report.errors if e["error"].startswith(NOT_REPLICATED)]
    errors = [e for e in report.errors if not e["error"].startswith(NOT_REPLICATED)]
    for e in errors:
        print(f"error: {escape(e['path'])}: {e['error']}", file=sys.stderr)
    _print_skipped([(e["path"], e["error"].removeprefix(NOT_REPLICATED)) for e in notices])
    if paths and not args.dry_run:
        # Known only now: whether the peer had it (its records of the path came, or not).
        with open_replica(args.config, write=False) as rep:
            for given, path in zip(args.paths, paths, strict=False):
                if not os.path.lexists(rep.root / path) and rep.store.get(path) is None:
                    raise UsageError(f"{given}: in neither this replica nor {peer} (nothing "
                                     "there, nothing recorded); a PATH limits the sync to a "
                                     "subtree of the tree")  # fmt: skip
    return 1 if errors else 0


def _change(change: tuple[str, ...], width: int = 0) -> str:
    """One line of a scan's changes: ``(action, path)``, or ``("move", path, old_path)``."""
    action, path, *was = change
    text = f"{escape(was[0])} -> {escape(path)}" if was else escape(path)
    return f"{action:{width}} {text}"


def _applied(s: ApplyStats) -> str:
    """What an apply did, in the words of `sync` and `import`."""
    return (
        f"{s.written} files written ({_human(s.written_bytes)}, {s.copied_locally} from local "
        "copies), " + (f"{s.moved} moved, " if s.moved else "")
        + f"{s.deleted} deleted, {s.recorded} other updates, {s.conflicts} conflicts"
        + (f", {s.kept_dirs} directories kept" if s.kept_dirs else "")
        + (f", {len(s.errors)} failed (below)" if s.errors else "")
    )


def _print_sync(report: SyncReport, verbose: bool) -> None:
    if verbose or report.dry_run:
        for name, st in report.scans.items():
            for change in st.changes:
                print(f"scan {name}: {_change(change)}")
    quiet = 0  # a dry run's records that change nothing on disk, listed with -v only
    for p in report.passes:
        for step in p.steps:
            if report.dry_run and not verbose and step.op is Op.RECORD:
                quiet += 1
                continue
            print(f"{p.into} <- {step.describe(sides=(p.into, p.source))}")
    if report.dry_run:
        n = sum(len(p.steps) for p in report.passes) - quiet
        also = (f" (and {quiet} records to take that change no file, such as deletions of "
                "paths neither side has: -v lists them)") if quiet else ""  # fmt: skip
        print(f"dry run: {n} actions planned{also}, nothing changed")
    else:
        for p in report.passes:
            print(f"{p.into}: {_applied(p.stats)}")
    for name, path, err in report.named_errors:
        print(f"error: {name}: {escape(path)}: {err}", file=sys.stderr)
    _print_skipped([s for st in report.scans.values() for s in st.skipped])


def cmd_log(args: argparse.Namespace) -> int:
    with open_replica(args.config, write=False) as rep:
        path = _rel_path(rep, args.path)
        events = rep.store.history(path)
        if not events and rep.ignore().covers(path, (rep.root / path).is_dir()):
            raise UsageError(f"{path}: no history: it is ignored here (a rule of "
                             f"{rep.root / IGNORE_FILE} or of the config's `ignore`), so it is "
                             "not replicated")  # fmt: skip
        if not events:
            raise UsageError(f"{path}: no history: never seen by this replica, or deleted and "
                             "pruned since (`repld prune` drops a deleted file's record and "
                             "history once every replica has seen the deletion)")  # fmt: skip
        names = {m.replica_id: m.name for m in rep.store.peer_marks()}
        names[rep.store.replica_id] = rep.cfg.name
    rows = [
        {
            "seq": e.seq,
            "origin": e.origin,
            "origin_name": names.get(e.origin),
            "origin_seq": e.origin_seq,
            "action": e.action,
            "version": e.version.encode(),
            "kind": e.kind,
            "size": e.size,
            "sha256": e.sha256,
            "time": _fmt_time(e.time_ns),
            "via": e.via or None,
            "note": e.note or None,
        }
        for e in events
    ]
    if args.json:
        _print_json({"path": path, "events": rows})
        return 0
    print(f"history of {escape(path)}:")
    for r in rows:
        who = f"{short_id(r['origin'])}" + (f" ({r['origin_name']})" if r["origin_name"] else "")
        via = f" via {r['via']}" if r["via"] else ""
        note = f"  [{escape_note(r['note'])}]" if r["note"] else ""
        content = f" {r['size']} B {r['sha256'][:8]}" if r["kind"] == "file" and r["action"] != "delete" else ""
        print(f"  #{r['seq']:<6} {r['time']}  {r['action']:6} by {who}#{r['origin_seq']}{via}"
              f"  {short_version(r['version'])}{content}{note}")  # fmt: skip
    first = rows[0]["note"] or ""
    if first.startswith("moved from "):
        old = first.removeprefix("moved from ")
        print(f"(its events before the move: repld log {shlex.quote(escape(old))})")
    return 0


def short_version(encoded: str) -> str:
    return str(VersionVector.decode(encoded))


def _tree_paths(root: Path, given: list[str]) -> list[str] | None:
    """PATH arguments as paths in the tree (None: the whole tree). A PATH is taken relative to
    the current directory when that is inside the tree (as a shell user means it), else
    relative to the root; an absolute PATH must lie inside the tree."""
    root = root.absolute()
    real = root.resolve()  # the current directory is a resolved path: compare like with like
    cwd = Path.cwd()
    base = cwd if cwd == real or real in cwd.parents else root
    out = []
    for g in given:
        if "\\" in g and not os.path.lexists(base / g):
            # As repld prints names (`conflicts`, `log`, `dump`: a space is \s), pasted back.
            try:
                g = unescape(g)
            except ValueError:
                pass
        if not g.isascii() and not any(os.path.lexists(b / g) for b in (base, cwd)):
            # Typed in the other Unicode form than the name on disk (é as one code point or
            # as e plus an accent: two names to Linux, alike to the eye).
            for form in ("NFC", "NFD"):
                alt = unicodedata.normalize(form, g)
                if alt != g and any(os.path.lexists(b / alt) for b in (base, cwd)):
                    g = alt
                    break
        full = Path(os.path.normpath(base / g))  # (an absolute g replaces base)
        if base is root and not os.path.isabs(g):
            # Outside the tree, a PATH that names something inside it from here (the tree's
            # own directory name first: `repld resolve home/x.conflict-...`) is what is meant.
            here = Path(os.path.normpath(cwd / g))
            if os.path.lexists(here):
                here = Path(os.path.realpath(here.parent)) / here.name
                if here.is_relative_to(real):
                    full = here
        try:
            rel = full.relative_to(real if full.is_relative_to(real) else root).as_posix()
        except ValueError:
            raise UsageError(f"{g}: not inside the replicated tree {root}") from None
        if rel == ".":
            return None
        try:
            check_path(rel)
        except ReplError as e:
            raise UsageError(f"{g}: {e}") from None
        _no_link_above(root, g, rel)
        out.append(rel)
    return out or None


def _no_link_above(root: Path, given: str, rel: str) -> None:
    """A PATH through a symlink in the tree names nothing repld knows (it records the link,
    never follows it): say so, with the path it means, rather than sync nothing."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        above = root / "/".join(parts[:i])
        if not os.path.islink(above):
            continue
        real = Path(os.path.realpath(above)) / "/".join(parts[i:])
        inside = root.resolve()
        meant = (f"; give the path it points to: {real.relative_to(inside).as_posix()}"
                 if real.is_relative_to(inside) else "")  # fmt: skip
        raise UsageError(f"{given}: {'/'.join(parts[:i])} is a symlink in the tree (to "
                         f"{os.readlink(above)}); repld records a symlink, it never follows "
                         f"one{meant}")  # fmt: skip


def _rel_path(rep: Replica, given: str) -> str:
    """One PATH, taken as ``_tree_paths`` takes them ("" for the root itself)."""
    return (_tree_paths(rep.root, [given]) or [""])[0]


def cmd_conflicts(args: argparse.Namespace) -> int:
    with open_replica(args.config, write=False) as rep:
        rows = list_conflicts(rep.store)
        me = rep.store.replica_id
        names = {m.replica_id: m.name for m in rep.store.peer_marks()}
        names[me] = rep.cfg.name
    if args.json:
        _print_json(rows)
    elif not rows:
        print("no conflicts")
    else:
        for r in rows:
            rid = r["copy_replica"]
            who = f"{names[rid]} ({short_id(rid)})" if rid in names else short_id(rid)
            if rid == me:
                who += " (this replica)"
            what = _human(r["copy_size"]) if r["copy_kind"] == "file" else r["copy_kind"]
            print(f"{escape(r['path'])}\n    other version: {escape(r['copy'])} "
                  f"({what}, modified {r['copy_mtime'] or '-'} on {who})")  # fmt: skip
        print(f"{len(rows)} conflict(s); settle with: repld resolve PATH --keep local|remote|both")
    return 0


def _open_stopped(config: Path | None, what: str, **kwargs: Any) -> Replica:
    """The replica of ``config``, for a command that needs its daemon stopped (``what``: a
    sync with another replica's config, an import): with the daemon running, a usage error
    that says which daemon and what to do, as `repld sync PEER` gives."""
    try:
        return open_replica(config, **kwargs)
    except StoreBusy as busy:
        cfg = _daemon_holds(config, busy)
        try:
            pid = control.request(cfg, "status")["status"].get("pid")
        except (ReplError, OSError, KeyError):
            pid = None
        running = f"the daemon of {cfg.name} is running" + (f" (pid {pid})" if pid else "")
        alt = ("; with it running, sync with a peer by name (`repld sync PEER`)"
               if "sync" in what else "")  # fmt: skip
        raise UsageError(f"{running}: {what} needs it stopped (`systemctl --user stop repld`, or "
                         f"Ctrl-C where `repld run` runs){alt}") from None  # fmt: skip


def _daemon_holds(config: Path | None, busy: StoreBusy) -> configmod.Config:
    """The config of a replica whose database another process holds, if that is its daemon
    (else ``busy`` is raised: a one-shot sync or scan, which ends by itself)."""
    cfg = configmod.load(config, need_root=False)
    try:
        control.request(cfg, "status")
    except DaemonNotRunning:
        raise busy from None
    return cfg


def cmd_resolve(args: argparse.Namespace) -> int:
    try:
        rep = open_replica(args.config)
        daemon = None
    except StoreBusy as busy:
        # Its daemon runs: decide from what it has recorded (it watches the tree), change the
        # files, and let it record the changes, as it records any other edit.
        daemon = _daemon_holds(args.config, busy)
        rep = open_replica(args.config, write=False)
    with rep:
        path = _rel_path(rep, args.path)
        if not os.path.lexists(rep.root / path) and rep.store.get(path) is None:
            raise UsageError(f"{args.path}: not in this replica (nothing there, nothing recorded); "
                             "`repld conflicts` lists the conflicts")  # fmt: skip
        first = original_of(rep.store, path) or path
        if daemon is None:
            rep.scan([first, *(r["copy"] for r in list_conflicts(rep.store) if r["path"] == first)],
                     clean_temp=True)  # fmt: skip
        rows = list_conflicts(rep.store)
        original = original_of(rep.store, path) or path
        every = [r["copy"] for r in rows if r["path"] == original]
        copies = [path] if path != original else every  # (--keep both renames these)
        if not copies:
            raise UsageError(f"{path}: no conflict to resolve (see `repld conflicts`)")
        # "local" is this replica's version, "remote" the other one's; each is either the file
        # at the name (whoever changed it last) or a conflict copy (who made the losing edit).
        # Either settles the whole conflict: the version kept takes the name, every copy goes.
        me = rep.store.replica_id
        by = {r["copy"]: r["copy_replica"] for r in rows}
        at_name = rep.store.get(original)
        name_mine = at_name is not None and not at_name.deleted and at_name.modified_by == me
        keep_copy: str | None = None  # the copy whose content takes the name
        if args.keep in ("local", "remote"):
            want_mine = args.keep == "local"
            if path != original:
                if (by.get(path) == me) != want_mine:
                    whose = "this replica's" if by.get(path) == me else "another replica's"
                    raise UsageError(
                        f"{path} holds {whose} version: `resolve {escape(path)} --keep "
                        f"{'remote' if want_mine else 'local'}` keeps it. To keep "
                        f"{'this replica' if want_mine else 'the other replica'}'s version "
                        f"instead, name the file: `resolve {escape(original)} --keep {args.keep}`"
                    )
                keep_copy = path
            else:
                # The file was named: when it is of the side asked for, it is the one kept.
                chosen = [c for c in every if (by.get(c) == me) == want_mine]
                name_there = at_name is not None and not at_name.deleted
                name_fits = name_there and name_mine == want_mine
                if not want_mine and name_fits and chosen:
                    # Several other replicas' versions (this one only relayed them): which to
                    # keep is not for "remote" to guess, each is someone's edit.
                    raise UsageError(_which_remote(rep, original, at_name, chosen, by))
                if want_mine and not name_fits and not chosen:
                    raise UsageError(_which_remote(rep, original, at_name, every, by))
                if not name_fits and len(chosen) > 1:
                    raise UsageError(
                        f"{original} has {len(chosen)} {args.keep} versions in conflict copies "
                        f"({', '.join(chosen)}); name the one to keep"
                    )
                if not name_fits and chosen:
                    keep_copy = chosen[0]
                elif not name_fits and not want_mine:
                    raise UsageError(
                        f"{original}: every version here is this replica's own (the file and "
                        f"its copies); `repld resolve {original} --keep local` keeps the file, "
                        "`repld resolve COPY --keep local` a copy"
                    )
                # (else the name keeps its content: it is the version asked for, or, with no
                # version of this replica's anywhere, the one this replica shows.)
            copies = sorted(set(every) | set(copies))
        root = rep.root
        touched = [original, *copies]
        try:
            if args.keep in ("local", "remote"):
                if keep_copy is not None:
                    os.replace(root / keep_copy, root / original)
                    print(f"{escape(keep_copy)} -> {escape(original)}")
                for c in copies:
                    if c != keep_copy:
                        os.unlink(root / c)
                        print(f"removed {escape(c)}")
            else:
                for c, fixed in _both_names(rep, copies).items():
                    os.rename(root / c, root / fixed)
                    touched.append(fixed)
            if keep_copy is None:
                _decided(root / original)
        except OSError as e:
            # A directory against a file or symlink: one cannot simply take the other's place.
            kinds = ", ".join(f"{p} is a {_kind_on_disk(root / p)}" for p in (original, copies[0]))
            raise ReplError(
                f"{original}: cannot keep {args.keep} ({e.strerror}: {kinds}); settle it by "
                "hand: move or remove one, give the other the name, then `repld scan`"
            ) from None
        finally:
            if daemon is None:
                stats = rep.scan(touched)  # whatever was done, recorded
            else:
                paused = _ask_daemon_to_scan(daemon)
    if daemon is None:
        print(f"resolved {escape(original)}: kept {args.keep} ({stats.events} changes recorded; "
              "they reach other replicas with the next sync)")  # fmt: skip
    elif paused:
        print(f"resolved {escape(original)}: kept {args.keep}; the daemon is paused: it records "
              "the change, and sends it to its peers, after `repld resume`")  # fmt: skip
    else:
        print(f"resolved {escape(original)}: kept {args.keep}; the running daemon records the "
              "change and sends it to its peers (`repld status` shows when they have it)")  # fmt: skip
    return 0


def _decided(path: Path) -> None:
    """The file at the name keeps its content: move its mtime on by a microsecond, so that the
    scan records an event on it. Without one, a decision made meanwhile on another replica
    that replaced it (the opposite --keep) would win over this one silently and take that
    content away everywhere; with one, the two decisions meet as a conflict, both kept."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        return  # (a directory's content is its files: each keeps its own history)
    for step in (1_000, 2_000_000_000):  # 1 µs; 2 s where timestamps are coarser (FAT)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + step), follow_symlinks=False)
        if os.lstat(path).st_mtime_ns != st.st_mtime_ns:
            return


def _ask_daemon_to_scan(cfg: configmod.Config) -> bool:
    """Ask the running daemon to scan the tree (it would see the changes anyway, by inotify or
    its periodic scans); True if it is paused (it records nothing until resumed)."""
    if _paused(cfg):
        return True
    control.request(cfg, "rescan")
    return False


def _paused(cfg: configmod.Config) -> bool:
    """Whether the running daemon is paused (it records nothing until `repld resume`)."""
    return bool(control.request(cfg, "status")["status"]["state"] == "paused")


def _which_remote(rep: Replica, original: str, at_name: Any, copies: list[str],
                  by: dict[str, str]) -> str:  # fmt: skip
    """Why --keep local or remote cannot choose between versions other replicas made."""
    names = {m.replica_id: m.name for m in rep.store.peer_marks()}

    def who(rid: str | None) -> str:
        return names.get(rid or "") or short_id(rid or "?")

    there = at_name is not None and not at_name.deleted
    versions = [f"the file at the name is {who(at_name.modified_by)}'s" if there
                else "nothing is at the name"]  # fmt: skip
    versions += [f"{c} is {who(by.get(c))}'s" for c in copies]
    return (
        f"{original}: no version here was made on this replica, so local and remote cannot "
        f"choose ({'; '.join(versions)}): `repld resolve COPY --keep remote` keeps that "
        f"copy's version, `repld resolve {original} --keep both` keeps every version under "
        "its replica's name (then delete the ones you do not want), or resolve it on the "
        "replica that made one of them"
    )


def _kind_on_disk(path: Path) -> str:
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "missing"
    kinds = {stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink", stat.S_IFREG: "file"}
    return kinds.get(stat.S_IFMT(mode), "special file")


def _both_names(rep: Replica, copies: list[str]) -> dict[str, str]:
    """What `resolve --keep both` renames each conflict copy to: NAME.conflict-<replica>-<hash>
    .EXT -> NAME.<replica's name>.EXT, or NAME.<replica's name>-<hash>.EXT where that is taken
    (two copies of one replica's edits). Checked whole before anything is renamed: a
    ReplError names a copy that cannot be given a free name."""
    names = {short_id(m.replica_id): m.name for m in rep.store.peer_marks()}
    names[short_id(rep.store.replica_id)] = rep.cfg.name
    out: dict[str, str] = {}
    for c in copies:
        head, _, name = c.rpartition("/")
        at = name.rfind(".conflict-")
        ident, dot, tail = name[at + len(".conflict-") :].partition(".")
        replica, _, digest = ident.partition("-")
        who = names.get(replica, replica)
        for tag in (who, f"{who}-{digest}"):
            new = name[:at] + "." + tag + (dot + tail if dot else "")
            fixed = f"{head}/{new}" if head else new
            if fixed not in out.values() and not os.path.lexists(rep.root / fixed):
                out[c] = fixed
                break
        else:
            raise ReplError(f"{fixed} exists already; rename {c} by hand (nothing was changed)")
    return out


KEPT_ELSEWHERE = ("Changes made on this replica keep nothing here: a file deleted (or, with "
                  "keep_versions \"all\", rewritten) here is kept by the replicas that took "
                  "that change: `repld versions PATH` there")


def cmd_versions(args: argparse.Namespace) -> int:
    from .versions import versions

    cfg = configmod.load(args.config, need_root=False)
    unders = _tree_paths(cfg.root, args.paths) or [""]
    found = {v.file: v for u in unders for v in versions(cfg.versions_dir, u)}
    rows = sorted(found.values(), key=lambda v: (-v.kept, -v.n, v.path))
    if args.restore and args.delete:
        raise UsageError("--restore or --delete, not both")
    if args.all and not args.restore:
        raise UsageError("--all goes with --restore (the listing shows every version already)")
    if args.restore:
        return _restore_versions(cfg, args, rows, unders)
    if args.delete:
        return _delete_versions(cfg, args, rows)
    if args.json:
        _print_json([{"path": v.path, "kept": control.iso_time(v.kept), "size": v.size,
                      "file": str(v.file)} for v in rows])  # fmt: skip
        return 0
    if not rows:
        what = ", ".join(map(escape, args.paths)) if args.paths else "any file"
        how = ("off: none are kept" if cfg.keep_versions.value == "off"
               else f"\"{cfg.keep_versions.value}\", for {cfg.keep_versions_days} days")  # fmt: skip
        print(f"no versions of {what} kept in {cfg.versions_dir} (keep_versions {how}). "
              f"{KEPT_ELSEWHERE}")
        if cfg.versions_dir.exists() and not cfg.versions_dir.is_dir():
            print(f"repld: warning: {cfg.versions_dir} is not a directory: no file can be kept "
                  "there, and deletions from other replicas wait until it is", file=sys.stderr)  # fmt: skip
        return 0
    for v in rows:
        print(f"{control.iso_time(v.kept)}  {_human(v.size):>10}  {escape(v.path)}\n"
              f"    {shlex.quote(str(v.file))}")  # fmt: skip
    print(f"{len(rows)} version(s); `repld versions PATH --restore` puts the newest of PATH "
          f"back, or copy one: cp -p {shlex.quote(str(rows[0].file))} "
          f"{shlex.quote(str(cfg.root / rows[0].path))}")  # fmt: skip
    return 0


def _delete_versions(cfg: configmod.Config, args: argparse.Namespace, rows: list[Version]) -> int:
    from .versions import drop

    gone, freed, errors = drop(cfg.versions_dir, rows)
    for v, why in errors:
        print(f"not deleted: {v.file}: {why}", file=sys.stderr)
    what = f" of {', '.join(args.paths)}" if args.paths else ""
    print(f"deleted {gone} version(s){what} from {cfg.versions_dir}: {_human(freed)} freed"
          + (" (a version whose file is in the tree under another name frees nothing)"
             if gone and not freed else ""))  # fmt: skip
    return 1 if errors else 0


def _restore_versions(cfg: configmod.Config, args: argparse.Namespace, rows: list[Version],
                      unders: list[str]) -> int:  # fmt: skip
    from .versions import newest_removal, restore

    if not args.paths:
        raise UsageError("--restore needs the PATH of a file or directory to restore (every "
                         "version at once is rarely what is meant)")  # fmt: skip
    if not rows:
        raise UsageError(f"no versions of {', '.join(map(escape, args.paths))} kept in "
                         f"{cfg.versions_dir}. {KEPT_ELSEWHERE}")  # fmt: skip
    if not cfg.root.is_dir():
        raise ReplError(f"the root {cfg.root} is not there; nothing restored")
    left: list[Version] = []
    if not args.all:
        # A directory: what its newest removal took, not the files removed from it before.
        whole = [v for v in rows if v.path in unders]
        recent, left = newest_removal([v for v in rows if v.path not in unders])
        rows = whole + recent
    with open_replica(args.config, write=False) as rep:
        got = restore(cfg.root, rows, rep.store.get)
    done, skipped, older = got.done, got.skipped, {v.path for v in got.older}
    for v in done:
        print(f"restored {escape(v.path)} (kept {control.iso_time(v.kept)})"
              + (": an older version than the one deleted last, which is not kept here "
                 "(`repld versions PATH` on the other replicas may list it)"
                 if v.path in older else ""))  # fmt: skip
    if got.there:
        print(f"already there: {len(got.there)} file(s) with the same content as the version "
              f"kept (the first: {escape(got.there[0])})")  # fmt: skip
    for path, why in skipped:
        print(f"not restored: {escape(path)}: {why}", file=sys.stderr)
    if left:
        since = control.iso_time(max(v.kept for v in left))
        print(f"left out: {len(left)} older version(s) of files removed before that (the newest "
              f"kept {since}), most likely on purpose; `--all` restores them too")  # fmt: skip
    if done:
        try:
            control.request(cfg, "status", timeout=2.0)
            print(f"{len(done)} file(s) back in the tree; the running daemon records them and "
                  "sends them to its peers")  # fmt: skip
        except DaemonNotRunning:
            print(f"{len(done)} file(s) back in the tree; `repld scan` records them (or the next "
                  "sync)")  # fmt: skip
    return 1 if skipped else 0


def cmd_dump(args: argparse.Namespace) -> int:
    with open_replica(args.config, write=False) as rep:
        s = rep.store
        out = sys.stdout
        out.write(f"# repld tree {s.tree_id} replica {s.replica_id} seq {s.seq}\n")
        out.write("# path kind version deleted mode mtime_ns size sha256 target guid seq\n")
        for r in s.iter_paths():
            out.write(
                f"{escape(r.path)} {r.kind.value} {r.version.encode() or '-'} "
                f"{'D' if r.deleted else '-'} {r.mode:04o} {r.mtime_ns} {r.size} "
                f"{r.sha256 or '-'} {escape(r.target) if r.target else '-'} {r.guid} {r.seq}\n"
            )
    return 0


def cmd_rejoin(args: argparse.Namespace) -> int:
    progress = Progress("first scan")
    try:
        cfg, stats, old, new_keys = rejoin(_config_path(args), progress=progress,
                                           tree_id=args.tree_id)  # fmt: skip
    except StoreBusy:
        again = configmod.command_for(configmod.load(_config_path(args), need_root=False))
        raise UsageError("the daemon (or a sync) is using this replica: stop it first, e.g. "
                         f"`systemctl --user stop repld`, then run `{again} rejoin` again") from None  # fmt: skip
    progress.done()
    with Replica(cfg, write=False) as rep:
        kept = (f"the old database is kept as {old}" if old is not None
                else "a new database (there was none)")  # fmt: skip
        print(f"replica {cfg.name} ({short_id(rep.store.replica_id)}) joined tree "
              f"{rep.store.tree_id} anew; {kept}")  # fmt: skip
    if new_keys:
        key = load_keys(cfg, public_only=True).public
        print(f"new key pair (the old one was lost or damaged): every peer must "
              f"admit the new public key, on each: `repld peer remove {cfg.name}` then `repld "
              f"peer add {cfg.name} {_dialable(cfg.listen)} '{key}'`")  # fmt: skip
    if stats.kept or stats.edited:
        print(f"{stats.kept} paths found as the old database recorded them, {stats.edited} "
              "changed since: they keep their history (the tree's newer versions come in, an "
              "edit made here since is an edit of that version)")  # fmt: skip
    adopted = stats.created - stats.kept - stats.edited
    print(f"adopted {adopted} {'other ' if stats.kept or stats.edited else ''}paths found in the "
          "root: at the next sync, each is checked against the tree (newer versions come in, "
          "what the tree deleted goes, what differs is kept beside it as a conflict copy)")  # fmt: skip
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .prune import HOW_CONFIGURED, HOW_SYNCED, HOW_THROUGH, forget_ids, prune, superseded_by

    asked = False
    try:
        with open_replica(args.config, write=not args.dry_run) as rep:
            forget = forget_ids(rep, args.forget)
            report = prune(rep, dry_run=args.dry_run, forget=forget)
    except StoreBusy as busy:
        # The daemon holds the database: it drops them, in its own loop; what it did is read
        # back once it has (the figures of before, else: a dry run's).
        cfg = _daemon_holds(args.config, busy)
        with open_replica(args.config, write=False) as rep:
            forget = forget_ids(rep, args.forget)
            report = prune(rep, dry_run=True, forget=forget)
        if not args.dry_run and (report.droppable or report.history_dropped or forget):
            control.request(cfg, "prune", forget=forget)
            asked = True
            report = _pruned_by_daemon(args.config, report, forget)
    dry = args.dry_run or (asked and not report.dropped and not report.history_dropped)
    if args.json:
        _print_json(report.to_json() | {"asked_daemon": asked, "dry_run": args.dry_run})
        return 0
    n, d, events = report.tombstones, report.dropped, report.history_dropped
    by = " (by the running daemon)" if asked else ""
    if d:
        print(f"dropped {d} tombstone{'' if d == 1 else 's'} every replica has seen, with the "
              f"history of their paths{by}")  # fmt: skip
    elif report.droppable and dry:
        print(f"would drop {report.droppable} tombstone{'' if report.droppable == 1 else 's'} "
              "every replica has seen" + (" (dry run)" if args.dry_run else ""))  # fmt: skip
    if events:
        print(f"{'would drop' if dry else 'dropped'} {events} older event(s) of files' histories, "
              "every replica having seen a later one (`repld log` keeps each path's newest)"
              + by)  # fmt: skip
    if asked and dry:
        print("asked the running daemon to do it; it has not yet (its journal says when)")
    size = report.tombstone_bytes
    if dry and not d and report.droppable:  # what would be kept
        size = size * (n - report.droppable) // n
        n -= report.droppable
    print(f"{n or 'no'} tombstone{'' if n == 1 else 's'} "
          f"{'would be ' if dry and not d else ''}kept (about {_human(size)} of database)"
          + (": none can be dropped while a replica below cannot tell what it has seen"
             if report.blocked_by and n else ""))  # fmt: skip
    for h in report.holders:
        who = f"{h.name} ({short_id(h.replica_id)})" if h.name and h.replica_id \
            else h.name or short_id(h.replica_id)  # fmt: skip
        if h.how in (HOW_SYNCED, HOW_THROUGH):
            if h.unseen and h.how == HOW_THROUGH:
                seen = (f"has not got {h.unseen} of them yet, as far as {h.via} knows (the "
                        f"newest: {escape(h.newest_unseen or '')}); they reach it through "
                        "the replicas it syncs with")  # fmt: skip
            elif h.unseen and (again := superseded_by(report, h)) is not None:
                seen = (f"has not acknowledged {h.unseen} of them (the newest: "
                        f"{escape(h.newest_unseen or '')}), and will not: {h.name} has synced "
                        f"since as {short_id(again.replica_id)} (a rejoin, a reinstall?); if "
                        f"this one is gone for good, `{configmod.command_for(rep.cfg)} prune "
                        f"--forget {short_id(h.replica_id)}`")  # fmt: skip
            elif h.unseen:
                seen = (f"has not acknowledged {h.unseen} of them yet (the newest: "
                        f"{escape(h.newest_unseen or '')}); its next sync with this "
                        "replica brings them")  # fmt: skip
            else:
                seen = "has seen them all" + (f" (as {h.via} says)" if h.via else "")
            if h.how == HOW_THROUGH:
                print(f"  {who}: never synced with this replica; {h.via} says how far it holds "
                      f"this replica's records: {seen}")  # fmt: skip
                continue
            print(f"  {who}: last synced {_fmt_time(h.last_sync)}, {seen}")
        elif h.how == HOW_CONFIGURED:
            print(f"  {who}: a peer not met yet: cannot tell what it has seen")
        else:
            print(f"  {who}: known from its edits only, never synced with this replica: "
                  "cannot tell what it has seen")  # fmt: skip
    for h in report.forgotten:
        who = f"{h.name} ({short_id(h.replica_id)})" if h.name else short_id(h.replica_id)
        now = args.dry_run and h.replica_id in forget  # (else noted by an earlier --forget)
        print(f"  {who}: forgotten (`--forget`{', on this dry run' if now else ''}): "
              "not waited for; if it syncs again, it counts again")  # fmt: skip
    return 0


PRUNE_WAIT = 10.0  # s that `repld prune` waits for a running daemon to have pruned


def _pruned_by_daemon(config: Path | None, before: PruneReport,
                      forget: list[str]) -> PruneReport:  # fmt: skip
    """What the daemon asked to prune did, read back from the database once it has done it
    (PRUNE_WAIT at most: then ``before``, a dry run's figures)."""
    from .prune import forgotten, prune

    deadline = time.monotonic() + PRUNE_WAIT
    while time.monotonic() < deadline:
        time.sleep(0.1)
        with open_replica(config, write=False) as rep:
            after = prune(rep, dry_run=True)
            noted = set(forget) <= set(forgotten(rep.store))
        if forget and noted and not before.droppable and not before.history_dropped:
            return after  # only forgetting was asked for, and it is done
        if noted and (after.tombstones < before.tombstones or (
            not before.droppable and after.history_dropped < before.history_dropped
        )):
            return dataclasses.replace(
                after,
                dropped=before.tombstones - after.tombstones,
                history_dropped=before.history_dropped - after.history_dropped,
            )
    return before


def cmd_export(args: argparse.Namespace) -> int:
    from .bundle import export

    progress = Progress("exporting")
    try:
        rep = open_replica(args.config)
        scan = True
    except StoreBusy:
        # The daemon (or a sync) holds the write lock: export what it has recorded, unscanned.
        rep = open_replica(args.config, write=False)
        scan = False
    with rep:
        since, peer = _since_peer(rep, args.since) if args.since else (0, "")

        def show(r: Any) -> None:
            progress(f"{r.records} records, {r.files} files ({_human(r.content_bytes)})")

        report = export(rep, args.file, since=since, peer=peer, peer_name=args.since or "",
                        scan=scan, force=args.force, progress=show)
        progress.done()
    gone = sum(why == os.strerror(errno.ENOENT) for _, why in report.left_out)
    shown = report.left_out if args.verbose or gone <= LISTED else [
        (p, w) for p, w in report.left_out if w != os.strerror(errno.ENOENT)] + [
        (p, w) for p, w in report.left_out if w == os.strerror(errno.ENOENT)][:LISTED]  # fmt: skip
    for path, why in shown:
        print(f"left out: {escape(path)}: {why}", file=sys.stderr)
    if len(shown) < len(report.left_out):
        print(f"left out: and {len(report.left_out) - len(shown)} more gone from the disk "
              "(-v lists them)", file=sys.stderr)  # fmt: skip
    if gone and not scan:
        print(f"note: {gone} file(s) recorded by the daemon are gone from the disk: if it holds "
              "their deletion back (`repld status` says so), settle that first (README: "
              "\"When most of the tree disappears\"), then export again", file=sys.stderr)  # fmt: skip
    if report.records:
        print(
            f"{report.path}: {report.records} records of {report.name} (sequence "
            f"{report.since + 1} to {report.upto}), {report.files} files "
            f"({_human(report.content_bytes)})"
        )
    else:
        print(f"{report.path}: no changes of {report.name} after its sequence {report.since}")
    return 1 if report.left_out else 0


def _since_peer(rep: Replica, name: str) -> tuple[int, str]:
    """How far PEER (a name here) has acknowledged this replica's records, and its replica id."""
    if name == rep.cfg.name:
        raise UsageError(f"--since {name}: that is this replica; name the one the bundle is for")
    marks = [m for m in rep.store.peer_marks() if m.name == name]
    if marks:
        m = max(marks, key=lambda m: m.last_sync_ns)
        return m.acked_seq, m.replica_id
    if rep.cfg.peer(name) is None:
        known = sorted({p.name for p in rep.cfg.peers} | {m.name for m in rep.store.peer_marks()})
        raise UsageError(
            f"--since {name}: no peer here, and no replica that synced with this one, has that "
            f"name (known: {', '.join(known) if known else 'none'}); a replica whose changes "
            "only came through others is not known here by name. Without --since the bundle "
            "holds everything (what the importer has already is skipped there)"
        )
    print(f"{name} has not synced with this replica yet: the bundle holds everything",
          file=sys.stderr)  # fmt: skip
    return 0, ""


def cmd_import(args: argparse.Namespace) -> int:
    from .bundle import Bundle, import_bundle

    progress = Progress("importing")
    with _open_stopped(args.config, "an import", dry_run=args.dry_run) as rep, \
            Bundle(args.file) as bundle:  # fmt: skip
        report = import_bundle(
            rep, bundle, dry_run=args.dry_run, prefer=args.prefer,
            verbose=args.verbose or args.dry_run, progress=progress,
        )  # fmt: skip
        progress.done()
        if not args.dry_run:
            expire(rep.cfg.versions_dir, rep.cfg.keep_versions_days)
    if args.verbose or args.dry_run:
        assert report.scan is not None
        for change in report.scan.changes:
            print(f"scan: {_change(change)}")
    quiet = 0
    for step in report.steps:
        if report.dry_run and not args.verbose and step.op is Op.RECORD:
            quiet += 1
            continue
        print(f"{rep.cfg.name} <- {step.describe(sides=(rep.cfg.name, report.name))}")
    if report.dry_run:
        also = f" (and {quiet} records to take that change no file: -v lists them)" if quiet else ""
        print(f"dry run: {len(report.steps) - quiet} actions planned{also}, nothing changed")
    else:
        print(f"{rep.cfg.name}: from {report.name}'s bundle, {_applied(report.stats)}")
    for path, err in report.errors:
        print(f"error: {escape(path)}: {err}", file=sys.stderr)
    _print_skipped(report.scan.skipped if report.scan else [])
    if bundle.for_id and bundle.for_id != rep.store.replica_id and report.errors:
        print(
            f"note: {report.name} made this bundle for {bundle.for_name} (`export --since "
            f"{bundle.for_name}`): it leaves out the content of the versions {bundle.for_name} "
            f"wrote. Ask {report.name} for a bundle without --since (or --since "
            f"{rep.cfg.name}, if {rep.cfg.name} has synced with {report.name} before)",
            file=sys.stderr,
        )
    if report.gap is not None:
        had, since = report.gap
        print(
            f"incomplete: the bundle holds {report.name}'s changes after its sequence {since}, "
            f"but this replica has them only up to {had}: the ones between are not in it. Ask "
            f"{report.name} for a bundle without --since (or --since {rep.cfg.name})",
            file=sys.stderr,
        )
    return 1 if report.errors or report.gap else 0


COMMANDS = {
    "init": cmd_init,
    "id": cmd_id,
    "peer": cmd_peer,
    "run": cmd_run,
    "status": cmd_status,
    "pause": cmd_control,
    "resume": cmd_control,
    "rescan": cmd_control,
    "scan": cmd_scan,
    "sync": cmd_sync,
    "log": cmd_log,
    "conflicts": cmd_conflicts,
    "resolve": cmd_resolve,
    "versions": cmd_versions,
    "dump": cmd_dump,
    "prune": cmd_prune,
    "rejoin": cmd_rejoin,
    "export": cmd_export,
    "import": cmd_import,
}


def _keys_are_not_options(argv: list[str]) -> list[str]:
    """A Z85 key may start with '-': in `peer add NAME ENDPOINT KEY`, end the options before it."""
    try:
        at = argv.index("peer")
    except ValueError:
        return argv
    rest = argv[at + 1 :]
    if len(rest) == 4 and rest[0] == "add" and rest[3].startswith("-") and "--" not in rest:
        return [*argv[: at + 4], "--", rest[3]]
    return argv


def _subparser(parser: argparse.ArgumentParser,
               args: argparse.Namespace) -> argparse.ArgumentParser:  # fmt: skip
    """The parser of the command (and sub-command) given, whose usage an error should show."""
    for dest in ("command", "peer_command"):  # (`repld peer add`: a command's own commands)
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)),
                   None)  # fmt: skip
        name = getattr(args, dest, None)
        if sub is None or name not in sub.choices:
            break
        parser = sub.choices[name]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    real_stdout = sys.stdout
    sys.stdout = _Output(real_stdout)  # type: ignore[assignment]
    try:
        args, extra = parser.parse_known_args(
            _keys_are_not_options(list(sys.argv[1:] if argv is None else argv))
        )
    except OutputError as e:  # `repld --help > /dev/full`
        _quiet_stdout()
        print(f"repld: {e}", file=sys.stderr)
        return 1
    finally:
        sys.stdout = real_stdout
    if extra:
        # PATHs after an option (`repld sync usb.toml -n Documents`): argparse stops taking
        # positionals at the first option, but a user need not know that.
        if hasattr(args, "paths") and not any(x.startswith("-") for x in extra):
            args.paths = [*args.paths, *extra]
        else:
            _subparser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)
    one_line(logging.getLogger().handlers, "repld: %(levelname)s: %(name)s: %(message)s"
             if args.debug else "repld: %(levelname)s: %(message)s")  # fmt: skip
    real_stdout = sys.stdout
    sys.stdout = _Output(real_stdout)  # type: ignore[assignment]
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, where a full disk or a closed pipe can still be reported
        return code
    except ConfigError as e:
        print(f"repld: config error: {e}", file=sys.stderr)
        return 2
    except ReplError as e:
        if isinstance(e, OutputError):
            _quiet_stdout()
        print(f"repld: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("repld: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 1
    except sqlite3.Error as e:
        if args.debug:
            raise
        if getattr(e, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
            # Damage found after the database opened: name it, and the way out.
            damaged = DamagedDatabase(_db_path_of(args), str(e))
            print(f"repld: {damaged}", file=sys.stderr)
            return damaged.exit_code
        print(f"repld: database error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if args.debug:
            raise
        # "PATH: Not a directory" rather than Python's "[Errno 20] Not a directory: 'PATH'".
        where = f"{os.fsdecode(e.filename)}: " if e.filename is not None else ""
        print(f"repld: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        sys.stdout = real_stdout


def _db_path_of(args: argparse.Namespace) -> str:
    """The database of the replica a command was for, for a message ("the database")."""
    try:
        return str(configmod.load(_config_path(args), need_root=False).db_path)
    except ReplError:
        return "the database"


class OutputError(ReplError):
    """Standard output could not be written (`repld dump > /dev/full`)."""


class _Output:
    """sys.stdout, whose write errors (a full disk, an I/O error) say they are the output's;
    a closed pipe stays a BrokenPipeError (a reader that stopped early)."""

    def __init__(self, f: Any):
        self._f = f

    def write(self, text: str) -> int:
        try:
            return int(self._f.write(text))
        except BrokenPipeError:
            raise
        except OSError as e:
            raise OutputError(f"cannot write the output: {e.strerror}") from None

    def flush(self) -> None:
        try:
            self._f.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            raise OutputError(f"cannot write the output: {e.strerror}") from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's own flush of what could not be
    written does not print a second error at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
