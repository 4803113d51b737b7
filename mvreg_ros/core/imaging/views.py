"""A set of X-ray views of one anatomy, ready for registration."""

from __future__ import annotations

import dataclasses
import typing

import torch
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.geometry.transforms import check_hom
from mvreg_ros.core.imaging.xray import check_image, downsample, prepare


@typing.no_type_check  # validates its own inputs (tests check its errors); no jaxtyping/beartype wrapper
@dataclasses.dataclass(frozen=True)
class ViewSet:
    """V views: line-integral images, field-of-view masks, intrinsics and the known camera
    poses in the reference frame (all views share one image size)."""

    images: Float[Tensor, "V H W"]
    masks: Float[Tensor, "V H W"]
    K: Float[Tensor, "V 3 3"]
    T_ref_from_cam: Float[Tensor, "V 4 4"]

    def __post_init__(self):
        V = len(self.images)
        if self.images.ndim != 3 or V == 0:
            raise ValueError(f"images must be (V, H, W) with V >= 1, got {tuple(self.images.shape)}")
        if self.masks.shape != self.images.shape:
            raise ValueError(f"masks {tuple(self.masks.shape)} must match images {tuple(self.images.shape)}")
        if self.K.shape != (V, 3, 3):
            raise ValueError(f"K must be ({V}, 3, 3), got {tuple(self.K.shape)}")
        check_hom(self.T_ref_from_cam, "T_ref_from_cam")
        if self.T_ref_from_cam.shape != (V, 4, 4):
            raise ValueError(f"T_ref_from_cam must be ({V}, 4, 4), got {tuple(self.T_ref_from_cam.shape)}")
        for i in range(V):
            check_image(self.images[i], f"view {i} image")
            if float(self.masks[i].sum()) < 0.05 * self.masks[i].numel():
                raise ValueError(f"view {i}: empty field of view (mask covers under 5% of the image)")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def height(self) -> int:
        return self.images.shape[-2]

    @property
    def width(self) -> int:
        return self.images.shape[-1]

    def downsampled(self, factor: int) -> "ViewSet":
        img, K = downsample(self.images, self.K, factor)
        msk, _ = downsample(self.masks, self.K, factor)
        return ViewSet(images=img, masks=(msk > 0.999).float(), K=K, T_ref_from_cam=self.T_ref_from_cam)

    def select(self, idx: list[int]) -> "ViewSet":
        return ViewSet(
            images=self.images[idx], masks=self.masks[idx], K=self.K[idx], T_ref_from_cam=self.T_ref_from_cam[idx]
        )

    def to(self, device) -> "ViewSet":
        return ViewSet(
            images=self.images.to(device),
            masks=self.masks.to(device),
            K=self.K.to(device),
            T_ref_from_cam=self.T_ref_from_cam.to(device),
        )

    @classmethod
    def from_raw(
        cls,
        raw: Float[Tensor, "V H W"],
        K: Float[Tensor, "V 3 3"],
        T_ref_from_cam: Float[Tensor, "V 4 4"],
        *,
        i0: float | None = None,
        raw_is_line_integral: bool = False,
    ) -> "ViewSet":
        """Preprocess raw detector images (log-linearise, detect the field of view)."""
        if raw.ndim != 3:
            raise ValueError(f"raw images must be (V, H, W), got {tuple(raw.shape)}")
        prepared = [prepare(raw[i], K[i], i0=i0, raw_is_line_integral=raw_is_line_integral) for i in range(len(raw))]
        return cls(
            images=torch.stack([p.image for p in prepared]),
            masks=torch.stack([p.mask for p in prepared]),
            K=K.to(torch.float64),
            T_ref_from_cam=T_ref_from_cam.to(torch.float64),
        )
