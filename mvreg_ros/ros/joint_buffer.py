"""Stamped joint-state history with linear interpolation at an image's stamp (plain Python).

Each joint keeps its own time series, so joint states arriving from several publishers
(each naming a subset of the joints) mix correctly. Stamps are integer nanoseconds.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import threading
from collections.abc import Iterable, Sequence

TOLERANCE_S = 0.1  # an image at most this newer than the newest joint state uses that state
MAX_GAP_S = 0.5  # joint states further apart than this, the joint moving, are not interpolated


class JointStateError(LookupError):
    """Why joint values cannot be given for a stamp (the message is the reason)."""


@dataclasses.dataclass
class _Series:
    stamps: list[int] = dataclasses.field(default_factory=list)
    values: list[float] = dataclasses.field(default_factory=list)


class JointStateBuffer:
    """Joint positions over the last ``window_s`` seconds.

    ``positions_at(stamp)`` interpolates linearly between the samples around ``stamp``. A
    stamp before the oldest sample is outside the buffer (an error). A stamp after the
    newest sample holds the newest value if it is at most ``tolerance_s`` newer (joint states
    of a still C-arm come at a finite rate), otherwise the joint states are stale (an error).
    Between two samples more than ``max_gap_s`` apart the joint's path is unknown: if the joint
    moved between them the stamp cannot be interpolated (an error); if it did not (equal values
    within ``still_tolerance``), its position is that value.
    """

    def __init__(
        self,
        *,
        window_s: float = 10.0,
        tolerance_s: float = TOLERANCE_S,
        max_gap_s: float = MAX_GAP_S,
        still_tolerance: float = 1e-6,
        joints: Iterable[str] | None = None,
    ):
        if not (window_s > 0 and math.isfinite(window_s)):
            raise ValueError(f"window_s must be positive, got {window_s}")
        if not (tolerance_s >= 0 and math.isfinite(tolerance_s)):
            raise ValueError(f"tolerance_s must be >= 0, got {tolerance_s}")
        if not (max_gap_s > 0 and math.isfinite(max_gap_s)):
            raise ValueError(f"max_gap_s must be positive, got {max_gap_s}")
        if not (still_tolerance >= 0 and math.isfinite(still_tolerance)):
            raise ValueError(f"still_tolerance must be >= 0, got {still_tolerance}")
        self.window_ns = int(window_s * 1e9)
        self.tolerance_ns = int(tolerance_s * 1e9)
        self.max_gap_ns = int(max_gap_s * 1e9)
        self.still_tolerance = float(still_tolerance)
        self.joints = None if joints is None else frozenset(joints)
        self._series: dict[str, _Series] = {}
        self._lock = threading.Lock()

    def add(self, stamp_ns: int, names: Sequence[str], positions: Sequence[float]) -> None:
        """Store one JointState message; raises JointStateError (nothing stored) when it is
        malformed or not newer than what is stored for one of its joints."""
        if len(names) != len(positions):
            raise JointStateError(f"joint state has {len(names)} names but {len(positions)} positions")
        pairs = [(str(n), float(p)) for n, p in zip(names, positions) if self.joints is None or n in self.joints]
        if not pairs:
            return
        if len({n for n, _ in pairs}) != len(pairs):
            raise JointStateError(f"joint state names a joint twice: {[n for n, _ in pairs]}")
        bad = [n for n, p in pairs if not math.isfinite(p)]
        if bad:
            raise JointStateError(f"joint state has non-finite positions for {bad}")
        with self._lock:
            for n, _ in pairs:
                s = self._series.get(n)
                if s is not None and s.stamps and stamp_ns <= s.stamps[-1]:
                    raise JointStateError(
                        f"out-of-order joint state: stamp {stamp_ns * 1e-9:.6f} s is not newer than the last one "
                        f"for {n!r} ({s.stamps[-1] * 1e-9:.6f} s)"
                    )
            for n, p in pairs:
                s = self._series.setdefault(n, _Series())
                s.stamps.append(stamp_ns)
                s.values.append(p)
                # forget samples older than the window, keep at least two
                cut = bisect.bisect_left(s.stamps, stamp_ns - self.window_ns)
                cut = min(cut, len(s.stamps) - 2)
                if cut > 0:
                    del s.stamps[:cut]
                    del s.values[:cut]

    def newest_ns(self, joint: str) -> int | None:
        with self._lock:
            s = self._series.get(joint)
            return s.stamps[-1] if s and s.stamps else None

    def positions_at(self, stamp_ns: int, names: Iterable[str]) -> dict[str, float]:
        """Joint positions at ``stamp_ns``; JointStateError says why not."""
        out = {}
        with self._lock:
            for n in names:
                s = self._series.get(n)
                if s is None or not s.stamps:
                    raise JointStateError(f"no joint state received for joint {n!r}")
                t, v = s.stamps, s.values
                if stamp_ns < t[0]:
                    raise JointStateError(
                        f"stamp {stamp_ns * 1e-9:.6f} s is before the joint-state buffer of {n!r} "
                        f"(oldest {t[0] * 1e-9:.6f} s)"
                    )
                if stamp_ns >= t[-1]:
                    if stamp_ns - t[-1] > self.tolerance_ns:
                        raise JointStateError(
                            f"stale joint states: the newest state of {n!r} is {(stamp_ns - t[-1]) * 1e-9:.3f} s older "
                            f"than the stamp (tolerance {self.tolerance_ns * 1e-9:.3f} s)"
                        )
                    out[n] = v[-1]
                    continue
                i = bisect.bisect_right(t, stamp_ns)  # t[i-1] <= stamp < t[i]
                if stamp_ns == t[i - 1]:  # on a sample: no interpolation, whatever the gap after it
                    out[n] = v[i - 1]
                    continue
                gap = t[i] - t[i - 1]
                if gap > self.max_gap_ns and abs(v[i] - v[i - 1]) > self.still_tolerance:
                    raise JointStateError(
                        f"joint-state gap: {n!r} moved from {v[i - 1]:.6g} to {v[i]:.6g} between samples "
                        f"{gap * 1e-9:.3f} s apart around the stamp (max gap {self.max_gap_ns * 1e-9:.3f} s)"
                    )
                a = (stamp_ns - t[i - 1]) / (t[i] - t[i - 1])
                out[n] = v[i - 1] + a * (v[i] - v[i - 1])
        return out
