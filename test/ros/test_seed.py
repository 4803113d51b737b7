"""The run-time starting pose (~/initial_pose) without DDS: the message checks and the
initialiser that serves it to the engine's chain (mvreg_ros/ros/seed.py)."""

import math

import pytest
import torch

from mvreg_ros.core.registration.initialisers import ConfiguredPose, StartRequest, first_start
from mvreg_ros.ros.seed import SEED_KEY, SeedPose, check_seed


def test_a_pose_in_the_reference_frame_is_taken_and_normalised():
    pos, q = check_seed("/carm_base", (0.1, 0.2, 1.0), (0.0, 0.0, 0.0, 1.004), reference_frame="carm_base")
    assert pos == (0.1, 0.2, 1.0) and q == pytest.approx((0.0, 0.0, 0.0, 1.0))


@pytest.mark.parametrize(
    "frame, position, q, match",
    [
        ("map", (0, 0, 0), (0, 0, 0, 1), "frame 'map'.*reference_frame 'carm_base'"),
        ("", (0, 0, 0), (0, 0, 0, 1), "frame ''"),
        ("carm_base", (math.nan, 0, 0), (0, 0, 0, 1), "non-finite"),
        ("carm_base", (0, 0, 0), (0, 0, 0, math.inf), "non-finite"),
        ("carm_base", (2000.0, 0, 0), (0, 0, 0, 1), "1 km"),
        ("carm_base", (0, 0, 0), (0, 0, 0, 0), "unit quaternion"),
        ("carm_base", (0, 0, 0), (0, 0, 0.5, 0.5), "unit quaternion"),
    ],
)
def test_bad_initial_poses_are_rejected_with_the_reason(frame, position, q, match):
    with pytest.raises(ValueError, match=match):
        check_seed(frame, position, q, reference_frame="carm_base")


def test_a_frame_id_that_is_not_a_string():
    with pytest.raises(TypeError, match="frame_id"):
        check_seed(None, (0, 0, 0), (0, 0, 0, 1), reference_frame="carm_base")


def test_the_seed_comes_first_until_a_registration_from_it_is_accepted():
    seed = SeedPose()
    configured = ConfiguredPose(torch.eye(4, dtype=torch.float64))
    chain = [seed, configured]
    request = StartRequest(views=None)
    assert first_start(chain, request).source == "configured" and not seed.pending
    T = torch.eye(4, dtype=torch.float64)
    T[:3, 3] = torch.tensor([1.0, 2.0, 3.0])
    n = seed.set(T)
    start = first_start(chain, request)
    assert start.source == "initial_pose" and torch.equal(start.T_ref_from_ct, T) and start.values[SEED_KEY] == str(n)
    assert not start.tracking  # a seed goes through the global stage
    # a newer seed replaces it; an acceptance from the older one leaves the newer one in place
    n2 = seed.set(2 * torch.eye(4, dtype=torch.float64).fill_diagonal_(1.0))
    assert not seed.used(start.values) and seed.pending
    assert seed.used({SEED_KEY: str(n2)}) and not seed.pending
    assert first_start(chain, request).source == "configured"
    seed.set(T)
    assert seed.clear() and not seed.clear()


def test_a_bad_seed():
    with pytest.raises(ValueError, match="finite 4x4"):
        SeedPose().set(torch.full((4, 4), float("nan")))
    with pytest.raises(ValueError, match="finite 4x4"):
        SeedPose().set(torch.eye(3))
