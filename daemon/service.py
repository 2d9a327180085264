"""`repld run` and the network side of `repld sync PEER`: starting, running and stopping a Node.

``run`` is the daemon: it takes the replica's lock, opens the control socket, scans, then loops
until SIGTERM or SIGINT; SIGHUP reloads the config (peers, ignore rules, versioning) without a
restart.
``sync_with_peer`` is one exchange with one configured peer, then exit: the same engine, with
no listener and no watcher, stopping once both sides hold each other's records.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..protocol.plan import Step
from ..protocol.reconcile import Policy
from ..protocol.record import subtree_filter
from ..protocol.session import State
from . import config as configmod
from . import systemd
from .control import ControlServer, control_path, replica_error
from .control import request as control_request
from .errors import DaemonNotRunning, ReplError, UsageError
from .node import UNANSWERED, WIRE_MISMATCH, Node, Options
from .replica import list_conflicts, open_replica
from .store import Store

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 15.0


def run(config_path: Path | None, *, debug: bool = False) -> int:
    # The engine thread shares the GIL with watchdog's: after every system call it waits up to
    # the switch interval to get it back. The default 5 ms turned a burst of inotify events
    # into 0.2 ms per socket send while applying thousands of small files.
    sys.setswitchinterval(0.0005)
    rep = open_replica(config_path)
    systemd.setup_logging(rep.store.replica_id, debug=debug)
    notifier = systemd.Notifier()
    stop = threading.Event()
    node = Node(rep)

    def on_stop(signum: int, frame: object) -> None:
        log.info("%s: stopping after the current file", signal.Signals(signum).name)
        stop.set()
        node.transfers.stopping = True
        node.stop_requested = True
        node.wake()

    def on_hup(signum: int, frame: object) -> None:
        node.command("reload", callback=lambda: _reload(node, notifier))

    def on_control(name: str, **args: Any) -> None:
        if name == "reload":
            on_hup(signal.SIGHUP, None)
        else:
            node.command(name, **args)

    def tick() -> None:
        notifier.tick()
        notifier.status(systemd.status_line(node.snapshot))

    old = {s: signal.signal(s, on_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    old[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
    control = ControlServer(
        control_path(rep.cfg), node.read_snapshot, on_control,
        conflicts=lambda: _conflicts(rep.cfg.db_path),
        inherited=systemd.inherited_socket(),
    )  # fmt: skip
    try:
        node.open()
        control.start()
        log.info("repld %s (%s) serving %s", rep.cfg.name, rep.store.replica_id[:8], rep.cfg.root)
        notifier.status("scanning")
        node.on_tick = notifier.tick
        if notifier.watchdog_every:
            node.max_wait = min(node.max_wait, notifier.watchdog_every / 2)
        node.first_scan()
        node.publish()
        notifier.ready(systemd.status_line(node.snapshot))
        node.on_tick = tick
        node.run(stop)
        notifier.stopping()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        control.stop()
        node.close()
        rep.close()
    if node.fatal:
        raise ReplError(node.fatal)
    return 0


def _conflicts(db_path: Path) -> list[dict[str, Any]]:
    """For the control thread: its own read-only connection (the engine owns the other)."""
    with Store(db_path, write=False) as store:
        return list_conflicts(store)


def _reload(node: Node, notifier: systemd.Notifier) -> None:
    notifier.reloading()
    try:
        cfg = configmod.load(node.cfg.path)
    except ReplError as e:
        log.error("reload failed, keeping the old config: %s", e)
    else:
        node.reload(cfg)
        log.info("config reloaded from %s: %d peer(s)", cfg.path, len(cfg.peers))
    node.publish()
    notifier.reloaded(systemd.status_line(node.snapshot))


@dataclass
class PeerSyncReport:
    steps: list[Step] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)
    # Our side of the exchange: the changes of ours the peer acknowledged in it (it applies
    # them itself), or in a dry run, how many it has not seen and would be offered; None when
    # nothing was to be sent (--pull-only, a subtree) or the daemon did the exchange.
    sent: int | None = None
    offered: int | None = None
    by_daemon: bool = False  # the running daemon did the exchange (no steps listed)


def sync_with_peer(
    config_path: Path | None,
    peer_name: str,
    *,
    dry_run: bool = False,
    pull_only: bool = False,
    push_only: bool = False,
    prefer: str | None = None,
    paths: list[str] | None = None,
    timeout: float = 3600.0,
) -> PeerSyncReport:
    # (A missing root is no config error: the daemon, if it runs, syncs without it, and a
    # one-shot exchange says what it likely is, as `scan` does: see check_root below.)
    cfg = configmod.load(config_path, need_root=False)
    if cfg.peer(peer_name) is None:
        raise UsageError(f"no peer named {peer_name!r} in {cfg.path} (see `repld peer list`)")
    if paths and push_only:
        raise UsageError(
            "with a peer, a PATH limits what this replica takes from it; what it sends cannot "
            "be limited (the peer applies this replica's records whole): push without PATH, "
            "or sync with the peer's config file (a replica on this machine), where PATHs "
            "limit both ways"
        )
    try:
        running = control_request(cfg, "status", timeout=2.0)["status"]
    except DaemonNotRunning:
        pass
    else:
        if dry_run or pull_only or push_only or prefer or paths:
            pid = running.get("pid")
            raise UsageError(
                f"the daemon{f' (pid {pid})' if pid else ''} is running and syncs "
                "continuously, with the peers it can reach; --dry-run, --pull-only, "
                "--push-only, --prefer and PATHs are for one exchange of its own, which needs "
                "the daemon stopped first (`systemctl --user stop repld` if systemd runs it"
                f"{f', else `kill {pid}`' if pid else ''}). `repld status` shows what the "
                "daemon is doing, and what each peer still needs"
            )
        control_request(cfg, "sync-now", timeout=2.0)
        return _wait_daemon(cfg, peer_name, timeout)
    policy = None
    if prefer:
        policy = Policy.CHOOSE_LOCAL if prefer == "local" else Policy.CHOOSE_REMOTE
    opts = Options(
        send=not (pull_only or dry_run or paths),
        receive=not push_only,
        dry_run=dry_run,
        policy=policy,
        within=subtree_filter(paths),
        listen=False,
        watch=False,
        only_peer=peer_name,
        hold_send=prefer is not None,
        keep_steps=True,
    )
    report = PeerSyncReport()
    with open_replica(config_path, dry_run=dry_run) as rep, ExitStack() as stack:
        if dry_run:
            # Everything this replica records while it looks (its own scan, the peer's mark)
            # happens in one transaction that is rolled back: a dry run changes no database.
            stack.enter_context(rep.store.transaction(commit=False))
        rep.check_root()  # (an unmounted disk: said, exit 1, before any network)
        node = Node(rep, options=opts)
        try:
            node.open()
            node.first_scan()
            link = node.links[0]
            deadline = time.monotonic() + timeout
            connect_by = time.monotonic() + CONNECT_TIMEOUT

            def finished() -> bool:
                s = link.session
                if link.error:
                    return True
                if s is None or s.state is not State.ESTABLISHED:
                    if time.monotonic() > connect_by:
                        link.error = (
                            f"cannot reach {peer_name} at {link.peer.endpoint} within "
                            f"{CONNECT_TIMEOUT:g} s (is its daemon running, and does it list "
                            "this replica as a peer?)"
                        )
                        return True
                    return False
                got = not opts.receive or s.received_all
                sent = not opts.send or s.peer_acked_all
                return got and sent

            node.run(threading.Event(), until=finished, deadline=deadline)
            if link.error:
                raise ReplError(f"{peer_name}: {link.error}")
            if not finished():
                raise ReplError(f"{peer_name}: not finished within {timeout:g} s")
            report.steps = node.stats.dry_steps if dry_run else node.stats.done_steps
            report.status = node.status()
            report.errors = report.status["errors"]
            s = link.session
            if s is not None and s.peer is not None:
                # (Changes the peer made itself come back to it relayed, and are no news.)
                theirs = s.peer.replica_id
                if dry_run and not (pull_only or paths):
                    report.offered = rep.store.changes_between(
                        s.start_upto, rep.store.seq, not_by=theirs
                    )
                elif opts.send:
                    report.sent = rep.store.changes_between(
                        s.start_upto, s.confirmed_upto, not_by=theirs
                    )
        finally:
            node.close()
    return report


CONNECT_WAIT = 10.0  # seconds a running daemon is given to reach the peer for `repld sync PEER`


ERROR_WAIT = 10.0  # seconds of failing paths and no progress before `sync PEER` reports them


def _wait_daemon(cfg: configmod.Config, peer_name: str, timeout: float) -> PeerSyncReport:
    """The daemon does the exchange; wait until it says it is in sync with the peer. The
    report's transfer counts are what this exchange moved (the daemon's counters run on)."""
    start = time.monotonic()
    deadline = start + timeout
    before = control_request(cfg, "status")["status"].get("transfer", {})
    stuck: tuple[object, ...] | None = None  # what was still needed, with errors listed, and since
    stuck_since = start
    while True:
        status = control_request(cfg, "status")["status"]
        if status["state"] == "paused":
            raise ReplError("the daemon is paused (`repld resume` first): it takes nothing in")
        whole = replica_error(status)
        if status["state"] == "error" and whole:
            raise ReplError(whole)  # the root is not the replica's: nothing will be applied
        peer = next(p for p in status["peers"] if p["name"] == peer_name)
        if peer["in_sync"]:
            after = status.get("transfer", {})
            status["transfer"] = {
                k: v - before.get(k, 0) if isinstance(v, int) else v for k, v in after.items()
            }
            return PeerSyncReport(status=status, errors=status["errors"], by_daemon=True)
        now = time.monotonic()
        errors = [e for e in status["errors"] if e["path"]]
        state = (peer["need_files"], peer["need_bytes"], tuple(e["path"] for e in errors))
        if not errors or state != stuck:
            stuck, stuck_since = state, now
        elif peer["connected"] and now - stuck_since > ERROR_WAIT:
            # Paths that fail every try, and nothing else moving: say so rather than wait on.
            # (The daemon tries them again every 10 s; `repld status` shows them meanwhile.)
            return PeerSyncReport(status=status, errors=errors, by_daemon=True)
        if (peer.get("error") or "").startswith(WIRE_MISMATCH):
            raise ReplError(f"{peer_name} at {peer['endpoint']}: {peer['error']}")
        if not peer["connected"] and now - start > CONNECT_WAIT:
            if peer.get("error") and not peer["error"].startswith(UNANSWERED):
                # It answered, and refused or was refused: the reason, not a network guess.
                raise ReplError(f"{peer_name} at {peer['endpoint']}: {peer['error']}")
            raise ReplError(
                f"{peer_name}: not reachable at {peer['endpoint']}; is its daemon running? "
                "This daemon keeps trying, and syncs as soon as it gets through"
            )
        if now > deadline:
            raise ReplError(f"{peer_name}: not in sync within {timeout:g} s")
        time.sleep(0.1)
