"""Shared pytest fixtures for the mvreg_ros test suite."""

import pytest
import torch

# The test machines are small and shared: keep each test process to two threads.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_ct():
    """The example chest CT average-pooled by 8 (64 x 64 x 17 voxels), loaded once per session."""
    from mvreg_ros.core.volume import load_example_ct

    return load_example_ct(downsample=8)
