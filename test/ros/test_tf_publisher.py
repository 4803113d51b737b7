"""TF publishing: tf2_ros's broadcaster when importable, else the equivalent TFMessage publisher
with tf2_ros's QoS, received by a subscriber with TransformListener's QoS over DDS."""

import importlib.util
import sys
import types

import pytest
import torch

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("tf2_msgs.msg")

from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, HistoryPolicy, ReliabilityPolicy
from ros_harness import wait_until
from tf2_msgs.msg import TFMessage

from mvreg_ros.core.geometry.transforms import make_T, so3_exp
from mvreg_ros.ros.conversions import T_from_transform, ns_to_stamp, transform_stamped_from_T
from mvreg_ros.ros.tf_publisher import TFMessagePublisher, make_transform_broadcaster, tf_qos

HAVE_TF2_ROS = importlib.util.find_spec("tf2_ros") is not None


def test_qos_is_tf2_ros_s():
    q = tf_qos()
    assert (q.depth, q.history, q.reliability, q.durability) == (
        100,
        HistoryPolicy.KEEP_LAST,
        ReliabilityPolicy.RELIABLE,
        DurabilityPolicy.VOLATILE,
    )


def test_prefers_tf2_ros_when_importable(ros_context, monkeypatch):
    calls = []

    class FakeBroadcaster:
        def __init__(self, node, qos):
            calls.append((node, qos))

    monkeypatch.setitem(sys.modules, "tf2_ros", types.SimpleNamespace(TransformBroadcaster=FakeBroadcaster))
    node = rclpy.create_node("tf_choice", context=ros_context)
    try:
        b, kind = make_transform_broadcaster(node)
        assert kind == "tf2_ros" and isinstance(b, FakeBroadcaster) and calls[0][0] is node
        assert calls[0][1].depth == 100
    finally:
        node.destroy_node()


def test_publishes_on_tf_to_a_listener(ros_context):
    pub_node = rclpy.create_node("tf_pub_test", context=ros_context)
    sub_node = rclpy.create_node("tf_listener_test", context=ros_context)
    received = []
    sub_node.create_subscription(TFMessage, "/tf", lambda m: received.extend(m.transforms), tf_qos())
    ex = SingleThreadedExecutor(context=ros_context)
    ex.add_node(pub_node)
    ex.add_node(sub_node)
    try:
        b, kind = make_transform_broadcaster(pub_node)
        assert kind == ("tf2_ros" if HAVE_TF2_ROS else "tf2_msgs")
        if not HAVE_TF2_ROS:
            assert isinstance(b, TFMessagePublisher)
            q = b.pub_tf.qos_profile
            assert (q.depth, q.reliability, q.durability) == (
                100,
                ReliabilityPolicy.RELIABLE,
                DurabilityPolicy.VOLATILE,
            )
        assert b.pub_tf.topic_name == "/tf"
        wait_until(
            lambda: b.pub_tf.get_subscription_count() > 0,
            30,
            spin=lambda s: ex.spin_once(timeout_sec=s),
            what="the /tf subscriber",
        )
        T = make_T(
            so3_exp(torch.tensor([3.14159, 0.0, 0.0], dtype=torch.float64)),
            torch.tensor([10.0, -20.0, 1000.0], dtype=torch.float64),
        )
        one = transform_stamped_from_T(T, parent_frame="carm_base", child_frame="anatomy", stamp=ns_to_stamp(42))
        b.sendTransform(one)  # a single transform ...
        b.sendTransform([one, one])  # ... or a list, like tf2_ros
        wait_until(lambda: len(received) >= 3, 30, spin=lambda s: ex.spin_once(timeout_sec=s), what="3 transforms")
        assert received[0].header.frame_id == "carm_base" and received[0].child_frame_id == "anatomy"
        assert received[0].header.stamp.nanosec == 42
        torch.testing.assert_close(T_from_transform(received[0].transform), T, atol=1e-9, rtol=0)
    finally:
        ex.shutdown()
        pub_node.destroy_node()
        sub_node.destroy_node()
