"""ROS test fixtures: real rclpy and DDS, confined to loopback and to a domain of our own.

Every DDS participant of a test session (this process and the processes it starts) uses a
Fast DDS profile that only knows UDPv4 on 127.0.0.1, and a ROS_DOMAIN_ID derived from the
pid. Child processes are started with the venv's interpreter and an environment without
``_ROS_WHEELS_BOOTSTRAP_COMPLETE`` so the ROS wheels' bootstrapper sets LD_LIBRARY_PATH again.
"""

from __future__ import annotations

import os
import sys

import pytest

from ros_harness import FASTDDS_LOOPBACK_XML, RosProcess


@pytest.fixture(scope="session")
def ros_env(tmp_path_factory):
    """Environment for ROS child processes; also applied to this process (for in-process rclpy)."""
    d = tmp_path_factory.mktemp("ros")
    profile = d / "fastdds_loopback.xml"
    profile.write_text(FASTDDS_LOOPBACK_XML)
    (d / "log").mkdir()
    settings = {
        "ROS_DOMAIN_ID": str(os.getpid() % 100 + 1),
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
