"""Which of the node's threads compute, and with how many OpenMP threads (plain Python and torch).

GNU OpenMP (the CPU build of torch uses it) keeps one pool of worker threads for each thread
that enters a parallel region, for as long as that thread lives. When the pools together hold
more threads than the machine has cores, its idle threads stop spinning between parallel
regions and sleep, so every region pays a wake-up. The node's main thread (the ROS executor,
which also ran ``configure``) and its registration thread each had a pool: on 2 cores one
elementwise product of 110 k floats took 75 us in the registration thread against 6.5 us in a
process with one pool, and a tracking update 0.63 s against 0.42 s (measured in one process,
the same sets, main thread against a second thread while the first one's pool lived).

So the node computes only in threads that run with :func:`compute_thread` (``configure`` in a
short-lived one whose pool ends with it, registrations in the worker), and its executor thread
runs torch single-threaded (:func:`light_thread`), so it never makes a pool of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

_T = TypeVar("_T")
_LOCK = threading.Lock()
_THREADS: list[int] = []  # torch's intra-op thread count before any thread was made light


def compute_threads() -> int:
    """The intra-op thread count for computing threads: torch's, as it was at the first call."""
    with _LOCK:
        if not _THREADS:
            _THREADS.append(torch.get_num_threads())
        return _THREADS[0]


def compute_thread() -> None:
    """Give the calling thread :func:`compute_threads` intra-op threads (call it first thing in
    a thread that computes: a thread not yet initialised takes torch's process-wide count, which
    :func:`light_thread` lowers)."""
    torch.set_num_threads(compute_threads())


def light_thread() -> None:
    """Run torch single-threaded in the calling thread (no OpenMP pool of its own): for the
    executor's thread, whose callbacks only convert messages and publish."""
    compute_threads()  # remember the count first
    torch.set_num_threads(1)
    torch.get_num_threads()  # initialises this thread's count now, at 1


def run_in_compute_thread(fn: Callable[[], _T], *, name: str = "compute") -> _T:
    """``fn()`` in a new :func:`compute_thread` that ends when it returns (its OpenMP pool with it);
    the caller waits. Its exception is raised here."""
    out: dict = {}

    def target() -> None:
        try:
            compute_thread()
            out["value"] = fn()
        except BaseException as e:  # handed to the caller
            out["error"] = e

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
