"""mvreg bench's measurements on a tiny CT: a real run is consistent and positive; the derived figures
(rates, bounds, speed-up, medians) come out right from known timings, bandwidths and errors."""

import dataclasses
import types

import pytest
import torch

from mvreg_ros.core.data.simulate import make_scene
from mvreg_ros.core.evaluation import benchmark
from mvreg_ros.core.evaluation.benchmark import BenchConfig, memory_bandwidth_gbs, run
from mvreg_ros.core.geometry import transforms as geometry
from mvreg_ros.core.registration.acceptance import AcceptanceConfig
from mvreg_ros.core.registration.curvature import HeldCurvature
from mvreg_ros.core.registration.global_search import GlobalConfig
from mvreg_ros.core.registration.pipeline import Outcome, PipelineConfig
from mvreg_ros.core.registration.refine import RefineConfig, RegistrationResult, TrackingConfig
from mvreg_ros.core.rendering import native as render_native
from mvreg_ros.core.rendering.reference import ReferenceRenderer


def test_memory_bandwidth_is_positive():
    assert memory_bandwidth_gbs("cpu", mb=8) > 0.1


@pytest.mark.parametrize(
    "backend",
    [
        "grid_sample",
        pytest.param(
            "native",
            marks=pytest.mark.skipif(render_native.load() is None, reason="the native kernel cannot be built here"),
        ),
    ],
)
def test_bench_run_on_tiny_ct(tiny_ct, backend):
    cfg = BenchConfig(
        cases=1,
        reference_cases=1,
        reference_iterations=2,
        reference_size=16,
        render_size=16,
        render_samples=16,
        refine=RefineConfig(
            sizes=(16,),
            iterations=(3,),
            n_samples=(16,),
            patches=(8,),
            uncertainty=False,
            newton_steps=0,
            render_backend=backend,
        ),
        tracking_cases=1,
        pipeline=PipelineConfig(  # a small budget everywhere: this checks the plumbing, not the figures
            tracking=TrackingConfig(iterations=3, n_samples=0, newton_steps=0),
            global_search=GlobalConfig(candidates=2, keep=1, iterations=2, size=16, n_samples=16),
            acceptance=AcceptanceConfig(view_agreement=False),
        ),
    )
    r = run(tiny_ct, cfg, log=lambda *_: None)
    rr = r["renderer"]
    for name in ("engine", "reference"):
        assert rr[name]["forward_samples_per_s"] > 0 and rr[name]["forward_backward_samples_per_s"] > 0
        assert rr[name]["rays"] == 2 * 16 * 16
    assert rr["engine"]["samples_per_ray"] == 16
    assert rr["engine_backend"] == backend  # as configured in cfg.refine
    if rr["engine_backend"] == "native":  # the compiled backend is measured beside it
        assert rr["engine_compiled"]["rays"] == rr["engine"]["rays"]
        assert rr["engine_native_isa"] in ("avx512", "avx2", "scalar")
    assert rr["engine_forward_times_from_bound"] > 0 and r["refine_speedup"] > 0
    assert r["refine"]["n"] == 1 and r["reference_refine"]["n"] == 1
    assert r["coarse_ms_per_set"] is None  # no model given
    assert r["peak_memory_mb"] > 0
    assert set(r["refine"]) >= {"time_s", "median_mtre_mm", "profile"}
    p = r["refine"]["profile"]
    parts = ("render_forward_backward_s", "similarity_s", "optimiser_step_s", "newton_polish_s", "other_s")
    assert p["total_s"] > 0 and p["render_forward_backward_s"] > 0 and p["optimiser_step_s"] > 0
    assert sum(p[k] for k in parts) == pytest.approx(p["total_s"])
    assert p["newton_polish_s"] > 0  # the per-view similarity at the end, even without Newton steps
    for key in ("tracking", "tracking_without_fast_path"):
        t = r[key]
        assert (
            t["n"] == 1 and t["time_s"] > 0 and t["stages"][0].startswith("tracking" if key == "tracking" else "local")
        )
        assert t["fast"] + t["fallbacks"] <= 1 and t["false_acceptances"] <= t["accepted"] <= 1
    assert r["tracking_without_fast_path"]["fast"] == 0 and r["tracking_speedup"] > 0
    assert "big_ct" not in r  # asked for only


def test_bench_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        BenchConfig().cases = 3


class _Clock:
    """A perf_counter that stands still except when a fake advances it by a known duration."""

    def __init__(self):
        self.now = 1000.0

    def install(self, monkeypatch):
        monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: self.now))


def _fake_renderer(clock, forward_s, forward_backward_s, backend="grid_sample"):
    """A renderer class whose call costs ``forward_s`` without autograd and ``forward_backward_s`` with it."""

    class FakeRenderer:
        def __init__(self, volume, **_):
            self.backend = backend

        def __call__(self, T, K, height, width, n_samples=None, poses=1):
            clock.now += forward_backward_s if torch.is_grad_enabled() else forward_s
            return T.sum() * torch.zeros(len(T), height, width, dtype=T.dtype)  # on the pose's graph

    return FakeRenderer


def test_renderer_figures_from_known_times_and_bandwidths(tiny_ct, monkeypatch):
    clock = _Clock()
    clock.install(monkeypatch)
    monkeypatch.setattr(benchmark, "Renderer", _fake_renderer(clock, 0.002, 0.008))
    monkeypatch.setattr(benchmark, "ReferenceRenderer", _fake_renderer(clock, 0.5, 2.0))
    monkeypatch.setattr(benchmark, "memory_bandwidth_gbs", lambda device: 25.6)  # copy: 8e8 samples/s of 32 B
    monkeypatch.setattr(benchmark, "read_bandwidth_gbs", lambda device: 51.2)  # read: 1.6e9 samples/s
    cfg = BenchConfig(render_size=16, render_samples=16, refine=RefineConfig(render_backend="grid_sample"))
    scene = make_scene(tiny_ct.bone_centre_ct(), [(0.0, 0.0), (90.0, 0.0)])
    rr = benchmark.renderer_throughput(tiny_ct, scene, cfg)
    # 2 views of 16 x 16 rays: 512 rays x 16 samples = 8192 samples per call
    assert rr["engine"]["rays"] == 512 and rr["engine"]["samples_per_ray"] == 16
    assert rr["engine"]["forward_s"] == pytest.approx(0.002) and rr["engine"]["forward_backward_s"] == pytest.approx(
        0.008
    )
    assert rr["engine"]["forward_samples_per_s"] == pytest.approx(4.096e6)
    assert rr["engine"]["forward_backward_samples_per_s"] == pytest.approx(1.024e6)
    # the reference (Siddon) takes one sample per voxel boundary: 64 + 64 + 17 planes + 3
    assert tiny_ct.shape_ijk == (64, 64, 17) and rr["reference"]["samples_per_ray"] == 148
    assert rr["reference"]["forward_samples_per_s"] == pytest.approx(512 * 148 / 0.5)
    assert rr["reference"]["forward_backward_samples_per_s"] == pytest.approx(512 * 148 / 2.0)
    assert rr["memory_bandwidth_gbs"] == 25.6 and rr["memory_read_bandwidth_gbs"] == 51.2
    assert rr["bandwidth_bound_samples_per_s"] == pytest.approx(8e8)
    assert rr["read_bandwidth_bound_samples_per_s"] == pytest.approx(1.6e9)
    assert rr["engine_forward_fraction_of_bound"] == pytest.approx(4.096e6 / 8e8)
    assert rr["engine_forward_fraction_of_read_bound"] == pytest.approx(4.096e6 / 1.6e9)
    assert rr["engine_forward_times_from_bound"] == pytest.approx(390.625)  # from the larger bound, 1.6e9
    assert rr["engine_backend"] == "grid_sample" and "engine_compiled" not in rr


def test_refinement_figures_from_known_durations_and_errors(tiny_ct, monkeypatch):
    """Each fake refinement takes a known time and ends a known translation from the truth (a pure
    translation moves every landmark by its length, so that length is the case's mTRE); the engine's
    first refinement, its warm-up, is not timed."""
    clock = _Clock()
    clock.install(monkeypatch)
    scenes = []

    def recording_make_scene(*a, **kw):
        scenes.append(make_scene(*a, **kw))
        return scenes[-1]

    # the engine's first refinement is its untimed warm-up (from the first start); the reference has none
    plan = {"engine": ([0.90, 0.30, 0.20, 0.25], [9.0, 0.4, 0.6, 0.5]), "reference": ([4.0, 2.0], [3.0, 1.0])}

    class FakeRegistrar(benchmark.Registrar):  # refine() scripted, no volume
        def __init__(self, volume, config, renderer_cls=None):
            self.device = config.device
            self.kind = "reference" if renderer_cls is ReferenceRenderer else "engine"
            self.calls = 0

        def refine(self, views, T_init):
            durations, errors = plan[self.kind]
            clock.now += durations[self.calls]
            shift = torch.tensor([0.0, 0.6, 0.8], dtype=torch.float64) * errors[self.calls]  # unit direction
            self.calls += 1
            return types.SimpleNamespace(T_ref_from_ct=geometry.translation(shift) @ scenes[-1].T_ref_from_ct)

    monkeypatch.setattr(benchmark, "make_scene", recording_make_scene)
    monkeypatch.setattr(benchmark, "Registrar", FakeRegistrar)
    monkeypatch.setattr(benchmark, "renderer_throughput", lambda volume, scene, cfg: {})
    monkeypatch.setattr(benchmark, "pipeline_runs", lambda *a, **k: {})  # its own test below
    monkeypatch.setattr(benchmark, "tracking_comparison", lambda *a, **k: {})  # ... and the next ones
    monkeypatch.setattr(benchmark, "tracking_sets", lambda *a, **k: [])
    monkeypatch.setattr(benchmark, "refine_profile", lambda *a, **k: {"total_s": 0.25})
    r = run(tiny_ct, BenchConfig(cases=3, reference_cases=2), log=lambda *_: None)
    e, ref = r["refine"], r["reference_refine"]
    assert e["n"] == 3 and ref["n"] == 2
    assert e["times_s"] == pytest.approx([0.30, 0.20, 0.25]) and ref["times_s"] == pytest.approx([4.0, 2.0])
    assert e["time_s"] == pytest.approx(0.25) and ref["time_s"] == pytest.approx(3.0)  # medians
    assert e["mtre_mm"] == pytest.approx([0.4, 0.6, 0.5]) and e["median_mtre_mm"] == pytest.approx(0.5)
    assert e["max_mtre_mm"] == pytest.approx(0.6) and ref["median_mtre_mm"] == pytest.approx(2.0)
    assert r["refine_speedup"] == pytest.approx(12.0)  # 3.0 s against 0.25 s


def test_full_registration_figures_count_false_acceptances(tiny_ct, monkeypatch):
    """pipeline_runs scores each full registration against the truth: an accepted result over
    2 mm is a false acceptance, a rejected one under 2 mm a false rejection."""
    scene = make_scene(tiny_ct.bone_centre_ct(), [(0.0, 0.0), (90.0, 0.0)])
    plan = [(0.5, True), (3.0, True), (1.0, False), (10.0, False)]  # (error along a unit direction, accepted)

    class FakePipeline:
        def __init__(self, registrar, initialisers):
            self.calls = 0

        def register_from(self, views, start):
            err, accepted = plan[self.calls]
            self.calls += 1
            shift = torch.tensor([0.0, 0.6, 0.8], dtype=torch.float64) * err
            result = types.SimpleNamespace(T_ref_from_ct=geometry.translation(shift) @ scene.T_ref_from_ct)
            return types.SimpleNamespace(result=result, accepted=accepted)

    class CpuRegistrar(benchmark.Registrar):  # only its device is used
        def __init__(self):
            self.device = torch.device("cpu")

    monkeypatch.setattr(benchmark, "RegistrationPipeline", FakePipeline)
    lm = torch.stack([tiny_ct.bone_centre_ct()]).to(torch.float64)
    r = benchmark.pipeline_runs(CpuRegistrar(), scene, None, [scene.T_ref_from_ct] * 4, lm)
    assert r["n"] == 4 and r["mtre_mm"] == pytest.approx([0.5, 3.0, 1.0, 10.0])
    assert r["success_rate"] == 0.5 and r["accepted"] == 2
    assert r["false_acceptances"] == 1 and r["false_rejections"] == 1
    assert r["median_mtre_mm"] == pytest.approx(2.0)


def test_tracking_figures_count_fast_updates_fallbacks_and_false_acceptances(tiny_ct, monkeypatch):
    """tracking_runs registers each moved set from a tracking start at the held pose and scores it
    against the moved pose; the stages say which updates the fast path made alone."""
    scene = make_scene(tiny_ct.bone_centre_ct(), [(0.0, 0.0), (90.0, 0.0)])
    held = HeldCurvature(
        H=torch.eye(6, dtype=torch.float64),
        T_ref_from_ct=scene.T_ref_from_ct,
        T_cam_from_ct=geometry.invert(scene.T_ref_from_cam) @ scene.T_ref_from_ct,
        K=scene.K.to(torch.float64).expand(2, 3, 3),
        image_size=(scene.height, scene.width),
        level=(32, 8, 8),
    )
    # (error along a unit direction, accepted, stages, the result's curvature)
    plan = [
        (0.3, True, ("tracking",), held.older()),  # the held curvature served it
        (0.5, True, ("tracking", "tracking"), held),  # two fast rounds: still the fast path alone
        (3.0, True, ("tracking", "local"), None),
        (1.0, False, ("tracking", "local", "global", "local"), None),
    ]
    starts = []

    class FakePipeline:
        def __init__(self, registrar, initialisers, config):
            self.calls = 0
            self.config = config

        def register_from(self, views, start):
            starts.append(start)
            err, accepted, stages, curvature = plan[self.calls % len(plan)]
            self.calls += 1
            shift = torch.tensor([0.0, 0.6, 0.8], dtype=torch.float64) * err
            result = RegistrationResult(
                T_ref_from_ct=geometry.translation(shift) @ views,
                success=True,
                converged=True,
                similarity=0.9,
                view_similarity=(0.9, 0.9),
                iterations=1,
                time_s=0.0,
                curvature=curvature,
            )
            return Outcome(accepted=accepted, reason="", result=result, stages=stages)

    class CpuRegistrar(benchmark.Registrar):
        def __init__(self):
            self.device = torch.device("cpu")

    monkeypatch.setattr(benchmark, "RegistrationPipeline", FakePipeline)
    lm = torch.stack([tiny_ct.bone_centre_ct()]).to(torch.float64)
    T = scene.T_ref_from_ct
    sets = [(T, T)] * 4  # (moved pose, "views": the fake registers relative to it)
    r = benchmark.tracking_runs(CpuRegistrar(), T, sets, lm, warm_up=False, curvature=held)
    assert all(s.tracking and s.source == "last_accepted" and s.curvature is held for s in starts)
    assert r["held_curvature"] == 1  # the results whose covariance used the held curvature
    assert r["n"] == 4 and r["mtre_mm"] == pytest.approx([0.3, 0.5, 3.0, 1.0])
    assert r["fast"] == 2 and r["fallbacks"] == 2 and r["accepted"] == 3
    assert r["false_acceptances"] == 1 and r["false_rejections"] == 1
    assert r["stages"] == ["tracking", "tracking+tracking", "tracking+local", "tracking+local+global+local"]


def test_bench_config_checks_its_sections():
    with pytest.raises(ValueError, match="unknown bench sections"):
        BenchConfig(sections=("renderer", "nope"))
    with pytest.raises(ValueError, match="'reference' section compares against 'refine'"):
        BenchConfig(sections=("reference",))
    with pytest.raises(ValueError, match="tracking_cases must be >= 0"):
        BenchConfig(tracking_cases=-1)
    assert "big_ct" not in BenchConfig().sections  # asked for only (--big-ct)


def test_big_ct_section_on_a_small_big_ct(monkeypatch):
    """The big-CT section end to end on a small stand-in (the shipped CT resampled to 64 x 64 x 40,
    counted as big): written, loaded, pooled once, warm; the figures are consistent."""
    cfg = BenchConfig(
        big_ct_shape=(64, 64, 40),
        refine=RefineConfig(
            sizes=(16,),
            iterations=(3,),
            n_samples=(16,),
            patches=(8,),
            newton_steps=0,
            uncertainty=False,
            render_backend="grid_sample",
            full_resolution_max_voxels=1000,
            base_voxel_mm=12.0,
        ),
    )
    b = benchmark.big_ct_run(cfg, log=lambda *_: None)
    assert b["shape_ijk"] == [64, 64, 40] and b["file_mb"] > 0
    assert b["ready_s"] == pytest.approx(b["load_s"] + b["prepare_s"] + b["warmup_s"])
    assert (
        b["base_factor"] > 1 and b["rss_mb"] > 0 and b["full_resolution_mb"] == pytest.approx(64 * 64 * 40 * 4 / 2**20)
    )
    assert b["engine_volume_mb"] < b["full_resolution_mb"]
    assert all(s >= b["engine_spacing_mm"][0] / 10 for s in b["engine_spacing_mm"])
    assert (b["warmup_graphs_compiled"], b["warmup_graphs_loaded"]) == (0, 0)  # grid_sample compiles nothing


def test_bench_cli_sections_and_options(capsys):
    from mvreg_ros.cli import bench as bench_cli
    from mvreg_ros.cli.main import main

    assert bench_cli.SECTION_NAMES == benchmark.SECTIONS  # the parser's list, spelled out to stay torch-free
    ns = types.SimpleNamespace
    assert bench_cli._sections(ns(only=None, big_ct=False)) == benchmark.DEFAULT_SECTIONS
    assert bench_cli._sections(ns(only=None, big_ct=True))[-1] == "big_ct"
    assert bench_cli._sections(ns(only="tracking, big-ct,profile", big_ct=False)) == ("tracking", "big_ct", "profile")
    with pytest.raises(ValueError, match="--only must name sections"):
        bench_cli._sections(ns(only="tracking,nope", big_ct=False))
    assert main(["bench", "--only", "nope"]) == 2
    assert "--only must name sections" in capsys.readouterr().err
    assert main(["bench", "--tracking-cases", "-1"]) == 2
    assert "--tracking-cases" in capsys.readouterr().err
    # training: asked for with --train-minutes (positive), which --only train needs
    assert bench_cli._sections(ns(only=None, big_ct=False, train_minutes=5.0))[-1] == "train"
    assert "train" not in bench_cli._sections(ns(only=None, big_ct=False, train_minutes=None))
    with pytest.raises(ValueError, match="needs --train-minutes"):
        bench_cli._sections(ns(only="train", big_ct=False, train_minutes=None))
    assert main(["bench", "--train-minutes", "0"]) == 2
    assert "--train-minutes" in capsys.readouterr().err
    with pytest.raises(ValueError, match="train_minutes"):
        BenchConfig(train_minutes=float("nan"))


def test_train_curve_is_the_held_out_error_over_training_time(tiny_ct):
    """A tiny training (3 s): the curve's points are the training's validations, in time order,
    ending at the budget; the step count is the training's."""
    from mvreg_ros.core.learning.train_config import TrainConfig

    tiny = TrainConfig(
        size=32, image_size=16, width=8, fc=32, n_samples=32, voxel_mm=5.0, pool_sets=64, initial_sets=16,
        refresh_sets=2, batch_sets=8, image_sets=4, image_samples=24, val_sets=4, threads=1, detector_px=128,
        pixel_mm=2.328,
    )  # fmt: skip
    t = benchmark.train_curve(tiny_ct, BenchConfig(train_minutes=0.05), log=lambda *_: None, base=tiny)
    points = t["points"]
    assert t["minutes"] == 0.05 and t["val_sets"] == 4 and t["steps"] > 0 and t["views_rendered"] > 0
    assert len(points) >= 2  # validations every 0.3 s of a 3 s budget, and the final one
    minutes = [q["minutes"] for q in points]
    assert minutes == sorted(minutes) and minutes[-1] >= 0.05 and minutes[-1] < 0.05 + 0.5
    assert points[-1]["step"] == t["steps"]
    assert all(q["val_median_mtre_mm"] > 0 and 0 <= q["val_under_10mm"] <= 1 for q in points)
