"""Conventions of mvreg_ros.core.geometry.transforms: Lie groups, cameras, DeepFluoro, perturbations."""

import math

import numpy as np
import pytest
import torch

from mvreg_ros.core.geometry.transforms import (
    K_from_deepfluoro,
    K_to_deepfluoro,
    T_cam_from_ct_deepfluoro,
    T_cam_from_dfcam,
    about_point,
    axial,
    cam_to_pelvis_vol_from_T,
    flip_columns,
    intrinsics,
    invert,
    make_T,
    perturb,
    project,
    rotation_angle_deg,
    scale_intrinsics,
    se3_exp,
    se3_log,
    skew,
    so3_exp,
    so3_log,
    transform_points,
    translation,
)

F64 = torch.float64


def _random_T(g: torch.Generator, n: int | None = None, trans_scale: float = 100.0) -> torch.Tensor:
    shape = () if n is None else (n,)
    w = torch.randn(*shape, 3, generator=g, dtype=F64)
    w = w / w.norm(dim=-1, keepdim=True) * (torch.rand(*shape, 1, generator=g, dtype=F64) * 3.0)
    t = torch.randn(*shape, 3, generator=g, dtype=F64) * trans_scale
    return make_T(so3_exp(w), t)


def _rodrigues(w: np.ndarray) -> np.ndarray:
    """Independent (numpy, scalar) Rodrigues formula."""
    theta = float(np.linalg.norm(w))
    if theta == 0:
        return np.eye(3)
    a = w / theta
    A = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(theta) * A + (1 - math.cos(theta)) * A @ A


# ---------------------------------------------------------------------------------------
# SO(3) / SE(3)
# ---------------------------------------------------------------------------------------


def test_skew_is_cross_product():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(2, 5, 3, generator=g, dtype=F64)
    torch.testing.assert_close((skew(w) @ x[..., None])[..., 0], torch.linalg.cross(w, x))


def test_so3_exp_matches_rodrigues_and_is_a_rotation():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(20, 3, generator=g, dtype=F64) * 1.5
    R = so3_exp(w)
    for wi, Ri in zip(w, R):
        np.testing.assert_allclose(Ri.numpy(), _rodrigues(wi.numpy()), atol=1e-13)
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3, dtype=F64).expand(20, 3, 3))
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(20, dtype=F64))


def test_so3_exp_log_round_trip_generic_and_batched():
    g = torch.Generator().manual_seed(2)
    axis = torch.randn(4, 5, 3, generator=g, dtype=F64)
    axis = axis / axis.norm(dim=-1, keepdim=True)
    angle = torch.rand(4, 5, 1, generator=g, dtype=F64) * (math.pi - 0.01)
    w = axis * angle
    torch.testing.assert_close(so3_log(so3_exp(w)), w, atol=1e-10, rtol=0)


@pytest.mark.parametrize("scale", [0.0, 1e-12, 1e-9, 1e-7, 1e-6, 1e-5, 1e-3])
def test_so3_round_trip_small_angles(scale):
    w = torch.tensor([0.3, -0.5, 0.8], dtype=F64) * scale
    R = so3_exp(w)
    # first-order check independent of the implementation's branches
    torch.testing.assert_close(R, torch.eye(3, dtype=F64) + skew(w), atol=max(scale**2, 1e-15), rtol=0)
    torch.testing.assert_close(so3_log(R), w, atol=1e-14 + 1e-9 * scale, rtol=0)


AXES_180 = [
    [1.0, 0.0, 0.0],
    [0.0, 1.0, 0.0],
    [0.0, 0.0, 1.0],
    [0.0, 0.0, -1.0],
    [1.0, 1.0, 0.0],
    [1.0, -1.0, 0.0],
    [-1.0, 0.0, 1.0],
    [0.3, -0.5, 0.8],
    [-0.6, 0.2, -0.77],
    [1.0, -2.0, -3.0],
]


@pytest.mark.parametrize("axis", AXES_180)
def test_so3_log_exactly_180_degrees(axis):
    a = torch.tensor(axis, dtype=F64)
    a = a / a.norm()
    R = so3_exp(a * math.pi)
    w = so3_log(R)
    assert math.isclose(float(w.norm()), math.pi, abs_tol=1e-7)
    # at exactly 180 degrees w and -w are the same rotation: either is right
    assert min(float((w - a * math.pi).norm()), float((w + a * math.pi).norm())) < 1e-7
    # arccos near -1 is ill-conditioned: theta is good to ~sqrt(machine eps)
    torch.testing.assert_close(so3_exp(w), R, atol=1e-7, rtol=0)


@pytest.mark.parametrize("delta", [2e-3, 1e-3 + 1e-9])
@pytest.mark.parametrize("axis", AXES_180[4:])
def test_so3_log_near_180_degrees_outside_the_special_branch(axis, delta):
    a = torch.tensor(axis, dtype=F64)
    w = a / a.norm() * (math.pi - delta)
    # arccos loses ~1e-12 / delta here (sin(theta) of an inexact theta)
    torch.testing.assert_close(so3_log(so3_exp(w)), w, atol=1e-8, rtol=0)


def test_so3_log_near_180_degrees():
    for axis in AXES_180[4:]:
        for delta in (1e-6, 1e-4, 5e-4, 9e-4):
            a = torch.tensor(axis, dtype=F64)
            w = a / a.norm() * (math.pi - delta)
            R = so3_exp(w)
            torch.testing.assert_close(so3_log(R), w, atol=1e-8, rtol=0)
            torch.testing.assert_close(so3_exp(so3_log(R)), R, atol=1e-8, rtol=0)


def test_so3_exp_gradcheck_generic_and_at_zero():
    for w0 in ([0.3, -0.2, 0.5], [1e-8, -2e-8, 0.5e-8], [0.0, 0.0, 0.0]):
        w = torch.tensor(w0, dtype=F64, requires_grad=True)
        assert torch.autograd.gradcheck(so3_exp, (w,), eps=1e-6, atol=1e-6)
    # at zero the Jacobian is exactly d(I + [w]x)/dw, and finite
    w = torch.zeros(3, dtype=F64, requires_grad=True)
    J = torch.autograd.functional.jacobian(so3_exp, w)
    assert torch.isfinite(J).all()
    for k in range(3):
        e = torch.zeros(3, dtype=F64)
        e[k] = 1
        torch.testing.assert_close(J[..., k], skew(e))


def test_se3_exp_gradients_finite_at_zero():
    xi = torch.zeros(6, dtype=F64, requires_grad=True)
    J = torch.autograd.functional.jacobian(se3_exp, xi)
    assert torch.isfinite(J).all()
    # translation part: d t / d v = I at zero
    torch.testing.assert_close(J[:3, 3, 3:], torch.eye(3, dtype=F64))
    assert torch.autograd.gradcheck(
        se3_exp, (torch.tensor([0.2, -0.1, 0.3, 5.0, -2.0, 1.0], dtype=F64, requires_grad=True),)
    )


def test_so3_log_gradient_at_identity_is_finite():
    w = torch.zeros(3, dtype=F64, requires_grad=True)
    J = torch.autograd.functional.jacobian(lambda x: so3_log(so3_exp(x)), w)
    torch.testing.assert_close(J, torch.eye(3, dtype=F64))


def test_se3_exp_log_round_trip():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(50, 3, generator=g, dtype=F64)
    w = w / w.norm(dim=-1, keepdim=True) * torch.rand(50, 1, generator=g, dtype=F64) * 3.0
    w[0] = 0
    w[1] = torch.tensor([1e-9, -2e-9, 3e-10])
    v = torch.randn(50, 3, generator=g, dtype=F64) * 50
    xi = torch.cat([w, v], -1)
    T = se3_exp(xi)
    torch.testing.assert_close(se3_log(T), xi, atol=1e-9, rtol=0)
    torch.testing.assert_close(se3_exp(se3_log(T)), T, atol=1e-9, rtol=0)


def test_se3_exp_pure_translation_and_screw_motion():
    v = torch.tensor([3.0, -4.0, 12.0], dtype=F64)
    torch.testing.assert_close(se3_exp(torch.cat([torch.zeros(3, dtype=F64), v])), translation(v))
    # screw about z: rotation theta and translation d along the axis -> t = (0, 0, d)
    theta, d = 1.2, 7.0
    T = se3_exp(torch.tensor([0, 0, theta, 0, 0, d], dtype=F64))
    torch.testing.assert_close(T[:3, 3], torch.tensor([0, 0, d], dtype=F64))
    # the exponential is the matrix exponential of the twist's 4x4 form
    xi = torch.tensor([0.4, -0.3, 0.9, 10.0, -5.0, 2.0], dtype=F64)
    M = torch.zeros(4, 4, dtype=F64)
    M[:3, :3] = skew(xi[:3])
    M[:3, 3] = xi[3:]
    torch.testing.assert_close(se3_exp(xi), torch.linalg.matrix_exp(M))


def test_se3_log_at_180_degrees():
    xi = torch.tensor([0.0, math.pi, 0.0, 10.0, 20.0, -5.0], dtype=F64)
    T = se3_exp(xi)
    torch.testing.assert_close(se3_exp(se3_log(T)), T, atol=1e-9, rtol=0)


def test_invert_matches_linalg_inv_and_batches():
    g = torch.Generator().manual_seed(4)
    T = _random_T(g, 7)
    torch.testing.assert_close(invert(T), torch.linalg.inv(T))
    torch.testing.assert_close(invert(T) @ T, torch.eye(4, dtype=F64).expand(7, 4, 4))
    torch.testing.assert_close(invert(T.reshape(7, 1, 4, 4))[:, 0], invert(T))
    with pytest.raises(ValueError, match="4, 4"):
        invert(torch.eye(3, dtype=F64))


def test_transform_points_and_project_manual():
    g = torch.Generator().manual_seed(5)
    T = _random_T(g)
    p = torch.randn(9, 3, generator=g, dtype=F64) * 30
    manual = torch.stack([(T @ torch.cat([pi, torch.ones(1, dtype=F64)]))[:3] for pi in p])
    torch.testing.assert_close(transform_points(T, p), manual)
    # batched: (V, 4, 4) with (V, N, 3) and with broadcast (1, N, 3)
    Tb = _random_T(g, 3)
    out = transform_points(Tb, p[None])
    for v in range(3):
        torch.testing.assert_close(out[v], transform_points(Tb[v], p))

    K = torch.tensor([[1000.0, 0.5, 250.0], [0.0, 1100.0, 120.0], [0, 0, 1]], dtype=F64)
    T_cam = translation(torch.tensor([1.0, 2.0, 800.0], dtype=F64))
    uv = project(K, T_cam, p)
    x, y, z = (p + torch.tensor([1.0, 2.0, 800.0], dtype=F64)).unbind(-1)
    torch.testing.assert_close(uv[:, 0], 1000.0 * x / z + 0.5 * y / z + 250.0)
    torch.testing.assert_close(uv[:, 1], 1100.0 * y / z + 120.0)


def test_about_point_fixes_the_point():
    c = torch.tensor([10.0, -20.0, 5.0], dtype=F64)
    R = make_T(so3_exp(torch.tensor([0.3, 0.2, -0.4], dtype=F64)), torch.zeros(3, dtype=F64))
    T = about_point(R, c)
    torch.testing.assert_close(transform_points(T, c[None])[0], c)
    torch.testing.assert_close(T[:3, :3], R[:3, :3])


def test_rotation_angle_deg():
    for deg in (0.0, 1e-6, 0.5, 45.0, 179.0, 180.0):
        R = so3_exp(torch.tensor([1.0, 2.0, -2.0], dtype=F64) / 3 * math.radians(deg))
        assert math.isclose(float(rotation_angle_deg(R)), deg, abs_tol=1e-5)


# ---------------------------------------------------------------------------------------
# Intrinsics
# ---------------------------------------------------------------------------------------


def test_intrinsics_principal_point_and_focal():
    K = intrinsics(sdd_mm=1020.0, pixel_spacing_mm=(0.5, 0.25), height=100, width=200)
    torch.testing.assert_close(K, torch.tensor([[2040.0, 0, 99.5], [0, 4080.0, 49.5], [0, 0, 1]], dtype=F64))
    # the principal ray projects to the detector centre
    uv = project(K, torch.eye(4, dtype=F64), torch.tensor([[0.0, 0.0, 500.0]], dtype=F64))
    torch.testing.assert_close(uv[0], torch.tensor([99.5, 49.5], dtype=F64))
    K2 = intrinsics(sdd_mm=1000.0, pixel_spacing_mm=1.0, height=10, width=10, principal_point_px=(3.0, 4.0))
    assert K2[0, 2] == 3.0 and K2[1, 2] == 4.0
    with pytest.raises(ValueError, match="sdd_mm"):
        intrinsics(sdd_mm=0.0, pixel_spacing_mm=1.0, height=10, width=10)
    with pytest.raises(ValueError, match="pixel_spacing_mm"):
        intrinsics(sdd_mm=1.0, pixel_spacing_mm=(1.0, -1.0), height=10, width=10)


@pytest.mark.parametrize("factor", [0.5, 0.25, 2.0, 1 / 3])
def test_scale_intrinsics_pixel_centre_convention(factor):
    K = intrinsics(sdd_mm=1020.0, pixel_spacing_mm=0.8, height=96, width=120, principal_point_px=(58.3, 49.1))
    g = torch.Generator().manual_seed(6)
    p = torch.randn(20, 3, generator=g, dtype=F64) * 40 + torch.tensor([0, 0, 700.0], dtype=F64)
    T = torch.eye(4, dtype=F64)
    uv_full = project(K, T, p)
    uv_scaled = project(scale_intrinsics(K, factor), T, p)
    torch.testing.assert_close(uv_scaled, (uv_full + 0.5) * factor - 0.5)
    with pytest.raises(ValueError, match="factor"):
        scale_intrinsics(K, 0.0)


def test_scale_intrinsics_matches_average_pooling_geometry():
    """A point at the centre of full-res pixel block [f*a, f*a+f-1] lands on pooled pixel a."""
    f = 4
    K = intrinsics(sdd_mm=1000.0, pixel_spacing_mm=1.0, height=64, width=64)
    Kf = scale_intrinsics(K, 1.0 / f)
    a, b = 3, 11  # pooled column, row
    u_full, v_full = f * a + (f - 1) / 2, f * b + (f - 1) / 2  # centre of the block (full-res pixel coords)
    z = 700.0
    p = torch.tensor([[(u_full - K[0, 2]) * z / K[0, 0], (v_full - K[1, 2]) * z / K[1, 1], z]], dtype=F64)
    T = torch.eye(4, dtype=F64)
    torch.testing.assert_close(project(K, T, p)[0], torch.tensor([u_full, v_full], dtype=F64))
    torch.testing.assert_close(project(Kf, T, p)[0], torch.tensor([float(a), float(b)], dtype=F64))


# ---------------------------------------------------------------------------------------
# DeepFluoro conventions
# ---------------------------------------------------------------------------------------

K_DF = np.array([[-5257.73, 0.0, 767.5], [0.0, -5257.73, 767.5], [0.0, 0.0, 1.0]])
W_DF = 1536


def _deepfluoro_case(seed: int):
    """Random extrinsic E (world -> dfcam), pose G (cam-to-pelvis-vol) and LPS points in front of the camera."""
    g = torch.Generator().manual_seed(seed)
    E = _random_T(g, trans_scale=200.0)
    T_dfcam_from_ct = T_cam_from_dfcam() @ make_T(
        so3_exp(torch.randn(3, generator=g, dtype=F64)), torch.tensor([10.0, -20.0, 800.0], dtype=F64)
    )
    # choose G so that E @ inv(G) = T_dfcam_from_ct (points at z ~ -800 in the file's camera)
    G = invert(T_dfcam_from_ct) @ E
    p_cam = torch.randn(30, 3, generator=g, dtype=F64) * 25 + torch.tensor([0, 0, 800.0], dtype=F64)
    p = transform_points(invert(T_cam_from_dfcam() @ T_dfcam_from_ct), p_cam)  # points in CT LPS
    return E, G, p


def _file_pixels(E, G, p):
    """DeepFluoro's own formula: pixel ~ K_df @ (E @ inv(G) @ p)[:3] (numpy, independent of the engine)."""
    P = np.c_[p.numpy(), np.ones(len(p))].T
    x = (E.numpy() @ np.linalg.inv(G.numpy()) @ P)[:3]
    assert (x[2] < 0).all()  # in front of the file's camera: negative z
    uvw = K_DF @ x
    return (uvw[:2] / uvw[2]).T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deepfluoro_projection_is_the_flipped_file_projection(seed):
    E, G, p = _deepfluoro_case(seed)
    uv_file = _file_pixels(E, G, p)
    assert ((uv_file > 0) & (uv_file < W_DF)).all(), "test points must land on the detector"
    T = T_cam_from_ct_deepfluoro(E, G)
    K = K_from_deepfluoro(torch.as_tensor(K_DF), W_DF)
    assert K[0, 0] > 0 and K[1, 1] > 0
    p_cam = transform_points(T, p)
    assert (p_cam[:, 2] > 0).all()  # ROS optical: in front means positive z
    uv = project(K, T, p).numpy()
    np.testing.assert_allclose(uv[:, 0], W_DF - 1 - uv_file[:, 0], atol=1e-6)
    np.testing.assert_allclose(uv[:, 1], uv_file[:, 1], atol=1e-6)
    # T is a proper rigid transform
    torch.testing.assert_close(torch.linalg.det(T[:3, :3]), torch.tensor(1.0, dtype=F64))


def test_deepfluoro_flip_columns_matches_pixel_mapping():
    img = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)
    flipped = flip_columns(img)
    for u in range(5):
        torch.testing.assert_close(flipped[..., u], img[..., 5 - 1 - u])
    torch.testing.assert_close(flip_columns(flipped), img)


def test_cam_to_pelvis_vol_round_trip():
    E, G, _ = _deepfluoro_case(3)
    T = T_cam_from_ct_deepfluoro(E, G)
    torch.testing.assert_close(cam_to_pelvis_vol_from_T(E, T), G)
    g = torch.Generator().manual_seed(7)
    T2 = _random_T(g)
    torch.testing.assert_close(T_cam_from_ct_deepfluoro(E, cam_to_pelvis_vol_from_T(E, T2)), T2)


def test_T_cam_from_dfcam_proper_and_involutive():
    D = T_cam_from_dfcam()
    torch.testing.assert_close(torch.linalg.det(D), torch.tensor(1.0, dtype=F64))
    torch.testing.assert_close(D @ D, torch.eye(4, dtype=F64))
    torch.testing.assert_close(D[:3, :3] @ D[:3, :3].T, torch.eye(3, dtype=F64))
    # z toward the source (dfcam) becomes z toward the detector (cam)
    torch.testing.assert_close(
        transform_points(D, torch.tensor([[0.0, 0.0, -1.0]], dtype=F64)), torch.tensor([[0.0, 0.0, 1.0]], dtype=F64)
    )


def test_K_deepfluoro_round_trip():
    K_df = torch.as_tensor(K_DF)
    K = K_from_deepfluoro(K_df, W_DF)
    torch.testing.assert_close(K, torch.tensor([[5257.73, 0, 1535 - 767.5], [0, 5257.73, 767.5], [0, 0, 1]], dtype=F64))
    torch.testing.assert_close(K_to_deepfluoro(K, W_DF), K_df)
    K_odd = torch.tensor([[-5000.0, 2.0, 700.25], [0, -5100.0, 760.0], [0, 0, 1]], dtype=F64)
    torch.testing.assert_close(K_to_deepfluoro(K_from_deepfluoro(K_odd, 1500), 1500), K_odd)
    with pytest.raises(ValueError, match="3x3"):
        K_from_deepfluoro(torch.eye(4, dtype=F64), W_DF)


# ---------------------------------------------------------------------------------------
# Perturbations
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rot_deg,trans_mm", [(10.0, 20.0), (0.0, 5.0), (3.5, 0.0), (170.0, 100.0)])
def test_perturb_exact_angle_and_centre_displacement(rot_deg, trans_mm):
    g = torch.Generator().manual_seed(8)
    T = _random_T(g)
    c = torch.tensor([12.0, -40.0, 150.0], dtype=F64)
    Tp = perturb(T, rot_deg=rot_deg, trans_mm=trans_mm, centre_ct=c, generator=torch.Generator().manual_seed(9))
    rel = Tp @ invert(T)
    assert math.isclose(float(rotation_angle_deg(rel[:3, :3])), rot_deg, abs_tol=1e-6)
    moved = transform_points(Tp, c[None]) - transform_points(T, c[None])
    assert math.isclose(float(moved.norm()), trans_mm, abs_tol=1e-9)
    torch.testing.assert_close(torch.linalg.det(Tp[:3, :3]), torch.tensor(1.0, dtype=F64))


def test_perturb_reproducible_and_seed_dependent():
    g = torch.Generator().manual_seed(10)
    T = _random_T(g)
    c = torch.zeros(3, dtype=F64)
    kw = dict(rot_deg=5.0, trans_mm=10.0, centre_ct=c)
    a = perturb(T, generator=torch.Generator().manual_seed(1), **kw)
    b = perturb(T, generator=torch.Generator().manual_seed(1), **kw)
    d = perturb(T, generator=torch.Generator().manual_seed(2), **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - d).abs().max() > 1e-3


# ------------------------------------------------------------------ quaternions and axis rotations


@pytest.mark.parametrize(
    "w",
    [
        [0.0, 0.0, 0.0],
        [0.3, -0.2, 0.1],
        [math.pi, 0.0, 0.0],
        [0.0, math.pi, 0.0],
        [0.0, 0.0, math.pi],
        [math.pi / math.sqrt(2), -math.pi / math.sqrt(2), 0.0],
        [1e-9, 0.0, -1e-9],
    ],
)
def test_quaternion_round_trip_including_180_degrees(w):
    from mvreg_ros.core.geometry.transforms import matrix_from_quaternion, quaternion_from_matrix

    R = so3_exp(torch.tensor(w, dtype=torch.float64))
    q = quaternion_from_matrix(R)
    assert q[3] >= 0 and math.isclose(sum(v * v for v in q), 1.0, rel_tol=1e-12)
    torch.testing.assert_close(matrix_from_quaternion(*q), R, atol=1e-12, rtol=0)
    # the quaternion's angle is the rotation's angle
    assert math.isclose(
        2 * math.atan2(math.sqrt(sum(v * v for v in q[:3])), q[3]),
        float(torch.tensor(w, dtype=torch.float64).norm()),
        abs_tol=1e-9,
    )


def test_matrix_from_quaternion_rejects_zero():
    from mvreg_ros.core.geometry.transforms import matrix_from_quaternion

    with pytest.raises(ValueError, match="invalid quaternion"):
        matrix_from_quaternion(0.0, 0.0, 0.0, 0.0)


def test_axis_rotation_matches_right_hand_rule():
    from mvreg_ros.core.geometry.transforms import axis_rotation

    Rz = axis_rotation(2, torch.tensor(math.pi / 2, dtype=torch.float64))
    torch.testing.assert_close(
        Rz @ torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
        torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64),
        atol=1e-15,
        rtol=0,
    )
    Rx = axis_rotation(0, torch.tensor([0.0, math.pi / 2], dtype=torch.float64))  # batched
    assert Rx.shape == (2, 3, 3)
    torch.testing.assert_close(
        Rx[1] @ torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64),
        torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64),
        atol=1e-15,
        rtol=0,
    )
    with pytest.raises(ValueError, match="axis"):
        axis_rotation(3, torch.tensor(0.0))


def test_axial_inverts_skew_up_to_two_and_pairs_with_it():
    g = torch.Generator().manual_seed(31)
    w, a = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    M = torch.randn(4, 3, 3, generator=g, dtype=F64)
    torch.testing.assert_close(axial(skew(w)), 2 * w, rtol=0, atol=0)
    torch.testing.assert_close((M * skew(a)).sum((-1, -2)), (a * axial(M)).sum(-1), rtol=1e-12, atol=1e-12)
