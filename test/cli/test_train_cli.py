"""``mvreg train``: argument handling, a tiny run on a small CT file, --eval-only, refusals."""

import json

import numpy as np
import pytest

from mvreg_ros.cli import main as cli


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory):
    """Two small synthetic CTs (HU, NIfTI): a 'spine' of bone blocks in soft tissue."""
    import nibabel as nib

    d = tmp_path_factory.mktemp("ct")
    paths = []
    for shift in (0, 3):
        hu = np.full((40, 40, 24), -1000.0, dtype=np.float32)
        hu[8:32, 6:34, :] = 40.0
        for k in range(2, 22, 5):
            hu[16 + shift : 24 + shift, 10:16, k : k + 3] = 900.0
        hu[12:14, 20:30, 4:20] = 700.0
        affine = np.diag([-5.0, -5.0, 8.0, 1.0])
        p = d / f"ct{shift}.nii.gz"
        nib.save(nib.Nifti1Image(hu, affine), str(p))
        paths.append(p)
    cfg = d / "tiny.yaml"
    cfg.write_text(
        "train:\n  size: 32\n  image_size: 16\n  width: 8\n  fc: 32\n  n_samples: 24\n  voxel_mm: 5.0\n"
        "  pool_sets: 32\n  initial_sets: 8\n  refresh_sets: 1\n  batch_sets: 4\n  image_sets: 2\n"
        "  image_samples: 16\n  val_sets: 2\n  detector_px: 128\n  pixel_mm: 2.328\n"
    )
    return paths, cfg


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for opt in ("--out", "--config", "--minutes", "--device", "--resume", "--eval-only", "--specimen"):
        assert opt in out


def test_train_then_eval_only_then_refuse_other_ct(ct_files, tmp_path, capsys):
    (ct, other), cfg = ct_files
    out = tmp_path / "m.safetensors"
    assert cli.main(["train", str(ct), "--out", str(out), "--config", str(cfg), "--steps", "3", "--quiet"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["extra"]["step"] == 3 and meta["architecture"]["width"] == 8
    assert meta["volume"]["shape"] == [24, 40, 40]
    capsys.readouterr()
    assert (
        cli.main(
            ["train", str(ct), "--out", str(out), "--eval-only", "1", "--no-refine", "--json", str(tmp_path / "e.json")]
        )
        == 0
    )
    summary = json.loads((tmp_path / "e.json").read_text())["summary"]
    assert summary["n_sets"] == 1 and summary["coarse_median_mtre_mm"] > 0
    assert cli.main(["train", str(other), "--out", str(out), "--eval-only", "1", "--no-refine"]) == 2
    assert "another CT" in capsys.readouterr().err


def test_bad_inputs_are_reported(ct_files, tmp_path, capsys):
    (ct, _), _cfg = ct_files
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  no_such_setting: 1\n")
    assert cli.main(["train", str(ct), "--out", str(tmp_path / "m.safetensors"), "--config", str(bad)]) == 2
    assert "no_such_setting" in capsys.readouterr().err
    assert cli.main(["train", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err


def test_train_on_a_rectangular_deepfluoro_file(ct_files, tmp_path, capsys):
    """A DeepFluoro-layout file with a 48 x 64 detector: trained (letterboxed input), the
    checkpoint records the shape, and --eval-only runs on rectangular held-out views."""
    from mvreg_ros.core.data.deepfluoro_write import write_simulated
    from mvreg_ros.core.data.simulate import DetectorConfig
    from mvreg_ros.core.imaging.volume import load_hu

    (ct, _), cfg = ct_files
    hu, T_ct_from_index = load_hu(ct)
    h5 = tmp_path / "rect.h5"
    write_simulated(
        h5, hu, T_ct_from_index, angles_deg=[(0.0, 0.0)], detector=DetectorConfig(height=48, width=64, pixel_mm=5.0)
    )
    out = tmp_path / "rect.safetensors"
    assert cli.main(["train", str(h5), "--out", str(out), "--config", str(cfg), "--steps", "2", "--quiet"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["detector_shape"] == [48, 64]
    assert meta["config"]["detector_rows"] == 48 and meta["config"]["detector_px"] == 64
    assert meta["config"]["pixel_mm"] == pytest.approx(5.0)
    capsys.readouterr()
    assert (
        cli.main(
            ["train", str(h5), "--out", str(out), "--eval-only", "1", "--no-refine", "--json", str(tmp_path / "e.json")]
        )
        == 0
    )
    summary = json.loads((tmp_path / "e.json").read_text())["summary"]
    assert summary["n_sets"] == 1 and summary["coarse_median_mtre_mm"] > 0
    # resuming with a detector of another aspect ratio is refused, naming both shapes
    assert (
        cli.main(["train", str(ct), "--out", str(out), "--config", str(cfg), "--steps", "3", "--resume", "--quiet"])
        == 2
    )
    err = capsys.readouterr().err
    assert "128x128" in err and "48x64" in err


def test_the_network_depth_prior_is_the_files_source_to_isocentre_distance(ct_files, tmp_path, capsys):
    """A file that records the C-arm's source-to-isocentre distance trains the network at that depth;
    --sid-mm overrides it; a file without one is trained at the config's and the user is told."""
    import h5py

    from mvreg_ros.core.data.deepfluoro import DeepFluoroFile
    from mvreg_ros.core.data.deepfluoro_write import write_simulated
    from mvreg_ros.core.data.simulate import DetectorConfig
    from mvreg_ros.core.imaging.volume import load_hu

    (ct, _), cfg = ct_files
    hu, T_ct_from_index = load_hu(ct)
    h5 = tmp_path / "sid.h5"
    detector = DetectorConfig(height=64, width=64, pixel_mm=5.0, sid_mm=780.0, sdd_mm=1100.0)
    write_simulated(h5, hu, T_ct_from_index, angles_deg=[(0.0, 0.0)], detector=detector)
    with DeepFluoroFile(h5) as f:
        assert f.proj_params()["sid_mm"] == pytest.approx(780.0)

    def trained_sid(*extra) -> float:
        out = tmp_path / "m.safetensors"
        for p in tmp_path.glob("m.*"):
            p.unlink()
        assert (
            cli.main(["train", str(h5), "--out", str(out), "--config", str(cfg), "--steps", "1", "--quiet", *extra])
            == 0
        )
        meta = json.loads(out.with_suffix(".json").read_text())
        assert meta["config"]["sid_mm"] == meta["geometry"]["sid_mm"]
        return meta["geometry"]["sid_mm"]

    assert trained_sid() == pytest.approx(780.0)
    assert "source-to-isocentre" not in capsys.readouterr().err
    assert trained_sid("--sid-mm", "820") == pytest.approx(820.0)
    with h5py.File(h5, "a") as f:  # as the real DeepFluoro file: no such entry
        del f["proj-params/source-to-isocenter"]
    with DeepFluoroFile(h5) as f:
        assert f.proj_params()["sid_mm"] is None
    assert trained_sid() == pytest.approx(700.0)
    assert "records no source-to-isocentre distance" in capsys.readouterr().err
    assert cli.main(["train", str(h5), "--out", str(tmp_path / "x.safetensors"), "--sid-mm", "-5"]) == 2
