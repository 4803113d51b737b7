"""``mvreg simulate --format dicom`` then ``mvreg register``: simulated XA files of the shipped CT
(pooled by 8), two views, a start 10 deg / 20 mm off the truth; the result against the truth."""

import json

import pytest
import torch

from mvreg_ros.cli.main import main
from mvreg_ros.core.geometry.transforms import perturb, transform_points

F64 = torch.float64


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dicom") / "sim"
    rc = main(
        ["simulate", "--format", "dicom", str(out), "--downsample", "8", "--size", "64", "--angles", "0,0;90,0"]
        + ["--seed", "2", "--offset-mm", "5"]
    )
    assert rc == 0
    return out


def _truth(sim_dir):
    t = json.loads((sim_dir / "truth.json").read_text())
    return torch.tensor(t["T_iso_from_ct"], dtype=F64), torch.tensor(t["landmarks_ct"], dtype=F64)


def _mtre(T_a, T_b, points):
    return float((transform_points(T_a, points) - transform_points(T_b, points)).norm(dim=-1).mean())


def test_register_simulated_dicom_from_an_offset_start(sim_dir, tmp_path, capsys):
    T_true, landmarks = _truth(sim_dir)
    T_init = perturb(
        T_true, rot_deg=10.0, trans_mm=20.0, centre_ct=landmarks.mean(0), generator=torch.Generator().manual_seed(1)
    )
    init = tmp_path / "init.json"
    init.write_text(json.dumps(T_init.tolist()))
    out = tmp_path / "result.json"
    files = [str(sim_dir / "view_000.dcm"), str(sim_dir / "view_001.dcm")]
    rc = main(["register", "example:8", *files, "--init-pose", str(init), "--quick", "--no-global", "--json", str(out)])
    text = capsys.readouterr()
    assert rc == 0, text.out + text.err
    assert "acceptance test: accepted" in text.out
    data = json.loads(out.read_text())
    T_est = torch.tensor(data["T_iso_from_ct"], dtype=F64)
    assert _mtre(T_init, T_true, landmarks) > 15.0  # the start really was off
    # the shipped CT pooled by 8 has 20 mm slices and the views are 64 px: a few mm is its resolution
    assert _mtre(T_est, T_true, landmarks) < 3.0
    assert data["accepted"] is True and data["reason"] == ""
    assert [v["file"] for v in data["views"]] == ["view_000.dcm", "view_001.dcm"]
    v1 = data["views"][1]
    assert v1["orbital_deg"] == 90.0 and v1["joint_positions"]["orbital"] == pytest.approx(torch.pi / 2)
    truth = json.loads((sim_dir / "truth.json").read_text())
    torch.testing.assert_close(torch.tensor(v1["T_iso_from_cam"]), torch.tensor(truth["T_iso_from_cam"][1]))
    assert len(v1["K"]) == 3 and "similarity" in v1 and data["uncertainty_mm"] is not None


def test_bad_input_gives_a_one_line_reason(sim_dir, tmp_path, capsys):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"no DICOM here")
    assert main(["register", "example:8", str(junk)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mvreg register: error:") and "not a DICOM file" in err
    assert main(["register", "example:8", str(sim_dir / "enhanced_xa.dcm"), "--frames", "0,x"]) == 2
    assert "--frames looks like" in capsys.readouterr().err
    assert main(["register", "example:8", str(sim_dir / "enhanced_xa.dcm"), "--frames", "5"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["register", "example:8", str(tmp_path / "missing.dcm")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    pose = tmp_path / "pose.json"
    pose.write_text("[[1, 0], [0, 1]]")
    assert main(["register", "example:8", str(sim_dir / "view_000.dcm"), "--init-pose", str(pose)]) == 2
    assert "must be 4x4" in capsys.readouterr().err
    assert main(["register", "example:8", str(sim_dir / "view_000.dcm"), "--downsample", "0"]) == 2
    assert "--downsample" in capsys.readouterr().err


def test_simulate_dicom_writes_the_folder(sim_dir):
    names = sorted(p.name for p in sim_dir.iterdir())
    assert names == ["acquisitions.h5", "enhanced_xa.dcm", "truth.json", "view_000.dcm", "view_001.dcm"]
