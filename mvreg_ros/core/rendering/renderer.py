"""Differentiable DRRs: line integrals of attenuation along X-ray rays, views batched.

The engine's renderer samples the volume trilinearly at ``n_samples`` midpoints of each
ray's chord through the volume's box (so no sample is spent in air outside the box), all
views and all rays in one call. Backends, all computing the same integral:

- ``native`` (default on a CPU): a C++ kernel with hardware gathers that also returns the
  gradient sums in the forward pass (:mod:`mvreg_ros.core.rendering.native`);
- ``compiled`` (default on a GPU, and the CPU fallback): a ``torch.compile``-fused gather kernel
  (:func:`integrate_gather`);
- ``grid_sample`` (:func:`integrate`): plain PyTorch, the reference of the two above.

The ray set-up (:func:`ray_samples`, pointwise in the rays; :func:`make_rays` is its reference) is
compiled together with the ``native`` and ``compiled`` integrators. The ``native`` backend may hold
the volume as float16 (``Renderer(storage=torch.float16)``, the refinement's default: half the bytes
per read, float32 arithmetic). The reference path (:mod:`mvreg_ros.core.rendering.reference`)
integrates the same rays with DiffDRR's exact Siddon ray tracer; tests check that they agree in
values and gradients.

Pixel values are dimensionless line integrals ``sum(mu * length)`` (mu in 1/mm, length in
mm), i.e. what ``log(I0 / I)`` of a detector measures.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import re
import tempfile
import typing
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.geometry.transforms import invert
from mvreg_ros.core.imaging.volume import Volume
from mvreg_ros.core.rendering import gather, native, pose_chain


@typing.no_type_check  # traced by torch.compile (the jaxtyping/beartype wrapper of the tests breaks tracing)
@dataclasses.dataclass(frozen=True)
class Rays:
    """Rays in CT index space: ``p(t) = origin + t * direction`` with t in mm."""

    origin: Float[Tensor, "V 1 3"]
    direction: Float[Tensor, "V R 3"]  # index units per mm
    t_near: Float[Tensor, "V R"]
    t_far: Float[Tensor, "V R"]


def pixel_grid(height: int, width: int, *, dtype=torch.float32, device="cpu") -> Float[Tensor, "R 2"]:
    """(u, v) of every pixel centre, row-major (OpenCV: integers are centres)."""
    v, u = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device), torch.arange(width, dtype=dtype, device=device), indexing="ij"
    )
    return torch.stack([u.reshape(-1), v.reshape(-1)], -1)


@typing.no_type_check  # traced by torch.compile (the jaxtyping/beartype wrapper of the tests breaks tracing)
def make_rays(
    T_index_from_ct: Float[Tensor, "4 4"],
    shape_ijk: tuple[int, int, int],
    T_cam_from_ct: Float[Tensor, "V 4 4"],
    K: Float[Tensor, "V 3 3"],
    pixels: Float[Tensor, "V R 2"] | Float[Tensor, "R 2"],
) -> Rays:
    """Rays from each view's source through ``pixels`` (u, v), clipped to the volume box of
    ``shape_ijk`` voxels (ints, or ``torch.compile``'s symbolic sizes: see :func:`render_native`)."""
    dtype = T_cam_from_ct.dtype
    if pixels.ndim == 2:
        pixels = pixels.expand(len(K), -1, -1)
    # written as broadcast products rather than matmuls so that torch.compile fuses the set-up into one loop
    K_inv = _inverse_3x3(K.to(dtype))[:, None]  # (V, 1, 3, 3)
    u, v = pixels[..., :1].to(dtype), pixels[..., 1:].to(dtype)
    d_cam = u * K_inv[..., 0] + v * K_inv[..., 1] + K_inv[..., 2]  # K^-1 (u, v, 1): (V, R, 3), z = 1
    d_cam = d_cam / d_cam.norm(dim=-1, keepdim=True)
    T_index_from_cam = T_index_from_ct.to(dtype) @ invert(T_cam_from_ct)
    origin = T_index_from_cam[:, None, :3, 3]
    direction = (d_cam[..., None, :] * T_index_from_cam[:, None, :3, :3]).sum(-1)
    # clipped in unit coordinates, (index + 0.5) / size: the box is [0, 1] on every axis and the sizes enter as
    # scalars (as a tensor, or in the far faces' offsets, they made the compiled backward up to 3x slower)
    origin_u = torch.stack([(origin[..., k] + 0.5) / shape_ijk[k] for k in range(3)], -1)
    direction_u = torch.stack([direction[..., k] / shape_ijk[k] for k in range(3)], -1)
    safe = torch.where(direction_u.abs() < 1e-15, torch.full_like(direction_u, 1e-15), direction_u)
    t0 = -origin_u / safe
    t1 = (1 - origin_u) / safe
    t_near = torch.minimum(t0, t1).amax(-1).clamp_min(0)
    t_far = torch.maximum(t0, t1).amin(-1)
    t_far = torch.maximum(t_far, t_near)  # rays that miss the box get an empty chord
    return Rays(origin=origin, direction=direction, t_near=t_near, t_far=t_far)


@typing.no_type_check  # traced by torch.compile (the jaxtyping/beartype wrapper of the tests breaks tracing)
def _inverse_3x3(M: Float[Tensor, "V 3 3"]) -> Float[Tensor, "V 3 3"]:
    """Inverse by cross products of the columns (rows of the inverse), in pointwise operations."""
    c0, c1, c2 = M[..., 0], M[..., 1], M[..., 2]
    rows = torch.stack([torch.linalg.cross(c1, c2), torch.linalg.cross(c2, c0), torch.linalg.cross(c0, c1)], -2)
    return rows / (c0 * rows[..., 0, :]).sum(-1)[..., None, None]


def _sample_points(rays: Rays, n_samples: int, dtype) -> tuple[Tensor, Tensor]:
    """Midpoints of ``n_samples`` equal segments of each chord (index coordinates) and chord lengths (mm)."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    frac = (torch.arange(n_samples, dtype=dtype, device=rays.origin.device) + 0.5) / n_samples
    t_near, t_far = rays.t_near.to(dtype), rays.t_far.to(dtype)
    step = t_far - t_near  # chord length, mm
    t = t_near[..., None] + step[..., None] * frac  # (V, R, S)
    p = rays.origin.to(dtype)[..., None, :] + t[..., None] * rays.direction.to(dtype)[..., None, :]
    return p, step


def integrate(
    data: Float[Tensor, "*C D H W"], rays: Rays, n_samples: int, *, padding_mode: str = "border"
) -> Float[Tensor, "*C V R"]:
    """Midpoint rule with ``n_samples`` trilinear samples on each ray's chord through the box
    (``grid_sample``; the reference for :func:`integrate_gather`). ``data`` may carry a leading
    channel dimension, integrated channel by channel in the same pass."""
    dtype = data.dtype
    D, H, W = data.shape[-3:]
    p, step = _sample_points(rays, n_samples, dtype)
    # index -> grid_sample's normalised coordinates (align_corners=True: -1 and +1 are the end voxel centres)
    scale = torch.tensor(
        [2.0 / max(W - 1, 1), 2.0 / max(H - 1, 1), 2.0 / max(D - 1, 1)], dtype=dtype, device=data.device
    )
    grid = p * scale - 1
    # samples lie inside the box [-0.5, N - 0.5]: "border" gives the edge voxels their full half-width
    channels = data.reshape(1, -1, D, H, W)
    samples = F.grid_sample(channels, grid[None], mode="bilinear", padding_mode=padding_mode, align_corners=True)[0]
    out = samples.sum(-1) * step / n_samples  # (C, V, R)
    return out.reshape(*data.shape[:-3], *out.shape[1:])


def pad_volume(data: Float[Tensor, "D H W"]) -> Float[Tensor, "D2 H2 W2"]:
    """The volume with a one-voxel replicated border: the layout the gather backends read."""
    return F.pad(data[None], (1, 1, 1, 1, 1, 1), mode="replicate")[0].contiguous()


@typing.no_type_check  # traced by torch.compile (the jaxtyping/beartype wrapper of the tests breaks tracing)
def rays_to_samples(rays: Rays, n_samples: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each ray's first sample ``p0`` and sample step ``q`` (coordinates of the volume padded by one
    voxel, :func:`pad_volume`) and the sample spacing ``h`` (mm) of :func:`integrate`'s midpoint rule,
    ``h * sum_k f(p0 + k q)``, k = 0..n-1 (the reference of :func:`ray_samples`)."""
    h = (rays.t_far - rays.t_near) / max(n_samples, 1)  # sample_sums rejects n_samples < 1
    p0 = rays.origin + (rays.t_near + 0.5 * h)[..., None] * rays.direction + 1  # +1: the padding voxel
    return p0, h[..., None] * rays.direction, h


@typing.no_type_check  # traced by torch.compile (the jaxtyping/beartype wrapper of the tests breaks tracing)
def _integrate_sums(sample_sums, padded: Tensor, rays: Rays, n_samples: int) -> Tensor:
    """The midpoint rule of :func:`integrate` as ``h * sum_k f(p0 + k q)`` (:func:`rays_to_samples`)."""
    p0, q, h = rays_to_samples(rays, n_samples)
    f = sample_sums(padded, p0.to(padded.dtype), q.to(padded.dtype), n_samples)
    return f * h.to(f.dtype)


@typing.no_type_check  # traced by torch.compile (the jaxtyping/beartype wrapper of the tests breaks tracing)
def integrate_gather(padded: Float[Tensor, "D2 H2 W2"], rays: Rays, n_samples: int) -> Float[Tensor, "V R"]:
    """Same integral as :func:`integrate` for the volume padded by one replicated voxel, with the
    gather sums of :mod:`mvreg_ros.core.rendering.gather` (the ``compiled`` backend)."""
    return _integrate_sums(gather.sample_sums, padded, rays, n_samples)


@typing.no_type_check  # traced by torch.compile (the jaxtyping/beartype wrapper of the tests breaks tracing)
def integrate_native(padded: Float[Tensor, "D2 H2 W2"], rays: Rays, n_samples: int) -> Float[Tensor, "V R"]:
    """Same integral as :func:`integrate_gather` with the C++ kernel of
    :mod:`mvreg_ros.core.rendering.native` (the ``native`` backend; CPU, float32 arithmetic on a float32 or
    float16 volume)."""
    return _integrate_sums(native.sample_sums, padded, rays, n_samples)


@typing.no_type_check  # traced by torch.compile (the jaxtyping/beartype wrapper of the tests breaks tracing)
def _unpadded_ijk(padded: Tensor) -> tuple:
    """(i, j, k) sizes of the volume that ``padded`` (D+2, H+2, W+2) holds."""
    return (padded.shape[2] - 2, padded.shape[1] - 2, padded.shape[0] - 2)


def ray_transforms(
    T_index_from_ct: Float[Tensor, "4 4"], T_cam_from_ct: Float[Tensor, "V 4 4"], n_rays: int
) -> Float[Tensor, "V R 3 4"]:
    """``T_index_from_cam`` (its first three rows) of each view, repeated for each of its ``n_rays``
    rays (an expanded view, no copy): the input of the compiled set-up (:func:`ray_samples`). Done
    outside the compiled graph, so that the backward's sum over the rays is ATen's (parallel and
    vectorised) rather than a reduction inside the compiled kernel (which ``torch.compile`` ran on one
    thread for a handful of views: the set-up's backward took longer than the renderer's gathers)."""
    return index_from_cam(T_index_from_ct, T_cam_from_ct)[:, None].expand(-1, n_rays, -1, -1)


def index_from_cam(
    T_index_from_ct: Float[Tensor, "4 4"], T_cam_from_ct: Float[Tensor, "V 4 4"]
) -> Float[Tensor, "V 3 4"]:
    """``T_index_from_cam`` of each view, its first three rows (what the ray set-up reads): in the native
    extension on a CPU in float64 (:mod:`pose_chain`; one call forward and one backward), else
    :func:`index_from_cam_reference`."""
    A = T_index_from_ct.to(T_cam_from_ct.dtype)
    out = pose_chain.index_from_cam(A, T_cam_from_ct)
    return index_from_cam_reference(A, T_cam_from_ct) if out is None else out


def index_from_cam_reference(
    T_index_from_ct: Float[Tensor, "4 4"], T_cam_from_ct: Float[Tensor, "V 4 4"]
) -> Float[Tensor, "V 3 4"]:
    """:func:`index_from_cam` as ATen operations (autograd through them): the reference, and the GPU's path."""
    return (T_index_from_ct.to(T_cam_from_ct.dtype) @ invert(T_cam_from_ct))[:, :3, :]


def ray_directions(
    K: Float[Tensor, "V 3 3"], pixels: Float[Tensor, "V R 2"] | Float[Tensor, "R 2"]
) -> Float[Tensor, "3 V R"]:
    """Unit direction of each pixel's ray in camera axes, ``K^-1 (u, v, 1)`` normalised, one
    coordinate after the other (as :func:`make_rays`; independent of the pose, so the
    :class:`Renderer` keeps them while the views stay the same)."""
    dtype = K.dtype
    if pixels.ndim == 2:
        pixels = pixels.expand(len(K), -1, -1)
    K_inv = _inverse_3x3(K)
    u, v = pixels[..., 0].to(dtype), pixels[..., 1].to(dtype)  # (V, R)
    d = torch.stack([u * K_inv[:, c, 0, None] + v * K_inv[:, c, 1, None] + K_inv[:, c, 2, None] for c in range(3)])
    return (d / torch.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])).contiguous()


@typing.no_type_check  # traced by torch.compile (the jaxtyping/beartype wrapper of the tests breaks tracing)
def ray_samples(
    T_rays: Float[Tensor, "V R 3 4"], d_cam: Float[Tensor, "3 V R"], shape_ijk: tuple[int, int, int], n_samples: int
) -> tuple[Float[Tensor, "V R 3"], Float[Tensor, "V R 3"], Float[Tensor, "V R"]]:
    """What the gather integrators need of :func:`make_rays`' rays: each ray's first sample ``p0``
    and sample step ``q`` (coordinates of the volume padded by one voxel, :func:`pad_volume`) and the
    sample spacing ``h`` (mm), so that ``h * sum_k f(p0 + k q)`` is :func:`integrate`'s midpoint rule.
    ``T_rays``: ``T_index_from_cam`` for each ray (:func:`ray_transforms`); ``d_cam``: the rays'
    directions (:func:`ray_directions`). The same arithmetic as :func:`make_rays` followed by
    :func:`rays_to_samples` (the reference path; tests check that they agree in values and
    gradients), written one coordinate at a time and pointwise in the rays: ``torch.compile`` then
    runs it and its backward as flat, vectorised loops over all rays, where the ``(V, R, 3)`` layout's
    innermost axis of 3 and the sums over rays made its kernels slower than the gathers (README *Speed*)."""
    d = d_cam.to(T_rays.dtype)
    origin = [T_rays[..., c, 3] for c in range(3)]  # (V, R)
    direction = [d[0] * T_rays[..., c, 0] + d[1] * T_rays[..., c, 1] + d[2] * T_rays[..., c, 2] for c in range(3)]
    near, far = [], []
    for k in range(3):  # the box [0, 1] in unit coordinates (index + 0.5) / size, as make_rays
        origin_u = (origin[k] + 0.5) / shape_ijk[k]
        direction_u = direction[k] / shape_ijk[k]
        safe = torch.where(direction_u.abs() < 1e-15, torch.full_like(direction_u, 1e-15), direction_u)
        t0, t1 = -origin_u / safe, (1 - origin_u) / safe
        near.append(torch.minimum(t0, t1))
        far.append(torch.maximum(t0, t1))
    t_near = torch.maximum(torch.maximum(near[0], near[1]), near[2]).clamp_min(0)
    t_far = torch.minimum(torch.minimum(far[0], far[1]), far[2])
    t_far = torch.maximum(t_far, t_near)  # rays that miss the box get an empty chord
    h = (t_far - t_near) / max(n_samples, 1)
    t_first = t_near + 0.5 * h
    # planar (..., 3): each coordinate of all rays in turn, as computed (and as the native kernel returns its
    # gradient sums), so the compiled kernels never interleave coordinates
    p0 = torch.stack([origin[c] + t_first * direction[c] + 1 for c in range(3)], 0).movedim(0, -1)  # +1: padding
    q = torch.stack([h * direction[c] for c in range(3)], 0).movedim(0, -1)
    return p0, q, h


@typing.no_type_check  # traced by torch.compile (the jaxtyping/beartype wrapper of the tests breaks tracing)
def _render_sums(sample_sums, T_rays: Tensor, d_cam: Tensor, padded: Tensor, n_samples: int) -> Tensor:
    p0, q, h = ray_samples(T_rays, d_cam, _unpadded_ijk(padded), n_samples)
    dtype = torch.float32 if padded.dtype == torch.float16 else padded.dtype  # a float16 volume: float32 arithmetic
    f = sample_sums(padded, p0.to(dtype), q.to(dtype), n_samples)
    return f * h.to(f.dtype)


@typing.no_type_check  # traced by torch.compile (the jaxtyping/beartype wrapper of the tests breaks tracing)
def render_native(T_rays: Tensor, d_cam: Tensor, padded: Tensor, n_samples: int) -> Tensor:
    """Ray set-up (:func:`ray_samples`) and the native integrator in one function, so ``torch.compile`` fuses the
    set-up. The volume's size is read from ``padded`` (:func:`pad_volume`), whose sizes the :class:`Renderer` marks
    dynamic."""
    return _render_sums(native.sample_sums, T_rays, d_cam, padded, n_samples)


@typing.no_type_check  # traced by torch.compile (the jaxtyping/beartype wrapper of the tests breaks tracing)
def render_gather(T_rays: Tensor, d_cam: Tensor, padded: Tensor, n_samples: int) -> Tensor:
    """Ray set-up (:func:`ray_samples`) and gather integration in one function, so ``torch.compile`` fuses both. The
    volume's size is read from ``padded`` (:func:`pad_volume`), whose sizes the :class:`Renderer` marks dynamic."""
    return _render_sums(gather.sample_sums, T_rays, d_cam, padded, n_samples)


_COMPILED = {}
RECOMPILE_LIMIT = 64  # compiled shape variants per backend (image size x views x samples)


def _torch_default_cache_dir() -> str:
    """torch's own default for ``TORCHINDUCTOR_CACHE_DIR`` (``torch._inductor.runtime.cache_dir_utils``,
    written out here: importing it imports Dynamo, whose import sets the variable to that default)."""
    try:
        user = getpass.getuser()
    except (KeyError, ModuleNotFoundError, OSError):
        user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
    return os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))


def compile_cache_dir() -> Path:
    """Where torch keeps the compiled kernels between processes: ``TORCHINDUCTOR_CACHE_DIR`` when
    set to a folder of the user's, else ``$XDG_CACHE_HOME/mvreg_ros/torchinductor`` (``~/.cache``
    by default), set here before the first compile. torch's own default lies under the temporary
    directory, which a reboot of the robot computer empties: every first registration would then
    compile again (about 25 s on 2 CPU cores; ``mvreg precompile``). Importing Dynamo sets the
    variable to torch's default, so that value counts as unset. Where the folder cannot be made,
    torch's default stays."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    default = _torch_default_cache_dir()
    if current and os.path.abspath(current) != os.path.abspath(default):
        return Path(current)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "mvreg_ros" / "torchinductor"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return Path(current or default)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def compile_cache_counts() -> tuple[int, int]:
    """Kernel graphs this process has compiled so far, and loaded from the compile cache instead
    (Inductor's FX graph cache misses and hits)."""
    compile_cache_dir()  # before Dynamo's import (which sets torch's default)
    c = torch._dynamo.utils.counters["inductor"]
    return int(c["fxgraph_cache_miss"]), int(c["fxgraph_cache_hit"])


def _compiled_render(backend: str):
    """The backend's render function under ``torch.compile`` with static shapes (the fastest
    kernels; a new sample count compiles once more) except the volume's sizes, the view count and
    the ray count, which the kernels take as sizes (:func:`mark_batch_dynamic`: a new CT or image
    size compiles nothing), kept between processes in :func:`compile_cache_dir`.
    Dynamo's default recompile limit (8 per function) is below the variants one long-running
    process meets (pyramid levels, view counts, overlay and scorer renderers); past it Dynamo
    would run the function uncompiled, so the process-wide limit is raised to at least
    ``RECOMPILE_LIMIT`` (a per-call ``config.patch`` would cost about 40 us per render)."""
    if backend not in _COMPILED:
        compile_cache_dir()
        if torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
            torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
        _COMPILED[backend] = torch.compile(render_native if backend == "native" else render_gather, dynamic=False)
    return _COMPILED[backend]


def mark_batch_dynamic(T_rays: Float[Tensor, "V R 3 4"], d_cam: Float[Tensor, "3 V R"]) -> None:
    """Let the compiled kernels take the view count and the ray count as sizes too, like the
    volume's: one compiled variant then serves every image size and view count (the pyramid's
    levels, the global stage's and the curvature's batches, another detector), so a process
    compiles far fewer variants (measured on an empty compile cache: the first full registration
    28.4 s against 33.8 s; the big CT's warm-up in ``mvreg bench --only big_ct`` less), and the
    kernels run as fast (2-view refinement 0.74 against 0.77 s). A size of 1 (one view, one ray)
    stays static: Dynamo specialises it anyway."""
    for t, dim in ((T_rays, 0), (T_rays, 1), (d_cam, 1), (d_cam, 2)):
        if t.shape[dim] > 1:
            torch._dynamo.mark_dynamic(t, dim)


BACKENDS = ("auto", "native", "compiled", "grid_sample")


def resolve_backend(backend: str, device, dtype) -> str:
    """``auto`` is the native kernel on a CPU (float32, when it builds), else the compiled kernel;
    ``native`` falls back to ``compiled`` where it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("auto", "native"):
        cpu = torch.device(device).type == "cpu"
        return "native" if cpu and dtype == torch.float32 and native.load() is not None else "compiled"
    return backend


KEPT_DIRECTIONS = 4  # ray direction sets a Renderer keeps (Renderer._directions)
VOLUME_LAYOUTS = ("auto", "plain", "bricked")  # Renderer's layout
BRICKED_MIN_BYTES = 32 * 2**20  # "auto" bricks a float16 volume larger than this (a server CPU's last-level cache;
# measured on a 32 MB L3: the unpooled shipped CT, 71 MB, 16 against 10 ms per 2-view render at 128 px; the CT
# pooled by 8, 0.3 MB, 3.0 against 3.4 ms)


class Renderer:
    """Fast DRR renderer for one volume. Build once; render many poses and views."""

    def __init__(
        self,
        volume: Volume,
        *,
        n_samples: int = 128,
        device=None,
        dtype=torch.float32,
        backend: str = "auto",
        storage: torch.dtype | None = None,
        layout: str = "auto",
    ):
        """``storage``: the dtype in which the ``native`` backend reads the volume (``torch.float16``:
        half the bytes per read, the values rounded to float16 once, float32 arithmetic; None or another
        backend: ``dtype``). ``layout``: how the ``native`` backend holds a float16 volume: ``"bricked"``
        (:class:`native.Bricked`: a trilinear sample's corners in half the cache lines, the same values),
        ``"plain"``, or ``"auto"``: bricked when the volume is larger than :data:`BRICKED_MIN_BYTES` (one
        that fits the caches renders a little faster plain) and fits the bricks (:func:`native.fits_bricks`)."""
        device = volume.data.device if device is None else torch.device(device)
        self.backend = resolve_backend(backend, device, dtype)
        if storage not in (None, dtype, torch.float16):
            raise ValueError(f"storage must be None, {dtype} or torch.float16, got {storage!r}")
        if layout not in VOLUME_LAYOUTS:
            raise ValueError(f"layout must be one of {VOLUME_LAYOUTS}, got {layout!r}")
        self.volume = volume
        self.data = volume.data.to(device=device, dtype=dtype).contiguous()
        self.padded = pad_volume(self.data) if self.backend != "grid_sample" else None
        self.storage = storage if self.backend == "native" and storage is not None else dtype
        if self.padded is not None and self.storage != dtype:
            self.padded = self.padded.to(self.storage)
        if layout == "bricked" and not (self.backend == "native" and self.storage == torch.float16):
            raise ValueError(
                f"layout 'bricked' needs the native backend and float16 storage, got {self.backend!r} and {self.storage}"
            )
        if layout == "bricked" or (
            layout == "auto"
            and self.backend == "native"
            and self.storage == torch.float16
            and self.padded.nbytes > BRICKED_MIN_BYTES
            and native.fits_bricks(tuple(self.padded.shape))
        ):
            self.padded = native.bricked(self.padded)
        # the compiled kernels serve volumes of every size: a new CT compiles nothing
        if isinstance(self.padded, Tensor):
            compile_cache_dir()  # before Dynamo's import (which sets torch's default)
            torch._dynamo.mark_dynamic(self.padded, (0, 1, 2))
        self._compiled_ok = False
        self._grid_directions: list[tuple[Tensor, tuple[int, int], Tensor]] = []  # (K, image size, the whole
        # image's directions), newest first: what RaySubsets' directions are gathered from
        self._kept_directions: list[tuple[Tensor, Tensor, int, Tensor]] = []  # (K, pixels, their version,
        # directions), newest first
        self._grid: tuple[int, int, Tensor] | None = None  # the last full image's pixel grid
        self.prefetch = True  # the native kernel's prefetch in a bricked volume (False: A/B timings; the same values)
        self.T_index_from_ct = torch.linalg.inv(volume.T_ct_from_index.to(device=device, dtype=torch.float64))
        self.shape_ijk = volume.shape_ijk
        self.n_samples = int(n_samples)
        self.device = device

    @typing.no_type_check  # validates its own inputs (tests check its errors); no jaxtyping/beartype wrapper
    def __call__(
        self,
        T_cam_from_ct: Float[Tensor, "V 4 4"],
        K: Float[Tensor, "V 3 3"],
        height: int,
        width: int,
        *,
        pixels: Tensor | None = None,
        n_samples: int | None = None,
        poses: int = 1,
        ray_index: Tensor | None = None,
    ) -> Tensor:
        """DRRs ``(V, height, width)``, or ``(V, R)`` for explicit ``pixels`` (u, v). ``poses``: the V
        renders are (poses, V / poses) flattened, from poses close together; the native backend then
        reads the volume once for all of them (:func:`native.render_rays`; the same values). ``ray_index``
        (with ``pixels`` of shape ``(V, R, 2)``): their indices in the full ``height x width`` image,
        ascending in each render (:class:`~mvreg_ros.core.rendering.subset.RaySubset`); the native backend's
        gradient is then the full image's bit for bit where the pixels left out have none. With ``ray_index``
        the pixels are taken to be a RaySubset's, never changed in place (kept and recognised by identity)."""
        T, K, pixels, n, full = self._inputs(T_cam_from_ct, K, height, width, pixels, n_samples, poses, ray_index)
        if self.backend == "native":
            out = self._render_native(T, K, pixels, n, poses, ray_index, (height, width))
        else:
            out = self._render_compiled(T, K, pixels, n, ray_index) if self.backend != "grid_sample" else None
        if out is None:
            out = integrate(self.data, make_rays(self.T_index_from_ct, self.shape_ijk, T, K, pixels), n)
        return out.reshape(len(T), height, width) if full else out

    @typing.no_type_check  # validates its own inputs, as __call__
    def render_vjp(
        self,
        T_cam_from_ct: Float[Tensor, "V 4 4"],
        K: Float[Tensor, "V 3 3"],
        height: int,
        width: int,
        *,
        pixels: Tensor | None = None,
        n_samples: int | None = None,
        poses: int = 1,
        ray_index: Tensor | None = None,
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]] | None:
        """:meth:`__call__`'s renders and their pullback (the gradient of the renders to that of
        ``T_cam_from_ct``) without autograd, with the native backend on a CPU in float64: the same
        kernel calls as ``__call__``'s forward and backward, the same values bit for bit (a test checks).
        None where that path does not apply (another backend, another device or dtype): then ``__call__``
        under autograd is the way."""
        T, K, pixels, n, full = self._inputs(T_cam_from_ct, K, height, width, pixels, n_samples, poses, ray_index)
        if self.backend != "native":
            return None
        chain = pose_chain.index_from_cam_vjp(self.T_index_from_ct.to(T.dtype), T)
        if chain is None:
            return None
        T_index_from_cam, chain_pullback = chain
        d_cam = self._native_directions(K, pixels, ray_index, (height, width))
        out, render_pullback = native.render_rays_vjp(
            T_index_from_cam,
            d_cam,
            self.padded,
            n,
            poses=poses,
            ray_index=ray_index,
            image_pixels=height * width,
            prefetch=self.prefetch,
        )
        if full:
            return out.reshape(len(T), height, width), lambda grad: chain_pullback(
                render_pullback(grad.reshape(out.shape))
            )
        return out, lambda grad: chain_pullback(render_pullback(grad))

    def _inputs(self, T_cam_from_ct, K, height, width, pixels, n_samples, poses, ray_index):
        """:meth:`__call__`'s inputs checked and on the renderer's device: ``(T, K, pixels, n_samples, full)``."""
        if T_cam_from_ct.ndim != 3 or T_cam_from_ct.shape[-2:] != (4, 4):
            raise ValueError(f"T_cam_from_ct must be (V, 4, 4), got {tuple(T_cam_from_ct.shape)}")
        if K.shape != (len(T_cam_from_ct), 3, 3):
            raise ValueError(f"K must be ({len(T_cam_from_ct)}, 3, 3), got {tuple(K.shape)}")
        T = T_cam_from_ct.to(self.device, torch.float64)
        full = pixels is None
        if full:
            pixels = self._pixel_grid(height, width)
        K = K.to(self.device, torch.float64)
        pixels = pixels.to(self.device)
        n = self.n_samples if n_samples is None else n_samples
        if n < 1:
            raise ValueError(f"n_samples must be >= 1, got {n}")
        if isinstance(poses, bool) or not isinstance(poses, int) or poses < 1 or len(T) % poses:
            raise ValueError(f"poses must be an int >= 1 that divides the {len(T)} renders, got {poses!r}")
        if ray_index is not None and (full or pixels.shape[:-1] != ray_index.shape or len(ray_index) != len(T)):
            raise ValueError(
                f"ray_index needs pixels (V, R, 2) of its shape (V = {len(T)} renders), got ray_index "
                f"{tuple(ray_index.shape)} and pixels {None if full else tuple(pixels.shape)}"
            )
        return T, K, pixels, n, full

    def _pixel_grid(self, height: int, width: int) -> Tensor:
        """:func:`pixel_grid` of a full image (float64), kept while the image size stays the same (the
        same tensor each time, so :meth:`_directions` recognises it without comparing its values)."""
        if self._grid is None or self._grid[:2] != (height, width):
            self._grid = (height, width, pixel_grid(height, width, dtype=torch.float64, device=self.device))
        return self._grid[2]

    def _frozen(self, pixels: Tensor, ray_index: Tensor | None) -> bool:
        """Whether ``pixels`` are never changed in place: the kept grid of a full image, or a RaySubset's
        (``ray_index`` given)."""
        return ray_index is not None or (self._grid is not None and pixels is self._grid[2])

    def _subset_directions(self, K: Tensor, pixels: Tensor, index: Tensor, height: int, width: int) -> Tensor | None:
        """:func:`ray_directions` of ``pixels``, the pixels ``index`` of a ``height x width`` image (a
        RaySubset's; the padding index ``height * width``: the last pixel), gathered from those of the whole
        image, which are kept while the intrinsics and the image size stay the same (the same values: the
        function is computed pixel by pixel; a tracking update's new subsets compute none). None when
        ``pixels`` are not those pixels."""
        HW = height * width
        index = index.clamp_max(HW - 1)
        if not torch.equal(pixels, self._pixel_grid(height, width)[index]):
            return None
        full = None
        for i, (K_kept, size, d) in enumerate(self._grid_directions):
            if size == (height, width) and K_kept.shape == K.shape and torch.equal(K_kept, K):
                full = d
                if i:
                    self._grid_directions.insert(0, self._grid_directions.pop(i))
                break
        if full is None:
            full = ray_directions(K, self._pixel_grid(height, width))
            self._grid_directions.insert(0, (K.clone(), (height, width), full))
            del self._grid_directions[KEPT_DIRECTIONS:]
        return torch.gather(full, 2, index[None].expand(3, -1, -1))

    def _directions(
        self, K: Tensor, pixels: Tensor, *, frozen: bool = False, subset: tuple[Tensor, int, int] | None = None
    ) -> Tensor:
        """:func:`ray_directions`, kept while the intrinsics and pixels stay the same (a refinement
        renders the same views at every iteration; the last ``KEPT_DIRECTIONS`` sets are kept, as a
        refinement's level, its curvature's 13 poses and the acceptance test's probes take turns).
        ``frozen``: ``pixels`` are never changed in place (the kept grid, a :class:`RaySubset`'s), so they
        are recognised by identity (and their version counter: one changed in place after all is not),
        without comparing their values; other pixels are kept as a copy. ``subset``: ``(ray_index, height,
        width)`` of a RaySubset's pixels (:meth:`_subset_directions`)."""
        for i, (K_kept, px_kept, version, d) in enumerate(self._kept_directions):
            if (
                K_kept.shape == K.shape
                and px_kept.shape == pixels.shape
                and (
                    (px_kept is pixels and version == pixels._version) or (not frozen and torch.equal(px_kept, pixels))
                )
                and torch.equal(K_kept, K)
            ):
                if i:
                    self._kept_directions.insert(0, self._kept_directions.pop(i))
                return d
        d = None if subset is None else self._subset_directions(K, pixels, *subset)
        d = ray_directions(K, pixels) if d is None else d
        kept = pixels if frozen else pixels.clone()
        self._kept_directions.insert(0, (K.clone(), kept, kept._version, d))
        del self._kept_directions[KEPT_DIRECTIONS:]
        return d

    def _render_native(
        self,
        T: Tensor,
        K: Tensor,
        pixels: Tensor,
        n_samples: int,
        poses: int = 1,
        ray_index: Tensor | None = None,
        size: tuple[int, int] = (0, 0),
    ) -> Tensor:
        """The native backend: the ray set-up and the sums in C++ (:func:`native.render_rays`; nothing to
        compile), with the same arithmetic as the compiled :func:`render_native` (its reference)."""
        d_cam = self._native_directions(K, pixels, ray_index, size)
        T_index_from_cam = index_from_cam(self.T_index_from_ct, T)
        return native.render_rays(
            T_index_from_cam,
            d_cam,
            self.padded,
            n_samples,
            poses=poses,
            ray_index=ray_index,
            image_pixels=size[0] * size[1],
            prefetch=self.prefetch,
        )

    def _native_directions(self, K: Tensor, pixels: Tensor, ray_index: Tensor | None, size: tuple[int, int]) -> Tensor:
        """The native backend's ray directions of ``pixels`` (kept, or gathered from the whole image's for a
        RaySubset's ``ray_index`` in an image of ``size``)."""
        subset = None if ray_index is None else (ray_index, *size)
        return self._directions(K, pixels, frozen=self._frozen(pixels, ray_index), subset=subset)

    def _render_compiled(
        self, T: Tensor, K: Tensor, pixels: Tensor, n_samples: int, ray_index: Tensor | None = None
    ) -> Tensor | None:
        """The fused compiled path; None once it has failed to compile (then grid_sample is used)."""
        T_rays = ray_transforms(self.T_index_from_ct, T, pixels.shape[-2])
        d_cam = self._directions(K, pixels, frozen=self._frozen(pixels, ray_index))
        mark_batch_dynamic(T_rays, d_cam)
        args = (T_rays, d_cam, self.padded, n_samples)
        if self._compiled_ok:
            return _compiled_render(self.backend)(*args)
        try:  # the first call compiles: only a failure there (no C++ compiler, no Triton) falls back
            out = _compiled_render(self.backend)(*args)
            self._compiled_ok = True
            return out
        except Exception as e:
            warnings.warn(
                f"torch.compile of the {self.backend} renderer failed ({type(e).__name__}: {e}); using grid_sample",
                RuntimeWarning,
                stacklevel=3,
            )
            self.backend, self.padded, self.storage = "grid_sample", None, self.data.dtype
            return None
