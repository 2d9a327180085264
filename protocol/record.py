"""The record: what a replica knows about one path, and the rules for paths and names.

A record is immutable. Fields that describe the replicated state (kind, version, content, mode, ...)
travel between replicas; ``seq``, ``replicated_ns`` and ``ino`` are local bookkeeping and never
compared across replicas.
"""

from __future__ import annotations

import enum
import hashlib
import operator
import os
import posixpath
import re
import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from .errors import UnsafePathError
from .version import VersionVector, short_id

# Blocks: a file is hashed in blocks whose size grows with the file, so that small files are one
# block and huge files stay under ~2000 blocks. Sizes are powers of two from 128 KiB to 16 MiB.
MIN_BLOCK = 128 * 1024
MAX_BLOCK = 16 * 1024 * 1024
TARGET_BLOCKS = 2000
DIGEST_SIZE = 32

TEMP_PREFIX = ".repld-tmp-"
# The whole names of repld's own temporary files (the applier's NAME-tag + random, a restore's,
# the root probe's): a user's file that merely starts with the prefix is a file like any other.
_TEMP_RE = re.compile(re.escape(TEMP_PREFIX)
                      + r"(?:[0-9a-f]{8}-[0-9a-f]{8}|restore-[0-9a-f]{8}|probe-[0-9]+-[0-9a-f]{6})")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` (one path component) is one of repld's temporary files: never
    recorded, and removed by a scan that cleans up after a crash."""
    return name.startswith(TEMP_PREFIX) and _TEMP_RE.fullmatch(name) is not None
CONFLICT_MARK = ".conflict-"
NAME_MAX = 255  # bytes in one file name (Linux file systems)
_MARK_RE = re.compile(re.escape(CONFLICT_MARK) + "[0-9a-f]{8}-[0-9a-f]{8}")

_GUID_NAMESPACE = uuid.UUID("6f1e4c1e-4b4e-4d3c-9a51-7265706c6421")


# The mode bits a record holds: permissions and the sticky bit. Not setuid or setgid (nor does
# Syncthing or Unison replicate them): on a machine whose repld runs as root, a peer's setuid
# file would run as root there.
MODE_BITS = 0o1777


def mode_of(st_mode: int) -> int:
    """The replicated part of a stat's ``st_mode`` (see MODE_BITS)."""
    return st_mode & MODE_BITS


def block_size_for(size: int) -> int:
    block = MIN_BLOCK
    while block < MAX_BLOCK and size > block * TARGET_BLOCKS:
        block *= 2
    return block


class Kind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"


class Action(enum.Enum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    # Found by the first scan of a replica that joined a tree (`init --tree-id`) with files in
    # its root: perhaps an old copy of what the tree has changed or deleted since, perhaps new.
    ADOPT = "adopt"


@dataclass(frozen=True, slots=True)
class Record:
    path: str
    guid: str
    kind: Kind
    version: VersionVector
    deleted: bool = False
    mode: int = 0
    mtime_ns: int = 0
    size: int = 0
    sha256: str = ""
    blocks: bytes = b""
    target: str = ""
    modified_by: str = ""
    origin_seq: int = 0
    action: Action = Action.CREATE
    changed_ns: int = 0
    # Local bookkeeping, never compared across replicas.
    seq: int = 0
    replicated_ns: int = 0
    ino: int = 0

    def same_content(self, other: Record) -> bool:
        """Whether applying ``other`` here would change nothing a user cares about but metadata."""
        if self.deleted or other.deleted:
            return self.deleted == other.deleted
        if self.kind is not other.kind:
            return False
        if self.kind is Kind.FILE:
            return self.sha256 == other.sha256
        if self.kind is Kind.SYMLINK:
            return self.target == other.target
        return True

    def same_metadata(self, other: Record) -> bool:
        if self.deleted or self.kind is Kind.SYMLINK:
            return True
        if self.kind is Kind.DIR:
            return self.mode == other.mode
        return self.mode == other.mode and self.mtime_ns == other.mtime_ns

    def content_id(self) -> str:
        """A hash naming the content: the file hash, or the hash of a symlink target."""
        if self.kind is Kind.SYMLINK:
            return hashlib.sha256(self.target.encode("utf-8", "surrogateescape")).hexdigest()
        if self.kind is Kind.DIR:
            return hashlib.sha256(b"dir").hexdigest()
        return self.sha256

    def with_(self, **changes: object) -> Record:
        # dataclasses.replace is several times slower, and this runs once per file per scan.
        values = list(_get_fields(self))
        for name, value in changes.items():
            values[_FIELD_INDEX[name]] = value
        return Record(*values)

    def describe(self) -> str:
        if self.deleted:
            return f"deleted {self.kind.value}"
        if self.kind is Kind.FILE:
            return f"file {self.size} B {self.sha256[:8]} mode {self.mode:o}"
        if self.kind is Kind.SYMLINK:
            return f"symlink -> {self.target}"
        return f"dir mode {self.mode:o}"


_FIELDS = tuple(Record.__dataclass_fields__)
_FIELD_INDEX = {name: i for i, name in enumerate(_FIELDS)}
_get_fields = operator.attrgetter(*_FIELDS)


def new_guid() -> str:
    """A random (version 4) UUID in its usual text form; ``str(uuid.uuid4())`` costs about 3x
    as much, and a first scan makes one per file."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def derived_guid(*parts: str) -> str:
    """A guid every replica computes alike from the same inputs (for conflict copies)."""
    return str(uuid.uuid5(_GUID_NAMESPACE, "\0".join(parts)))


def check_path(path: str) -> str:
    """Validate a replica-relative path from anywhere outside this process; return it.

    Refused: empty, absolute, backslash-free but with ``.``/``..``/empty components, NUL bytes,
    names that are not valid UTF-8. Nothing refused here can ever be turned into a path outside
    the root by joining it to the root.
    """
    if not isinstance(path, str) or not path:
        raise UnsafePathError(f"empty or non-text path {path!r}")
    if "\0" in path:
        raise UnsafePathError(f"path contains NUL: {path!r}")
    if path.startswith("/"):
        raise UnsafePathError(f"absolute path not allowed: {path!r}")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePathError(f"path component {part!r} not allowed: {path!r}")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError(f"path is not valid UTF-8: {path!r}") from None
    return path


def is_nfc(path: str) -> bool:
    return unicodedata.is_normalized("NFC", path)


def is_placeholder(rec: Record) -> bool:
    """A record with no version: a directory made here only to hold an entry from another
    replica, whose own record of it is on its way (see the applier's ``_ensure_parent``).
    It is this replica's alone: never sent, exported or taken from another replica."""
    return not rec.version


def parent_of(path: str) -> str:
    """The parent's path; the root's children have parent ``""``."""
    head = path.rpartition("/")[0]
    if head.endswith("/") or (not head and path.startswith("/")):
        return posixpath.dirname(path)  # not a checked path; dirname's answer, whatever it is
    return head  # a checked path (once per stored record, so no posixpath call)


def is_within(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + "/")


def losing_edit(loser: Record) -> str:
    """What names a losing edit wherever it loses: its content, the replica that made it, and
    that replica's count of events in its version (its edit's number). Not the whole version:
    an edit that won a conflict on one replica (its version merged with the other's) and lost
    on another must get one copy mesh-wide, not one per version it travelled under (a trial saw
    six copies of one edit). Another edit of that replica, even back to the same content, has
    another number: another copy, so none lands on an earlier copy's path and its history."""
    by = loser.modified_by
    return f"{loser.content_id()}\0{by}\0{loser.version.get(by)}"


def loser_digest(loser: Record) -> str:
    """A hash of a losing edit (see ``losing_edit``)."""
    return hashlib.sha256(losing_edit(loser).encode("utf-8", "surrogateescape")).hexdigest()


def subtree_filter(paths: list[str] | None) -> Callable[[str], bool] | None:
    """For a sync limited to some subtrees: whether a path lies in one of them (None: all)."""
    if not paths:
        return None
    prefixes = [p.strip("/") for p in paths]
    return lambda path: any(is_within(path, pre) for pre in prefixes)


def conflict_copy_path(path: str, loser: Record) -> str:
    """``NAME.conflict-<short replica>-<short hash>.EXT``, derived only from the losing edit
    (see ``losing_edit``): the same on every replica that meets it."""
    head, name = posixpath.split(path)
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or _MARK_RE.fullmatch(dot + ext):
        # No extension, a dotfile such as .bashrc, or a copy of an extensionless name, whose
        # last "extension" is its own mark: the new mark goes last, where conflict_original
        # looks for it.
        stem, ext = name, ""
    mark = f"{CONFLICT_MARK}{short_id(loser.modified_by)}-{loser_digest(loser)[:8]}"
    tail = f"{mark}.{ext}" if ext else mark
    if _name_bytes(tail) > NAME_MAX - 1:
        tail = mark  # an extension too long to keep (the mark alone always fits)
    # A name near the file system's limit loses the end of its stem, the same way on every
    # replica: a copy that cannot be written would leave the losing version nowhere.
    while stem and _name_bytes(stem + tail) > NAME_MAX:
        stem = stem[: -max(1, (_name_bytes(stem + tail) - NAME_MAX) // 4)]
    copy_name = stem + tail
    return posixpath.join(head, copy_name) if head else copy_name


def _name_bytes(name: str) -> int:
    return len(name.encode("utf-8", "surrogateescape"))


def conflict_original(path: str) -> str | None:
    """For a conflict copy's path, the path it is a copy of; None for an ordinary path."""
    if CONFLICT_MARK not in path:
        return None  # nearly every path: no split, no search
    head, name = posixpath.split(path)
    at = name.rfind(CONFLICT_MARK)
    if at <= 0:
        return None
    rest = name[at + len(CONFLICT_MARK) :]
    ident, _, tail = rest.partition(".")
    replica, dash, digest = ident.partition("-")
    hexdigits = set("0123456789abcdef")
    if not dash or len(replica) != 8 or len(digest) != 8 or not set(replica + digest) <= hexdigits:
        return None
    original = name[:at] + ("." + tail if tail else "")
    return posixpath.join(head, original) if head else original


def conflict_maker(path: str) -> str | None:
    """For a conflict copy's path, the short id of the replica whose losing version it holds
    (its name says it; its record's modified_by may be another's: a move of its directory)."""
    if conflict_original(path) is None:
        return None
    name = posixpath.basename(path)
    return name[name.rfind(CONFLICT_MARK) + len(CONFLICT_MARK) :][:8]


_ESCAPES = {"\\": "\\\\", " ": "\\s", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def escape(text: str) -> str:
    """One-token, one-line form of a name: spaces, newlines and control characters escaped."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F or 0xDC80 <= ord(ch) <= 0xDCFF:
            code = ord(ch) - 0xDC00 if ord(ch) >= 0xDC80 else ord(ch)
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


def escape_note(text: str) -> str:
    """One-line form of a sentence that names paths (a history note): escaped as names are,
    but with its spaces left as spaces."""
    return " ".join(map(escape, text.split(" ")))


def unescape(token: str) -> str:
    out: list[str] = []
    i = 0
    back = {"\\": "\\", "s": " ", "n": "\n", "t": "\t", "r": "\r"}
    while i < len(token):
        ch = token[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        nxt = token[i + 1 : i + 2]
        if nxt in back:
            out.append(back[nxt])
            i += 2
        elif nxt == "x":
            code = int(token[i + 2 : i + 4], 16)
            out.append(chr(code + 0xDC00) if code >= 0x80 else chr(code))
            i += 4
        else:
            raise ValueError(f"bad escape at {i} in {token!r}")
    return "".join(out)
