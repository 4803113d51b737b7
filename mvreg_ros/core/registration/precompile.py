"""The renderer's compiled kernels, ahead of the first registration (plain PyTorch, no rclpy).

The renderer's kernels take the volume's sizes, the view count and the ray count as sizes
(``renderer.mark_batch_dynamic``), so the variants a registration needs depend only on the
settings (sample counts, gradient on or off, one view or several), not on the CT. A
process that has never compiled them spends about 25 s on its first registration on 2 CPU
cores (Dynamo, Inductor and the C++ compiler). :func:`precompile` pays that once, on a small
phantom CT, and torch keeps the result in its compile cache on disk (:func:`compile_cache_dir`),
so a later process loads the kernels of any CT instead of compiling them: the set-up runs it
(``mvreg precompile``), the node's configure and the first registration of a new CT then only
trace and load.

:func:`exercise` is what a real view set runs (the global stage, the refinement at every
pyramid level, the Newton polish, the acceptance test's single-view probes, the overlay); the
node's warm-up runs it on synthetic views of the loaded CT, :func:`precompile` on the phantom.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from collections.abc import Sequence

import torch

from mvreg_ros.core.data.simulate import DetectorConfig, make_scene
from mvreg_ros.core.imaging.overlay import fusion_rgb
from mvreg_ros.core.imaging.views import ViewSet
from mvreg_ros.core.imaging.volume import Volume
from mvreg_ros.core.registration.acceptance import view_agreement
from mvreg_ros.core.registration.initialisers import Start
from mvreg_ros.core.registration.pipeline import Outcome, PipelineConfig, RegistrationPipeline
from mvreg_ros.core.registration.refine import RefineConfig, Registrar
from mvreg_ros.core.rendering.renderer import Renderer, compile_cache_counts, compile_cache_dir

PHANTOM_SHAPE_IJK = (23, 19, 29)  # distinct sizes: a compiled kernel must not assume two equal sides
PHANTOM_SPACING_MM = 8.0


def phantom_volume() -> Volume:
    """A small synthetic CT (attenuation per mm): an elliptic body of soft tissue with a spine-like
    cylinder and a ball of bone off its axis, so a registration on it has one clear optimum."""
    W, H, D = PHANTOM_SHAPE_IJK
    s = PHANTOM_SPACING_MM
    k, j, i = torch.meshgrid(torch.arange(D), torch.arange(H), torch.arange(W), indexing="ij")
    x, y, z = (i - (W - 1) / 2) * s, (j - (H - 1) / 2) * s, (k - (D - 1) / 2) * s
    body = ((x / 80) ** 2 + (y / 60) ** 2 <= 1).float() * 0.02
    spine = (((x - 10) / 20) ** 2 + ((y + 15) / 20) ** 2 <= 1).float() * 0.03
    ball = ((x + 30) ** 2 + (y - 10) ** 2 + (z - 20) ** 2 <= 25**2).float() * 0.03
    T_ct_from_index = torch.diag(torch.tensor([s, s, s, 1.0], dtype=torch.float64))
    return Volume(data=body + spine + ball, T_ct_from_index=T_ct_from_index)


def exercise(
    registrar: Registrar,
    views: ViewSet,
    starts: Sequence[Start],
    config: PipelineConfig,
    *,
    overlay: bool = False,
) -> tuple[Outcome | None, dict[str, float]]:
    """Register ``views`` from each start as a real set would be (global stage, refinement,
    acceptance test), run the per-view agreement too when the acceptance test stopped before
    it (two or more views), and the overlay when asked. Nothing is kept: no tracker. Returns the
    last outcome and the seconds of each part."""
    parts: dict[str, float] = {}
    pipeline = RegistrationPipeline(registrar, initialisers=[], config=config, tracker=None)
    t = time.perf_counter()
    outcome = None
    for start in starts:
        outcome = pipeline.register_from(views, start)
    parts["registration"] = time.perf_counter() - t
    result = outcome.result if outcome is not None else None
    agreed = outcome is not None and outcome.verdict is not None and bool(outcome.verdict.view_shift_mm)
    if config.acceptance.view_agreement and len(views) >= 2 and result is not None and not agreed:
        t = time.perf_counter()
        T = result.T_ref_from_ct if torch.isfinite(result.T_ref_from_ct).all() else starts[-1].T_ref_from_ct
        view_agreement(
            registrar,
            views,
            T,
            iterations=config.acceptance.agreement_iterations,
            step_scale=config.acceptance.agreement_step_scale,
        )
        parts["agreement"] = time.perf_counter() - t
    if overlay and result is not None:
        t = time.perf_counter()
        fusion_rgb(registrar, views, result.T_ref_from_ct)
        parts["overlay"] = time.perf_counter() - t
    return outcome, parts


@dataclasses.dataclass(frozen=True)
class PrecompileReport:
    time_s: float
    cache_dir: str  # where torch keeps the compiled kernels
    compiled: int  # kernel graphs compiled by this run (0: all were in the cache already)
    loaded: int  # ... loaded from the cache
    parts: dict  # part -> seconds

    def summary(self) -> str:
        return (
            f"renderer kernels ready in {self.time_s:.1f} s: {self.compiled} graph(s) compiled, "
            f"{self.loaded} loaded from the cache {self.cache_dir}"
        )


@typing.no_type_check  # validates its own inputs (tests check its errors); no jaxtyping/beartype wrapper
def precompile(
    config: PipelineConfig = PipelineConfig(),
    *,
    refine: RefineConfig = RefineConfig(),
    views: int = 2,
    overlay: bool = True,
    size: int = 96,
) -> PrecompileReport:
    """Compile (or load) every renderer kernel a registration with ``refine`` and ``config`` uses,
    by running :func:`exercise` on :func:`phantom_volume` with ``views`` synthetic views of
    ``size`` px (one view or several is what matters: every view count above one and every image
    size share the same kernels)."""
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ValueError(f"views must be an int >= 1, got {views!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    t0 = time.perf_counter()
    misses0, hits0 = compile_cache_counts()
    # the target's footprint is rendered by grid_sample (nothing to compile) and the phantom has no labels
    registrar = Registrar(phantom_volume(), dataclasses.replace(refine, target_labels=()))
    angles = [(180.0 * i / max(views, 2), 0.0) for i in range(views)]
    # the default detector's field of view (about 300 mm at 1020 mm) at ``size`` px
    full = DetectorConfig()
    detector = DetectorConfig(height=size, width=size, pixel_mm=full.pixel_mm * full.width / size)
    scene = make_scene(registrar.centre_ct, angles, detector=detector)
    views_set = scene.views(
        Renderer(registrar.volume, backend="grid_sample"), generator=torch.Generator().manual_seed(0)
    )
    start = Start(T_ref_from_ct=scene.T_ref_from_ct.clone(), source="precompile")
    _, parts = exercise(registrar, views_set, [start], config, overlay=overlay)
    misses, hits = compile_cache_counts()
    return PrecompileReport(
        time_s=time.perf_counter() - t0,
        cache_dir=str(compile_cache_dir()),
        compiled=misses - misses0,
        loaded=hits - hits0,
        parts=parts,
    )
