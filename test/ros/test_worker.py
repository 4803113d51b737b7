"""The registration worker: runs jobs off the caller's thread, never queues more than one."""

import threading
import time

from mvreg_ros.ros.worker import LatestJobWorker


def test_runs_jobs_and_drops_all_but_the_newest_while_busy():
    gate = threading.Event()
    started = threading.Event()
    done = []

    def handler(job):
        if job == "first":
            started.set()
            gate.wait(10)
        done.append(job)

    w = LatestJobWorker(handler)
    try:
        assert w.submit("first")
        assert started.wait(10)
        assert w.submit("a")  # waits in the slot
        assert not w.submit("b")  # replaces 'a'
        assert not w.submit("c")  # replaces 'b'
        assert w.busy and w.dropped == 2
        gate.set()
        assert w.wait_idle(10)
        assert done == ["first", "c"] and w.done == 2
    finally:
        assert w.stop()


def test_a_failing_job_does_not_kill_the_worker():
    errors, done = [], []

    def handler(job):
        if job == "bad":
            raise RuntimeError("boom")
        done.append(job)

    w = LatestJobWorker(handler, on_error=errors.append)
    w.submit("bad")
    assert w.wait_idle(10)
    w.submit("good")
    assert w.wait_idle(10)
    assert done == ["good"] and len(errors) == 1 and "boom" in str(errors[0])
    assert w.stop()


def test_stop_drops_the_waiting_job():
    gate = threading.Event()
    started = threading.Event()
    done = []

    def handler(job):
        started.set()
        gate.wait(10)
        done.append(job)

    w = LatestJobWorker(handler)
    w.submit(1)
    assert started.wait(10)
    w.submit(2)
    # stop (which drops the waiting job) before the running one may finish and take it
    result = []
    stopper = threading.Thread(target=lambda: result.append(w.stop(timeout=10)))
    stopper.start()
    deadline = time.monotonic() + 10
    while not w.stopping and time.monotonic() < deadline:
        time.sleep(0.001)
    gate.set()
    stopper.join(10)
    assert result == [True]
    assert 2 not in done and w.dropped == 1
