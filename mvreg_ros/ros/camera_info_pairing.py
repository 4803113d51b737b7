"""Pairing each image with its CameraInfo (plain Python, no DDS).

An image topic and its CameraInfo topic are not ordered with respect to each other. An image
takes the CameraInfo with its own stamp; when none has arrived yet it waits up to ``wait_s``
for it, then takes the latest CameraInfo of its topic (None when there is none: the caller
rejects the image). One image waits per topic: a newer image releases the waiting one first,
so images leave in the order they came.

Stamps are integer nanoseconds; images and CameraInfo messages are opaque objects here.
"""

from __future__ import annotations

import collections
import threading
import time
import typing
from collections.abc import Callable
from typing import Any, NamedTuple


class PairedImage(NamedTuple):
    """An image ready to use: its topic index, stamp and CameraInfo (None: none received yet)."""

    index: int
    image: Any
    stamp_ns: int
    info: Any


class CameraInfoPairing:
    @typing.no_type_check  # validates its own inputs (tests check its errors); no jaxtyping/beartype wrapper
    def __init__(self, n_topics: int, *, wait_s: float, history: int = 20, clock: Callable[[], float] = time.monotonic):
        if isinstance(n_topics, bool) or not isinstance(n_topics, int) or n_topics < 1:
            raise ValueError(f"n_topics must be an integer >= 1, got {n_topics!r}")
        if not wait_s >= 0:  # also refuses NaN
            raise ValueError(f"wait_s must be >= 0, got {wait_s!r}")
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be an integer >= 1, got {history!r}")
        self.n_topics = n_topics
        self.wait_s = float(wait_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._infos = [collections.deque(maxlen=history) for _ in range(n_topics)]  # (stamp, info), oldest first
        self._waiting: list[tuple[Any, int, float] | None] = [None] * n_topics  # (image, stamp, since)

    def _check_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.n_topics:
            raise ValueError(f"topic index {index!r} outside 0..{self.n_topics - 1}")

    def _latest(self, index: int) -> Any:
        return self._infos[index][-1][1] if self._infos[index] else None

    def _release(self, index: int) -> PairedImage:
        image, stamp, _ = self._waiting[index]
        self._waiting[index] = None
        return PairedImage(index, image, stamp, self._latest(index))

    def add_info(self, index: int, stamp_ns: int, info: Any) -> list[PairedImage]:
        """Keep ``info``; returns the waiting image of the topic when this is its CameraInfo."""
        self._check_index(index)
        with self._lock:
            self._infos[index].append((stamp_ns, info))
            waiting = self._waiting[index]
            if waiting is not None and waiting[1] == stamp_ns:
                self._waiting[index] = None
                return [PairedImage(index, waiting[0], stamp_ns, info)]
            return []

    def add_image(self, index: int, image: Any, stamp_ns: int) -> list[PairedImage]:
        """The images now ready to use, oldest first: a waiting image this one pushes out (with
        the latest CameraInfo), then this one when its CameraInfo is here (or ``wait_s`` is 0)."""
        self._check_index(index)
        with self._lock:
            info = next((m for s, m in reversed(self._infos[index]) if s == stamp_ns), None)
            ready = [self._release(index)] if self._waiting[index] is not None else []
            if info is not None:
                ready.append(PairedImage(index, image, stamp_ns, info))
                return ready
            self._waiting[index] = (image, stamp_ns, self._clock())
            if self.wait_s == 0:
                ready.append(self._release(index))
            return ready

    def flush_due(self) -> list[PairedImage]:
        """Images that waited ``wait_s`` or longer, each with the latest CameraInfo of its topic."""
        with self._lock:
            now = self._clock()
            return [
                self._release(i) for i, w in enumerate(self._waiting) if w is not None and now - w[2] >= self.wait_s
            ]

    def waiting(self, index: int) -> bool:
        self._check_index(index)
        with self._lock:
            return self._waiting[index] is not None
