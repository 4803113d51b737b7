"""The CT's bone surface as a ``visualization_msgs/Marker`` (``~/anatomy_marker``).

:func:`bone_surface` is pure (NumPy, scikit-image): marching cubes on the CT's attenuation at a
bone threshold, coarse enough for at most ``max_triangles`` triangles, with the vertices in
metres in the CT's physical LPS frame, which is the node's ``anatomy_frame``. :func:`marker_msg`
turns it into a ``TRIANGLE_LIST`` marker in that frame (stamp 0: RViz and Foxglove draw it at
the latest TF, so it follows the published anatomy pose).
"""

from __future__ import annotations

import math
import typing

import numpy as np
import torch

from mvreg_ros.core.imaging.volume import BONE_HU, Volume, hu_to_mu

MAX_TRIANGLES = 50_000
MAX_VOXELS = 2**24  # a bigger CT is average-pooled first (the surface needs no finer grid)
BONE_RGBA = (0.93, 0.89, 0.78, 1.0)


@typing.no_type_check  # validates its own inputs (tests check its errors); no jaxtyping/beartype wrapper
def bone_surface(
    volume: Volume, *, threshold_hu: float = BONE_HU, max_triangles: int = MAX_TRIANGLES
) -> tuple[np.ndarray, np.ndarray]:
    """``(vertices, triangles)`` of the surface where the CT crosses ``threshold_hu``:
    vertices ``(N, 3)`` float64 in metres in the CT's LPS frame, triangles ``(M, 3)`` int64
    indices into them, ``M <= max_triangles``. Empty arrays when no voxel crosses the threshold."""
    from skimage.measure import marching_cubes

    if not isinstance(volume, Volume):
        raise TypeError(f"volume must be a Volume, got {type(volume).__name__}")
    if isinstance(max_triangles, bool) or not isinstance(max_triangles, int) or max_triangles < 1:
        raise ValueError(f"max_triangles must be an integer >= 1, got {max_triangles!r}")
    if not isinstance(threshold_hu, (int, float)) or isinstance(threshold_hu, bool) or not math.isfinite(threshold_hu):
        raise ValueError(f"threshold_hu must be a finite number, got {threshold_hu!r}")
    empty = np.zeros((0, 3), np.float64), np.zeros((0, 3), np.int64)
    vol = volume
    if vol.data.numel() > MAX_VOXELS:
        vol = vol.resampled(math.ceil((vol.data.numel() / MAX_VOXELS) ** (1 / 3)))
    data = vol.data.detach().to("cpu", torch.float32).numpy()
    level = float(hu_to_mu(torch.tensor(float(threshold_hu))))
    if min(data.shape) < 2 or not (data.min() < level < data.max()):
        return empty
    step = 1
    while True:
        verts, faces, _, _ = marching_cubes(data, level=level, step_size=step, allow_degenerate=False)
        if len(faces) <= max_triangles or step >= max(data.shape):
            break
        step = max(step + 1, math.ceil(step * math.sqrt(len(faces) / max_triangles)))
    if len(faces) > max_triangles:  # a last resort on pathological volumes: every k-th triangle
        faces = faces[:: math.ceil(len(faces) / max_triangles)]
    if len(faces) == 0:
        return empty
    A = vol.T_ct_from_index.detach().to("cpu", torch.float64).numpy()
    ijk = verts[:, ::-1].astype(np.float64)  # marching cubes works in (k, j, i)
    vertices_mm = ijk @ A[:3, :3].T + A[:3, 3]
    used = np.unique(faces)
    remap = np.full(len(vertices_mm), -1, np.int64)
    remap[used] = np.arange(len(used))
    return vertices_mm[used] / 1000.0, remap[faces].astype(np.int64)


@typing.no_type_check
def marker_msg(vertices_m: np.ndarray, triangles: np.ndarray, *, frame_id: str, rgba=BONE_RGBA):
    """A ``visualization_msgs/Marker`` TRIANGLE_LIST (ns ``anatomy``, id 0, frame-locked, stamp 0)
    of the surface in ``frame_id``."""
    from geometry_msgs.msg import Point
    from std_msgs.msg import ColorRGBA
    from visualization_msgs.msg import Marker

    vertices_m = np.asarray(vertices_m, dtype=np.float64)
    triangles = np.asarray(triangles)
    if vertices_m.ndim != 2 or vertices_m.shape[1] != 3:
        raise ValueError(f"vertices_m must be (N, 3), got {vertices_m.shape}")
    if triangles.ndim != 2 or triangles.shape[1] != 3 or not np.issubdtype(triangles.dtype, np.integer):
        raise ValueError(f"triangles must be (M, 3) integers, got {triangles.shape} {triangles.dtype}")
    if triangles.size and (triangles.min() < 0 or triangles.max() >= len(vertices_m)):
        raise ValueError(f"triangles index vertices outside 0..{len(vertices_m) - 1}")
    if not np.isfinite(vertices_m).all():
        raise ValueError("vertices_m holds NaN or infinite values")
    if not isinstance(frame_id, str) or not frame_id:
        raise ValueError(f"frame_id must be a non-empty frame name, got {frame_id!r}")
    m = Marker()
    m.header.frame_id = frame_id
    m.ns, m.id = "anatomy", 0
    m.type, m.action = Marker.TRIANGLE_LIST, Marker.ADD
    m.pose.orientation.w = 1.0
    m.scale.x = m.scale.y = m.scale.z = 1.0
    m.color = ColorRGBA(r=float(rgba[0]), g=float(rgba[1]), b=float(rgba[2]), a=float(rgba[3]))
    m.frame_locked = True
    m.points = [Point(x=x, y=y, z=z) for x, y, z in vertices_m[triangles.reshape(-1)].tolist()]
    return m
