"""The wire messages between peers, and their codec (msgpack, versioned, size-limited).

Every message is one ZeroMQ frame holding a msgpack array ``[WIRE_VERSION, type, body]``; a
``Blocks`` reply carries its data in a second frame so that file content is never copied through
msgpack. ``decode`` checks everything a peer could get wrong (version, type, field types and
ranges, paths) and raises ``ProtocolError`` with a message fit for the log and for the error reply;
nothing a peer sends can raise anything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import msgpack

from .errors import ProtocolError, WireMismatch
from .record import (
    DIGEST_SIZE,
    MAX_BLOCK,
    MODE_BITS,
    Action,
    Kind,
    Record,
    check_path,
    is_placeholder,
)
from .version import REPLICA_ID, VersionVector

# 2: records may carry the action "adopt"; 3: acks may carry `held`; 4: getfiles and files
# (small files asked for and sent many at a time), and pages may carry content; 5: conflict
# copies are named by the losing edit, not its whole version (replicas must name them alike)
WIRE_VERSION = 5
PROTOCOL = "repld/1"
MAX_MESSAGE = 8 << 20  # bytes in one frame: a page of records, never more
# Bytes of file content one request may ask for: a whole block of the biggest files (a block
# is checked whole against its hash, so it cannot be asked for in parts).
MAX_BLOCK_REQUEST = MAX_BLOCK
MAX_RECORDS = 2000  # records in one page
WIRE_COUNTER_MAX = 1 << 62  # a version counter from a peer (bumps here stay below 2**63)
MAX_FILE_SIZE = 1 << 50  # bytes (1 PiB): sums of many stay far below 2**63
MAX_VERSION_ENTRIES = 512  # replicas named in one version vector
# Files this small are sent whole, many in one message: inside the page of their records (up
# to INLINE_PAGE of them, so a live edit needs no request), else asked for with GetFiles.
INLINE_MAX = 16 << 10
INLINE_PAGE = 256 << 10  # bytes of content in one page of records
MAX_FILES = 256  # files one GetFiles may ask for
MAX_HELD = 1024  # replicas an Ack may vouch for
_INT64 = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Hello:
    """First message on a link, each way: who we are and how far we have seen the other."""

    tree_id: str
    replica_id: str
    name: str
    seq: int  # our newest sequence number
    seen: int  # the newest of the other's sequence numbers we hold...
    send: bool = True  # we will stream our records (false for a --pull-only one-shot sync)
    receive: bool = True  # we want the other's records (false for --push-only or a dry run)
    protocol: str = PROTOCOL
    seen_of: str = ""  # ...if the other is this replica (a dialler guesses who answers)
    reply: bool = False  # an answer to the other's hello: never answered itself


@dataclass(frozen=True, slots=True)
class Records:
    """A page of the sender's records, in its sequence order, up to and including ``upto``."""

    records: tuple[Record, ...]
    upto: int
    remaining_files: int = 0  # records after this page, to show how much is still to come
    remaining_bytes: int = 0
    epoch: int = 0  # which Resend this page answers; pages of an older epoch are dropped
    # The content of some small files of the page, by SHA-256 (see INLINE_MAX): the receiver
    # checks it against the record as it would a fetched block, and asks for what is not here.
    content: dict[str, bytes] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class Held:
    """Replica ``replica_id`` (public key ``key``, if the sender of this knows it) holds the
    records of the Ack's receiver up to its sequence number ``upto``: it synced with the sender
    after the sender had them (see daemon/prune.py)."""

    replica_id: str
    upto: int
    key: str = ""


@dataclass(frozen=True, slots=True)
class Ack:
    """The receiver has processed pages up to ``upto``; and what it still needs from the sender;
    and how far other replicas it synced with hold the sender's records (``held``)."""

    upto: int
    need_files: int = 0
    need_bytes: int = 0
    held: tuple[Held, ...] = ()


@dataclass(frozen=True, slots=True)
class Resend:
    """Stream again from just after ``after`` (a retry of paths that failed to apply)."""

    after: int
    epoch: int


@dataclass(frozen=True, slots=True)
class GetBlocks:
    """Ask for ``length`` bytes at ``offset`` of a file whose content hashes to ``sha256``."""

    req: int
    sha256: str
    path: str  # where the peer last had it; any file with that content will do
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Blocks:
    req: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class GetFiles:
    """Ask for the whole content of several small files (of INLINE_MAX bytes or less), each
    given as (SHA-256, path where the peer last had it), as a GetBlocks would for one."""

    req: int
    files: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Files:
    """The reply to GetFiles: the files' contents one after the other in ``data`` (a second
    frame), and the size of each, in the order asked; -1 for one the sender has no more."""

    req: int
    sizes: tuple[int, ...]
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Error:
    """An error reply. ``fatal`` ends the session (tree mismatch, protocol version)."""

    code: str
    message: str
    req: int = 0
    fatal: bool = False


@dataclass(frozen=True, slots=True)
class Bye:
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Ping:
    """Keeps ``last_seen`` fresh and asks for the peer's ``Ack`` numbers when idle."""

    seq: int = 0


Message = (Hello | Records | Ack | Resend | GetBlocks | Blocks | GetFiles | Files | Error | Bye
           | Ping)  # fmt: skip

_TYPES: dict[str, type[Any]] = {
    cls.__name__.lower(): cls
    for cls in (Hello, Records, Ack, Resend, GetBlocks, Blocks, GetFiles, Files, Error, Bye,
                Ping)  # fmt: skip
}
_NAMES = {cls: name for name, cls in _TYPES.items()}
_FIELD_TYPES: dict[type[Any], dict[str, Any]] = {
    cls: {f.name: f.type for f in fields(cls)} for cls in _TYPES.values()
}


# -- records --------------------------------------------------------------------------------------


def record_to_wire(r: Record) -> list[Any]:
    return [
        r.path.encode("utf-8", "surrogateescape"),
        r.guid,
        r.kind.value,
        r.version.encode(),
        r.deleted,
        r.mode,
        r.mtime_ns,
        r.size,
        r.sha256,
        r.blocks,
        r.target.encode("utf-8", "surrogateescape"),
        r.modified_by,
        r.origin_seq,
        r.action.value,
        r.changed_ns,
        r.seq,
    ]


def _int(v: Any, what: str, lo: int = 0, hi: int = _INT64) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise ProtocolError(f"{what}: expected an integer in [{lo}, {hi}], got {v!r:.60}")
    return v


def _str(v: Any, what: str, limit: int = 4096) -> str:
    if type(v) is not str or len(v) > limit:
        raise ProtocolError(f"{what}: expected text of at most {limit} characters")
    return v


def _text_bytes(v: Any, what: str) -> str:
    if type(v) is not bytes or len(v) > 4096:
        raise ProtocolError(f"{what}: expected at most 4096 bytes")
    return v.decode("utf-8", "surrogateescape")


def record_from_wire(item: Any, *, placeholder_ok: bool = False) -> Record:
    """The record ``item`` encodes; ``ProtocolError`` if it is malformed. A record with an empty
    version (a directory a replica made only to hold an entry that came from elsewhere, which
    no replica sends now) is refused unless ``placeholder_ok``: see ``is_placeholder``."""
    if type(item) is not list or len(item) != 16:
        raise ProtocolError("record: expected an array of 16 fields")
    path = check_path(_text_bytes(item[0], "record path"))
    try:
        kind = Kind(item[2])
        action = Action(item[13])
    except ValueError:
        raise ProtocolError(f"{path}: unknown kind {item[2]!r} or action {item[13]!r}") from None
    version = VersionVector.decode(_str(item[3], f"{path}: version", 1 << 16))
    if not version and not placeholder_ok:
        raise ProtocolError(f"{path}: empty version")
    if any(n > WIRE_COUNTER_MAX for _, n in version.entries):
        raise ProtocolError(f"{path}: a version counter over {WIRE_COUNTER_MAX}")
    if len(version.entries) > MAX_VERSION_ENTRIES:
        raise ProtocolError(f"{path}: a version naming more than {MAX_VERSION_ENTRIES} replicas")
    deleted = item[4]
    if type(deleted) is not bool:
        raise ProtocolError(f"{path}: deleted must be true or false")
    sha = _str(item[8], f"{path}: sha256", 64)
    blocks = item[9]
    if type(blocks) is not bytes or len(blocks) % DIGEST_SIZE:
        raise ProtocolError(f"{path}: blocks must be a multiple of {DIGEST_SIZE} bytes")
    size = _int(item[7], f"{path}: size", 0, MAX_FILE_SIZE)
    if kind is Kind.FILE and not deleted:
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ProtocolError(f"{path}: a file needs a 64-digit sha256")
    target = _text_bytes(item[10], f"{path}: symlink target")
    if "\0" in target or (kind is Kind.SYMLINK and not deleted and not target):
        raise ProtocolError(f"{path}: a symlink target must be non-empty, without NUL")
    guid = _str(item[1], f"{path}: guid", 64)
    modified_by = _str(item[11], f"{path}: modified_by", 64)
    if modified_by and not REPLICA_ID.fullmatch(modified_by):
        # (It names things on disk: a conflict copy's name holds its maker's short id.)
        raise ProtocolError(f"{path}: modified_by {modified_by!r} is not a replica id")
    return Record(
        path=path,
        guid=guid,
        kind=kind,
        version=version,
        deleted=deleted,
        mode=_int(item[5], f"{path}: mode", 0, 0o7777) & MODE_BITS,  # (see MODE_BITS)
        mtime_ns=_int(item[6], f"{path}: mtime", -_INT64),
        size=size,
        sha256=sha,
        blocks=blocks,
        target=target,
        modified_by=modified_by,
        origin_seq=_int(item[12], f"{path}: origin_seq"),
        action=action,
        changed_ns=_int(item[14], f"{path}: changed", -_INT64),
        seq=_int(item[15], f"{path}: seq"),
    )


# -- the codec ------------------------------------------------------------------------------------


def encode(msg: Message) -> list[bytes]:
    """The frames of one message."""
    name = _NAMES[type(msg)]
    if isinstance(msg, Records):
        body: dict[str, Any] = {
            "records": [record_to_wire(r) for r in msg.records],
            "upto": msg.upto,
            "remaining_files": msg.remaining_files,
            "remaining_bytes": msg.remaining_bytes,
            "epoch": msg.epoch,
        }
        if msg.content:
            body["content"] = msg.content
    elif isinstance(msg, Blocks):
        return [msgpack.packb([WIRE_VERSION, name, {"req": msg.req}]), msg.data]
    elif isinstance(msg, Files):
        return [msgpack.packb([WIRE_VERSION, name, {"req": msg.req, "sizes": list(msg.sizes)}]),
                msg.data]  # fmt: skip
    elif isinstance(msg, GetFiles):
        body = {"req": msg.req, "files": [[sha, path] for sha, path in msg.files]}
    elif isinstance(msg, Ack):
        body = {"upto": msg.upto, "need_files": msg.need_files, "need_bytes": msg.need_bytes}
        if msg.held:
            body["held"] = [[h.replica_id, h.upto, h.key] for h in msg.held]
    else:
        body = {f: getattr(msg, f) for f in _FIELD_TYPES[type(msg)]}
    return [msgpack.packb([WIRE_VERSION, name, body])]


def message_type(frames: list[bytes]) -> tuple[str | None, int]:
    """The type named in a message that may not decode, and its request number if it has one
    (for what to do about it, and for an error reply the asker can match), or (None, 0)."""
    try:
        top = msgpack.unpackb(frames[0], raw=False) if frames else None
    except Exception:  # garbage: see decode
        return None, 0
    if type(top) is list and len(top) == 3 and type(top[1]) is str:
        req = top[2].get("req") if type(top[2]) is dict else None
        return top[1], req if type(req) is int and 0 < req <= _INT64 else 0
    return None, 0


def decode(frames: list[bytes]) -> Message:
    """The message in ``frames``; ``ProtocolError`` for anything malformed."""
    if not frames or len(frames) > 2:
        raise ProtocolError(f"expected 1 or 2 frames, got {len(frames)}")
    head = frames[0]
    if len(head) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(head)} bytes is over the {MAX_MESSAGE} byte limit")
    try:
        top = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"not a msgpack message ({type(e).__name__})") from None
    if type(top) is not list or len(top) != 3 or type(top[2]) is not dict:
        raise ProtocolError("not a repld message: expected [version, type, body]")
    version, name, body = top
    if version != WIRE_VERSION:
        raise WireMismatch(version, WIRE_VERSION)
    cls = _TYPES.get(name) if type(name) is str else None
    if cls is None:
        raise ProtocolError(f"unknown message type {name!r:.40}")
    if cls is Blocks:
        if len(frames) != 2:
            raise ProtocolError("blocks: the data frame is missing")
        return Blocks(_int(body.get("req"), "blocks.req"), frames[1])
    if cls is Files:
        if len(frames) != 2:
            raise ProtocolError("files: the data frame is missing")
        return _files(body, frames[1])
    if len(frames) != 1:
        raise ProtocolError(f"{name}: unexpected extra frame")
    if cls is GetFiles:
        return _getfiles(body)
    if cls is Records:
        recs = body.get("records")
        if type(recs) is not list or len(recs) > MAX_RECORDS:
            raise ProtocolError(f"records: expected a list of at most {MAX_RECORDS} records")
        # Placeholders are no news (any record of the path wins over one) and are dropped:
        # older replicas sent them, and refusing the page would refuse its other records.
        return Records(
            tuple(r for r in (record_from_wire(r, placeholder_ok=True) for r in recs)
                  if not is_placeholder(r)),
            _int(body.get("upto"), "records.upto"),
            _int(body.get("remaining_files", 0), "records.remaining_files"),
            _int(body.get("remaining_bytes", 0), "records.remaining_bytes"),
            _int(body.get("epoch", 0), "records.epoch"),
            _content(body.get("content", {})),
        )
    if cls is Ack and "held" in body:
        body = dict(body)
        held = body.pop("held")
        if type(held) is not list or len(held) > MAX_HELD:
            raise ProtocolError(f"ack.held: expected a list of at most {MAX_HELD} entries")
        ack = _plain(cls, name, body)
        assert isinstance(ack, Ack)
        return replace(ack, held=tuple(_held(h) for h in held))
    return _plain(cls, name, body)


def _getfiles(body: dict[str, Any]) -> GetFiles:
    files = body.get("files")
    if type(files) is not list or not 0 < len(files) <= MAX_FILES:
        raise ProtocolError(f"getfiles: expected a list of 1 to {MAX_FILES} files")
    out = []
    for item in files:
        if type(item) is not list or len(item) != 2:
            raise ProtocolError("getfiles: expected [SHA-256, path] entries")
        sha = _str(item[0], "getfiles SHA-256", 64)
        out.append((sha, check_path(_str(item[1], "getfiles path"))))
    unknown = body.keys() - {"req", "files"}
    if unknown:
        raise ProtocolError(f"getfiles: unknown fields {sorted(unknown)!r:.80}")
    return GetFiles(_int(body.get("req"), "getfiles.req"), tuple(out))


def _files(body: dict[str, Any], data: bytes) -> Files:
    sizes = body.get("sizes")
    if type(sizes) is not list or not 0 < len(sizes) <= MAX_FILES:
        raise ProtocolError(f"files: expected a list of 1 to {MAX_FILES} sizes")
    for n in sizes:
        _int(n, "files size", -1, INLINE_MAX)
    if sum(n for n in sizes if n > 0) != len(data):
        raise ProtocolError("files: the sizes do not add up to the data sent")
    return Files(_int(body.get("req"), "files.req"), tuple(sizes), data)


def _content(item: Any) -> dict[str, bytes]:
    if type(item) is not dict:
        raise ProtocolError("records.content: expected a map of SHA-256 to bytes")
    for sha, data in item.items():
        if type(sha) is not str or len(sha) != 64 or type(data) is not bytes:
            raise ProtocolError("records.content: expected a map of SHA-256 to bytes")
        if not 0 < len(data) <= INLINE_MAX:
            raise ProtocolError(f"records.content: {len(data)} bytes for one file, not in "
                                f"1..{INLINE_MAX}")  # fmt: skip
    return item


def _held(item: Any) -> Held:
    if type(item) is not list or len(item) != 3:
        raise ProtocolError("ack.held: expected [replica id, sequence number, key] entries")
    rid = _str(item[0], "ack.held replica id", 64)
    if not rid:
        raise ProtocolError("ack.held: empty replica id")
    return Held(rid, _int(item[1], "ack.held sequence number"), _str(item[2], "ack.held key", 64))


def _plain(cls: type[Any], name: str, body: dict[str, Any]) -> Message:
    types = _FIELD_TYPES[cls]
    unknown = body.keys() - types.keys()
    if unknown:
        raise ProtocolError(f"{name}: unknown fields {sorted(unknown)!r:.80}")
    values: dict[str, Any] = {}
    for key, typ in types.items():
        if key not in body:
            continue  # the dataclass default applies, or the constructor reports it missing
        v = body[key]
        if typ == "int":
            values[key] = _int(v, f"{name}.{key}")
        elif typ == "bool":
            if type(v) is not bool:
                raise ProtocolError(f"{name}.{key}: expected true or false")
            values[key] = v
        else:
            values[key] = _str(v, f"{name}.{key}")
    try:
        msg = cls(**values)
    except TypeError:
        raise ProtocolError(f"{name}: missing fields") from None
    if isinstance(msg, GetBlocks):
        check_path(msg.path)
        if not 0 < msg.length <= MAX_BLOCK_REQUEST:
            raise ProtocolError(f"getblocks: length {msg.length} not in 1..{MAX_BLOCK_REQUEST}")
    return msg  # type: ignore[no-any-return]


__all__ = [
    "Ack",
    "Blocks",
    "Bye",
    "Error",
    "Files",
    "GetBlocks",
    "GetFiles",
    "Held",
    "Hello",
    "Message",
    "Ping",
    "Records",
    "Resend",
    "decode",
    "encode",
]
