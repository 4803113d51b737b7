"""Where a truncated CT can explain the X-ray, and the target's footprint."""

import pytest
import torch

from mvreg_ros.core.geometry.transforms import intrinsics, make_T
from mvreg_ros.core.imaging.footprint import (
    complete_rays,
    continued,
    target_footprint,
    target_labels,
    target_volume,
    truncated_faces,
)
from mvreg_ros.core.imaging.volume import MU_WATER_PER_MM, Volume
from mvreg_ros.core.rendering.renderer import Renderer

# a 40 x 40 x 20 voxel slab of water-like body, 2 mm voxels, centred at the origin; the body fills
# the whole k extent (cut at both k faces) and only the middle of i and j
SHAPE_KJI = (20, 40, 40)


def slab(fill_k: bool = True) -> Volume:
    data = torch.zeros(SHAPE_KJI)
    k = slice(None) if fill_k else slice(3, -3)
    data[k, 8:-8, 8:-8] = MU_WATER_PER_MM
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] *= 2.0
    T[:3, 3] = -torch.tensor([39.0, 39.0, 19.0], dtype=torch.float64)  # index centre at the origin
    mask = torch.zeros(SHAPE_KJI, dtype=torch.int16)
    mask[5:15, 15:25, 15:25] = 7
    return Volume(data=data, T_ct_from_index=T, mask=mask)


def view(axis: str):
    """A camera 500 mm away looking along -z (through the k faces) or along x (through the i faces)."""
    if axis == "z":  # beam along +z: rays enter and leave through the k faces
        R = torch.eye(3, dtype=torch.float64)
    else:  # beam along +x
        R = torch.tensor([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    T_cam_from_ct = make_T(R, torch.tensor([0.0, 0.0, 500.0], dtype=torch.float64))[None]
    K = intrinsics(sdd_mm=1000.0, pixel_spacing_mm=4.0, height=48, width=48)[None]
    return T_cam_from_ct, K


def test_faces_that_cut_the_body_are_found():
    assert truncated_faces(slab()) == (False, False, False, False, True, True)
    assert truncated_faces(slab(fill_k=False)) == (False,) * 6


def test_continued_ct_goes_on_beyond_the_cut_faces_only():
    cut = continued(slab(), 10.0)  # cropped to the body (i, j: 24 + 2 margin voxels each side), k cut: +5 each side
    assert cut.data.shape == (30, 28, 28)
    assert torch.equal(cut.data[5:25], slab().cropped_to(0.2 * MU_WATER_PER_MM).data)
    assert torch.equal(cut.data[0], cut.data[5]) and torch.equal(cut.data[-1], cut.data[-6])
    whole = continued(slab(fill_k=False), 10.0)  # nowhere cut: cropped only
    assert whole.data.shape == slab(fill_k=False).cropped_to(0.2 * MU_WATER_PER_MM).data.shape
    assert continued(slab(), 0.0).data.shape == (20, 28, 28)


def test_rays_through_a_truncated_face_are_incomplete_and_a_whole_ct_masks_nothing():
    T, K = view("z")
    through_k = complete_rays(slab(), T, K, 48, 48)
    assert float(through_k.sum()) == 0  # every ray that hits the box enters and leaves through a cut face
    footprint = complete_rays(slab(), T, K, 48, 48, strict=False)
    assert 0 < float(footprint.mean()) < 1  # the box's footprint, nothing outside it
    assert float(complete_rays(slab(fill_k=False), T, K, 48, 48).min()) == 1
    T, K = view("x")
    side = complete_rays(slab(), T, K, 48, 48)
    rows = side[0].amax(1)
    # seen from the side, rays near the middle rows cross i faces only; rows beyond the box miss it
    assert float(side[0, 24, 24]) == 1 and float(rows[0]) == 0 and float(rows[-1]) == 0


def test_target_labels_volume_and_footprint():
    v = slab()
    names = {7: "vertebrae_T6", 8: "vertebrae_T7", 9: "rib_left_1"}
    assert target_labels(names, "vertebrae") == (7, 8)
    assert target_labels(names, "vertebrae", mask=v.mask) == (7,)  # only labels present
    with pytest.raises(ValueError, match="femur"):
        target_labels(names, "femur")
    t = target_volume(v, (7,))
    assert float(t.data.sum()) == 10 * 10 * 10
    with pytest.raises(ValueError, match="no voxel"):
        target_volume(v, (8,))
    T, K = view("z")
    fp = target_footprint(Renderer(t, backend="grid_sample"), T, K, 48, 48, dilate_px=0)
    grown = target_footprint(Renderer(t, backend="grid_sample"), T, K, 48, 48, dilate_px=2)
    # the 20 mm target at 500 mm from a 1000 mm detector spans 40 mm = 10 px of 4 mm
    assert 8**2 <= float(fp.sum()) <= 13**2
    assert float(grown.sum()) > float(fp.sum()) and bool((grown >= fp).all())
