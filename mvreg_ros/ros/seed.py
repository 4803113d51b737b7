"""A starting pose given at run time (``~/initial_pose``), as an initialiser of the engine's chain
(plain Python/PyTorch, no rclpy).

:class:`SeedPose` follows the engine's initialiser protocol (``name``, ``start(request)``), like
its ``ConfiguredPose``, but its pose is set while the node runs. It comes first in the node's
chains: a set registered after a seed starts there (global stage, refinement, acceptance test:
a seed is never published by itself) until a registration that started from it is accepted,
or a newer seed, a reset or a time jump replaces or clears it. :func:`check_seed` checks the
message's frame and pose before it becomes a seed.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

from mvreg_ros.core.registration.initialisers import Start, StartRequest

SEED_KEY = "initial_pose_seq"  # status value of a start from a seed: which seed (1, 2, ...)


def check_seed(
    frame_id: str,
    position: tuple[float, float, float],
    quaternion: tuple[float, float, float, float],
    *,
    reference_frame: str,
) -> tuple[tuple[float, float, float], tuple[float, float, float, float]]:
    """The position (m) and unit quaternion of an initial pose, or ValueError naming the problem:
    a frame other than ``reference_frame`` (a leading '/' is ignored), a non-finite value, a
    position beyond 1 km, a quaternion that is not of unit norm (within 1 %)."""
    if not isinstance(frame_id, str):
        raise TypeError(f"frame_id must be a string, got {frame_id!r}")
    if frame_id.lstrip("/") != reference_frame:
        raise ValueError(
            f"initial pose in frame {frame_id!r}: it must be given in reference_frame {reference_frame!r} "
            f"(the node does not look up TF)"
        )
    values = [float(v) for v in (*position, *quaternion)]
    if len(values) != 7 or not all(math.isfinite(v) for v in values):
        raise ValueError(
            f"initial pose has a non-finite value: position {tuple(position)}, orientation {tuple(quaternion)}"
        )
    if max(abs(v) for v in values[:3]) > 1000.0:
        raise ValueError(f"initial pose position {tuple(values[:3])} m is more than 1 km from {reference_frame!r}")
    norm = math.sqrt(sum(v * v for v in values[3:]))
    if abs(norm - 1.0) > 0.01:
        raise ValueError(f"initial pose orientation {tuple(values[3:])} is not a unit quaternion (norm {norm:.4f})")
    q = tuple(v / norm for v in values[3:])
    return tuple(values[:3]), q


class SeedPose:
    """The run-time starting pose (4x4, mm in reference_frame) of the ``initial_pose`` initialiser."""

    name = "initial_pose"

    def __init__(self):
        self._lock = threading.Lock()
        self._T: Tensor | None = None
        self._seq = 0

    def set(self, T_ref_from_ct: Tensor) -> int:
        """Seed the next registrations with ``T_ref_from_ct``; returns the seed's number."""
        T = torch.as_tensor(T_ref_from_ct, dtype=torch.float64).detach().cpu()
        if T.shape != (4, 4) or not bool(torch.isfinite(T).all()):
            raise ValueError(f"a seed must be a finite 4x4 pose, got shape {tuple(T.shape)}")
        with self._lock:
            self._seq += 1
            self._T = T.clone()
            return self._seq

    def clear(self) -> bool:
        """Forget the seed; True if there was one."""
        with self._lock:
            had = self._T is not None
            self._T = None
            return had

    def used(self, start_values: dict) -> bool:
        """A registration that started from seed ``start_values[SEED_KEY]`` was accepted: that seed is
        done (a newer seed stays). True if the seed was cleared."""
        with self._lock:
            if self._T is not None and start_values.get(SEED_KEY) == str(self._seq):
                self._T = None
                return True
            return False

    @property
    def pending(self) -> bool:
        with self._lock:
            return self._T is not None

    def start(self, request: StartRequest) -> Start | None:
        with self._lock:
            if self._T is None:
                return None
            return Start(T_ref_from_ct=self._T.clone(), source=self.name, values={SEED_KEY: str(self._seq)})
