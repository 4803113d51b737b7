"""View-set gathering without DDS: approximate-time synchronisation and the sequential buffer."""

import math

import pytest
import torch

from mvreg_ros.core.geometry.kinematics import PlaneConfig
from mvreg_ros.ros.sync import ApproximateTimeSync, Frame, SequentialViewBuffer

MS = 1_000_000
PLANE = PlaneConfig(name="main", orbital_joint="o", angular_joint="a", sid_mm=700.0)


def frame(source: int, t_ms: float, orbital_deg: float = 0.0, angular_deg: float = 0.0) -> Frame:
    T = PLANE.T_ref_from_cam({"o": math.radians(orbital_deg), "a": math.radians(angular_deg)})
    return Frame(source=source, stamp_ns=int(t_ms * MS), raw=torch.zeros(4, 4), K=torch.eye(3), T_ref_from_cam=T)


def stamps(frames):
    return None if frames is None else [(f.source, f.stamp_ns // MS) for f in frames]


def test_pairs_within_slop_in_either_order():
    s = ApproximateTimeSync(2, slop_ns=10 * MS)
    assert s.add(frame(0, 100)) is None
    assert stamps(s.add(frame(1, 104))) == [(0, 100), (1, 104)]
    assert s.pending() == 0
    assert s.add(frame(1, 200)) is None
    assert stamps(s.add(frame(0, 195))) == [(0, 195), (1, 200)]


def test_too_far_apart_waits_and_old_frames_go():
    s = ApproximateTimeSync(2, slop_ns=10 * MS, queue_size=3)
    s.add(frame(0, 100))
    assert s.add(frame(1, 150)) is None  # 50 ms apart: no set
    s.add(frame(0, 160))
    # frame 1@150 pairs with 0@160; 0@100 (older) is dropped with it
    assert s.pending() == 0
    s.add(frame(0, 300))
    s.add(frame(0, 310))
    s.add(frame(0, 320))
    s.add(frame(0, 330))  # queue_size 3: 300 falls out
    assert s.add(frame(1, 290)) is None  # 20 ms from the nearest (310)
    assert stamps(s.add(frame(1, 325))) == [(0, 320), (1, 325)]


def test_three_sources_and_spread():
    s = ApproximateTimeSync(3, slop_ns=10 * MS)
    s.add(frame(0, 100))
    s.add(frame(2, 108))
    assert s.add(frame(1, 112)) is None  # spread 12 ms > slop
    s2 = ApproximateTimeSync(3, slop_ns=10 * MS)
    s2.add(frame(0, 100))
    s2.add(frame(2, 108))
    assert stamps(s2.add(frame(1, 105))) == [(0, 100), (1, 105), (2, 108)]


def test_sync_rejects_bad_frames():
    s = ApproximateTimeSync(2, slop_ns=MS)
    with pytest.raises(ValueError, match="source"):
        s.add(frame(2, 1))
    s.add(frame(0, 10))
    with pytest.raises(ValueError, match="not newer"):
        s.add(frame(0, 10))


def test_sequential_needs_distinct_views():
    b = SequentialViewBuffer(num_views=2, min_separation_deg=20.0, max_age_ns=60_000 * MS)
    assert b.add(frame(0, 0, orbital_deg=0)) is None
    # 10 degrees away: the same view, the newer image replaces the older
    assert b.add(frame(0, 1000, orbital_deg=10)) is None
    assert stamps(b.frames) == [(0, 1000)]
    got = b.add(frame(0, 2000, orbital_deg=40))
    assert stamps(got) == [(0, 1000), (0, 2000)]
    # a later shot slides the window: it replaces the view it is close to
    got = b.add(frame(0, 3000, orbital_deg=45, angular_deg=5))
    assert stamps(got) == [(0, 1000), (0, 3000)]
    got = b.add(frame(0, 4000, orbital_deg=90))
    assert stamps(got) == [(0, 3000), (0, 4000)]


def test_sequential_forgets_old_views_and_keeps_num_views():
    b = SequentialViewBuffer(num_views=3, min_separation_deg=20.0, max_age_ns=5000 * MS)
    b.add(frame(0, 0, orbital_deg=0))
    b.add(frame(0, 1000, orbital_deg=30))
    assert b.add(frame(0, 7000, orbital_deg=60)) is None  # the first two are older than 5 s
    assert stamps(b.frames) == [(0, 7000)]
    b.add(frame(0, 8000, orbital_deg=90))
    got = b.add(frame(0, 9000, angular_deg=30))
    assert stamps(got) == [(0, 7000), (0, 8000), (0, 9000)]
    got = b.add(frame(0, 10000, orbital_deg=-40))
    assert stamps(got) == [(0, 8000), (0, 9000), (0, 10000)]
    with pytest.raises(ValueError, match="not newer"):
        b.add(frame(0, 10000, orbital_deg=120))


def test_single_view_mode():
    b = SequentialViewBuffer(num_views=1, min_separation_deg=0.0, max_age_ns=MS)
    assert stamps(b.add(frame(0, 1))) == [(0, 1)]
    assert stamps(b.add(frame(0, 2))) == [(0, 2)]


def test_bounded_queues_count_every_frame_that_leaves_unused():
    s = ApproximateTimeSync(2, slop_ns=10 * MS, queue_size=3)
    for t in range(0, 100, 10):  # one source only: the queue keeps the newest 3, the rest are dropped
        assert s.add(frame(0, t)) is None
    assert s.pending() == 3 and s.dropped == 7
    got = s.add(frame(1, 91))  # pairs with 0@90; 0@70 and 0@80 leave unused
    assert stamps(got) == [(0, 90), (1, 91)]
    assert s.pending() == 0 and s.dropped == 9
    # 30 Hz on both topics: every frame is used, nothing is dropped
    s2 = ApproximateTimeSync(2, slop_ns=10 * MS, queue_size=3)
    sets = [s2.add(frame(src, t + 3 * src)) for t in range(0, 3000, 33) for src in (0, 1)]
    assert sum(x is not None for x in sets) == len(range(0, 3000, 33)) and s2.dropped == 0
