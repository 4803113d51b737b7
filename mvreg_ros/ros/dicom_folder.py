"""The watched-folder source of the DICOM bridge (pure bookkeeping + a plain directory listing).

Only files that appear after the bridge started are read, each once, when it is *settled*: its
size and modification time unchanged across two polls (a file written in place), or at once on
the first poll that sees it complete when it was moved in atomically (a rename gives the same
size on the next poll too, so the rule is the same: two polls). Hidden files (``.name``) and
names ending in ``.tmp``, ``.part``, ``.partial`` or ``~`` (files still being written) are
ignored, and so are directories, symbolic links and anything that is not a regular file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

IGNORED_SUFFIXES = (".tmp", ".part", ".partial", "~")

Listing = Mapping[str, tuple[int, int]]  # name -> (size bytes, mtime ns)


def ignored(name: str) -> bool:
    return name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES)


def list_folder(folder: str | Path) -> dict[str, tuple[int, int]]:
    """Regular files directly in ``folder`` (no links, no recursion), name -> (size, mtime ns)."""
    out = {}
    with os.scandir(folder) as it:
        for entry in it:
            if ignored(entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                out[entry.name] = (int(st.st_size), int(st.st_mtime_ns))
    return out


class SettledFiles:
    """New files of a folder that stopped changing. ``SettledFiles(initial)`` ignores the files of
    ``initial`` (present when the bridge started); :meth:`poll` returns, in name order, the names
    that are new and settled, each once. A name that disappears and comes back is new again."""

    def __init__(self, initial: Listing):
        self._done: set[str] = set(initial)
        self._last: dict[str, tuple[int, int]] = {}

    def poll(self, listing: Listing) -> list[str]:
        ready = []
        for name in sorted(listing):
            if name in self._done or ignored(name):
                continue
            size_mtime = tuple(listing[name])
            if self._last.get(name) == size_mtime and size_mtime[0] > 0:
                ready.append(name)
                self._done.add(name)
                self._last.pop(name, None)
            else:
                self._last[name] = size_mtime
        # forget names that are gone, so a file written again under the same name is read again
        self._done &= set(listing)
        self._last = {n: v for n, v in self._last.items() if n in listing}
        return ready
