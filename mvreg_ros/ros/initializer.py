"""Where a registration starts (plain Python/PyTorch).

Until the patient-specific coarse network exists, the starting pose is the last accepted
pose (tracking) or, before the first success, the configured ``initial_T_ref_from_ct``.
Initialisers are tried in order; the first that returns a pose wins. THE PLACE FOR THE
COARSE NETWORK is :func:`default_initializers` (see the marked comment there).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Protocol, Sequence, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from ..core import carm
from ..core.kinematics import PlaneConfig
from ..core.views import ViewSet


@runtime_checkable
class Initializer(Protocol):
    """Gives a starting ``T_ref_from_ct`` (mm) for a view set, or None to defer to the next."""

    name: str

    def initial_pose(self, views: ViewSet, stamp_ns: int) -> Float[Tensor, "4 4"] | None: ...


@dataclasses.dataclass(frozen=True, eq=False)
class AcceptedPose:
    T_ref_from_ct: Float[Tensor, "4 4"]
    stamp_ns: int  # stamp of the newest image it was computed from
    covariance_ref: Tensor | None = None  # (x, y, z mm, rx, ry, rz rad), ROS ordering


class PoseTracker:
    """The last pose that passed every quality gate (thread-safe). Only accepted poses go in,
    so a failed update never replaces a good pose."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pose: AcceptedPose | None = None

    def accept(self, pose: AcceptedPose) -> None:
        with self._lock:
            self._pose = pose

    def latest(self) -> AcceptedPose | None:
        with self._lock:
            return self._pose


class ConfiguredPose:
    """The fixed ``initial_T_ref_from_ct`` from the parameters."""

    name = "configured"

    def __init__(self, T_ref_from_ct: Float[Tensor, "4 4"]):
        T = torch.as_tensor(T_ref_from_ct, dtype=torch.float64)
        if T.shape != (4, 4):
            raise ValueError(f"initial pose must be 4x4, got {tuple(T.shape)}")
        self.T_ref_from_ct = T

    def initial_pose(self, views: ViewSet, stamp_ns: int) -> Tensor:
        return self.T_ref_from_ct.clone()


class LastAcceptedPose:
    """Tracking: start from the last accepted pose, however old (there is nothing better)."""

    name = "last_accepted"

    def __init__(self, tracker: PoseTracker):
        self.tracker = tracker

    def initial_pose(self, views: ViewSet, stamp_ns: int) -> Tensor | None:
        pose = self.tracker.latest()
        return None if pose is None else pose.T_ref_from_ct.clone()


def supine_at_isocentre(plane: PlaneConfig, centre_ct: Float[Tensor, "3"]) -> Float[Tensor, "4 4"]:
    """The default starting pose: a supine patient, head toward +x of ``plane``'s isocentre
    frame, with the CT point ``centre_ct`` at the isocentre (prismatic joints at 0)."""
    return plane.T_ref_from_iso @ carm.T_iso_from_ct_supine(torch.as_tensor(centre_ct, dtype=torch.float64))


def default_initializers(*, configured: Float[Tensor, "4 4"], tracker: PoseTracker) -> list[Initializer]:
    """The initialisation strategy of the node, in order of preference."""
    chain: list[Initializer] = [LastAcceptedPose(tracker)]
    # >>> COARSE NETWORK (later issue) <<<
    # A patient-specific coarse network (mvreg_ros.core.network) predicts T_ref_from_ct from the
    # views themselves. Wrap it in a class with ``name = "coarse_network"`` and
    # ``initial_pose(views, stamp_ns)`` (predict per view T_cam_from_ct, map to ref with
    # views.T_ref_from_cam, fuse) and insert it here, after the tracking pose and before the
    # configured one, loading the model once at start-up next to the volume (node.py).
    chain.append(ConfiguredPose(configured))
    return chain


def initial_pose(initializers: Sequence[Initializer], views: ViewSet, stamp_ns: int) -> tuple[Tensor, str]:
    """The first pose offered by ``initializers`` and the name of the one that gave it."""
    for init in initializers:
        T = init.initial_pose(views, stamp_ns)
        if T is not None:
            return torch.as_tensor(T, dtype=torch.float64), init.name
    raise RuntimeError("no initialiser gave a starting pose (the chain must end with a configured pose)")
