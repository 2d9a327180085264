"""The configuration file (TOML): where it is, what it holds, how it is checked and written.

Every mistake is a ``ConfigError`` that names the file and the key (and the line, for TOML syntax
errors), so the command line can exit 2 with a message a person can act on.
"""

from __future__ import annotations

import enum
import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ..protocol.reconcile import Policy
from .errors import ConfigError
from .versions import Keep

ENDPOINT_RE = re.compile(r"^tcp://(\*|\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
Z85_CHARS = r"0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#"
KEY_RE = re.compile(rf"^[{Z85_CHARS}]{{40}}$")  # Z85, 32 bytes
Z85_CHAR_RE = re.compile(rf"[{Z85_CHARS}]")
DEFAULT_PORT = 7437

TOP_KEYS = {
    "root", "state", "name", "listen", "conflict_policy", "ignore", "scan_interval", "peer",
    "control_socket", "keep_versions", "keep_versions_days", "prune_after_days",
}
PEER_KEYS = {"name", "endpoint", "public_key"}


def default_config_path() -> Path:
    env = os.environ.get("REPLD_CONFIG")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "repld" / "config.toml"


def command_for(cfg: Config) -> str:
    """``repld``, with ``--config FILE`` when the config is not the default one: the start of
    a command line a message suggests, so that copied as it is it acts on this replica."""
    try:
        default = cfg.path.absolute() == default_config_path().absolute()
    except (OSError, RuntimeError):
        default = False
    return "repld" if default else f"repld --config {shlex.quote(str(cfg.path))}"


def default_state_dir(config_path: Path) -> Path:
    """The state directory that goes with a config file, unique per config file."""
    if config_path.resolve() == default_config_path().resolve() and "REPLD_CONFIG" not in os.environ:
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "repld"
    return config_path.parent / f"{config_path.stem}.state"


def check_endpoint(endpoint: str, *, file: Path | None = None, key: str = "listen") -> str:
    m = ENDPOINT_RE.match(endpoint)
    if m and not 0 < int(m.group(2)) < 65536:
        raise ConfigError(f"bad endpoint {endpoint!r}: port {int(m.group(2))} is out of range "
                          "(1 to 65535)", file=file, key=key)  # fmt: skip
    if not m:
        raise ConfigError(
            f"bad endpoint {endpoint!r}: expected tcp://HOST:PORT, e.g. tcp://192.0.2.7:{DEFAULT_PORT}",
            file=file,
            key=key,
        )
    return endpoint


def check_name(name: str, *, file: Path | None = None, key: str = "name") -> str:
    if not NAME_RE.match(name):
        raise ConfigError(
            f"bad name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)",
            file=file,
            key=key,
        )
    return name


def check_public_key(key_text: str, *, file: Path | None = None, key: str = "public_key") -> str:
    if not KEY_RE.match(key_text):
        bad = sorted({c for c in key_text if not Z85_CHAR_RE.match(c)})
        what = (f"{', '.join(repr(c) for c in bad)} cannot be in a key" if bad
                else f"{len(key_text)} characters, not 40")  # fmt: skip
        raise ConfigError(
            f"bad public key {key_text!r} ({what}): expected the 40-character Z85 key that "
            "`repld id` prints; on a command line put it in single quotes, as the shell would "
            "take some of its characters ($, !, &, ...) for its own",
            file=file,
            key=key,
        )
    return key_text


@dataclass(frozen=True, slots=True)
class Peer:
    name: str
    endpoint: str
    public_key: str


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    root: Path
    state: Path
    name: str
    listen: str
    conflict_policy: Policy = Policy.KEEP_BOTH
    ignore: tuple[str, ...] = ()
    scan_interval: int = 3600
    peers: tuple[Peer, ...] = field(default=())
    control_socket: Path | None = None  # None: control.sock in the state directory
    keep_versions: Keep = Keep.DELETED
    keep_versions_days: int = 30
    prune_after_days: float = 30  # the daemon drops tombstones seen by all this old (0: never)

    @property
    def db_path(self) -> Path:
        return self.state / "repld.db"

    @property
    def key_dir(self) -> Path:
        return self.state / "keys"

    @property
    def versions_dir(self) -> Path:
        return self.state / "versions"

    def peer(self, name: str) -> Peer | None:
        return next((p for p in self.peers if p.name == name), None)


_TOML_KIND = {bool: "true/false", int: "a whole number", float: "a fraction",
              str: "a quoted string", list: "a list", dict: "a table"}  # fmt: skip


def _toml_value(value: object) -> str:
    """``value`` as it is written in TOML (true, "text", [..]), with what kind of value it is."""
    text = json.dumps(value) if isinstance(value, (bool, int, float, str, list)) else repr(value)
    kind = next((k for t, k in _TOML_KIND.items() if isinstance(value, t)), "a value")
    return f"{kind}, {text}" if kind != "true/false" else text


def _type(value: object, kind: type, what: str, file: Path, key: str) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"expected {what}, got {_toml_value(value)}", file=file, key=key)


def load(path: Path | None = None, *, need_root: bool = True) -> Config:
    """Read and check the config file at ``path`` (default: REPLD_CONFIG or the XDG location).
    ``need_root``: the root must exist (not for commands that only read the database or talk
    to the daemon: they must work while a disk is unmounted, to say so)."""
    path = path or default_config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "no such config file; create one with `repld init ROOT` (or pass --config FILE)",
            file=path,
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read: {e}", file=path) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}", file=path) from None
    try:
        return parse(data, path, need_root=need_root)
    except ConfigError as e:
        line = line_of(text, e.key) if e.key else None
        if line is None:
            raise
        message = str(e).removeprefix(f"{path}: key {e.key!r}: ")
        raise ConfigError(message, file=f"{path}:{line}", key=e.key) from None


def line_of(text: str, key: str) -> int | None:
    """The line (1-based) where ``key`` is set: ``listen``, or ``peer[1].endpoint``."""
    lines = text.splitlines()
    start, end = 0, len(lines)
    name = key
    m = re.fullmatch(r"peer\[(\d+)\](?:\.(\w+))?", key)
    if m:
        headers = [i for i, ln in enumerate(lines) if ln.strip() == "[[peer]]"]
        n = int(m.group(1))
        if n >= len(headers):
            return None
        start = headers[n]
        end = headers[n + 1] if n + 1 < len(headers) else len(lines)
        if m.group(2) is None:
            return start + 1
        name = m.group(2)
    else:
        # Top-level keys come before the first table.
        end = next((i for i, ln in enumerate(lines) if ln.strip().startswith("[")), len(lines))
    pattern = re.compile(rf"\s*{re.escape(name)}\s*=")
    for i in range(start, end):
        if pattern.match(lines[i]):
            return i + 1
    return None


E = TypeVar("E", bound=enum.Enum)


# (Policy's other values are `--prefer` given to one sync, not a setting.)
CONFIG_POLICIES = (Policy.KEEP_BOTH, Policy.NEWEST, Policy.PREFER_LOCAL, Policy.PREFER_REMOTE)


def _choice(data: dict[str, object], key: str, default: E, path: Path, what: str,
            allowed: tuple[E, ...] | None = None) -> E:  # fmt: skip
    """The value of ``key``, one of ``allowed`` (default: every value of ``default``'s enum;
    ``what`` names one in errors)."""
    text = data.get(key, default.value)
    _type(text, str, "a string", path, key)
    every = allowed if allowed is not None else tuple(type(default))
    for c in every:
        if c.value == text:
            return c
    choices = ", ".join(str(c.value) for c in every)
    raise ConfigError(f"unknown {what} {text!r} (choose one of {choices})", file=path,
                      key=key)  # fmt: skip


def where_the_daemon_is(path: Path | None = None) -> tuple[Config, ConfigError | None]:
    """The config, for finding a running daemon's control socket: a mistake in the file (made
    after the daemon read it: it keeps the config it has) does not cut the user off from the
    daemon as long as the file still says where the state directory is. Returns the config and
    the error it had, if any; raises that error when even that cannot be read."""
    try:
        return load(path, need_root=False), None
    except ConfigError as e:
        error = e
    path = path or default_config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise error from None
    try:
        data: dict[str, object] = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        # A syntax error elsewhere in the file: the lines that say where the state is.
        data = {}
        for key in ("state", "control_socket", "root", "name"):
            m = re.search(rf'^\s*{key}\s*=\s*"([^"\\]*)"\s*(#.*)?$', text, re.MULTILINE)
            if m:
                data[key] = m.group(1)
    if not isinstance(data.get("state"), str):
        raise error
    state = beside(path, str(data["state"]))
    control = data.get("control_socket")
    control = beside(path, str(control)) if isinstance(control, str) else None
    root = data.get("root")
    cfg = Config(path=path, root=beside(path, str(root)) if isinstance(root, str) else Path("/"),
                 state=state, name=str(data.get("name", "?")), listen="",
                 control_socket=control)  # fmt: skip
    return cfg, error


def parse(data: dict[str, object], path: Path, *, need_root: bool = True) -> Config:
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(
                f"unknown key (known: {', '.join(sorted(TOP_KEYS))})", file=path, key=key
            )
    for key in ("root", "state", "name", "listen"):
        if key not in data:
            raise ConfigError("missing required key", file=path, key=key)
        _type(data[key], str, "a string", path, key)
    root = beside(path, str(data["root"]))
    state = beside(path, str(data["state"]))
    if need_root and not root.is_dir():
        raise ConfigError(f"root {root} does not exist or is not a directory", file=path, key="root")
    name = check_name(str(data["name"]), file=path)
    listen = check_endpoint(str(data["listen"]), file=path)
    policy = _choice(data, "conflict_policy", Policy.KEEP_BOTH, path, "policy", CONFIG_POLICIES)
    ignore = data.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise ConfigError("expected a list of gitignore-style patterns", file=path, key="ignore")
    interval = data.get("scan_interval", 3600)
    _type(interval, int, "a whole number of seconds", path, "scan_interval")
    assert isinstance(interval, int)
    if interval < 0:
        raise ConfigError("must be >= 0 (0 turns periodic scans off)", file=path, key="scan_interval")
    keep = _choice(data, "keep_versions", Keep.DELETED, path, "value")
    days = data.get("keep_versions_days", 30)
    _type(days, int, "a whole number of days", path, "keep_versions_days")
    assert isinstance(days, int)
    if days < 1:
        raise ConfigError("must be >= 1 (keep_versions = \"off\" keeps none)", file=path,
                          key="keep_versions_days")  # fmt: skip
    prune_days = data.get("prune_after_days", 30)
    if isinstance(prune_days, bool) or not isinstance(prune_days, int | float) or prune_days < 0:
        raise ConfigError("expected a number of days >= 0 (0: the daemon never prunes by itself)",
                          file=path, key="prune_after_days")  # fmt: skip
    control = data.get("control_socket")
    if control is not None:
        _type(control, str, "a path", path, "control_socket")
        control = beside(path, str(control))
    peers_raw = data.get("peer", [])
    if not isinstance(peers_raw, list):
        raise ConfigError("expected [[peer]] tables", file=path, key="peer")
    peers: list[Peer] = []
    for i, raw in enumerate(peers_raw):
        where = f"peer[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError("expected a table", file=path, key=where)
        for key in raw:
            if key not in PEER_KEYS:
                raise ConfigError(
                    f"unknown key (known: {', '.join(sorted(PEER_KEYS))})",
                    file=path,
                    key=f"{where}.{key}",
                )
        for key in sorted(PEER_KEYS):
            if key not in raw:
                raise ConfigError("missing required key", file=path, key=f"{where}.{key}")
            _type(raw[key], str, "a string", path, f"{where}.{key}")
        peer = Peer(
            check_name(raw["name"], file=path, key=f"{where}.name"),
            check_endpoint(raw["endpoint"], file=path, key=f"{where}.endpoint"),
            check_public_key(raw["public_key"], file=path, key=f"{where}.public_key"),
        )
        if any(p.name == peer.name for p in peers):
            raise ConfigError(f"peer name {peer.name!r} is used twice", file=path, key=f"{where}.name")
        peers.append(peer)
    return Config(
        path=path,
        root=root,
        state=state,
        name=name,
        listen=listen,
        conflict_policy=policy,
        ignore=tuple(ignore),
        scan_interval=interval,
        peers=tuple(peers),
        control_socket=control,  # type: ignore[arg-type]
        keep_versions=keep,
        keep_versions_days=days,
        prune_after_days=prune_days,
    )


def beside(config: Path, value: str) -> Path:
    """A path the config gives: absolute (``~`` expanded), or relative to the config file's
    directory (a replica on a USB disk, its config beside its root: mounted anywhere)."""
    given = Path(value).expanduser()
    if given.is_absolute():
        return given
    return Path(os.path.normpath(config.resolve().parent / given))


def portable(config: Path, where: Path) -> str:
    """How the config written at ``config`` says ``where``: relative to the config file's
    directory when it lies below it (the config on a removable disk with the replica: the disk
    may be mounted elsewhere next time), else absolute."""
    base = config.resolve().parent
    if where.is_relative_to(base) and base != Path(base.anchor):
        return str(where.relative_to(base)) or "."
    return str(where)


def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def render(cfg: Config) -> str:
    """The config as commented TOML text; ``load(render(cfg))`` gives back ``cfg``."""
    control = (
        f"control_socket = {_q(str(cfg.control_socket))}"
        if cfg.control_socket is not None
        else '# control_socket = "/run/user/1000/repld.sock"'
    )
    text = f"""\
# repld configuration, written by `repld init`. Every option is explained here; `repld --help`
# explains the commands. Edit freely: comments survive `repld peer add/remove`.

# The replicated tree; must exist. An absolute path, or one relative to this file's directory
# (written so when the tree lies below it: a replica on a USB disk, mounted anywhere).
root = {_q(portable(cfg.path, cfg.root))}

# Where the database and the key pair live; never replicated, even inside root (absolute, or
# relative to this file's directory).
state = {_q(portable(cfg.path, cfg.state))}

# This replica's name, shown to peers and in logs (letters, digits, '.', '_', '-').
name = {_q(cfg.name)}

# Where peers reach this replica: tcp://HOST:PORT (tcp://0.0.0.0:{DEFAULT_PORT}: every address).
listen = {_q(cfg.listen)}

# Concurrent edits of one file: keep-both (the other edit is kept beside it as
# NAME.conflict-<replica>-<hash>.EXT, the same on every replica), newest (the other leaves the
# tree, kept in its own replica's `repld versions`),
# prefer-local / prefer-remote (this replica's own edit wins or loses; set on one replica only).
conflict_policy = {_q(cfg.conflict_policy.value)}

# Seconds between the daemon's full scans, the safety net behind inotify (0: never).
scan_interval = {cfg.scan_interval}

# gitignore-style patterns for this replica only, in addition to ROOT/.repldignore (which is
# replicated, so every replica ignores the same things).
ignore = [{", ".join(_q(i) for i in cfg.ignore)}]

# Files that another replica's change deletes here (and edits made here that lose a conflict
# with no conflict copy) are kept for a while in STATE/versions/ (`repld versions` lists them):
# "deleted" (default), "all" (also the old content of files another replica's change
# rewrites), or "off".
keep_versions = {_q(cfg.keep_versions.value)}
keep_versions_days = {cfg.keep_versions_days}

# The daemon drops, after each periodic scan, the tombstones (records of deleted files) that
# every replica has seen, of deletions older than this many days; 0: only `repld prune` does.
prune_after_days = {cfg.prune_after_days:g}

# The daemon's control socket, for `repld status` (default: control.sock in the state directory).
{control}

# Peers: `repld peer add NAME tcp://HOST:PORT PUBLIC_KEY` (the key from `repld id` over there).
"""
    return text + "".join(_peer_block(p) for p in cfg.peers)


def _peer_block(p: Peer) -> str:
    return (
        f"\n[[peer]]\nname = {_q(p.name)}\nendpoint = {_q(p.endpoint)}\n"
        f"public_key = {_q(p.public_key)}\n"
    )


def add_peer(cfg: Config, peer: Peer) -> None:
    """Append a [[peer]] table to the config file, keeping everything else as the user wrote it."""
    text = cfg.path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text += "\n"
    _write_text(cfg.path, text + _peer_block(peer))
    load(cfg.path)  # what was written must read back


def _peer_table(cfg: Config, name: str) -> tuple[list[str], int, int]:
    """The config file's lines, and where the [[peer]] table named ``name`` starts and ends."""
    lines = cfg.path.read_text(encoding="utf-8").splitlines(keepends=True)
    headers = [i for i, ln in enumerate(lines) if ln.strip().startswith("[")]
    for n, start in enumerate(headers):
        end = headers[n + 1] if n + 1 < len(headers) else len(lines)
        if lines[start].strip() != "[[peer]]":
            continue
        body = tomllib.loads("".join(lines[start + 1 : end]))
        if body.get("name") == name:
            return lines, start, end
    raise ConfigError(f"no [[peer]] named {name!r}", file=cfg.path)


def remove_peer(cfg: Config, name: str) -> None:
    """Remove the [[peer]] table named ``name`` from the config file; nothing else changes."""
    lines, start, end = _peer_table(cfg, name)
    while start > 0 and not lines[start - 1].strip():
        start -= 1  # the blank line before the table goes with it
    _write_text(cfg.path, "".join(lines[:start] + lines[end:]))
    load(cfg.path)


def set_peer_endpoint(cfg: Config, name: str, endpoint: str) -> None:
    """Give the [[peer]] named ``name`` another endpoint; nothing else in the file changes."""
    lines, start, end = _peer_table(cfg, name)
    line = f"endpoint = {_q(endpoint)}\n"
    for i in range(start + 1, end):
        try:
            if "endpoint" in tomllib.loads(lines[i]):
                lines[i] = line
                break
        except tomllib.TOMLDecodeError:
            continue  # (a line of a value written over several lines)
    else:
        lines.insert(start + 1, line)
    _write_text(cfg.path, "".join(lines))
    load(cfg.path)


def write(cfg: Config) -> None:
    """Write the config atomically (temp file, fsync, rename), readable by the owner only."""
    _write_text(cfg.path, render(cfg))


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
