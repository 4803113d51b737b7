"""Backward time jumps (plain Python, no rclpy).

A restarted simulation, a bag played again (``ros2 bag play --loop``) or a C-arm whose clock was
reset sends stamps from before everything the node holds: joint-state history, waiting images,
pending sets, the held pose. None of that may be mixed with the new time line, so the node
clears it all when :class:`TimeJumpDetector` reports a jump:

- the ROS clock going back at all (with sim time: ``/clock`` restarted). rclpy's jump callback
  reports it first where it fires; :meth:`clock` also checks each reading of the clock, which
  covers the rest;
- a joint state stamped more than ``joint_jump_s`` before the newest joint state seen (bag
  replay without ``/clock``: the stamps jump back while the wall clock does not). Joint states
  stream continuously from one source, so a large step back is a new time line, not late
  delivery; a small one stays an out-of-order input that is rejected.
"""

from __future__ import annotations

import typing


class TimeJumpDetector:
    @typing.no_type_check  # validates its own inputs (tests check its errors)
    def __init__(self, *, joint_jump_s: float):
        if isinstance(joint_jump_s, bool) or not isinstance(joint_jump_s, (int, float)) or not joint_jump_s > 0:
            raise ValueError(f"joint_jump_s must be a number > 0, got {joint_jump_s!r}")
        self.joint_jump_ns = int(round(joint_jump_s * 1e9))
        self._last_now: int | None = None
        self._newest_joint: int | None = None

    @staticmethod
    def _ns(value, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer number of nanoseconds, got {value!r}")
        return value

    @typing.no_type_check  # validates its own inputs (tests check its errors)
    def clock(self, now_ns: int) -> str | None:
        """A reading of the ROS clock; the reason when it went back since the last reading."""
        now_ns = self._ns(now_ns, "now_ns")
        last, self._last_now = self._last_now, now_ns
        if last is not None and now_ns < last:
            return f"the ROS clock went back {(last - now_ns) * 1e-9:.3f} s (to {now_ns * 1e-9:.3f} s)"
        return None

    @typing.no_type_check  # validates its own inputs (tests check its errors)
    def joint_stamp(self, stamp_ns: int) -> str | None:
        """A joint-state stamp; the reason when it lies more than ``joint_jump_s`` before the newest.
        The stamp then starts the new time line."""
        stamp_ns = self._ns(stamp_ns, "stamp_ns")
        newest = self._newest_joint
        if newest is not None and stamp_ns < newest - self.joint_jump_ns:
            self._newest_joint = stamp_ns
            return (
                f"a joint state stamped {(newest - stamp_ns) * 1e-9:.3f} s before the newest one "
                f"(from {newest * 1e-9:.3f} s back to {stamp_ns * 1e-9:.3f} s)"
            )
        self._newest_joint = stamp_ns if newest is None else max(newest, stamp_ns)
        return None

    @typing.no_type_check  # validates its own inputs (tests check its errors)
    def restart(self, now_ns: int | None = None) -> None:
        """Forget what was seen (after a jump was handled, or at cleanup); ``now_ns``: the clock now."""
        self._last_now = None if now_ns is None else self._ns(now_ns, "now_ns")
        self._newest_joint = None
