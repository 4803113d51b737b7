"""Shared pytest fixtures for the mvreg_ros test suite.

setup.cfg's ``--jaxtyping-packages`` instruments every mvreg_ros module imported in the tests with
jaxtyping + beartype, so the shape annotations are checked at run time (the plugin installs the
import hook before this file is loaded).
"""

import functools
import importlib

import pytest
import torch


def _reload_with_fresh_type_checks(reload):
    """beartype caches the classes that string annotations resolve to; after ``importlib.reload``
    a module's classes are new objects, so its caches must be cleared first (beartype issue #49)."""

    @functools.wraps(reload)
    def wrapper(module):
        from beartype._cache.cacheclear import clear_caches

        clear_caches()
        return reload(module)

    return wrapper


try:
    import beartype  # noqa: F401
except ImportError:
    pass
else:
    importlib.reload = _reload_with_fresh_type_checks(importlib.reload)

# The test machines are small and shared: keep each test process to two threads.
torch.set_num_threads(2)


@pytest.fixture
def cuda_device():
    """The first CUDA device; without one (the CI machines) the test is skipped. These tests are the
    GPU's path against the CPU's: run them on a GPU machine with ``pytest test/core -k cuda``."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


@pytest.fixture(scope="session")
def tiny_ct():
    """The example chest CT average-pooled by 8 (64 x 64 x 17 voxels), loaded once per session."""
    from mvreg_ros.core.imaging.volume import load_example_ct

    return load_example_ct(downsample=8)
