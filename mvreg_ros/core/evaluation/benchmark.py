"""Speed measurements behind ``mvreg bench``: renderer throughput against the memory-bandwidth
bound, refinement against the reference-renderer baseline, coarse-network inference, memory."""

from __future__ import annotations

import dataclasses
import platform
import resource
import time

import torch

from mvreg_ros.core.data.simulate import acquire, make_scene
from mvreg_ros.core.evaluation import stats
from mvreg_ros.core.evaluation.landmarks import ct_landmarks
from mvreg_ros.core.evaluation.metrics import mtre_mm
from mvreg_ros.core.geometry import transforms as geometry
from mvreg_ros.core.imaging.views import ViewSet
from mvreg_ros.core.imaging.volume import Volume
from mvreg_ros.core.registration.initialisers import Start
from mvreg_ros.core.registration.pipeline import RegistrationPipeline
from mvreg_ros.core.registration.refine import RefineConfig, Registrar
from mvreg_ros.core.rendering import native as render_native
from mvreg_ros.core.rendering.reference import ReferenceRenderer
from mvreg_ros.core.rendering.renderer import Renderer

BYTES_PER_TRILINEAR_SAMPLE = 8 * 4  # eight float32 neighbours read per sample (no cache reuse assumed)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    cases: int = 5  # 2-view refinements with the engine
    reference_cases: int = 2  # ... and with the reference baseline (slow)
    reference_iterations: int = 150  # fixed-resolution reference schedule
    reference_size: int = 64  # its image size (the engine's finest level)
    render_size: int = 64
    render_samples: int = 64
    rot_deg: float = 10.0
    trans_mm: float = 20.0
    global_rot_deg: float = 15.0  # full registrations (global stage + refinement + acceptance) start this far off
    global_trans_mm: float = 30.0
    seed: int = 0
    device: str = "cpu"
    model_path: str | None = None
    refine: RefineConfig = RefineConfig()  # the engine's settings under test (device comes from ``device``)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timeit(fn, device, repeats: int = 5) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return stats.median(times)


def memory_bandwidth_gbs(device, mb: int = 256, repeats: int = 15) -> float:
    """Copy bandwidth of a large buffer (bytes read + bytes written per second), GB/s, median."""
    n = mb * 1024 * 1024 // 4
    a = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / _timeit(lambda: b.copy_(a), device, repeats) / 1e9


def read_bandwidth_gbs(device, mb: int = 256, repeats: int = 15) -> float:
    """Read-only bandwidth of a large buffer (a sum over it), GB/s, median."""
    a = torch.empty(mb * 1024 * 1024 // 4, dtype=torch.float32, device=device).uniform_()
    return a.numel() * 4 / _timeit(lambda: a.sum(), device, repeats) / 1e9


def renderer_throughput(volume: Volume, scene, cfg: BenchConfig) -> dict:
    """Ray-samples per second, forward and forward+backward, for the engine's renderer (the
    configured backend, and the compiled backend beside the native one) and the reference renderer;
    and the memory-bandwidth bound for the same number of trilinear samples."""
    K = geometry.scale_intrinsics(scene.K, cfg.render_size / scene.width)
    T = scene.T_cam_from_ct
    out = {}
    engine = Renderer(volume.resampled(4), device=cfg.device, backend=cfg.refine.render_backend)
    renderers = [("engine", engine, cfg.render_samples)]
    if engine.backend == "native":  # the GPU's backend, measured beside it
        renderers.append(
            (
                "engine_compiled",
                Renderer(volume.resampled(4), device=cfg.device, backend="compiled"),
                cfg.render_samples,
            )
        )
    renderers.append(("reference", ReferenceRenderer(volume, device=cfg.device), None))
    V = len(T)
    rays = V * cfg.render_size**2
    for name, r, samples in renderers:
        x = torch.zeros(6, dtype=torch.float64, requires_grad=True)

        def fwd():
            with torch.no_grad():
                return r(T, K, cfg.render_size, cfg.render_size, n_samples=samples)

        def fwd_bwd():
            img = r(geometry.se3_exp(x) @ T.to(x), K, cfg.render_size, cfg.render_size, n_samples=samples)
            img.sum().backward()

        if samples is None:  # Siddon: one sample per voxel boundary crossed
            samples = sum(volume.shape_ijk) + 3
        repeats = 2 if name == "reference" else 5
        tf = _timeit(fwd, cfg.device, repeats * 4)
        tb = _timeit(fwd_bwd, cfg.device, repeats)
        out[name] = {
            "rays": rays,
            "samples_per_ray": samples,
            "forward_s": tf,
            "forward_backward_s": tb,
            "forward_samples_per_s": rays * samples / tf,
            "forward_backward_samples_per_s": rays * samples / tb,
        }
    out["engine_backend"] = engine.backend  # after the calls: a backend that failed to compile has fallen back
    if engine.backend == "native":
        out["engine_native_isa"] = render_native.load().isa
    engine_rate = out["engine"]["forward_samples_per_s"]
    bw = memory_bandwidth_gbs(cfg.device)
    out["memory_bandwidth_gbs"] = bw
    out["bandwidth_bound_samples_per_s"] = bw * 1e9 / BYTES_PER_TRILINEAR_SAMPLE
    out["engine_forward_fraction_of_bound"] = engine_rate / out["bandwidth_bound_samples_per_s"]
    # a sampler only reads: the read-only bandwidth gives a second estimate of the bound
    read_bw = read_bandwidth_gbs(cfg.device)
    out["memory_read_bandwidth_gbs"] = read_bw
    out["read_bandwidth_bound_samples_per_s"] = read_bw * 1e9 / BYTES_PER_TRILINEAR_SAMPLE
    out["engine_forward_fraction_of_read_bound"] = engine_rate / out["read_bandwidth_bound_samples_per_s"]
    # the bar is judged against the larger (stricter) of the two estimates
    out["engine_forward_times_from_bound"] = (
        max(out["bandwidth_bound_samples_per_s"], out["read_bandwidth_bound_samples_per_s"]) / engine_rate
    )
    return out


def _cases(volume, n_views: int, cfg: BenchConfig, n: int):
    scene = make_scene(volume.bone_centre_ct(), [(0.0, 0.0), (90.0, 0.0), (45.0, 20.0)][:n_views])
    gen = torch.Generator().manual_seed(cfg.seed)
    raw = acquire(
        Renderer(volume.resampled(2), device=cfg.device),
        scene.T_cam_from_ct,
        scene.K,
        scene.height,
        scene.width,
        generator=gen,
    )
    views = ViewSet.from_raw(raw, scene.K, scene.T_ref_from_cam)
    inits = [
        geometry.perturb(
            scene.T_ref_from_ct, rot_deg=cfg.rot_deg, trans_mm=cfg.trans_mm, centre_ct=volume.centre_ct(), generator=gen
        )
        for _ in range(n)
    ]
    return scene, views, inits


def refine_runs(registrar: Registrar, scene, views, inits, landmarks) -> dict:
    errs, times = [], []
    for T_init in inits:
        t = time.perf_counter()
        res = registrar.refine(views, T_init)
        _sync(registrar.device)
        times.append(time.perf_counter() - t)
        errs.append(mtre_mm(res.T_ref_from_ct, scene.T_ref_from_ct, landmarks))
    return {
        "n": len(inits),
        "time_s": stats.median(times),
        "median_mtre_mm": stats.median(errs),
        "max_mtre_mm": max(errs),
        "times_s": times,
        "mtre_mm": errs,
    }


def pipeline_runs(registrar: Registrar, scene, views, inits, landmarks, *, success_mm: float = 2.0) -> dict:
    """Full registrations through the engine's pipeline (global stage, refinement, acceptance
    test) from each start: time, error and the acceptance counts."""
    pipeline = RegistrationPipeline(registrar, initialisers=[])
    errs, times, accepted = [], [], []
    for T_init in inits:
        t = time.perf_counter()
        out = pipeline.register_from(views, Start(T_ref_from_ct=T_init, source="perturb"))
        _sync(registrar.device)
        times.append(time.perf_counter() - t)
        errs.append(mtre_mm(out.result.T_ref_from_ct, scene.T_ref_from_ct, landmarks))
        accepted.append(bool(out.accepted))
    ok = [e <= success_mm for e in errs]
    return {
        "n": len(inits),
        "time_s": stats.median(times),
        "median_mtre_mm": stats.median(errs),
        "max_mtre_mm": max(errs),
        "success_rate": sum(ok) / len(ok),
        "accepted": sum(accepted),
        "false_acceptances": sum(a and not o for a, o in zip(accepted, ok)),
        "false_rejections": sum(o and not a for a, o in zip(accepted, ok)),
        "times_s": times,
        "mtre_mm": errs,
    }


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_memory_mb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(volume: Volume, cfg: BenchConfig, log=print) -> dict:
    chosen = ct_landmarks(volume)
    landmarks = chosen.points_ct
    scene, views, inits = _cases(volume, 2, cfg, max(cfg.cases, cfg.reference_cases))
    result = {
        "device": device_name(cfg.device),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "landmarks": chosen.describe(),  # the points behind every mTRE below
    }
    log("renderer throughput ...")
    result["renderer"] = renderer_throughput(volume, scene, cfg)
    log("engine refinement (default settings) ...")
    engine = Registrar(volume, dataclasses.replace(cfg.refine, device=cfg.device))
    result["refine"] = refine_runs(engine, scene, views, inits[: cfg.cases], landmarks)
    log("reference refinement (DiffDRR Siddon, full-resolution volume, fixed resolution) ...")
    # the plain baseline: DiffDRR Siddon on the full-resolution volume, one fixed resolution, the
    # same optimiser for a fixed number of iterations, no second-order polish
    ref_cfg = RefineConfig(
        sizes=(cfg.reference_size,),
        iterations=(cfg.reference_iterations,),
        n_samples=(0,),
        patches=(8,),
        pool_volume=False,
        tol_rot_deg=0.0,
        tol_trans_mm=0.0,
        uncertainty=False,
        newton_steps=0,
        device=cfg.device,
    )
    reference = Registrar(volume, ref_cfg, renderer_cls=ReferenceRenderer)
    result["reference_refine"] = refine_runs(reference, scene, views, inits[: cfg.reference_cases], landmarks)
    result["refine_speedup"] = result["reference_refine"]["time_s"] / result["refine"]["time_s"]
    log(
        f"full registration (global stage, refinement, acceptance test) from {cfg.global_rot_deg:g} deg / "
        f"{cfg.global_trans_mm:g} mm ..."
    )
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    far = [
        geometry.perturb(
            scene.T_ref_from_ct,
            rot_deg=cfg.global_rot_deg,
            trans_mm=cfg.global_trans_mm,
            centre_ct=volume.centre_ct(),
            generator=gen,
        )
        for _ in range(cfg.cases)
    ]
    result["pipeline"] = pipeline_runs(engine, scene, views, far, landmarks)
    result["coarse_ms_per_set"] = None
    if cfg.model_path:
        from mvreg_ros.core.learning.coarse import CoarseModel

        model = CoarseModel.load(cfg.model_path, volume=volume, device=cfg.device)
        result["coarse_ms_per_set"] = 1000 * _timeit(lambda: model.predict(views), cfg.device, 20)
    result["peak_memory_mb"] = peak_memory_mb(cfg.device)
    return result
