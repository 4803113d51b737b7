"""Publishing the anatomy pose on ``/tf`` with the real tf2_ros API where it exists.

On a ROS 2 install ``tf2_ros.TransformBroadcaster`` is used. The PyPI wheels carry no
tf2_ros, so there :func:`make_transform_broadcaster` returns :class:`TFMessagePublisher`, the
same thing: tf2_msgs/TFMessage on ``/tf`` with tf2_ros's QoS (reliable, volatile, keep last
100), which every tf2 listener on any ROS 2 distribution subscribes to.
"""

from __future__ import annotations

from collections.abc import Iterable

TF_TOPIC = "/tf"


def tf_qos():
    """The QoS of tf2_ros's TransformBroadcaster and of TransformListener's /tf subscription."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(
        depth=100,
        history=HistoryPolicy.KEEP_LAST,
        reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.VOLATILE,
    )


class TFMessagePublisher:
    """Drop-in for ``tf2_ros.TransformBroadcaster`` (same ``sendTransform``)."""

    def __init__(self, node, qos=None):
        from tf2_msgs.msg import TFMessage

        self._msg_type = TFMessage
        self.pub_tf = node.create_publisher(TFMessage, TF_TOPIC, qos if qos is not None else tf_qos())

    def sendTransform(self, transform) -> None:
        transforms = list(transform) if isinstance(transform, Iterable) else [transform]
        self.pub_tf.publish(self._msg_type(transforms=transforms))


def make_transform_broadcaster(node):
    """``(broadcaster, kind)``: tf2_ros's TransformBroadcaster when importable ('tf2_ros'),
    else :class:`TFMessagePublisher` ('tf2_msgs'); both publish on /tf with the same QoS."""
    try:
        from tf2_ros import TransformBroadcaster
    except ImportError:
        return TFMessagePublisher(node), "tf2_msgs"
    return TransformBroadcaster(node, tf_qos()), "tf2_ros"
