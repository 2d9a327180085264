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


class UnsafePathError(ProtocolError):
    """A path that would escape the replica root (absolute, ``..``, empty component, NUL)."""
