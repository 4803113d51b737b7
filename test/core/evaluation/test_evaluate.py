"""The registration benchmark on DeepFluoro-layout files."""

import json

import h5py
import numpy as np
import pytest
import torch

from mvreg_ros.core.data import deepfluoro as df
from mvreg_ros.core.evaluation import evaluate as ev
from mvreg_ros.core.geometry.transforms import invert, make_T, rotation_angle_deg, transform_points
from mvreg_ros.core.registration.refine import RefineConfig
from mvreg_ros.core.rendering.renderer import resolve_backend

SPEC = "sim-01"  # the specimen of the tiny_file fixture (conftest.py)
QUICK = RefineConfig(sizes=(32,), iterations=(60,), n_samples=(48,), patches=(8,))


@pytest.fixture(scope="module")
def report(tiny_file):
    config = ev.EvalConfig(refine=QUICK, perturb_rot_deg=5.0, perturb_trans_mm=10.0, seed=1)
    return ev.run(tiny_file, config)


def test_refinement_recovers_the_pose(report):
    # the backend actually used (auto resolved) is recorded
    assert report["render_backends"] == [resolve_backend(QUICK.render_backend, "cpu", torch.float32)]
    cases = report["cases"]
    assert [c["views"] for c in cases] == [[0, 1], [1, 2]]  # default: consecutive pairs
    for c in cases:
        assert c["init_mtre_mm"] > 5
        assert c["mtre_mm"] < 0.35 * c["init_mtre_mm"], c
        assert c["mpd_mm"] < c["init_mpd_mm"]
        assert c["success"] == (c["mtre_mm"] <= 2.0)


def test_json_contract(report, tmp_path):
    path = tmp_path / "out.json"
    ev.write_json(report, path)
    data = json.loads(path.read_text())  # strict JSON: no NaN/Infinity
    for c in data["cases"]:
        for key in (
            "views",
            "mtre_mm",
            "mpd_mm",
            "success",
            "time_s",
            "init_mtre_mm",
            "pose_init",
            "pose_est",
            "reason",
            "similarity",
            "uncertainty_mm",
            "curvature_scale",
            "specimen",
        ):
            assert key in c, key
        assert c["curvature_scale"] in (0.0, 1.0, 2.0)  # the default steps, the one fallback, or none
        assert np.asarray(c["pose_est"]).shape == (4, 4) and np.asarray(c["pose_init"]).shape == (4, 4)
        assert c["time_s"] > 0
    s = data["summary"]
    assert s["n"] == 2 and set(s["mtre_mm"]) == {"mean", "median", "p95"} and "median" in s["time_s"]
    assert 0 <= s["success_rate"] <= 1
    assert s["mtre_mm"]["mean"] == pytest.approx(np.mean([c["mtre_mm"] for c in data["cases"]]))
    assert data["config"]["perturb_rot_deg"] == 5.0


def test_errors_can_be_recomputed_from_the_file(report, tiny_file):
    """pose_est / pose_init are the first view's cam-to-pelvis-vol in the file convention:
    with the file alone (h5py + numpy), the mTRE follows."""
    with h5py.File(tiny_file, "r") as f:
        E = f["proj-params/extrinsic"][()]
        lm = np.stack([f[f"{SPEC}/vol-landmarks/{n}"][()][:, 0] for n in sorted(f[f"{SPEC}/vol-landmarks"])])
        for c in report["cases"]:
            G_true = f[f"{SPEC}/projections/{c['views'][0]:03d}/gt-poses/cam-to-pelvis-vol"][()]
            np.testing.assert_allclose(c["pose_true"], G_true)
            for key, err in (("pose_est", "mtre_mm"), ("pose_init", "init_mtre_mm")):
                # points in the first camera frame; the DeepFluoro camera differs from ours by a fixed rotation
                A = E @ np.linalg.inv(np.asarray(c[key])) - E @ np.linalg.inv(G_true)
                d = lm @ A[:3, :3].T + A[:3, 3]
                assert np.linalg.norm(d, axis=1).mean() == pytest.approx(c[err], rel=1e-6, abs=1e-9)


def test_perturb_cameras_exact_errors_first_camera_kept():
    g = torch.Generator().manual_seed(0)
    T_ref_from_cam = torch.stack([torch.eye(4, dtype=torch.float64)] * 3)
    T_ref_from_cam[1:, :3, 3] = torch.tensor([[300.0, 0, 100], [-200.0, 50, 120]], dtype=torch.float64)
    T_ref_from_ct = make_T(torch.eye(3, dtype=torch.float64), torch.tensor([0.0, 0.0, 700.0], dtype=torch.float64))
    centre = torch.tensor([5.0, -3.0, 10.0], dtype=torch.float64)
    noisy = ev.perturb_cameras(T_ref_from_cam, T_ref_from_ct, centre, rot_deg=2.0, trans_mm=3.0, generator=g)
    torch.testing.assert_close(noisy[0], T_ref_from_cam[0])
    c_ref = transform_points(T_ref_from_ct, centre[None])
    for k in (1, 2):
        D = noisy[k] @ invert(T_ref_from_cam[k])
        assert float(rotation_angle_deg(D[:3, :3])) == pytest.approx(2.0, abs=1e-9)
        # the anatomy centre, seen from the camera, moves by exactly trans_mm
        assert float((transform_points(D, c_ref) - c_ref).norm()) == pytest.approx(3.0, abs=1e-9)
    same = ev.perturb_cameras(T_ref_from_cam, T_ref_from_ct, centre, rot_deg=0.0, trans_mm=0.0, generator=g)
    torch.testing.assert_close(same, T_ref_from_cam)


def test_geometry_noise_and_explicit_sets(tiny_file):
    config = ev.EvalConfig(
        refine=RefineConfig(sizes=(32,), iterations=(3,), n_samples=(16,), patches=(8,), uncertainty=False),
        view_sets=((2, 0, 1), (1,)),
        geometry_noise_deg=1.0,
        geometry_noise_mm=2.0,
        specimens=(SPEC,),
    )
    seen = []
    rep = ev.run(tiny_file, config, progress=seen.append)
    assert [c["views"] for c in rep["cases"]] == [[2, 0, 1], [1]] and seen == rep["cases"]
    assert rep["cases"][0]["uncertainty_mm"] is None  # not computed -> null, not inf
    assert "pose_coarse" not in rep["cases"][0]
    text = ev.format_table(rep)
    assert "2,0,1" in text and "success (mTRE <= 2 mm)" in text and "mTRE mm" in text


def test_network_initialisation_is_a_clear_hook(tiny_file, tmp_path):
    with pytest.raises(ValueError, match="network initialisation needs --model"):
        ev.run(tiny_file, ev.EvalConfig(init="network", refine=QUICK))
    with pytest.raises(FileNotFoundError, match="coarse model not found"):
        ev.run(tiny_file, ev.EvalConfig(init="network", model=str(tmp_path / "none.pt"), refine=QUICK))
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"")
    with pytest.raises(ValueError, match="not a safetensors checkpoint"):  # refused with a clear message
        ev.run(tiny_file, ev.EvalConfig(init="network", model=str(model), refine=QUICK))


def test_bad_configs_and_sets(tiny_file):
    with pytest.raises(ValueError, match="init must be one of"):
        ev.EvalConfig(init="magic")
    with pytest.raises(ValueError, match="perturb_rot_deg"):
        ev.EvalConfig(perturb_rot_deg=-1)
    with pytest.raises(ValueError, match="distinct"):
        ev.EvalConfig(view_sets=((0, 0),))
    with pytest.raises(ValueError, match="max_sets"):
        ev.EvalConfig(max_sets=0)
    with pytest.raises(ValueError, match="has no projection \\[5\\]"):
        ev.run(tiny_file, ev.EvalConfig(view_sets=((0, 5),), refine=QUICK))
    with pytest.raises(KeyError, match="no specimen 'x'"):
        ev.run(tiny_file, ev.EvalConfig(specimens=("x",), refine=QUICK))


def test_parse_view_sets_and_defaults():
    assert ev.parse_view_sets("0,1;2,5,7") == ((0, 1), (2, 5, 7))
    assert ev.parse_view_sets(" 3 ; ") == ((3,),)
    with pytest.raises(ValueError, match="view sets look like"):
        ev.parse_view_sets("0,a")
    assert ev.default_view_sets(4) == ((0, 1), (1, 2), (2, 3))
    assert ev.default_view_sets(1) == ((0,),)


def test_summary_statistics():
    cases = [
        {"mtre_mm": m, "mpd_mm": m / 2, "init_mtre_mm": 20.0, "success": m <= 2, "time_s": t, "accepted": a}
        for m, t, a in ((1.0, 3.0, True), (3.0, 5.0, True), (0.5, 4.0, False), (40.0, 6.0, False))
    ]
    s = ev.summarise(cases)
    assert s["n"] == 4 and s["success_rate"] == 0.5
    # accepted 3.0 mm: a false acceptance; rejected 0.5 mm: a false rejection; 1 of 2 successes accepted
    assert (s["accepted"], s["false_acceptances"], s["false_rejections"]) == (2, 1, 1)
    assert s["true_acceptance_rate"] == 0.5
    assert s["time_s"]["median"] == 4.5
    finite = ev.summarise(cases[:3])["mtre_mm"]
    assert finite["mean"] == pytest.approx(1.5) and finite["median"] == 1.0
    assert finite["p95"] == pytest.approx(np.percentile([1.0, 3.0, 0.5], 95))


def test_network_initialisation_runs_both_stages(tiny_file, tmp_path):
    """With a checkpoint for the file's CT, each case reports the coarse pose and its error, and the
    summary reports the coarse stage apart from the refined one."""
    from mvreg_ros.core.learning.network import ArchConfig, PoseGeometry, PoseNet, save_checkpoint

    with df.DeepFluoroFile(tiny_file) as f:
        volume = f.volume(SPEC, with_mask=False)
    c = volume.bone_centre_ct()

    def checkpoint(name: str, sid_mm: float):
        return save_checkpoint(
            tmp_path / name,
            PoseNet(ArchConfig(size=32, width=4, fc=8)),
            geometry=PoseGeometry(
                centre_ct=tuple(float(x) for x in c),
                R0_cam_from_ct=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
                sid_mm=sid_mm,
            ),
            volume_identity=volume.identity(),
        )

    # the file records its C-arm's source-to-isocentre distance (700 mm): a network trained for
    # another one is refused before any case runs
    with df.DeepFluoroFile(tiny_file) as f:
        assert f.proj_params()["sid_mm"] == 700.0
    far = checkpoint("far.safetensors", 785.0)
    with pytest.raises(ValueError, match="source-to-isocentre distance of 785 mm, the file's C-arm has 700 mm"):
        ev.run(tiny_file, ev.EvalConfig(init="network", model=str(far), view_sets=((0, 1),), refine=QUICK))
    model = checkpoint("tiny.safetensors", 700.0)
    rep = ev.run(tiny_file, ev.EvalConfig(init="network", model=str(model), view_sets=((0, 1),), refine=QUICK))
    case = rep["cases"][0]
    assert len(case["pose_coarse"]) == 4 and case["coarse_mtre_mm"] == pytest.approx(case["init_mtre_mm"])
    assert case["pose_init"] == case["pose_coarse"]  # refinement starts from the network, not the truth
    assert rep["summary"]["coarse_mtre_mm"]["median"] == pytest.approx(case["coarse_mtre_mm"])
    assert "coarse network alone" in ev.format_table(rep)
