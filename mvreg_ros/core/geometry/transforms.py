"""Every geometric convention of mvreg_ros, in one place.

Frames (all right-handed, millimetres inside the engine):
- ``ct``: the CT's physical LPS frame (what ITK/DICOM call physical space), mm.
- ``cam``: an X-ray camera in the ROS optical convention: origin at the X-ray source,
  z from the source toward the detector, x along increasing image columns, y along
  increasing rows. Intrinsics ``K`` are in pixels, OpenCV convention: integer pixel
  coordinates are pixel centres.
- ``ref``: the reference frame in which the camera poses are known (the C-arm base in the
  ROS node, the first view's camera in evaluation).
- ``dfcam``: the DeepFluoro file's camera frame (origin at the source, z toward the source,
  negative focal length). ``T_cam_from_dfcam = diag(-1, 1, -1)``, and the stored DeepFluoro
  image is mirrored left-right relative to the ``cam`` image (column u -> W - 1 - u).

Transforms are named ``T_<to>_from_<from>``: ``p_ref = T_ref_from_ct @ p_ct``.
Poses are float 4x4 homogeneous matrices, batched as ``(..., 4, 4)``.
"""

from __future__ import annotations

import math
import typing

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

_SMALL = 1e-6


@typing.no_type_check  # traced by torch.compile (the jaxtyping/beartype wrapper of the tests breaks tracing)
def check_hom(T: Tensor, name: str) -> None:
    if not isinstance(T, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(T).__name__}")
    if T.shape[-2:] != (4, 4):
        raise ValueError(f"{name} must have shape (..., 4, 4), got {tuple(T.shape)}")


def skew(w: Float[Tensor, "... 3"]) -> Float[Tensor, "... 3 3"]:
    """Cross-product matrix: ``skew(w) @ x == cross(w, x)``."""
    z = torch.zeros_like(w[..., 0])
    return torch.stack(
        [
            torch.stack([z, -w[..., 2], w[..., 1]], -1),
            torch.stack([w[..., 2], z, -w[..., 0]], -1),
            torch.stack([-w[..., 1], w[..., 0], z], -1),
        ],
        -2,
    )


def so3_exp(w: Float[Tensor, "... 3"]) -> Float[Tensor, "... 3 3"]:
    """Rotation matrix from a rotation vector (axis * angle, radians); exact near zero."""
    theta2 = (w * w).sum(-1, keepdim=True)[..., None]
    small = theta2 < _SMALL**2
    theta2_safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = theta2_safe.sqrt()
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2_safe)
    W = skew(w)
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand_as(W)
    return eye + a * W + b * (W @ W)


def axial(M: Float[Tensor, "... 3 3"]) -> Float[Tensor, "... 3"]:
    """``(M32 - M23, M13 - M31, M21 - M12)``: twice the vector of the skew part of ``M``
    (``axial(skew(w)) == 2 w``), and ``<M, skew(a)> == a . axial(M)``."""
    return torch.stack([M[..., 2, 1] - M[..., 1, 2], M[..., 0, 2] - M[..., 2, 0], M[..., 1, 0] - M[..., 0, 1]], -1)


def so3_log(R: Float[Tensor, "... 3 3"]) -> Float[Tensor, "... 3"]:
    """Rotation vector of a rotation matrix; stable at 0 and at 180 degrees, differentiable at 0."""
    tr = R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2]
    cos = (tr - 1) / 2
    vee = axial(R)
    # |vee| = 2 sin(theta): atan2 is accurate over the whole range (arccos is not near 0 and pi)
    theta = torch.atan2(vee.norm(dim=-1) / 2, cos)
    sin = torch.sin(theta)
    small = theta < 1e-4
    factor = torch.where(small, 0.5 + theta**2 / 12, theta / (2 * sin.clamp_min(1e-12)))
    w = factor[..., None] * vee
    # near pi: the axis from the symmetric part, (R + R^T) / 2 - cos I = (1 - cos) a a^T
    near_pi = theta > math.pi - 1e-3
    if bool(near_pi.any()):
        eye = torch.eye(3, dtype=R.dtype, device=R.device)
        B = (R + R.transpose(-1, -2)) / 2 - cos[..., None, None] * eye
        diag = torch.diagonal(B, dim1=-2, dim2=-1).clamp_min(0)
        k = diag.argmax(-1)
        col = torch.gather(B, -1, k[..., None, None].expand(*B.shape[:-1], 1))[..., 0]
        axis = col / col.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        # fix the sign with the (small) antisymmetric part, when it is informative
        sign = torch.sign((axis * vee).sum(-1, keepdim=True))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        w_pi = axis * sign * theta[..., None]
        w = torch.where(near_pi[..., None], w_pi, w)
    return w


def axis_rotation(axis: int, angle: Float[Tensor, "..."]) -> Float[Tensor, "... 3 3"]:
    """Rotation by ``angle`` (radians) about coordinate axis 0 (x), 1 (y) or 2 (z)."""
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
    angle = torch.as_tensor(angle)
    w = torch.zeros(*angle.shape, 3, dtype=angle.dtype, device=angle.device)
    w[..., axis] = angle
    return so3_exp(w)


def quaternion_from_matrix(R: Float[Tensor, "3 3"]) -> tuple[float, float, float, float]:
    """(x, y, z, w) of a rotation matrix (Shepperd's method: stable at 180 degrees), w >= 0."""
    m = torch.as_tensor(R, dtype=torch.float64).numpy()
    if m.shape != (3, 3):
        raise ValueError(f"R must be 3x3, got {m.shape}")
    tr = m[0, 0] + m[1, 1] + m[2, 2]
    candidates = [tr, m[0, 0], m[1, 1], m[2, 2]]
    k = int(np.argmax(candidates))
    if k == 0:
        s = 2.0 * math.sqrt(max(1.0 + tr, 0.0))
        q = (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, s / 4
    elif k == 1:
        s = 2.0 * math.sqrt(max(1.0 + m[0, 0] - m[1, 1] - m[2, 2], 0.0))
        q = s / 4, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s
    elif k == 2:
        s = 2.0 * math.sqrt(max(1.0 + m[1, 1] - m[0, 0] - m[2, 2], 0.0))
        q = (m[0, 1] + m[1, 0]) / s, s / 4, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s
    else:
        s = 2.0 * math.sqrt(max(1.0 + m[2, 2] - m[0, 0] - m[1, 1], 0.0))
        q = (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, s / 4, (m[1, 0] - m[0, 1]) / s
    n = math.sqrt(sum(v * v for v in q))
    q = tuple(v / n for v in q)
    if q[3] < 0:
        q = tuple(-v for v in q)
    return q  # type: ignore[return-value]


def matrix_from_quaternion(x: float, y: float, z: float, w: float) -> Float[Tensor, "3 3"]:
    """Rotation matrix of a (normalised here) quaternion; ValueError for a zero or non-finite one."""
    q = np.array([x, y, z, w], dtype=np.float64)
    n = float(np.linalg.norm(q))
    if not math.isfinite(n) or n < 1e-9:
        raise ValueError(f"invalid quaternion {tuple(q)}")
    x, y, z, w = q / n
    return torch.tensor(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ],
        dtype=torch.float64,
    )


@typing.no_type_check  # traced by torch.compile (the jaxtyping/beartype wrapper of the tests breaks tracing)
def make_T(R: Float[Tensor, "... 3 3"], t: Float[Tensor, "... 3"]) -> Float[Tensor, "... 4 4"]:
    """Homogeneous transform from a rotation and a translation."""
    T = torch.zeros(*R.shape[:-2], 4, 4, dtype=R.dtype, device=R.device)
    T[..., :3, :3] = R
    T[..., :3, 3] = t
    T[..., 3, 3] = 1
    return T


@typing.no_type_check  # traced by torch.compile (the jaxtyping/beartype wrapper of the tests breaks tracing)
def invert(T: Float[Tensor, "... 4 4"]) -> Float[Tensor, "... 4 4"]:
    """Inverse of a rigid transform (uses R^T, not a general matrix inverse)."""
    check_hom(T, "T")
    Rt = T[..., :3, :3].transpose(-1, -2)
    return make_T(Rt, -(Rt @ T[..., :3, 3:4])[..., 0])


def translation(t: Float[Tensor, "... 3"]) -> Float[Tensor, "... 4 4"]:
    eye = torch.eye(3, dtype=t.dtype, device=t.device).expand(*t.shape[:-1], 3, 3)
    return make_T(eye, t)


def transform_points(T: Float[Tensor, "... 4 4"], p: Float[Tensor, "... N 3"]) -> Float[Tensor, "... N 3"]:
    """Apply ``T`` to points (row vectors)."""
    return p @ T[..., :3, :3].transpose(-1, -2) + T[..., None, :3, 3]


def se3_exp(xi: Float[Tensor, "... 6"]) -> Float[Tensor, "... 4 4"]:
    """Exponential of a twist ``(w, v)`` (rotation first, radians and mm)."""
    w, v = xi[..., :3], xi[..., 3:]
    R = so3_exp(w)
    theta2 = (w * w).sum(-1, keepdim=True)[..., None]
    small = theta2 < _SMALL**2
    theta2_safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = theta2_safe.sqrt()
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2_safe)
    c = torch.where(small, 1.0 / 6 - theta2 / 120, (theta - torch.sin(theta)) / (theta2_safe * theta))
    W = skew(w)
    eye = torch.eye(3, dtype=xi.dtype, device=xi.device).expand_as(W)
    V = eye + b * W + c * (W @ W)
    return make_T(R, (V @ v[..., None])[..., 0])


def se3_log(T: Float[Tensor, "... 4 4"]) -> Float[Tensor, "... 6"]:
    """Inverse of :func:`se3_exp`."""
    check_hom(T, "T")
    w = so3_log(T[..., :3, :3])
    theta2 = (w * w).sum(-1, keepdim=True)[..., None]
    small = theta2 < _SMALL**2
    theta2_safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = theta2_safe.sqrt()
    half = theta / 2
    # V^-1 = I - W/2 + (1 - half*cot(half)) / theta^2 W^2
    cot_term = torch.where(
        small, 1.0 / 12 + theta2 / 720, (1 - half * torch.cos(half) / torch.sin(half).clamp_min(1e-12)) / theta2_safe
    )
    W = skew(w)
    eye = torch.eye(3, dtype=T.dtype, device=T.device).expand_as(W)
    Vinv = eye - 0.5 * W + cot_term * (W @ W)
    v = (Vinv @ T[..., :3, 3:4])[..., 0]
    return torch.cat([w, v], -1)


def rotation_angle_deg(R: Float[Tensor, "... 3 3"]) -> Float[Tensor, "..."]:
    """Geodesic angle of a rotation, degrees."""
    return torch.rad2deg(so3_log(R).norm(dim=-1))


def about_point(T_local: Float[Tensor, "... 4 4"], c: Float[Tensor, "... 3"]) -> Float[Tensor, "... 4 4"]:
    """``T_local`` acting about point ``c`` instead of the origin: ``Tc @ T_local @ Tc^-1``."""
    return translation(c) @ T_local @ translation(-c)


# ---------------------------------------------------------------------------------------
# Cameras
# ---------------------------------------------------------------------------------------


def intrinsics(
    *,
    sdd_mm: float,
    pixel_spacing_mm: float | tuple[float, float],
    height: int,
    width: int,
    principal_point_px: tuple[float, float] | None = None,
    dtype=torch.float64,
    device="cpu",
) -> Float[Tensor, "3 3"]:
    """Pinhole K (pixels, OpenCV) of an X-ray detector at ``sdd_mm`` from the source.

    Without a principal point, the principal ray hits the detector centre, pixel
    ``((W - 1) / 2, (H - 1) / 2)``.
    """
    if sdd_mm <= 0:
        raise ValueError(f"sdd_mm must be positive, got {sdd_mm}")
    sx, sy = (pixel_spacing_mm, pixel_spacing_mm) if isinstance(pixel_spacing_mm, (int, float)) else pixel_spacing_mm
    if sx <= 0 or sy <= 0:
        raise ValueError(f"pixel_spacing_mm must be positive, got {pixel_spacing_mm}")
    cx, cy = principal_point_px if principal_point_px is not None else ((width - 1) / 2, (height - 1) / 2)
    return torch.tensor([[sdd_mm / sx, 0, cx], [0, sdd_mm / sy, cy], [0, 0, 1]], dtype=dtype, device=device)


def scale_intrinsics(K: Float[Tensor, "... 3 3"], factor: float) -> Float[Tensor, "... 3 3"]:
    """K of an image resampled by ``factor`` (0.5 = half the pixels per side), pixel centres kept.

    A pixel centre u at the old resolution lands at ``(u + 0.5) * factor - 0.5``.
    """
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    S = torch.tensor(
        [[factor, 0, 0.5 * factor - 0.5], [0, factor, 0.5 * factor - 0.5], [0, 0, 1]], dtype=K.dtype, device=K.device
    )
    return S @ K


def project(
    K: Float[Tensor, "... 3 3"], T_cam_from_x: Float[Tensor, "... 4 4"], p_x: Float[Tensor, "... N 3"]
) -> Float[Tensor, "... N 2"]:
    """Pixel coordinates (u = column, v = row) of points given in frame x."""
    p_cam = transform_points(T_cam_from_x, p_x)
    uvw = p_cam @ K.transpose(-1, -2)
    return uvw[..., :2] / uvw[..., 2:3]


# ---------------------------------------------------------------------------------------
# DeepFluoro convention
# ---------------------------------------------------------------------------------------


def T_cam_from_dfcam(dtype=torch.float64, device="cpu") -> Float[Tensor, "4 4"]:
    """ROS optical camera from the DeepFluoro camera frame (its own inverse)."""
    return torch.diag(torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=dtype, device=device))


@typing.no_type_check  # validates its own inputs (tests check its errors); no jaxtyping/beartype wrapper
def K_from_deepfluoro(K_df: Float[Tensor, "3 3"], width: int) -> Float[Tensor, "3 3"]:
    """Positive-focal K of the left-right flipped image from DeepFluoro's negative-focal K."""
    K_df = torch.as_tensor(K_df)
    if K_df.shape != (3, 3):
        raise ValueError(f"K_df must be 3x3, got {tuple(K_df.shape)}")
    K = K_df.clone()
    K[0, 0] = -K_df[0, 0]
    K[1, 1] = -K_df[1, 1]
    K[0, 1] = K_df[0, 1]
    K[0, 2] = (width - 1) - K_df[0, 2]
    return K


def K_to_deepfluoro(K: Float[Tensor, "3 3"], width: int) -> Float[Tensor, "3 3"]:
    """Inverse of :func:`K_from_deepfluoro`."""
    return K_from_deepfluoro(K, width)


def T_cam_from_ct_deepfluoro(
    extrinsic: Float[Tensor, "4 4"], cam_to_pelvis_vol: Float[Tensor, "4 4"]
) -> Float[Tensor, "4 4"]:
    """ROS camera from CT, given DeepFluoro's ``proj-params/extrinsic`` (E) and a
    ``gt-poses/cam-to-pelvis-vol`` (G): the file projects with ``K_df @ (E @ inv(G) @ p)``."""
    E = torch.as_tensor(extrinsic)
    G = torch.as_tensor(cam_to_pelvis_vol)
    check_hom(E, "extrinsic")
    check_hom(G, "cam_to_pelvis_vol")
    return T_cam_from_dfcam(E.dtype, E.device) @ E @ torch.linalg.inv(G)


def cam_to_pelvis_vol_from_T(
    extrinsic: Float[Tensor, "4 4"], T_cam_from_ct: Float[Tensor, "4 4"]
) -> Float[Tensor, "4 4"]:
    """Inverse of :func:`T_cam_from_ct_deepfluoro`: the G that yields ``T_cam_from_ct``."""
    E = torch.as_tensor(extrinsic)
    T_dfcam_from_ct = T_cam_from_dfcam(E.dtype, E.device) @ T_cam_from_ct
    return invert(T_dfcam_from_ct) @ E


def flip_columns(image: Tensor) -> Tensor:
    """Mirror an image (..., H, W) left-right: between DeepFluoro storage and the ROS camera."""
    return image.flip(-1)


# ---------------------------------------------------------------------------------------
# Perturbations
# ---------------------------------------------------------------------------------------


def random_unit_vectors(n: int, generator: torch.Generator, dtype=torch.float64) -> Float[Tensor, "n 3"]:
    v = torch.randn(n, 3, generator=generator, dtype=dtype)
    return v / v.norm(dim=-1, keepdim=True)


def perturb(
    T_ref_from_ct: Float[Tensor, "4 4"],
    *,
    rot_deg: float,
    trans_mm: float,
    centre_ct: Float[Tensor, "3"],
    generator: torch.Generator,
) -> Float[Tensor, "4 4"]:
    """Rotate by exactly ``rot_deg`` about a random axis through ``centre_ct`` (the CT point),
    then translate by exactly ``trans_mm`` in a random direction (in the reference frame)."""
    dtype = T_ref_from_ct.dtype
    axis = random_unit_vectors(1, generator, dtype)[0].to(T_ref_from_ct.device)
    direction = random_unit_vectors(1, generator, dtype)[0].to(T_ref_from_ct.device)
    R = so3_exp(axis * math.radians(rot_deg))
    c_ref = transform_points(T_ref_from_ct, centre_ct.to(T_ref_from_ct)[None])[0]
    T_rot = about_point(make_T(R, torch.zeros(3, dtype=dtype, device=R.device)), c_ref)
    return translation(direction * trans_mm) @ T_rot @ T_ref_from_ct
