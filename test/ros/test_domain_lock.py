"""The test sessions' ROS domains: each session locks its own id, a second one takes the next."""

import pytest
from conftest import lock_free_domain


def test_a_locked_domain_is_skipped_and_freed_on_close(tmp_path):
    path = str(tmp_path / "domain_{}.lock")
    first, f1 = lock_free_domain(range(1, 4), path)
    second, f2 = lock_free_domain(range(1, 4), path)  # another open file: flock conflicts like another process
    assert (first, second) == (1, 2)
    f1.close()
    third, f3 = lock_free_domain(range(1, 4), path)
    assert third == 1
    f4 = lock_free_domain(range(1, 4), path)[1]
    with pytest.raises(RuntimeError, match="every ROS test domain 1..3 is locked"):
        lock_free_domain(range(1, 4), path)
    for f in (f2, f3, f4):
        f.close()


def test_this_session_holds_its_domain(ros_env, ros_domain):
    import fcntl
    import os

    assert ros_env["ROS_DOMAIN_ID"] == os.environ["ROS_DOMAIN_ID"] == str(ros_domain)
    assert 1 <= ros_domain <= 101
    with open(f"/tmp/mvreg_ros_test_domain_{ros_domain}.lock") as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
