"""The patient-specific coarse pose network and its checkpoints.

One small residual CNN, shared by all views, reads a single preprocessed view (line
integrals normalised inside the network, the field-of-view mask and two coordinate channels)
and regresses the anatomy pose in that view's camera frame ``T_cam_from_ct``:

- rotation: a continuous 6D parameterisation (two columns, Gram-Schmidt) of a rotation
  ``R_delta`` applied to the canonical AP rotation ``R0`` (zero output = AP view);
- translation: the pixel where the anatomy centre ``centre_ct`` projects (offset from the
  image centre, in half image sizes) and its depth (log-ratio to the source-isocentre
  distance). The pixel becomes a ray through the actual intrinsics at decoding time.

Checkpoints are safetensors files (no pickle) whose metadata holds a JSON document with the
architecture, the geometry, the training config, the detector shape it was trained for
and the CT's identity; a ``.json`` sidecar
with the same document is written for people.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.geometry.transforms import make_T

FORMAT = "mvreg_ros.coarse/1"


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Architecture of :class:`PoseNet` (stored in checkpoints; loading checks it)."""

    size: int = 64  # working image size (square, px; other detectors are letterboxed, see coarse.to_working_size)
    width: int = 32  # channels of the first stage; doubled at each of the next three
    fc: int = 256  # hidden units of the pose head
    rot_scale: float = 1.0  # output scaling of the 6D rotation residual
    uv_scale: float = 0.25  # centre pixel offset = output * uv_scale * size / 2
    depth_scale: float = 0.1  # depth = sid * exp(output * depth_scale)

    def __post_init__(self):
        if self.size < 16 or self.size % 16:
            raise ValueError(f"size must be a multiple of 16 and >= 16, got {self.size}")
        if self.width < 4 or self.fc < 8:
            raise ValueError(f"width ({self.width}) and fc ({self.fc}) are too small")


def rotation_from_6d(x: Float[Tensor, "... 6"]) -> Float[Tensor, "... 3 3"]:
    """Rotation whose first two columns are Gram-Schmidt of ``x[:3]`` and ``x[3:]``
    (Zhou et al. 2019); ``x = (1,0,0, 0,1,0)`` is the identity."""
    a, b = x[..., :3], x[..., 3:]
    e1 = F.normalize(a, dim=-1, eps=1e-8)
    b = b - (e1 * b).sum(-1, keepdim=True) * e1
    e2 = F.normalize(b, dim=-1, eps=1e-8)
    e3 = torch.linalg.cross(e1, e2, dim=-1)
    return torch.stack([e1, e2, e3], -1)


def normalise_images(images: Float[Tensor, "N H W"], masks: Float[Tensor, "N H W"]) -> Float[Tensor, "N H W"]:
    """Masked z-score per image (invariant to the unknown I0 and to the beam energy)."""
    w = masks.to(images)
    n = w.sum((-2, -1), keepdim=True).clamp_min(1.0)
    mean = (images * w).sum((-2, -1), keepdim=True) / n
    var = (((images - mean) * w) ** 2).sum((-2, -1), keepdim=True) / n
    return (images - mean) / var.clamp_min(1e-12).sqrt() * w


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.skip = None
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return F.relu(y + (x if self.skip is None else self.skip(x)))


class PoseNet(nn.Module):
    """Per-view CNN: (N, H, W) images + masks -> (N, 9) raw pose outputs."""

    def __init__(self, arch: ArchConfig = ArchConfig()):
        super().__init__()
        self.arch = arch
        w = arch.width
        self.stem = nn.Sequential(nn.Conv2d(4, w, 5, 2, 2, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.stages = nn.Sequential(
            _Block(w, w, 1), _Block(w, 2 * w, 2), _Block(2 * w, 4 * w, 2), _Block(4 * w, 8 * w, 2)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * w * 16, arch.fc), nn.ReLU(), nn.Linear(arch.fc, 9))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, images: Float[Tensor, "N H W"], masks: Float[Tensor, "N H W"]) -> Float[Tensor, "N 9"]:
        s = self.arch.size
        if images.shape[-2:] != (s, s) or masks.shape != images.shape:
            raise ValueError(
                f"PoseNet expects images and masks of shape (N, {s}, {s}), got "
                f"{tuple(images.shape)} and {tuple(masks.shape)}"
            )
        x = normalise_images(images.float(), masks.float())
        N = x.shape[0]
        lin = torch.linspace(-1, 1, s, device=x.device, dtype=x.dtype)
        yy, xx = torch.meshgrid(lin, lin, indexing="ij")
        inp = torch.stack([x, masks.to(x), xx.expand(N, s, s), yy.expand(N, s, s)], 1)
        f = self.stages(self.stem(inp))
        f = F.adaptive_avg_pool2d(f, 4)
        return self.head(f)


@dataclasses.dataclass(frozen=True)
class PoseGeometry:
    """What turns raw outputs into poses: the anatomy centre, the canonical rotation and the
    source-isocentre distance (all stored in checkpoints)."""

    centre_ct: tuple[float, float, float]
    R0_cam_from_ct: tuple[tuple[float, ...], ...]  # 3x3, the AP view's rotation
    sid_mm: float

    def tensors(self, device=None, dtype=torch.float64) -> tuple[Tensor, Tensor]:
        return (
            torch.tensor(self.centre_ct, dtype=dtype, device=device),
            torch.tensor(self.R0_cam_from_ct, dtype=dtype, device=device),
        )


def decode(
    out: Float[Tensor, "N 9"], K: Float[Tensor, "N 3 3"], *, arch: ArchConfig, geometry: PoseGeometry
) -> Float[Tensor, "N 4 4"]:
    """Raw network outputs to ``T_cam_from_ct`` (float64, mm), with ``K`` at working size."""
    out = out.to(torch.float64)
    K = K.to(out)
    c, R0 = geometry.tensors(out.device)
    eye6 = torch.tensor([1.0, 0, 0, 0, 1.0, 0], dtype=out.dtype, device=out.device)
    R = rotation_from_6d(eye6 + arch.rot_scale * out[:, :6]) @ R0
    half = (arch.size - 1) / 2
    uv = half + out[:, 6:8] * arch.uv_scale * arch.size / 2
    depth = geometry.sid_mm * torch.exp(arch.depth_scale * out[:, 8])
    uv1 = torch.cat([uv, torch.ones_like(uv[:, :1])], -1)
    ray = torch.linalg.solve(K, uv1[..., None])[..., 0]
    p_cam = ray / ray[:, 2:3] * depth[:, None]
    t = p_cam - (R @ c[:, None])[..., 0]
    return make_T(R, t)


def encode_targets(
    T_cam_from_ct: Float[Tensor, "N 4 4"], K: Float[Tensor, "N 3 3"], *, arch: ArchConfig, geometry: PoseGeometry
) -> Float[Tensor, "N 9"]:
    """Inverse of :func:`decode` (the raw outputs that decode to the given poses)."""
    T = T_cam_from_ct.to(torch.float64)
    c, R0 = geometry.tensors(T.device)
    Rd = T[:, :3, :3] @ R0.T
    six = torch.cat([Rd[:, :, 0], Rd[:, :, 1]], -1) - torch.tensor(
        [1.0, 0, 0, 0, 1.0, 0], dtype=T.dtype, device=T.device
    )
    p = (T[:, :3, :3] @ c[:, None])[..., 0] + T[:, :3, 3]
    uvw = (K.to(T) @ p[..., None])[..., 0]
    uv = uvw[:, :2] / uvw[:, 2:3]
    half = (arch.size - 1) / 2
    o_uv = (uv - half) / (arch.uv_scale * arch.size / 2)
    o_d = torch.log(p[:, 2] / geometry.sid_mm) / arch.depth_scale
    return torch.cat([six / arch.rot_scale, o_uv, o_d[:, None]], -1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here (other CT, other architecture, bad file)."""


def save_checkpoint(
    path: str | Path,
    model: PoseNet,
    *,
    geometry: PoseGeometry,
    volume_identity: dict,
    config: dict | None = None,
    extra: dict | None = None,
    detector_shape: tuple[int, int] | None = None,
) -> Path:
    """Weights (and BatchNorm statistics) as safetensors, metadata as JSON inside and beside it.
    ``detector_shape`` (rows, columns): the detector the network was trained for."""
    from safetensors.torch import save_file

    path = Path(path)
    if detector_shape is not None and (len(detector_shape) != 2 or min(int(x) for x in detector_shape) < 1):
        raise ValueError(f"detector_shape must be (rows, columns) > 0, got {detector_shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "architecture": dataclasses.asdict(model.arch),
        "geometry": dataclasses.asdict(geometry),
        "volume": volume_identity,
        "config": config or {},
        "extra": extra or {},
    }
    if detector_shape is not None:
        meta["detector_shape"] = [int(detector_shape[0]), int(detector_shape[1])]
    text = json.dumps(meta, indent=1)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"mvreg_ros": text})
    tmp.replace(path)
    path.with_suffix(".json").write_text(text + "\n")
    return path


def read_metadata(path: str | Path) -> dict:
    """The JSON document stored in a checkpoint."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path}: not a safetensors checkpoint ({e})") from e
    if "mvreg_ros" not in meta:
        raise CheckpointError(f"{path}: safetensors file without mvreg_ros metadata")
    doc = json.loads(meta["mvreg_ros"])
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
    return doc


def load_checkpoint(
    path: str | Path, *, volume_identity: dict | None = None, arch: ArchConfig | None = None, device="cpu"
) -> tuple[PoseNet, PoseGeometry, dict]:
    """Model, geometry and metadata of a checkpoint. Refuses one made for another CT
    (``volume_identity`` differs) or another architecture (``arch`` differs)."""
    from safetensors.torch import load_file

    doc = read_metadata(path)
    if volume_identity is not None:
        mine = doc["volume"]
        for key in ("sha256", "shape", "spacing_mm"):
            if mine.get(key) != volume_identity.get(key):
                raise CheckpointError(
                    f"{path} was trained for another CT: {key} is {mine.get(key)} in the checkpoint but "
                    f"{volume_identity.get(key)} for this volume; train a model for this CT with `mvreg train`"
                )
    try:
        stored_arch = ArchConfig(**doc["architecture"])
    except TypeError as e:
        raise CheckpointError(f"{path}: unknown architecture fields {doc['architecture']}") from e
    if arch is not None and arch != stored_arch:
        raise CheckpointError(f"{path} has architecture {stored_arch}, but {arch} was requested")
    shape = doc.get("detector_shape")
    if shape is not None and not (
        isinstance(shape, list) and len(shape) == 2 and all(isinstance(x, int) and x > 0 for x in shape)
    ):
        raise CheckpointError(f"{path}: detector_shape must be [rows, columns] > 0, got {shape!r}")
    model = PoseNet(stored_arch)
    state = load_file(str(path), device="cpu")
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the architecture (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the architecture: {e}") from e
    g = doc["geometry"]
    geometry = PoseGeometry(
        centre_ct=tuple(g["centre_ct"]),
        R0_cam_from_ct=tuple(tuple(r) for r in g["R0_cam_from_ct"]),
        sid_mm=float(g["sid_mm"]),
    )
    return model.to(device).eval(), geometry, doc
