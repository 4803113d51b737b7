"""Pairing images with their CameraInfo without DDS: same stamp at once, else wait up to
camera_info_wait_s, then the latest; one image waits per topic and images leave in order."""

import pytest

from mvreg_ros.ros.camera_info_pairing import CameraInfoPairing, PairedImage


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def pairing(n=2, wait_s=0.5):
    clock = Clock()
    return CameraInfoPairing(n, wait_s=wait_s, clock=clock), clock


def test_an_image_takes_the_camera_info_of_its_stamp():
    p, _ = pairing()
    assert p.add_info(0, 10, "info10") == []
    assert p.add_info(0, 20, "info20") == []
    assert p.add_image(0, "img10", 10) == [PairedImage(0, "img10", 10, "info10")]
    assert not p.waiting(0)


def test_an_image_waits_for_its_camera_info_arriving_later():
    p, clock = pairing()
    p.add_info(0, 5, "info5")
    assert p.add_image(0, "img10", 10) == []
    assert p.waiting(0)
    assert p.add_info(1, 10, "other topic") == []  # another topic's CameraInfo does not release it
    clock.t += 0.2
    assert p.flush_due() == []
    assert p.add_info(0, 10, "info10") == [PairedImage(0, "img10", 10, "info10")]
    assert not p.waiting(0) and p.flush_due() == []


def test_after_the_wait_the_latest_camera_info_is_used():
    p, clock = pairing(wait_s=0.5)
    p.add_info(0, 5, "info5")
    p.add_info(0, 7, "info7")
    assert p.add_image(0, "img10", 10) == []
    clock.t += 0.49
    assert p.flush_due() == []
    clock.t += 0.01
    assert p.flush_due() == [PairedImage(0, "img10", 10, "info7")]
    assert p.flush_due() == []


def test_without_any_camera_info_the_image_leaves_with_none():
    p, clock = pairing(wait_s=0.5)
    p.add_image(1, "img", 10)
    clock.t += 1.0
    assert p.flush_due() == [PairedImage(1, "img", 10, None)]


def test_a_newer_image_releases_the_waiting_one_first():
    p, _ = pairing()
    p.add_info(0, 5, "info5")
    assert p.add_image(0, "img10", 10) == []
    assert p.add_image(0, "img20", 20) == [PairedImage(0, "img10", 10, "info5")]
    # the newer one's CameraInfo is already here: both leave, oldest first
    p.add_info(0, 30, "info30")
    assert p.add_image(0, "img25", 25) == [PairedImage(0, "img20", 20, "info30")]
    assert p.add_image(0, "img30", 30) == [PairedImage(0, "img25", 25, "info30"), PairedImage(0, "img30", 30, "info30")]


def test_zero_wait_uses_the_latest_at_once_and_topics_are_independent():
    p, _ = pairing(wait_s=0.0)
    p.add_info(0, 5, "a5")
    p.add_info(1, 6, "b6")
    assert p.add_image(0, "img", 10) == [PairedImage(0, "img", 10, "a5")]
    assert p.add_image(1, "img", 6) == [PairedImage(1, "img", 6, "b6")]


def test_only_recent_camera_infos_are_kept():
    clock = Clock()
    p = CameraInfoPairing(1, wait_s=0.5, history=3, clock=clock)
    for s in range(1, 6):
        p.add_info(0, s, f"info{s}")
    assert p.add_image(0, "img1", 1) == []  # info1 was forgotten
    assert p.add_image(0, "img3", 3) == [PairedImage(0, "img1", 1, "info5"), PairedImage(0, "img3", 3, "info3")]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_topics=0, wait_s=0.1), "n_topics"),
        (dict(n_topics=2.0, wait_s=0.1), "n_topics"),
        (dict(n_topics=1, wait_s=-0.1), "wait_s"),
        (dict(n_topics=1, wait_s=float("nan")), "wait_s"),
        (dict(n_topics=1, wait_s=0.1, history=0), "history"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CameraInfoPairing(**kwargs)


def test_bad_topic_index():
    p, _ = pairing(n=2)
    with pytest.raises(ValueError, match="topic index 2"):
        p.add_image(2, "img", 1)
    with pytest.raises(ValueError, match="topic index -1"):
        p.add_info(-1, 1, "info")
