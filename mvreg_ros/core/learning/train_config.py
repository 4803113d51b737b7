"""Settings of the coarse network's training (`mvreg train --config FILE`): one frozen dataclass."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.data.simulate import DetectorConfig
from mvreg_ros.core.geometry.pose_sampling import PoseRange
from mvreg_ros.core.learning.augment import AugmentConfig
from mvreg_ros.core.learning.coarse import (
    working_geometry,
)
from mvreg_ros.core.learning.network import (
    ArchConfig,
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every training setting; ``config/train.yaml`` holds the same defaults."""

    # pose range (degrees, mm) and detector geometry
    orbital_deg: float = 75.0
    angular_deg: float = 35.0
    inplane_deg: float = 10.0
    iso_mm: float = 40.0
    step_orbital_deg: tuple[float, float] = (30.0, 90.0)
    step_angular_deg: float = 20.0
    sdd_mm: float = 1020.0
    sid_mm: float = 700.0
    detector_px: int = 256  # detector columns (and rows unless detector_rows is set)
    detector_rows: int = 0  # detector rows; 0 = detector_px (square)
    pixel_mm: float = 1.164
    # data
    size: int = 64  # working image size
    n_samples: int = 48  # ray samples when rendering training views
    voxel_mm: float = 2.5  # CT pooled to about this voxel size for training renders
    truncation_extend_mm: float = 150.0  # a CT cut through the body is rendered continued this far beyond each cut
    # face (its end slices repeated), as the X-rays see a patient who goes on beyond the CT (RefineConfig's too)
    pool_sets: int = 6000  # view sets kept in the pool (3 views each)
    initial_sets: int = 192  # rendered before the first step
    refresh_sets: int = 4  # new sets rendered per step
    p_three_views: float = 0.3  # probability that a batch uses 3 views instead of 2
    bone_scale: tuple[float, float] = (0.6, 1.6)
    energy_scale: tuple[float, float] = (0.85, 1.15)
    scatter_fraction: tuple[float, float] = (0.0, 0.3)
    photons_per_count: tuple[float, float] = (0.05, 1.0)  # log-uniform, per detector pixel
    p_fov: float = 0.6  # probability of a circular field of view
    fov_radius: tuple[float, float] = (0.40, 0.5)  # fraction of the width
    augment: AugmentConfig = AugmentConfig()  # deformation, metal, shutters, column gain (learning/augment.py)
    # network
    width: int = 16
    fc: int = 256
    # losses (weights; 0 switches a term off)
    w_pose: float = 1.0
    w_image: float = 0.5
    w_cross_pose: float = 0.5
    w_cross_image: float = 0.5
    pose_radius_mm: float = 100.0
    pose_scale_mm: float = 100.0
    depth_weight: float = 0.5
    image_size: int = 32  # DRR size of the image losses
    image_samples: int = 48
    image_sets: int = 8  # view sets of each batch that get the image losses
    image_start: float = 0.25  # fraction of the budget before the image losses switch on
    image_patches: tuple = (None, 8)
    # optimisation
    batch_sets: int = 24
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: float = 0.03
    minutes: float = 30.0
    max_steps: int = 0  # 0 = limited by minutes only
    val_sets: int = 32
    val_every_s: float = 120.0
    seed: int = 0
    threads: int = 0  # torch threads (0 = leave as is)

    def __post_init__(self):
        if self.detector_px < 1 or self.detector_rows < 0:
            raise ValueError(
                f"detector_px must be >= 1 and detector_rows >= 0 (0 = square), got "
                f"{self.detector_px} and {self.detector_rows}"
            )
        if self.size % 16 or self.image_size < 8 or self.size % self.image_size:
            raise ValueError(f"size ({self.size}) must be a multiple of 16 and of image_size ({self.image_size})")
        for name in ("w_pose", "w_image", "w_cross_pose", "w_cross_image", "minutes", "truncation_extend_mm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.w_pose + self.w_image + self.w_cross_pose + self.w_cross_image <= 0:
            raise ValueError("at least one loss term must have a positive weight")
        if self.batch_sets < 1 or self.initial_sets < self.batch_sets:
            raise ValueError(f"initial_sets ({self.initial_sets}) must be >= batch_sets ({self.batch_sets}) >= 1")

    @property
    def pose_range(self) -> PoseRange:
        return PoseRange(
            orbital_deg=self.orbital_deg,
            angular_deg=self.angular_deg,
            inplane_deg=self.inplane_deg,
            iso_mm=self.iso_mm,
            step_orbital_deg=tuple(self.step_orbital_deg),
            step_angular_deg=self.step_angular_deg,
            sid_mm=self.sid_mm,
        )

    @property
    def detector_shape(self) -> tuple[int, int]:
        """Detector (rows, columns)."""
        return (self.detector_rows or self.detector_px, self.detector_px)

    @property
    def detector(self) -> DetectorConfig:
        rows, cols = self.detector_shape
        return DetectorConfig(sdd_mm=self.sdd_mm, sid_mm=self.sid_mm, height=rows, width=cols, pixel_mm=self.pixel_mm)

    @property
    def detector_px_per_pixel(self) -> float:
        """Detector pixels per working pixel (along each axis; the letterbox scale is isotropic)."""
        return max(self.detector_shape) / self.size

    @property
    def arch(self) -> ArchConfig:
        return ArchConfig(size=self.size, width=self.width, fc=self.fc)

    def working_geometry(self) -> tuple[Float[Tensor, "3 3"], Float[Tensor, "S S"]]:
        """``K_work`` and the detector's area in the ``size x size`` network input, by the one
        preprocessing of training and inference (:func:`coarse.to_working_size`, letterbox)."""
        rows, cols = self.detector_shape
        return working_geometry(self.detector.K(), rows, cols, self.size)

    def K_work(self) -> Float[Tensor, "3 3"]:
        return self.working_geometry()[0]

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        clean = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        if isinstance(clean.get("augment"), dict):
            aug = clean["augment"]
            known = {f.name for f in dataclasses.fields(AugmentConfig)}
            if set(aug) - known:
                raise ValueError(f"unknown training config keys: {sorted('augment.' + k for k in set(aug) - known)}")
            clean["augment"] = AugmentConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in aug.items()})
        return cls(**clean)

    @classmethod
    def from_yaml(cls, path: str | Path | None, **overrides) -> "TrainConfig":
        import yaml

        d = {}
        if path is not None:
            text = Path(path).read_text()
            d = yaml.safe_load(text) or {}
            if not isinstance(d, dict):
                raise ValueError(f"{path}: expected a mapping of training settings")
            d = d.get("train", d)
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(d)
