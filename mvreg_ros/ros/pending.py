"""Stamps of view sets handed to the registration worker and not finished (plain Python).

While a view set is pending, the held pose is not republished at all (the stamp rule,
held_pose.py): a copy of the old pose would claim the time of the images being registered.
:meth:`PendingStamps.submit` hands a set to the worker and records its stamp in one step under
one lock, using the worker's own answer (did the set replace a waiting one?), so the worker
taking its waiting set in between cannot make the bookkeeping drop a set that is running.
"""

from __future__ import annotations

import threading
import typing
from typing import Any, Protocol


class Worker(Protocol):
    def submit(self, job: Any) -> bool:
        """Queue ``job``; False when it replaced the waiting job (that one is dropped)."""


class PendingStamps:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stamps: list[int] = []
        self._last_submitted: int | None = None

    @staticmethod
    @typing.no_type_check  # the check of stamp_ns itself: no jaxtyping/beartype wrapper
    def _check_stamp(stamp_ns: int) -> None:
        if isinstance(stamp_ns, bool) or not isinstance(stamp_ns, int) or stamp_ns <= 0:
            raise ValueError(f"stamp_ns must be a positive integer (ns), got {stamp_ns!r}")

    @typing.no_type_check  # validates its own inputs (tests check its errors); no jaxtyping/beartype wrapper
    def submit(self, worker: Worker, job: Any, stamp_ns: int) -> bool:
        """Hand ``job`` (the view set stamped ``stamp_ns``) to ``worker`` and mark the stamp pending.

        Returns the worker's answer: False when the set replaced the one waiting (the last one
        submitted; its stamp is no longer pending). If ``worker.submit`` raises, nothing changes.
        """
        self._check_stamp(stamp_ns)
        with self._lock:  # the hand-off and the bookkeeping as one step
            took_slot = worker.submit(job)
            if not took_slot and self._last_submitted in self._stamps:
                self._stamps.remove(self._last_submitted)  # that set was dropped unregistered
            self._stamps.append(stamp_ns)
            self._last_submitted = stamp_ns
            return took_slot

    def finish(self, stamp_ns: int) -> None:
        """The set stamped ``stamp_ns`` is done (registered, rejected or failed)."""
        with self._lock:
            if stamp_ns in self._stamps:
                self._stamps.remove(stamp_ns)

    def stamps(self) -> list[int]:
        with self._lock:
            return sorted(self._stamps)

    def any(self) -> bool:
        """A set is pending: the held pose is not republished at all until it is done (held_pose.py)."""
        with self._lock:
            return bool(self._stamps)

    def clear(self) -> None:
        """Forget every pending stamp (a backward time jump: those sets belong to the old time line;
        a set still running finishes harmlessly, its ``finish`` finds nothing)."""
        with self._lock:
            self._stamps.clear()
            self._last_submitted = None
