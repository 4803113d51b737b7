"""ROS test fixtures: real rclpy and DDS, confined to loopback and to a domain of our own.

Every DDS participant of a test session (this process and the processes it starts) uses a
Fast DDS profile that only knows UDPv4 on 127.0.0.1, and a ROS_DOMAIN_ID of its own: the first
id in 1..101 whose lock file ``/tmp/mvreg_ros_test_domain_<id>.lock`` this session can lock
exclusively (``fcntl.flock``, held until the session ends; the kernel drops it when the process
dies), so two test sessions on one machine (two clones, or CI jobs) never share a domain. The
id is set in this process's environment before any rclpy context exists and in the environment
of every child process (RosProcess and subprocess calls get ``ros_env``). Child processes are
started with the venv's interpreter and an environment without ``_ROS_WHEELS_BOOTSTRAP_COMPLETE``
so the ROS wheels' bootstrapper sets LD_LIBRARY_PATH again.
"""

from __future__ import annotations

import fcntl
import os
import sys

import pytest
from ros_harness import FASTDDS_LOOPBACK_XML, RosProcess

# ROS_DOMAIN_ID 0..101 are safe on Linux with the default ports; 0 is everyone's default
DOMAIN_IDS = range(1, 102)
DOMAIN_LOCK = "/tmp/mvreg_ros_test_domain_{}.lock"


def lock_free_domain(ids=DOMAIN_IDS, path=DOMAIN_LOCK):
    """``(domain_id, open lock file)`` for the first id whose lock file nobody holds; the lock
    lasts while the file stays open."""
    for domain in ids:
        f = open(path.format(domain), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        return domain, f
    raise RuntimeError(
        f"every ROS test domain {ids.start}..{ids.stop - 1} is locked by another test session ({path.format('*')})"
    )


@pytest.fixture(scope="session")
def ros_domain():
    """This session's ROS_DOMAIN_ID, locked against other test sessions until the session ends."""
    domain, lock = lock_free_domain()
    yield domain
    lock.close()


@pytest.fixture(scope="session")
def ros_env(tmp_path_factory, ros_domain):
    """Environment for ROS child processes; also applied to this process (for in-process rclpy)."""
    d = tmp_path_factory.mktemp("ros")
    profile = d / "fastdds_loopback.xml"
    profile.write_text(FASTDDS_LOOPBACK_XML)
    (d / "log").mkdir()
    settings = {
        "ROS_DOMAIN_ID": str(ros_domain),
        "RMW_IMPLEMENTATION": "rmw_fastrtps_cpp",
        "FASTDDS_DEFAULT_PROFILES_FILE": str(profile),
        "ROS_LOG_DIR": str(d / "log"),
        "PYTHONUNBUFFERED": "1",
        "RCUTILS_COLORIZED_OUTPUT": "0",
    }
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    env = dict(os.environ)
    env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)
    env["OMP_NUM_THREADS"] = "1"  # the node's torch shares 2 cores with everything else
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ros_context(ros_env):
    """An rclpy context of this process, on the test domain."""
    rclpy = pytest.importorskip("rclpy")
    ctx = rclpy.context.Context()
    rclpy.init(context=ctx)
    yield ctx
    rclpy.try_shutdown(context=ctx)


@pytest.fixture
def spawn(ros_env, tmp_path):
    """``spawn(name, args)`` starts a child process (venv python); all are stopped at teardown."""
    procs: list[RosProcess] = []

    def start(name: str, args: list[str]) -> RosProcess:
        p = RosProcess([sys.executable, *args], ros_env, tmp_path / f"{name}.log")
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
