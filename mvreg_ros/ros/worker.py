"""One background thread that runs registrations, with a single waiting slot (plain Python).

Subscriptions and TF keep flowing while a registration runs. Nothing queues without bound:
while the thread is busy, at most one job waits; a newer job replaces it and the replaced
one counts as dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class LatestJobWorker:
    def __init__(
        self,
        handler: Callable[[Any], None],
        *,
        name: str = "registration",
        on_error: Callable[[BaseException], None] | None = None,
        on_start: Callable[[], None] | None = None,
    ):
        self._handler = handler
        self._on_error = on_error
        self._on_start = on_start  # run first in the thread (the node: compute_threads.compute_thread)
        self._cv = threading.Condition()
        self._pending: Any = None
        self._has_pending = False
        self._busy = False
        self._stop = False
        self.dropped = 0
        self.done = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._cv:
            return self._busy or self._has_pending

    @property
    def stopping(self) -> bool:
        with self._cv:
            return self._stop

    def busy_with_waiting(self) -> bool:
        """True when a job is waiting (the next submit replaces it). Only a snapshot: the thread may
        take the waiting job right after; to act on whether a submit replaced a job, use
        :meth:`submit`'s answer (``PendingStamps.submit`` in pending.py does)."""
        with self._cv:
            return self._has_pending

    def submit(self, job: Any) -> bool:
        """Queue ``job``; False when it replaced a waiting job (that one is dropped)."""
        with self._cv:
            if self._stop:
                raise RuntimeError("worker is stopped")
            replaced = self._has_pending
            if replaced:
                self.dropped += 1
            self._pending, self._has_pending = job, True
            self._cv.notify()
            return not replaced

    def drop_waiting(self) -> bool:
        """Drop the waiting job, if any (counted as dropped); True if there was one."""
        with self._cv:
            had = self._has_pending
            if had:
                self.dropped += 1
            self._pending, self._has_pending = None, False
            return had

    def _run(self) -> None:
        if self._on_start is not None:
            try:
                self._on_start()
            except BaseException as e:  # reported like a failing job; the worker still runs
                if self._on_error is not None:
                    self._on_error(e)
        while True:
            with self._cv:
                while not self._has_pending and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                job, self._pending, self._has_pending = self._pending, None, False
                self._busy = True
            try:
                self._handler(job)
            except BaseException as e:  # a crashing job must not kill the worker
                if self._on_error is not None:
                    self._on_error(e)
            finally:
                with self._cv:
                    self._busy = False
                    self.done += 1
                    self._cv.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job runs or waits; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._busy and not self._has_pending, timeout)

    def stop(self, timeout: float | None = 5.0) -> bool:
        """Drop a waiting job, let a running one finish (up to ``timeout``); True when the thread ended."""
        with self._cv:
            self._stop = True
            if self._has_pending:
                self.dropped += 1
            self._pending, self._has_pending = None, False
            self._cv.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()
