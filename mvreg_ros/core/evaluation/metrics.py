"""Registration errors: 3D target registration error and projection distance."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.geometry.transforms import invert, project, rotation_angle_deg, transform_points


def mtre_mm(
    T_est_ref_from_ct: Float[Tensor, "4 4"],
    T_true_ref_from_ct: Float[Tensor, "4 4"],
    landmarks_ct: Float[Tensor, "N 3"],
) -> float:
    """Mean 3D distance (mm) between the landmarks mapped by the estimate and by the truth."""
    a = transform_points(T_est_ref_from_ct, landmarks_ct.to(T_est_ref_from_ct))
    b = transform_points(T_true_ref_from_ct, landmarks_ct.to(T_true_ref_from_ct))
    return float((a - b).norm(dim=-1).mean())


def mpd_mm(
    T_est_ref_from_ct: Tensor,
    T_true_ref_from_ct: Tensor,
    landmarks_ct: Tensor,
    K: Float[Tensor, "V 3 3"],
    T_ref_from_cam: Float[Tensor, "V 4 4"],
    pixel_mm: Float[Tensor, "V"] | float,  # noqa: F821
) -> float:
    """Mean distance (mm at the detector) between the landmarks' projections under the
    estimate and under the truth, over all views."""
    T_cam_from_ref = invert(T_ref_from_cam)
    lm = landmarks_ct.to(T_est_ref_from_ct)[None]
    a = project(K, T_cam_from_ref @ T_est_ref_from_ct, lm)
    b = project(K, T_cam_from_ref @ T_true_ref_from_ct, lm)
    d = (a - b).norm(dim=-1) * torch.as_tensor(pixel_mm, dtype=a.dtype).reshape(-1, 1)
    return float(d.mean())


def pose_distance(
    T_a: Float[Tensor, "*N 4 4"], T_b: Float[Tensor, "*N 4 4"], centre_ct: Float[Tensor, "3"]
) -> tuple[Tensor, Tensor]:
    """Rotation angle between the poses (degrees) and displacement of ``centre_ct`` between them
    (mm), batched."""
    D = T_a @ invert(T_b)
    c = centre_ct.to(T_a)
    moved = (T_a[..., :3, :3] - T_b[..., :3, :3]) @ c + T_a[..., :3, 3] - T_b[..., :3, 3]
    return rotation_angle_deg(D[..., :3, :3]), moved.norm(dim=-1)


def pose_errors(T_est: Tensor, T_true: Tensor, centre_ct: Tensor) -> tuple[float, float]:
    """Rotation error (deg) and translation error of ``centre_ct`` (mm)."""
    rot, trans = pose_distance(T_est, T_true, centre_ct)
    return float(rot), float(trans)
