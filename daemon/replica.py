"""A replica on this machine: its config, its database, its keys, its tree. Creating one is `init`."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import socket
import sqlite3
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..protocol.errors import ReplError
from ..protocol.record import (
    CONFLICT_MARK,
    NAME_MAX,
    TEMP_PREFIX,
    Action,
    Record,
    conflict_copy_path,
    conflict_maker,
    conflict_original,
)
from ..protocol.version import short_id
from . import config as configmod
from .config import Config
from .errors import (
    ConfigError,
    DamagedDatabase,
    DeletesDeferred,
    MassDelete,
    RootChanged,
    StoreError,
    UsageError,
)
from .ignore import IGNORE_FILE, Ignore
from .scanner import Scanner, ScanStats
from .store import Store

log = logging.getLogger(__name__)

PUBLIC_KEY_FILE = "curve.public"
SECRET_KEY_FILE = "curve.secret"


@dataclass(frozen=True, slots=True)
class Keys:
    public: str
    secret: str


def make_keys(key_dir: Path) -> Keys:
    key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(key_dir, 0o700)
    import zmq  # here: only init needs it, and it is slow to import for every command

    public, secret = zmq.curve_keypair()
    for name, value, mode in ((SECRET_KEY_FILE, secret, 0o600), (PUBLIC_KEY_FILE, public, 0o644)):
        fd = os.open(key_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(value + b"\n")
            f.flush()
            os.fsync(f.fileno())
    return Keys(public.decode(), secret.decode())


def load_keys(cfg: Config, *, public_only: bool = False) -> Keys:
    """The replica's key pair (``public_only``: its public key, the secret left empty, for
    what only shows it: `repld id` worked without the secret key file no more than `run`)."""
    out = []
    for name in (PUBLIC_KEY_FILE,) if public_only else (PUBLIC_KEY_FILE, SECRET_KEY_FILE):
        path = cfg.key_dir / name
        try:
            text = path.read_text(encoding="ascii").strip()
        except OSError as e:
            raise ConfigError(
                f"cannot read key file {path}: {e.strerror}; if it is lost, `repld --config "
                f"{cfg.path} rejoin` makes a new key pair (then give the new key to the peers: "
                "`repld id` prints the `peer add` line to run there)",
                file=cfg.path,
                key="state",
            ) from None
        if len(text) != 40:
            raise ConfigError(f"key file {path} is damaged (expected 40 Z85 characters); "
                              f"`repld --config {cfg.path} rejoin` makes a new key pair",
                              file=cfg.path, key="state")  # fmt: skip
        out.append(text)
    return Keys(out[0], out[1] if len(out) > 1 else "")


def check_file_system(root: Path) -> None:
    """Refuse a root on a file system that would make repld lose or damage files.

    FAT and exFAT (most USB disks) keep no file modes: every file reads back 0777, which a scan
    would record as a change of mode and send to every replica. And they ignore case: two files
    that differ only in case (README.md, readme.md) share one name there, so one overwrites the
    other and the next scan records the other as deleted, everywhere. A probe file (a temp name,
    never recorded) shows both; a root that cannot be written to is not probed.
    """
    probe = root / f"{TEMP_PREFIX}probe-{os.getpid()}-{os.urandom(3).hex()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    problems: list[tuple[str, str]] = []
    try:
        try:
            os.fchmod(fd, 0o640)
            if stat.S_IMODE(os.fstat(fd).st_mode) != 0o640:
                why = "every file's mode would go to every replica as it reads here"
                problems.append(("keeps no file modes", why))
        finally:
            os.close(fd)
        try:
            # The name is random and has lower-case letters: found in upper case, it is ours.
            os.lstat(probe.with_name(probe.name.upper()))
            problems.append(("ignores case in names",
                             "of two names that differ only in case, one would overwrite the "
                             "other and then be deleted on every replica"))  # fmt: skip
        except OSError:
            pass
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
    if problems:
        raise ConfigError(
            f"{root} is on a file system ({_fs_type(root)}) that "
            f"{' and '.join(p for p, _ in problems)}: {'; '.join(c for _, c in problems)}. "
            "Keep replicas on a Linux file system (ext4, btrfs, xfs); format a USB disk as ext4"
        )


def _fs_type(path: Path) -> str:
    """The type of the file system ``path`` is on, from /proc/self/mountinfo ("?" if unknown)."""
    best, kind = "", "?"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mount_point = left.split()[4].replace("\\040", " ")
                under = str(path).startswith(mount_point.rstrip("/") + "/")
                inside = under or str(path) == mount_point
                if inside and len(mount_point) >= len(best):
                    best, kind = mount_point, right.split()[0]
    except (OSError, IndexError):
        pass
    return kind


MASS_DELETE_MIN = 100  # paths deleted by one scan before the circuit breaker looks at all
IGNORE_RULES_KEY = "ignore_rules"  # meta: the ignore rules as the last scan found them (JSON)


class Replica:
    """Opens a replica's database with its config; closes it on exit."""

    def __init__(self, cfg: Config, *, write: bool = True):
        self.cfg = cfg
        self.store = Store(cfg.db_path, write=write)
        self._write = write
        # Set when the ignore rules changed so that something ignored before may be replicated
        # now: every peer's records were asked for again (see _note_rules); the daemon starts
        # its sessions anew when it sees this.
        self.rules_widened = False
        self._ignore: tuple[object, Ignore] | None = None
        self._root_ident: str | None = None  # what check_root last found (see there)
        # Paths a scan could not replicate, and why, said in the log once (each whole scan of a
        # daemon finds them again; status lists them all the time).
        self.said_skipped: set[tuple[str, str]] = set()

    @property
    def root(self) -> Path:
        return self.cfg.root

    def ignore(self) -> Ignore:
        """The ignore rules as they are now: built again only when the config's rules or
        ROOT/.repldignore changed (the daemon scans after every burst of events, and compiling
        the rules cost more than scanning a file)."""
        try:
            st = os.stat(self.cfg.root / IGNORE_FILE)
            file_key: object = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError:
            file_key = None
        key = (tuple(self.cfg.ignore), self.cfg.root, self.cfg.state, self.cfg.path, file_key)
        if self._ignore is None or self._ignore[0] != key:
            ignore = Ignore(self.cfg.root, self.cfg.ignore, exclude=(self.cfg.state, self.cfg.path))
            self._ignore = (key, ignore)
            if self._write:
                self._note_rules(ignore)
        return self._ignore[1]

    def _offer_again(self, before: Ignore, now: Ignore) -> None:
        """Paths the old rules ignored and these do not: this replica skipped the other
        replicas' changes to them, and its own records of them are as they were then. Each is
        given a new sequence number, so that every peer is offered it again: one that pruned
        the tombstone of a deletion this replica skipped takes the file back (else it would
        stay here alone for good, each side taking the other as up to date), one with a newer
        version sends that again (see localsync.resend_lost)."""
        rows = self.store.execute("SELECT path, kind FROM records WHERE deleted = 0").fetchall()
        again = [p for p, kind in rows
                 if before.covers(p, kind == "dir") and not now.covers(p, kind == "dir")]  # fmt: skip
        for path in again:
            self.store.resend(path)
        if again:
            log.info("ignore rules changed: %d path(s) no longer ignored are offered to the "
                     "peers again", len(again))  # fmt: skip

    def _note_rules(self, ignore: Ignore) -> None:
        """Remember the ignore rules; when they may let through what they ignored before, forget
        how far we have seen every peer's records, so that the next exchange with each brings
        them all again. Records of ignored paths are skipped when they arrive, and a peer never
        sends a record twice: without this, a directory taken off the rules would never come
        over from the replicas that have it. (Only records travel again, and what is already
        here merges as equal: the price of a rule change is one exchange of records.)"""
        text = self.store.meta(IGNORE_RULES_KEY)
        if text is not None and json.loads(text) == ignore.rules:
            return
        with self.store.transaction():
            if text is not None and ignore.may_show_more_than(json.loads(text)):
                forgot = self.store.forget_seen()
                if forgot:
                    log.info("ignore rules changed: asking %d peer(s) for every record again",
                             forgot)  # fmt: skip
                self.rules_widened = True
                self._offer_again(Ignore(self.cfg.root, json.loads(text), read_file=False),
                                  ignore)  # fmt: skip
            self.store.set_meta(IGNORE_RULES_KEY, json.dumps(ignore.rules))

    def scanner(self, **kwargs: object) -> Scanner:
        return Scanner(self.store, self.cfg.root, self.ignore(),
                       other_root=lambda d: _root_taken(d, self.cfg.path),
                       said_skipped=self.said_skipped,
                       **kwargs)  # type: ignore[arg-type]  # fmt: skip

    def scan(
        self,
        paths: list[str] | None = None,
        *,
        accept_deletes: bool = False,
        strict_deletes: bool = False,
        defer_deletes: int | None = None,
        **kwargs: object,
    ) -> ScanStats:
        """Record what changed (see Scanner). The mass-delete circuit breaker may refuse to
        commit it (see _check_deletes): ``accept_deletes`` lets it through, ``strict_deletes``
        holds any scan with MASS_DELETE_MIN deletions or more (while deletions are held), and
        ``defer_deletes`` refuses a scan with that many deletions or more with DeletesDeferred,
        for a whole scan to judge later."""
        self.check_root()
        with self.store.transaction():
            stats = self.scanner(forget_mounts=accept_deletes, **kwargs).scan(paths)
            # Again before the scan commits: a root that went away during the walk made every
            # path not walked yet look deleted.
            self.check_root()
            # (A file moved leaves a deleted path behind; git's objects come and go by the
            # thousand, `git gc`: see is_git_object.)
            gone = stats.deleted - stats.moved - stats.deleted_git_objects
            if defer_deletes is not None and gone >= defer_deletes and not accept_deletes:
                raise DeletesDeferred(f"{gone} paths deleted: left to a whole scan")
            if not accept_deletes:
                self._check_deletes(stats, gone, strict=strict_deletes)
        return stats

    def _check_deletes(self, stats: ScanStats, gone: int, *, strict: bool) -> None:
        """The mass-delete circuit breaker: a scan that finds at least MASS_DELETE_MIN paths and
        more than half of the tree gone (moved files do not count) is not committed (MassDelete
        rolls it back): nothing is recorded, nothing reaches a peer, until `repld scan
        --accept-deletes` (or the files come back). Deletions that arrive from peers are not
        checked: they were accepted where they were made."""
        if gone < MASS_DELETE_MIN:
            return
        files, dirs, _ = self.store.counts()  # what is left, this transaction's changes done
        before = files + dirs + stats.deleted - stats.created
        before -= self.store.count_git_objects() + stats.deleted_git_objects
        if gone * 2 <= before and not strict:
            return
        raise MassDelete(
            f"{gone} of the {before} paths of {self.root} are gone since the last scan"
            + (" (while earlier deletions are held)" if strict and gone * 2 <= before else
               ": more than half of the tree at once")
            + ", so it was not recorded and no peer hears of it. If you meant it, run "
            f"`{configmod.command_for(self.cfg)} scan --accept-deletes`; if not, put the files back (moved back, from a backup, or "
            "copied from another replica's tree) without writing over any file there now: "
            "a running daemon still takes peers' changes meanwhile, and a file put over a newer "
            "one would win over it everywhere (`cp -an SAVED/. DIR/`: -n, never over a file). "
            "Until then, a sync or an import here stops at this same check, and an export "
            "leaves these files out"
        )  # fmt: skip

    def check_root(self, *, accept: bool = False) -> None:
        """Raise ``RootChanged`` unless the root is the directory this replica was made on.

        What identifies it is its file system's id and its inode number (``ROOT_ID``), noted
        at the first scan: a disk not mounted leaves an empty mount point, another disk mounted
        there has another file system id (a file system's root directory has a fixed inode
        number), a home restored or moved aside is another directory; a scan of any of them
        would record every file as deleted and send the deletions to every replica. (Not the
        device number: a USB disk may get another one each time it is plugged in; ext4 and
        btrfs derive the id from the file system's UUID.) A root that is empty while files are
        recorded, when nothing was noted yet (a replica made before this check), is refused
        too: the same mistake, on that first run. (Later, an empty root is only a tree whose
        files were all deleted, which happens.) ``accept`` takes the directory there now as the
        root. The same identity as at the last check costs a stat and a statvfs, no more: the
        applier asks before each batch, the daemon every 2 s."""
        root = self.cfg.root
        try:
            st = os.stat(root)
            fsid = os.statvfs(root).f_fsid
        except OSError as e:
            raise RootChanged(
                f"the root {root} is not there ({e.strerror}): an unmounted disk, a moved "
                f"directory, or a mistake in `root` in {self.cfg.path}? Nothing is recorded or "
                "synced until it is back."
            ) from None
        if not stat.S_ISDIR(st.st_mode):
            raise RootChanged(f"the root {root} is not a directory any more; nothing is synced")
        ident = f"{fsid:x}:{st.st_ino}"
        if ident == self._root_ident and not accept:
            return
        known = self.store.meta(ROOT_ID)
        if known is not None and ":" not in known and known == str(st.st_ino):
            known = None  # noted before the file system id was part of it: note it again
        if known is not None and known != ident and not accept:
            raise RootChanged(
                f"the root {root} is not the directory this replica was made on (file system "
                f"and inode {ident}, were {known}): an unmounted disk, another disk, or a "
                "directory put in place of another? Scanning it would record every file missing "
                "from it as deleted, on every replica, so nothing is recorded or synced. Mount "
                "the disk or move the directory back; or, if this directory really is the tree "
                f"now (restored from a backup), run `{configmod.command_for(self.cfg)} scan "
                "--accept-root` (files missing "
                "from it then count as deleted)."
            )
        if known is None and not accept and self._empty_but_recorded():
            raise RootChanged(
                f"the root {root} is empty, but this replica has files recorded: an unmounted "
                "disk? Scanning it would record them all as deleted, on every replica, so "
                "nothing is recorded or synced. If you did empty it, run `repld scan "
                "--accept-root`."
            )
        if known != ident and self.store.writable:
            self.store.set_meta(ROOT_ID, ident)
        self._root_ident = ident

    def _empty_but_recorded(self) -> bool:
        with os.scandir(self.cfg.root) as it:
            if any(True for _ in it):
                return False
        row = self.store.execute("SELECT 1 FROM records WHERE deleted = 0 LIMIT 1").fetchone()
        return row is not None

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Replica:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_replica(
    config_path: Path | None, *, write: bool = True, dry_run: bool = False
) -> Replica:
    """The replica of a config. Opened to write (and not for a dry run, which writes no file),
    its root is checked to be on a file system that keeps modes and case (see
    ``check_file_system``) the first time it is seen there."""
    # (A missing root is no config error for a replica that exists: check_root says what it
    # likely is, an unmounted disk, and the daemon waits for it.)
    cfg = configmod.load(config_path, need_root=False)
    if not cfg.db_path.exists():
        raise ConfigError(
            f"no database at {cfg.db_path}; was `repld init` run with this config? (If its "
            "state directory was lost: `repld rejoin --tree-id TREE_ID`, with the id from "
            "`repld id` on another replica.)",
            file=cfg.path,
            key="state",
        )
    rep = Replica(cfg, write=write)
    if write and not dry_run:
        try:
            _check_file_system_once(rep)
        except BaseException:
            rep.close()
            raise
    return rep


FS_CHECKED = "fs_checked"  # meta key: the file system the root was last probed on
ROOT_ID = "root_id"  # meta key: the root's file system id and inode (see Replica.check_root)


def _check_file_system_once(rep: Replica) -> None:
    """``check_file_system``, once for each file system the root is on: the probe creates and
    deletes a file in the root, which changes the root's mtime, so it does not run on every
    scan; a root remounted from another disk, or another kind of file system, is probed again.
    """
    key = _fs_key(rep.cfg.root)
    if key is None or rep.store.meta(FS_CHECKED) == key:
        return
    check_file_system(rep.cfg.root)
    rep.store.set_meta(FS_CHECKED, key)


def _fs_key(root: Path) -> str | None:
    """Which file system ``root`` is on: its device number and type."""
    try:
        dev = os.stat(root).st_dev
    except OSError:
        return None
    return f"{dev}:{_fs_type(root)}"


ROOT_MARK = "user.repld.config"  # xattr on a replica's root: the config file that has it


def _root_taken(root: Path, config_path: Path) -> Path | None:
    """The config of another replica whose root ``root`` is (noted on the directory by its
    init, and that config still says so), or None."""
    try:
        other = Path(os.fsdecode(os.getxattr(root, ROOT_MARK)))
    except OSError:
        return None  # none noted (or a file system without extended attributes)
    if other == config_path.absolute():
        return None
    try:
        taken = configmod.load(other, need_root=False).root
    except (ConfigError, OSError):
        return None  # that replica is gone
    return other if taken.absolute() == root or taken.resolve() == root.resolve() else None


def _inside_replica(root: Path, config_path: Path) -> tuple[Path, Path] | None:
    """(config, root) of another replica whose tree holds ``root``, not ignored there."""
    for top in root.parents:
        if (other := _root_taken(top, config_path)) is None:
            continue
        try:
            cfg = configmod.load(other, need_root=False)
        except (ConfigError, OSError):
            continue
        ignore = Ignore(top, cfg.ignore, exclude=(cfg.state, cfg.path))
        if not ignore.covers(root.relative_to(top).as_posix(), True):
            return other, top
    return None


def _mark_root(root: Path, config_path: Path) -> None:
    try:
        os.setxattr(root, ROOT_MARK, os.fsencode(str(config_path.absolute())))
    except OSError:
        pass  # not the owner, or no extended attributes there: the check is a courtesy


def init(
    config_path: Path,
    root: Path,
    *,
    name: str | None = None,
    listen: str | None = None,
    tree_id: str | None = None,
    state: Path | None = None,
    progress: object = None,
    force: bool = False,
) -> tuple[Config, ScanStats]:
    """Create a replica: config, keys, database, and a first scan that records every file."""
    root = root.expanduser().absolute()
    if not root.is_dir():
        raise ConfigError(f"root {root} does not exist or is not a directory")
    check_file_system(root)
    if config_path.is_dir():
        raise ConfigError(
            f"a directory; --config names the config file to write (say {config_path}/"
            "config.toml)",
            file=config_path,
        )
    if config_path.exists():
        raise ConfigError(
            "a config file is already there; remove it or choose another with --config",
            file=config_path,
        )
    if not force and (other := _root_taken(root, config_path)) is not None:
        raise UsageError(
            f"{root} is already the root of the replica of {other}: two replicas of one "
            "directory would each record the other's writes as edits of its own. Use that "
            f"one (`repld --config {other} ...`); if it is not used any more, remove {other} "
            "(or pass --force)"
        )
    if not force and (outer := _inside_replica(root, config_path)) is not None:
        other, top = outer
        raise UsageError(
            f"{root} lies inside {top}, the root of the replica of {other}: that replica would "
            "record this one's writes as edits of its own, and this one its. Choose a root "
            f"outside it, or ignore {root.relative_to(top).as_posix()!r} in {top}/.repldignore "
            "first (or pass --force)"
        )
    state = (state or configmod.default_state_dir(config_path)).expanduser().absolute()
    if (state / "repld.db").exists():
        raise UsageError(
            f"{state}/repld.db already exists: the state of a replica made before (its history "
            "and its keys, which its peers admit). To go on with that replica, write its config "
            "again (root, state) rather than init; else pass another --state, or remove "
            f"{state} if that replica is gone for good"
        )
    name = configmod.check_name(name or _default_name(config_path, root))
    listen = configmod.check_endpoint(listen or f"tcp://0.0.0.0:{configmod.DEFAULT_PORT}")
    if tree_id is not None:
        import uuid

        try:
            tree_id = str(uuid.UUID(tree_id))
        except ValueError:
            raise ConfigError(f"--tree-id {tree_id!r} is not a UUID (copy it from `repld id`)") from None
    cfg = Config(path=config_path.absolute(), root=root, state=state, name=name, listen=listen)
    _home_ignore_rules(root)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    if any((cfg.key_dir / n).exists() for n in (PUBLIC_KEY_FILE, SECRET_KEY_FILE)):
        # Keys with no database: a replica whose database was lost. Its keys are its identity
        # to its peers (they admit that public key): keep them, so no peer needs telling.
        try:
            load_keys(cfg)
        except ConfigError:
            raise StoreError(
                f"{cfg.key_dir} holds damaged or half the keys of an earlier replica; remove "
                "that directory (a new key pair is made) or choose another --state"
            ) from None
        log.warning("keeping the keys of the earlier replica in %s: its peers admit this one",
                    cfg.key_dir)  # fmt: skip
    else:
        make_keys(cfg.key_dir)
    Store.create(cfg.db_path, tree_id=tree_id).close()
    configmod.write(cfg)
    _mark_root(root, cfg.path)
    with Replica(cfg) as rep:
        if (key := _fs_key(root)) is not None:
            rep.store.set_meta(FS_CHECKED, key)  # probed above
        # Joining a tree: what is in the root already may be an old copy of it (a state
        # directory lost, a machine reinstalled with its home kept), so it is adopted, not
        # created: see Action.ADOPT and protocol.reconcile.
        stats = rep.scan(clean_temp=True, progress=progress, adopt=tree_id is not None)
    return cfg, stats


def _keys_renewed(cfg: Config) -> bool:
    """Make a new key pair if the replica's is lost or damaged (what is left of it is set
    aside): True if it did (the peers must be given the new public key)."""
    try:
        load_keys(cfg)
        return False
    except ConfigError:
        pass
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (PUBLIC_KEY_FILE, SECRET_KEY_FILE):
        path = cfg.key_dir / name
        if path.exists():
            path.rename(_unused(path.with_name(f"{name}.lost-{stamp}")))
    make_keys(cfg.key_dir)
    return True


def rejoin(config_path: Path | None, *, progress: object = None,
           tree_id: str | None = None) -> tuple[Config, ScanStats, Path | None, bool]:  # fmt: skip
    """Give a replica a new database of the same tree, as a replica that joins it (see
    RolledBack): the old database is kept beside it (returned), the config and the keys stay,
    and a first scan adopts every file in the root (see Action.ADOPT), so that at the next
    sync each is checked against the tree: nothing in the root is lost, nothing the tree
    deleted comes back. With no database at all (a state directory deleted), ``tree_id`` says
    which tree, and a key pair is made if there is none (True last: peers must be told)."""
    from .prune import FORGOTTEN

    cfg = configmod.load(config_path, need_root=False)
    if not cfg.db_path.exists():
        return _rejoin_lost(cfg, tree_id, progress)
    try:
        rep = open_replica(config_path)  # the write lock: refused while the daemon runs
    except DamagedDatabase as e:
        # Not even its tree id can be read: it is set aside, and the replica rejoins as one
        # whose database was lost.
        if tree_id is None:
            raise UsageError(
                f"{e.db_path}: the database is damaged, and the tree id cannot be read from it: "
                f"`repld --config {cfg.path} rejoin --tree-id TREE_ID`, with the id from `repld "
                "id` on another replica"
            ) from None
        old = _set_aside(cfg.db_path, "damaged")
        cfg, stats, _, new_keys = _rejoin_lost(cfg, tree_id, progress, old_db=old)
        return cfg, stats, old, new_keys
    try:
        rep.check_root()  # an empty mount point would join as an empty tree
        if tree_id is not None and tree_id != rep.store.tree_id:
            raise UsageError(f"--tree-id {tree_id}: this replica's database is of tree "
                             f"{rep.store.tree_id}; --tree-id is for a replica whose database "
                             "is gone")  # fmt: skip
        cfg, tree_id, old_id = rep.cfg, rep.store.tree_id, rep.store.replica_id
        kept = {k: v for k in (FS_CHECKED, ROOT_ID) if (v := rep.store.meta(k)) is not None}
    finally:
        rep.close()
    old = _set_aside(cfg.db_path, "before-rejoin")
    Store.create(cfg.db_path, tree_id=tree_id).close()
    new_keys = _keys_renewed(cfg)
    with Replica(cfg) as rep:
        for key, value in kept.items():
            rep.store.set_meta(key, value)
        # Its old self will never sync again: `repld prune` here must not wait for it.
        rep.store.set_meta(FORGOTTEN, json.dumps({old_id: [0, time.time_ns(), cfg.name]}))
        stats = rep.scan(clean_temp=True, progress=progress, adopt=True)
        stats.kept, stats.edited = continue_history(rep.store, old)
    return cfg, stats, old, new_keys


def continue_history(store: Store, old_db: Path) -> tuple[int, int]:
    """After a rejoin's adopting scan, what the old database (restored from a backup, or
    damaged) still tells: a path found as it recorded it takes that record (and its history:
    an old copy of a file edited elsewhere since is then only behind, and is updated at the
    next sync, where an adopted copy became a conflict copy); one found changed is this
    replica's edit of that version. The rest stays adopted. Returns (kept, edited)."""
    try:
        old = Store(old_db, write=False)
    except (ReplError, sqlite3.Error):
        return 0, 0  # nothing readable: every path stays adopted
    me = store.replica_id
    kept = edited = 0
    top, seq = store.seq, 0
    try:
        with store.transaction():
            while page := [r for r in store.page_since(seq, 1000) if r.seq <= top]:
                seq = page[-1].seq
                for new in page:
                    if new.deleted or new.action is not Action.ADOPT:
                        continue
                    try:
                        was = old.get(new.path)
                    except sqlite3.Error:
                        continue  # (a damaged page of the old database)
                    if was is None or was.deleted or was.kind is not new.kind:
                        continue
                    if was.same_content(new) and was.same_metadata(new):
                        store.put(was.with_(ino=new.ino), local=False, note="kept at rejoin")
                        kept += 1
                    else:
                        store.put(new.with_(version=was.version.bump(me), guid=was.guid,
                                            action=Action.UPDATE), local=True,
                                  note="changed since the old database recorded it")  # fmt: skip
                        edited += 1
    finally:
        old.close()
    return kept, edited


def _default_name(config_path: Path, root: Path) -> str:
    """The host name; for a second replica on this machine (a config other than the default,
    which names a replica already), the host name and the root's name (`vm-usb`): two
    replicas of one name make reports and logs that cannot tell them apart."""
    host = socket.gethostname().split(".")[0] or "replica"
    default = configmod.default_config_path()
    if config_path.absolute() != default.absolute() and default.is_file():
        try:
            taken = configmod.load(default, need_root=False).name
        except ConfigError:
            taken = host
        if taken == host:
            suffix = re.sub(r"[^A-Za-z0-9_.-]+", "-", root.name).strip("-.") or "replica"
            return f"{host}-{suffix}"[:64]
    return host


def _unused(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``... whichever names nothing yet (nor its -wal)."""
    n, out = 1, path
    while out.exists() or out.with_name(out.name + "-wal").exists():
        n += 1
        out = path.with_name(f"{path.name}-{n}")
    return out


def _set_aside(db_path: Path, why: str) -> Path:
    """Rename the database (and its -wal and -shm files) to ``repld.db.WHY-DATE``, never over
    an earlier one (two rejoins in one second kept only the second's: the original was lost,
    a trial)."""
    old = _unused(db_path.with_name(f"{db_path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}"))
    for suffix in ("", "-wal", "-shm"):
        src = db_path.with_name(db_path.name + suffix)
        if src.exists():
            src.rename(old.with_name(old.name + suffix))
    return old


def _rejoin_lost(cfg: Config, tree_id: str | None, progress: object,
                 old_db: Path | None = None) -> tuple[Config, ScanStats, None, bool]:  # fmt: skip
    """rejoin for a replica whose database is gone (its state directory deleted): a new one of
    tree ``tree_id``, the config (and its peers) kept, the files in the root adopted."""
    import uuid

    if tree_id is None:
        raise UsageError(
            f"no database at {cfg.db_path} (the state directory was lost?): `repld --config "
            f"{cfg.path} rejoin --tree-id TREE_ID` makes a new one for this replica's tree (its "
            "id: `repld id` on another replica), keeping this config and its peers, and adopts "
            "the files in the root (nothing in it is lost)"
        )
    try:
        tree_id = str(uuid.UUID(tree_id))
    except ValueError:
        raise UsageError(f"--tree-id {tree_id!r} is not a UUID (copy it from `repld id`)") from None
    if not cfg.root.is_dir():
        raise ConfigError(f"root {cfg.root} is not a directory (a disk not mounted?)",
                          file=cfg.path, key="root")  # fmt: skip
    cfg.state.mkdir(parents=True, exist_ok=True, mode=0o700)
    new_keys = _keys_renewed(cfg)
    Store.create(cfg.db_path, tree_id=tree_id).close()
    with Replica(cfg) as rep:
        stats = rep.scan(clean_temp=True, progress=progress, adopt=True)
        if old_db is not None:
            stats.kept, stats.edited = continue_history(rep.store, old_db)
    return cfg, stats, None, new_keys


# The example config and the default ignore rules: etc/ in the source tree, repld/etc/ installed.
ETC = Path(__file__).resolve().parent.parent / "etc"


def _home_ignore_rules(root: Path) -> bool:
    """A home directory gets the default ignore rules (caches, trash, swap files, __pycache__)
    as ROOT/.repldignore, unless it has one: before the first scan, so none of that is recorded.
    Every replica of a home that starts this way writes the same file, so they agree on it."""
    try:
        if root.resolve() != Path.home().resolve():
            return False
    except (OSError, RuntimeError):
        return False
    target = root / IGNORE_FILE
    if target.exists() or target.is_symlink():
        return False
    try:
        rules = (ETC / "home.repldignore").read_text(encoding="utf-8")
    except OSError as e:
        log.warning("default ignore rules not found (%s); %s not written", e, target)
        return False
    target.write_text(rules, encoding="utf-8")
    return True


def made_by_repld(copy: Record) -> bool:
    """Whether ``copy``, at a conflict copy's path, is a copy reconcile made (on any replica):
    its guid is derived from the losing version (a version 5 UUID, which follows it through
    moves and edits), where a file anyone made has a random one (version 4)."""
    return copy.guid[14:15] == "5"


def original_of(store: Store, copy_path: str) -> str | None:
    """The path a conflict copy is a copy of (None: not a copy). Its name says so, unless it
    was shortened to fit a file name (see conflict_copy_path): then it is the record in the same
    directory whose name begins with the shortened stem and whose copy, for the copy's version,
    has exactly this name."""
    original = conflict_original(copy_path)
    if original is None:
        return None
    copy = store.get(copy_path)
    if copy is not None and not made_by_repld(copy):
        return None  # a file of someone's that only has a copy's name
    rec = store.get(original)
    head, _, name = copy_path.rpartition("/")
    shortened = len(name.encode("utf-8", "surrogateescape")) > NAME_MAX - 4
    if (rec is not None and not rec.deleted) or not shortened:
        return original
    if copy is None:
        return original
    stem = name[: name.rfind(CONFLICT_MARK)]
    for r in store.children(head):
        if r.deleted or r.path == copy_path or not r.path.rpartition("/")[2].startswith(stem):
            continue
        if conflict_copy_path(r.path, copy) == copy_path:
            return r.path
    return original


def list_conflicts(store: Store) -> list[dict[str, Any]]:
    """Conflict copies that are still there, with the file each is a copy of."""
    rows = store.execute(
        "SELECT path FROM records WHERE deleted = 0 AND path LIKE '%.conflict-%' ORDER BY path"
    ).fetchall()
    out = []
    for (copy_path,) in rows:
        original = original_of(store, copy_path)
        rec = store.get(copy_path)
        if original is None or rec is None:
            continue
        orig = store.get(original)
        when = dt.datetime.fromtimestamp(rec.mtime_ns / 1e9).astimezone()
        # Whose version it is: the replica its name says (the one that made the losing edit),
        # not whoever recorded it last (a move of its directory elsewhere).
        maker, short = rec.modified_by, conflict_maker(copy_path)
        if short and short_id(maker) != short:
            # (The losing edit is in the original's version: it merged both.)
            known = [store.replica_id, *(r for r, _ in rec.version),
                     *(r for r, _ in (orig.version if orig is not None else ())),
                     *(m.replica_id for m in store.peer_marks())]  # fmt: skip
            maker = next((rid for rid in known if short_id(rid) == short), maker)
        out.append({
            "path": original,
            "copy": copy_path,
            "copy_replica": maker,
            "copy_size": rec.size,
            "copy_kind": rec.kind.value,
            "copy_mtime": when.isoformat(timespec="seconds") if rec.mtime_ns else None,
            "path_exists": orig is not None and not orig.deleted,
        })  # fmt: skip
    return out
