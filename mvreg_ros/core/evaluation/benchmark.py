"""Speed measurements behind ``mvreg bench``: renderer throughput against the memory-bandwidth
bound, refinement against the reference-renderer baseline, full registrations, tracking updates
(the fast path of a tracking start), where one refinement spends its time, coarse-network
inference, memory, and a big CT (512 x 512 x 1000) from file to a warm engine."""

from __future__ import annotations

import dataclasses
import gc
import math
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mvreg_ros.core.data.simulate import make_scene
from mvreg_ros.core.evaluation import stats
from mvreg_ros.core.evaluation.landmarks import ct_landmarks
from mvreg_ros.core.evaluation.metrics import mtre_mm
from mvreg_ros.core.geometry import transforms as geometry
from mvreg_ros.core.imaging.views import ViewSet
from mvreg_ros.core.imaging.volume import Volume, example_ct_path, load_hu, load_volume
from mvreg_ros.core.registration.curvature import HeldCurvature
from mvreg_ros.core.registration.initialisers import Start
from mvreg_ros.core.registration.pipeline import PipelineConfig, RegistrationPipeline
from mvreg_ros.core.registration.refine import RefineConfig, Registrar
from mvreg_ros.core.rendering import native as render_native
from mvreg_ros.core.rendering.reference import ReferenceRenderer
from mvreg_ros.core.rendering.renderer import Renderer, compile_cache_counts

BYTES_PER_TRILINEAR_SAMPLE = 8 * 4  # eight float32 neighbours read per sample (no cache reuse assumed)
SECTIONS = ("renderer", "refine", "reference", "pipeline", "tracking", "profile", "coarse", "big_ct", "train")
# asked for only: the big CT takes a minute and 1-3 GB; training takes train_minutes
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s not in ("big_ct", "train"))


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
    tracking_cases: int = 5  # tracking updates: view sets moved tracking_rot_deg / tracking_trans_mm from the held pose
    tracking_rot_deg: float = 1.0
    tracking_trans_mm: float = 2.0
    tracking_compare: bool = True  # ... and the same sets without the fast path (local refinement + acceptance test)
    big_ct_shape: tuple[int, int, int] = (512, 512, 1000)  # (i, j, k) voxels of the big CT written as NIfTI
    train_minutes: float = 10.0  # the "train" section: a coarse network trained this long, its held-out curve
    seed: int = 0
    device: str = "cpu"
    model_path: str | None = None
    refine: RefineConfig = RefineConfig()  # the engine's settings under test (device comes from ``device``)
    pipeline: PipelineConfig = PipelineConfig()  # of the tracking updates (the node's defaults)
    sections: tuple[str, ...] = DEFAULT_SECTIONS  # what to measure (SECTIONS)

    def __post_init__(self):
        bad = [s for s in self.sections if s not in SECTIONS]
        if bad:
            raise ValueError(f"unknown bench sections {bad}; choose from {SECTIONS}")
        if "reference" in self.sections and "refine" not in self.sections:
            raise ValueError("the 'reference' section compares against 'refine': give both")
        for name in ("cases", "reference_cases", "tracking_cases"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if len(self.big_ct_shape) != 3 or min(self.big_ct_shape) < 2:
            raise ValueError(f"big_ct_shape must be 3 sizes >= 2, got {self.big_ct_shape}")
        if not (math.isfinite(self.train_minutes) and self.train_minutes > 0):
            raise ValueError(f"train_minutes must be a positive number, got {self.train_minutes}")


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
    views = scene.views(Renderer(volume.resampled(2), device=cfg.device), generator=gen)
    inits = [
        geometry.perturb(
            scene.T_ref_from_ct, rot_deg=cfg.rot_deg, trans_mm=cfg.trans_mm, centre_ct=volume.centre_ct(), generator=gen
        )
        for _ in range(n)
    ]
    return scene, views, inits


def far_starts(volume: Volume, scene, cfg: BenchConfig, n: int) -> list[torch.Tensor]:
    """The full registrations' ``n`` starts: the truth moved ``global_rot_deg`` / ``global_trans_mm``."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    return [
        geometry.perturb(
            scene.T_ref_from_ct,
            rot_deg=cfg.global_rot_deg,
            trans_mm=cfg.global_trans_mm,
            centre_ct=volume.centre_ct(),
            generator=gen,
        )
        for _ in range(n)
    ]


def refine_runs(registrar: Registrar, scene, views, inits, landmarks, *, warm_up: bool = True) -> dict:
    """Refinements of ``views`` from each start of ``inits``: time and error against the scene's pose.
    ``warm_up``: one refinement from the first start untimed before (the engine's pooled volumes,
    renderers and compiled shapes made, as a node makes them at its warm-up)."""
    if warm_up and inits:
        registrar.refine(views, inits[0])
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


def tracking_sets(volume: Volume, scene, cfg: BenchConfig, n: int) -> list[tuple[torch.Tensor, ViewSet]]:
    """``n`` view sets of the anatomy moved ``tracking_rot_deg`` / ``tracking_trans_mm`` from the
    held pose ``scene.T_ref_from_ct`` (each a fresh acquisition): (the moved pose, its views)."""
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    renderer = Renderer(volume.resampled(2), device=cfg.device)
    sets = []
    for _ in range(n):
        T_moved = geometry.perturb(
            scene.T_ref_from_ct,
            rot_deg=cfg.tracking_rot_deg,
            trans_mm=cfg.tracking_trans_mm,
            centre_ct=volume.centre_ct(),
            generator=gen,
        )
        sets.append((T_moved, dataclasses.replace(scene, T_ref_from_ct=T_moved).views(renderer, generator=gen)))
    return sets


def tracking_runs(
    registrar: Registrar,
    T_held_ref_from_ct: torch.Tensor,
    sets,
    landmarks,
    *,
    config: PipelineConfig = PipelineConfig(),
    success_mm: float = 2.0,
    warm_up: bool = True,
    curvature: HeldCurvature | None = None,
) -> dict:
    """Tracking updates through the pipeline: each set registered from a tracking start at the held
    pose (the fast path, falling back to the full registration), carrying ``curvature`` (the held
    registration's, :class:`HeldCurvature`; None: none held). Time, error against the moved pose,
    how many took the fast path, how many used the held curvature, and the acceptance counts.
    ``warm_up``: the first set once untimed before (compiles the fast path's shapes)."""
    return tracking_comparison(
        registrar,
        T_held_ref_from_ct,
        sets,
        landmarks,
        {"run": config},
        success_mm=success_mm,
        warm_up=warm_up,
        curvature=curvature,
    )["run"]


def tracking_comparison(
    registrar: Registrar,
    T_held_ref_from_ct: torch.Tensor,
    sets,
    landmarks,
    configs: dict[str, PipelineConfig],
    *,
    success_mm: float = 2.0,
    warm_up: bool = True,
    curvature: HeldCurvature | None = None,
) -> dict[str, dict]:
    """:func:`tracking_runs` for each pipeline configuration of ``configs``, set by set in turn (a
    load that changes during the run weighs on all of them alike)."""
    pipelines = {name: RegistrationPipeline(registrar, initialisers=[], config=c) for name, c in configs.items()}

    def start() -> Start:
        return Start(
            T_ref_from_ct=T_held_ref_from_ct.clone(), source="last_accepted", tracking=True, curvature=curvature
        )

    if warm_up and sets:
        for pipeline in pipelines.values():
            pipeline.register_from(sets[0][1], start())
    runs = {
        name: {"errs": [], "times": [], "refine": [], "accepted": [], "stages": [], "fast": [], "held": []}
        for name in configs
    }
    for T_moved, views in sets:
        for name, pipeline in pipelines.items():
            t = time.perf_counter()
            out = pipeline.register_from(views, start())
            _sync(registrar.device)
            runs[name]["times"].append(time.perf_counter() - t)
            runs[name]["refine"].append(float(getattr(out.result, "time_s", float("nan"))))
            runs[name]["errs"].append(mtre_mm(out.result.T_ref_from_ct, T_moved, landmarks))
            runs[name]["accepted"].append(bool(out.accepted))
            runs[name]["stages"].append("+".join(out.stages))
            runs[name]["fast"].append(out.fast)
            held = getattr(out.result, "curvature", None)
            runs[name]["held"].append(held is not None and held.age > 0)  # its covariance from the held curvature
    results = {}
    for name, x in runs.items():
        errs, times, accepted, stages = x["errs"], x["times"], x["accepted"], x["stages"]
        ok = [e <= success_mm for e in errs]
        results[name] = {
            "n": len(sets),
            "time_s": stats.median(times),
            # the last refinement's own time (the rest: the acceptance test, and any earlier stages)
            "refine_time_s": stats.median(x["refine"]),
            "median_mtre_mm": stats.median(errs),
            "max_mtre_mm": max(errs),
            "fast": sum(x["fast"]),  # the fast path's rounds alone (Outcome.fast)
            "fallbacks": sum(s.startswith("tracking") and not f for s, f in zip(stages, x["fast"])),
            "held_curvature": sum(x["held"]),  # results whose covariance used the held registration's curvature
            "accepted": sum(accepted),
            "false_acceptances": sum(a and not o for a, o in zip(accepted, ok)),
            "false_rejections": sum(o and not a for a, o in zip(accepted, ok)),
            "times_s": times,
            "mtre_mm": errs,
            "stages": stages,
        }
    return results


def refine_profile(
    registrar: Registrar, views: ViewSet, T_init: torch.Tensor, schedule=None, curvature: HeldCurvature | None = None
) -> dict:
    """Seconds per part of one refinement from ``T_init`` (``Registrar.profiled``; the registrar
    should be warm: compiled for these shapes); ``schedule``, ``curvature``: as :meth:`Registrar.refine`."""
    with registrar.profiled() as timer:
        t = timer.now()
        res = registrar.refine(views, T_init, schedule=schedule, curvature=curvature)
        total = timer.now() - t
    out = timer.report(total)
    out["iterations"] = res.iterations
    out["level_iterations"] = list(res.level_iterations)
    return out


def _proc_status_mb(key: str) -> float | None:
    """A memory line of /proc/self/status (``VmRSS``, ``VmHWM``) in MB; None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Resident memory of this process now (VmRSS), MB; the peak so far where /proc is missing."""
    now = _proc_status_mb("VmRSS")
    return now if now is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss_mb() -> float | None:
    return _proc_status_mb("VmHWM")


def _reset_peak_rss() -> bool:
    """Linux: restart VmHWM from the current RSS (``5`` to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def write_big_ct(path: str | Path, shape_ijk: tuple[int, int, int] = (512, 512, 1000)) -> Path:
    """The shipped CT resampled (trilinear) to ``shape_ijk`` voxels over the same extent, written as
    int16 HU NIfTI at ``path`` (``.nii.gz``: gzip level 1)."""
    import nibabel as nib

    src = example_ct_path()
    hu, _ = load_hu(src)
    D0, H0, W0 = hu.shape
    W, H, D = shape_ijk
    big = F.interpolate(hu[None, None], size=(D, H, W), mode="trilinear", align_corners=True)[0, 0]
    del hu
    arr = big.round_().clamp_(-32768, 32767).to(torch.int16)
    del big
    affine = nib.load(str(src)).affine.copy()
    for axis, (n0, n) in enumerate(((W0, W), (H0, H), (D0, D))):
        affine[:3, axis] *= (n0 - 1) / (n - 1)  # align_corners: the end voxels stay where they were
    path = Path(path)
    nib.save(nib.Nifti1Image(arr.numpy().transpose(2, 1, 0), affine), str(path))
    return path


def _engine_volume_mb(registrar: Registrar) -> float:
    tensors = {registrar.volume.data.data_ptr(): registrar.volume.data.untyped_storage().nbytes()}
    for r in registrar._renderers.values():
        for t in (getattr(r, "data", None), getattr(r, "padded", None)):
            t = t.data if isinstance(t, render_native.Bricked) else t  # a bricked volume's storage
            if isinstance(t, torch.Tensor):
                tensors[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(tensors.values()) / 2**20


def big_ct_run(cfg: BenchConfig, log=print) -> dict:
    """A big CT (``big_ct_shape``, written as NIfTI into a temporary folder) from file to a warm
    engine: load (HU to attenuation in place), the engine's crop and one-time pooling (the
    full-resolution array is dropped), then the warm-up: the first refinement (from ``rot_deg`` /
    ``trans_mm``, compiling the renderer where its image sizes are new) of a 2-view set rendered from the
    engine's CT. ``ready_s`` = load + crop and pool + warm-up (rendering the simulated X-rays,
    ``views_s``, is not counted: a C-arm sends them); ``rss_mb`` the resident memory once ready
    (``rss_before_mb`` before loading, ``peak_rss_mb`` the peak from loading on, where Linux can
    restart it)."""
    out: dict = {"shape_ijk": list(cfg.big_ct_shape)}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = write_big_ct(Path(tmp) / "big_ct.nii.gz", cfg.big_ct_shape)
        out["write_s"] = time.perf_counter() - t
        out["file_mb"] = path.stat().st_size / 2**20
        gc.collect()
        out["rss_before_mb"] = rss_mb()
        peak_reset = _reset_peak_rss()
        log(f"big CT {cfg.big_ct_shape}: loading {out['file_mb']:.0f} MB ...")
        t0 = time.perf_counter()
        volume = load_volume(path)
        out["load_s"] = time.perf_counter() - t0
        out["full_resolution_mb"] = volume.data.numel() * volume.data.element_size() / 2**20
        t = time.perf_counter()
        registrar = Registrar(volume, dataclasses.replace(cfg.refine, device=cfg.device))
        del volume
        gc.collect()
        out["prepare_s"] = time.perf_counter() - t
    t = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    scene = make_scene(registrar.centre_ct, [(0.0, 0.0), (90.0, 0.0)])
    views = scene.views(Renderer(registrar.volume, device=cfg.device, backend="grid_sample"), generator=gen)
    T_init = geometry.perturb(
        scene.T_ref_from_ct, rot_deg=cfg.rot_deg, trans_mm=cfg.trans_mm, centre_ct=registrar.centre_ct, generator=gen
    )
    out["views_s"] = time.perf_counter() - t
    t = time.perf_counter()
    misses0, hits0 = compile_cache_counts()
    res = registrar.refine(views, T_init)
    _sync(cfg.device)
    out["warmup_s"] = time.perf_counter() - t
    misses, hits = compile_cache_counts()
    out["warmup_graphs_compiled"] = misses - misses0  # 0 after `mvreg precompile` (the set-up runs it)
    out["warmup_graphs_loaded"] = hits - hits0  # ... from the compile cache on disk
    out["ready_s"] = out["load_s"] + out["prepare_s"] + out["warmup_s"]
    gc.collect()
    out["rss_mb"] = rss_mb()
    out["rss_delta_mb"] = out["rss_mb"] - out["rss_before_mb"]
    out["peak_rss_mb"] = _peak_rss_mb() if peak_reset else None
    out["base_factor"] = registrar.base_factor
    out["engine_volume_shape_ijk"] = list(registrar.volume.shape_ijk)
    out["engine_spacing_mm"] = [round(float(x), 4) for x in registrar.volume.spacing]
    out["engine_volume_mb"] = _engine_volume_mb(registrar)
    landmarks = ct_landmarks(registrar.box).points_ct  # the CT's own voxels, not its continuation
    out["warmup_mtre_mm"] = mtre_mm(res.T_ref_from_ct, scene.T_ref_from_ct, landmarks)
    t = time.perf_counter()
    warm = registrar.refine(views, T_init)
    _sync(cfg.device)
    out["warm_refine_s"] = time.perf_counter() - t
    out["warm_refine_mtre_mm"] = mtre_mm(warm.T_ref_from_ct, scene.T_ref_from_ct, landmarks)
    return out


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
    """The peak memory: CUDA's allocated peak, or the resident peak since the last
    :func:`_reset_peak_rss` (VmHWM; the process's peak where /proc is missing)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    peak = _peak_rss_mb()
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(volume: Volume, cfg: BenchConfig, log=print) -> dict:
    """The sections ``cfg.sections`` of the benchmark on ``volume``; the result's keys follow them."""
    sections = set(cfg.sections)
    big_ct = None
    if "big_ct" in sections:  # first: nothing compiled in this process yet, as in a node starting on it
        big_ct = big_ct_run(cfg, log)
        _reset_peak_rss()  # peak_memory_mb is the rest of the benchmark's
    chosen = ct_landmarks(volume)
    landmarks = chosen.points_ct
    scene, views, inits = _cases(volume, 2, cfg, max(cfg.cases, cfg.reference_cases, 1))
    result = {
        "device": device_name(cfg.device),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "landmarks": chosen.describe(),  # the points behind every mTRE below
        "sections": [s for s in SECTIONS if s in sections],
    }
    if "renderer" in sections:
        log("renderer throughput ...")
        result["renderer"] = renderer_throughput(volume, scene, cfg)
    engine = Registrar(volume, dataclasses.replace(cfg.refine, device=cfg.device))
    if "refine" in sections and cfg.cases:
        log("engine refinement (default settings) ...")
        result["refine"] = refine_runs(engine, scene, views, inits[: cfg.cases], landmarks)
    if "reference" in sections and cfg.reference_cases and "refine" in result:
        log("reference refinement (DiffDRR Siddon, full-resolution volume, fixed resolution) ...")
        # the plain baseline: DiffDRR Siddon on the full-resolution volume, one fixed resolution, the
        # same optimiser for a fixed number of iterations, no second-order polish
        ref_cfg = RefineConfig(
            sizes=(cfg.reference_size,),
            iterations=(cfg.reference_iterations,),
            n_samples=(0,),
            patches=(8,),
            grad_weight=0.5,  # the baseline of every edition (the engine's default moved to 0.75)
            render_read_only=False,  # ... which traces every pixel's ray (the engine's default traces the read ones)
            pool_volume=False,
            tol_rot_deg=0.0,
            tol_trans_mm=0.0,
            uncertainty=False,
            newton_steps=0,
            device=cfg.device,
        )
        reference = Registrar(volume, ref_cfg, renderer_cls=ReferenceRenderer)
        # not warmed up: its set-up is a negligible part of minutes per refinement
        result["reference_refine"] = refine_runs(
            reference, scene, views, inits[: cfg.reference_cases], landmarks, warm_up=False
        )
        result["refine_speedup"] = result["reference_refine"]["time_s"] / result["refine"]["time_s"]
    if "profile" in sections:
        log("where one refinement spends its time ...")
        if "refine" not in result:
            engine.refine(views, inits[0])  # warm: compile for these shapes first
        result["refine"] = {**result.get("refine", {}), "profile": refine_profile(engine, views, inits[0])}
    if "pipeline" in sections and cfg.cases:
        log(
            f"full registration (global stage, refinement, acceptance test) from {cfg.global_rot_deg:g} deg / "
            f"{cfg.global_trans_mm:g} mm ..."
        )
        result["pipeline"] = pipeline_runs(engine, scene, views, far_starts(volume, scene, cfg, cfg.cases), landmarks)
    if "tracking" in sections and cfg.tracking_cases:
        log(
            f"tracking updates: sets moved {cfg.tracking_rot_deg:g} deg / {cfg.tracking_trans_mm:g} mm from the "
            "held pose, tracking start ..."
        )
        sets = tracking_sets(volume, scene, cfg, cfg.tracking_cases)
        configs = {"tracking": cfg.pipeline}
        if cfg.tracking_compare:  # the same sets without the fast path (local refinement, acceptance test), in turn
            slow = dataclasses.replace(cfg.pipeline, tracking=dataclasses.replace(cfg.pipeline.tracking, enabled=False))
            configs["tracking_without_fast_path"] = slow
        # the held pose's registration (its views, from the pose): the curvature a tracking start carries
        held = engine.refine(views, scene.T_ref_from_ct).curvature if sets else None
        result.update(tracking_comparison(engine, scene.T_ref_from_ct, sets, landmarks, configs, curvature=held))
        if "tracking" in result and "profile" in sections:  # one fast refinement, part by part
            tracking = cfg.pipeline.tracking
            held_here = tracking.held_curvature_for(held, sets[0][1], scene.T_ref_from_ct, engine)
            fast = tracking.schedule(engine.config, held=held_here is not None)
            result["tracking"]["profile"] = refine_profile(
                engine, sets[0][1], scene.T_ref_from_ct, fast, curvature=held_here
            )
        if "tracking" in result and "tracking_without_fast_path" in result:
            result["tracking_speedup"] = result["tracking_without_fast_path"]["time_s"] / result["tracking"]["time_s"]
    result["coarse_ms_per_set"] = None
    if "coarse" in sections and cfg.model_path:
        from mvreg_ros.core.learning.coarse import CoarseModel

        model = CoarseModel.load(cfg.model_path, volume=volume, device=cfg.device)
        result["coarse_ms_per_set"] = 1000 * _timeit(lambda: model.predict(views), cfg.device, 20)
    result["peak_memory_mb"] = peak_memory_mb(cfg.device)  # the rest of the benchmark (the big CT has its own)
    if big_ct is not None:
        result["big_ct"] = big_ct
    if "train" in sections:
        log(f"training a coarse network for {cfg.train_minutes:g} minutes ...")
        result["train_curve"] = train_curve(volume, cfg, log)
    return result


def train_curve(volume: Volume, cfg: BenchConfig, log=print, *, base=None) -> dict:
    """Train a coarse network on ``volume`` for ``cfg.train_minutes`` (into a temporary folder,
    ``base`` or the defaults of ``TrainConfig``) and return its held-out error against training
    time: the training's validation sets (drawn over the whole default range with a seed the
    training never draws from; the network alone, no refinement) at each validation."""
    from mvreg_ros.core.learning.train_config import TrainConfig
    from mvreg_ros.core.learning.training import train

    # a validation every 6 M seconds (ten for M <= 20 min), at most every two minutes
    config = dataclasses.replace(
        base or TrainConfig(), minutes=cfg.train_minutes, seed=cfg.seed, val_every_s=min(120.0, 6.0 * cfg.train_minutes)
    )
    with tempfile.TemporaryDirectory() as d:
        r = train(volume, config, Path(d) / "bench_coarse.safetensors", device=cfg.device, progress=False, log=log)
    return {
        "minutes": cfg.train_minutes,
        "steps": r.steps,
        "views_rendered": r.views_rendered,
        "val_sets": config.val_sets,
        "points": [
            {
                "minutes": h["time_s"] / 60.0,
                "step": h["step"],
                "val_median_mtre_mm": h["median_mtre_mm"],
                "val_under_10mm": h["under_10mm"],
            }
            for h in r.history
        ],
    }
