"""Rosbag2 bags of C-arm acquisitions without ROS: simulate them, write them, read them back.

Pure functions (no node, no DDS). Messages are built with the rclpy message classes and
serialised to CDR with ``rclpy.serialization``; the ``rosbags`` package only stores the bytes
(MCAP or sqlite3), so whatever ``ros2 bag play`` or rclpy reads back is byte-identical.

A simulated bag holds, for every image topic of a node parameter file, raw ``mono16`` images
with their ``CameraInfo`` (same stamp), the C-arm's ``JointState`` stream, and the ground truth
``reference_frame -> anatomy_frame`` on :data:`GROUND_TRUTH_TOPIC` (``tf2_msgs/TFMessage``,
metres) at every image stamp. Each message's log time is its stamp. See docs/bag.md.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.data import simulate
from mvreg_ros.core.geometry.transforms import invert, perturb
from mvreg_ros.core.imaging.volume import Volume
from mvreg_ros.core.registration.initialisers import supine_at_isocentre
from mvreg_ros.core.rendering.renderer import Renderer
from mvreg_ros.ros.conversions import (
    K_to_camera_info,
    T_from_transform,
    ns_to_stamp,
    stamp_to_ns,
    tensor_to_image,
    transform_stamped_from_T,
)
from mvreg_ros.ros.params import NodeConfig

GROUND_TRUTH_TOPIC = "/ground_truth/tf"
STORAGES = ("mcap", "sqlite3")
IMAGE_TYPE = "sensor_msgs/msg/Image"
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"
JOINT_STATE_TYPE = "sensor_msgs/msg/JointState"
TF_TYPE = "tf2_msgs/msg/TFMessage"


@dataclasses.dataclass(frozen=True)
class BagMessage:
    """One stored message: CDR bytes and the time it was logged (ns)."""

    topic: str
    msgtype: str  # 'pkg/msg/Name'
    log_time_ns: int
    data: bytes


@dataclasses.dataclass(frozen=True)
class BagSimConfig:
    """What :func:`simulate_messages` records."""

    sets: int = 3  # registrations the node can make from the bag
    period_s: float = 1.5  # between two shots
    lead_s: float = 1.0  # joint states before the first shot
    tail_s: float = 0.5  # joint states after the last shot
    hold_s: float = 0.3  # the C-arm stands still this long around each shot
    joint_rate_hz: float = 20.0
    offset_deg: float = 3.0  # truth = the node's default start pose turned by this ...
    offset_mm: float = 5.0  # ... and moved by this (random directions from seed)
    seed: int = 0
    start_ns: int = 1_700_000_000_000_000_000  # stamp of t = 0
    detector: simulate.DetectorConfig = simulate.DetectorConfig()

    def __post_init__(self):
        if self.sets < 1:
            raise ValueError(f"sets must be >= 1, got {self.sets}")
        for name in ("period_s", "joint_rate_hz"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.hold_s < self.period_s / 2:
            raise ValueError(f"hold_s must lie in [0, period_s / 2), got {self.hold_s}")


def read_node_params(path: str | Path, node_name: str = "register_node") -> dict:
    """The flattened ``node_name: ros__parameters:`` values of a node parameter file
    (``{"plane.frontal.sid_m": 0.785, ...}``), for :func:`..params.build_config`."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text())
    try:
        section = doc[node_name]["ros__parameters"]
    except (KeyError, TypeError):
        raise ValueError(f"{path}: no '{node_name}: ros__parameters:' section") from None
    out: dict = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(section, "")
    return out


# ----------------------------------------------------------------------------- messages


def message_class(msgtype: str):
    """The rclpy message class of ``'pkg/msg/Name'`` (or ``'pkg/Name'``)."""
    parts = msgtype.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"not a message type name: {msgtype!r}")
    try:
        return getattr(importlib.import_module(f"{parts[0]}.msg"), parts[-1])
    except (ImportError, AttributeError) as e:
        raise ValueError(f"message type {msgtype!r} is not installed: {e}") from e


def type_name(msg) -> str:
    module = type(msg).__module__.split(".")[0]
    return f"{module}/msg/{type(msg).__name__}"


def serialize(msg) -> bytes:
    from rclpy.serialization import serialize_message

    return bytes(serialize_message(msg))


def deserialize(message: BagMessage):
    """The rclpy message of a stored one."""
    from rclpy.serialization import deserialize_message

    return deserialize_message(message.data, message_class(message.msgtype))


def record(topic: str, msg, log_time_ns: int) -> BagMessage:
    return BagMessage(topic=topic, msgtype=type_name(msg), log_time_ns=int(log_time_ns), data=serialize(msg))


# --------------------------------------------------------------------------- simulation


def shot_joints(cfg: NodeConfig, shot: int) -> dict[str, float]:
    """Joint values (rad, m) of shot ``shot``: synchronized, each plane near its own zero view
    and turning a little from set to set; sequential, alternating between views about 55 deg apart."""
    q: dict[str, float] = {}
    for p, plane in enumerate(cfg.planes):
        if cfg.acquisition_mode == "sequential":
            orbital = math.radians(55.0) * (shot % 2) + 0.02 * shot
            angular = 0.12 * (shot % 2) - 0.01 * shot
        else:
            orbital = (0.15 if p % 2 == 0 else 0.05) + 0.03 * shot
            angular = (-0.05 if p % 2 == 0 else 0.1) + 0.01 * shot
        q.setdefault(plane.orbital_joint, orbital)
        q.setdefault(plane.angular_joint, angular)
        for j in plane.prismatic_joints:
            q.setdefault(j, 0.01)
    return q


def ground_truth_pose(cfg: NodeConfig, volume: Volume, sim: BagSimConfig) -> Float[Tensor, "4 4"]:
    """The anatomy pose of the simulation (mm): the node's default start (supine, the CT's bone
    centre at the first plane's isocentre) moved by ``offset_deg`` / ``offset_mm``."""
    centre = volume.bone_centre_ct().to(torch.float64)
    start = supine_at_isocentre(cfg.planes[0], centre)
    g = torch.Generator().manual_seed(sim.seed)
    return perturb(start, rot_deg=sim.offset_deg, trans_mm=sim.offset_mm, centre_ct=centre, generator=g)


def simulate_messages(
    cfg: NodeConfig, volume: Volume, sim: BagSimConfig = BagSimConfig(), *, renderer: Renderer | None = None
) -> tuple[list[BagMessage], Float[Tensor, "4 4"]]:
    """The messages of a simulated acquisition for the node configured by ``cfg`` (its topics,
    planes, joints and acquisition mode), sorted by log time, and the true ``T_ref_from_ct`` (mm)."""
    renderer = renderer or Renderer(volume)
    truth = ground_truth_pose(cfg, volume, sim)
    shots = sim.sets + (cfg.num_views - 1 if cfg.acquisition_mode == "sequential" else 0)
    det = sim.detector
    K = det.K()
    s_to_ns = lambda t: sim.start_ns + int(round(t * 1e9))
    shot_t = [sim.lead_s + k * sim.period_s for k in range(shots)]
    out: list[BagMessage] = []
    for k, t in enumerate(shot_t):
        q = shot_joints(cfg, k)
        stamp = ns_to_stamp(s_to_ns(t))
        gt = transform_stamped_from_T(
            truth, parent_frame=cfg.reference_frame, child_frame=cfg.anatomy_frame, stamp=stamp
        )
        out.append(record(GROUND_TRUTH_TOPIC, message_class(TF_TYPE)(transforms=[gt]), s_to_ns(t)))
        T_cam_from_ct = torch.stack([invert(plane.T_ref_from_cam(q)) @ truth for plane in cfg.planes])
        raw = simulate.acquire(
            renderer,
            T_cam_from_ct,
            K.expand(len(cfg.planes), 3, 3),
            det.height,
            det.width,
            generator=torch.Generator().manual_seed(sim.seed * 1000 + k),
        )
        topics = range(len(cfg.image_topics)) if cfg.acquisition_mode == "synchronized" else [0]
        for i in topics:
            frame = f"{cfg.planes[i].name}_xray_optical"
            info = K_to_camera_info(K, height=det.height, width=det.width, stamp=stamp, frame_id=frame)
            out.append(record(cfg.camera_info_topics[i], info, s_to_ns(t)))
            image = tensor_to_image(raw[i], encoding="mono16", stamp=stamp, frame_id=frame)
            out.append(record(cfg.image_topics[i], image, s_to_ns(t)))
    # joint states: each shot's values held for hold_s around it, linear moves in between
    names = list(cfg.joint_names)
    key_t = [v for t in shot_t for v in (t - sim.hold_s, t + sim.hold_s)]
    key_q = np.array([[shot_joints(cfg, k)[n] for n in names] for k in range(shots) for _ in (0, 1)])
    JointState = message_class(JOINT_STATE_TYPE)
    end = shot_t[-1] + sim.tail_s
    for n in range(int(math.floor(end * sim.joint_rate_hz)) + 1):
        t = n / sim.joint_rate_hz
        js = JointState(name=names, position=[float(np.interp(t, key_t, key_q[:, j])) for j in range(len(names))])
        js.header.stamp = ns_to_stamp(s_to_ns(t))
        out.append(record(cfg.joint_states_topic, js, s_to_ns(t)))
    out.sort(key=lambda m: m.log_time_ns)  # stable: CameraInfo before its image
    return out, truth


# --------------------------------------------------------------------------- storage


def write_bag(path: str | Path, messages: list[BagMessage], *, storage: str = "mcap") -> Path:
    """A rosbag2 directory at ``path`` (which must not exist) holding ``messages``."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    path = Path(path)
    if path.exists():
        raise ValueError(f"bag {path} exists already")
    typestore = get_typestore(Stores.ROS2_KILTED)
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        connections = {}
        for m in messages:
            if m.topic not in connections:
                connections[m.topic] = writer.add_connection(m.topic, m.msgtype, typestore=typestore)
            elif connections[m.topic].msgtype != m.msgtype:
                raise ValueError(f"topic {m.topic} carries {connections[m.topic].msgtype} and {m.msgtype}")
            writer.write(connections[m.topic], m.log_time_ns, m.data)
    return path


def read_bag(path: str | Path) -> list[BagMessage]:
    """Every message of a rosbag2 bag (MCAP or sqlite3), sorted by log time."""
    from rosbags.rosbag2 import Reader

    path = Path(path)
    if not path.exists():
        raise ValueError(f"bag not found: {path}")
    with Reader(path) as reader:
        out = [
            BagMessage(topic=c.topic, msgtype=c.msgtype, log_time_ns=int(t), data=bytes(raw))
            for c, t, raw in reader.messages()
        ]
    out.sort(key=lambda m: m.log_time_ns)
    return out


def ground_truth(messages: list[BagMessage], *, topic: str = GROUND_TRUTH_TOPIC) -> dict:
    """``{stamp_ns: T_parent_from_child (mm)}`` and the frames: ``(poses, parent, child)`` of the
    ground-truth transforms in ``messages`` (ValueError without any, or with several frame pairs)."""
    poses: dict[int, Tensor] = {}
    frames = set()
    for m in messages:
        if m.topic != topic:
            continue
        for tf in deserialize(m).transforms:
            frames.add((tf.header.frame_id.lstrip("/"), tf.child_frame_id.lstrip("/")))
            poses[stamp_to_ns(tf.header.stamp)] = T_from_transform(tf.transform)
    if not poses:
        raise ValueError(f"the bag has no ground truth on {topic}")
    if len(frames) != 1:
        raise ValueError(f"ground truth on {topic} names several frame pairs: {sorted(frames)}")
    parent, child = frames.pop()
    return {"poses": poses, "parent": parent, "child": child}
