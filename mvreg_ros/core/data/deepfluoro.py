"""DeepFluoro-layout HDF5 files (Grupp et al., IPCAI 2020): reading (the real
full-resolution file or simulated ones) and TotalSegmentator structure names. Writing simulated
files is :mod:`mvreg_ros.core.data.deepfluoro_write`; reading never loads the renderer or the simulator.

Layout (checked against public loaders of the real ``ipcai_2020_full_res_data.h5``)::

    proj-params/intrinsic          (3, 3)  negative focal length, pixels
    proj-params/extrinsic          (4, 4)  world -> DeepFluoro camera
    proj-params/num-rows, num-cols, pixel-row-spacing, pixel-col-spacing   scalars
    <specimen>/vol/{pixels [slice, row, col], spacing (3, 1), origin (3, 1), dir-mat (3, 3)}
    <specimen>/vol-seg/image/{pixels, spacing, origin, dir-mat}, vol-seg/labels-def/<N> (name)
    <specimen>/vol-landmarks/<NAME>                  (3, 1) LPS mm
    <specimen>/projections/<NNN>/image/pixels        (rows, cols) raw detector intensities
    <specimen>/projections/<NNN>/gt-landmarks/<NAME> (2, 1) (column, row) pixels
    <specimen>/projections/<NNN>/gt-poses/cam-to-pelvis-vol   (4, 4)
    <specimen>/projections/<NNN>/rot-180-for-up      scalar, display only

A volume point ``p`` projects to ``pixel ~ K_df @ (E @ inv(G) @ p)[:3]`` with ``E`` the
extrinsic and ``G`` the projection's ``cam-to-pelvis-vol``. Everything returned by
:class:`DeepFluoroFile` is converted to the engine's conventions (:mod:`.geometry`): the
images are flipped left-right, K has a positive focal length and ``T_cam_from_ct`` maps the
CT (LPS mm) into the ROS optical camera.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.geometry.transforms import (
    K_from_deepfluoro,
    T_cam_from_ct_deepfluoro,
    flip_columns,
    invert,
)
from mvreg_ros.core.imaging.views import ViewSet
from mvreg_ros.core.imaging.volume import Volume, from_hu, from_itk_arrays
from mvreg_ros.core.imaging.xray import check_image

PROJ_PARAMS = "proj-params"
SOURCE_TO_ISOCENTER = "source-to-isocenter"  # mm; this project's addition to proj-params (optional)


class DeepFluoroFormatError(ValueError):
    """A DeepFluoro-layout file that cannot be used as it is (wrong shape, bad values)."""


class MissingEntryError(DeepFluoroFormatError, KeyError):
    """A group or dataset the layout requires is absent; the message names its path."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Projection:
    """One projection in the engine's conventions (full resolution).

    ``image`` holds the raw detector intensities flipped left-right (the ``cam`` image),
    ``K`` and ``T_cam_from_ct`` the ROS optical camera; ``cam_to_pelvis_vol`` is the file's
    own ``G``; ``landmarks_uv`` are the file's ``gt-landmarks`` moved to the flipped image."""

    specimen: str
    index: int
    image: Float[Tensor, "H W"]
    K: Float[Tensor, "3 3"]
    T_cam_from_ct: Float[Tensor, "4 4"]
    pixel_spacing_mm: tuple[float, float]  # (row, column)
    cam_to_pelvis_vol: Float[Tensor, "4 4"]
    rot_180_for_up: bool
    landmark_names: tuple[str, ...]
    landmarks_uv: Float[Tensor, "N 2"]

    @property
    def pixel_mm(self) -> float:
        """Mean pixel size at the detector (mm)."""
        return 0.5 * (self.pixel_spacing_mm[0] + self.pixel_spacing_mm[1])

    @property
    def height(self) -> int:
        return self.image.shape[-2]

    @property
    def width(self) -> int:
        return self.image.shape[-1]


def views_from_projections(projections: Sequence[Projection], *, i0: float | None = None) -> tuple[ViewSet, Tensor]:
    """A :class:`ViewSet` whose reference frame is the first projection's camera, and the
    true ``T_ref_from_ct`` (= the first camera's ``T_cam_from_ct``)."""
    if len(projections) == 0:
        raise ValueError("a view set needs at least one projection")
    shapes = {tuple(p.image.shape) for p in projections}
    if len(shapes) != 1:
        raise DeepFluoroFormatError(f"projections of one view set must share an image size, got {sorted(shapes)}")
    T_cam0_from_ct = projections[0].T_cam_from_ct
    parts = []
    for p in projections:
        T_ref_from_cam = T_cam0_from_ct @ invert(p.T_cam_from_ct)
        try:
            parts.append(ViewSet.from_raw(p.image[None], p.K[None], T_ref_from_cam[None], i0=i0))
        except ValueError as e:
            raise DeepFluoroFormatError(f"{p.specimen}/projections/{p.index:03d}: {e}") from e
    views = ViewSet(
        images=torch.cat([v.images for v in parts]),
        masks=torch.cat([v.masks for v in parts]),
        K=torch.cat([v.K for v in parts]),
        T_ref_from_cam=torch.cat([v.T_ref_from_cam for v in parts]),
    )
    return views, T_cam0_from_ct.clone()


class DeepFluoroFile:
    """Reader of a DeepFluoro-layout HDF5 file; use as a context manager."""

    def __init__(self, path: str | Path):
        import h5py

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"DeepFluoro file not found: {self.path}")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise DeepFluoroFormatError(f"{self.path}: not a readable HDF5 file ({e})") from e
        self._params = None

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "DeepFluoroFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- low level ---------------------------------------------------------------------

    def _node(self, path: str, kind: str = "dataset"):
        import h5py

        if path not in self._f:
            raise MissingEntryError(f"{self.path}: missing {kind} '/{path}'")
        node = self._f[path]
        want = h5py.Dataset if kind == "dataset" else h5py.Group
        if not isinstance(node, want):
            raise DeepFluoroFormatError(f"{self.path}: '/{path}' should be a {kind}")
        return node

    def _array(self, path: str, shape: tuple[int, ...] | None = None, *, vector: int | None = None) -> np.ndarray:
        """A dataset as float64; ``vector=n`` accepts (n,), (n, 1) and (1, n)."""
        a = np.asarray(self._node(path)[()], dtype=np.float64)
        if vector is not None:
            if a.size != vector or a.ndim > 2 or (a.ndim == 2 and 1 not in a.shape):
                raise DeepFluoroFormatError(f"{self.path}: '/{path}' should hold {vector} values, got shape {a.shape}")
            a = a.reshape(vector)
        elif shape is not None and a.shape != shape:
            raise DeepFluoroFormatError(f"{self.path}: '/{path}' should have shape {shape}, got {a.shape}")
        if not np.isfinite(a).all():
            raise DeepFluoroFormatError(f"{self.path}: '/{path}' contains NaN or infinite values")
        return a

    def _scalar(self, path: str) -> float:
        return float(self._array(path, vector=1)[0])

    def _specimen(self, specimen: str) -> str:
        if specimen == PROJ_PARAMS or specimen not in self._f:
            raise MissingEntryError(f"{self.path}: no specimen '{specimen}' (available: {', '.join(self.specimens())})")
        self._node(specimen, "group")
        return specimen

    def _image_group(self, path: str, ndim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """ITK-style image group: (pixels, spacing, origin, direction)."""
        self._node(path, "group")
        pixels = self._node(f"{path}/pixels")[()]
        if pixels.ndim != ndim:
            raise DeepFluoroFormatError(f"{self.path}: '/{path}/pixels' should be {ndim}D, got shape {pixels.shape}")
        spacing = self._array(f"{path}/spacing", vector=ndim)
        if (spacing <= 0).any():
            raise DeepFluoroFormatError(f"{self.path}: '/{path}/spacing' must be positive, got {spacing.tolist()}")
        origin = self._array(f"{path}/origin", vector=ndim) if f"{path}/origin" in self._f else np.zeros(ndim)
        direction = self._array(f"{path}/dir-mat", (ndim, ndim)) if f"{path}/dir-mat" in self._f else np.eye(ndim)
        return pixels, spacing, origin, direction

    # -- file-level parameters ------------------------------------------------------------

    def proj_params(self) -> dict:
        """``proj-params`` as read: ``K_df`` (3x3), ``extrinsic`` (4x4), ``num_rows``, ``num_cols``,
        ``pixel_spacing_mm`` (row, column), ``sid_mm`` (source to isocentre, None unless the file records
        it: this project's files do, the real DeepFluoro file does not)."""
        if self._params is None:
            K_df = self._array(f"{PROJ_PARAMS}/intrinsic", (3, 3))
            E = self._array(f"{PROJ_PARAMS}/extrinsic", (4, 4))
            if K_df[0, 0] >= 0 or K_df[1, 1] >= 0:
                raise DeepFluoroFormatError(
                    f"{self.path}: '/{PROJ_PARAMS}/intrinsic' should have DeepFluoro's negative focal lengths, got "
                    f"fx={K_df[0, 0]}, fy={K_df[1, 1]}"
                )
            if not np.allclose(K_df[2], [0, 0, 1]):
                raise DeepFluoroFormatError(
                    f"{self.path}: '/{PROJ_PARAMS}/intrinsic' last row should be [0, 0, 1], got {K_df[2]}"
                )
            R = E[:3, :3]
            if not (
                np.allclose(R @ R.T, np.eye(3), atol=1e-5) and np.linalg.det(R) > 0 and np.allclose(E[3], [0, 0, 0, 1])
            ):
                raise DeepFluoroFormatError(f"{self.path}: '/{PROJ_PARAMS}/extrinsic' is not a rigid transform")
            rows, cols = self._scalar(f"{PROJ_PARAMS}/num-rows"), self._scalar(f"{PROJ_PARAMS}/num-cols")
            sr, sc = self._scalar(f"{PROJ_PARAMS}/pixel-row-spacing"), self._scalar(f"{PROJ_PARAMS}/pixel-col-spacing")
            if sr <= 0 or sc <= 0:
                raise DeepFluoroFormatError(f"{self.path}: pixel spacings must be positive, got ({sr}, {sc})")
            self._params = {
                "K_df": torch.as_tensor(K_df),
                "extrinsic": torch.as_tensor(E),
                "num_rows": int(rows),
                "num_cols": int(cols),
                "pixel_spacing_mm": (sr, sc),
                "sid_mm": None,
            }
            if f"{PROJ_PARAMS}/{SOURCE_TO_ISOCENTER}" in self._f:  # this project's files only
                sid = self._scalar(f"{PROJ_PARAMS}/{SOURCE_TO_ISOCENTER}")
                if not (math.isfinite(sid) and sid > 0):
                    raise DeepFluoroFormatError(f"{self.path}: source-to-isocenter must be positive, got {sid}")
                self._params["sid_mm"] = sid
        return self._params

    @property
    def extrinsic(self) -> Float[Tensor, "4 4"]:
        return self.proj_params()["extrinsic"].clone()

    # -- specimens ---------------------------------------------------------------------------

    def specimens(self) -> list[str]:
        import h5py

        return sorted(k for k, v in self._f.items() if k != PROJ_PARAMS and isinstance(v, h5py.Group))

    def volume(self, specimen: str, *, bone_only: bool = False, with_mask: bool = True) -> Volume:
        """The specimen's CT (``vol``, HU) as an attenuation :class:`Volume`, with the
        ``vol-seg`` label map as its mask when present and asked for."""
        s = self._specimen(specimen)
        pixels, spacing, origin, direction = self._image_group(f"{s}/vol", 3)
        hu, T_ct_from_index = from_itk_arrays(np.asarray(pixels, dtype=np.float32), spacing, origin, direction)
        if not torch.isfinite(hu).all():
            raise DeepFluoroFormatError(f"{self.path}: '/{s}/vol/pixels' contains NaN or infinite values")
        mask = None
        if with_mask and f"{s}/vol-seg/image" in self._f:
            seg = self._image_group(f"{s}/vol-seg/image", 3)[0]
            if seg.shape != pixels.shape:
                raise DeepFluoroFormatError(
                    f"{self.path}: '/{s}/vol-seg/image/pixels' shape {seg.shape} differs from '/{s}/vol/pixels' {pixels.shape}"
                )
            mask = torch.as_tensor(np.asarray(seg, dtype=np.int16))
        return from_hu(hu, T_ct_from_index, mask=mask, bone_only=bone_only)

    def label_names(self, specimen: str) -> dict[int, str]:
        """``vol-seg/labels-def``: label value -> name (empty when absent)."""
        s = self._specimen(specimen)
        path = f"{s}/vol-seg/labels-def"
        if path not in self._f:
            return {}
        import h5py

        out = {}
        for k, ds in self._node(path, "group").items():
            if k.isdigit() and isinstance(ds, h5py.Dataset):
                v = ds[()]
                out[int(k)] = v.decode() if isinstance(v, bytes) else str(v)
        return out

    def landmarks(self, specimen: str) -> tuple[list[str], Float[Tensor, "N 3"]]:
        """``vol-landmarks``: names (sorted) and LPS points (mm)."""
        s = self._specimen(specimen)
        group = self._node(f"{s}/vol-landmarks", "group")
        names = sorted(group.keys())
        if not names:
            raise DeepFluoroFormatError(f"{self.path}: '/{s}/vol-landmarks' is empty")
        pts = np.stack([self._array(f"{s}/vol-landmarks/{n}", vector=3) for n in names])
        return names, torch.as_tensor(pts)

    def projection_indices(self, specimen: str) -> list[int]:
        s = self._specimen(specimen)
        keys = list(self._node(f"{s}/projections", "group").keys())
        bad = [k for k in keys if not k.isdigit()]
        if bad:
            raise DeepFluoroFormatError(f"{self.path}: '/{s}/projections' holds non-numeric entries {bad}")
        return sorted(int(k) for k in keys)

    def num_projections(self, specimen: str) -> int:
        return len(self.projection_indices(specimen))

    def projection(self, specimen: str, index: int) -> Projection:
        """Projection ``index`` (the ``NNN`` key) of a specimen, in the engine's conventions."""
        s = self._specimen(specimen)
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"projection index must be a non-negative int, got {index!r}")
        base = f"{s}/projections/{int(index):03d}"
        if base not in self._f:
            raise MissingEntryError(
                f"{self.path}: no projection '/{base}' ({specimen} has {self.num_projections(specimen)} projections)"
            )
        params = self.proj_params()
        self._node(f"{base}/image", "group")
        pixels = self._node(f"{base}/image/pixels")[()]  # its spacing is proj-params'
        if pixels.ndim != 2:
            raise DeepFluoroFormatError(f"{self.path}: '/{base}/image/pixels' should be 2D, got shape {pixels.shape}")
        H, W = pixels.shape
        if (params["num_rows"], params["num_cols"]) != (H, W):
            raise DeepFluoroFormatError(
                f"{self.path}: '/{base}/image/pixels' has shape {(H, W)}, but proj-params says "
                f"{(params['num_rows'], params['num_cols'])}"
            )
        stored = torch.as_tensor(np.asarray(pixels, dtype=np.float32))
        try:
            check_image(stored, f"'/{base}/image/pixels'")
        except ValueError as e:
            raise DeepFluoroFormatError(f"{self.path}: {e}") from e
        G = torch.as_tensor(self._array(f"{base}/gt-poses/cam-to-pelvis-vol", (4, 4)))
        E = params["extrinsic"]
        rot = (
            bool(np.asarray(self._node(f"{base}/rot-180-for-up")[()]).item())
            if f"{base}/rot-180-for-up" in self._f
            else False
        )
        names: list[str] = []
        uv = []
        if f"{base}/gt-landmarks" in self._f:
            for n in sorted(self._node(f"{base}/gt-landmarks", "group").keys()):
                names.append(n)
                uv.append(self._array(f"{base}/gt-landmarks/{n}", vector=2))
        uv_t = torch.as_tensor(np.array(uv, dtype=np.float64).reshape(-1, 2))
        uv_t[:, 0] = (W - 1) - uv_t[:, 0]  # to the flipped (cam) image
        return Projection(
            specimen=specimen,
            index=int(index),
            image=flip_columns(stored),
            K=K_from_deepfluoro(params["K_df"], W),
            T_cam_from_ct=T_cam_from_ct_deepfluoro(E, G),
            pixel_spacing_mm=params["pixel_spacing_mm"],
            cam_to_pelvis_vol=G,
            rot_180_for_up=rot,
            landmark_names=tuple(names),
            landmarks_uv=uv_t,
        )

    def view_set(self, specimen: str, indices: Sequence[int], *, i0: float | None = None) -> tuple[ViewSet, Tensor]:
        """Views ``indices`` with the first view's camera as the reference frame; returns
        ``(views, T_ref_from_ct)`` where the truth ``T_ref_from_ct = T_cam0_from_ct``."""
        return views_from_projections([self.projection(specimen, i) for i in indices], i0=i0)


# ---------------------------------------------------------------------------------------
# Structure names of a TotalSegmentator label map
# ---------------------------------------------------------------------------------------


def read_structures(path: str | Path) -> dict[int, str]:
    """A TotalSegmentator ``structures.csv`` (columns ``structure`` and ``id``): id -> name."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"structures file not found: {path}")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"structure", "id"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: needs 'structure' and 'id' columns, got {reader.fieldnames}")
        return {int(row["id"]): row["structure"] for row in reader}
