"""A robot controller's view of the anatomy pose, in its own process: subscribe to /tf as
tf2_ros's TransformListener does (reliable, volatile, keep last 100) and print every
transform parent -> child as a JSON line (metres, quaternion x y z w, stamp in ns).

Independent of mvreg_ros on purpose (rclpy and tf2_msgs only)."""

import argparse
import json
import time

import rclpy
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from tf2_msgs.msg import TFMessage


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parent", default="carm_base")
    ap.add_argument("--child", default="anatomy")
    ap.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args()
    rclpy.init()
    node = Node("robot_controller")
    qos = QoSProfile(
        depth=100,
        history=HistoryPolicy.KEEP_LAST,
        reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.VOLATILE,
    )

    def on_tf(msg: TFMessage) -> None:
        for tf in msg.transforms:
            if tf.header.frame_id.lstrip("/") == a.parent and tf.child_frame_id.lstrip("/") == a.child:
                t, q = tf.transform.translation, tf.transform.rotation
                print(
                    json.dumps(
                        {
                            "stamp_ns": tf.header.stamp.sec * 1_000_000_000 + tf.header.stamp.nanosec,
                            "t": [t.x, t.y, t.z],
                            "q": [q.x, q.y, q.z, q.w],
                        }
                    ),
                    flush=True,
                )

    node.create_subscription(TFMessage, "/tf", on_tf, qos)
    print(json.dumps({"event": "listening"}), flush=True)
    end = time.monotonic() + a.timeout
    while time.monotonic() < end:
        rclpy.spin_once(node, timeout_sec=0.1)
    node.destroy_node()
    rclpy.try_shutdown()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
