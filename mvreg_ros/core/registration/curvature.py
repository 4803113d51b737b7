"""A measured loss curvature, kept with an accepted pose for the next tracking update.

The Newton polish measures the loss curvature ``H`` (13 gradients by central differences: more than
a third of a tracking update) for its steps and the Laplace covariance. ``H`` is over the twist about
the anatomy centre in CT axes, so the loss it describes depends on the images and on where each camera
sees the anatomy from, ``T_cam_from_ct`` of each view (a motion of the anatomy and a turn of the C-arm
are the same thing to it), not on the reference frame. A tracking update starts at the last accepted
pose, a small motion away: the curvature there is that of the last registration up to that motion
(measured on the shipped CT's bench views: curvatures 1 deg / 2 mm and 2 deg / 4 mm apart differ by
factors 0.8 to 1.24 along their principal directions, and the uncertainties derived from them by at
most 4 %; README *Speed*). A :class:`HeldCurvature` carries it, with what it was measured on, so that
the update can take its Newton steps and its covariance from it where it serves
(:meth:`HeldCurvature.serves`):

- the same number of views, image size and intrinsics (within ``GEOMETRY_K_RTOL``), the same pyramid
  level (image size, samples, patch);
- each view's camera sees the anatomy from within ``max_rot_deg`` / ``max_trans_mm`` (at the anatomy
  centre) of where it did when the curvature was measured (:meth:`HeldCurvature.reaches`; the
  :class:`~mvreg_ros.core.registration.refine.Registrar` checks the result against the same reach
  before the covariance uses it);
- it has served fewer than ``max_age`` updates since it was measured (its staleness is bounded: the
  update after that measures it again).
"""

from __future__ import annotations

import dataclasses

import torch
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.evaluation.metrics import pose_distance
from mvreg_ros.core.geometry.transforms import invert
from mvreg_ros.core.imaging.views import ViewSet

GEOMETRY_K_RTOL = 1e-3  # intrinsics that differ by more than this (relative) are another detector set-up


@dataclasses.dataclass(frozen=True, eq=False)
class HeldCurvature:
    """The loss curvature ``H`` over the twist ``(w rad, t mm)`` about the anatomy centre (CT axes, the
    refinement's parameters), measured at ``T_ref_from_ct`` on views of intrinsics ``K`` seeing the
    anatomy from ``T_cam_from_ct`` at one pyramid level, with finite-difference steps ``scale`` times the
    default, ``age`` tracking updates ago."""

    H: Float[Tensor, "6 6"]
    T_ref_from_ct: Float[Tensor, "4 4"]  # where it was measured
    T_cam_from_ct: Float[Tensor, "V 4 4"]  # each view's T_cam_from_ct there: where its camera sees the anatomy from
    K: Float[Tensor, "V 3 3"]  # the views' (full-size) intrinsics
    image_size: tuple[int, int]  # (height, width) of those views
    level: tuple[int, int, int]  # the level's (size px, samples per ray, patch px)
    scale: float = 1.0
    age: int = 0

    def __post_init__(self):
        if tuple(self.H.shape) != (6, 6) or not bool(torch.isfinite(self.H).all()):
            raise ValueError(f"H must be a finite 6x6 matrix, got shape {tuple(self.H.shape)}")
        if tuple(self.T_ref_from_ct.shape) != (4, 4):
            raise ValueError(f"T_ref_from_ct must be 4x4, got {tuple(self.T_ref_from_ct.shape)}")
        V = len(self.T_cam_from_ct)
        if tuple(self.T_cam_from_ct.shape) != (V, 4, 4) or tuple(self.K.shape) != (V, 3, 3) or V == 0:
            raise ValueError(
                f"T_cam_from_ct (V, 4, 4) and K (V, 3, 3) must describe the same V >= 1 views, got "
                f"{tuple(self.T_cam_from_ct.shape)} and {tuple(self.K.shape)}"
            )
        if isinstance(self.age, bool) or not isinstance(self.age, int) or self.age < 0:
            raise ValueError(f"age must be an int >= 0, got {self.age!r}")

    @classmethod
    def measured(
        cls,
        H: Float[Tensor, "6 6"],
        T_ref_from_ct: Float[Tensor, "4 4"],
        views: ViewSet,
        level: tuple[int, int, int],
        *,
        scale: float = 1.0,
    ) -> "HeldCurvature":
        """A curvature just measured at ``T_ref_from_ct`` on ``views`` (age 0)."""
        T = T_ref_from_ct.detach().to(torch.float64).cpu()
        return cls(
            H=H.detach().to(torch.float64).cpu().clone(),
            T_ref_from_ct=T.clone(),
            T_cam_from_ct=_cam_from_ct(views.T_ref_from_cam, T),
            K=views.K.detach().to(torch.float64).cpu().clone(),
            image_size=(views.height, views.width),
            level=tuple(int(x) for x in level),
            scale=float(scale),
        )

    def older(self) -> "HeldCurvature":
        """The same curvature, having served one more update."""
        return dataclasses.replace(self, age=self.age + 1)

    def same_detectors(self, views: ViewSet) -> bool:
        """Whether ``views`` are as many, as large and of the same intrinsics (within ``GEOMETRY_K_RTOL``)
        as those this curvature was measured on."""
        if len(views) != len(self.K) or (views.height, views.width) != self.image_size:
            return False
        return torch.allclose(views.K.detach().to(torch.float64).cpu(), self.K, rtol=GEOMETRY_K_RTOL, atol=0.0)

    def reaches(
        self,
        T_ref_from_cam: Float[Tensor, "V 4 4"],
        T_ref_from_ct: Float[Tensor, "4 4"],
        centre_ct: Float[Tensor, "3"],
        *,
        max_rot_deg: float,
        max_trans_mm: float,
    ) -> bool:
        """Whether each camera ``T_ref_from_cam`` sees the anatomy at ``T_ref_from_ct`` from within
        ``max_rot_deg`` / ``max_trans_mm`` (the anatomy centre's displacement in the camera) of where it
        did when this curvature was measured: the anatomy moved, the C-arm turned, or both."""
        if len(T_ref_from_cam) != len(self.T_cam_from_ct):
            return False
        T = _cam_from_ct(T_ref_from_cam, T_ref_from_ct.detach().to(torch.float64).cpu())
        deg, mm = pose_distance(T, self.T_cam_from_ct, centre_ct.to(torch.float64).cpu())
        return bool((deg <= max_rot_deg).all()) and bool((mm <= max_trans_mm).all())

    def serves(
        self,
        views: ViewSet,
        T_ref_from_ct: Float[Tensor, "4 4"],
        *,
        level: tuple[int, int, int],
        centre_ct: Float[Tensor, "3"],
        max_rot_deg: float,
        max_trans_mm: float,
        max_age: int,
    ) -> bool:
        """Whether this curvature may stand in for one measured at ``T_ref_from_ct`` on ``views`` at
        ``level``: the same detectors and level, each camera within reach, younger than ``max_age``."""
        return (
            self.age < max_age
            and tuple(level) == self.level
            and self.same_detectors(views)
            and self.reaches(
                views.T_ref_from_cam, T_ref_from_ct, centre_ct, max_rot_deg=max_rot_deg, max_trans_mm=max_trans_mm
            )
        )


def _cam_from_ct(T_ref_from_cam: Float[Tensor, "V 4 4"], T_ref_from_ct: Float[Tensor, "4 4"]) -> Float[Tensor, "V 4 4"]:
    """Each view's ``T_cam_from_ct``: where its camera sees the anatomy from."""
    return invert(T_ref_from_cam.detach().to(torch.float64).cpu()) @ T_ref_from_ct[None]
