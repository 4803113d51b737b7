"""Reference DRRs through DiffDRR's exact Siddon ray tracer, on the engine's geometry.

The rays (source, pixel directions, volume box) come from :func:`render.make_rays`, so the
only thing that differs from the fast path is the integrator: DiffDRR's Siddon sums each
voxel's value times the exact length of the ray inside it. Slow; used by tests and by
``mvreg bench`` as the baseline.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.imaging.volume import Volume
from mvreg_ros.core.rendering.renderer import make_rays, pixel_grid


class ReferenceRenderer:
    """Same call signature as :class:`render.Renderer`."""

    def __init__(self, volume: Volume, *, device=None, dtype=torch.float32, **_ignored):
        from diffdrr.renderers import Siddon

        device = volume.data.device if device is None else torch.device(device)
        self.volume = volume
        # DiffDRR indexes volumes [i, j, k]
        self.data_ijk = volume.data.to(device=device, dtype=dtype).permute(2, 1, 0).contiguous()
        self.T_index_from_ct = torch.linalg.inv(volume.T_ct_from_index.to(device=device, dtype=torch.float64))
        self.shape_ijk = volume.shape_ijk
        self.siddon = Siddon(voxel_shift=0.5)
        self.device = device

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
        """As :class:`~mvreg_ros.core.rendering.renderer.Renderer`; ``poses`` and ``ray_index`` (its hints
        on the renders' layout, for the native kernel's order of work) change nothing here."""
        T = T_cam_from_ct.to(self.device, torch.float64)
        full = pixels is None
        if full:
            pixels = pixel_grid(height, width, dtype=torch.float64, device=self.device)
        rays = make_rays(
            self.T_index_from_ct, self.shape_ijk, T, K.to(self.device, torch.float64), pixels.to(self.device)
        )
        dtype = self.data_ijk.dtype
        # segment from the box entry to the exit; DiffDRR scales alpha-lengths by the segment length
        source = (rays.origin + rays.t_near[..., None] * rays.direction).to(dtype)
        target = (rays.origin + rays.t_far[..., None] * rays.direction).to(dtype)
        length_mm = (rays.t_far - rays.t_near).to(dtype)[:, None, :]
        out = self.siddon(self.data_ijk, source, target, length_mm)[:, 0]
        # rays that miss the volume have zero length (avoid 0 * nan from degenerate segments)
        out = torch.where(length_mm[:, 0] > 0, out, torch.zeros_like(out))
        return out.reshape(len(T), height, width) if full else out
