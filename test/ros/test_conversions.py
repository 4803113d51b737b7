"""Message conversions as pure-function round trips (no DDS)."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("sensor_msgs.msg")
pytest.importorskip("geometry_msgs.msg")

from scipy.spatial.transform import Rotation
from sensor_msgs.msg import CameraInfo, Image

from mvreg_ros.core.geometry.transforms import make_T, matrix_from_quaternion, quaternion_from_matrix, so3_exp
from mvreg_ros.ros.conversions import (
    K_to_camera_info,
    T_from_pose,
    T_from_transform,
    camera_info_to_K,
    covariance_from_ros,
    covariance_to_ros,
    image_to_tensor,
    ns_to_stamp,
    pose_with_covariance_from_T,
    stamp_to_ns,
    tensor_to_image,
    transform_stamped_from_T,
)

RNG = np.random.default_rng(0)


@pytest.mark.parametrize(
    "encoding, values",
    [
        ("mono8", RNG.integers(0, 256, (5, 7))),
        ("8UC1", RNG.integers(0, 256, (5, 7))),
        ("mono16", RNG.integers(0, 65536, (5, 7))),
        ("16UC1", RNG.integers(0, 65536, (5, 7))),
        ("32FC1", RNG.normal(0, 1e3, (5, 7)).astype(np.float32)),
    ],
)
@pytest.mark.parametrize("padding", [0, 3])
@pytest.mark.parametrize("bigendian", [False, True])
def test_image_round_trip(encoding, values, padding, bigendian):
    msg = tensor_to_image(values, encoding=encoding, row_padding=padding, bigendian=bigendian)
    assert msg.height == 5 and msg.width == 7 and msg.is_bigendian == int(bigendian)
    assert msg.step == 7 * {"mono8": 1, "8UC1": 1, "mono16": 2, "16UC1": 2, "32FC1": 4}[encoding] + padding
    out = image_to_tensor(msg)
    assert out.dtype == torch.float32 and out.shape == (5, 7)
    np.testing.assert_array_equal(out.numpy(), values.astype(np.float32))


def test_image_decoding_reads_the_bytes_as_ros_defines_them():
    # an independent encoder: mono16 little endian, 2 bytes of padding per row
    a = np.array([[1, 256, 65535], [7, 8, 9]], dtype="<u2")
    rows = [a[r].tobytes() + b"\xff\xff" for r in range(2)]
    msg = Image(height=2, width=3, encoding="mono16", is_bigendian=0, step=8)
    msg.data = b"".join(rows)
    np.testing.assert_array_equal(image_to_tensor(msg).numpy(), a.astype(np.float32))
    big = Image(height=1, width=2, encoding="mono16", is_bigendian=1, step=4)
    big.data = bytes([0x01, 0x00, 0x00, 0x02])  # 256, 2
    np.testing.assert_array_equal(image_to_tensor(big).numpy(), [[256.0, 2.0]])


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda m: setattr(m, "encoding", "rgb8"), "unsupported image encoding"),
        (lambda m: setattr(m, "step", 10), "step"),
        (lambda m: setattr(m, "data", bytes(20)), "data holds"),
        (lambda m: setattr(m, "height", 0), "no pixels"),
    ],
)
def test_image_errors(mutate, match):
    msg = tensor_to_image(np.ones((4, 8)), encoding="mono16")
    mutate(msg)
    with pytest.raises(ValueError, match=match):
        image_to_tensor(msg)


def test_camera_info_round_trip_and_checks():
    K = torch.tensor([[876.2, 0.0, 31.5], [0.0, 876.2, 30.25], [0.0, 0.0, 1.0]], dtype=torch.float64)
    info = K_to_camera_info(K, height=48, width=64)
    torch.testing.assert_close(camera_info_to_K(info, height=48, width=64), K)
    assert list(info.p) == [876.2, 0.0, 31.5, 0.0, 0.0, 876.2, 30.25, 0.0, 0.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="does not match CameraInfo"):
        camera_info_to_K(info, height=64, width=64)
    neg = K_to_camera_info(K * torch.tensor([[-1.0], [-1.0], [1.0]], dtype=torch.float64), height=48, width=64)
    with pytest.raises(ValueError, match="positive focal"):
        camera_info_to_K(neg, height=48, width=64)
    with pytest.raises(ValueError, match="uncalibrated"):
        camera_info_to_K(CameraInfo(), height=48, width=64)
    binned = K_to_camera_info(K, height=48, width=64)
    binned.binning_x = 2
    with pytest.raises(ValueError, match="binning"):
        camera_info_to_K(binned, height=48, width=64)


def rotations():
    """Generic rotations and the 180-degree ones where naive quaternion extraction fails."""
    out = [torch.eye(3, dtype=torch.float64)]
    for axis in ([1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, -2, 3], [0, -1, 1]):
        a = torch.tensor(axis, dtype=torch.float64)
        a = a / a.norm()
        out += [so3_exp(a * math.pi), so3_exp(a * (math.pi - 1e-7)), so3_exp(a * 0.3)]
    g = torch.Generator().manual_seed(1)
    out += [so3_exp(torch.randn(3, generator=g, dtype=torch.float64)) for _ in range(5)]
    return out


@pytest.mark.parametrize("R", rotations())
def test_transform_round_trip_metres(R):
    t_mm = torch.tensor([123.4, -56.7, 890.1], dtype=torch.float64)
    T = make_T(R, t_mm)
    msg = transform_stamped_from_T(T, parent_frame="carm_base", child_frame="anatomy", stamp=ns_to_stamp(5))
    assert (msg.header.frame_id, msg.child_frame_id) == ("carm_base", "anatomy")
    tr, q = msg.transform.translation, msg.transform.rotation
    assert (tr.x, tr.y, tr.z) == pytest.approx((0.1234, -0.0567, 0.8901), abs=1e-12)  # metres
    assert q.w >= 0 and math.isclose(q.x**2 + q.y**2 + q.z**2 + q.w**2, 1.0, rel_tol=1e-12)
    # the quaternion means the same rotation to an independent implementation
    np.testing.assert_allclose(Rotation.from_quat([q.x, q.y, q.z, q.w]).as_matrix(), R.numpy(), atol=1e-9)
    torch.testing.assert_close(T_from_transform(msg.transform), T, atol=1e-9, rtol=0)
    pose = pose_with_covariance_from_T(T, None, frame_id="carm_base", stamp=ns_to_stamp(5))
    torch.testing.assert_close(T_from_pose(pose.pose.pose), T, atol=1e-9, rtol=0)
    assert pose.pose.covariance[0] == -1.0  # unknown covariance


def test_quaternion_known_values():
    assert quaternion_from_matrix(torch.eye(3, dtype=torch.float64)) == (0.0, 0.0, 0.0, 1.0)
    x, y, z, w = quaternion_from_matrix(torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)))
    assert (x, y, z, w) == pytest.approx((1.0, 0.0, 0.0, 0.0))
    R = matrix_from_quaternion(0.0, 0.0, math.sin(0.25), math.cos(0.25))  # 0.5 rad about z
    torch.testing.assert_close(R, so3_exp(torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64)))
    with pytest.raises(ValueError, match="quaternion"):
        matrix_from_quaternion(0.0, 0.0, 0.0, 0.0)


def test_covariance_units_round_trip():
    A = torch.randn(6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    C = A @ A.T  # (mm, rad)
    ros = covariance_to_ros(C)
    R = np.asarray(ros).reshape(6, 6)
    assert R[0, 0] == pytest.approx(float(C[0, 0]) * 1e-6)  # mm^2 -> m^2
    assert R[0, 3] == pytest.approx(float(C[0, 3]) * 1e-3)  # mm rad -> m rad
    assert R[4, 5] == pytest.approx(float(C[4, 5]))  # rad^2
    torch.testing.assert_close(covariance_from_ros(ros), C)
    pose = pose_with_covariance_from_T(torch.eye(4, dtype=torch.float64), C, frame_id="f", stamp=ns_to_stamp(0))
    assert list(pose.pose.covariance) == pytest.approx(ros)


def test_stamp_round_trip():
    for ns in (0, 1, 999_999_999, 1_000_000_000, 1_795_631_211_027_963_276):
        assert stamp_to_ns(ns_to_stamp(ns)) == ns
    with pytest.raises(ValueError):
        ns_to_stamp(-1)
