"""Where a registration starts (plain Python/PyTorch).

Initialisers are tried in order; the first that returns a pose wins (:func:`default_initializers`):

1. ``last_accepted``: the last pose that passed every gate (tracking), while it is recent;
2. ``coarse_network``: the patient-specific coarse network's fused estimate from the views
   themselves (only when the node has a model);
3. ``configured``: the fixed ``initial_T_ref_from_ct`` (or the supine default).

A starting pose is never published by itself: it only seeds the refinement, whose result must
pass the quality gates (pipeline.py).
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from ..core import carm
from ..core.kinematics import PlaneConfig
from ..core.views import ViewSet
from ..core.volume import Volume


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
    """Tracking: start from the last accepted pose while its stamp is at most ``max_age_ns``
    before the new set's stamp (None: however old, when there is nothing better)."""

    name = "last_accepted"

    def __init__(self, tracker: PoseTracker, *, max_age_ns: int | None = None):
        if max_age_ns is not None and max_age_ns < 0:
            raise ValueError(f"max_age_ns must be >= 0 or None, got {max_age_ns}")
        self.tracker = tracker
        self.max_age_ns = max_age_ns

    def initial_pose(self, views: ViewSet, stamp_ns: int) -> Tensor | None:
        pose = self.tracker.latest()
        if pose is None:
            return None
        if self.max_age_ns is not None and stamp_ns - pose.stamp_ns > self.max_age_ns:
            return None  # too old: the patient may have moved; defer to the next initialiser
        return pose.T_ref_from_ct.clone()


@runtime_checkable
class PoseModel(Protocol):
    """What :class:`CoarseNetworkPose` needs of a model (``mvreg_ros.core.coarse.CoarseModel``):
    ``predict(views)`` returning an object with ``T_ref_from_ct`` (4x4 mm) and ``ms``."""

    def predict(self, views: ViewSet): ...


class CoarseNetworkPose:
    """The patient-specific coarse network: one fused ``T_ref_from_ct`` from the views (each
    view's prediction mapped to ref through its known camera pose). ``last_ms`` is the time of
    the last prediction (ms), for the status."""

    name = "coarse_network"

    def __init__(self, model: PoseModel):
        if not callable(getattr(model, "predict", None)):
            raise TypeError(f"model must have a predict(views) method, got {type(model).__name__}")
        self.model = model
        self.last_ms: float | None = None

    def initial_pose(self, views: ViewSet, stamp_ns: int) -> Tensor:
        estimate = self.model.predict(views)
        T = torch.as_tensor(estimate.T_ref_from_ct, dtype=torch.float64).detach().cpu()
        if T.shape != (4, 4) or not bool(torch.isfinite(T).all()):
            raise ValueError(f"the coarse network gave no finite 4x4 pose (shape {tuple(T.shape)})")
        self.last_ms = float(estimate.ms)
        return T

    def status_values(self) -> dict[str, str]:
        return {} if self.last_ms is None else {"coarse_ms": f"{self.last_ms:.1f}"}


class ModelError(ValueError):
    """The coarse network cannot be used (the message names the file and why)."""


def load_coarse_model(path: str, volume: Volume, *, device: str = "cpu"):
    """The ``mvreg train`` checkpoint at ``path`` as a ``CoarseModel`` for ``volume``; ModelError
    for a missing file, a file that is not a checkpoint, or one made for another CT or architecture."""
    from ..core.coarse import CoarseModel
    from ..core.network import CheckpointError

    p = Path(path).expanduser()
    try:
        return CoarseModel.load(p, volume=volume, device=device)
    except FileNotFoundError:
        raise ModelError(f"model_path: coarse network checkpoint not found: {p}") from None
    except CheckpointError as e:
        raise ModelError(f"model_path: cannot use the coarse network: {e}") from e  # e names the file
    except Exception as e:  # safetensors / JSON / torch errors of a damaged file
        raise ModelError(f"model_path: cannot load the coarse network {p}: {type(e).__name__}: {e}") from e


def supine_at_isocentre(plane: PlaneConfig, centre_ct: Float[Tensor, "3"]) -> Float[Tensor, "4 4"]:
    """The default starting pose: a supine patient, head toward +x of ``plane``'s isocentre
    frame, with the CT point ``centre_ct`` at the isocentre (prismatic joints at 0)."""
    return plane.T_ref_from_iso @ carm.T_iso_from_ct_supine(torch.as_tensor(centre_ct, dtype=torch.float64))


def default_initializers(*, configured: Float[Tensor, "4 4"], tracker: PoseTracker, model: PoseModel | None = None,
                         tracking_max_age_s: float | None = None) -> list[Initializer]:
    """The initialisation strategy of the node, in order of preference: the last accepted pose,
    the coarse network (with ``model``), the configured pose.

    With a model, the last accepted pose is used only while it is at most ``tracking_max_age_s``
    older than the new set (None: always); an older one yields to the network. Without a model
    the last accepted pose is used however old: it is still a better start than the configured one."""
    if tracking_max_age_s is not None and not tracking_max_age_s >= 0:
        raise ValueError(f"tracking_max_age_s must be >= 0 or None, got {tracking_max_age_s}")
    max_age_ns = None if model is None or tracking_max_age_s is None else int(round(tracking_max_age_s * 1e9))
    chain: list[Initializer] = [LastAcceptedPose(tracker, max_age_ns=max_age_ns)]
    if model is not None:
        chain.append(CoarseNetworkPose(model))
    chain.append(ConfiguredPose(configured))
    return chain


def initial_pose(initializers: Sequence[Initializer], views: ViewSet, stamp_ns: int) -> tuple[Tensor, str]:
    """The first pose offered by ``initializers`` and the name of the one that gave it. An
    initialiser that fails (e.g. the network gives a non-finite pose) defers to the next one."""
    failures = []
    for init in initializers:
        try:
            T = init.initial_pose(views, stamp_ns)
        except (ValueError, RuntimeError) as e:
            failures.append(f"{init.name}: {e}")
            continue
        if T is not None:
            return torch.as_tensor(T, dtype=torch.float64), init.name
    raise RuntimeError("no initialiser gave a starting pose" + (f" ({'; '.join(failures)})" if failures else
                       " (the chain must end with a configured pose)"))


def status_values(initializers: Sequence[Initializer], name: str) -> dict[str, str]:
    """Extra status values of the initialiser called ``name`` (e.g. ``coarse_ms``), if it has any."""
    for init in initializers:
        if init.name == name and callable(getattr(init, "status_values", None)):
            return dict(init.status_values())
    return {}
