"""Motion safety of sequential acquisition (plain Python, no rclpy, no torch): the decisions only.

A mobile C-arm's view set mixes shots taken seconds apart; the anatomy may move in between. The
node never publishes a pose that the newest view contradicts (docs/node.md, *Motion safety*):

1. **The held pose against a new view** (:func:`held_pose_contradicted`): before a new set is
   registered, its newest view is compared with the held pose: its similarity there (against
   the level the held pose's views reached when it was accepted) and a short single-view
   refinement from there (how far that view alone moves the anatomy in its image, and what it
   gains). A contradiction withdraws the held pose at once (``motion_detected``); the views the
   held pose was computed from (stamped at or before it) are then pre-motion and leave the set.
2. **The views of a set against each other** (:func:`judge_set`): after a joint registration,
   the engine's per-view agreement (``Verdict.disagreeing_views``) says which views want the
   anatomy elsewhere. When any does, the views on the newest view's side (the newest alone if it
   is among the disagreeing ones, else every view that agrees with the joint result) are
   registered again if there are at least two of them and fewer than all; otherwise the set is
   rejected. Views on the other side are pre-motion: :class:`MotionState` keeps them (and
   everything older) out of later sets.

The node computes the numbers (``ros/pipeline.py``: :func:`~mvreg_ros.ros.pipeline.probe_view`,
the engine's verdict) and wires these decisions; the tests feed them constructed values.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import typing
from collections.abc import Sequence

from mvreg_ros.core.registration.acceptance import AcceptanceConfig


def _number(value, name: str, *, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or (low is not None and value < low):
        raise ValueError(f"{name} must be a finite number{'' if low is None else f' >= {low}'}, got {value!r}")
    return float(value)


def _stamp(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer number of nanoseconds, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 ns, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class MotionConfig:
    """Thresholds of the held-pose check (node parameters ``motion_*``, ros/params.py)."""

    similarity_drop: float = 0.2  # a new view this far below the held pose's accepted level contradicts it
    min_similarity: float = AcceptanceConfig().min_view_similarity  # ... as does one below the acceptance test's
    max_shift_mm: float = 3.0  # a new view alone moving the anatomy further than this in its image ...
    min_gain: float = 0.05  # ... while gaining more than this similarity contradicts the held pose

    def __post_init__(self):
        _number(self.similarity_drop, "similarity_drop", low=0.0)
        _number(self.min_similarity, "min_similarity")
        _number(self.max_shift_mm, "max_shift_mm", low=0.0)
        _number(self.min_gain, "min_gain", low=0.0)


@typing.no_type_check  # validates its own inputs (tests check its errors)
def held_pose_contradicted(
    similarity: float, shift_mm: float, gain: float, *, accepted_level: float, config: MotionConfig
) -> str:
    """Why the newest view contradicts the held pose ('' when it does not): its ``similarity`` at
    the held pose, and ``shift_mm`` / ``gain`` of its single-view refinement from there, against
    ``accepted_level`` (the lowest view similarity of the held pose's own registration). A value
    that is not finite (the check failed) counts as a contradiction: nothing unchecked is held."""
    for name, v in (("similarity", similarity), ("shift_mm", shift_mm), ("gain", gain)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a number, got {v!r}")
    level = _number(accepted_level, "accepted_level")
    if not all(math.isfinite(v) for v in (similarity, shift_mm, gain)):
        return (
            f"the newest view could not be checked against the held pose (similarity {similarity}, shift "
            f"{shift_mm} mm, gain {gain})"
        )
    floor = level - config.similarity_drop
    if similarity < config.min_similarity:
        return (
            f"the newest view's similarity at the held pose is {similarity:.3f}, below min_similarity "
            f"{config.min_similarity}"
        )
    if similarity < floor:
        return (
            f"the newest view's similarity at the held pose is {similarity:.3f}, more than "
            f"motion_similarity_drop {config.similarity_drop} below the {level:.3f} its registration reached"
        )
    if shift_mm > config.max_shift_mm and gain > config.min_gain:
        return (
            f"the newest view alone moves the anatomy {shift_mm:.1f} mm from the held pose (more than "
            f"motion_max_shift_mm {config.max_shift_mm}) and gains {gain:.3f} similarity (more than "
            f"motion_min_gain {config.min_gain})"
        )
    return ""


@dataclasses.dataclass(frozen=True)
class SetDecision:
    """What to do with a registered set: ``accept`` (the engine's verdict stands), ``reregister``
    (register again from ``views``, indices into the set) or ``reject`` (``reason``).
    ``pre_motion_ns``: the newest stamp of the views that contradict the newest one (None when
    none does): they and everything older leave later sets."""

    action: str
    views: tuple[int, ...] = ()
    reason: str = ""
    pre_motion_ns: int | None = None


@typing.no_type_check  # validates its own inputs (tests check its errors)
def judge_set(
    stamps_ns: Sequence[int], disagreeing_views: Sequence[int], *, min_views: int = 2, subset: bool = False
) -> SetDecision:
    """The per-view agreement of a registered set whose views have ``stamps_ns`` (any order; the
    newest view is the one with the largest stamp) and whose verdict flagged ``disagreeing_views``.
    ``subset``: this set is already a re-registration (a disagreement now rejects it)."""
    if isinstance(stamps_ns, (str, bytes)) or not isinstance(stamps_ns, Sequence):
        raise TypeError(f"stamps_ns must be a sequence of integer stamps, got {stamps_ns!r}")
    stamps = [_stamp(s, f"stamps_ns[{i}]") for i, s in enumerate(stamps_ns)]
    n = len(stamps)
    if n == 0:
        raise ValueError("stamps_ns is empty: a set has at least one view")
    if len(set(stamps)) != n:
        raise ValueError(f"stamps_ns has a stamp twice: {stamps}")
    if isinstance(min_views, bool) or not isinstance(min_views, int) or min_views < 1:
        raise ValueError(f"min_views must be an integer >= 1, got {min_views!r}")
    if isinstance(disagreeing_views, (str, bytes)) or not isinstance(disagreeing_views, Sequence):
        raise TypeError(f"disagreeing_views must be a sequence of view indices, got {disagreeing_views!r}")
    flagged = set()
    for i in disagreeing_views:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"disagreeing_views must hold view indices, got {i!r}")
        if not 0 <= i < n:
            raise ValueError(f"disagreeing view {i} outside 0..{n - 1}")
        flagged.add(i)
    if not flagged:
        return SetDecision("accept")
    newest = max(range(n), key=lambda i: stamps[i])
    side = [newest] if newest in flagged else [i for i in range(n) if i not in flagged]
    others = [i for i in range(n) if i not in side]
    pre = max(stamps[i] for i in others)
    if newest in flagged:
        why = f"the newest view (view {newest}) contradicts the joint result of the older views"
    else:
        why = f"views {sorted(flagged)} contradict the newest view (view {newest})"
    if subset:
        return SetDecision(
            "reject", reason=f"motion between shots: {why}, again after dropping views", pre_motion_ns=pre
        )
    if len(side) >= min_views and len(side) < n:
        return SetDecision(
            "reregister",
            views=tuple(sorted(side)),
            reason=f"motion between shots: {why}; registering again from views {sorted(side)}",
            pre_motion_ns=pre,
        )
    return SetDecision(
        "reject",
        reason=f"motion between shots: {why}; {len(side)} view(s) on the newest view's side, {min_views} needed",
        pre_motion_ns=pre,
    )


class MotionState:
    """What the node remembers about motion (thread-safe): the stamp up to which views are
    pre-motion (they leave later sets), and the level the held pose's views reached."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pre_motion_ns: int | None = None
        self._level: float | None = None

    @property
    def pre_motion_ns(self) -> int | None:
        with self._lock:
            return self._pre_motion_ns

    @property
    def accepted_level(self) -> float | None:
        with self._lock:
            return self._level

    def moved(self, pre_motion_ns: int) -> None:
        """Views stamped at or before ``pre_motion_ns`` show the anatomy before a motion."""
        _stamp(pre_motion_ns, "pre_motion_ns")
        with self._lock:
            self._pre_motion_ns = max(pre_motion_ns, self._pre_motion_ns or 0)

    def accepted(self, view_similarity: Sequence[float]) -> None:
        """A registration was accepted with these per-view similarities: its level is the lowest."""
        values = [_number(v, "view_similarity") for v in view_similarity]
        if not values:
            raise ValueError("view_similarity is empty")
        with self._lock:
            self._level = min(values)

    def forget(self) -> None:
        """A reset, a time jump or a cleanup: no motion known, no held level."""
        with self._lock:
            self._pre_motion_ns = None
            self._level = None

    @typing.no_type_check  # validates its own inputs (tests check its errors)
    def after_motion(self, stamps_ns: Sequence[int]) -> list[int]:
        """Indices of the views (by stamp) taken after the last known motion, in the given order."""
        stamps = [_stamp(s, f"stamps_ns[{i}]") for i, s in enumerate(stamps_ns)]
        with self._lock:
            cut = self._pre_motion_ns
        return [i for i, s in enumerate(stamps) if cut is None or s > cut]
