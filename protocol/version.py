"""Version vectors: the compact form of a file's causal history.

A version vector maps replica ids to counters. Every local event on a path bumps this replica's
counter; comparing two vectors says whether two records are in sync (``EQUAL``), one is newer
(``DOMINATES`` / ``DOMINATED``, Plan 9's prefix case) or they were changed concurrently
(``CONCURRENT``, a conflict).

Vectors are immutable and canonical: counters of zero are never stored, entries are kept sorted by
replica id, so equal vectors have equal text forms and equal hashes.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from .errors import ProtocolError

SHORT_ID_LEN = 8


class Order(enum.Enum):
    EQUAL = "equal"
    DOMINATES = "dominates"
    DOMINATED = "dominated"
    CONCURRENT = "concurrent"


def short_id(replica_id: str) -> str:
    """The display form of a replica id: its first 8 hex digits."""
    return replica_id.replace("-", "")[:SHORT_ID_LEN]


@dataclass(frozen=True, slots=True)
class VersionVector:
    entries: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, counters: Mapping[str, int] | Iterable[tuple[str, int]]) -> VersionVector:
        items = counters.items() if isinstance(counters, Mapping) else counters
        merged: dict[str, int] = {}
        for replica, counter in items:
            if counter < 0:
                raise ValueError(f"negative counter {counter} for replica {replica}")
            if counter:
                merged[replica] = max(counter, merged.get(replica, 0))
        return cls(tuple(sorted(merged.items())))

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def get(self, replica: str) -> int:
        for r, c in self.entries:
            if r == replica:
                return c
        return 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.entries)

    def bump(self, replica: str) -> VersionVector:
        """This vector with one more event by ``replica``."""
        # Built directly: the entries are already valid and sorted (once per file per scan).
        entries = list(self.entries)
        for i, (r, c) in enumerate(entries):
            if r == replica:
                entries[i] = (r, c + 1)
                return VersionVector(tuple(entries))
        entries.append((replica, 1))
        entries.sort()
        return VersionVector(tuple(entries))

    def merge(self, other: VersionVector) -> VersionVector:
        """The least vector that dominates or equals both."""
        counters = self.as_dict()
        for r, c in other.entries:
            counters[r] = max(c, counters.get(r, 0))
        return VersionVector.of(counters)

    def compare(self, other: VersionVector) -> Order:
        mine, theirs = self.as_dict(), other.as_dict()
        greater = less = False
        for r in mine.keys() | theirs.keys():
            a, b = mine.get(r, 0), theirs.get(r, 0)
            if a > b:
                greater = True
            elif a < b:
                less = True
            if greater and less:
                return Order.CONCURRENT
        if greater:
            return Order.DOMINATES
        if less:
            return Order.DOMINATED
        return Order.EQUAL

    def dominates(self, other: VersionVector) -> bool:
        """Strictly newer: every counter >= and at least one >."""
        return self.compare(other) is Order.DOMINATES

    def descends(self, other: VersionVector) -> bool:
        """Equal to or newer than ``other`` (has seen every event of it)."""
        return self.compare(other) in (Order.EQUAL, Order.DOMINATES)

    def concurrent(self, other: VersionVector) -> bool:
        return self.compare(other) is Order.CONCURRENT

    # Text forms. ``encode`` is the exact, storable form (full replica ids); ``__str__`` is what
    # people read (short ids).
    def encode(self) -> str:
        return ",".join(f"{r}:{c}" for r, c in self.entries)

    @classmethod
    def decode(cls, text: str) -> VersionVector:
        # Vectors are immutable, and a replica's records share few distinct ones (after a first
        # scan, all are "<this replica>:1"): reading a directory's records decodes each once.
        if (known := _DECODED.get(text)) is not None and cls is VersionVector:
            return known
        vector = cls._parse(text)
        if len(text) <= _DECODED_TEXT_MAX and cls is VersionVector:
            if len(_DECODED) >= _DECODED_MAX:
                _DECODED.clear()
            _DECODED[text] = vector
        return vector

    @classmethod
    def _parse(cls, text: str) -> VersionVector:
        if not text:
            return cls()
        pairs: list[tuple[str, int]] = []
        for part in text.split(","):
            replica, sep, counter = part.rpartition(":")
            # (str.isdigit takes "²" and other digits int() refuses, and int() refuses more
            # than 4300 digits: a peer's text is untrusted, and only ValueError-free checks
            # may stand between it and int().)
            if not (sep and REPLICA_ID.fullmatch(replica) and _COUNTER.fullmatch(counter)):
                raise ProtocolError(f"malformed version vector entry {part[:80]!r}")
            n = int(counter)
            if n > COUNTER_MAX:
                raise ProtocolError(f"version vector counter {counter} is over {COUNTER_MAX}")
            pairs.append((replica, n))
        return cls.of(pairs)

    def __str__(self) -> str:
        return ",".join(f"{short_id(r)}:{c}" for r, c in self.entries) or "-"


# What a version vector's text may hold: replica ids (UUIDs, or any short plain name) and
# counters that SQLite stores as 64-bit integers.
REPLICA_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
_COUNTER = re.compile(r"[0-9]{1,19}")
COUNTER_MAX = (1 << 63) - 1

# decode's cache: short texts only (a peer's vectors are untrusted, up to 64 KiB), bounded.
_DECODED: dict[str, VersionVector] = {}
_DECODED_MAX = 4096
_DECODED_TEXT_MAX = 1024
