"""The configuration file (TOML): where it is, what it holds, how it is checked and written.

Every mistake is a ``ConfigError`` that names the file and the key (and the line, for TOML syntax
errors), so the command line can exit 2 with a message a person can act on.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..protocol.reconcile import Policy
from .errors import ConfigError

ENDPOINT_RE = re.compile(r"^tcp://(\*|\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
KEY_RE = re.compile(r"^[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")  # Z85, 32 bytes
DEFAULT_PORT = 7437

TOP_KEYS = {
    "root", "state", "name", "listen", "conflict_policy", "ignore", "scan_interval", "peer",
    "control_socket",
}
PEER_KEYS = {"name", "endpoint", "public_key"}


def default_config_path() -> Path:
    env = os.environ.get("REPLD_CONFIG")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "repld" / "config.toml"


def default_state_dir(config_path: Path) -> Path:
    """The state directory that goes with a config file, unique per config file."""
    if config_path.resolve() == default_config_path().resolve() and "REPLD_CONFIG" not in os.environ:
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "repld"
    return config_path.parent / f"{config_path.stem}.state"


def check_endpoint(endpoint: str, *, file: Path | None = None, key: str = "listen") -> str:
    m = ENDPOINT_RE.match(endpoint)
    if not m or not 0 < int(m.group(2)) < 65536:
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
        raise ConfigError(
            f"bad public key {key_text!r}: expected the 40-character Z85 key that `repld id` prints",
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

    @property
    def db_path(self) -> Path:
        return self.state / "repld.db"

    @property
    def key_dir(self) -> Path:
        return self.state / "keys"

    def peer(self, name: str) -> Peer | None:
        return next((p for p in self.peers if p.name == name), None)


def _type(value: object, kind: type, what: str, file: Path, key: str) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"expected {what}, got {type(value).__name__} {value!r}", file=file, key=key
        )


def load(path: Path | None = None) -> Config:
    """Read and check the config file at ``path`` (default: REPLD_CONFIG or the XDG location)."""
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
    return parse(data, path)


def parse(data: dict[str, object], path: Path) -> Config:
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(
                f"unknown key (known: {', '.join(sorted(TOP_KEYS))})", file=path, key=key
            )
    for key in ("root", "state", "name", "listen"):
        if key not in data:
            raise ConfigError("missing required key", file=path, key=key)
        _type(data[key], str, "a string", path, key)
    root = Path(str(data["root"])).expanduser()
    state = Path(str(data["state"])).expanduser()
    if not root.is_absolute():
        raise ConfigError(f"root must be an absolute path, not {root}", file=path, key="root")
    if not root.is_dir():
        raise ConfigError(f"root {root} does not exist or is not a directory", file=path, key="root")
    if not state.is_absolute():
        raise ConfigError(f"state must be an absolute path, not {state}", file=path, key="state")
    name = check_name(str(data["name"]), file=path)
    listen = check_endpoint(str(data["listen"]), file=path)
    policy_text = data.get("conflict_policy", Policy.KEEP_BOTH.value)
    _type(policy_text, str, "a string", path, "conflict_policy")
    try:
        policy = Policy(policy_text)
    except ValueError:
        choices = ", ".join(p.value for p in Policy)
        raise ConfigError(
            f"unknown policy {policy_text!r} (choose one of {choices})", file=path, key="conflict_policy"
        ) from None
    ignore = data.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise ConfigError("expected a list of gitignore-style patterns", file=path, key="ignore")
    interval = data.get("scan_interval", 3600)
    _type(interval, int, "a number of seconds", path, "scan_interval")
    assert isinstance(interval, int)
    if interval < 0:
        raise ConfigError("must be >= 0 (0 turns periodic scans off)", file=path, key="scan_interval")
    control = data.get("control_socket")
    if control is not None:
        _type(control, str, "a path", path, "control_socket")
        control = Path(str(control)).expanduser()
        if not control.is_absolute():
            raise ConfigError(f"must be an absolute path, not {control}", file=path, key="control_socket")
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
    )


def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def render(cfg: Config) -> str:
    """The config as TOML text; ``load(render(cfg))`` gives back ``cfg``."""
    lines = [
        "# repld configuration. `repld --help` explains the commands; etc/repld.toml every option.",
        "# Peers are managed with `repld peer add/remove`, which rewrite this file.",
        f"root = {_q(str(cfg.root))}",
        f"state = {_q(str(cfg.state))}",
        f"name = {_q(cfg.name)}",
        f"listen = {_q(cfg.listen)}",
        f"conflict_policy = {_q(cfg.conflict_policy.value)}",
        f"scan_interval = {cfg.scan_interval}",
        "# gitignore-style patterns, in addition to ROOT/.repldignore (which is replicated)",
        "ignore = [" + ", ".join(_q(i) for i in cfg.ignore) + "]",
    ]
    if cfg.control_socket is not None:
        lines.append(f"control_socket = {_q(str(cfg.control_socket))}")
    for p in cfg.peers:
        lines += [
            "",
            "[[peer]]",
            f"name = {_q(p.name)}",
            f"endpoint = {_q(p.endpoint)}",
            f"public_key = {_q(p.public_key)}",
        ]
    return "\n".join(lines) + "\n"


def write(cfg: Config) -> None:
    """Write the config atomically (temp file, fsync, rename), readable by the owner only."""
    cfg.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cfg.path.with_name(f".{cfg.path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, render(cfg).encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, cfg.path)
