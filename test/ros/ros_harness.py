"""Helpers of the ROS tests (processes, waiting, the loopback-only DDS profile); the fixtures
that use them live in conftest.py.

Deadlines: every wait is on a condition and returns as soon as it holds, so the deadlines are
generous (30 s for a DDS round trip, a minute or more for a registration) and cost nothing when
the machine is quiet. All of them are multiplied by ``MVREG_TEST_TIMEOUT_SCALE`` (default 1;
e.g. 3 on a slow or crowded machine): :func:`wait_until` applies it itself, other deadlines
(subprocess timeouts, helper arguments) go through :func:`deadline`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HELPERS = Path(__file__).resolve().parent / "helpers"

FASTDDS_LOOPBACK_XML = """<?xml version="1.0" encoding="UTF-8" ?>
<profiles xmlns="http://www.eprosima.com/XMLSchemas/fastRTPS_Profiles">
  <transport_descriptors>
    <transport_descriptor>
      <transport_id>mvreg_test_udp_loopback</transport_id>
      <type>UDPv4</type>
      <interfaceWhiteList><address>127.0.0.1</address></interfaceWhiteList>
    </transport_descriptor>
  </transport_descriptors>
  <participant profile_name="mvreg_test_loopback" is_default_profile="true">
    <rtps>
      <userTransports><transport_id>mvreg_test_udp_loopback</transport_id></userTransports>
      <useBuiltinTransports>false</useBuiltinTransports>
    </rtps>
  </participant>
</profiles>
"""


def _timeout_scale() -> float:
    text = os.environ.get("MVREG_TEST_TIMEOUT_SCALE", "1")
    try:
        scale = float(text)
    except ValueError:
        raise ValueError(f"MVREG_TEST_TIMEOUT_SCALE must be a number > 0, got {text!r}") from None
    if not scale > 0 or scale == float("inf"):
        raise ValueError(f"MVREG_TEST_TIMEOUT_SCALE must be a finite number > 0, got {text!r}")
    return scale


TIMEOUT_SCALE = _timeout_scale()


def deadline(base_s: float) -> float:
    """``base_s`` seconds scaled by MVREG_TEST_TIMEOUT_SCALE (for waits that are not wait_until's)."""
    return base_s * TIMEOUT_SCALE


def wait_until(condition, timeout: float, *, step: float = 0.02, spin=None, what: str = "condition"):
    """Poll ``condition()`` (spinning ``spin(step)`` or sleeping ``step`` in between) until it
    returns something truthy; AssertionError after ``timeout`` seconds times
    MVREG_TEST_TIMEOUT_SCALE. The condition is checked once more at the deadline."""
    limit = deadline(timeout)
    end = time.monotonic() + limit
    while True:
        late = time.monotonic() > end
        value = condition()
        if value:
            return value
        if late:
            raise AssertionError(f"timed out after {limit:.0f} s waiting for {what}")
        if spin is not None:
            spin(step)
        else:
            time.sleep(step)


class RosProcess:
    """A child process whose stdout and stderr go to a file (no pipe to fill up)."""

    def __init__(self, args: list[str], env: dict, log_path: Path, cwd: Path = REPO):
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            args, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def json_lines(self) -> list[dict]:
        out = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line being written
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def interrupt(self, timeout: float = 30.0) -> int:
        """Ctrl-C (SIGINT) and wait; kills and fails the wait after ``timeout`` (scaled) seconds."""
        timeout = deadline(timeout)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"{self.args[:3]} did not stop within {timeout} s of SIGINT:\n{self.tail()}")
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self._log.close()

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-n:])


def publisher_args(spec: Path, data: Path) -> list[str]:
    """Command line of the simulated C-arm (helpers/sim_carm_publisher.py) playing ``spec``/``data``
    (ros_scenario.write_publisher_inputs), waiting up to 120 s (scaled) for the node to subscribe."""
    return [
        str(HELPERS / "sim_carm_publisher.py"),
        "--spec",
        str(spec),
        "--data",
        str(data),
        "--match-timeout",
        str(deadline(120)),
    ]


def node_args(*params_files: Path, overrides: dict | None = None) -> list[str]:
    """Command line of the node: ``python -m mvreg_ros.ros.node --ros-args --params-file ... -p k:=v``."""
    args = ["-m", "mvreg_ros.ros.node", "--ros-args"]
    for f in params_files:
        args += ["--params-file", str(f)]
    for k, v in (overrides or {}).items():
        args += ["-p", f"{k}:={json.dumps(v) if not isinstance(v, str) else v}"]
    return args
