"""Property tests (hypothesis) of the pure ROS-side pieces with random valid and invalid inputs:
the message conversions (mvreg_ros/ros/conversions.py), the view-set synchronisers
(mvreg_ros/ros/sync.py) and the joint-state buffer (mvreg_ros/ros/joint_buffer.py)."""

import math

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("rclpy")

from rclpy.serialization import deserialize_message, serialize_message

from mvreg_ros.core.geometry.kinematics import PlaneConfig
from mvreg_ros.core.geometry.transforms import make_T, matrix_from_quaternion
from mvreg_ros.ros import conversions as cv
from mvreg_ros.ros.joint_buffer import JointStateBuffer, JointStateError
from mvreg_ros.ros.sync import ApproximateTimeSync, Frame, SequentialViewBuffer

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_STAMP_NS = (2**31 - 1) * 1_000_000_000 + 999_999_999  # builtin_interfaces/Time: int32 sec, uint32 nanosec
finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)


@st.composite
def poses_mm(draw):
    """A random rigid transform (mm): a unit quaternion and a translation within 5 m."""
    q = np.array(draw(st.lists(st.floats(-1, 1, allow_nan=False), min_size=4, max_size=4)))
    assume(np.linalg.norm(q) > 0.1)
    q = q / np.linalg.norm(q)
    t = torch.tensor(draw(st.lists(st.floats(-5000, 5000, allow_nan=False), min_size=3, max_size=3)))
    return make_T(matrix_from_quaternion(*q.tolist()), t.to(torch.float64))


# ----------------------------------------------------------------------------- stamps


@SETTINGS
@given(st.integers(0, MAX_STAMP_NS))
def test_stamps_round_trip_exactly_through_cdr(ns):
    stamp = cv.ns_to_stamp(ns)
    assert 0 <= stamp.nanosec < 1_000_000_000
    assert cv.stamp_to_ns(stamp) == ns
    back = deserialize_message(serialize_message(stamp), type(stamp))
    assert cv.stamp_to_ns(back) == ns


@SETTINGS
@given(st.integers(max_value=-1))
def test_negative_stamps_are_refused(ns):
    with pytest.raises(ValueError, match="negative"):
        cv.ns_to_stamp(ns)


@SETTINGS
@given(st.one_of(st.text(max_size=3), st.none(), st.lists(st.integers(), max_size=2)))
def test_stamps_of_other_types_are_refused(value):
    with pytest.raises((TypeError, ValueError)):
        cv.ns_to_stamp(value)


@SETTINGS
@given(
    st.one_of(
        st.floats(min_value=0, max_value=1e18, allow_nan=False).filter(lambda f: f != int(f)),
        st.booleans(),
        st.integers(MAX_STAMP_NS + 1, 2**64),
    )
)
def test_stamps_that_are_not_integer_ns_in_range_are_refused(value):
    with pytest.raises((TypeError, ValueError)):
        cv.ns_to_stamp(value)


# ------------------------------------------------------------------------------ poses


@SETTINGS
@given(poses_mm(), st.integers(0, MAX_STAMP_NS))
def test_transforms_round_trip_in_metres(T, ns):
    tf = cv.transform_stamped_from_T(T, parent_frame="carm_base", child_frame="anatomy", stamp=cv.ns_to_stamp(ns))
    assert abs(tf.transform.translation.x * 1000.0 - float(T[0, 3])) < 1e-9
    q = tf.transform.rotation
    assert q.w >= 0 and abs(math.sqrt(q.x**2 + q.y**2 + q.z**2 + q.w**2) - 1) < 1e-12
    back = deserialize_message(serialize_message(tf), type(tf))  # what a listener receives
    assert back == tf and cv.stamp_to_ns(back.header.stamp) == ns
    assert torch.allclose(cv.T_from_transform(back.transform), T, atol=1e-9)
    assert torch.allclose(cv.T_from_pose(cv.pose_from_T(T)), T, atol=1e-9)


@SETTINGS
@given(poses_mm(), st.integers(0, MAX_STAMP_NS))
def test_pose_with_covariance_round_trips(T, ns):
    cov = torch.diag(torch.tensor([1.0, 2.0, 3.0, 1e-4, 2e-4, 3e-4], dtype=torch.float64))
    msg = cv.pose_with_covariance_from_T(T, cov, frame_id="carm_base", stamp=cv.ns_to_stamp(ns))
    assert torch.allclose(cv.T_from_pose(msg.pose.pose), T, atol=1e-9)
    assert torch.allclose(cv.covariance_from_ros(msg.pose.covariance), cov, rtol=1e-12)
    assert cv.stamp_to_ns(msg.header.stamp) == ns


@SETTINGS
@given(
    poses_mm(),
    st.integers(0, 15),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)
def test_non_finite_transforms_are_refused(T, index, bad):
    T = T.clone()
    T.view(-1)[index] = bad
    with pytest.raises(ValueError, match="non-finite"):
        cv.transform_from_T(T)


@SETTINGS
@given(st.lists(st.integers(1, 6), min_size=1, max_size=3).filter(lambda s: s != [4, 4]))
def test_transforms_of_other_shapes_are_refused(shape):
    with pytest.raises((ValueError, TypeError), match="4x4|4 4"):  # the annotation's check or the function's
        cv.transform_from_T(torch.zeros(shape, dtype=torch.float64))


@SETTINGS
@given(st.one_of(st.none(), st.text(max_size=3)))
def test_transforms_of_other_types_are_refused(value):
    with pytest.raises((TypeError, ValueError)):
        cv.transform_from_T(value)


@SETTINGS
@given(poses_mm(), st.floats(1.05, 3.0))
def test_non_rigid_transforms_are_refused(T, scale):
    T = T.clone()
    T[:3, :3] *= scale
    with pytest.raises(ValueError):
        cv.transform_from_T(T)


@SETTINGS
@given(
    st.lists(st.sampled_from([0.0, math.nan, math.inf, -math.inf]), min_size=4, max_size=4),
    st.lists(finite, min_size=3, max_size=3),
)
def test_transforms_with_an_invalid_quaternion_are_refused(q, t):
    from geometry_msgs.msg import Transform

    assume(any(v != 0 for v in q) or all(v == 0 for v in q))
    msg = Transform()
    msg.translation.x, msg.translation.y, msg.translation.z = t
    msg.rotation.x, msg.rotation.y, msg.rotation.z, msg.rotation.w = q  # zero or not finite
    with pytest.raises(ValueError, match="quaternion"):
        cv.T_from_transform(msg)


# ----------------------------------------------------------------------------- images

ENCODING_RANGES = {"mono8": (0, 255), "8UC1": (0, 255), "mono16": (0, 65535), "16UC1": (0, 65535), "32FC1": None}


@st.composite
def images(draw):
    encoding = draw(st.sampled_from(sorted(ENCODING_RANGES)))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    r = ENCODING_RANGES[encoding]
    arr = rng.integers(r[0], r[1] + 1, (h, w)).astype(np.float64) if r else rng.normal(0, 1e3, (h, w))
    return encoding, arr, draw(st.integers(0, 7)), draw(st.booleans())


@SETTINGS
@given(images())
def test_images_round_trip_through_cdr(case):
    encoding, arr, padding, bigendian = case
    msg = cv.tensor_to_image(arr, encoding=encoding, row_padding=padding, bigendian=bigendian)
    back = deserialize_message(serialize_message(msg), type(msg))
    out = cv.image_to_tensor(back).double().numpy()
    expected = arr.astype(np.float32).astype(np.float64)
    assert out.shape == arr.shape and np.array_equal(out, expected)


@SETTINGS
@given(images(), st.data())
def test_truncated_or_mislabelled_images_are_refused(case, data):
    encoding, arr, padding, bigendian = case
    msg = cv.tensor_to_image(arr, encoding=encoding, row_padding=padding, bigendian=bigendian)
    kind = data.draw(st.sampled_from(["truncate", "encoding", "step", "size"]))
    if kind == "truncate":
        cut = data.draw(st.integers(0, len(msg.data) - 1))
        msg.data = bytes(msg.data)[:cut]
        match = "bytes"
    elif kind == "encoding":
        msg.encoding = data.draw(st.sampled_from(["rgb8", "bgr8", "mono12", "", "MONO16", "64FC1"]))
        match = "encoding"
    elif kind == "step":
        bpp = cv.ENCODINGS[encoding][1]
        msg.step = data.draw(st.integers(0, msg.width * bpp - 1))
        match = "step"
    else:
        msg.height = 0
        match = "no pixels"
    with pytest.raises(ValueError, match=match):
        cv.image_to_tensor(msg)


@SETTINGS
@given(st.integers(8, 2048), st.integers(8, 2048), st.floats(10, 1e5), st.floats(0.5, 2.0))
def test_camera_info_round_trips_and_checks_the_size(h, w, f, aspect):
    K = torch.tensor([[f, 0.0, (w - 1) / 2], [0.0, f * aspect, (h - 1) / 2], [0.0, 0.0, 1.0]], dtype=torch.float64)
    info = deserialize_message(serialize_message(cv.K_to_camera_info(K, height=h, width=w)), cv.CameraInfo)
    assert torch.equal(cv.camera_info_to_K(info, height=h, width=w), K)
    with pytest.raises(ValueError, match="does not match"):
        cv.camera_info_to_K(info, height=h + 1, width=w)
    info.k[0] = -f
    with pytest.raises(ValueError, match="positive focal"):
        cv.camera_info_to_K(info, height=h, width=w)


# ------------------------------------------------------------------------ synchronisers

MS = 1_000_000
PLANE = PlaneConfig(name="main", orbital_joint="o", angular_joint="a", sid_mm=700.0)
_POSES = {}


def cam(orbital_deg: int):
    if orbital_deg not in _POSES:
        _POSES[orbital_deg] = PLANE.T_ref_from_cam({"o": math.radians(orbital_deg), "a": 0.0})
    return _POSES[orbital_deg]


def frame(source: int, stamp_ns: int, orbital_deg: int = 0) -> Frame:
    return Frame(
        source=source, stamp_ns=stamp_ns, raw=torch.zeros(2, 2), K=torch.eye(3), T_ref_from_cam=cam(orbital_deg)
    )


@SETTINGS
@given(
    st.integers(1, 4),
    st.integers(0, 30),
    st.integers(1, 6),
    st.lists(st.tuples(st.integers(0, 3), st.integers(1, 40)), min_size=1, max_size=60),
)
def test_approximate_sync_emits_consistent_sets(n, slop_ms, queue, steps):
    """Random arrival orders: each set has one frame per source within the slop, no frame is used
    twice, and every source's sets move forward in time; a non-newer frame is refused."""
    s = ApproximateTimeSync(n, slop_ns=slop_ms * MS, queue_size=queue)
    last = [0] * n
    used = set()
    emitted = [0] * n
    for source, dt in steps:
        source %= n
        stamp = last[source] + dt * MS
        out = s.add(frame(source, stamp))
        last[source] = stamp
        if out is None:  # still queued: the same stamp again is refused (the node checks order itself)
            with pytest.raises(ValueError, match="not newer"):
                s.add(frame(source, stamp))
            continue
        assert [f.source for f in out] == list(range(n))
        ts = [f.stamp_ns for f in out]
        assert max(ts) - min(ts) <= slop_ms * MS
        assert out[source].stamp_ns == stamp  # the new frame completes the set
        for f in out:
            assert (f.source, f.stamp_ns) not in used
            used.add((f.source, f.stamp_ns))
            assert f.stamp_ns > emitted[f.source]
            emitted[f.source] = f.stamp_ns
        assert s.pending() <= n * queue


@SETTINGS
@given(st.integers(-3, 5), st.integers(-1000, -1), st.integers(-5, 0))
def test_approximate_sync_refuses_bad_settings_and_sources(source_offset, slop, queue):
    with pytest.raises(ValueError, match="slop_ns"):
        ApproximateTimeSync(2, slop_ns=slop)
    with pytest.raises(ValueError, match="queue_size"):
        ApproximateTimeSync(2, slop_ns=0, queue_size=queue)
    with pytest.raises(ValueError, match="n_sources"):
        ApproximateTimeSync(queue, slop_ns=0)
    s = ApproximateTimeSync(2, slop_ns=0)
    assume(not 0 <= source_offset < 2)
    with pytest.raises(ValueError, match="source"):
        s.add(frame(source_offset, 1))


@SETTINGS
@given(
    st.integers(1, 4),
    st.sampled_from([0, 10, 20, 45]),
    st.integers(1, 50),
    st.lists(st.tuples(st.integers(1, 20), st.sampled_from([-60, -30, -10, 0, 5, 25, 55, 90])), max_size=40),
)
def test_sequential_buffer_sets_are_distinct_recent_and_complete(num_views, sep, max_age_ms, shots):
    b = SequentialViewBuffer(num_views=num_views, min_separation_deg=sep, max_age_ns=max_age_ms * MS)
    t = 0
    from mvreg_ros.core.geometry.kinematics import view_angle_deg

    for dt, orbital in shots:
        t += dt * MS
        out = b.add(frame(0, t, orbital))
        with pytest.raises(ValueError, match="not newer"):
            b.add(frame(0, t, orbital))
        kept = b.frames
        assert kept[-1].stamp_ns == t and len(kept) <= num_views
        if out is None:
            assert len(kept) < num_views
            continue
        assert len(out) == num_views and out[-1].stamp_ns == t
        assert [f.stamp_ns for f in out] == sorted(f.stamp_ns for f in out)
        assert all(t - f.stamp_ns <= max_age_ms * MS for f in out)
        for i in range(num_views):
            for j in range(i + 1, num_views):
                assert view_angle_deg(out[i].T_ref_from_cam, out[j].T_ref_from_cam) >= sep - 1e-6


@SETTINGS
@given(st.integers(-5, 0), st.floats(-90, -0.001) | st.floats(180.001, 1e4), st.integers(-100, 0))
def test_sequential_buffer_refuses_bad_settings(num_views, sep, age):
    with pytest.raises(ValueError, match="num_views"):
        SequentialViewBuffer(num_views=num_views, min_separation_deg=10, max_age_ns=1)
    with pytest.raises(ValueError, match="min_separation_deg"):
        SequentialViewBuffer(num_views=2, min_separation_deg=sep, max_age_ns=1)
    with pytest.raises(ValueError, match="max_age_ns"):
        SequentialViewBuffer(num_views=2, min_separation_deg=10, max_age_ns=age)


# ---------------------------------------------------------------------- joint buffer


@st.composite
def joint_streams(draw):
    n = draw(st.integers(2, 30))
    gaps = draw(st.lists(st.integers(1, 200), min_size=n, max_size=n))
    values = draw(st.lists(st.floats(-3.0, 3.0), min_size=n, max_size=n))
    stamps = np.cumsum(gaps).tolist()
    return [int(s) * MS for s in stamps], values


@SETTINGS
@given(joint_streams(), st.data())
def test_joint_buffer_interpolates_between_its_samples(stream, data):
    stamps, values = stream
    buf = JointStateBuffer(window_s=100.0, tolerance_s=0.05, max_gap_s=1000.0, joints=["j"])
    for s, v in zip(stamps, values):
        buf.add(s, ["j", "other"], [v, 0.0])  # joints not listed are ignored
    for s, v in zip(stamps, values):
        assert buf.positions_at(s, ["j"]) == {"j": v}
    t = data.draw(st.integers(stamps[0], stamps[-1]))
    got = buf.positions_at(t, ["j"])["j"]
    i = max(k for k in range(len(stamps)) if stamps[k] <= t)
    lo, hi = values[i], values[min(i + 1, len(values) - 1)]
    assert min(lo, hi) - 1e-9 <= got <= max(lo, hi) + 1e-9
    with pytest.raises(JointStateError, match="before the joint-state buffer"):
        buf.positions_at(stamps[0] - 1, ["j"])
    with pytest.raises(JointStateError, match="stale joint states"):
        buf.positions_at(stamps[-1] + 50 * MS + 1, ["j"])
    assert buf.positions_at(stamps[-1] + 50 * MS, ["j"]) == {"j": values[-1]}
    with pytest.raises(JointStateError, match="no joint state"):
        buf.positions_at(t, ["unknown"])


@SETTINGS
@given(
    joint_streams(),
    st.sampled_from(["nan", "inf", "lengths", "twice", "old", "same"]),
)
def test_joint_buffer_refuses_bad_messages_and_keeps_nothing_of_them(stream, kind):
    stamps, values = stream
    buf = JointStateBuffer(window_s=100.0, tolerance_s=10.0, max_gap_s=1000.0)
    for s, v in zip(stamps, values):
        buf.add(s, ["a", "b"], [v, -v])
    before = buf.positions_at(stamps[-1], ["a", "b"])
    new = stamps[-1] + MS
    bad = {
        "nan": (new, ["a", "b"], [math.nan, 0.0]),
        "inf": (new, ["a", "b"], [0.0, -math.inf]),
        "lengths": (new, ["a", "b"], [0.0]),
        "twice": (new, ["a", "a"], [0.0, 1.0]),
        "old": (stamps[-1] - 1, ["a", "b"], [0.0, 0.0]),
        "same": (stamps[-1], ["b"], [0.0]),
    }[kind]
    with pytest.raises(JointStateError):
        buf.add(*bad)
    assert buf.newest_ns("a") == stamps[-1] and buf.newest_ns("b") == stamps[-1]
    assert buf.positions_at(stamps[-1], ["a", "b"]) == before


@SETTINGS
@given(
    st.sampled_from(["window_s", "tolerance_s", "max_gap_s", "still_tolerance"]),
    st.sampled_from([-1.0, math.nan, math.inf]),
)
def test_joint_buffer_refuses_bad_settings(name, value):
    assume(not (name == "tolerance_s" and value == 0))
    with pytest.raises(ValueError, match=name):
        JointStateBuffer(**{name: value})
