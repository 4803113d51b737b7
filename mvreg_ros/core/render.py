"""Differentiable DRRs: line integrals of attenuation along X-ray rays, views batched.

The engine's renderer samples the volume trilinearly at ``n_samples`` midpoints of each
ray's chord through the volume's box (so no sample is spent in air outside the box), all
views and all rays in one call: by default a ``torch.compile``-fused gather kernel
(:func:`integrate_gather`), with ``grid_sample`` (:func:`integrate`) as its reference. The reference path
(:mod:`mvreg_ros.core.render_reference`) integrates the same rays with DiffDRR's exact
Siddon ray tracer; tests check that they agree in values and gradients.

Pixel values are dimensionless line integrals ``sum(mu * length)`` (mu in 1/mm, length in
mm), i.e. what ``log(I0 / I)`` of a detector measures.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from .geometry import invert
from .volume import Volume


@dataclasses.dataclass(frozen=True)
class Rays:
    """Rays in CT index space: ``p(t) = origin + t * direction`` with t in mm."""

    origin: Float[Tensor, "V 1 3"]
    direction: Float[Tensor, "V R 3"]  # index units per mm
    t_near: Float[Tensor, "V R"]
    t_far: Float[Tensor, "V R"]


def pixel_grid(height: int, width: int, *, dtype=torch.float32, device="cpu") -> Float[Tensor, "R 2"]:
    """(u, v) of every pixel centre, row-major (OpenCV: integers are centres)."""
    v, u = torch.meshgrid(torch.arange(height, dtype=dtype, device=device),
                          torch.arange(width, dtype=dtype, device=device), indexing="ij")
    return torch.stack([u.reshape(-1), v.reshape(-1)], -1)


def make_rays(
    T_index_from_ct: Float[Tensor, "4 4"], shape_ijk: tuple[int, int, int], T_cam_from_ct: Float[Tensor, "V 4 4"],
    K: Float[Tensor, "V 3 3"], pixels: Float[Tensor, "V R 2"] | Float[Tensor, "R 2"],
) -> Rays:
    """Rays from each view's source through ``pixels`` (u, v), clipped to the volume box."""
    dtype = T_cam_from_ct.dtype
    if pixels.ndim == 2:
        pixels = pixels.expand(len(K), -1, -1)
    uv1 = torch.cat([pixels.to(dtype), torch.ones_like(pixels[..., :1], dtype=dtype)], -1)
    d_cam = uv1 @ torch.linalg.inv(K.to(dtype)).transpose(-1, -2)  # (V, R, 3), z = 1
    d_cam = d_cam / d_cam.norm(dim=-1, keepdim=True)
    T_index_from_cam = T_index_from_ct.to(dtype) @ invert(T_cam_from_ct)
    origin = T_index_from_cam[:, None, :3, 3]
    direction = d_cam @ T_index_from_cam[:, :3, :3].transpose(-1, -2)
    lo = torch.full((3,), -0.5, dtype=dtype, device=origin.device)
    hi = torch.tensor(shape_ijk, dtype=dtype, device=origin.device) - 0.5
    safe = torch.where(direction.abs() < 1e-12, torch.full_like(direction, 1e-12), direction)
    t0 = (lo - origin) / safe
    t1 = (hi - origin) / safe
    t_near = torch.minimum(t0, t1).amax(-1).clamp_min(0)
    t_far = torch.maximum(t0, t1).amin(-1)
    t_far = torch.maximum(t_far, t_near)  # rays that miss the box get an empty chord
    return Rays(origin=origin, direction=direction, t_near=t_near, t_far=t_far)


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


def integrate(data: Float[Tensor, "*C D H W"], rays: Rays, n_samples: int, *,
              padding_mode: str = "border") -> Float[Tensor, "*C V R"]:
    """Midpoint rule with ``n_samples`` trilinear samples on each ray's chord through the box
    (``grid_sample``; the reference for :func:`integrate_gather`). ``data`` may carry a leading
    channel dimension, integrated channel by channel in the same pass."""
    dtype = data.dtype
    D, H, W = data.shape[-3:]
    p, step = _sample_points(rays, n_samples, dtype)
    # index -> grid_sample's normalised coordinates (align_corners=True: -1 and +1 are the end voxel centres)
    scale = torch.tensor([2.0 / max(W - 1, 1), 2.0 / max(H - 1, 1), 2.0 / max(D - 1, 1)], dtype=dtype, device=data.device)
    grid = p * scale - 1
    # samples lie inside the box [-0.5, N - 0.5]: "border" gives the edge voxels their full half-width
    channels = data.reshape(1, -1, D, H, W)
    samples = F.grid_sample(channels, grid[None], mode="bilinear", padding_mode=padding_mode, align_corners=True)[0]
    out = samples.sum(-1) * step / n_samples  # (C, V, R)
    return out.reshape(*data.shape[:-3], *out.shape[1:])


def pad_volume(data: Float[Tensor, "D H W"]) -> Float[Tensor, "N"]:
    """The volume with a one-voxel replicated border, flattened: the layout :func:`integrate_gather` reads."""
    return F.pad(data[None], (1, 1, 1, 1, 1, 1), mode="replicate")[0].reshape(-1)


def integrate_gather(flat_padded: Float[Tensor, "N"], shape: tuple[int, int, int], rays: Rays, n_samples: int) -> Float[Tensor, "V R"]:
    """Same integral as :func:`integrate`, written as explicit gathers and lerps so that
    ``torch.compile`` fuses sample generation, interpolation and the sum into one loop
    (no (V, R, S, 3) grid in memory). Samples lie inside the box, so with the replicated
    border every neighbour index is valid and matches ``grid_sample``'s border padding."""
    D, H, W = shape
    p, step = _sample_points(rays, n_samples, flat_padded.dtype)
    x = (p[..., 0] + 1).clamp(0, W + 1 - 1e-4)
    y = (p[..., 1] + 1).clamp(0, H + 1 - 1e-4)
    z = (p[..., 2] + 1).clamp(0, D + 1 - 1e-4)
    x0, y0, z0 = x.floor(), y.floor(), z.floor()
    fx, fy, fz = x - x0, y - y0, z - z0
    sy, sz = W + 2, (W + 2) * (H + 2)
    base = z0.long() * sz + y0.long() * sy + x0.long()

    def lerp_x(offset):
        a = flat_padded[base + offset]
        return a + (flat_padded[base + offset + 1] - a) * fx

    c0 = lerp_x(0) + (lerp_x(sy) - lerp_x(0)) * fy
    c1 = lerp_x(sz) + (lerp_x(sz + sy) - lerp_x(sz)) * fy
    return (c0 + (c1 - c0) * fz).sum(-1) * step / n_samples


def render_gather(T_index_from_ct: Tensor, shape_ijk: tuple[int, int, int], T_cam_from_ct: Tensor, K: Tensor,
                  pixels: Tensor, flat_padded: Tensor, shape: tuple[int, int, int], n_samples: int) -> Tensor:
    """Ray set-up and gather integration in one function, so ``torch.compile`` fuses both."""
    rays = make_rays(T_index_from_ct, shape_ijk, T_cam_from_ct, K, pixels)
    return integrate_gather(flat_padded, shape, rays, n_samples)


_COMPILED = {}


def _compiled_render():
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(render_gather, dynamic=False)
    return _COMPILED["fn"]


BACKENDS = ("compiled", "grid_sample")


class Renderer:
    """Fast DRR renderer for one volume. Build once; render many poses and views."""

    def __init__(self, volume: Volume, *, n_samples: int = 128, device=None, dtype=torch.float32,
                 backend: str = "compiled"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        device = volume.data.device if device is None else torch.device(device)
        self.volume = volume
        self.backend = backend
        self.data = volume.data.to(device=device, dtype=dtype).contiguous()
        self.flat_padded = pad_volume(self.data) if backend == "compiled" else None
        self._compiled_ok = False
        self.T_index_from_ct = torch.linalg.inv(volume.T_ct_from_index.to(device=device, dtype=torch.float64))
        self.shape_ijk = volume.shape_ijk
        self.n_samples = int(n_samples)
        self.device = device

    def __call__(
        self, T_cam_from_ct: Float[Tensor, "V 4 4"], K: Float[Tensor, "V 3 3"], height: int, width: int,
        *, pixels: Tensor | None = None, n_samples: int | None = None,
    ) -> Tensor:
        """DRRs ``(V, height, width)``, or ``(V, R)`` for explicit ``pixels`` (u, v)."""
        if T_cam_from_ct.ndim != 3 or T_cam_from_ct.shape[-2:] != (4, 4):
            raise ValueError(f"T_cam_from_ct must be (V, 4, 4), got {tuple(T_cam_from_ct.shape)}")
        if K.shape != (len(T_cam_from_ct), 3, 3):
            raise ValueError(f"K must be ({len(T_cam_from_ct)}, 3, 3), got {tuple(K.shape)}")
        T = T_cam_from_ct.to(self.device, torch.float64)
        full = pixels is None
        if full:
            pixels = pixel_grid(height, width, dtype=torch.float64, device=self.device)
        K = K.to(self.device, torch.float64)
        pixels = pixels.to(self.device)
        n = self.n_samples if n_samples is None else n_samples
        out = self._render_compiled(T, K, pixels, n) if self.backend == "compiled" else None
        if out is None:
            out = integrate(self.data, make_rays(self.T_index_from_ct, self.shape_ijk, T, K, pixels), n)
        return out.reshape(len(T), height, width) if full else out

    def _render_compiled(self, T: Tensor, K: Tensor, pixels: Tensor, n_samples: int) -> Tensor | None:
        """The fused compiled path; None once it has failed to compile (then grid_sample is used)."""
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        args = (self.T_index_from_ct, self.shape_ijk, T, K, pixels, self.flat_padded, tuple(self.data.shape), n_samples)
        if self._compiled_ok:
            return _compiled_render()(*args)
        try:  # the first call compiles: only a failure there (no C++ compiler, no Triton) falls back
            out = _compiled_render()(*args)
            self._compiled_ok = True
            return out
        except Exception as e:  # noqa: BLE001 - the reference path gives the same values
            warnings.warn(f"torch.compile of the renderer failed ({type(e).__name__}: {e}); using grid_sample",
                          RuntimeWarning, stacklevel=3)
            self.backend, self.flat_padded = "grid_sample", None
            return None
