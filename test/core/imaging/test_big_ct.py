"""Big CTs: loading converts HU in place, the whole-volume passes go slab by slab with the values
of the one-pass versions, and a Registrar given a CT above ``full_resolution_max_voxels`` pools it
once and keeps no full-resolution array (checked by storage: no live tensor holds one)."""

import gc
import warnings
import weakref

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mvreg_ros.core.imaging import volume as volume_module
from mvreg_ros.core.imaging.volume import BONE_HU, Volume, from_hu, hu_to_mu, hu_to_mu_, load_hu, load_volume
from mvreg_ros.core.registration.refine import RefineConfig, Registrar

SHAPE_IJK = (256, 256, 200)
SPACING = (0.5, 0.5, 0.6)


def _phantom_hu(shape_ijk=SHAPE_IJK, seed=0) -> np.ndarray:
    """(i, j, k) int16 HU: air around an elliptic body of soft tissue with two bone rods and noise."""
    W, H, D = shape_ijk
    i = np.arange(W)[:, None, None]
    j = np.arange(H)[None, :, None]
    k = np.arange(D)[None, None, :]
    body = ((i - W / 2) / (0.35 * W)) ** 2 + ((j - H / 2) / (0.25 * H)) ** 2 <= 1
    body = body & (k > 5) & (k < D - 5)
    rods = (((i - 0.4 * W) ** 2 + (j - 0.5 * H) ** 2) < (0.05 * W) ** 2) | (
        ((i - 0.62 * W) ** 2 + (j - 0.45 * H) ** 2) < (0.04 * W) ** 2
    )
    hu = np.where(body, 40.0, -1000.0) + np.where(body & rods, 900.0 + 0.5 * k, 0.0)
    hu = hu + np.random.default_rng(seed).normal(0, 15, size=hu.shape)
    return np.round(hu).astype(np.int16)


@pytest.fixture(scope="module")
def big_nifti(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "ct.nii"
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])  # RAS; LPS diag(+s) after the flip
    affine[:3, 3] = (10.0, -20.0, 300.0)
    nib.save(nib.Nifti1Image(_phantom_hu(), affine), str(path))
    return path


LEAN = RefineConfig(full_resolution_max_voxels=1_000_000, base_voxel_mm=1.0)  # this CT counts as big here


def _tensors(obj, seen=None, depth=0):
    """Every tensor reachable from ``obj`` through attributes, dataclass fields, dicts and sequences."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        children = list(vars(obj).values())
    else:
        return
    for child in children:
        yield from _tensors(child, seen, depth + 1)


def test_a_big_ct_keeps_no_full_resolution_array(big_nifti):
    vol = load_volume(big_nifti)
    full = vol.data
    assert tuple(full.shape) == SHAPE_IJK[::-1]
    full_bytes = full.untyped_storage().nbytes()
    full_ptr = full.untyped_storage().data_ptr()
    alive = weakref.ref(full)
    spacing = vol.spacing.clone()
    del full
    reg = Registrar(vol, LEAN)
    del vol
    gc.collect()
    assert alive() is None  # the loaded array is gone ...
    with warnings.catch_warnings():  # isinstance() on every object wakes deprecated module attributes
        warnings.simplefilter("ignore")
        live = [t for t in gc.get_objects() if isinstance(t, torch.Tensor)]
    for t in live:  # ... and no view (a crop) or copy of that storage survives
        try:
            s = t.untyped_storage()
            ptr = s.data_ptr()
        except (RuntimeError, NotImplementedError):  # fake and meta tensors of torch.compile hold no memory
            continue
        assert not (ptr == full_ptr and s.nbytes() >= full_bytes // 2), tuple(t.shape)
    # the engine holds the CT cropped to the body and pooled once (0.5 mm -> 1.0 mm), and nothing larger
    assert not reg.full_resolution and reg.base_factor == 2
    torch.testing.assert_close(reg.volume.spacing, 2 * spacing)
    r = reg.renderer(2)  # a pyramid level pools from the base
    torch.testing.assert_close(r.volume.spacing, 4 * spacing)
    biggest = max(t.untyped_storage().nbytes() for t in _tensors(reg))
    assert biggest <= full_bytes / 8 * 1.1, biggest  # at most the pooled base (plus padding)


def test_a_normal_ct_is_kept_as_before(big_nifti):
    """Below ``full_resolution_max_voxels`` (the default for CTs up to 512 x 512 x 256) the
    registrar keeps the cropped CT at its resolution: the same volume as before this option."""
    vol = load_volume(big_nifti)
    reg = Registrar(vol, RefineConfig())
    assert reg.full_resolution and reg.base_factor == 1
    old = _crop_one_pass(vol, 0.2 * volume_module.MU_WATER_PER_MM)
    assert torch.equal(reg.volume.data, old.data)
    torch.testing.assert_close(reg.volume.T_ct_from_index, old.T_ct_from_index, rtol=0, atol=0)
    assert reg.volume.data.untyped_storage().data_ptr() != vol.data.untyped_storage().data_ptr()  # a copy, as before


def test_load_volume_converts_in_place_to_the_same_values(big_nifti):
    hu, A = load_hu(big_nifti)
    expected = from_hu(hu, A)
    got = load_volume(big_nifti)
    assert got.data.dtype == torch.float32 and torch.equal(got.data, expected.data)
    bone = load_volume(big_nifti, bone_only=True)
    assert torch.equal(bone.data, from_hu(hu, A, bone_only=True).data)
    assert float(bone.data.max()) > 0 and bool((bone.data[hu <= BONE_HU] == 0).all())


def test_hu_to_mu_in_place_matches_and_checks_its_input():
    hu = torch.linspace(-3000, 3000, 100_001)
    expected = hu_to_mu(hu)
    x = hu.clone()
    assert hu_to_mu_(x) is x and torch.equal(x, expected)
    with pytest.raises(TypeError, match="floating-point"):
        hu_to_mu_(torch.zeros(3, dtype=torch.int16))


# ---------------------------------------------------------------------------------------
# The slab-by-slab passes against the one-pass versions they replaced
# ---------------------------------------------------------------------------------------


def _crop_one_pass(vol: Volume, threshold: float, margin_vox: int = 2) -> Volume:
    nz = (vol.data > threshold).nonzero()
    lo = (nz.min(0).values - margin_vox).clamp_min(0)
    hi = torch.minimum(nz.max(0).values + margin_vox + 1, torch.tensor(vol.data.shape))
    (k0, j0, i0), (k1, j1, i1) = lo.tolist(), hi.tolist()
    shift = torch.eye(4, dtype=vol.T_ct_from_index.dtype)
    shift[:3, 3] = torch.tensor([i0, j0, k0], dtype=shift.dtype)
    return Volume(data=vol.data[k0:k1, j0:j1, i0:i1].contiguous(), T_ct_from_index=vol.T_ct_from_index @ shift)


def _pool_one_pass(data: torch.Tensor, factor: int, pool=F.avg_pool3d) -> torch.Tensor:
    D, H, W = data.shape
    padded = F.pad(data, (0, -W % factor, 0, -H % factor, 0, -D % factor))
    return pool(padded[None, None], factor)[0, 0]


@pytest.mark.parametrize("slab_voxels", [2**24, 5000])  # one slab; many (a slab of 1 to 3 blocks)
def test_slab_passes_give_the_one_pass_values(monkeypatch, slab_voxels):
    monkeypatch.setattr(volume_module, "SLAB_VOXELS", slab_voxels)
    g = torch.Generator().manual_seed(0)
    data = torch.zeros(23, 31, 29)
    data[3:19, 5:27, 2:25] = torch.rand(16, 22, 23, generator=g) * 0.05
    mask = (torch.rand(23, 31, 29, generator=g) * 4).to(torch.int16)
    A = torch.eye(4, dtype=torch.float64)
    A[:3, :3] = torch.diag(torch.tensor([0.7, 0.8, 2.0], dtype=torch.float64))
    vol = Volume(data=data, T_ct_from_index=A, mask=mask)
    for factor in (2, 3, 4):
        pooled = vol.resampled(factor)
        assert torch.equal(pooled.data, _pool_one_pass(data, factor))
        assert torch.equal(pooled.mask, _pool_one_pass(mask.float(), factor, F.max_pool3d).to(torch.int16))
    old = _crop_one_pass(vol, 0.03)
    new = vol.cropped_to(0.03)
    assert torch.equal(new.data, old.data) and torch.equal(new.T_ct_from_index, old.T_ct_from_index)
    view = vol.cropped_to(0.03, copy=False)
    assert torch.equal(view.data, old.data) and view.data.untyped_storage().data_ptr() == data.data_ptr()
    # bone centre from voxel counts: the mean of the voxel indices above the threshold
    thr = 0.04
    ijk = (data > thr).nonzero().to(torch.float64).flip(-1).mean(0)
    torch.testing.assert_close(vol.bone_centre_ct(thr), A[:3, :3] @ ijk + A[:3, 3], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="no voxel above threshold 1"):
        vol.cropped_to(1.0)
    assert vol.box_above(1.0) is None
    bad = data.clone()
    bad[20, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        Volume(data=bad, T_ct_from_index=A)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(full_resolution_max_voxels=-1), ValueError, "full_resolution_max_voxels must be >= 0, got -1"),
        (dict(base_voxel_mm=-1.0), ValueError, "base_voxel_mm must be a finite number >= 0, got -1.0"),
        (dict(base_voxel_mm=float("nan")), ValueError, "base_voxel_mm"),
    ],
)
def test_refine_config_checks_the_big_ct_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        RefineConfig(**kwargs)
