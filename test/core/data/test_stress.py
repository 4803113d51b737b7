"""Stress acquisitions rendered with other physics (mvreg_ros.core.data.stress): profiles, the
polychromatic Siddon model, the target-rigid deformation, truncation, the flat panel, the
written file and the CLI."""

import dataclasses
import importlib
import math

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from mvreg_ros.cli.main import main
from mvreg_ros.core.data import deepfluoro as df
from mvreg_ros.core.data import stress
from mvreg_ros.core.data.simulate import make_scene
from mvreg_ros.core.evaluation import evaluate as ev
from mvreg_ros.core.geometry.transforms import project
from mvreg_ros.core.imaging.volume import MU_WATER_PER_MM, Volume, example_ct_path, hu_to_mu
from mvreg_ros.core.registration.refine import RefineConfig
from mvreg_ros.core.rendering.reference import ReferenceRenderer

NAMES = df.read_structures(example_ct_path().with_name("structures.csv"))
SPEC = "sim-01"


def hu_of(volume):
    return volume.data / MU_WATER_PER_MM * 1000 - 1000


def target_mask(ct):
    labels = stress.target_labels(ct.mask, NAMES, "vertebrae")
    return torch.isin(ct.mask, torch.tensor(labels, dtype=ct.mask.dtype))


@pytest.fixture(scope="module")
def mismatch(tiny_ct, tmp_path_factory):
    """A tiny mismatch acquisition (48 x 64 px flat panel) and its file."""
    profile = stress.resized(stress.PROFILES["mismatch"], 64)
    case = stress.simulate(profile, hu_of(tiny_ct), tiny_ct.T_ct_from_index, tiny_ct.mask, NAMES, views=3, seed=2)
    path = tmp_path_factory.mktemp("stress") / "mismatch.h5"
    rec = stress.write_case(path, case)
    return case, path, rec


# ---------------------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------------------


def test_profiles_are_fixed():
    assert {"clean", "hard", "mismatch"} <= set(stress.PROFILES)
    for name, p in stress.PROFILES.items():
        assert p.name == name and stress.get_profile(name) is p
        with pytest.raises(dataclasses.FrozenInstanceError):
            p.i0 = 1.0  # type: ignore[misc]
    before = {k: dataclasses.asdict(v) for k, v in stress.PROFILES.items()}
    importlib.reload(stress)  # the values live in code: a fresh definition is equal
    assert {k: dataclasses.asdict(v) for k, v in stress.PROFILES.items()} == before
    clean, hard, mm = (stress.PROFILES[n] for n in ("clean", "hard", "mismatch"))
    assert clean == stress.StressProfile(name="clean")  # today's geometry and image intensifier
    assert (clean.height, clean.width, clean.pixel_mm, clean.sdd_mm, clean.sid_mm) == (256, 256, 1.164, 1020.0, 700.0)
    assert clean.deform_max_mm == 0 and clean.slab_mm is None and clean.tools == ()
    assert hard.photons_per_count < clean.photons_per_count and hard.scatter_to_primary > clean.scatter_to_primary
    assert hard.fov_radius < clean.fov_radius and len(hard.tools) >= 2
    assert hard.max_orbital_deg > clean.max_orbital_deg and hard.max_angular_deg > clean.max_angular_deg
    assert (mm.height, mm.width) == (192, 256) and mm.fov_radius is None
    assert mm.height * mm.pixel_mm == pytest.approx(300) and mm.width * mm.pixel_mm == pytest.approx(400)
    assert 5 <= mm.deform_max_mm <= 8 and 100 <= mm.slab_mm <= 120 and mm.shutter_sides[0] >= 1
    assert mm.column_gain_std > 0 and mm.tools and mm.density_change > 0
    with pytest.raises(ValueError, match="'nope'"):
        stress.get_profile("nope")
    with pytest.raises(ValueError, match="slab_mm"):
        stress.StressProfile(name="x", slab_mm=-1.0)


def test_resized_keeps_the_detector_extent():
    p = stress.resized(stress.PROFILES["mismatch"], 64)
    assert (p.height, p.width) == (48, 64)
    assert p.height * p.pixel_mm == pytest.approx(300) and p.width * p.pixel_mm == pytest.approx(400)


# ---------------------------------------------------------------------------------------
# Physics
# ---------------------------------------------------------------------------------------


def test_polychromatic_reduces_to_monochromatic(tiny_ct):
    """One energy bin at the reference energy, scale 1: I = I0 exp(-line integral of the reference renderer)."""
    hu = hu_of(tiny_ct)
    mu = hu_to_mu(hu)
    bone = (hu > stress.BONE_HU).long()
    assert bone.any() and (~bone.bool()).any()
    scene = make_scene(
        tiny_ct.bone_centre_ct(),
        [(0.0, 0.0), (60.0, 15.0)],
        detector=stress.resized(stress.PROFILES["mismatch"], 32).detector,
    )
    K = scene.K
    L = stress.render_materials(mu, bone, tiny_ct.T_ct_from_index, scene.T_cam_from_ct, K, 24, 32)
    ref = ReferenceRenderer(Volume(data=mu, T_ct_from_index=tiny_ct.T_ct_from_index))(scene.T_cam_from_ct, K, 24, 32)
    torch.testing.assert_close(L.sum(1), ref, atol=1e-4, rtol=1e-5)
    assert float(L[:, 1].max()) > 0.1 and float(L[:, 0].max()) > 1  # both materials seen
    assert stress.MONOCHROMATIC.scales().eq(1).all()
    L3 = torch.cat([L, torch.zeros(2, 1, 24, 32)], 1)
    I = stress.polychromatic(L3, stress.MONOCHROMATIC, i0=1000.0)
    torch.testing.assert_close(I, 1000.0 * torch.exp(-ref.double()), atol=1e-3, rtol=1e-5)


def test_beam_hardening():
    # bone and metal attenuation fall faster with energy than water's
    for lo, hi in ((40.0, 100.0), (50.0, 80.0)):
        s = {m: stress.attenuation_scale(m, lo) / stress.attenuation_scale(m, hi) for m in stress.MATERIALS}
        assert s["metal"] > s["bone"] > s["soft"] > 1
    # the effective attenuation per unit line integral drops with thickness, more for bone
    L = torch.zeros(2, 3, 1, 2, dtype=torch.float64)
    L[0, 0, 0] = torch.tensor([0.5, 8.0])  # soft tissue, thin and thick
    L[1, 1, 0] = torch.tensor([0.5, 8.0])  # bone
    eff = -torch.log(stress.polychromatic(L, stress.SPECTRUM_80KVP)) / L.sum(1)
    assert float(eff[0, 0, 1]) < float(eff[0, 0, 0]) and float(eff[1, 0, 1]) < float(eff[1, 0, 0])
    assert float(eff[1, 0, 0] / eff[1, 0, 1]) > float(eff[0, 0, 0] / eff[0, 0, 1])
    with pytest.raises(ValueError, match="weights"):
        stress.Spectrum(energies_kev=(50.0,), weights=(0.5, 0.5))
    with pytest.raises(ValueError, match="200"):
        stress.Spectrum(energies_kev=(200.0,), weights=(1.0,))


def test_metal_tool_volume_and_projection(tiny_ct):
    spec = stress.PEDICLE_SCREW
    tool = stress.Tool(spec=spec, start_ct=(0.0, 0.0, 0.0), direction_ct=(0.0, -0.6, 0.8))
    vol = stress.tool_volume(tool)
    voxel = float(torch.det(vol.T_ct_from_index[:3, :3]).abs())
    shaft = math.pi * spec.radius_mm**2 * (spec.length_mm - spec.head_length_mm)
    head = math.pi * spec.head_radius_mm**2 * spec.head_length_mm
    assert float(vol.data.sum()) * voxel == pytest.approx(spec.mu_per_mm * (shaft + head), rel=0.03)
    # placed tools show up in the field as thin, strongly attenuating lines
    centre = tiny_ct.bone_centre_ct()
    tools = stress.place_tools(stress.PROFILES["hard"].tools, centre, np.random.default_rng(0))
    scene = make_scene(centre, [(0.0, 0.0)], detector=stress.resized(stress.PROFILES["clean"], 96).detector)
    L = stress.render_tools(tools, scene.T_cam_from_ct, scene.K, 96, 96)
    assert 0.002 < float((L > 0.5).float().mean()) < 0.2 and float(L.max()) > 2


def test_deformation_keeps_the_target_rigid(tiny_ct):
    target = target_mask(tiny_ct)
    A = tiny_ct.T_ct_from_index
    d = stress.make_deformation(
        target,
        A,
        max_mm=6.0,
        smooth_mm=30.0,
        ramp_mm=15.0,
        margin_vox=2,
        density_change=0.05,
        density_smooth_mm=40.0,
        generator=torch.Generator().manual_seed(0),
    )
    f = d.sample()
    u = f[:3]
    assert torch.equal(d.rigid, d.rigid | target) and int(d.rigid.sum()) > int(target.sum())
    # exactly zero on the (dilated) target, a few mm elsewhere, never above the maximum
    assert float(u[:, d.rigid].abs().max()) == 0.0 and float(f[3:, d.rigid].abs().max()) == 0.0
    norm = u.norm(dim=0)
    assert float(norm.max()) <= 6.0 + 1e-4 and float(norm.max()) > 3.0
    assert float((norm > 0.5).float().mean()) > 0.3
    assert float(f[3].abs().max()) <= 0.05 + 1e-6 and float(f[3].abs().max()) > 0.01
    # smooth: neighbouring voxels move by less than their distance (no folding), rising from 0 next to the target
    spacing_kji = A[:3, :3].norm(dim=0).flip(0)
    for axis in range(3):
        grad = u.diff(dim=axis + 1).norm(dim=0) / float(spacing_kji[axis])
        assert float(grad.max()) < 0.8, axis
    # the intraoperative CT: identical on the target, different elsewhere
    hu = hu_of(tiny_ct)
    moved = stress.deform_hu(hu, A, d)
    assert torch.equal(moved[target], hu[target].float())
    assert float((moved - hu).abs()[~d.rigid].max()) > 50
    # the same generator seed gives the same field
    d2 = stress.make_deformation(
        target,
        A,
        max_mm=6.0,
        smooth_mm=30.0,
        ramp_mm=15.0,
        margin_vox=2,
        density_change=0.05,
        density_smooth_mm=40.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(d2.coarse, d.coarse)


def test_flat_panel_shutters_and_gain():
    p = stress.resized(stress.PROFILES["mismatch"], 64)
    H, W = p.height, p.width
    flat = torch.full((4, H, W), 20000.0, dtype=torch.float64)
    # gain alone (plenty of photons, no scatter, no shutters): a column pattern shared by every view
    quiet = dataclasses.replace(
        p, photons_per_count=1e4, read_noise_counts=0.0, scatter_to_primary=0.0, shutter_sides=(0, 0)
    )
    raw = stress.detector_response(
        flat, quiet, rng=np.random.default_rng(0), generator=torch.Generator().manual_seed(0)
    )
    assert raw.shape == (4, H, W) and torch.equal(raw, raw.round()) and float(raw.max()) <= 65535
    col = raw.mean(1) / 20000.0  # (V, W)
    assert 0.015 < float(col.std(1).mean()) < 0.05
    assert float((col - col[:1]).abs().max()) < 0.003  # one detector
    assert float((raw.std(1) / raw.mean(1)).max()) < 0.01  # rows agree: a column gain
    # shutters: one or two sides of each view near zero
    raw = stress.detector_response(flat, p, rng=np.random.default_rng(1), generator=torch.Generator().manual_seed(1))
    centre = float(raw[:, H // 2 - 4 : H // 2 + 4, W // 2 - 4 : W // 2 + 4].mean())
    for v in range(4):
        bands = [raw[v, :, :2], raw[v, :, -2:], raw[v, :2, :], raw[v, -2:, :]]
        dark = [float(b.mean()) < 0.05 * centre for b in bands]
        assert 1 <= sum(dark) <= 2, dark
    # the image intensifier of the clean profile: a circle, nothing in the corners
    c = stress.resized(stress.PROFILES["clean"], 32)
    raw = stress.detector_response(
        torch.full((1, 32, 32), 20000.0, dtype=torch.float64),
        c,
        rng=np.random.default_rng(0),
        generator=torch.Generator().manual_seed(0),
    )
    assert float(raw[0, 0, 0]) < 0.02 * float(raw[0, 16, 16]) and float(raw[0, 16, 16]) > 15000


# ---------------------------------------------------------------------------------------
# A whole acquisition and its file
# ---------------------------------------------------------------------------------------


def test_truncated_ct_covers_less_than_the_rendered_one(mismatch, tiny_ct):
    case, _, _ = mismatch
    assert case.file_extent_mm < case.rendered_extent_mm
    assert case.file_extent_mm <= stress.PROFILES["mismatch"].slab_mm + 20.0  # a slice of 20 mm
    assert case.rendered_extent_mm == pytest.approx(tiny_ct.data.shape[0] * 20.0)
    assert case.volume_hu.shape[0] < tiny_ct.data.shape[0] and case.volume_hu.shape[1:] == tiny_ct.data.shape[1:]
    # the file's CT is the undeformed CT, cut out
    k0 = int(round(float((case.T_ct_from_index[2, 3] - tiny_ct.T_ct_from_index[2, 3]) / 20.0)))
    torch.testing.assert_close(case.volume_hu, hu_of(tiny_ct)[k0 : k0 + case.volume_hu.shape[0]].float())
    assert case.max_displacement_mm == pytest.approx(6.0, abs=1e-3) and len(case.tools) == 3
    assert case.raw.shape == (3, 48, 64)


def test_landmarks_lie_on_the_target_only(mismatch):
    case, _, _ = mismatch
    A = case.T_ct_from_index.to(torch.float64)
    target = torch.isin(case.mask, torch.tensor(case.target_labels, dtype=case.mask.dtype))
    ijk = torch.linalg.solve(A[:3, :3], (case.landmarks_ct - A[:3, 3]).T).T
    spacing = A[:3, :3].norm(dim=0)
    pts = target.nonzero().flip(-1).to(torch.float64)  # target voxels (i, j, k)
    assert len(case.landmark_names) >= 5
    for name, p in zip(case.landmark_names, ijk):
        assert name.startswith("vertebrae"), name
        # inside the truncated CT, within a voxel of a target voxel (extremes are target voxels)
        shape = torch.tensor(Volume(data=case.volume_hu, T_ct_from_index=A).shape_ijk)
        assert (p > -0.5).all() and (p < shape - 0.5).all(), name
        dist = ((pts - p) * spacing).norm(dim=1).min()
        assert float(dist) <= (1e-6 if "_" in name.split("vertebrae_")[1] else float(spacing.norm())), name


def test_seeds_image_different_regions(tiny_ct):
    profile = stress.resized(stress.PROFILES["clean"], 16)
    centres = set()
    for seed in range(4):
        case = stress.simulate(
            profile, hu_of(tiny_ct), tiny_ct.T_ct_from_index, tiny_ct.mask, NAMES, views=1, seed=seed
        )
        centres.add(case.centre_structure)
        assert case.max_displacement_mm == 0 and case.file_extent_mm == case.rendered_extent_mm
    assert len(centres) >= 2


def test_written_file_reads_back_on_a_rectangular_detector(mismatch):
    case, path, _rec = mismatch
    with h5py.File(path, "r") as f:
        assert int(f["proj-params/num-rows"][()]) == 48 and int(f["proj-params/num-cols"][()]) == 64
        assert f[f"{SPEC}/projections/000/image/pixels"].shape == (48, 64)
        defs = f[f"{SPEC}/vol-seg/labels-def"]
        assert any(defs[k][()].decode().startswith("vertebrae") for k in defs)
        assert f[SPEC].attrs["stress-profile"] == "mismatch" and int(f[SPEC].attrs["stress-seed"]) == 2
    with df.DeepFluoroFile(path) as f:
        names, lm = f.landmarks(SPEC)
        assert sorted(case.landmark_names) == names
        vol = f.volume(SPEC)
        assert tuple(vol.data.shape) == tuple(case.volume_hu.shape) and vol.mask is not None
        assert any(n.startswith("vertebrae") for n in f.label_names(SPEC).values())
        for i in range(3):
            p = f.projection(SPEC, i)
            assert (p.height, p.width) == (48, 64)
            torch.testing.assert_close(p.image, case.raw[i])  # stored flipped, read back unflipped
            torch.testing.assert_close(p.K, case.K)
            torch.testing.assert_close(p.T_cam_from_ct, case.T_cam_from_ct[i], atol=1e-9, rtol=0)
            # the file's gt-landmarks = the engine's projection through the read-back K and pose
            uv = project(p.K, p.T_cam_from_ct, lm)
            torch.testing.assert_close(uv, p.landmarks_uv, atol=1e-8, rtol=0)
        views, _T_true = df.views_from_projections([f.projection(SPEC, i) for i in range(3)])
        assert views.images.shape == (3, 48, 64) and views.height == 48 and views.width == 64


def test_eval_runs_on_a_stress_file(mismatch):
    _, path, _ = mismatch
    quick = RefineConfig(
        sizes=(32,), iterations=(10,), n_samples=(32,), patches=(8,), uncertainty=False, render_backend="grid_sample"
    )
    report = ev.run(path, ev.EvalConfig(max_sets=1, refine=quick, perturb_rot_deg=5.0, perturb_trans_mm=10.0))
    (case,) = report["cases"]
    assert case["views"] == [0, 1] and math.isfinite(case["mtre_mm"]) and math.isfinite(case["init_mtre_mm"])
    assert report["summary"]["n"] == 1


def test_simulate_rejects_bad_input(tiny_ct):
    hu = hu_of(tiny_ct)
    with pytest.raises(ValueError, match="views"):
        stress.simulate("clean", hu, tiny_ct.T_ct_from_index, tiny_ct.mask, NAMES, views=0)
    with pytest.raises(ValueError, match="mask"):
        stress.simulate("clean", hu, tiny_ct.T_ct_from_index, None, NAMES)
    with pytest.raises(ValueError, match="'spleen_x'"):
        stress.simulate(
            dataclasses.replace(stress.PROFILES["clean"], target_prefix="spleen_x"),
            hu,
            tiny_ct.T_ct_from_index,
            tiny_ct.mask,
            NAMES,
        )
    with pytest.raises(TypeError, match="profile"):
        stress.simulate(3, hu, tiny_ct.T_ct_from_index, tiny_ct.mask, NAMES)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def test_cli_profile_writes_a_file(tiny_ct, tmp_path, capsys):
    RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine = RAS_FROM_LPS @ tiny_ct.T_ct_from_index.numpy()
    ct, mask = tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(hu_of(tiny_ct).numpy().transpose(2, 1, 0).astype(np.float32), affine), str(ct))
    nib.save(nib.Nifti1Image(tiny_ct.mask.numpy().transpose(2, 1, 0).astype(np.int16), affine), str(mask))
    structures = str(example_ct_path().with_name("structures.csv"))
    out = tmp_path / "m.h5"
    args = ["simulate", str(out), "--ct", str(ct), "--mask", str(mask), "--structures", structures]
    assert main(args + ["--profile", "mismatch", "--views", "2", "--size", "32", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert "profile mismatch" in text and "2 views of 24x32 px" in text and "landmarks on the target" in text
    with df.DeepFluoroFile(out) as f:
        assert f.num_projections(SPEC) == 2 and f.projection(SPEC, 1).image.shape == (24, 32)
    for bad, message in (
        (["--profile", "nope"], "unknown --profile"),
        (["--profile", "hard", "--views", "0"], "--views"),
        (["--profile", "hard", "--offset-mm", "3"], "fixed by the profile"),
        (["--profile", "hard", "--downsample", "0"], "--downsample"),
        (["--render-downsample", "2"], "needs --profile"),
    ):
        assert main(args + bad) == 2, bad
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
