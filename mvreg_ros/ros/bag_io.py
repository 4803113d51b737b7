"""Rosbag2 bags of C-arm acquisitions without ROS: simulate them, write them, read them back.

Pure functions (no node, no DDS). Messages are built with the rclpy message classes and
serialised to CDR with ``rclpy.serialization``; the ``rosbags`` package only stores the bytes
(MCAP or sqlite3), so whatever ``ros2 bag play`` or rclpy reads back is byte-identical.

A simulated bag holds, for every image topic of a node parameter file, raw ``mono16`` images
with their ``CameraInfo`` (same stamp), the C-arm's ``JointState`` stream, and the ground truth
``reference_frame -> anatomy_frame`` on :data:`GROUND_TRUTH_TOPIC` (``tf2_msgs/TFMessage``,
metres) at every image stamp. Each message's log time is its stamp. See docs/bag.md.

Scenarios (:data:`SCENARIOS`, ``BagSimConfig.scenario``): ``static`` (the anatomy stays put),
``motion`` (it moves ``motion_mm`` / ``motion_deg`` between two shots: the ground truth changes
there), ``corrupt`` (bad frames interleaved with the good shots: an unsupported encoding, a
truncated buffer, an image without its CameraInfo, an image stamped in a pause of the joint
states; their stamps and kinds are recorded on :data:`CORRUPT_TOPIC`), ``fluoro`` (each shot is
a burst of images at ``fluoro_hz`` while the C-arm stands still).
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
CORRUPT_TOPIC = "/ground_truth/corrupt_inputs"  # std_msgs/Header: stamp and kind of each bad input
SCENARIOS = ("static", "motion", "corrupt", "fluoro")
CORRUPT_KINDS = ("missing_camera_info", "wrong_encoding", "truncated", "stale_joints")
STORAGES = ("mcap", "sqlite3")
IMAGE_TYPE = "sensor_msgs/msg/Image"
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"
JOINT_STATE_TYPE = "sensor_msgs/msg/JointState"
TF_TYPE = "tf2_msgs/msg/TFMessage"
HEADER_TYPE = "std_msgs/msg/Header"


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
    scenario: str = "static"  # one of SCENARIOS
    motion_deg: float = 5.0  # motion: the anatomy turns by this ...
    motion_mm: float = 10.0  # ... and moves by this (seeded random directions) ...
    motion_shot: int | None = None  # ... before this shot (None: the middle one, at least the second)
    fluoro_hz: float = 30.0  # fluoro: image rate of each burst (the burst lasts the shot's hold)

    def __post_init__(self):
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        if self.sets < 1:
            raise ValueError(f"sets must be >= 1, got {self.sets}")
        for name in ("period_s", "joint_rate_hz", "fluoro_hz"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.hold_s < self.period_s / 2:
            raise ValueError(f"hold_s must lie in [0, period_s / 2), got {self.hold_s}")
        for name in ("motion_deg", "motion_mm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.motion_shot is not None and (isinstance(self.motion_shot, bool) or self.motion_shot < 1):
            raise ValueError(
                f"motion_shot must be an integer >= 1 (a shot before it is needed), got {self.motion_shot}"
            )
        if self.scenario == "fluoro" and self.hold_s <= 0:
            raise ValueError("the fluoro scenario needs hold_s > 0 (the burst lasts the hold)")


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


SWEEP_SHOTS = 20  # the planes turn for this many shots, then back, and so on (a bounded swing)


def sweep(shot: int, period: int = SWEEP_SHOTS) -> int:
    """A triangle wave over shots: 0, 1, ..., ``period``, ``period - 1``, ..., 0, 1, ... (the
    step count of a C-arm that swings back and forth instead of turning on for ever)."""
    if shot < 0:
        raise ValueError(f"shot must be >= 0, got {shot}")
    k = shot % (2 * period)
    return k if k <= period else 2 * period - k


def shot_joints(cfg: NodeConfig, shot: int) -> dict[str, float]:
    """Joint values (rad, m) of shot ``shot``: synchronized, each plane near its own zero view
    and turning a little from set to set (0.03 rad orbital, 0.01 rad angular per shot, back and
    forth over :data:`SWEEP_SHOTS` shots: within 0.6 / 0.2 rad of the first shot's view, the range of
    a C-arm's swing during a procedure); sequential, alternating between views about 55 deg apart,
    swinging the same way."""
    q: dict[str, float] = {}
    s = sweep(shot)
    for p, plane in enumerate(cfg.planes):
        if cfg.acquisition_mode == "sequential":
            orbital = math.radians(55.0) * (shot % 2) + 0.02 * s
            angular = 0.12 * (shot % 2) - 0.01 * s
        else:
            orbital = (0.15 if p % 2 == 0 else 0.05) + 0.03 * s
            angular = (-0.05 if p % 2 == 0 else 0.1) + 0.01 * s
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


def shot_count(cfg: NodeConfig, sim: BagSimConfig) -> int:
    """Shots of a simulation: one per set, plus ``num_views - 1`` in sequential mode."""
    return sim.sets + (cfg.num_views - 1 if cfg.acquisition_mode == "sequential" else 0)


def motion_shot(cfg: NodeConfig, sim: BagSimConfig) -> int:
    """The first shot after the motion (``motion`` scenario)."""
    shots = shot_count(cfg, sim)
    k = sim.motion_shot if sim.motion_shot is not None else max(1, shots // 2)
    if not 1 <= k < shots:
        raise ValueError(f"the motion must come before one of the {shots} shots after the first, got shot {k}")
    return k


def moved_pose(cfg: NodeConfig, volume: Volume, sim: BagSimConfig, truth: Tensor) -> Float[Tensor, "4 4"]:
    """The anatomy after the motion: ``truth`` turned by ``motion_deg`` about the CT's bone centre
    and moved by ``motion_mm`` (directions from ``seed``)."""
    centre = volume.bone_centre_ct().to(torch.float64)
    g = torch.Generator().manual_seed(10_000 + sim.seed)
    return perturb(truth, rot_deg=sim.motion_deg, trans_mm=sim.motion_mm, centre_ct=centre, generator=g)


def simulate_messages(
    cfg: NodeConfig, volume: Volume, sim: BagSimConfig = BagSimConfig(), *, renderer: Renderer | None = None
) -> tuple[list[BagMessage], Float[Tensor, "4 4"]]:
    """The messages of a simulated acquisition for the node configured by ``cfg`` (its topics,
    planes, joints and acquisition mode), sorted by log time, and the true ``T_ref_from_ct`` (mm)
    of the first shot (the ground truth on :data:`GROUND_TRUTH_TOPIC` follows a motion)."""
    renderer = renderer or Renderer(volume)
    truth = ground_truth_pose(cfg, volume, sim)
    shots = shot_count(cfg, sim)
    truths = [truth] * shots
    if sim.scenario == "motion":
        k = motion_shot(cfg, sim)
        truths = [truth] * k + [moved_pose(cfg, volume, sim, truth)] * (shots - k)
    det = sim.detector
    K = det.K()
    s_to_ns = lambda t: sim.start_ns + int(round(t * 1e9))
    shot_t = [sim.lead_s + k * sim.period_s for k in range(shots)]
    topics = range(len(cfg.image_topics)) if cfg.acquisition_mode == "synchronized" else [0]
    out: list[BagMessage] = []

    def images_at(k: int, t: float, seed: int) -> None:
        stamp = ns_to_stamp(s_to_ns(t))
        gt = transform_stamped_from_T(
            truths[k], parent_frame=cfg.reference_frame, child_frame=cfg.anatomy_frame, stamp=stamp
        )
        out.append(record(GROUND_TRUTH_TOPIC, message_class(TF_TYPE)(transforms=[gt]), s_to_ns(t)))
        q = shot_joints(cfg, k)
        T_cam_from_ct = torch.stack([invert(plane.T_ref_from_cam(q)) @ truths[k] for plane in cfg.planes])
        raw = simulate.acquire(
            renderer,
            T_cam_from_ct,
            K.expand(len(cfg.planes), 3, 3),
            det.height,
            det.width,
            generator=torch.Generator().manual_seed(seed),
        )
        for i in topics:
            frame = f"{cfg.planes[i].name}_xray_optical"
            info = K_to_camera_info(K, height=det.height, width=det.width, stamp=stamp, frame_id=frame)
            out.append(record(cfg.camera_info_topics[i], info, s_to_ns(t)))
            image = tensor_to_image(raw[i], encoding="mono16", stamp=stamp, frame_id=frame)
            out.append(record(cfg.image_topics[i], image, s_to_ns(t)))

    for k, t in enumerate(shot_t):
        if sim.scenario == "fluoro":  # a burst while the C-arm stands still
            n = int(math.floor(2 * sim.hold_s * sim.fluoro_hz)) + 1
            for j in range(n):
                images_at(k, t - sim.hold_s + j / sim.fluoro_hz, sim.seed * 1000 + k * 100 + j)
        else:
            images_at(k, t, sim.seed * 1000 + k)
    gaps: list[tuple[float, float]] = []  # joint-state pauses (stale_joints)
    if sim.scenario == "corrupt":
        out += _corrupt_inputs(cfg, sim, shot_t, K, s_to_ns, gaps)
    # joint states: each shot's values held for hold_s around it, linear moves in between
    names = list(cfg.joint_names)
    key_t = [v for t in shot_t for v in (t - sim.hold_s, t + sim.hold_s)]
    key_q = np.array([[shot_joints(cfg, k)[n] for n in names] for k in range(shots) for _ in (0, 1)])
    JointState = message_class(JOINT_STATE_TYPE)
    end = shot_t[-1] + sim.tail_s
    for n in range(int(math.floor(end * sim.joint_rate_hz)) + 1):
        t = n / sim.joint_rate_hz
        if any(a < t <= b for a, b in gaps):
            continue
        js = JointState(name=names, position=[float(np.interp(t, key_t, key_q[:, j])) for j in range(len(names))])
        js.header.stamp = ns_to_stamp(s_to_ns(t))
        out.append(record(cfg.joint_states_topic, js, s_to_ns(t)))
    out.sort(key=lambda m: m.log_time_ns)  # stable: CameraInfo before its image
    return out, truth


def _corrupt_inputs(cfg: NodeConfig, sim: BagSimConfig, shot_t, K, s_to_ns, gaps: list) -> list[BagMessage]:
    """Bad frames on the first image topic: one before the first shot (no CameraInfo received yet),
    then two between every two shots, cycling through :data:`CORRUPT_KINDS`. Each is recorded on
    :data:`CORRUPT_TOPIC` (``std_msgs/Header``: its stamp, ``frame_id`` = its kind)."""
    det = sim.detector
    slots = [("missing_camera_info", sim.lead_s / 2)]
    kinds = CORRUPT_KINDS[1:] + CORRUPT_KINDS[:1]
    for k in range(len(shot_t) - 1):
        for j, frac in enumerate((1 / 3, 2 / 3)):
            slots.append((kinds[(2 * k + j) % len(kinds)], shot_t[k] + frac * sim.period_s))
    Header = message_class(HEADER_TYPE)
    rng = np.random.default_rng(sim.seed)
    out = []
    topic, info_topic = cfg.image_topics[0], cfg.camera_info_topics[0]
    frame = f"{cfg.planes[0].name}_xray_optical"
    for kind, t in slots:
        ns = s_to_ns(t)
        stamp = ns_to_stamp(ns)
        pixels = rng.uniform(1000, 60000, (det.height, det.width))
        info = K_to_camera_info(K, height=det.height, width=det.width, stamp=stamp, frame_id=frame)
        if kind == "missing_camera_info":  # none of its own; the latest one (if any) is of another size
            h, w = max(8, det.height // 2), max(8, det.width // 2)
            image, info = tensor_to_image(pixels[:h, :w], encoding="mono16", stamp=stamp, frame_id=frame), None
        elif kind == "wrong_encoding":
            image = tensor_to_image(pixels, encoding="mono8", stamp=stamp, frame_id=frame)
            image.encoding = "bgr8"
        elif kind == "truncated":
            image = tensor_to_image(pixels, encoding="mono16", stamp=stamp, frame_id=frame)
            image.data = bytes(image.data)[: len(image.data) // 2]
        else:  # stale_joints: a good image stamped in a pause of the joint states
            image = tensor_to_image(pixels, encoding="mono16", stamp=stamp, frame_id=frame)
            gaps.append((t - cfg.joint_state_tolerance_s - 0.2, t))
        if info is not None:
            out.append(record(info_topic, info, ns))
        out.append(record(topic, image, ns))
        out.append(record(CORRUPT_TOPIC, Header(stamp=stamp, frame_id=kind), ns))
    return out


def corrupt_inputs(messages: list[BagMessage], *, topic: str = CORRUPT_TOPIC) -> dict[int, str]:
    """``{stamp_ns: kind}`` of the bad inputs a simulated bag records (empty when none)."""
    return {stamp_to_ns(deserialize(m).stamp): deserialize(m).frame_id for m in messages if m.topic == topic}


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
