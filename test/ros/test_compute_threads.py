"""The node's compute threads: configure and registrations compute in threads of their own with
torch's thread count; the executor's thread stays single-threaded (no OpenMP pool of its own)."""

import threading

import pytest
import torch

from mvreg_ros.ros.compute_threads import compute_thread, compute_threads, light_thread, run_in_compute_thread
from mvreg_ros.ros.worker import LatestJobWorker


def _in_thread(fn):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("v", fn()))
    t.start()
    t.join()
    return out["v"]


def test_run_in_compute_thread_returns_raises_and_runs_elsewhere():
    main = threading.get_ident()
    assert run_in_compute_thread(lambda: threading.get_ident()) != main
    assert run_in_compute_thread(lambda: threading.current_thread().name, name="configure") == "configure"
    assert run_in_compute_thread(lambda: 7) == 7

    def fail():
        raise ValueError("bad CT")

    with pytest.raises(ValueError, match="bad CT"):
        run_in_compute_thread(fail)


def test_a_light_thread_stays_single_threaded_while_compute_threads_use_torchs_count():
    n = compute_threads()
    try:

        def light_then_wait():
            light_thread()
            ready.set()
            go.wait(10)
            return torch.get_num_threads()

        ready, go = threading.Event(), threading.Event()
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("light", light_then_wait()))
        t.start()
        assert ready.wait(10)
        # a thread started after the light one takes torch's process-wide count (now 1) unless it is a compute thread
        assert _in_thread(lambda: (compute_thread(), torch.get_num_threads())[1]) == n
        assert run_in_compute_thread(torch.get_num_threads) == n
        go.set()
        t.join()
        assert out["light"] == 1  # the compute threads did not raise it back
        assert compute_threads() == n  # remembered from before any thread was made light
    finally:
        torch.set_num_threads(n)


def test_worker_runs_on_start_in_its_thread_first_and_survives_its_failure():
    seen, errors = [], []
    w = LatestJobWorker(seen.append, on_start=lambda: seen.append(("start", threading.current_thread().name)))
    try:
        assert w.submit("job")
        assert w.wait_idle(10)
        assert seen == [("start", "registration"), "job"]
    finally:
        assert w.stop()

    def broken():
        raise RuntimeError("no threads")

    w = LatestJobWorker(seen.append, on_start=broken, on_error=errors.append)
    try:
        assert w.submit("after")
        assert w.wait_idle(10)
        assert seen[-1] == "after" and [str(e) for e in errors] == ["no threads"]
    finally:
        assert w.stop()
