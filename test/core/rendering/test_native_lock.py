"""The native kernel's build lock (native._clear_stale_lock): torch would wait for it without limit."""

import os
import threading
import time

import pytest

from mvreg_ros.core.rendering.native import _clear_stale_lock


def test_no_lock_returns_at_once(tmp_path):
    t = time.perf_counter()
    _clear_stale_lock(tmp_path, stale_s=60.0, poll_s=0.01)
    assert time.perf_counter() - t < 0.5


def test_an_old_lock_is_removed(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - 700.0
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        _clear_stale_lock(tmp_path, stale_s=600.0, poll_s=0.01)
    assert not lock.exists()


def test_a_fresh_lock_is_waited_for_until_its_build_ends(tmp_path, recwarn):
    """Another process building: wait until it lets go, and leave its lock alone."""
    lock = tmp_path / "lock"
    lock.touch()
    threading.Timer(0.3, lock.unlink).start()
    t = time.perf_counter()
    _clear_stale_lock(tmp_path, stale_s=60.0, poll_s=0.02)
    assert 0.25 < time.perf_counter() - t < 5.0
    assert not [w for w in recwarn if "stale build lock" in str(w.message)]


def test_a_lock_left_by_a_killed_build_moments_ago_is_removed_once_stale(tmp_path):
    """A restart right after a killed build: the lock is fresh and nobody will remove it. The
    wait ends when it turns stale, instead of never (torch's own wait)."""
    lock = tmp_path / "lock"
    lock.touch()
    t = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        _clear_stale_lock(tmp_path, stale_s=0.4, poll_s=0.02)
    assert 0.35 < time.perf_counter() - t < 5.0
    assert not lock.exists()
