"""Where a registration starts.

An initialiser gets a :class:`StartRequest` (the views, their stamp and, in evaluations only,
the truth) and returns a :class:`Start` or None to defer to the next one. Chains are tried in
order (:func:`first_start`); an initialiser that raises ValueError/RuntimeError also defers.

- ``last_accepted``: the last pose that passed the acceptance test (tracking), while recent;
- ``coarse_network``: the patient-specific coarse network (its fused estimate, and each view's
  own estimate as further hypotheses for the global stage);
- ``configured``: a fixed pose (e.g. the supine default);
- ``perturb``: the truth moved by an exact error (evaluation only).

A start is never an output: it only seeds the global stage and the refinement.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.geometry import carm
from mvreg_ros.core.geometry.kinematics import PlaneConfig
from mvreg_ros.core.geometry.transforms import perturb
from mvreg_ros.core.imaging.views import ViewSet
from mvreg_ros.core.imaging.volume import Volume
from mvreg_ros.core.registration.curvature import HeldCurvature


@dataclasses.dataclass(frozen=True, eq=False)
class StartRequest:
    views: ViewSet | None
    stamp_ns: int = 0
    T_true_ref_from_ct: Tensor | None = None  # evaluation only
    centre_ct: Tensor | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Start:
    T_ref_from_ct: Float[Tensor, "4 4"]  # where refinement starts (mm)
    source: str = ""  # the initialiser's name
    hypotheses: Tensor | None = None  # (N, 4, 4) further candidates for the global stage
    tracking: bool = False  # a tracking start: the fast tracking update first (TrackingConfig), then the full
    # registration if that gives no accepted result
    T_coarse_ref_from_ct: Tensor | None = None  # a coarse estimate to report (the network's)
    values: dict = dataclasses.field(default_factory=dict)  # status values (e.g. coarse_ms)
    curvature: HeldCurvature | None = None  # a tracking start's: the loss curvature its registration measured


@runtime_checkable
class Initialiser(Protocol):
    name: str

    def start(self, request: StartRequest) -> Start | None: ...


@dataclasses.dataclass(frozen=True, eq=False)
class AcceptedPose:
    T_ref_from_ct: Float[Tensor, "4 4"]
    stamp_ns: int  # stamp of the newest image it was computed from
    covariance_ref: Tensor | None = None  # (x, y, z mm, rx, ry, rz rad), ROS ordering
    curvature: HeldCurvature | None = None  # the loss curvature of its registration (RegistrationResult.curvature)


class PoseTracker:
    """The last pose that passed the acceptance test (thread-safe). Only accepted poses go in,
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


def _as_pose(T, what: str) -> Tensor:
    T = torch.as_tensor(T, dtype=torch.float64).detach().cpu()
    if T.shape != (4, 4) or not bool(torch.isfinite(T).all()):
        raise ValueError(f"{what} must be a finite 4x4 pose, got shape {tuple(T.shape)}")
    return T


class ConfiguredPose:
    """A fixed starting pose (``initial_T_ref_from_ct`` or the supine default)."""

    name = "configured"

    def __init__(self, T_ref_from_ct: Tensor):  # (4, 4); _as_pose checks it
        self.T_ref_from_ct = _as_pose(T_ref_from_ct, "initial pose")

    def start(self, request: StartRequest) -> Start:
        return Start(T_ref_from_ct=self.T_ref_from_ct.clone(), source=self.name)


class LastAcceptedPose:
    """Tracking: the last accepted pose while its stamp is at most ``max_age_ns`` before the
    new set's stamp (None: however old, when there is nothing better)."""

    name = "last_accepted"

    def __init__(self, tracker: PoseTracker, *, max_age_ns: int | None = None):
        if max_age_ns is not None and max_age_ns < 0:
            raise ValueError(f"max_age_ns must be >= 0 or None, got {max_age_ns}")
        self.tracker = tracker
        self.max_age_ns = max_age_ns

    def start(self, request: StartRequest) -> Start | None:
        pose = self.tracker.latest()
        if pose is None:
            return None
        if self.max_age_ns is not None and request.stamp_ns - pose.stamp_ns > self.max_age_ns:
            return None  # too old: the patient may have moved; defer to the next initialiser
        return Start(
            T_ref_from_ct=pose.T_ref_from_ct.clone(), source=self.name, tracking=True, curvature=pose.curvature
        )


@runtime_checkable
class PoseModel(Protocol):
    """What :class:`CoarseNetworkPose` needs of a model (``mvreg_ros.core.learning.coarse.CoarseModel``):
    ``predict(views)`` returning an object with ``T_ref_from_ct`` (4x4 mm), ``ms`` and
    optionally ``T_ref_from_ct_views`` (V, 4, 4)."""

    def predict(self, views: ViewSet): ...


class CoarseNetworkPose:
    """The patient-specific coarse network: its fused ``T_ref_from_ct``, with each view's own
    estimate as further hypotheses. ``last_ms``: time of the last prediction (ms)."""

    name = "coarse_network"

    def __init__(self, model: PoseModel | object):  # checked for predict() below
        if not callable(getattr(model, "predict", None)):
            raise TypeError(f"model must have a predict(views) method, got {type(model).__name__}")
        self.model = model
        self.last_ms: float | None = None

    def start(self, request: StartRequest) -> Start:
        if request.views is None:
            raise ValueError("the coarse network needs the views")
        estimate = self.model.predict(request.views)
        T = _as_pose(estimate.T_ref_from_ct, "the coarse network's estimate")
        self.last_ms = float(estimate.ms)
        views_T = getattr(estimate, "T_ref_from_ct_views", None)
        hyp = None
        if views_T is not None:
            hyp = torch.as_tensor(views_T, dtype=torch.float64).detach().cpu()
            hyp = hyp[torch.isfinite(hyp).flatten(1).all(1)] if hyp.ndim == 3 else None
        return Start(
            T_ref_from_ct=T,
            source=self.name,
            hypotheses=hyp,
            T_coarse_ref_from_ct=T,
            values={"coarse_ms": f"{self.last_ms:.1f}"},
        )


class PerturbedTruth:
    """Evaluation only: the truth moved by exactly ``rot_deg`` about a random axis through the
    anatomy centre, then ``trans_mm`` in a random direction; requests draw in order from one
    seeded generator."""

    name = "perturb"

    def __init__(self, *, rot_deg: float, trans_mm: float, seed: int):
        self.rot_deg, self.trans_mm = rot_deg, trans_mm
        self.generator = torch.Generator().manual_seed(int(seed))

    def start(self, request: StartRequest) -> Start:
        if request.T_true_ref_from_ct is None or request.centre_ct is None:
            raise ValueError("the perturbed-truth start needs the truth and the anatomy centre")
        T = perturb(
            request.T_true_ref_from_ct,
            rot_deg=self.rot_deg,
            trans_mm=self.trans_mm,
            centre_ct=request.centre_ct,
            generator=self.generator,
        )
        return Start(T_ref_from_ct=T, source=self.name)


class ModelError(ValueError):
    """The coarse network cannot be used (the message names the file and why)."""


SID_TOLERANCE_MM = 25.0  # how far a C-arm's source-isocentre distance may be from the network's


def check_model_sid(model_sid_mm: float, sids_mm: Mapping[str, float], *, what: str = "the coarse network") -> None:
    """ModelError when a C-arm's source-to-isocentre distance (``sids_mm``: name -> mm) differs by
    more than :data:`SID_TOLERANCE_MM` from the one the network was trained for: the network
    places the anatomy at that depth, and its estimates would be off by about the difference."""
    for name, sid in sids_mm.items():
        if abs(float(sid) - model_sid_mm) > SID_TOLERANCE_MM:
            raise ModelError(
                f"{what} was trained for a source-to-isocentre distance of {model_sid_mm:g} mm, "
                f"{name} has {float(sid):g} mm (more than {SID_TOLERANCE_MM:g} mm apart): its depth estimates "
                f"would be off by about {abs(float(sid) - model_sid_mm):.0f} mm; train it for this C-arm "
                f"(mvreg train ... --sid-mm {float(sid):g})"
            )


def load_coarse_model(path: str, volume: Volume, *, device: str = "cpu", sids_mm: Mapping[str, float] | None = None):
    """The ``mvreg train`` checkpoint at ``path`` as a ``CoarseModel`` for ``volume``; ModelError
    for a missing file, a file that is not a checkpoint, one made for another CT or architecture,
    or one trained for another source-to-isocentre distance than the C-arms' ``sids_mm``
    (:func:`check_model_sid`)."""
    from mvreg_ros.core.learning.coarse import CoarseModel
    from mvreg_ros.core.learning.network import CheckpointError

    p = Path(path).expanduser()
    try:
        model = CoarseModel.load(p, volume=volume, device=device)
    except FileNotFoundError:
        raise ModelError(f"model_path: coarse network checkpoint not found: {p}") from None
    except CheckpointError as e:
        raise ModelError(f"model_path: cannot use the coarse network: {e}") from e  # e names the file
    except Exception as e:  # safetensors / JSON / torch errors of a damaged file
        raise ModelError(f"model_path: cannot load the coarse network {p}: {type(e).__name__}: {e}") from e
    try:
        check_model_sid(model.geometry.sid_mm, sids_mm or {}, what=f"the coarse network {p}")
    except ModelError as e:
        raise ModelError(f"model_path: {e}") from None
    return model


def supine_at_isocentre(plane: PlaneConfig, centre_ct: Float[Tensor, "3"]) -> Float[Tensor, "4 4"]:
    """The default starting pose: a supine patient, head toward +x of ``plane``'s isocentre
    frame, with the CT point ``centre_ct`` at the isocentre (prismatic joints at 0)."""
    return plane.T_ref_from_iso @ carm.T_iso_from_ct_supine(torch.as_tensor(centre_ct, dtype=torch.float64))


def default_initialisers(
    *,
    configured: Float[Tensor, "4 4"],
    tracker: PoseTracker,
    model: PoseModel | None = None,
    tracking_max_age_s: float | None = None,
) -> list[Initialiser]:
    """The node's chain, in order of preference: the last accepted pose, the coarse network
    (with ``model``), the configured pose.

    With a model, the last accepted pose is used only while it is at most ``tracking_max_age_s``
    older than the new set (None: always); an older one yields to the network. Without a model
    the last accepted pose is used however old: it is still a better start than the configured one."""
    if tracking_max_age_s is not None and not tracking_max_age_s >= 0:
        raise ValueError(f"tracking_max_age_s must be >= 0 or None, got {tracking_max_age_s}")
    max_age_ns = None if model is None or tracking_max_age_s is None else int(round(tracking_max_age_s * 1e9))
    chain: list[Initialiser] = [LastAcceptedPose(tracker, max_age_ns=max_age_ns)]
    if model is not None:
        chain.append(CoarseNetworkPose(model))
    chain.append(ConfiguredPose(configured))
    return chain


def first_start(initialisers: Sequence[Initialiser], request: StartRequest) -> Start:
    """The first start offered by ``initialisers``. An initialiser that fails (e.g. the network
    gives a non-finite pose) defers to the next one."""
    failures = []
    for init in initialisers:
        try:
            start = init.start(request)
        except (ValueError, RuntimeError) as e:
            failures.append(f"{init.name}: {e}")
            continue
        if start is not None:
            return start
    raise RuntimeError(
        "no initialiser gave a starting pose"
        + (f" ({'; '.join(failures)})" if failures else " (the chain must end with a configured pose)")
    )
