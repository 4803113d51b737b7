"""Start-up: the CT is loaded once, with clear errors and a non-zero exit for a missing or
unreadable file; the console script is the entry point."""

import gzip
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ros_harness import deadline

from mvreg_ros.ros.volume_source import VolumeError, load_ct


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "volume_path"),
        ("/nonexistent/ct.nii.gz", "CT volume not found"),
        ("example:0", "integer N >= 1"),
        ("example:two", "integer N >= 1"),
    ],
)
def test_bad_volume_specs(spec, match):
    with pytest.raises(VolumeError, match=match):
        load_ct(spec)


def test_unreadable_and_empty_files(tmp_path):
    bad = tmp_path / "ct.nii.gz"
    bad.write_bytes(gzip.compress(b"this is not a NIfTI file" * 10))
    with pytest.raises(VolumeError, match="cannot read a CT volume from"):
        load_ct(str(bad))
    nib = pytest.importorskip("nibabel")
    air = tmp_path / "air.nii"
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), -1000, dtype=np.int16), np.eye(4)), str(air))
    with pytest.raises(VolumeError, match="no attenuation above air"):
        load_ct(str(air))
    ok = tmp_path / "ok.nii.gz"
    data = np.full((8, 9, 10), -1000, dtype=np.int16)
    data[2:6, 3:6, 4:8] = 700
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.6, 2.0, 1.0])), str(ok))
    vol = load_ct(str(ok))
    assert tuple(vol.data.shape) == (10, 9, 8) and vol.spacing.tolist() == pytest.approx([0.5, 0.6, 2.0])


def node_command() -> list[str]:
    """The console script ``register_node`` when installed next to this interpreter, else ``-m``."""
    script = shutil.which("register_node", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "mvreg_ros.ros.node"]


@pytest.mark.parametrize("case", ["missing", "unreadable"])
def test_node_exits_with_a_clear_error(ros_env, tmp_path, case):
    pytest.importorskip("rclpy")
    path = tmp_path / "nope.nii.gz"
    if case == "unreadable":
        path.write_text("not a volume")
    cmd = node_command() if case == "missing" else [sys.executable, "-m", "mvreg_ros.ros.node"]
    out = subprocess.run(
        [*cmd, "--ros-args", "-p", f"volume_path:={path}"],
        env=ros_env,
        capture_output=True,
        text=True,
        timeout=deadline(120),
    )
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "FATAL" in text and str(path) in text
    assert ("CT volume not found" if case == "missing" else "cannot read a CT volume") in text
    assert "Traceback" not in text


def test_an_rclpy_error_during_ctrl_c_is_a_clean_shutdown():
    """Ctrl-C inside a message take surfaces as a RuntimeError while rclpy's signal thread shuts
    the context down: that is the interrupt (exit 0); the same error while the context stays up
    is a real one (re-raised)."""
    from mvreg_ros.ros.node import interrupted

    answers = iter([True, True, False])  # the context goes down a moment later
    assert interrupted(ok=lambda: next(answers), wait_s=5.0)
    t = time.monotonic()
    assert not interrupted(ok=lambda: True, wait_s=0.05)
    assert 0.05 <= time.monotonic() - t < 1.0
