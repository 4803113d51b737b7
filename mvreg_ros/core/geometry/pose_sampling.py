"""Random C-arm view sets around a supine patient, the way a C-arm moves between shots.

The patient lies supine with its CT point ``centre_ct`` at the isocentre plus an offset
(uniform in +-``iso_mm`` per axis). Each view is a C-arm pose (``carm.T_iso_from_cam``:
orbital = LAO/RAO, angular = cranial/caudal) followed by an in-plane rotation of the image
about the principal axis. The first view is uniform over the range; every next view moves
the orbital joint by ``step_orbital_deg`` (random sign, kept in the range) and the angular
joint by up to ``step_angular_deg``, as between an AP and an oblique or lateral shot.
The reference frame is the isocentre frame.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.geometry import carm
from mvreg_ros.core.geometry.transforms import axis_rotation, make_T


@dataclasses.dataclass(frozen=True)
class PoseRange:
    orbital_deg: float = 75.0  # LAO/RAO, +-
    angular_deg: float = 35.0  # cranial/caudal, +-
    inplane_deg: float = 10.0  # image rotation about the principal axis, +-
    iso_mm: float = 40.0  # anatomy centre offset from the isocentre, +- per axis
    step_orbital_deg: tuple[float, float] = (30.0, 90.0)  # orbital move between shots (min, max)
    step_angular_deg: float = 20.0  # angular move between shots, +-
    sid_mm: float = 700.0

    def __post_init__(self):
        if min(self.orbital_deg, self.angular_deg, self.inplane_deg, self.iso_mm) < 0:
            raise ValueError(f"ranges must be non-negative: {self}")
        lo, hi = self.step_orbital_deg
        if not 0 <= lo <= hi:
            raise ValueError(f"step_orbital_deg must be (min, max) with 0 <= min <= max, got {self.step_orbital_deg}")
        if self.sid_mm <= 0:
            raise ValueError(f"sid_mm must be positive, got {self.sid_mm}")


@dataclasses.dataclass(frozen=True)
class ViewSetGeometry:
    """Known truth of sampled view sets (ref = isocentre frame)."""

    T_ref_from_ct: Float[Tensor, "B 4 4"]
    T_ref_from_cam: Float[Tensor, "B V 4 4"]
    joints_deg: Float[Tensor, "B V 3"]  # orbital, angular, in-plane

    @property
    def T_cam_from_ct(self) -> Float[Tensor, "B V 4 4"]:
        from mvreg_ros.core.geometry.transforms import invert

        return invert(self.T_ref_from_cam) @ self.T_ref_from_ct[:, None]


def _uniform(n, lo, hi, g):
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _reflect(x: Tensor, lim: float) -> Tensor:
    """Fold values back into [-lim, lim] (a C-arm that hits its limit turns the other way)."""
    if lim <= 0:
        return torch.zeros_like(x)
    period = 4 * lim
    y = torch.remainder(x + lim, period)
    return torch.where(y > 2 * lim, period - y, y) - lim


def T_cam_from_inplane(angle_rad: Tensor) -> Float[Tensor, "... 4 4"]:
    """Rotation of the image about the principal axis (camera z)."""
    angle = torch.as_tensor(angle_rad, dtype=torch.float64)
    return make_T(axis_rotation(2, angle), torch.zeros(*angle.shape, 3, dtype=torch.float64))


def sample_view_sets(
    n: int,
    n_views: int,
    *,
    centre_ct: Float[Tensor, "3"],
    pose_range: PoseRange = PoseRange(),
    generator: torch.Generator,
) -> ViewSetGeometry:
    """``n`` view sets of ``n_views`` views each."""
    if n < 1 or n_views < 1:
        raise ValueError(f"n ({n}) and n_views ({n_views}) must be >= 1")
    r, g = pose_range, generator
    orb = [_uniform(n, -r.orbital_deg, r.orbital_deg, g)]
    ang = [_uniform(n, -r.angular_deg, r.angular_deg, g)]
    for _ in range(1, n_views):
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
        step = _uniform(n, *r.step_orbital_deg, g) * sign
        nxt = orb[-1] + step
        # prefer the direction that stays inside the range
        nxt = torch.where(nxt.abs() > r.orbital_deg, orb[-1] - step, nxt)
        orb.append(_reflect(nxt, r.orbital_deg))
        ang.append(_reflect(ang[-1] + _uniform(n, -r.step_angular_deg, r.step_angular_deg, g), r.angular_deg))
    orb_t, ang_t = torch.stack(orb, 1), torch.stack(ang, 1)
    inpl = _uniform(n * n_views, -r.inplane_deg, r.inplane_deg, g).reshape(n, n_views)
    T_iso_from_cam = carm.T_iso_from_cam(torch.deg2rad(orb_t), torch.deg2rad(ang_t), sid_mm=r.sid_mm)
    T_ref_from_cam = T_iso_from_cam @ T_cam_from_inplane(torch.deg2rad(inpl))
    offset = _uniform(n * 3, -r.iso_mm, r.iso_mm, g).reshape(n, 3)
    c = centre_ct.to(torch.float64)
    T_ref_from_ct = torch.stack([carm.T_iso_from_ct_supine(c, offset[b]) for b in range(n)])
    return ViewSetGeometry(
        T_ref_from_ct=T_ref_from_ct, T_ref_from_cam=T_ref_from_cam, joints_deg=torch.stack([orb_t, ang_t, inpl], -1)
    )


def canonical_rotation(dtype=torch.float64) -> Float[Tensor, "3 3"]:
    """``R_cam_from_ct`` of the AP view (zero joints) of the supine patient."""
    return (carm.R_ISO_FROM_CAM0.T @ carm.R_ISO_FROM_CT_SUPINE).to(dtype)


def max_rotation_deg(pose_range: PoseRange) -> float:
    """Upper bound of the rotation away from the AP view over the range (for documentation)."""
    return math.degrees(
        math.sqrt(
            math.radians(pose_range.orbital_deg) ** 2
            + math.radians(pose_range.angular_deg) ** 2
            + math.radians(pose_range.inplane_deg) ** 2
        )
    )
