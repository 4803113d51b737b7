"""The one landmark policy: which CT points every reported registration error (mTRE, mPD) uses.

Per data source:

- ``file``: a file that carries landmarks (DeepFluoro's ``vol-landmarks``, a stress-simulator file
  whose landmarks sit on the rigid target) is scored with those, unchanged.
- ``structure-centroids``: a CT with a segmentation (a TotalSegmentator-style label map, as the
  shipped CT has) is scored at the centroids of its labelled structures of at least
  ``MIN_VOXELS`` voxels, the ``MAX_STRUCTURES`` largest, largest first, named by their labels'
  names when known (``label-<n>`` otherwise).
- ``bone-octants``: a CT without a segmentation (or with fewer than ``MIN_STRUCTURES`` such
  structures) is scored at the bone centroid of each octant of the bone's bounding box (at most 8;
  bone is above ``BONE_HU``).

:func:`ct_landmarks` applies the last two to a :class:`Volume`; every command that reports an error
(``mvreg demo``, ``eval``, ``bench``, ``train``, ``bag replay``, the simulated-file writer) takes its
points from here, and its JSON names the policy (:meth:`Landmarks.describe`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

MAX_STRUCTURES = 40
MIN_VOXELS = 5
MIN_STRUCTURES = 4
POLICIES = ("file", "structure-centroids", "bone-octants")


@dataclass(frozen=True)
class Landmarks:
    """Named landmark points in the CT's LPS frame (mm) and the policy that chose them."""

    names: tuple[str, ...]
    points_ct: Float[Tensor, "N 3"]
    policy: str

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"landmark policy must be one of {POLICIES}, got {self.policy!r}")
        if self.points_ct.ndim != 2 or self.points_ct.shape[1] != 3 or len(self.points_ct) == 0:
            raise ValueError(f"landmark points must be (N, 3) with N >= 1, got {tuple(self.points_ct.shape)}")
        if len(self.names) != len(self.points_ct):
            raise ValueError(f"{len(self.names)} landmark names for {len(self.points_ct)} points")

    def __len__(self) -> int:
        return len(self.names)

    def describe(self) -> dict:
        """What a report says about the landmarks it used."""
        return {"policy": self.policy, "count": len(self.names)}


def file_landmarks(names: Sequence[str], points_ct: Tensor) -> Landmarks:
    """Landmarks a file carries, used as they are."""
    return Landmarks(tuple(names), torch.as_tensor(points_ct, dtype=torch.float64), "file")


def structure_centroids(
    mask_kji: Tensor,
    T_ct_from_index: Float[Tensor, "4 4"],
    names_by_label: Mapping[int, str] | None = None,
    *,
    max_structures: int = MAX_STRUCTURES,
    min_voxels: int = MIN_VOXELS,
) -> Landmarks | None:
    """Centroids of the mask's labelled structures (see the module docstring), or None when fewer
    than ``MIN_STRUCTURES`` structures qualify."""
    if mask_kji.ndim != 3:
        raise ValueError(f"the mask must be a (D, H, W) label volume, got shape {tuple(mask_kji.shape)}")
    labels, counts = torch.unique(mask_kji[mask_kji > 0], return_counts=True)
    keep = counts >= min_voxels
    labels, counts = labels[keep], counts[keep]
    if len(labels) < MIN_STRUCTURES:
        return None
    # largest first; equal sizes in label order, so the choice is deterministic
    order = sorted(range(len(labels)), key=lambda i: (-int(counts[i]), int(labels[i])))[:max_structures]
    A = T_ct_from_index.to(torch.float64)
    names, pts = [], []
    for i in order:
        label = int(labels[i])
        ijk = (mask_kji == label).nonzero().flip(-1).to(torch.float64).mean(0)
        pts.append(A[:3, :3] @ ijk + A[:3, 3])
        names.append((names_by_label or {}).get(label, f"label-{label}"))
    return Landmarks(tuple(names), torch.stack(pts), "structure-centroids")


def bone_octants(volume) -> Landmarks:
    """The bone centroid of each octant of the bone's bounding box (octants without bone skipped)."""
    from mvreg_ros.core.imaging.volume import BONE_HU, hu_to_mu

    thr = float(hu_to_mu(torch.tensor(BONE_HU)))
    idx = (volume.data > thr).nonzero().flip(-1).to(torch.float64)  # (i, j, k)
    if len(idx) == 0:
        raise ValueError("the volume holds no bone and no segmentation: cannot place landmarks")
    mid = (idx.min(0).values + idx.max(0).values) / 2
    A = volume.T_ct_from_index.to(torch.float64)
    names, pts = [], []
    for o in range(8):
        sel = torch.ones(len(idx), dtype=torch.bool)
        for axis in range(3):
            above = idx[:, axis] > mid[axis]
            sel &= above if (o >> axis) & 1 else ~above
        if sel.any():
            names.append(f"bone-octant-{o}")
            pts.append(A[:3, :3] @ idx[sel].mean(0) + A[:3, 3])
    return Landmarks(tuple(names), torch.stack(pts), "bone-octants")


def ct_landmarks(volume, names_by_label: Mapping[int, str] | None = None) -> Landmarks:
    """The policy for a CT without file landmarks: its structures' centroids when it has a
    segmentation with enough structures, else its bone octants."""
    if volume.mask is not None:
        found = structure_centroids(volume.mask, volume.T_ct_from_index, names_by_label)
        if found is not None:
            return found
    return bone_octants(volume)
