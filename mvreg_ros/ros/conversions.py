"""Pure conversions between ROS messages and engine tensors (no node, no DDS).

Units change here and only here: the engine works in mm, ROS messages carry metres.
Poses are ``T_ref_from_ct``-style 4x4 float64 tensors; quaternions are (x, y, z, w) as in
geometry_msgs, normalised with w >= 0.
"""

from __future__ import annotations

import numpy as np
import torch
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Pose, PoseWithCovarianceStamped, Transform, TransformStamped
from jaxtyping import Float
from sensor_msgs.msg import CameraInfo, Image
from torch import Tensor

from mvreg_ros.core.geometry.kinematics import check_rigid
from mvreg_ros.core.geometry.transforms import make_T, matrix_from_quaternion, quaternion_from_matrix

MM_PER_M = 1000.0

# encoding -> (numpy dtype without byte order, bytes per pixel); aliases of the same layout included
ENCODINGS = {
    "mono8": ("u1", 1),
    "8UC1": ("u1", 1),
    "mono16": ("u2", 2),
    "16UC1": ("u2", 2),
    "32FC1": ("f4", 4),
}


# ----------------------------------------------------------------------------------- time


def stamp_to_ns(stamp: Time) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


MAX_STAMP_NS = (2**31 - 1) * 1_000_000_000 + 999_999_999  # builtin_interfaces/Time.sec is an int32


def ns_to_stamp(ns: int) -> Time:
    if isinstance(ns, bool) or not isinstance(ns, (int, np.integer)):
        raise TypeError(f"a ROS stamp must be an integer number of ns, got {type(ns).__name__} {ns!r}")
    if ns < 0:
        raise ValueError(f"a ROS stamp cannot be negative, got {ns} ns")
    if ns > MAX_STAMP_NS:
        raise ValueError(f"a ROS stamp must fit int32 seconds (at most {MAX_STAMP_NS} ns), got {ns} ns")
    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


# ---------------------------------------------------------------------------------- images


def image_to_tensor(msg: Image) -> Float[Tensor, "H W"]:
    """A single-channel raw detector image (mono8, mono16 / 16UC1, 32FC1) as float32 (H, W).

    Honours ``step`` (row padding) and ``is_bigendian``. Raises ValueError naming the problem
    for an unsupported encoding or inconsistent sizes."""
    if msg.encoding not in ENCODINGS:
        raise ValueError(f"unsupported image encoding {msg.encoding!r}: expected one of {sorted(ENCODINGS)}")
    kind, bpp = ENCODINGS[msg.encoding]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise ValueError(f"image has no pixels: {h}x{w}")
    if step < w * bpp:
        raise ValueError(f"image step {step} is shorter than a row ({w} px x {bpp} bytes)")
    try:
        data = np.frombuffer(msg.data, dtype=np.uint8)  # array.array('B') from rclpy, bytes, memoryview
    except TypeError:
        data = np.asarray(msg.data, dtype=np.uint8)
    if data.size < step * h:
        raise ValueError(f"image data holds {data.size} bytes, {h} rows of step {step} need {step * h}")
    rows = data[: step * h].reshape(h, step)[:, : w * bpp]
    dtype = np.dtype(kind).newbyteorder(">" if msg.is_bigendian else "<")
    pixels = np.ascontiguousarray(rows).view(dtype).reshape(h, w)
    return torch.from_numpy(pixels.astype(np.float32))


def tensor_to_image(
    image: Tensor | np.ndarray,
    *,
    encoding: str,
    stamp: Time | None = None,
    frame_id: str = "",
    row_padding: int = 0,
    bigendian: bool = False,
) -> Image:
    """The inverse of :func:`image_to_tensor` (for publishers and tests); values are rounded
    and clipped for the integer encodings, ``row_padding`` extra bytes end every row."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unsupported image encoding {encoding!r}: expected one of {sorted(ENCODINGS)}")
    arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"image must be 2D (H, W), got shape {arr.shape}")
    if row_padding < 0:
        raise ValueError(f"row_padding must be >= 0, got {row_padding}")
    kind, bpp = ENCODINGS[encoding]
    dtype = np.dtype(kind).newbyteorder(">" if bigendian else "<")
    if dtype.kind == "u":
        info = np.iinfo(dtype)
        arr = np.clip(np.rint(arr), info.min, info.max)
    h, w = arr.shape
    rows = np.zeros((h, w * bpp + row_padding), dtype=np.uint8)
    rows[:, : w * bpp] = arr.astype(dtype).view(np.uint8).reshape(h, w * bpp)
    msg = Image(height=h, width=w, encoding=encoding, is_bigendian=int(bigendian), step=w * bpp + row_padding)
    msg.data = rows.tobytes()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    return msg


def rgb_to_image(rgb: np.ndarray, *, stamp: Time | None = None, frame_id: str = "") -> Image:
    """An (H, W, 3) uint8 array as an rgb8 Image (overlays)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb image must be (H, W, 3), got {rgb.shape}")
    h, w, _ = rgb.shape
    msg = Image(height=h, width=w, encoding="rgb8", is_bigendian=0, step=3 * w)
    msg.data = rgb.tobytes()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    return msg


# ------------------------------------------------------------------------------ intrinsics


def camera_info_to_K(info: CameraInfo, *, height: int, width: int) -> Float[Tensor, "3 3"]:
    """Intrinsics (pixels, OpenCV: integer coordinates are pixel centres) of the X-ray camera
    whose image is ``height x width``. The camera is the ROS optical frame at the X-ray source,
    z toward the detector, so the focal lengths are positive (sdd / pixel spacing)."""
    if int(info.width) == 0 and int(info.height) == 0:
        raise ValueError("CameraInfo is uncalibrated (width and height are 0)")
    if (int(info.height), int(info.width)) != (int(height), int(width)):
        raise ValueError(f"image size {height}x{width} does not match CameraInfo {info.height}x{info.width}")
    if int(info.binning_x) > 1 or int(info.binning_y) > 1:
        raise ValueError(
            f"CameraInfo binning {info.binning_x}x{info.binning_y} is not supported: publish the K of the binned image"
        )
    roi = info.roi
    if int(roi.width) or int(roi.height) or int(roi.x_offset) or int(roi.y_offset):
        raise ValueError("CameraInfo region of interest is not supported: publish the K of the cropped image")
    K = torch.tensor(np.asarray(info.k, dtype=np.float64).reshape(3, 3))
    if not torch.isfinite(K).all():
        raise ValueError("CameraInfo K has non-finite entries")
    fx, fy = float(K[0, 0]), float(K[1, 1])
    if fx <= 0 or fy <= 0:
        raise ValueError(f"CameraInfo K needs positive focal lengths (z toward the detector), got fx={fx}, fy={fy}")
    if float(K[1, 0]) != 0 or float(K[2, 0]) != 0 or float(K[2, 1]) != 0 or float(K[2, 2]) != 1:
        raise ValueError(f"CameraInfo K is not an upper-triangular pinhole matrix: {K.tolist()}")
    return K


def K_to_camera_info(
    K: Tensor, *, height: int, width: int, stamp: Time | None = None, frame_id: str = ""
) -> CameraInfo:
    """CameraInfo of an ideal (undistorted) X-ray camera; P = [K | 0], R = I."""
    K = torch.as_tensor(K, dtype=torch.float64)
    if K.shape != (3, 3):
        raise ValueError(f"K must be 3x3, got {tuple(K.shape)}")
    info = CameraInfo(height=int(height), width=int(width), distortion_model="plumb_bob")
    info.d = [0.0] * 5
    info.k = [float(v) for v in K.reshape(-1)]
    info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    P = torch.zeros(3, 4, dtype=torch.float64)
    P[:, :3] = K
    info.p = [float(v) for v in P.reshape(-1)]
    if stamp is not None:
        info.header.stamp = stamp
    info.header.frame_id = frame_id
    return info


# -------------------------------------------------------------------------------- poses


def _check_T(T: Tensor) -> Tensor:
    """A 4x4 rigid transform (orthonormal rotation, last row 0 0 0 1) as float64."""
    return check_rigid(torch.as_tensor(T, dtype=torch.float64), "T", tol=1e-5)


def transform_from_T(T_mm: Float[Tensor, "4 4"]) -> Transform:
    """geometry_msgs/Transform (metres, quaternion) of a 4x4 transform in mm."""
    T = _check_T(T_mm)
    msg = Transform()
    t = (T[:3, 3] / MM_PER_M).tolist()
    msg.translation.x, msg.translation.y, msg.translation.z = t
    q = quaternion_from_matrix(T[:3, :3])
    msg.rotation.x, msg.rotation.y, msg.rotation.z, msg.rotation.w = q
    return msg


def T_from_transform(msg: Transform) -> Float[Tensor, "4 4"]:
    """4x4 transform in mm from a geometry_msgs/Transform in metres."""
    R = matrix_from_quaternion(msg.rotation.x, msg.rotation.y, msg.rotation.z, msg.rotation.w)
    t = torch.tensor([msg.translation.x, msg.translation.y, msg.translation.z], dtype=torch.float64) * MM_PER_M
    return make_T(R, t)


def transform_stamped_from_T(
    T_parent_from_child_mm: Float[Tensor, "4 4"], *, parent_frame: str, child_frame: str, stamp: Time
) -> TransformStamped:
    """The TF ``parent_frame -> child_frame``: the child's pose in the parent, ``p_parent = T @ p_child``."""
    msg = TransformStamped()
    msg.header.stamp = stamp
    msg.header.frame_id = parent_frame
    msg.child_frame_id = child_frame
    msg.transform = transform_from_T(T_parent_from_child_mm)
    return msg


def pose_from_T(T_mm: Float[Tensor, "4 4"]) -> Pose:
    """geometry_msgs/Pose (metres) of a 4x4 transform in mm (the child frame's origin and axes)."""
    tf = transform_from_T(T_mm)
    msg = Pose()
    msg.position.x, msg.position.y, msg.position.z = tf.translation.x, tf.translation.y, tf.translation.z
    msg.orientation = tf.rotation
    return msg


def T_from_pose(msg: Pose) -> Float[Tensor, "4 4"]:
    R = matrix_from_quaternion(msg.orientation.x, msg.orientation.y, msg.orientation.z, msg.orientation.w)
    t = torch.tensor([msg.position.x, msg.position.y, msg.position.z], dtype=torch.float64) * MM_PER_M
    return make_T(R, t)


def covariance_to_ros(cov_mm_rad: Float[Tensor, "6 6"]) -> list[float]:
    """Row-major 36 floats in (m, rad) from a 6x6 covariance over (x, y, z mm, rx, ry, rz rad)."""
    C = torch.as_tensor(cov_mm_rad, dtype=torch.float64)
    if C.shape != (6, 6):
        raise ValueError(f"covariance must be 6x6, got {tuple(C.shape)}")
    s = torch.tensor([1 / MM_PER_M] * 3 + [1.0] * 3, dtype=torch.float64)
    return [float(v) for v in (C * s[:, None] * s[None, :]).reshape(-1)]


def covariance_from_ros(values) -> Float[Tensor, "6 6"]:
    """Inverse of :func:`covariance_to_ros` (mm, rad)."""
    C = torch.as_tensor(np.asarray(values, dtype=np.float64).reshape(6, 6))
    s = torch.tensor([MM_PER_M] * 3 + [1.0] * 3, dtype=torch.float64)
    return C * s[:, None] * s[None, :]


def pose_with_covariance_from_T(
    T_mm: Float[Tensor, "4 4"], cov_mm_rad: Tensor | None, *, frame_id: str, stamp: Time
) -> PoseWithCovarianceStamped:
    """PoseWithCovarianceStamped (metres); an unknown covariance is published as -1 on the
    diagonal's first entry, the REP convention for 'unknown'."""
    msg = PoseWithCovarianceStamped()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.pose.pose = pose_from_T(T_mm)
    if cov_mm_rad is None:
        cov = [0.0] * 36
        cov[0] = -1.0
        msg.pose.covariance = cov
    else:
        msg.pose.covariance = covariance_to_ros(cov_mm_rad)
    return msg
