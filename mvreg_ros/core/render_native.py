"""The CPU renderer backend "native": a C++ kernel (``csrc/trilinear_sums.cpp``) that sums trilinear
samples along rays with hardware gathers (AVX-512 or AVX2, scalar elsewhere) and returns, in the
same pass, the sums' gradients with respect to each ray's first sample and sample step. The
backward pass is then a few multiplications per ray, with no per-sample memory.

The kernel is compiled for this CPU on first use with ``torch.utils.cpp_extension`` (a C++
compiler and ninja are needed; about 15 s once, then cached under ``TORCH_EXTENSIONS_DIR``, by
default ``~/.cache/torch_extensions``). :func:`load` returns None when it cannot be built, and the
renderer then falls back to its compiled (Inductor) backend.
"""

from __future__ import annotations

import os
import platform
import shutil
import threading
import warnings
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

SOURCE = Path(__file__).parent / "csrc" / "trilinear_sums.cpp"

_LOCK = threading.Lock()
_STATE: dict = {}


def extension_name() -> str:
    """Cache key of the build: the kernel is compiled with -march=native, so one build per CPU kind."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    return f"mvreg_trilinear_sums_{platform.machine().lower()}_{capability}"


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


def build(name: str, march: str = "native"):
    """Compile (or load the cached build of) the kernel for ``-march=march``; raises on failure.
    The default build targets this CPU; tests build the other instruction sets with it."""
    from torch.utils import cpp_extension

    _ninja_on_path()
    return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", f"-march={march}", "-fopenmp"],
                              extra_ldflags=["-fopenmp"], verbose=False)


def _build():
    try:
        return build(extension_name())
    except Exception as e:  # noqa: BLE001 - no compiler or ninja: the other backends give the same values
        warnings.warn(f"the native CPU renderer could not be built ({type(e).__name__}: {e}); "
                      "using the torch.compile backend", RuntimeWarning, stacklevel=3)
        return None


@torch.library.custom_op("mvreg::trilinear_sums", mutates_args=())
def _sums(padded: Tensor, p0: Tensor, q: Tensor, n_samples: int) -> Tensor:
    return load().sample_sums(padded, p0.contiguous(), q.contiguous(), n_samples, False)[0]


@torch.library.custom_op("mvreg::trilinear_sums_with_grad", mutates_args=())
def _sums_with_grad(padded: Tensor, p0: Tensor, q: Tensor, n_samples: int) -> tuple[Tensor, Tensor, Tensor]:
    f, g, h = load().sample_sums(padded, p0.contiguous(), q.contiguous(), n_samples, True)
    return f, g, h


@_sums.register_fake
def _(padded, p0, q, n_samples):
    return p0.new_empty(p0.shape[:-1])


@_sums_with_grad.register_fake
def _(padded, p0, q, n_samples):
    return p0.new_empty(p0.shape[:-1]), torch.empty_like(p0), torch.empty_like(p0)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_f, grad_g, grad_h):
    G, H = ctx.saved_tensors  # dF/dp0 and dF/dq, from the forward pass
    return None, grad_f[..., None] * G, grad_f[..., None] * H, None


_sums_with_grad.register_autograd(_backward, setup_context=_setup_context)


def sample_sums(padded: Float[Tensor, "D H W"], p0: Float[Tensor, "*B 3"], q: Float[Tensor, "*B 3"],
                n_samples: int) -> Float[Tensor, "*B"]:
    """``sum_k f(p0 + k q)``, k = 0..n_samples-1, f the trilinear interpolation of ``padded``
    (index coordinates, x fastest, clamped to the box as grid_sample's border padding);
    differentiable in ``p0`` and ``q``. Requires :func:`load` to have succeeded."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if torch.is_grad_enabled() and (p0.requires_grad or q.requires_grad):
        return _sums_with_grad(padded, p0, q, int(n_samples))[0]
    return _sums(padded, p0, q, int(n_samples))
