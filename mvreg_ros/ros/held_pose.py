"""The held pose and the one stamp rule of its TF (plain Python, no rclpy; thread-safe).

The node's worker thread offers accepted poses; its timer asks :meth:`HeldPose.tick` what to
publish. The rule (docs/node.md, *The stamp rule*):

- an accepted pose is published once stamped with its newest image stamp (unless a pose was
  already published at exactly that stamp: a second registration of the same set);
- while it is held it is republished stamped with the current ROS time, but only when **no view
  set is pending** (handed to the worker and not finished): a copy of the old pose must not claim
  the time of images that are being registered; and only when that time is **later than the last
  stamp sent**: a stopped ``/clock`` (sim time) never makes the node send one stamp again and again;
- a copy is stamped ``lag_ns`` before the current time: the node's recent image latency (an image
  arrives some time after its stamp; until it has arrived, a copy stamped after it would claim
  a time the node has no images of yet, e.g. of anatomy that moved), see :class:`ImageLag`;
- it is held while its age on the ROS clock (now - image stamp) **and** the steady time since it
  was accepted are both at most ``pose_hold_s``: with a stopped or slow ``/clock`` the hold still
  ends on time, with a fast one the ROS age ends it;
- it is withdrawn at once (``valid`` false, nothing republished) by a deactivation, a rejected
  newer registration, the end of the hold, a reset or a backward time jump. A withdrawn pose stays
  the tracking start of the next registration (:meth:`latest`), except after :meth:`forget`.

:meth:`forget` (reset, time jump, cleanup) also starts a new *epoch*: a registration that began
before it cannot bring its pose back (:meth:`offer` refuses a pose of an older epoch).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import typing

from mvreg_ros.core.registration.initialisers import AcceptedPose, PoseTracker


@dataclasses.dataclass(frozen=True)
class Tick:
    """What the timer does now: send the held pose at ``stamp_ns`` (None: nothing); ``expired``:
    the hold has just ended (report it, publish pose_valid false)."""

    stamp_ns: int | None = None
    expired: bool = False


def _check_ns(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer number of nanoseconds, got {value!r}")
    return value


class HeldPose(PoseTracker):
    """The last accepted pose (a :class:`PoseTracker`, so the ``last_accepted`` initialiser reads it)
    and whether it is currently published (``valid``)."""

    @typing.no_type_check  # validates its own inputs (tests check its errors)
    def __init__(self, *, hold_s: float, republish: bool = True):
        super().__init__()
        if isinstance(hold_s, bool) or not isinstance(hold_s, (int, float)) or not hold_s >= 0:
            raise ValueError(f"hold_s must be a number >= 0, got {hold_s!r}")
        self.hold_ns = int(round(hold_s * 1e9))
        self.republish = bool(republish)
        self._valid = False
        self._epoch = 0
        self._accepted_steady_ns = 0
        self._last_sent_ns: int | None = None  # the last stamp sent on TF (image or copy)
        self.withdrawn_reason = ""

    # ------------------------------------------------------------------------ state
    @property
    def epoch(self) -> int:
        with self._lock:
            return self._epoch

    @property
    def valid(self) -> bool:
        with self._lock:
            return self._valid

    def state(self) -> str:
        """``waiting`` (no pose), ``tracking`` (held and published), ``stale`` (the hold ended) or
        ``withdrawn`` (deactivated, or a newer registration was rejected)."""
        with self._lock:
            if self._pose is None:
                return "waiting"
            if self._valid:
                return "tracking"
            return "stale" if self.withdrawn_reason == "stale" else "withdrawn"

    # -------------------------------------------------------------------- changes
    def accept(self, pose: AcceptedPose) -> None:
        """PoseTracker's interface: take ``pose`` as held and valid in the current epoch, accepted now."""
        self.offer(pose, epoch=self.epoch, steady_ns=time.monotonic_ns())

    @typing.no_type_check  # validates its own inputs (tests check its errors)
    def offer(self, pose: AcceptedPose, *, epoch: int, steady_ns: int, publish: bool = True) -> int | None:
        """Take an accepted ``pose`` computed in ``epoch`` (at steady time ``steady_ns``). Returns the
        stamp to send it with on TF (its image stamp; None: nothing to send), or raises
        :class:`StaleEpoch` when the pose was computed before a :meth:`forget`. ``publish=False``
        (an inactive node): keep it as the tracking start, withdrawn."""
        _check_ns(epoch, "epoch")
        _check_ns(steady_ns, "steady_ns")
        stamp = _check_ns(pose.stamp_ns, "pose.stamp_ns")
        with self._lock:
            if epoch != self._epoch:
                raise StaleEpoch(f"pose of epoch {epoch} offered in epoch {self._epoch} (reset or time jump since)")
            self._pose = pose
            self._accepted_steady_ns = steady_ns
            self._valid = bool(publish)
            self.withdrawn_reason = "" if publish else "inactive"
            if not publish or stamp == self._last_sent_ns:
                return None
            self._last_sent_ns = stamp
            return stamp

    def withdraw(self, reason: str) -> bool:
        """Stop publishing the held pose (kept as the tracking start); True if it was valid."""
        with self._lock:
            was = self._valid
            self._valid = False
            if was:
                self.withdrawn_reason = reason
            return was

    def forget(self) -> bool:
        """Drop the held pose (reset, time jump, cleanup) and start a new epoch; True if it was valid."""
        with self._lock:
            was = self._valid
            self._pose = None
            self._valid = False
            self._epoch += 1
            self._last_sent_ns = None
            self.withdrawn_reason = ""
            return was

    @typing.no_type_check  # validates its own inputs (tests check its errors)
    def tick(self, *, now_ns: int, steady_ns: int, pending: bool, lag_ns: int = 0) -> Tick:
        """The timer: end the hold when due, else the stamp of a copy to send (see the module doc):
        ``now_ns - lag_ns``, ``lag_ns`` being the images' recent latency (:class:`ImageLag`)."""
        _check_ns(now_ns, "now_ns")
        _check_ns(steady_ns, "steady_ns")
        if _check_ns(lag_ns, "lag_ns") < 0:
            raise ValueError(f"lag_ns must be >= 0, got {lag_ns!r}")
        with self._lock:
            pose = self._pose
            if pose is None or not self._valid:
                return Tick()
            if now_ns - pose.stamp_ns > self.hold_ns or steady_ns - self._accepted_steady_ns > self.hold_ns:
                self._valid = False
                self.withdrawn_reason = "stale"
                return Tick(expired=True)
            stamp = now_ns - lag_ns
            if not self.republish or pending or stamp <= pose.stamp_ns:
                return Tick()
            if self._last_sent_ns is not None and stamp <= self._last_sent_ns:
                return Tick()  # the clock did not move on (a stopped /clock): nothing new to say
            self._last_sent_ns = stamp
            return Tick(stamp_ns=stamp)


class StaleEpoch(RuntimeError):
    """A pose computed before a reset or a time jump (it must not become the held pose)."""


class ImageLag:
    """How late images arrive after their stamps (the latest ``window`` arrivals; thread-safe):
    :meth:`lag_ns` is the largest of them plus ``margin_ns``, capped at ``max_ns`` (an image
    stamped long ago, e.g. a stale or corrupt one, must not stop the republishing for long).
    Images stamped in the future count as 0."""

    @typing.no_type_check  # validates its own inputs (tests check its errors)
    def __init__(self, *, window: int = 20, margin_ns: int = 20_000_000, max_ns: int = 1_000_000_000):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        if _check_ns(margin_ns, "margin_ns") < 0 or _check_ns(max_ns, "max_ns") < 0:
            raise ValueError(f"margin_ns and max_ns must be >= 0, got {margin_ns!r}, {max_ns!r}")
        self.margin_ns, self.max_ns = margin_ns, max_ns
        self._lags: collections.deque[int] = collections.deque(maxlen=window)
        self._lock = threading.Lock()

    @typing.no_type_check  # validates its own inputs (tests check its errors)
    def arrived(self, stamp_ns: int, now_ns: int) -> None:
        """An image stamped ``stamp_ns`` arrived at ROS time ``now_ns``."""
        lag = _check_ns(now_ns, "now_ns") - _check_ns(stamp_ns, "stamp_ns")
        with self._lock:
            self._lags.append(min(max(lag, 0), self.max_ns))

    def lag_ns(self) -> int:
        with self._lock:
            return min(max(self._lags) + self.margin_ns, self.max_ns) if self._lags else 0

    def clear(self) -> None:
        with self._lock:
            self._lags.clear()
