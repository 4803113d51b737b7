"""A simulated C-arm system in its own process: joint states at a fixed rate and, at each shot,
raw mono16 images with their CameraInfo, like a detector driver (sensor-data QoS).

Independent of mvreg_ros on purpose (rclpy and numpy only). Reads a JSON spec and an .npz of
images; prints one JSON line per published image set with the stamps it used.

spec = {image_topics, camera_info_topics, joint_states_topic, joint_names, height, width,
        K: {topic index: 9 floats}, rate_hz, move_s, hold_s, image_delay_s, rounds,
        stamp_offsets_s: {topic index: s}, shots: [{joints: [..], images: {topic index: npz key}}]}
"""

import argparse
import json
import time

import numpy as np
import rclpy
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image, JointState


def stamp_msg(ns: int):
    from builtin_interfaces.msg import Time

    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def mono16(array: np.ndarray, ns: int) -> Image:
    a = np.ascontiguousarray(array.astype("<u2"))
    msg = Image(height=a.shape[0], width=a.shape[1], encoding="mono16", is_bigendian=0, step=2 * a.shape[1])
    msg.data = a.tobytes()
    msg.header.stamp = stamp_msg(ns)
    msg.header.frame_id = "xray_source_optical"
    return msg


def camera_info(K, h: int, w: int, ns: int) -> CameraInfo:
    info = CameraInfo(height=h, width=w, distortion_model="plumb_bob")
    info.k = [float(v) for v in K]
    info.d = [0.0] * 5
    info.r = [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]
    info.p = [float(K[0]), 0.0, float(K[2]), 0.0, 0.0, float(K[4]), float(K[5]), 0.0, 0.0, 0.0, 1.0, 0.0]
    info.header.stamp = stamp_msg(ns)
    info.header.frame_id = "xray_source_optical"
    return info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--match-timeout", type=float, default=30.0)
    a = ap.parse_args()
    spec = json.load(open(a.spec))
    data = np.load(a.data)
    rclpy.init()
    node = Node("sim_carm")
    image_pubs = [node.create_publisher(Image, t, qos_profile_sensor_data) for t in spec["image_topics"]]
    info_pubs = [node.create_publisher(CameraInfo, t, qos_profile_sensor_data) for t in spec["camera_info_topics"]]
    joint_pub = node.create_publisher(JointState, spec["joint_states_topic"], 10)
    deadline = time.monotonic() + a.match_timeout
    while any(p.get_subscription_count() == 0 for p in image_pubs + info_pubs + [joint_pub]):
        if time.monotonic() > deadline:
            raise SystemExit("no subscriber matched the simulated C-arm's topics")
        rclpy.spin_once(node, timeout_sec=0.05)
    print(json.dumps({"event": "matched"}), flush=True)

    names = spec["joint_names"]
    period = 1.0 / spec["rate_hz"]
    now_ns = lambda: node.get_clock().now().nanoseconds

    def publish_joints(q) -> None:
        js = JointState(name=names, position=[float(v) for v in q])
        js.header.stamp = stamp_msg(now_ns())
        joint_pub.publish(js)

    def stream(q_from, q_to, seconds: float) -> None:
        q_from, q_to = np.asarray(q_from, float), np.asarray(q_to, float)
        t0 = time.monotonic()
        while True:
            s = min((time.monotonic() - t0) / seconds, 1.0) if seconds > 0 else 1.0
            publish_joints(q_from + s * (q_to - q_from))
            if s >= 1.0:
                return
            time.sleep(period)

    current = spec["shots"][0]["joints"]
    for r in range(spec["rounds"]):
        for k, shot in enumerate(spec["shots"]):
            stream(current, shot["joints"], spec["move_s"])
            current = shot["joints"]
            stamp = now_ns() + int(spec["image_delay_s"] * 1e9)  # exposure during the hold
            stream(current, current, spec["hold_s"])
            stamps = {}
            for idx, key in shot["images"].items():
                i = int(idx)
                ns = stamp + int(spec.get("stamp_offsets_s", {}).get(idx, 0.0) * 1e9)
                img = data[key]
                info_pubs[i].publish(camera_info(spec["K"][idx], img.shape[0], img.shape[1], ns))
                image_pubs[i].publish(mono16(img, ns))
                stamps[idx] = ns
            print(json.dumps({"event": "images", "round": r, "shot": k, "stamps_ns": stamps}), flush=True)
    stream(current, current, spec.get("tail_s", 1.0))
    print(json.dumps({"event": "done"}), flush=True)
    node.destroy_node()
    rclpy.try_shutdown()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
