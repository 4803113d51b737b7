"""DeepFluoro-layout files: the writer, the reader, its conventions and its error messages."""

import math
import shutil

import h5py
import numpy as np
import pytest
import torch

from mvreg_ros.core.data import deepfluoro as df
from mvreg_ros.core.data import deepfluoro_write as dfw
from mvreg_ros.core.data.simulate import AcquisitionConfig, DetectorConfig
from mvreg_ros.core.geometry.transforms import cam_to_pelvis_vol_from_T, invert, make_T, project, so3_exp
from mvreg_ros.core.imaging.volume import MU_WATER_PER_MM, example_ct_path

SPEC = "sim-01"
DET = DetectorConfig(height=64, width=64, pixel_mm=1.164 * 4)
ANGLES = [(0.0, 0.0), (35.0, 10.0), (-25.0, -8.0)]
# an arbitrary world -> DeepFluoro camera transform (not the writer's default)
E_TEST = make_T(
    so3_exp(torch.tensor([-0.4, 0.9, 0.2], dtype=torch.float64)),
    torch.tensor([-55.0, 20.0, 300.0], dtype=torch.float64),
)


def hu_of(volume):
    return volume.data / MU_WATER_PER_MM * 1000 - 1000


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_ct):
    path = tmp_path_factory.mktemp("df") / "tiny.h5"
    names = df.read_structures(example_ct_path().with_name("structures.csv"))
    rec = dfw.write_simulated(
        path,
        hu_of(tiny_ct),
        tiny_ct.T_ct_from_index,
        specimen=SPEC,
        angles_deg=ANGLES,
        detector=DET,
        mask=tiny_ct.mask,
        label_names=names,
        extrinsic=E_TEST,
        offset_mm=[10.0, -5.0, 8.0],
        rot_180_for_up=True,
        seed=3,
    )
    return path, rec


def raw_values(path, proj="001"):
    """What the file holds, read with h5py only (no mvreg code)."""
    with h5py.File(path, "r") as f:
        K = f["proj-params/intrinsic"][()]
        E = f["proj-params/extrinsic"][()]
        p = f[f"{SPEC}/projections/{proj}"]
        G = p["gt-poses/cam-to-pelvis-vol"][()]
        names = sorted(f[f"{SPEC}/vol-landmarks"].keys())
        lm = np.stack([f[f"{SPEC}/vol-landmarks/{n}"][()] for n in names])  # (N, 3, 1)
        gt = np.stack([p[f"gt-landmarks/{n}"][()] for n in names])  # (N, 2, 1)
        pixels = p["image/pixels"][()]
    return K, E, G, names, lm, gt, pixels


def deepfluoro_formula(K, E, G, lm):
    """pixel ~ K @ (E @ inv(G) @ p)[:3], straight from the dataset's documentation."""
    P = K @ (E @ np.linalg.inv(G))[:3]
    uvw = P @ np.concatenate([lm[:, :, 0], np.ones((len(lm), 1))], 1).T
    return (uvw[:2] / uvw[2]).T


def test_file_layout_matches_the_real_one(written):
    path, _ = written
    with h5py.File(path, "r") as f:
        assert f["proj-params/intrinsic"].shape == (3, 3) and f["proj-params/extrinsic"].shape == (4, 4)
        assert f["proj-params/intrinsic"][0, 0] < 0 and f["proj-params/intrinsic"][1, 1] < 0
        assert int(f["proj-params/num-rows"][()]) == 64 and int(f["proj-params/num-cols"][()]) == 64
        assert f["proj-params/pixel-row-spacing"][()] == pytest.approx(DET.pixel_mm)
        assert f[f"{SPEC}/vol/pixels"].shape == (17, 64, 64)
        assert f[f"{SPEC}/vol/spacing"].shape == (3, 1) and f[f"{SPEC}/vol/dir-mat"].shape == (3, 3)
        assert f[f"{SPEC}/vol-seg/image/pixels"].shape == (17, 64, 64)
        assert f[f"{SPEC}/vol-seg/labels-def/116"][()].decode() == "sternum"
        assert f[f"{SPEC}/vol-landmarks/sternum"].shape == (3, 1)
        p = f[f"{SPEC}/projections/002"]
        assert p["image/pixels"].shape == (64, 64) and p["image/pixels"].dtype == np.float32
        assert p["gt-landmarks/sternum"].shape == (2, 1)
        assert p["gt-poses/cam-to-pelvis-vol"].shape == (4, 4)
        assert int(p["rot-180-for-up"][()]) == 1
        np.testing.assert_allclose(f["proj-params/extrinsic"][()], E_TEST.numpy())


def test_stored_landmarks_follow_the_deepfluoro_formula(written):
    path, _ = written
    for proj in ("000", "001", "002"):
        K, E, G, _, lm, gt, _ = raw_values(path, proj)
        np.testing.assert_allclose(deepfluoro_formula(K, E, G, lm), gt[:, :, 0], atol=1e-8)


def test_loader_projects_landmarks_onto_flipped_gt_landmarks(written):
    path, _ = written
    with df.DeepFluoroFile(path) as f:
        names, lm = f.landmarks(SPEC)
        for i in range(3):
            p = f.projection(SPEC, i)
            K, E, G, raw_names, raw_lm, gt, _ = raw_values(path, f"{i:03d}")
            assert list(p.landmark_names) == names == raw_names
            uv = project(p.K, p.T_cam_from_ct, lm)
            expected = gt[:, :, 0].copy()
            expected[:, 0] = 63 - expected[:, 0]  # column flip
            np.testing.assert_allclose(uv.numpy(), expected, atol=1e-8)
            np.testing.assert_allclose(p.landmarks_uv.numpy(), expected, atol=1e-12)
            # and the engine's projection agrees with the dataset's formula, flipped
            direct = deepfluoro_formula(K, E, G, raw_lm)
            np.testing.assert_allclose(uv[:, 0].numpy(), 63 - direct[:, 0], atol=1e-8)
            np.testing.assert_allclose(uv[:, 1].numpy(), direct[:, 1], atol=1e-8)
            assert p.K[0, 0] > 0 and p.K[1, 1] > 0


def test_loader_poses_round_trip(written):
    path, rec = written
    with df.DeepFluoroFile(path) as f:
        torch.testing.assert_close(f.extrinsic, E_TEST)
        for i in range(3):
            p = f.projection(SPEC, i)
            torch.testing.assert_close(p.T_cam_from_ct, rec.T_cam_from_ct[i], atol=1e-9, rtol=0)
            # cam_to_pelvis_vol_from_T inverts T_cam_from_ct_deepfluoro: back to the stored G
            torch.testing.assert_close(
                cam_to_pelvis_vol_from_T(f.extrinsic, p.T_cam_from_ct), p.cam_to_pelvis_vol, atol=1e-9, rtol=0
            )
            assert p.rot_180_for_up is True
            assert p.pixel_spacing_mm == pytest.approx((DET.pixel_mm, DET.pixel_mm))


def test_image_is_flipped_into_the_camera_convention(written):
    path, _ = written
    with df.DeepFluoroFile(path) as f:
        p = f.projection(SPEC, 1)
    stored = raw_values(path, "001")[-1]
    np.testing.assert_array_equal(p.image.numpy(), stored[:, ::-1])
    assert p.image.shape == (64, 64) and p.height == 64 and p.width == 64


def test_volume_landmarks_and_labels_round_trip(written, tiny_ct):
    path, rec = written
    with df.DeepFluoroFile(path) as f:
        assert f.specimens() == [SPEC] and f.num_projections(SPEC) == 3
        vol = f.volume(SPEC)
        torch.testing.assert_close(vol.T_ct_from_index, tiny_ct.T_ct_from_index)
        torch.testing.assert_close(vol.data, tiny_ct.data, atol=1e-6, rtol=1e-4)
        assert torch.equal(vol.mask, tiny_ct.mask)
        assert f.volume(SPEC, with_mask=False).mask is None
        bone = f.volume(SPEC, bone_only=True)
        assert float(bone.data.sum()) < 0.5 * float(vol.data.sum())
        names, lm = f.landmarks(SPEC)
        order = [rec.landmark_names.index(n) for n in names]
        torch.testing.assert_close(lm, rec.landmarks_ct[order])
        assert f.label_names(SPEC)[116] == "sternum"


def test_view_set_reference_is_the_first_camera(written):
    path, rec = written
    with df.DeepFluoroFile(path) as f:
        views, T_ref_from_ct = f.view_set(SPEC, [2, 0, 1])
    torch.testing.assert_close(T_ref_from_ct, rec.T_cam_from_ct[2])
    torch.testing.assert_close(views.T_ref_from_cam[0], torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=0)
    for k, i in enumerate([2, 0, 1]):
        torch.testing.assert_close(
            invert(views.T_ref_from_cam[k]) @ T_ref_from_ct, rec.T_cam_from_ct[i], atol=1e-9, rtol=0
        )
    assert views.images.shape == (3, 64, 64)
    assert 0.4 < float(views.masks.mean()) < 0.9  # the circular field of view was found
    assert float(views.images[views.masks > 0].mean()) > 0  # line integrals, bone bright


def test_sampled_carm_angles_move_by_tens_of_degrees():
    a = dfw.sample_carm_angles(12, seed=5)
    assert a == dfw.sample_carm_angles(12, seed=5) and a != dfw.sample_carm_angles(12, seed=6)
    orb = np.array([o for o, _ in a])
    assert np.all(np.abs(np.diff(orb)) >= 10) and np.all(np.abs(orb) <= 60)
    assert all(abs(b) <= 20 for _, b in a)


# ---------------------------------------------------------------------------------------
# The stored image itself follows the file convention (independently of the reader)
# ---------------------------------------------------------------------------------------


def test_stored_image_shows_a_bead_at_its_gt_landmark(tmp_path):
    """A dense bead, off-centre, must appear (dark) at the stored gt-landmark in the stored
    (file-convention) image, and not at the mirrored column."""
    n, s = 40, 4.0
    hu = torch.full((n, n, n), -1000.0)
    hu[8:32, 8:32, 8:32] = 0.0  # a water block so the image has texture and a field of view
    bead_kji = (20, 17, 29)  # off-centre in i (and so in the image columns)
    k, j, i = bead_kji
    hu[k - 1 : k + 2, j - 1 : j + 2, i - 1 : i + 2] = 3000.0
    R = so3_exp(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))  # a non-trivial dir-mat
    A = make_T(R * s, torch.tensor([-80.0, 30.0, -60.0], dtype=torch.float64))
    bead_ct = (A @ torch.tensor([i, j, k, 1.0], dtype=torch.float64))[:3]
    det = DetectorConfig(height=96, width=96, pixel_mm=1.164 * 256 / 96)
    path = tmp_path / "bead.h5"
    dfw.write_simulated(
        path,
        hu,
        A,
        angles_deg=[(20.0, 5.0)],
        detector=det,
        landmarks=(["bead"], bead_ct[None]),
        offset_mm=[0.0, 40.0, 0.0],  # the bead (the only bone) would sit at the isocentre
        acquisition=AcquisitionConfig(fov_radius=None, scatter_fraction=0.0, photons_per_count=100.0),
    )
    with h5py.File(path, "r") as f:
        img = f[f"{SPEC}/projections/000/image/pixels"][()].astype(np.float64)
        uv = f[f"{SPEC}/projections/000/gt-landmarks/bead"][()][:, 0]
        # the affine stored in the file reproduces A
        D, sp, o = f[f"{SPEC}/vol/dir-mat"][()], f[f"{SPEC}/vol/spacing"][()][:, 0], f[f"{SPEC}/vol/origin"][()][:, 0]
    np.testing.assert_allclose(D * sp, A[:3, :3].numpy(), atol=1e-12)
    np.testing.assert_allclose(o, A[:3, 3].numpy())
    assert 10 < abs(uv[0] - (95 - uv[0])) < 80  # far from the image's vertical axis, inside the image
    # the darkest 3x3 neighbourhood is within a pixel of the stored landmark
    box = torch.nn.functional.avg_pool2d(torch.as_tensor(img)[None, None], 3, stride=1, padding=1)[0, 0]
    vmin, umin = np.unravel_index(int(box.argmin()), box.shape)
    assert math.hypot(umin - uv[0], vmin - uv[1]) <= 1.0
    assert float(box[vmin, umin]) < 0.8 * float(np.median(img))


# ---------------------------------------------------------------------------------------
# Bad input: clear errors that name what is wrong
# ---------------------------------------------------------------------------------------


@pytest.fixture
def copy(written, tmp_path):
    dst = tmp_path / "copy.h5"
    shutil.copy(written[0], dst)
    return dst


def edit(path, fn):
    with h5py.File(path, "a") as f:
        fn(f)


def test_missing_dataset_is_named(copy):
    edit(copy, lambda f: f.__delitem__(f"{SPEC}/projections/001/gt-poses/cam-to-pelvis-vol"))
    with df.DeepFluoroFile(copy) as f:
        f.projection(SPEC, 0)  # the others still load
        with pytest.raises(df.MissingEntryError, match=f"/{SPEC}/projections/001/gt-poses/cam-to-pelvis-vol") as e:
            f.projection(SPEC, 1)
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    assert "copy.h5" in str(e.value) and not str(e.value).startswith("'")


def test_missing_proj_params_and_groups_are_named(copy):
    edit(copy, lambda f: f.__delitem__("proj-params/extrinsic"))
    edit(copy, lambda f: f.__delitem__(f"{SPEC}/vol-landmarks"))
    edit(copy, lambda f: f.__delitem__(f"{SPEC}/vol/spacing"))
    with df.DeepFluoroFile(copy) as f:
        with pytest.raises(KeyError, match="missing dataset '/proj-params/extrinsic'"):
            f.projection(SPEC, 0)
        with pytest.raises(KeyError, match=f"missing group '/{SPEC}/vol-landmarks'"):
            f.landmarks(SPEC)
        with pytest.raises(KeyError, match=f"/{SPEC}/vol/spacing"):
            f.volume(SPEC)


def test_unknown_specimen_and_projection(written):
    with df.DeepFluoroFile(written[0]) as f:
        with pytest.raises(KeyError, match=f"no specimen '18-0725' \\(available: {SPEC}\\)"):
            f.landmarks("18-0725")
        with pytest.raises(KeyError, match="has 3 projections"):
            f.projection(SPEC, 7)
        with pytest.raises(ValueError, match="non-negative"):
            f.projection(SPEC, -1)
    with pytest.raises(FileNotFoundError, match="nothing.h5"):
        df.DeepFluoroFile(written[0].parent / "nothing.h5")


def test_wrong_shapes(copy):
    def wreck(f):
        del f["proj-params/extrinsic"]
        f["proj-params/extrinsic"] = np.eye(3)
        del f[f"{SPEC}/projections/002/image/pixels"]
        f[f"{SPEC}/projections/002/image/pixels"] = np.ones((2, 64, 64), np.float32)
        del f[f"{SPEC}/vol-landmarks/sternum"]
        f[f"{SPEC}/vol-landmarks/sternum"] = np.zeros((2, 2))

    edit(copy, wreck)
    with df.DeepFluoroFile(copy) as f:
        with pytest.raises(ValueError, match=r"'/proj-params/extrinsic' should have shape \(4, 4\), got \(3, 3\)"):
            f.projection(SPEC, 0)
    edit(
        copy, lambda f: (f.__delitem__("proj-params/extrinsic"), f.__setitem__("proj-params/extrinsic", E_TEST.numpy()))
    )
    with df.DeepFluoroFile(copy) as f:
        with pytest.raises(ValueError, match=f"'/{SPEC}/projections/002/image/pixels' should be 2D"):
            f.projection(SPEC, 2)
        with pytest.raises(ValueError, match=f"'/{SPEC}/vol-landmarks/sternum' should hold 3 values"):
            f.landmarks(SPEC)


def test_image_size_must_match_proj_params(copy):
    def wreck(f):
        del f[f"{SPEC}/projections/000/image/pixels"]
        f[f"{SPEC}/projections/000/image/pixels"] = np.ones((64, 60), np.float32)

    edit(copy, wreck)
    with (
        df.DeepFluoroFile(copy) as f,
        pytest.raises(ValueError, match=r"shape \(64, 60\), but proj-params says \(64, 64\)"),
    ):
        f.projection(SPEC, 0)


def test_positive_focal_length_is_rejected(copy):
    def wreck(f):
        K = f["proj-params/intrinsic"][()]
        f["proj-params/intrinsic"][...] = np.abs(K)

    edit(copy, wreck)
    with df.DeepFluoroFile(copy) as f, pytest.raises(ValueError, match="negative focal"):
        f.projection(SPEC, 0)


def test_nan_pixels(copy):
    def wreck(f):
        ds = f[f"{SPEC}/projections/001/image/pixels"]
        a = ds[()]
        a[10, 20] = np.nan
        ds[...] = a

    edit(copy, wreck)
    with df.DeepFluoroFile(copy) as f, pytest.raises(ValueError, match=f"/{SPEC}/projections/001/image/pixels.*NaN"):
        f.projection(SPEC, 1)


def test_empty_field_of_view(copy):
    def wreck(f):
        ds = f[f"{SPEC}/projections/002/image/pixels"]
        a = np.zeros((64, 64), np.float32)
        a[30:33, 30:33] = 30000.0  # a few lit pixels only
        ds[...] = a

    edit(copy, wreck)
    with df.DeepFluoroFile(copy) as f:
        f.projection(SPEC, 2)  # readable ...
        with pytest.raises(ValueError, match=f"{SPEC}/projections/002: empty field of view"):
            f.view_set(SPEC, [0, 2])  # ... but not registrable


def test_writer_rejects_bad_input(tiny_ct, tmp_path):
    hu = hu_of(tiny_ct)
    with pytest.raises(ValueError, match="angles_deg"):
        dfw.write_simulated(tmp_path / "a.h5", hu, tiny_ct.T_ct_from_index, angles_deg=[], detector=DET)
    with pytest.raises(ValueError, match="landmarks must be"):
        dfw.write_simulated(
            tmp_path / "a.h5",
            hu,
            tiny_ct.T_ct_from_index,
            angles_deg=[(0, 0)],
            detector=DET,
            landmarks=(["a", "b"], torch.zeros(3, 3)),
        )
    with pytest.raises(ValueError, match="mask shape"):
        dfw.write_simulated(
            tmp_path / "a.h5", hu, tiny_ct.T_ct_from_index, angles_deg=[(0, 0)], detector=DET, mask=torch.zeros(3, 3, 3)
        )


def test_append_adds_a_specimen(written, tmp_path, tiny_ct):
    dst = tmp_path / "two.h5"
    shutil.copy(written[0], dst)
    dfw.write_simulated(
        dst,
        hu_of(tiny_ct),
        tiny_ct.T_ct_from_index,
        specimen="sim-02",
        angles_deg=[(0, 0), (30, 0)],
        detector=DET,
        extrinsic=E_TEST,
        append=True,
        landmarks={"a": [0.0, 0.0, -150.0]},
    )
    with df.DeepFluoroFile(dst) as f:
        assert f.specimens() == [SPEC, "sim-02"] and f.num_projections("sim-02") == 2
    with pytest.raises(ValueError, match="proj-params differ"):
        dfw.write_simulated(
            dst,
            hu_of(tiny_ct),
            tiny_ct.T_ct_from_index,
            specimen="sim-03",
            angles_deg=[(0, 0)],
            detector=DET,
            append=True,
        )


# ---------------------------------------------------------------------------------------
# Rectangular detectors and images supplied by the caller
# ---------------------------------------------------------------------------------------


def test_rectangular_detector_round_trip(tmp_path):
    """num-rows != num-cols: the column flip of K and of the image uses the width; a bead
    appears (dark) at its stored gt-landmark, and the reader's K and pose project the
    landmarks onto the flipped gt-landmarks."""
    n, s = 40, 4.0
    hu = torch.full((n, n, n), -1000.0)
    hu[8:32, 8:32, 8:32] = 0.0
    k, j, i = (20, 17, 29)
    hu[k - 1 : k + 2, j - 1 : j + 2, i - 1 : i + 2] = 3000.0
    A = make_T(
        so3_exp(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)) * s,
        torch.tensor([-80.0, 30.0, -60.0], dtype=torch.float64),
    )
    bead_ct = (A @ torch.tensor([i, j, k, 1.0], dtype=torch.float64))[:3]
    other = (A @ torch.tensor([12.0, 25.0, 14.0, 1.0], dtype=torch.float64))[:3]
    det = DetectorConfig(height=72, width=112, pixel_mm=1.164 * 256 / 112)
    path = tmp_path / "rect.h5"
    rec = dfw.write_simulated(
        path,
        hu,
        A,
        angles_deg=[(20.0, 5.0), (-35.0, 10.0)],
        detector=det,
        landmarks=(["bead", "other"], torch.stack([bead_ct, other])),
        offset_mm=[0.0, 40.0, 0.0],
        acquisition=AcquisitionConfig(fov_radius=None, scatter_fraction=0.0, photons_per_count=100.0),
    )
    with h5py.File(path, "r") as f:
        assert (int(f["proj-params/num-rows"][()]), int(f["proj-params/num-cols"][()])) == (72, 112)
        assert f["proj-params/intrinsic"][0, 2] == pytest.approx(111 - det.K()[0, 2].item())
        img = f[f"{SPEC}/projections/000/image/pixels"][()].astype(np.float64)
        uv = f[f"{SPEC}/projections/000/gt-landmarks/bead"][()][:, 0]
    assert img.shape == (72, 112)
    box = torch.nn.functional.avg_pool2d(torch.as_tensor(img)[None, None], 3, stride=1, padding=1)[0, 0]
    vmin, umin = np.unravel_index(int(box.argmin()), box.shape)
    assert math.hypot(umin - uv[0], vmin - uv[1]) <= 1.0 and abs(uv[0] - (111 - uv[0])) > 10
    with df.DeepFluoroFile(path) as f:
        _names, lm = f.landmarks(SPEC)
        for v in range(2):
            p = f.projection(SPEC, v)
            assert p.image.shape == (72, 112)
            torch.testing.assert_close(p.K, det.K())
            torch.testing.assert_close(p.T_cam_from_ct, rec.T_cam_from_ct[v], atol=1e-9, rtol=0)
            np.testing.assert_allclose(project(p.K, p.T_cam_from_ct, lm).numpy(), p.landmarks_uv.numpy(), atol=1e-8)
            K, E, G, _, raw_lm, gt, _ = raw_values(path, f"{v:03d}")
            np.testing.assert_allclose(p.landmarks_uv[:, 0].numpy(), 111 - gt[:, 0, 0], atol=1e-12)
            np.testing.assert_allclose(deepfluoro_formula(K, E, G, raw_lm), gt[:, :, 0], atol=1e-8)
        views, _ = df.views_from_projections([f.projection(SPEC, 0), f.projection(SPEC, 1)])
        assert views.images.shape == (2, 72, 112)


def test_write_specimen_takes_the_callers_images(tmp_path, tiny_ct):
    rng = torch.Generator().manual_seed(0)
    raw = (torch.rand(2, 20, 30, generator=rng) * 60000).round()
    T = torch.stack([torch.eye(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)])
    T[:, 2, 3] = 700.0
    K = DetectorConfig(height=20, width=30).K()
    path = tmp_path / "given.h5"
    rec = dfw.write_specimen(
        path,
        hu_of(tiny_ct),
        tiny_ct.T_ct_from_index,
        raw_images=raw,
        T_cam_from_ct=T,
        K=K,
        pixel_mm=(1.5, 1.25),
        landmarks={"a": [1.0, 2.0, 3.0]},
        mask=tiny_ct.mask,
        label_names={32: "x"},
    )
    assert rec.landmark_names == ("a",)
    with df.DeepFluoroFile(path) as f:
        p = f.projection(SPEC, 1)
        torch.testing.assert_close(p.image, raw[1])
        assert p.pixel_spacing_mm == (1.5, 1.25)
        assert f.label_names(SPEC)[32] == "x"
    with pytest.raises(ValueError, match=r"T_cam_from_ct must be \(2, 4, 4\)"):
        dfw.write_specimen(
            path,
            hu_of(tiny_ct),
            tiny_ct.T_ct_from_index,
            raw_images=raw,
            T_cam_from_ct=T[:1],
            K=K,
            pixel_mm=1.0,
            landmarks={"a": [0.0, 0.0, 0.0]},
        )
    with pytest.raises(ValueError, match="0..65535"):
        dfw.write_specimen(
            path,
            hu_of(tiny_ct),
            tiny_ct.T_ct_from_index,
            raw_images=raw * 2,
            T_cam_from_ct=T,
            K=K,
            pixel_mm=1.0,
            landmarks={"a": [0.0, 0.0, 0.0]},
        )
