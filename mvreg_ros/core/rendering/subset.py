"""Rendering only the pixels an image comparison reads.

The refinement's similarity weights each pixel of a render, and a third or more of them (outside the
detector's field of view, outside the CT's footprint) carry weight zero: their values never enter the
result, nor does their gradient. A :class:`RaySubset` holds, for each view, the pixels that are read;
:meth:`RaySubset.render` traces their rays only and returns full-size images with zeros elsewhere. With
the native renderer the values and gradients are those of the full render bit for bit wherever the
similarity reads them (``test/core/rendering/test_subset.py``): the rays are traced independently, and the
backward sums their pose gradients in the full image's order of work (``ray_index``). (Where a render's
unread values are finite, as the renderer's are for a finite volume and pose: a NaN left out of the full
render's sums would otherwise have made them NaN.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from jaxtyping import Bool, Float, Int64
from torch import Tensor

from mvreg_ros.core.rendering.renderer import pixel_grid


@dataclasses.dataclass(frozen=True)
class RaySubset:
    """The pixels of each of V views that are rendered, the same number R for each view (a view with
    fewer is padded with the index ``height * width``, whose render is dropped)."""

    index: Int64[Tensor, "V R"]  # row-major index in the height x width image, ascending in each view
    pixels: Float[Tensor, "V R 2"]  # (u, v) of each index (float64); the padding's: the image's last pixel
    height: int
    width: int
    _tiled: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)  # (copies, device): tensors

    @classmethod
    def from_support(cls, support: Bool[Tensor, "V H W"]) -> "RaySubset":
        """The pixels where ``support`` is true, view by view (at least one in some view)."""
        if support.dtype != torch.bool or support.ndim != 3:
            raise ValueError(f"support must be a bool tensor (V, H, W), got {support.dtype} {tuple(support.shape)}")
        V, H, W = support.shape
        flat = support.reshape(V, H * W)
        counts = flat.sum(1)
        R = int(counts.max()) if V else 0
        if R == 0:
            raise ValueError("support selects no pixel: nothing to render")
        # the selected indices first (ascending: a stable sort of "not selected"), then the padding
        order = torch.sort((~flat).to(torch.uint8), dim=1, stable=True).indices[:, :R]
        pad = torch.arange(R, device=support.device)[None] >= counts[:, None]
        index = torch.where(pad, torch.full_like(order, H * W), order)
        grid = pixel_grid(H, W, dtype=torch.float64, device=support.device)
        pixels = grid[index.clamp_max(H * W - 1)]
        return cls(index=index.contiguous(), pixels=pixels, height=H, width=W)

    @property
    def views(self) -> int:
        return len(self.index)

    @property
    def fraction(self) -> float:
        """The share of the views' pixels that are rendered."""
        return float((self.index < self.height * self.width).sum()) / (self.views * self.height * self.width)

    def support(self) -> Bool[Tensor, "V H W"]:
        """The pixels rendered, as a mask (:meth:`from_support`'s input)."""
        HW = self.height * self.width
        mask = torch.zeros(self.views, HW + 1, dtype=torch.bool, device=self.index.device)
        mask.scatter_(1, self.index, True)
        return mask[:, :HW].reshape(self.views, self.height, self.width)

    def _copies(self, n: int, device) -> tuple[Tensor, Tensor]:
        """The index and pixels of ``n`` copies of the views on ``device``, made once and kept (the same
        tensors each time, never changed in place: the renderer recognises them by identity)."""
        key = (n, str(device))
        if key not in self._tiled:
            index, pixels = self.index.to(device), self.pixels.to(device)
            self._tiled[key] = (index.repeat(n, 1), pixels.repeat(n, 1, 1)) if n > 1 else (index, pixels)
        return self._tiled[key]

    def _rays_for(self, renderer, M: int) -> tuple[Tensor, Tensor]:
        """The index and pixels of M renders (copies of the views) on ``renderer``'s device."""
        if M % self.views:
            raise ValueError(f"{M} renders do not tile the subset's {self.views} views")
        return self._copies(M // self.views, getattr(renderer, "device", self.index.device))

    def render(
        self,
        renderer,
        T_cam_from_ct: Float[Tensor, "M 4 4"],
        K: Float[Tensor, "M 3 3"],
        *,
        n_samples: int,
        poses: int = 1,
    ) -> Float[Tensor, "M H W"]:
        """``renderer``'s full-size DRRs with only these pixels traced (zero elsewhere); the M renders are
        n copies of the V views (render ``k * V + v`` is view ``v``), as :class:`Renderer` takes them."""
        index, pixels = self._rays_for(renderer, len(T_cam_from_ct))
        H, W = self.height, self.width
        out = renderer(
            T_cam_from_ct, K, H, W, pixels=pixels, n_samples=n_samples, poses=poses, ray_index=index
        )  # (M, R)
        return self._scattered(out, index)

    def render_vjp(
        self,
        renderer,
        T_cam_from_ct: Float[Tensor, "M 4 4"],
        K: Float[Tensor, "M 3 3"],
        *,
        n_samples: int,
        poses: int = 1,
    ) -> tuple[Float[Tensor, "M H W"], Callable[[Tensor], Tensor]] | None:
        """:meth:`render`'s DRRs and their pullback (the gradient of the DRRs to that of ``T_cam_from_ct``)
        without autograd (:meth:`Renderer.render_vjp`; the same values bit for bit as autograd through
        :meth:`render`); None where the renderer has no such path (or no ``render_vjp`` at all)."""
        if not hasattr(renderer, "render_vjp"):
            return None
        M = len(T_cam_from_ct)
        index, pixels = self._rays_for(renderer, M)
        H, W = self.height, self.width
        rendered = renderer.render_vjp(
            T_cam_from_ct, K, H, W, pixels=pixels, n_samples=n_samples, poses=poses, ray_index=index
        )
        if rendered is None:
            return None
        out, render_pullback = rendered

        def pullback(grad: Tensor) -> Tensor:  # the scatter's: each ray's pixel, the padding's zero column
            padded = torch.cat([grad.reshape(M, H * W), grad.new_zeros(M, 1)], 1)
            return render_pullback(padded.gather(1, index))

        return self._scattered(out, index), pullback

    def _scattered(self, out: Tensor, index: Tensor) -> Tensor:
        """The rays' values ``(M, R)`` in full images ``(M, H, W)``, zero elsewhere."""
        M, H, W = len(out), self.height, self.width
        full = out.new_zeros(M, H * W + 1).scatter_(1, index, out)  # the padding into the last column, dropped
        return full[:, : H * W].reshape(M, H, W)
