"""Log lines that stay one line each, whatever the names in them.

A file name may hold a newline (Linux allows any byte but ``/`` and NUL): written as it is, it
would split its message in two, and a name chosen to look like a message ("x\\nrepld: ERROR:
...") could forge a line of the daemon's log. The message part of each record is written with
its control characters escaped; a traceback, added after it, keeps its lines.
"""

from __future__ import annotations

import logging

_CONTROL = {i: f"\\x{i:02x}" for i in range(32)} | {
    ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", 0x7F: "\\x7f",
}  # fmt: skip


class OneLineFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        if any(ord(c) < 32 or c == "\x7f" for c in record.message):
            record.message = record.message.translate(_CONTROL)
        return super().formatMessage(record)


def one_line(handlers: list[logging.Handler], fmt: str, datefmt: str | None = None) -> None:
    """Give ``handlers`` a formatter of ``fmt`` that keeps each message on its line."""
    for h in handlers:
        h.setFormatter(OneLineFormatter(fmt, datefmt))
