"""The coarse network's training losses (the dual constraints), each batched over view sets.

Poses are ``T_cam_from_ct`` per view, shaped ``(B, V, 4, 4)``; camera poses
``T_ref_from_cam`` ``(B, V, 4, 4)`` are known. All losses are >= 0 and 0 at the truth.

1. :func:`pose_loss`: geodesic rotation (as an arc length at ``radius_mm``) plus the
   distance of the anatomy centre (depth along the view's axis weighted by ``depth_weight``),
   in units of ``scale_mm``.
2. :func:`image_loss`: 1 - multi-scale NCC between the DRR at the predicted pose and the view.
3. :func:`cross_view_pose_loss`: view i's and view j's predictions, both mapped to the
   reference frame through their known camera poses, must agree (same metric as 1).
4. :func:`cross_view_image_loss`: the DRR of view j rendered from view i's prediction, moved
   by the known relative transform ``T_cam_j_from_cam_i``, must match view j.
"""

from __future__ import annotations

import itertools

import torch
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.geometry.transforms import invert
from mvreg_ros.core.registration.similarity import multiscale_ncc


def geodesic_angle(Ra: Float[Tensor, "... 3 3"], Rb: Float[Tensor, "... 3 3"]) -> Float[Tensor, "..."]:
    """Angle (rad) of ``Ra^T Rb``, with a gradient that stays finite at zero."""
    D = Ra.transpose(-1, -2) @ Rb
    tr = D[..., 0, 0] + D[..., 1, 1] + D[..., 2, 2]
    vee = torch.stack([D[..., 2, 1] - D[..., 1, 2], D[..., 0, 2] - D[..., 2, 0], D[..., 1, 0] - D[..., 0, 1]], -1)
    s = ((vee * vee).sum(-1) + 1e-12).sqrt()
    return torch.atan2(s, tr - 1)


def _pose_distance(
    Ta: Tensor,
    Tb: Tensor,
    centre_ct: Tensor,
    *,
    radius_mm: float,
    scale_mm: float,
    depth_axis: Tensor | None,
    depth_weight: float,
) -> Tensor:
    """(radius * angle + |centre displacement|) / scale; Ta, Tb map ct to a common frame."""
    theta = geodesic_angle(Ta[..., :3, :3], Tb[..., :3, :3])
    c = centre_ct.to(Ta)
    d = (Ta[..., :3, :3] - Tb[..., :3, :3]) @ c + Ta[..., :3, 3] - Tb[..., :3, 3]
    if depth_axis is not None and depth_weight != 1.0:
        along = (d * depth_axis).sum(-1, keepdim=True)
        d = d - (1 - depth_weight) * along * depth_axis
    dist = ((d * d).sum(-1) + 1e-9).sqrt()
    return (radius_mm * theta + dist) / scale_mm


def pose_loss(
    T_pred_cam_from_ct: Float[Tensor, "B V 4 4"],
    T_true_cam_from_ct: Float[Tensor, "B V 4 4"],
    centre_ct: Float[Tensor, "3"],
    *,
    radius_mm: float = 100.0,
    scale_mm: float = 100.0,
    depth_weight: float = 1.0,
) -> Float[Tensor, "B"]:  # noqa: F821
    """Mean over views of the pose distance in each camera frame (depth = camera z)."""
    z = torch.tensor([0.0, 0.0, 1.0], dtype=T_pred_cam_from_ct.dtype, device=T_pred_cam_from_ct.device)
    d = _pose_distance(
        T_pred_cam_from_ct,
        T_true_cam_from_ct.to(T_pred_cam_from_ct),
        centre_ct,
        radius_mm=radius_mm,
        scale_mm=scale_mm,
        depth_axis=z,
        depth_weight=depth_weight,
    )
    return d.mean(-1)


def view_pairs(n_views: int) -> list[tuple[int, int]]:
    """Ordered pairs (i, j), i != j."""
    return [(i, j) for i, j in itertools.permutations(range(n_views), 2)]


def cross_view_pose_loss(
    T_pred_cam_from_ct: Float[Tensor, "B V 4 4"],
    T_ref_from_cam: Float[Tensor, "B V 4 4"],
    centre_ct: Float[Tensor, "3"],
    *,
    radius_mm: float = 100.0,
    scale_mm: float = 100.0,
) -> Float[Tensor, "B"]:  # noqa: F821
    """Mean over unordered pairs of the distance between ``T_ref_from_cam_i @ pred_i`` and
    ``T_ref_from_cam_j @ pred_j`` (0 for one view)."""
    V = T_pred_cam_from_ct.shape[1]
    if V < 2:
        return T_pred_cam_from_ct.new_zeros(T_pred_cam_from_ct.shape[0])
    T_ref = T_ref_from_cam.to(T_pred_cam_from_ct) @ T_pred_cam_from_ct
    terms = [
        _pose_distance(
            T_ref[:, i],
            T_ref[:, j],
            centre_ct,
            radius_mm=radius_mm,
            scale_mm=scale_mm,
            depth_axis=None,
            depth_weight=1.0,
        )
        for i, j in itertools.combinations(range(V), 2)
    ]
    return torch.stack(terms, -1).mean(-1)


def transfer(
    T_pred_cam_from_ct: Float[Tensor, "B V 4 4"], T_ref_from_cam: Float[Tensor, "B V 4 4"], i: int, j: int
) -> Float[Tensor, "B 4 4"]:
    """View i's prediction seen from camera j: ``inv(T_ref_from_cam_j) @ T_ref_from_cam_i @ pred_i``."""
    T_rc = T_ref_from_cam.to(T_pred_cam_from_ct)
    return invert(T_rc[:, j]) @ T_rc[:, i] @ T_pred_cam_from_ct[:, i]


def _ncc_loss(drr: Tensor, images: Tensor, masks: Tensor, patches: tuple) -> Tensor:
    return 1 - multiscale_ncc(drr, images.to(drr), masks.to(drr), patches=patches)


def image_loss(
    renderer,
    T_pred_cam_from_ct: Float[Tensor, "B V 4 4"],
    K: Float[Tensor, "B V 3 3"],
    images: Float[Tensor, "B V H W"],
    masks: Float[Tensor, "B V H W"],
    *,
    patches: tuple = (None, 8),
    n_samples: int | None = None,
) -> Float[Tensor, "B"]:  # noqa: F821
    """Mean over views of 1 - mNCC(DRR at the prediction, view); all views in one render call."""
    B, V, H, W = images.shape
    drr = renderer(T_pred_cam_from_ct.reshape(B * V, 4, 4), K.reshape(B * V, 3, 3), H, W, n_samples=n_samples)
    loss = _ncc_loss(drr, images.reshape(B * V, H, W), masks.reshape(B * V, H, W), patches)
    return loss.reshape(B, V).mean(-1)


def cross_view_image_loss(
    renderer,
    T_pred_cam_from_ct: Float[Tensor, "B V 4 4"],
    T_ref_from_cam: Float[Tensor, "B V 4 4"],
    K: Float[Tensor, "B V 3 3"],
    images: Float[Tensor, "B V H W"],
    masks: Float[Tensor, "B V H W"],
    *,
    patches: tuple = (None, 8),
    n_samples: int | None = None,
) -> Float[Tensor, "B"]:  # noqa: F821
    """Mean over ordered pairs (i, j) of 1 - mNCC(DRR of view j from view i's prediction, view j)."""
    B, V, H, W = images.shape
    if V < 2:
        return images.new_zeros(B, dtype=torch.float64)
    pairs = view_pairs(V)
    T = torch.stack([transfer(T_pred_cam_from_ct, T_ref_from_cam, i, j) for i, j in pairs], 1)  # B P 4 4
    jj = [j for _, j in pairs]
    drr = renderer(T.reshape(-1, 4, 4), K[:, jj].reshape(-1, 3, 3), H, W, n_samples=n_samples)
    loss = _ncc_loss(drr, images[:, jj].reshape(-1, H, W), masks[:, jj].reshape(-1, H, W), patches)
    return loss.reshape(B, len(pairs)).mean(-1)
