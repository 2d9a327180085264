"""Which paths are not replicated: gitignore-style rules from ROOT/.repldignore and the config.

Built in, whatever the rules say: repld's own temporary files, and the replica's state directory
and config file when they live inside the root (a home directory holds ~/.config and ~/.local).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..protocol.record import is_temp_name

if TYPE_CHECKING:
    import pathspec

log = logging.getLogger(__name__)

IGNORE_FILE = ".repldignore"


class Ignore:
    def __init__(self, root: Path, patterns: Iterable[str] = (), exclude: Iterable[Path] = (),
                 *, read_file: bool = True):  # fmt: skip
        """``patterns`` and, with ``read_file``, the lines of ROOT/.repldignore (without it:
        rules noted earlier, which hold that file's lines of then)."""
        self.root = root
        lines = list(patterns)
        try:
            if read_file:
                lines += (root / IGNORE_FILE).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            pass
        except (OSError, UnicodeDecodeError) as e:
            log.warning("cannot read %s: %s; its rules are not applied", root / IGNORE_FILE, e)
        self.spec: pathspec.GitIgnoreSpec | None = None
        if lines:
            import pathspec  # (imported only when there are rules: a tenth of the start-up)

            self.spec = pathspec.GitIgnoreSpec.from_lines(lines)
        # The rules themselves, as a replica notes them to see when they change (see
        # Replica.ignore): no blank lines, no comments.
        self.rules = [r for line in lines if (r := line.rstrip()) and not r.startswith("#")]
        self.fixed: set[str] = set()
        root_abs = root.resolve()
        for p in exclude:
            try:
                rel = p.resolve().relative_to(root_abs)
            except ValueError:
                continue
            if str(rel) != ".":
                self.fixed.add(rel.as_posix())
        self.empty = not lines and not self.fixed
        self._dirs: dict[str, bool] = {}  # directories: whether they or one above is ignored

    def may_show_more_than(self, before: list[str]) -> bool:
        """Whether these rules may let through a path that the rules ``before`` ignored: unless
        they are ``before`` (in the same order) with rules added, none of them a negation
        ("!..."), they may. (An added rule that is not a negation only ignores more.)"""
        old = set(before)
        kept = [r for r in self.rules if r in old]
        return kept != before or any(r.startswith("!") for r in self.rules if r not in old)

    def __call__(self, path: str, is_dir: bool) -> bool:
        """True if ``path`` (relative, '/'-separated) is ignored. Never the rules' own file: a
        rule such as `.*` kept it from replicating, and each replica then kept its own rules
        for good (a trial)."""
        name = path.rpartition("/")[2]
        if is_temp_name(name):
            return True
        if self.empty or path == IGNORE_FILE:
            return False
        if path in self.fixed:
            return True
        return self.spec is not None and self.spec.match_file(path + "/" if is_dir else path)

    def covers(self, path: str, is_dir: bool) -> bool:
        """True if ``path`` or a directory above it is ignored: for paths that come from
        another replica, which no walk of this tree has filtered on the way down."""
        if self(path, is_dir):
            return True
        parent = path.rpartition("/")[0]
        return bool(parent) and self._dir_covered(parent)

    def _dir_covered(self, d: str) -> bool:
        got = self._dirs.get(d)
        if got is None:
            parent = d.rpartition("/")[0]
            got = self(d, True) or (bool(parent) and self._dir_covered(parent))
            if len(self._dirs) >= 10_000:
                self._dirs.clear()
            self._dirs[d] = got
        return got
