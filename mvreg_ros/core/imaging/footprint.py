"""Where the CT can explain the X-ray: the footprint of a truncated CT and of the target.

A CT that covers less than the X-ray sees (a spine CT of a few levels, cropped shoulders)
renders nothing where the X-ray shows anatomy. A ray that enters or leaves the CT's box
through a *truncated* face (one that cuts through the body) is incomplete, and so is a ray
that misses the box of a truncated CT: those pixels are masked out of the similarity.

The target footprint marks the pixels whose rays cross the rigid target (its label set,
dilated), so the similarity can weight the target above the tissue that moves.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.imaging.volume import MU_WATER_PER_MM, Volume
from mvreg_ros.core.rendering.renderer import Renderer, make_rays, pixel_grid

BODY_MU = 0.2 * MU_WATER_PER_MM  # above this: body, not air
FACES = ("i-", "i+", "j-", "j+", "k-", "k+")


def truncated_faces(volume: Volume, *, min_body_fraction: float = 0.1) -> tuple[bool, ...]:
    """For each face of the voxel box (i-, i+, j-, j+, k-, k+): does it cut through the body
    (more than ``min_body_fraction`` of its voxels are body)?"""
    body = volume.data > BODY_MU
    faces = (body[:, :, 0], body[:, :, -1], body[:, 0, :], body[:, -1, :], body[0], body[-1])
    return tuple(bool(f.float().mean() > min_body_fraction) for f in faces)


def continued(volume: Volume, mm: float) -> Volume:
    """The CT cropped to the body and continued ``mm`` beyond each face that cuts through it
    (:meth:`Volume.extended`): the patient goes on beyond a CT that is cut short, so DRRs of it
    look like X-rays of the patient at the cut ends (training renders; the Registrar does the same
    to the CT it keeps). A CT that nowhere cuts the body comes back cropped only."""
    try:
        crop = volume.cropped_to(BODY_MU)
    except ValueError:  # nothing above air
        return volume
    return crop.extended(truncated_faces(crop), mm) if mm > 0 else crop


def complete_rays(
    volume: Volume,
    T_cam_from_ct: Float[Tensor, "V 4 4"],
    K: Float[Tensor, "V 3 3"],
    height: int,
    width: int,
    *,
    faces: tuple[bool, ...] | None = None,
    margin_vox: float = 1.0,
    strict: bool = True,
) -> Float[Tensor, "V H W"]:
    """1 where the pixel's ray is complete: it crosses the CT box entering and leaving through
    faces that do not cut the body, or it misses the box of a CT that is nowhere truncated.
    ``strict=False``: every ray that crosses the box of a truncated CT counts (its footprint)."""
    faces = truncated_faces(volume) if faces is None else faces
    T = T_cam_from_ct.to(torch.float64)
    T_index_from_ct = torch.linalg.inv(volume.T_ct_from_index.to(T))
    pixels = pixel_grid(height, width, dtype=torch.float64, device=T.device)
    rays = make_rays(T_index_from_ct, volume.shape_ijk, T, K.to(T), pixels)
    hits = rays.t_far > rays.t_near
    ok = torch.ones_like(hits) if not any(faces) else hits.clone()
    lo = torch.full((3,), -0.5, dtype=T.dtype, device=T.device)
    hi = torch.tensor(volume.shape_ijk, dtype=T.dtype, device=T.device) - 0.5
    for t in (rays.t_near, rays.t_far) if strict else ():
        p = rays.origin + t[..., None] * rays.direction  # (V, R, 3) index coordinates (i, j, k)
        for axis in range(3):
            for side, bound in ((0, lo[axis]), (1, hi[axis])):
                if faces[2 * axis + side]:
                    on_face = (p[..., axis] - bound).abs() <= margin_vox
                    ok &= ~(hits & on_face)
    return ok.reshape(len(T), height, width).to(torch.float32)


def target_labels(label_names: Mapping[int, str], prefix: str, *, mask: Tensor | None = None) -> tuple[int, ...]:
    """The labels whose names start with ``prefix`` (e.g. 'vertebrae'), sorted; with ``mask``,
    only those present in it. ValueError when there is none."""
    present = None if mask is None else set(torch.unique(mask).tolist())
    labels = tuple(
        sorted(
            label
            for label, name in label_names.items()
            if name.startswith(prefix) and (present is None or label in present)
        )
    )
    if not labels:
        raise ValueError(
            f"no structure whose name starts with {prefix!r}" + (" in the label map" if mask is not None else "")
        )
    return labels


def target_volume(volume: Volume, labels: tuple[int, ...]) -> Volume:
    """The target's indicator (1 inside any of ``labels`` of the CT's label map)."""
    if volume.mask is None:
        raise ValueError("target labels need the CT's label map (a segmentation), but the volume has none")
    if not labels:
        raise ValueError("no target label given")
    inside = torch.zeros_like(volume.data, dtype=torch.bool)
    for label in labels:
        inside |= volume.mask == int(label)
    if not bool(inside.any()):
        raise ValueError(f"no voxel of the CT carries a target label {list(labels)}")
    return Volume(data=inside.to(volume.data.dtype), T_ct_from_index=volume.T_ct_from_index)


def dilate(mask: Float[Tensor, "V H W"], px: int) -> Float[Tensor, "V H W"]:
    if px <= 0:
        return mask
    return F.max_pool2d(mask[:, None], 2 * px + 1, stride=1, padding=px)[:, 0]


def target_footprint(
    renderer: Renderer,
    T_cam_from_ct: Float[Tensor, "V 4 4"],
    K: Float[Tensor, "V 3 3"],
    height: int,
    width: int,
    *,
    dilate_px: int,
    n_samples: int = 48,
) -> Float[Tensor, "V H W"]:
    """1 where the pixel's ray crosses the target (``renderer`` of :func:`target_volume`),
    grown by ``dilate_px``."""
    with torch.no_grad():
        path = renderer(T_cam_from_ct, K, height, width, n_samples=n_samples).float()
    return dilate((path > 0.02 * path.amax((-2, -1), keepdim=True).clamp_min(1e-6)).float(), dilate_px)
