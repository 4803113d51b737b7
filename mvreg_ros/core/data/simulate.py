"""Simulated C-arm acquisitions of a CT: raw 16-bit detector images with noise, scatter and
a circular image-intensifier field of view, at known poses."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.geometry import carm
from mvreg_ros.core.geometry.transforms import intrinsics, invert
from mvreg_ros.core.imaging.views import ViewSet
from mvreg_ros.core.imaging.xray import DEEPFLUORO_I0
from mvreg_ros.core.rendering.renderer import Renderer


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """A flat detector at ``sdd_mm`` from the source; the principal ray hits its centre."""

    sdd_mm: float = 1020.0
    sid_mm: float = 700.0  # source to isocentre
    height: int = 256
    width: int = 256
    pixel_mm: float = 1.164

    def K(self, dtype=torch.float64) -> Float[Tensor, "3 3"]:
        return intrinsics(
            sdd_mm=self.sdd_mm, pixel_spacing_mm=self.pixel_mm, height=self.height, width=self.width, dtype=dtype
        )


@dataclasses.dataclass(frozen=True)
class AcquisitionConfig:
    """How raw images are degraded."""

    i0: float = DEEPFLUORO_I0
    photons_per_count: float = 0.5  # Poisson statistics: counts * this = detected photons
    scatter_fraction: float = 0.15  # smooth background, relative to the mean primary signal
    fov_radius: float | None = 0.47  # circular field of view, fraction of the image width; None = none
    n_samples: int = 256
    edge_falloff_px: float = 1.5


def acquire(
    renderer: Renderer,
    T_cam_from_ct: Float[Tensor, "V 4 4"],
    K: Float[Tensor, "V 3 3"],
    height: int,
    width: int,
    *,
    config: AcquisitionConfig = AcquisitionConfig(),
    generator: torch.Generator | None = None,
) -> Float[Tensor, "V H W"]:
    """Raw detector intensities (bone dark, 0..65535) of the views."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    with torch.no_grad():
        P = renderer(T_cam_from_ct, K, height, width, n_samples=config.n_samples).float().cpu()
    V = P.shape[0]
    primary = config.i0 * torch.exp(-P)
    # scatter: a smooth blob, a fraction of the mean primary
    coarse = torch.rand(V, 1, 4, 4, generator=g)
    blob = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[:, 0].clamp_min(0)
    scatter = (
        config.scatter_fraction
        * primary.mean((-2, -1), keepdim=True)
        * blob
        / blob.mean((-2, -1), keepdim=True).clamp_min(1e-6)
    )
    signal = primary + scatter
    photons = signal * config.photons_per_count
    noisy = (photons + photons.clamp_min(0).sqrt() * torch.randn(photons.shape, generator=g)) / config.photons_per_count
    if config.fov_radius is not None:
        v, u = torch.meshgrid(
            torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
        )
        r = torch.sqrt((u - (width - 1) / 2) ** 2 + (v - (height - 1) / 2) ** 2)
        radius = config.fov_radius * width
        inside = torch.sigmoid((radius - r) / config.edge_falloff_px)
        noisy = noisy * inside
    return noisy.round().clamp(0, 65535)


@dataclasses.dataclass(frozen=True)
class Scene:
    """Known truth of a simulated acquisition, in the isocentre frame (``ref`` = ``iso``)."""

    T_ref_from_ct: Float[Tensor, "4 4"]
    T_ref_from_cam: Float[Tensor, "V 4 4"]
    K: Float[Tensor, "V 3 3"]
    height: int
    width: int

    @property
    def T_cam_from_ct(self) -> Float[Tensor, "V 4 4"]:
        return invert(self.T_ref_from_cam) @ self.T_ref_from_ct

    def views(
        self,
        renderer: Renderer,
        *,
        config: AcquisitionConfig = AcquisitionConfig(),
        generator: torch.Generator | None = None,
    ) -> ViewSet:
        """The scene's views as a C-arm delivers them: raw images from :func:`acquire`, preprocessed
        by :meth:`ViewSet.from_raw` as real images are (``ref`` = the isocentre frame)."""
        raw = acquire(renderer, self.T_cam_from_ct, self.K, self.height, self.width, config=config, generator=generator)
        return ViewSet.from_raw(raw, self.K, self.T_ref_from_cam)


def make_scene(
    centre_ct: Float[Tensor, "3"],
    angles_deg: list[tuple[float, float]],
    *,
    detector: DetectorConfig = DetectorConfig(),
    offset_mm=None,
) -> Scene:
    """A supine patient with ``centre_ct`` at the isocentre, viewed at (orbital, angular) degrees."""
    orb = torch.tensor([math.radians(a) for a, _ in angles_deg], dtype=torch.float64)
    ang = torch.tensor([math.radians(b) for _, b in angles_deg], dtype=torch.float64)
    T_ref_from_cam = carm.T_iso_from_cam(orb, ang, sid_mm=detector.sid_mm)
    K = detector.K().expand(len(angles_deg), 3, 3).clone()
    return Scene(
        T_ref_from_ct=carm.T_iso_from_ct_supine(centre_ct.to(torch.float64), offset_mm),
        T_ref_from_cam=T_ref_from_cam,
        K=K,
        height=detector.height,
        width=detector.width,
    )
