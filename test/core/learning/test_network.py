"""Coarse network: rotation parameterisation, pose decoding, checkpoints."""

import math

import pytest
import torch

from mvreg_ros.core.data.simulate import DetectorConfig
from mvreg_ros.core.geometry.pose_sampling import canonical_rotation
from mvreg_ros.core.geometry.transforms import make_T, scale_intrinsics, so3_exp
from mvreg_ros.core.learning.network import (
    ArchConfig,
    CheckpointError,
    PoseGeometry,
    PoseNet,
    decode,
    encode_targets,
    load_checkpoint,
    read_metadata,
    rotation_from_6d,
    save_checkpoint,
)

ARCH = ArchConfig(size=32, width=8, fc=16)
GEOM = PoseGeometry(
    centre_ct=(10.0, -20.0, -150.0),
    R0_cam_from_ct=tuple(tuple(float(x) for x in r) for r in canonical_rotation()),
    sid_mm=700.0,
)
IDENTITY = {"sha256": "ab" * 32, "shape": [17, 64, 64], "spacing_mm": [5.6, 5.6, 20.0]}


def test_rotation_from_6d_identity_and_orthonormal():
    eye = rotation_from_6d(torch.tensor([1.0, 0, 0, 0, 1.0, 0], dtype=torch.float64))
    assert torch.allclose(eye, torch.eye(3, dtype=torch.float64))
    R = rotation_from_6d(torch.randn(50, 6, dtype=torch.float64))
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(50, 3, 3), atol=1e-10)
    assert torch.allclose(torch.linalg.det(R), torch.ones(50, dtype=torch.float64))


def test_decode_inverts_encode_and_zero_output_is_ap_at_isocentre():
    g = torch.Generator().manual_seed(0)
    K = scale_intrinsics(DetectorConfig().K(), 32 / 256).expand(6, 3, 3)
    R = so3_exp(0.6 * torch.randn(6, 3, generator=g, dtype=torch.float64)) @ canonical_rotation()
    c = torch.tensor(GEOM.centre_ct, dtype=torch.float64)
    p_cam = torch.randn(6, 3, generator=g, dtype=torch.float64) * 20 + torch.tensor([0, 0, 700.0], dtype=torch.float64)
    T = make_T(R, p_cam - (R @ c[:, None])[..., 0])
    out = encode_targets(T, K, arch=ARCH, geometry=GEOM)
    assert torch.allclose(decode(out, K, arch=ARCH, geometry=GEOM), T, atol=1e-8)
    T0 = decode(torch.zeros(1, 9), K[:1], arch=ARCH, geometry=GEOM)[0]
    assert torch.allclose(T0[:3, :3], canonical_rotation(), atol=1e-12)
    centre_cam = T0[:3, :3] @ c + T0[:3, 3]
    assert torch.allclose(centre_cam, torch.tensor([0, 0, 700.0], dtype=torch.float64), atol=1e-6)


def test_forward_shape_and_size_check():
    net = PoseNet(ARCH).eval()
    out = net(torch.rand(3, 32, 32), torch.ones(3, 32, 32))
    assert out.shape == (3, 9)
    with pytest.raises(ValueError, match="32, 32"):
        net(torch.rand(3, 64, 64), torch.ones(3, 64, 64))


def _trained_looking_net(seed=0) -> PoseNet:
    torch.manual_seed(seed)
    net = PoseNet(ARCH)
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    return net.eval()


def test_checkpoint_round_trip(tmp_path):
    net = _trained_looking_net()
    x, m = torch.rand(2, 32, 32), torch.ones(2, 32, 32)
    path = save_checkpoint(
        tmp_path / "m.safetensors",
        net,
        geometry=GEOM,
        volume_identity=IDENTITY,
        config={"lr": 0.001},
        extra={"step": 7},
    )
    loaded, geom, meta = load_checkpoint(path, volume_identity=IDENTITY, arch=ARCH)
    assert geom == GEOM
    assert meta["extra"]["step"] == 7 and meta["config"]["lr"] == 0.001
    assert torch.allclose(loaded(x, m), net(x, m))
    assert (tmp_path / "m.json").exists()
    assert read_metadata(path)["volume"] == IDENTITY


def test_checkpoint_refuses_other_ct_and_other_architecture(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", _trained_looking_net(), geometry=GEOM, volume_identity=IDENTITY)
    other = dict(IDENTITY, sha256="cd" * 32)
    with pytest.raises(CheckpointError, match="another CT"):
        load_checkpoint(path, volume_identity=other)
    with pytest.raises(CheckpointError, match="another CT"):
        load_checkpoint(path, volume_identity=dict(IDENTITY, spacing_mm=[1.0, 1.0, 1.0]))
    with pytest.raises(CheckpointError, match="architecture"):
        load_checkpoint(path, arch=ArchConfig(size=32, width=16, fc=16))


def test_checkpoint_refuses_foreign_files(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, str(p))
    with pytest.raises(CheckpointError, match="metadata"):
        load_checkpoint(p)
    bad = tmp_path / "pickle.safetensors"
    bad.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(CheckpointError, match="not a safetensors"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_parameter_count_of_default_architecture_is_small():
    from mvreg_ros.core.learning.network import count_parameters

    n = count_parameters(PoseNet(ArchConfig()))
    assert 0.5e6 < n < 3e6, n
    assert not math.isnan(n)


def test_checkpoint_records_the_detector_shape(tmp_path):
    path = save_checkpoint(
        tmp_path / "m.safetensors",
        _trained_looking_net(),
        geometry=GEOM,
        volume_identity=IDENTITY,
        detector_shape=(48, 64),
    )
    _, _, meta = load_checkpoint(path)
    assert meta["detector_shape"] == [48, 64] and read_metadata(path)["detector_shape"] == [48, 64]
    with pytest.raises(ValueError, match=r"\(0, 64\)"):
        save_checkpoint(
            tmp_path / "bad.safetensors",
            _trained_looking_net(),
            geometry=GEOM,
            volume_identity=IDENTITY,
            detector_shape=(0, 64),
        )
    # without a shape (older checkpoints) the key is absent
    old = save_checkpoint(tmp_path / "old.safetensors", _trained_looking_net(), geometry=GEOM, volume_identity=IDENTITY)
    assert "detector_shape" not in read_metadata(old)
