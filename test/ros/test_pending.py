"""Pending view sets without DDS: a set handed to the worker and not finished is pending (the held
pose is not republished meanwhile, held_pose.py), and the hand-off to the worker and the
bookkeeping are one step (no check-then-act race with the worker taking its waiting set)."""

import threading

import pytest

from mvreg_ros.ros.pending import PendingStamps
from mvreg_ros.ros.worker import LatestJobWorker

S = 1_000_000_000


class ScriptedWorker:
    """A worker with one running and one waiting slot, moved by the test."""

    def __init__(self):
        self.running = None
        self.waiting = None
        self.before_submit = None  # what the worker thread does just before the next submit lands

    def busy_with_waiting(self) -> bool:
        return self.waiting is not None

    def take_waiting(self):
        self.running, self.waiting = self.waiting, None

    def submit(self, job) -> bool:
        if self.before_submit is not None:
            self.before_submit()
            self.before_submit = None
        replaced = self.waiting is not None
        if self.running is None:
            self.running = job
        else:
            self.waiting = job
        return not replaced


# ------------------------------------------------------------------ pending or not (the stamp rule: held_pose.py)


def test_any_is_true_while_a_set_is_pending():
    p = PendingStamps()
    w = ScriptedWorker()
    assert not p.any()
    p.submit(w, "set15", 15 * S)
    p.submit(w, "set18", 18 * S)
    assert p.any()
    p.finish(15 * S)
    assert p.any()
    p.finish(18 * S)
    assert not p.any()


def test_clear_forgets_every_pending_stamp():
    p = PendingStamps()
    w = ScriptedWorker()
    p.submit(w, "a", 1 * S)
    p.submit(w, "b", 2 * S)
    p.clear()
    assert not p.any() and p.stamps() == []
    p.finish(1 * S)  # the running set finishing later changes nothing
    assert p.stamps() == []
    assert p.submit(ScriptedWorker(), "c", 3 * S) and p.stamps() == [3 * S]


# ------------------------------------------------------------------ the hand-off


def test_a_replaced_waiting_set_is_no_longer_pending():
    p, w = PendingStamps(), ScriptedWorker()
    assert p.submit(w, "a", 1 * S)  # runs
    assert p.submit(w, "b", 2 * S)  # waits
    assert not p.submit(w, "c", 3 * S)  # replaces b
    assert p.stamps() == [1 * S, 3 * S] and (w.running, w.waiting) == ("a", "c")
    p.finish(1 * S)
    w.running = None
    w.take_waiting()
    p.finish(3 * S)
    assert p.stamps() == []
    p.finish(3 * S)  # finishing twice (or an unknown stamp) is harmless
    assert p.stamps() == []


def test_the_worker_taking_its_waiting_set_during_the_hand_off_keeps_that_set_pending():
    """The race of a check-then-act hand-off: the node saw a waiting set (busy_with_waiting()),
    the worker thread then started it, and the new set took the free slot instead of replacing
    it. Dropping the 'replaced' stamp on the strength of the earlier check would forget a set
    that is running, and the held pose would be republished at or after its stamp."""
    p, w = PendingStamps(), ScriptedWorker()
    p.submit(w, "a", 1 * S)
    p.submit(w, "b", 2 * S)
    p.finish(1 * S)  # a is done ...
    w.running = None
    assert w.busy_with_waiting()  # ... and b still waits, as a check right now would see
    w.before_submit = w.take_waiting  # the worker starts b before the new set lands
    assert p.submit(w, "c", 3 * S)  # nothing was replaced
    assert (w.running, w.waiting) == ("b", "c")
    assert p.stamps() == [2 * S, 3 * S]


def test_a_failing_submit_changes_nothing():
    class Stopped:
        def submit(self, job):
            raise RuntimeError("worker is stopped")

    p = PendingStamps()
    with pytest.raises(RuntimeError, match="stopped"):
        p.submit(Stopped(), "a", 1 * S)
    assert p.stamps() == []


@pytest.mark.parametrize("stamp", [0, -1, 1.5, True, "1"])
def test_bad_stamps(stamp):
    with pytest.raises(ValueError, match="stamp_ns"):
        PendingStamps().submit(ScriptedWorker(), "a", stamp)


def test_with_the_real_worker_a_running_set_is_always_pending():
    """Many hand-offs racing the worker thread: whenever the worker runs a set its stamp is
    pending (so the held pose is not republished), and once the worker is
    idle nothing is pending (no stamp leaks and blocks the republishing for good)."""
    p = PendingStamps()
    problems = []

    def handler(stamp):
        if stamp not in p.stamps():
            problems.append(f"set {stamp} runs but is not pending")
        if not p.any():
            problems.append(f"nothing pending while set {stamp} runs")
        p.finish(stamp)

    w = LatestJobWorker(handler)
    try:
        submitted = dropped = 0
        for stamp in range(1, 3001):
            submitted += 1
            dropped += not p.submit(w, stamp, stamp)
        assert w.wait_idle(30)
        assert problems == []
        assert p.stamps() == []
        assert w.dropped == dropped and w.done == submitted - dropped
    finally:
        assert w.stop()


def test_a_set_finished_before_submit_returns_does_not_stay_pending():
    """The worker thread may run and finish a set before submit() returns: its stamp must not
    stay pending (the bookkeeping is done under the lock that finish() takes)."""
    p = PendingStamps()
    done = threading.Event()
    w = LatestJobWorker(lambda stamp: (p.finish(stamp), done.set()))
    try:
        p.submit(w, 9 * S, 9 * S)
        assert done.wait(10) and w.wait_idle(10)
        assert p.stamps() == []
    finally:
        assert w.stop()
