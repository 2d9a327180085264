"""The one error hierarchy of repld.

``ReplError`` is the root. ``protocol/`` raises ``ProtocolError`` for anything a peer (or a bundle, or
a database row) says that breaks the rules; ``daemon/`` adds errors for configuration, the file
system and authentication, all below ``ReplError``, so the command line can turn any of them into a
message and an exit code in one place.
"""

from __future__ import annotations


class ReplError(Exception):
    """Root of every error repld raises on purpose."""

    exit_code = 1


class ProtocolError(ReplError):
    """What a peer, a bundle or a stored record said is malformed or breaks the rules."""


class WireMismatch(ProtocolError):
    """A message in another version of the wire protocol: the peer runs another repld."""

    def __init__(self, version: object, ours: int):
        super().__init__(f"wire version {version!r} not understood (this side speaks {ours})")
        self.version = version


class UnsafePathError(ProtocolError):
    """A path that would escape the replica root (absolute, ``..``, empty component, NUL)."""
