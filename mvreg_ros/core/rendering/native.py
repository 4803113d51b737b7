"""The CPU renderer backend "native": a C++ extension whose kernel (``csrc/trilinear_sums.cpp``) sums trilinear
samples along rays with hardware gathers (AVX-512 or AVX2, scalar elsewhere) and returns, in the
same pass, the sums' gradients with respect to each ray's first sample and sample step, so the
backward pass needs no per-sample memory. ``csrc/ray_setup.cpp`` computes the rays of each view
from its pose (:func:`renderer.ray_samples`' arithmetic) and, in the backward, the pose's gradient
reduced over the view's rays (:func:`render_rays`); nothing is compiled at run time. A float16 volume
larger than the caches is rendered from bricks (:class:`Bricked`: a sample's corners in about half the
cache lines; the same values). The same
extension holds the refinement's fused similarity (``csrc/patch_ncc.cpp``,
:class:`~mvreg_ros.core.registration.similarity.PreparedSimilarity`) and its pose chain (``csrc/pose_chain.cpp``,
:mod:`~mvreg_ros.core.rendering.pose_chain`).

The extension is compiled for this CPU on first use with ``torch.utils.cpp_extension`` (a C++
compiler and ninja are needed; about 30 s once, then cached under ``TORCH_EXTENSIONS_DIR``, by
default ``~/.cache/torch_extensions``, one build per CPU model, torch and Python version).
:func:`load` returns None when it cannot be built, and the renderer then falls back to its
compiled (Inductor) backend, the similarity to ATen ops.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import shutil
import sys
import threading
import time
import typing
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor
from torch.autograd.function import once_differentiable

SOURCE = Path(__file__).parent / "csrc" / "trilinear_sums.cpp"
SOURCES = tuple(  # one extension; SOURCE holds its module definition
    [SOURCE] + [Path(__file__).parent / "csrc" / name for name in ("ray_setup.cpp", "patch_ncc.cpp", "pose_chain.cpp")]
)
STALE_LOCK_S = 600.0  # a build lock older than this was left by a killed build
LOCK_POLL_S = 0.5  # how often a build waiting for another's lock looks again

_LOCK = threading.Lock()
_STATE: dict = {}


def _cpu_signature() -> str:
    """What a -march=native binary depends on: the CPU's model and flags (Linux), else the platform."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def extension_name() -> str:
    """Cache key of the build: compiled with -march=native against this torch and Python, so one
    build per CPU model and flags, torch version, Python version and kernel source (its path too:
    ninja rebuilds when the path changes, so two checkouts sharing one key would rebuild in turn)."""
    key = "|".join(
        [
            _cpu_signature(),
            torch.__version__,
            platform.python_version(),
            str(SOURCE.resolve()),
            *(hashlib.sha1(s.read_bytes()).hexdigest() for s in SOURCES),
        ]
    )
    return f"mvreg_trilinear_sums_{platform.machine().lower()}_{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def load():
    """The compiled extension module, or None if it cannot be built here (warns once)."""
    with _LOCK:
        if "module" not in _STATE:
            _STATE["module"] = _build()
        return _STATE["module"]


def _ninja_on_path() -> None:
    """torch's extension builder runs ``ninja`` from PATH: add the pip-installed one when the
    venv's bin directory is not on PATH (a venv used without activating it)."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def build_directory(name: str) -> Path:
    from torch.utils import cpp_extension

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / name


def _clear_stale_lock(directory: Path, *, stale_s: float = STALE_LOCK_S, poll_s: float = LOCK_POLL_S) -> None:
    """torch waits without limit for another build's lock, and its lock file names no owner. So
    wait here instead while the lock is younger than ``stale_s`` (another process building takes
    seconds), and remove it once it is older: it was left by a killed build (a node stopped during
    its first start, a killed set-up). Looking only once, as before, let a start that came within
    ``stale_s`` of such a kill wait for good."""
    lock = directory / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > stale_s:
            try:
                lock.unlink()
            except FileNotFoundError:
                return
            warnings.warn(f"removed a stale build lock {lock} ({age:.0f} s old)", RuntimeWarning, stacklevel=2)
            return
        time.sleep(poll_s)


def build(name: str, march: str = "native"):
    """Compile (or load the cached build of) the kernel for ``-march=march``; raises on failure.
    The default build targets this CPU; tests build the other instruction sets with it."""
    from torch.utils import cpp_extension

    _ninja_on_path()
    directory = build_directory(name)
    directory.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(directory)
    if not any(directory.glob("*.so")):
        print(
            f"mvreg_ros: compiling the native renderer kernel for this CPU (once, about 30 s) in {directory}",
            file=sys.stderr,
            flush=True,
        )
    return cpp_extension.load(
        name=name,
        sources=[str(s) for s in SOURCES],
        extra_cflags=["-O3", f"-march={march}", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=False,
    )


def _build():
    try:
        return build(extension_name())
    except Exception as e:
        warnings.warn(
            f"the native CPU renderer could not be built ({type(e).__name__}: {e}); the renderer uses "
            "the torch.compile backend (or grid_sample where that cannot compile either)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _module():
    module = load()
    if module is None:
        raise RuntimeError("the native CPU renderer is not available on this machine (see the build warning)")
    return module


@torch.library.custom_op("mvreg::trilinear_sums", mutates_args=())
@typing.no_type_check  # no jaxtyping/beartype wrapper: custom_op infers its schema from the signature
def _sums(padded: Tensor, p0: Tensor, q: Tensor, n_samples: int) -> Tensor:
    return _module().sample_sums(padded, p0, q, n_samples, False)[0]


@torch.library.custom_op("mvreg::trilinear_sums_with_grad", mutates_args=())
@typing.no_type_check  # no jaxtyping/beartype wrapper: custom_op infers its schema from the signature
def _sums_with_grad(padded: Tensor, p0: Tensor, q: Tensor, n_samples: int) -> tuple[Tensor, Tensor, Tensor]:
    f, g, h = _module().sample_sums(padded, p0, q, n_samples, True)  # p0, q: contiguous or planar
    return f, g, h


@_sums.register_fake
def _(padded, p0, q, n_samples):
    return p0.new_empty(p0.shape[:-1])


def planar_empty(like: Tensor) -> Tensor:
    """An empty tensor of ``like``'s shape ``(..., 3)`` stored planar: the 3 coordinates of all rays in
    turn (``movedim(0, -1)`` of a contiguous ``(3, ...)``), the layout of the kernel's G and H."""
    return like.new_empty((3, *like.shape[:-1])).movedim(0, -1)


@_sums_with_grad.register_fake
def _(padded, p0, q, n_samples):  # the kernel returns F contiguous, G and H planar
    return p0.new_empty(p0.shape[:-1]), planar_empty(p0), planar_empty(p0)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


@once_differentiable  # G and H are not differentiable: a second derivative raises instead of being wrong
def _backward(ctx, grad_f, grad_g, grad_h):
    G, H = ctx.saved_tensors  # dF/dp0 and dF/dq, from the forward pass
    return None, grad_f[..., None] * G, grad_f[..., None] * H, None


_sums_with_grad.register_autograd(_backward, setup_context=_setup_context)


@typing.no_type_check  # traced by torch.compile (the jaxtyping/beartype wrapper of the tests breaks tracing)
def check_sums_inputs(padded: Tensor, n_samples: int, *, bricked_ok: bool = False) -> None:
    """The checks both backends' ``sample_sums`` share (the kernel checks the rest); ``bricked_ok``: a
    :class:`Bricked` volume is taken too (:func:`render_rays`; its shape was checked when it was made)."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if isinstance(padded, Bricked):
        if bricked_ok:
            return
        raise ValueError("sample_sums takes a plain volume (D, H, W); a Bricked volume is rendered by render_rays")
    if padded.ndim != 3 or min(padded.shape) < 2:
        raise ValueError(f"padded must be (D, H, W) with at least 2 voxels per axis, got {tuple(padded.shape)}")
    if padded.requires_grad:
        raise ValueError("gradients with respect to the volume are not computed: pass padded without requires_grad")


@typing.no_type_check  # traced by torch.compile (the jaxtyping/beartype wrapper of the tests breaks tracing)
def sample_sums(
    padded: Float[Tensor, "D H W"], p0: Float[Tensor, "*B 3"], q: Float[Tensor, "*B 3"], n_samples: int
) -> Float[Tensor, "*B"]:
    """``sum_k f(p0 + k q)``, k = 0..n_samples-1, f the trilinear interpolation of ``padded``
    (index coordinates, x fastest, clamped to the box as grid_sample's border padding);
    differentiable once in ``p0`` and ``q``. Requires :func:`load` to have succeeded."""
    check_sums_inputs(padded, n_samples)  # (no load() here: its lock would break torch.compile's graph)
    if torch.is_grad_enabled() and (p0.requires_grad or q.requires_grad):
        return _sums_with_grad(padded, p0, q, int(n_samples))[0]
    return _sums(padded, p0, q, int(n_samples))


BRICK = (2, 4, 4)  # voxels per brick along (z, y, x): 32 float16 values, one 64-byte cache line
BRICK_CELLS_X = 3  # the bricks overlap by one voxel along x: brick b holds x = 3b .. 3b + 3
BRICKED_MAX_WIDTH = 49152  # the kernel's x / 3 as (x * 43691) >> 17 stays within 31 bits


@dataclasses.dataclass(frozen=True, eq=False)
class Bricked:
    """A padded float16 volume (:func:`renderer.pad_volume`) stored in bricks of 4 x 4 x 2 voxels (x, y,
    z) that overlap by one voxel along x (``csrc/trilinear_sums.cpp``, ``BrickedVolume``): one brick per
    64-byte cache line, so a trilinear sample's 8 corners lie in 1.9 lines on average instead of the 4 rows
    of the plain layout. For a volume far larger than the caches (the unpooled CT at the finest level) the
    kernel then waits on memory about half as long, for a third more memory; it reads the same values
    (:func:`unbricked` gives the plain volume back)."""

    data: Tensor  # 1-D float16: the bricks in (z, y, x) order, each x fastest, then y, then z; one spare brick
    shape: tuple[int, int, int]  # the padded volume's (D, H, W)

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


def _bricks(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Bricks along (z, y, x) of a padded volume of ``shape`` (along x: its cells, three per brick)."""
    D, H, W = shape
    return -(-D // BRICK[0]), -(-H // BRICK[1]), -(-(W - 1) // BRICK_CELLS_X)


def bricked(padded: Float[Tensor, "D H W"]) -> Bricked:
    """``padded`` (float16, CPU, at least 2 voxels per axis, at most 49,152 along x) in overlapping bricks
    (:class:`Bricked`; zeros beyond its edges, never read)."""
    if padded.ndim != 3 or padded.dtype != torch.float16 or padded.device.type != "cpu":
        raise ValueError(f"bricked needs a float16 CPU volume (D, H, W), got {padded.dtype} {tuple(padded.shape)}")
    if not fits_bricks(tuple(padded.shape)):
        raise ValueError(
            f"bricked needs at least 2 voxels per axis, at most {BRICKED_MAX_WIDTH:,} along x and fewer than 2^31 "
            f"values in its bricks, got {tuple(padded.shape)}"
        )
    D, H, W = (int(n) for n in padded.shape)
    nz, ny, nx = _bricks((D, H, W))
    bz, by, bx = BRICK
    size = nz * ny * nx * bz * by * bx
    data = padded.new_zeros(size + bz * by * bx)  # a spare brick
    blocks = data[:size].view(nz, ny, nx, bz, by, bx)
    for k in range(nz):  # slab by slab: no second full-size copy
        slab = padded[k * bz : (k + 1) * bz]
        full = padded.new_zeros(bz, ny * by, nx * BRICK_CELLS_X + 1)
        full[: len(slab), :H, :W] = slab
        windows = full.unfold(2, bx, BRICK_CELLS_X)  # (bz, ny * by, nx, bx): x = 3b .. 3b + 3
        blocks[k] = windows.reshape(bz, ny, by, nx, bx).permute(1, 3, 0, 2, 4)
    return Bricked(data=data, shape=(D, H, W))


def unbricked(volume: Bricked) -> Float[Tensor, "D H W"]:
    """The plain padded volume of ``volume`` (:func:`bricked`'s inverse)."""
    D, H, W = volume.shape
    nz, ny, nx = _bricks(volume.shape)
    bz, by, bx = BRICK
    blocks = volume.data[: nz * ny * nx * bz * by * bx].view(nz, ny, nx, bz, by, bx)
    out = volume.data.new_zeros(nz * bz, ny * by, nx * BRICK_CELLS_X + 1)
    for b in range(nx):  # each brick's x = 3b .. 3b + 3 (the overlap written twice, the same values)
        out[:, :, BRICK_CELLS_X * b : BRICK_CELLS_X * b + bx] = (
            blocks[:, :, b].permute(0, 2, 1, 3, 4).reshape(nz * bz, ny * by, bx)
        )
    return out[:D, :H, :W].contiguous()


def fits_bricks(shape: tuple[int, int, int]) -> bool:
    """Whether a padded volume of ``shape`` can be bricked: at most :data:`BRICKED_MAX_WIDTH` wide, and
    its bricks addressable with 32-bit offsets as the kernel's."""
    if min(shape) < 2 or shape[2] > BRICKED_MAX_WIDTH:
        return False
    nz, ny, nx = _bricks(shape)
    return (nz * ny * nx + 1) * BRICK[0] * BRICK[1] * BRICK[2] < 2**31


def _volume_args(padded: "Tensor | Bricked") -> tuple[Tensor, list[int]]:
    """The kernel's volume and shape arguments: a plain volume with no shape, a bricked one's storage with
    its padded shape."""
    if isinstance(padded, Bricked):
        return padded.data, list(padded.shape)
    return padded, []


class _RenderRays(torch.autograd.Function):
    """The native backend's render: the ray set-up (``csrc/ray_setup.cpp``, :func:`renderer.ray_samples`'
    arithmetic) and the kernel's sums in one call; the backward reduces each view's gradient in C++."""

    @staticmethod
    def forward(
        ctx,
        T_index_from_cam: Tensor,
        d_cam: Tensor,
        data: Tensor,
        shape: list,
        n_samples: int,
        poses: int,
        ray_index,
        image_pixels: int,
        prefetch: bool,
    ) -> Tensor:
        out, f, G, H = _module().render_rays(T_index_from_cam, d_cam, data, n_samples, True, poses, shape, prefetch)
        ctx.save_for_backward(T_index_from_cam, d_cam, data, f, G, H)
        ctx.n_samples, ctx.ray_index, ctx.image_pixels, ctx.shape = n_samples, ray_index, image_pixels, shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        T, d_cam, data, f, G, H = ctx.saved_tensors
        dT = _module().render_rays_backward(
            grad_out.contiguous(), T, d_cam, data, f, G, H, ctx.n_samples, ctx.ray_index, ctx.image_pixels, ctx.shape
        )
        return dT, None, None, None, None, None, None, None, None


@typing.no_type_check  # validates its own inputs (the kernel checks them); no jaxtyping/beartype wrapper
def render_rays(
    T_index_from_cam: Float[Tensor, "V 3 4"],
    d_cam: Float[Tensor, "3 V R"],
    padded: "Tensor | Bricked",
    n_samples: int,
    *,
    poses: int = 1,
    ray_index: Tensor | None = None,
    image_pixels: int = 0,
    prefetch: bool = True,
) -> Float[Tensor, "V R"]:
    """Line integrals ``h * sum_k f(p0 + k q)`` of each view's rays (the native backend's render): the
    rays of :func:`renderer.ray_samples` for ``T_index_from_cam`` (float64, the first three rows) and
    the unit directions ``d_cam`` (float64, camera axes), summed by the kernel; differentiable once in
    ``T_index_from_cam``. ``poses``: the V renders are (poses, V / poses) flattened, the poses close
    together (a curvature's finite differences): the kernel then takes a block of rays of every pose in
    turn, which read the same voxels (the same values; 64 to 76 against 42 ms for the 13 poses of a
    2-view curvature at 128 px of the shipped CT). ``ray_index``: the rays are a subset of each render's full
    image (:class:`~mvreg_ros.core.rendering.subset.RaySubset`) of ``image_pixels`` pixels, these their
    pixels' indices there (ascending in each render; ``image_pixels`` itself marks a padding ray, whose
    gradient is left out); the backward then sums the rays' gradients in the full image's order of work, so
    that it gives the full render's gradient bit for bit when the pixels left out have none.
    ``prefetch``: a :class:`Bricked` volume's cache lines are prefetched two samples ahead (the same values;
    False: not, the reference and A/B timings' other side). Requires :func:`load` to have succeeded."""
    T, d, data, shape, ray_index = _render_args(
        T_index_from_cam, d_cam, padded, n_samples, poses, ray_index, image_pixels, prefetch
    )
    if torch.is_grad_enabled() and T.requires_grad:
        return _RenderRays.apply(T, d, data, shape, int(n_samples), poses, ray_index, image_pixels, prefetch)
    return _module().render_rays(T, d, data, int(n_samples), False, poses, shape, prefetch)[0]


def render_rays_vjp(
    T_index_from_cam: Float[Tensor, "V 3 4"],
    d_cam: Float[Tensor, "3 V R"],
    padded: "Tensor | Bricked",
    n_samples: int,
    *,
    poses: int = 1,
    ray_index: Tensor | None = None,
    image_pixels: int = 0,
    prefetch: bool = True,
) -> tuple[Float[Tensor, "V R"], Callable[[Tensor], Tensor]]:
    """:func:`render_rays`' renders and their pullback (the gradient of the renders to that of
    ``T_index_from_cam``) without autograd: the same kernel calls as its forward and backward, so the same
    values bit for bit (a test checks), for a caller that chains its own backward (the refinement's
    iteration, :meth:`~mvreg_ros.core.registration.refine.Objective.ascent`)."""
    T, d, data, shape, ray_index = _render_args(
        T_index_from_cam, d_cam, padded, n_samples, poses, ray_index, image_pixels, prefetch
    )
    S = int(n_samples)
    out, f, G, H = _module().render_rays(T, d, data, S, True, poses, shape, prefetch)

    def pullback(grad_out: Tensor) -> Tensor:
        return _module().render_rays_backward(
            grad_out.contiguous(), T, d, data, f, G, H, S, ray_index, image_pixels, shape
        )

    return out, pullback


def _render_args(T_index_from_cam, d_cam, padded, n_samples, poses, ray_index, image_pixels, prefetch):
    """:func:`render_rays`' inputs checked and laid out for the kernel: ``(T, d, data, shape, ray_index)``."""
    check_sums_inputs(padded, n_samples, bricked_ok=True)
    if isinstance(poses, bool) or not isinstance(poses, int) or poses < 1 or len(T_index_from_cam) % poses:
        raise ValueError(f"poses must be an int >= 1 that divides the {len(T_index_from_cam)} renders, got {poses!r}")
    T, d = T_index_from_cam.contiguous(), d_cam.contiguous()
    if ray_index is not None:
        if ray_index.dtype != torch.int64 or tuple(ray_index.shape) != tuple(d.shape[1:]):
            raise ValueError(
                f"ray_index must be int64 of the rays' shape {tuple(d.shape[1:])}, got "
                f"{ray_index.dtype} {tuple(ray_index.shape)}"
            )
        if isinstance(image_pixels, bool) or not isinstance(image_pixels, int) or image_pixels < 1:
            raise ValueError(f"ray_index needs image_pixels, the full image's pixel count (>= 1), got {image_pixels!r}")
        ray_index = ray_index.contiguous()
    if not isinstance(prefetch, bool):
        raise TypeError(f"prefetch must be a bool, got {prefetch!r}")
    data, shape = _volume_args(padded)
    return T, d, data, shape, ray_index
