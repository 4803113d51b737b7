"""CT volumes: HU conversion, physical geometry of resampling/cropping, file loaders."""

import math

import numpy as np
import pytest
import torch

from mvreg_ros.core.geometry.transforms import make_T, so3_exp
from mvreg_ros.core.imaging.volume import (
    BONE_HU,
    MU_WATER_PER_MM,
    Volume,
    from_hu,
    hu_to_mu,
    load_volume,
)

F64 = torch.float64


def _affine(spacing=(1.5, 0.8, 2.5), w=(0.2, -0.3, 0.1), origin=(-30.0, 12.0, 100.0)) -> torch.Tensor:
    R = so3_exp(torch.tensor(w, dtype=F64))
    A = make_T(R, torch.tensor(origin, dtype=F64))
    A[:3, :3] = A[:3, :3] @ torch.diag(torch.tensor(spacing, dtype=F64))
    return A


def _phys(A: torch.Tensor, ijk) -> torch.Tensor:
    return A[:3, :3] @ torch.as_tensor(ijk, dtype=F64) + A[:3, 3]


def _ramp_volume(shape_kji, A, coeffs=(0.3, -0.1, 0.05)) -> Volume:
    """Data = a linear function of the physical position of each voxel centre."""
    D, H, W = shape_kji
    k, j, i = torch.meshgrid(
        torch.arange(D, dtype=F64), torch.arange(H, dtype=F64), torch.arange(W, dtype=F64), indexing="ij"
    )
    ijk = torch.stack([i, j, k], -1)
    p = ijk @ A[:3, :3].T + A[:3, 3]
    data = p @ torch.tensor(coeffs, dtype=F64)
    return Volume(data=data, T_ct_from_index=A)


# ---------------------------------------------------------------------------------------
# HU -> attenuation
# ---------------------------------------------------------------------------------------


def test_hu_to_mu_fixed_points():
    hu = torch.tensor([-3000.0, -1000.0, 0.0, 1000.0])
    torch.testing.assert_close(hu_to_mu(hu), torch.tensor([0.0, 0.0, MU_WATER_PER_MM, 2 * MU_WATER_PER_MM]))


def test_hu_to_mu_bone_scale_only_above_bone():
    hu = torch.tensor([-500.0, 0.0, BONE_HU - 1, BONE_HU, BONE_HU + 1, 1500.0])
    base = hu_to_mu(hu)
    scaled = hu_to_mu(hu, bone_scale=2.5)
    above = hu > BONE_HU
    torch.testing.assert_close(scaled[~above], base[~above])
    torch.testing.assert_close(scaled[above], 2.5 * base[above])


def test_from_hu_bone_only():
    hu = torch.tensor([-1000.0, 0.0, 200.0, 400.0, 1200.0]).reshape(1, 1, 5)
    vol = from_hu(hu, torch.eye(4, dtype=F64), bone_only=True)
    expected = torch.where(hu > BONE_HU, hu_to_mu(hu), torch.zeros_like(hu))
    torch.testing.assert_close(vol.data, expected)


# ---------------------------------------------------------------------------------------
# The Volume object
# ---------------------------------------------------------------------------------------


def test_volume_validation():
    A = torch.eye(4, dtype=F64)
    with pytest.raises(ValueError, match="3D"):
        Volume(data=torch.zeros(4, 4), T_ct_from_index=A)
    with pytest.raises(ValueError, match="4x4"):
        Volume(data=torch.zeros(2, 3, 4), T_ct_from_index=torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match="mask shape"):
        Volume(data=torch.zeros(2, 3, 4), T_ct_from_index=A, mask=torch.zeros(2, 3, 5))
    bad = torch.zeros(2, 3, 4)
    bad[1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        Volume(data=bad, T_ct_from_index=A)
    bad[1, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="infinite"):
        Volume(data=bad, T_ct_from_index=A)


def test_centre_corners_spacing():
    A = _affine()
    vol = Volume(data=torch.zeros(5, 6, 7), T_ct_from_index=A)  # W, H, D = 7, 6, 5
    assert vol.shape_ijk == (7, 6, 5)
    torch.testing.assert_close(vol.spacing, torch.tensor([1.5, 0.8, 2.5], dtype=F64))
    torch.testing.assert_close(vol.centre_ct(), _phys(A, [3.0, 2.5, 2.0]))
    corners = vol.corners_ct()
    assert corners.shape == (8, 3)
    torch.testing.assert_close(corners.mean(0), vol.centre_ct())
    torch.testing.assert_close(corners[0], _phys(A, [-0.5, -0.5, -0.5]))
    torch.testing.assert_close(corners[-1], _phys(A, [6.5, 5.5, 4.5]))


def test_bone_centre():
    A = _affine()
    data = torch.zeros(6, 6, 6)
    data[1, 2, 3] = data[1, 2, 5] = 1.0  # two "bone" voxels: (i, j, k) = (3, 2, 1) and (5, 2, 1)
    vol = Volume(data=data, T_ct_from_index=A)
    torch.testing.assert_close(vol.bone_centre_ct(), _phys(A, [4.0, 2.0, 1.0]))
    empty = Volume(data=torch.zeros(6, 6, 6), T_ct_from_index=A)
    torch.testing.assert_close(empty.bone_centre_ct(), empty.centre_ct())


def test_identity_tracks_data_and_geometry():
    A = _affine()
    data = torch.rand(4, 5, 6, generator=torch.Generator().manual_seed(0))
    a = Volume(data=data, T_ct_from_index=A).identity()
    assert a == Volume(data=data.clone(), T_ct_from_index=A.clone()).identity()
    changed = data.clone()
    changed[2, 2, 2] += 1e-3
    assert Volume(data=changed, T_ct_from_index=A).identity()["sha256"] != a["sha256"]
    A2 = A.clone()
    A2[0, 3] += 1.0
    assert Volume(data=data, T_ct_from_index=A2).identity()["sha256"] != a["sha256"]
    assert a["shape"] == [4, 5, 6]
    assert a["spacing_mm"] == [1.5, 0.8, 2.5]


@pytest.mark.parametrize("factor", [2, 3, (2, 2, 1), (1, 3, 2), (3, 1, 1)])
def test_resampled_ramp_keeps_physical_positions(factor):
    """One factor for every axis, or one per axis (i, j, k): the k, j, i data pooled by (fk, fj, fi),
    each axis's spacing times its own factor, the ramp evaluated at the new centres."""
    fi, fj, fk = (factor,) * 3 if isinstance(factor, int) else factor
    A = _affine()
    vol = _ramp_volume((4 * fk, 3 * fj, 5 * fi), A)
    small = vol.resampled(factor)
    assert small.data.shape == (4, 3, 5)
    torch.testing.assert_close(small.centre_ct(), vol.centre_ct())
    torch.testing.assert_close(small.corners_ct(), vol.corners_ct())
    torch.testing.assert_close(small.spacing, vol.spacing * torch.tensor([fi, fj, fk], dtype=F64))
    # the pooled ramp equals the ramp evaluated at the new voxel centres
    expected = _ramp_volume(small.data.shape, small.T_ct_from_index).data
    torch.testing.assert_close(small.data, expected)
    # a specific voxel: new index (1, 2, 3) is the centre of old block [fi..2fi-1, 2fj..3fj-1, 3fk..4fk-1]
    centre = [n * f + (f - 1) / 2 for n, f in zip((1, 2, 3), (fi, fj, fk))]
    torch.testing.assert_close(_phys(small.T_ct_from_index, [1, 2, 3]), _phys(A, centre))
    assert vol.resampled(1) is vol
    with pytest.raises(ValueError, match="factor"):
        vol.resampled(0)
    with pytest.raises(ValueError, match="factor"):
        vol.resampled(2.0)


def test_resampled_same_factor_on_every_axis_equals_the_int():
    vol = Volume(data=torch.rand(9, 7, 8, generator=torch.Generator().manual_seed(3)), T_ct_from_index=_affine())
    a, b = vol.resampled(3), vol.resampled((3, 3, 3))
    assert torch.equal(a.data, b.data) and torch.equal(a.T_ct_from_index, b.T_ct_from_index)
    assert vol.resampled((1, 1, 1)) is vol


@pytest.mark.parametrize("bad", [(2, 2), (2, 0, 1), (2.0, 1, 1), (True, 1, 1), [2, 2, 1], 0, -1, True])
def test_resampled_rejects_a_bad_factor_naming_it(bad):
    vol = Volume(data=torch.zeros(4, 4, 4), T_ct_from_index=torch.eye(4, dtype=F64))
    with pytest.raises(ValueError, match="factor"):
        vol.resampled(bad)


def test_resampled_per_axis_conserves_mass_and_max_pools_the_mask_when_not_divisible():
    A = _affine(spacing=(1.0, 1.0, 2.5))
    data = torch.rand(17, 11, 13, generator=torch.Generator().manual_seed(1), dtype=F64)
    mask = torch.zeros(17, 11, 13, dtype=torch.int16)
    mask[16, 10, 12] = 5  # the last, partial block of every axis
    small = Volume(data=data, T_ct_from_index=A, mask=mask).resampled((2, 3, 1))
    assert small.data.shape == (17, 4, 7)
    voxel = float(torch.linalg.det(A[:3, :3]))
    assert math.isclose(float(small.data.sum()) * voxel * 6, float(data.sum()) * voxel, rel_tol=1e-6)
    assert small.mask[16, 3, 6] == 5 and int(small.mask.sum()) == 5


def test_resampled_mask_max_pooled():
    data = torch.zeros(4, 4, 4)
    mask = torch.zeros(4, 4, 4, dtype=torch.int16)
    mask[3, 0, 1] = 7
    small = Volume(data=data, T_ct_from_index=torch.eye(4, dtype=F64), mask=mask).resampled(2)
    assert small.mask.dtype == torch.int16 and small.mask.shape == (2, 2, 2)
    assert small.mask[1, 0, 0] == 7 and int(small.mask.sum()) == 7


def test_resampled_conserves_attenuation_mass_when_size_not_divisible():
    A = _affine(spacing=(1.0, 1.0, 2.5))
    data = torch.rand(17, 11, 13, generator=torch.Generator().manual_seed(1), dtype=F64)
    vol = Volume(data=data, T_ct_from_index=A)
    small = vol.resampled(4)
    voxel = float(torch.linalg.det(A[:3, :3]))
    mass = float(vol.data.sum()) * voxel
    mass_small = float(small.data.sum()) * voxel * 4**3
    assert math.isclose(mass_small, mass, rel_tol=1e-6)


def test_cropped_to_keeps_physical_positions():
    A = _affine()
    data = torch.zeros(10, 12, 14)
    data[3:6, 4:9, 5:7] = torch.rand(3, 5, 2, generator=torch.Generator().manual_seed(2)) + 1
    mask = torch.arange(data.numel(), dtype=torch.int32).reshape(data.shape)
    vol = Volume(data=data, T_ct_from_index=A, mask=mask)
    crop = vol.cropped_to(0.5, margin_vox=1)
    assert crop.data.shape == (5, 7, 4)
    # every voxel of the crop sits where the same value sat in the original
    for kji in [(0, 0, 0), (1, 1, 1), (4, 6, 3), (2, 3, 1)]:
        k, j, i = kji
        p = _phys(crop.T_ct_from_index, [i, j, k])
        i0, j0, k0 = torch.linalg.solve(A[:3, :3], p - A[:3, 3]).round().long().tolist()
        torch.testing.assert_close(_phys(A, [i0, j0, k0]), p)
        assert crop.data[k, j, i] == vol.data[k0, j0, i0]
        assert crop.mask[k, j, i] == vol.mask[k0, j0, i0]
    assert float(crop.data.sum()) == pytest.approx(float(vol.data.sum()))
    # the margin is clipped at the volume border
    assert vol.cropped_to(0.5, margin_vox=50).data.shape == vol.data.shape
    with pytest.raises(ValueError, match="threshold"):
        vol.cropped_to(100.0)


def test_extended_repeats_the_cut_faces_and_keeps_every_voxel_in_place():
    A = _affine(spacing=(1.5, 0.8, 2.5))
    vol = _ramp_volume((4, 5, 6), A)
    vol = Volume(data=vol.data, T_ct_from_index=A, mask=torch.ones(4, 5, 6, dtype=torch.int32))
    ext = vol.extended((False, True, False, False, True, False), 5.0)  # i+ by 4 voxels, k- by 2
    assert ext.data.shape == (6, 5, 10)
    # the original voxels: same values at the same physical positions
    torch.testing.assert_close(ext.data[2:, :, :6], vol.data)
    for i, j, k in [(0, 0, 0), (5, 4, 3), (2, 1, 2)]:
        torch.testing.assert_close(_phys(ext.T_ct_from_index, [i, j, k + 2]), _phys(A, [i, j, k]))
    # beyond the cut: the face repeated; the label map says nothing is there
    torch.testing.assert_close(ext.data[:2, :, :6], torch.cat([vol.data[:1]] * 2))
    torch.testing.assert_close(ext.data[2:, :, 6:], vol.data[:, :, 5:6].expand(4, 5, 4))
    assert int(ext.mask[2:, :, :6].sum()) == vol.mask.numel() and int(ext.mask.sum()) == vol.mask.numel()
    # nothing to extend: the same volume
    assert vol.extended((False,) * 6, 50.0) is vol and vol.extended((True,) * 6, 0.0) is vol
    with pytest.raises(ValueError, match="6 flags"):
        vol.extended((True,), 5.0)
    with pytest.raises(ValueError, match="mm must be"):
        vol.extended((True,) * 6, float("nan"))


# ---------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------


def _hu_block(shape_kji=(6, 7, 8), seed=3) -> np.ndarray:
    g = np.random.default_rng(seed)
    return g.integers(-1000, 1500, size=shape_kji).astype(np.int16)


def test_load_nifti_ras_to_lps(tmp_path):
    import nibabel as nib

    hu_kji = _hu_block()
    affine_ras = _affine(spacing=(0.7, 0.9, 2.0), w=(0.1, 0.05, -0.2), origin=(50.0, -60.0, 10.0)).numpy()
    nib.save(nib.Nifti1Image(hu_kji.transpose(2, 1, 0).copy(), affine_ras), tmp_path / "ct.nii.gz")
    vol = load_volume(tmp_path / "ct.nii.gz")
    assert vol.data.shape == hu_kji.shape
    torch.testing.assert_close(vol.data, hu_to_mu(torch.as_tensor(hu_kji, dtype=torch.float32)))
    for ijk in [(0, 0, 0), (7, 6, 5), (3, 2, 4)]:
        ras = affine_ras @ np.r_[ijk, 1.0]
        lps = np.diag([-1.0, -1.0, 1.0]) @ ras[:3]
        np.testing.assert_allclose(_phys(vol.T_ct_from_index, ijk).numpy(), lps, atol=1e-9)
        i, j, k = ijk
        assert float(vol.data[k, j, i]) == pytest.approx(float(hu_to_mu(torch.tensor(float(hu_kji[k, j, i])))))


def _sitk_image(hu_kji: np.ndarray):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(hu_kji)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    D = so3_exp(torch.tensor([0.3, -0.2, 0.4], dtype=F64)).numpy()
    img.SetDirection(tuple(D.ravel()))
    return img


def _check_itk_geometry(vol: Volume, img, hu_kji: np.ndarray):
    assert vol.data.shape == hu_kji.shape
    torch.testing.assert_close(vol.data, hu_to_mu(torch.as_tensor(hu_kji, dtype=torch.float32)))
    for ijk in [(0, 0, 0), (7, 6, 5), (1, 4, 3)]:
        np.testing.assert_allclose(
            _phys(vol.T_ct_from_index, ijk).numpy(), img.TransformIndexToPhysicalPoint(ijk), atol=1e-6
        )


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_load_itk_files_with_direction(tmp_path, suffix):
    import SimpleITK as sitk

    hu_kji = _hu_block()
    img = _sitk_image(hu_kji)
    sitk.WriteImage(img, str(tmp_path / f"ct{suffix}"))
    _check_itk_geometry(load_volume(tmp_path / f"ct{suffix}"), img, hu_kji)


@pytest.fixture
def keep_locale():
    """SimpleITK's GDCM writer leaves LC_CTYPE at "C" (Python's default text encoding becomes ASCII, which
    breaks torch.compile later in the session): restore it."""
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


def test_load_dicom_series_folder(tmp_path, keep_locale):
    import SimpleITK as sitk

    hu_kji = _hu_block()
    img = _sitk_image(hu_kji)
    D = np.array(img.GetDirection()).reshape(3, 3)
    uid = "1.2.826.0.1.3680043.2.1125.1.4242"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(hu_kji.shape[0]):
        s = img[:, :, k]
        s.SetMetaData("0008|0060", "CT")
        s.SetMetaData("0020|000d", uid + ".1")
        s.SetMetaData("0020|000e", uid)
        s.SetMetaData("0020|0013", str(k + 1))
        s.SetMetaData("0020|0032", "\\".join(f"{x:.6f}" for x in img.TransformIndexToPhysicalPoint((0, 0, k))))
        s.SetMetaData("0020|0037", "\\".join(f"{x:.9f}" for x in list(D[:, 0]) + list(D[:, 1])))
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(s)
    vol = load_volume(tmp_path)
    _check_itk_geometry(vol, img, hu_kji)


def test_load_volume_errors(tmp_path):
    import nibabel as nib
    import SimpleITK as sitk

    with pytest.raises(FileNotFoundError, match="not found"):
        load_volume(tmp_path / "missing.nii.gz")
    nan = np.zeros((4, 4, 4), dtype=np.float32)
    nan[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "nan.nii")
    with pytest.raises(ValueError, match="NaN"):
        load_volume(tmp_path / "nan.nii")
    nib.save(nib.Nifti1Image(np.zeros((8, 8), dtype=np.int16), np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(ValueError, match="3D"):
        load_volume(tmp_path / "flat.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), dtype=np.int16)), str(tmp_path / "flat.mha"))
    with pytest.raises(ValueError, match="3D"):
        load_volume(tmp_path / "flat.mha")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="DICOM"):
        load_volume(tmp_path / "empty_dir")


def test_load_volume_with_mask(tmp_path):
    import nibabel as nib

    hu = _hu_block().transpose(2, 1, 0).copy()
    labels = (np.arange(hu.size).reshape(hu.shape) % 5).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "mask.nii.gz")
    vol = load_volume(tmp_path / "ct.nii.gz", mask_path=tmp_path / "mask.nii.gz")
    assert vol.mask.dtype == torch.int16
    np.testing.assert_array_equal(vol.mask.numpy(), labels.transpose(2, 1, 0))


def test_example_ct_downsampled(tiny_ct):
    assert tiny_ct.data.shape == (17, 64, 64)
    torch.testing.assert_close(
        tiny_ct.spacing, torch.tensor([0.703125 * 8, 0.703125 * 8, 2.5 * 8], dtype=F64), atol=1e-3, rtol=0
    )
    assert tiny_ct.mask is not None and tiny_ct.mask.shape == tiny_ct.data.shape
    # attenuation of a chest: air to bone, nothing negative
    assert float(tiny_ct.data.min()) >= 0
    assert 0.005 < float(tiny_ct.data.max()) < 0.1
