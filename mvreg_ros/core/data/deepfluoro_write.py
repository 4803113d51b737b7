"""Writing simulated acquisitions in the DeepFluoro layout (read back by
:class:`mvreg_ros.core.data.deepfluoro.DeepFluoroFile`; the layout is described there)."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.data.deepfluoro import PROJ_PARAMS, SOURCE_TO_ISOCENTER
from mvreg_ros.core.data.simulate import AcquisitionConfig, DetectorConfig, acquire, make_scene
from mvreg_ros.core.evaluation.landmarks import bone_octants, structure_centroids
from mvreg_ros.core.geometry.transforms import (
    K_to_deepfluoro,
    cam_to_pelvis_vol_from_T,
    flip_columns,
    make_T,
    so3_exp,
)
from mvreg_ros.core.imaging.volume import from_hu
from mvreg_ros.core.rendering.renderer import Renderer


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
        sid_mm=detector.sid_mm,
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
    sid_mm: float | None = None,
) -> SimulatedSpecimen:
    """Write acquisitions made by the caller as specimen ``specimen`` of a DeepFluoro-layout file.

    ``raw_images`` are raw detector intensities (bone dark) in the engine's camera convention
    (they are stored flipped left-right), taken at ``T_cam_from_ct`` with the intrinsics ``K``
    (cam convention, one detector for all views) and pixels of ``pixel_mm`` (row, column) at
    the detector; the images may be rectangular (``num-rows`` = H, ``num-cols`` = W). The
    volume (HU), its ``mask`` and ``landmarks`` (LPS mm) are stored as given. With ``append``,
    the specimen is added to an existing file whose ``proj-params`` must match. ``sid_mm``, the
    C-arm's source-to-isocentre distance, goes to ``proj-params/source-to-isocenter`` (this
    project's addition to the layout: the coarse network's depth prior, ``mvreg train``)."""
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
    if sid_mm is not None and not (math.isfinite(sid_mm) and sid_mm > 0):
        raise ValueError(f"sid_mm must be a positive number or None, got {sid_mm!r}")
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
            if sid_mm is not None:
                pp.create_dataset(SOURCE_TO_ISOCENTER, data=np.float64(sid_mm))
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
