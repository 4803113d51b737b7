"""DeepFluoro-layout HDF5 files (Grupp et al., IPCAI 2020): reading the full-resolution file,
writing simulated files in the same layout, and landmarks for CTs without annotations.

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
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.data.simulate import AcquisitionConfig, DetectorConfig, acquire, make_scene
from mvreg_ros.core.evaluation.landmarks import bone_octants, structure_centroids
from mvreg_ros.core.geometry.transforms import (
    K_from_deepfluoro,
    K_to_deepfluoro,
    T_cam_from_ct_deepfluoro,
    cam_to_pelvis_vol_from_T,
    flip_columns,
    invert,
    make_T,
    so3_exp,
)
from mvreg_ros.core.imaging.views import ViewSet
from mvreg_ros.core.imaging.volume import Volume, from_hu, from_itk_arrays
from mvreg_ros.core.imaging.xray import check_image
from mvreg_ros.core.rendering.renderer import Renderer

PROJ_PARAMS = "proj-params"


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
        ``pixel_spacing_mm`` (row, column)."""
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
            }
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


# ---------------------------------------------------------------------------------------
# Writing simulated files
# ---------------------------------------------------------------------------------------


def sample_carm_angles(
    n: int,
    *,
    seed: int = 0,
    max_orbital_deg: float = 60.0,
    max_angular_deg: float = 20.0,
    step_deg: tuple[float, float] = (20.0, 40.0),
) -> list[tuple[float, float]]:
    """``n`` (orbital, angular) C-arm positions in degrees, as an operator takes them: each
    orbital angle differs from the previous one by ``step_deg`` (tens of degrees) within
    +-``max_orbital_deg``; angulations are uniform within +-``max_angular_deg``."""
    if n < 1:
        raise ValueError(f"the number of views must be >= 1, got {n}")
    rng = np.random.default_rng(int(seed))
    orbital = float(rng.uniform(-0.5, 0.5) * max_orbital_deg)
    out = []
    for k in range(n):
        if k > 0:
            step = float(rng.uniform(*step_deg)) * (1 if rng.random() < 0.5 else -1)
            if abs(orbital + step) > max_orbital_deg:
                step = -step
            orbital = float(np.clip(orbital + step, -max_orbital_deg, max_orbital_deg))
        out.append((round(orbital, 3), round(float(rng.uniform(-max_angular_deg, max_angular_deg)), 3)))
    return out


# A non-identity world -> DeepFluoro-camera transform for simulated files (any rigid
# transform works: each projection's G absorbs it).
DEFAULT_EXTRINSIC = make_T(
    so3_exp(torch.tensor([0.35, -0.6, 1.2], dtype=torch.float64)),
    torch.tensor([12.0, -30.0, 410.0], dtype=torch.float64),
)


@dataclasses.dataclass(frozen=True)
class SimulatedSpecimen:
    """What :func:`write_simulated` wrote, in the engine's conventions."""

    specimen: str
    T_cam_from_ct: Float[Tensor, "V 4 4"]
    K: Float[Tensor, "3 3"]  # cam convention
    extrinsic: Float[Tensor, "4 4"]
    cam_to_pelvis_vol: Float[Tensor, "V 4 4"]
    landmark_names: tuple[str, ...]
    landmarks_ct: Float[Tensor, "N 3"]


def _image_group(group, pixels: np.ndarray, spacing, origin, direction, *, compress: bool) -> None:
    kw = {"compression": "gzip", "compression_opts": 4} if compress else {}
    group.create_dataset("pixels", data=pixels, **kw)
    n = pixels.ndim
    group.create_dataset("spacing", data=np.asarray(spacing, dtype=np.float64).reshape(n, 1))
    group.create_dataset("origin", data=np.asarray(origin, dtype=np.float64).reshape(n, 1))
    group.create_dataset("dir-mat", data=np.asarray(direction, dtype=np.float64).reshape(n, n))


def _itk_parts(T_ct_from_index: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    A = T_ct_from_index.to(torch.float64).cpu().numpy()
    spacing = np.linalg.norm(A[:3, :3], axis=0)
    return spacing, A[:3, 3], A[:3, :3] / spacing


def _landmark_arrays(
    landmarks: tuple[Sequence[str], Tensor] | Mapping[str, Sequence[float]],
) -> tuple[list[str], Tensor]:
    """Landmarks given as ``(names, (N, 3) points)`` or ``{name: point}``, checked."""
    if isinstance(landmarks, Mapping):
        lm_names = list(landmarks.keys())
        lm = torch.tensor([list(map(float, landmarks[n])) for n in lm_names], dtype=torch.float64)
    else:
        lm_names, lm = list(landmarks[0]), torch.as_tensor(landmarks[1], dtype=torch.float64)
    if lm.ndim != 2 or lm.shape != (len(lm_names), 3) or len(lm_names) == 0:
        raise ValueError(
            f"landmarks must be N names and an (N, 3) array, got {len(lm_names)} names and {tuple(lm.shape)}"
        )
    if len(set(lm_names)) != len(lm_names) or any("/" in n for n in lm_names):
        raise ValueError(f"landmark names must be unique and contain no '/': {lm_names}")
    return lm_names, lm


def write_simulated(
    path: str | Path,
    volume_hu_kji: Float[Tensor, "D H W"],
    T_ct_from_index: Float[Tensor, "4 4"],
    *,
    specimen: str = "sim-01",
    angles_deg: Sequence[tuple[float, float]],
    detector: DetectorConfig = DetectorConfig(),
    acquisition: AcquisitionConfig = AcquisitionConfig(),
    landmarks: tuple[Sequence[str], Tensor] | Mapping[str, Sequence[float]] | None = None,
    mask: Tensor | None = None,
    label_names: Mapping[int, str] | None = None,
    extrinsic: Float[Tensor, "4 4"] | None = None,
    offset_mm: Sequence[float] | None = None,
    rot_180_for_up: bool = False,
    seed: int = 0,
    device: str = "cpu",
    append: bool = False,
) -> SimulatedSpecimen:
    """Simulate C-arm acquisitions of a CT (HU) at ``angles_deg`` = [(orbital, angular), ...]
    with the engine's renderer and write them as specimen ``specimen`` of a DeepFluoro-layout
    file (:func:`write_specimen`).

    The bone centre sits at the isocentre (+ ``offset_mm``, isocentre frame). Without
    ``landmarks``, they follow the one landmark policy (:mod:`mvreg_ros.core.evaluation.landmarks`):
    the ``mask``'s structure centroids, else the bone octants. With ``append``, the specimen is added to an
    existing file whose ``proj-params`` must match."""
    if len(angles_deg) == 0:
        raise ValueError("angles_deg needs at least one (orbital, angular) pair")
    _check_specimen(volume_hu_kji, mask, specimen)
    T_ct_from_index = T_ct_from_index.to(torch.float64)
    vol = from_hu(volume_hu_kji, T_ct_from_index)

    if landmarks is None:  # the one landmark policy (evaluation.landmarks)
        found = structure_centroids(mask, T_ct_from_index, label_names) if mask is not None else None
        chosen = found or bone_octants(vol)
        landmarks = (list(chosen.names), chosen.points_ct)
    landmarks = _landmark_arrays(landmarks)

    scene = make_scene(vol.bone_centre_ct(), list(angles_deg), detector=detector, offset_mm=offset_mm)
    T_cam_from_ct = scene.T_cam_from_ct
    K = detector.K()
    H, W = detector.height, detector.width
    g = torch.Generator().manual_seed(int(seed))
    raw = acquire(
        Renderer(vol, device=device),
        T_cam_from_ct,
        K.expand(len(angles_deg), 3, 3),
        H,
        W,
        config=acquisition,
        generator=g,
    )
    return write_specimen(
        path,
        volume_hu_kji,
        T_ct_from_index,
        raw_images=raw,
        T_cam_from_ct=T_cam_from_ct,
        K=K,
        pixel_mm=detector.pixel_mm,
        landmarks=landmarks,
        specimen=specimen,
        mask=mask,
        label_names=label_names,
        extrinsic=extrinsic,
        rot_180_for_up=rot_180_for_up,
        append=append,
    )


def _check_specimen(volume_hu_kji: Tensor, mask: Tensor | None, specimen: str) -> None:
    if volume_hu_kji.ndim != 3:
        raise ValueError(f"volume_hu_kji must be 3D (slices, rows, columns), got shape {tuple(volume_hu_kji.shape)}")
    if mask is not None and mask.shape != volume_hu_kji.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from the volume's {tuple(volume_hu_kji.shape)}")
    if specimen == PROJ_PARAMS or not specimen or "/" in specimen:
        raise ValueError(f"invalid specimen name {specimen!r}")


@typing.no_type_check  # validates its own inputs (tests check its errors); no jaxtyping/beartype wrapper
def write_specimen(
    path: str | Path,
    volume_hu_kji: Float[Tensor, "D H W"],
    T_ct_from_index: Float[Tensor, "4 4"],
    *,
    raw_images: Float[Tensor, "V H W"],
    T_cam_from_ct: Float[Tensor, "V 4 4"],
    K: Float[Tensor, "3 3"],
    pixel_mm: float | tuple[float, float],
    landmarks: tuple[Sequence[str], Tensor] | Mapping[str, Sequence[float]],
    specimen: str = "sim-01",
    mask: Tensor | None = None,
    label_names: Mapping[int, str] | None = None,
    extrinsic: Float[Tensor, "4 4"] | None = None,
    rot_180_for_up: bool = False,
    append: bool = False,
) -> SimulatedSpecimen:
    """Write acquisitions made by the caller as specimen ``specimen`` of a DeepFluoro-layout file.

    ``raw_images`` are raw detector intensities (bone dark) in the engine's camera convention
    (they are stored flipped left-right), taken at ``T_cam_from_ct`` with the intrinsics ``K``
    (cam convention, one detector for all views) and pixels of ``pixel_mm`` (row, column) at
    the detector; the images may be rectangular (``num-rows`` = H, ``num-cols`` = W). The
    volume (HU), its ``mask`` and ``landmarks`` (LPS mm) are stored as given. With ``append``,
    the specimen is added to an existing file whose ``proj-params`` must match."""
    import h5py

    path = Path(path)
    _check_specimen(volume_hu_kji, mask, specimen)
    raw = torch.as_tensor(raw_images).detach().to("cpu", torch.float32)
    if raw.ndim != 3 or len(raw) == 0:
        raise ValueError(f"raw_images must be (V, H, W) with V >= 1, got shape {tuple(raw.shape)}")
    V, H, W = raw.shape
    T_cam_from_ct = torch.as_tensor(T_cam_from_ct).to("cpu", torch.float64)
    if T_cam_from_ct.shape != (V, 4, 4):
        raise ValueError(f"T_cam_from_ct must be ({V}, 4, 4) for {V} images, got {tuple(T_cam_from_ct.shape)}")
    K = torch.as_tensor(K).to("cpu", torch.float64)
    if K.shape != (3, 3):
        raise ValueError(f"K must be 3x3 (one detector for all views), got {tuple(K.shape)}")
    sr, sc = (float(pixel_mm), float(pixel_mm)) if isinstance(pixel_mm, (int, float)) else map(float, pixel_mm)
    if not (sr > 0 and sc > 0):
        raise ValueError(f"pixel_mm must be positive, got {pixel_mm}")
    if not torch.isfinite(raw).all() or float(raw.min()) < 0 or float(raw.max()) > 65535:
        raise ValueError("raw_images must be finite detector intensities within 0..65535")
    if float((raw > 0).float().mean()) < 0.05:
        raise ValueError("the simulated views are empty: check the detector and the CT placement")
    lm_names, lm = _landmark_arrays(landmarks)
    T_ct_from_index = T_ct_from_index.to(torch.float64)

    E = (DEFAULT_EXTRINSIC if extrinsic is None else torch.as_tensor(extrinsic)).to(torch.float64)
    K_df = K_to_deepfluoro(K, W)  # the column flip uses the width
    G = torch.stack([cam_to_pelvis_vol_from_T(E, T) for T in T_cam_from_ct])
    # gt-landmarks with the file's own formula: pixel ~ K_df @ (E @ inv(G) @ p)
    p_h = torch.cat([lm, torch.ones(len(lm), 1, dtype=torch.float64)], 1)
    uvw = torch.einsum("ij,vjk,nk->vni", K_df, (E @ torch.linalg.inv(G))[:, :3, :], p_h)
    uv_df = uvw[..., :2] / uvw[..., 2:3]

    mode = "a" if append else "w"
    with h5py.File(path, mode) as f:
        if PROJ_PARAMS in f:
            old_K = np.asarray(f[f"{PROJ_PARAMS}/intrinsic"][()])
            old_E = np.asarray(f[f"{PROJ_PARAMS}/extrinsic"][()])
            old_size = (int(f[f"{PROJ_PARAMS}/num-rows"][()]), int(f[f"{PROJ_PARAMS}/num-cols"][()]))
            if not (np.allclose(old_K, K_df.numpy()) and np.allclose(old_E, E.numpy()) and old_size == (H, W)):
                raise ValueError(f"{path}: proj-params differ from this detector/extrinsic: cannot append")
        else:
            pp = f.create_group(PROJ_PARAMS)
            pp.create_dataset("intrinsic", data=K_df.numpy())
            pp.create_dataset("extrinsic", data=E.numpy())
            pp.create_dataset("num-rows", data=np.int64(H))
            pp.create_dataset("num-cols", data=np.int64(W))
            pp.create_dataset("pixel-row-spacing", data=np.float64(sr))
            pp.create_dataset("pixel-col-spacing", data=np.float64(sc))
        if specimen in f:
            raise ValueError(f"{path}: specimen '{specimen}' already exists")
        s = f.create_group(specimen)
        spacing, origin, direction = _itk_parts(T_ct_from_index)
        _image_group(
            s.create_group("vol"),
            volume_hu_kji.detach().cpu().numpy().astype(np.float32),
            spacing,
            origin,
            direction,
            compress=True,
        )
        if mask is not None:
            m = mask.detach().cpu().numpy()
            seg = s.create_group("vol-seg")
            _image_group(
                seg.create_group("image"),
                m.astype(np.uint8 if m.max() < 256 else np.uint16),
                spacing,
                origin,
                direction,
                compress=True,
            )
            defs = seg.create_group("labels-def")
            for label in sorted(np.unique(m).tolist()):
                if label != 0:
                    defs.create_dataset(
                        str(int(label)), data=(label_names or {}).get(int(label), f"label-{int(label)}")
                    )
        lg = s.create_group("vol-landmarks")
        for n, p in zip(lm_names, lm):
            lg.create_dataset(n, data=p.numpy().reshape(3, 1))
        projs = s.create_group("projections")
        stored = flip_columns(raw).numpy().astype(np.float32)  # file convention
        for v in range(V):
            pg = projs.create_group(f"{v:03d}")
            _image_group(pg.create_group("image"), stored[v], (sc, sr), (0.0, 0.0), np.eye(2), compress=False)
            gl = pg.create_group("gt-landmarks")
            for n, uv in zip(lm_names, uv_df[v]):
                gl.create_dataset(n, data=uv.numpy().reshape(2, 1))
            pg.create_group("gt-poses").create_dataset("cam-to-pelvis-vol", data=G[v].numpy())
            pg.create_dataset("rot-180-for-up", data=np.int64(bool(rot_180_for_up)))
    return SimulatedSpecimen(
        specimen=specimen,
        T_cam_from_ct=T_cam_from_ct,
        K=K,
        extrinsic=E,
        cam_to_pelvis_vol=G,
        landmark_names=tuple(lm_names),
        landmarks_ct=lm,
    )
