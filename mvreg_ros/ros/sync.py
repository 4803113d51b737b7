"""Gathering views into sets to register (plain Python, no DDS).

- :class:`ApproximateTimeSync` (``synchronized`` mode: biplane or several detectors): one
  frame per image topic, all stamps within ``slop``.
- :class:`SequentialViewBuffer` (``sequential`` mode: one mobile C-arm): the last
  ``num_views`` frames whose viewing directions differ by at least ``min_separation_deg``,
  none older than ``max_age`` relative to the newest.

Stamps are integer nanoseconds; a frame's C-arm pose is resolved before it gets here.
"""

from __future__ import annotations

import collections
import dataclasses

from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.geometry.kinematics import view_angle_deg


@dataclasses.dataclass(frozen=True, eq=False)
class Frame:
    """One checked image with its intrinsics and the C-arm pose at its stamp (mm)."""

    source: int  # index of the image topic
    stamp_ns: int
    raw: Float[Tensor, "H W"]
    K: Float[Tensor, "3 3"]
    T_ref_from_cam: Float[Tensor, "4 4"]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.raw.shape)  # type: ignore[return-value]


class ApproximateTimeSync:
    """Emit one frame per source once all their stamps lie within ``slop_ns`` of each other.

    Every source keeps its last ``queue_size`` frames. When a frame arrives, each other
    source contributes its frame nearest in time to it; if the set spans at most ``slop_ns``
    it is emitted and those frames and every older one are dropped. Memory is bounded: at most
    ``queue_size`` frames per source (a full queue drops its oldest frame for the newest);
    :attr:`dropped` counts the frames that left without being part of a set."""

    def __init__(self, n_sources: int, *, slop_ns: int, queue_size: int = 10):
        if n_sources < 1:
            raise ValueError(f"n_sources must be >= 1, got {n_sources}")
        if slop_ns < 0:
            raise ValueError(f"slop_ns must be >= 0, got {slop_ns}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.n_sources = n_sources
        self.slop_ns = int(slop_ns)
        self._queues = [collections.deque(maxlen=queue_size) for _ in range(n_sources)]
        self.dropped = 0

    def add(self, frame: Frame) -> list[Frame] | None:
        if not 0 <= frame.source < self.n_sources:
            raise ValueError(f"frame source {frame.source} outside 0..{self.n_sources - 1}")
        q = self._queues[frame.source]
        if q and frame.stamp_ns <= q[-1].stamp_ns:
            raise ValueError(f"frame stamp {frame.stamp_ns} is not newer than the last of source {frame.source}")
        if len(q) == q.maxlen:
            self.dropped += 1  # the oldest frame makes room (newest wins)
        q.append(frame)
        chosen = []
        for s, queue in enumerate(self._queues):
            if s == frame.source:
                chosen.append(frame)
                continue
            if not queue:
                return None
            chosen.append(min(queue, key=lambda f: abs(f.stamp_ns - frame.stamp_ns)))
        stamps = [f.stamp_ns for f in chosen]
        if max(stamps) - min(stamps) > self.slop_ns:
            return None
        for s, f in enumerate(chosen):
            queue = self._queues[s]
            while queue and queue[0].stamp_ns <= f.stamp_ns:
                if queue.popleft() is not f:
                    self.dropped += 1
        return chosen

    def pending(self) -> int:
        return sum(len(q) for q in self._queues)


class SequentialViewBuffer:
    """The last ``num_views`` distinct views of one C-arm.

    A new frame replaces any kept frame whose viewing direction is within
    ``min_separation_deg`` of its own (the newer image of the same view wins); frames older
    than ``max_age_ns`` before the new one are forgotten; beyond ``num_views`` the oldest
    goes. Each frame that completes ``num_views`` returns the set (sorted by stamp), so later
    shots update the registration with a sliding window."""

    def __init__(self, *, num_views: int, min_separation_deg: float, max_age_ns: int):
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        if not 0 <= min_separation_deg <= 180:
            raise ValueError(f"min_separation_deg must be in [0, 180], got {min_separation_deg}")
        if max_age_ns <= 0:
            raise ValueError(f"max_age_ns must be positive, got {max_age_ns}")
        self.num_views = num_views
        self.min_separation_deg = float(min_separation_deg)
        self.max_age_ns = int(max_age_ns)
        self._frames: list[Frame] = []

    @property
    def frames(self) -> list[Frame]:
        return list(self._frames)

    def add(self, frame: Frame) -> list[Frame] | None:
        if self._frames and frame.stamp_ns <= self._frames[-1].stamp_ns:
            raise ValueError(f"frame stamp {frame.stamp_ns} is not newer than the last kept frame")
        kept = [
            f
            for f in self._frames
            if frame.stamp_ns - f.stamp_ns <= self.max_age_ns
            and view_angle_deg(f.T_ref_from_cam, frame.T_ref_from_cam) >= self.min_separation_deg
        ]
        kept.append(frame)
        self._frames = kept[-self.num_views :]
        if len(self._frames) < self.num_views:
            return None
        return list(self._frames)

    def clear(self) -> None:
        self._frames = []
