"""The ROS 2 node: C-arm images + joint states in, the anatomy pose out on TF.

A managed (lifecycle) node: ``configure`` checks the parameters, loads the CT and the coarse
network and warms the engine up; ``activate`` subscribes and publishes; ``deactivate`` withdraws
the pose at once and keeps the state; ``cleanup`` frees it. ``autostart`` (default) goes to
active at start-up. callbacks (executor thread: check and convert each message, resolve the
C-arm pose at the image stamp) -> view sets (synchronized or sequential) -> one worker thread
(the engine's pipeline) -> TF ``reference_frame -> anatomy_frame``, ``~/pose``,
``~/pose_valid``, ``~/status``. What to publish when is decided by the pure classes of
held_pose.py (the stamp rule), motion.py (motion safety of sequential sets), time_jump.py,
pending.py and seed.py. Bad input is logged and
reported on ``~/status``, never published as TF. Interfaces, frames and parameters: docs/node.md.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import threading
import time

import rclpy
import rclpy.logging
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseWithCovarianceStamped
from rclpy.clock import Clock, ClockChange, ClockType, JumpThreshold
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image, JointState
from std_msgs.msg import Bool
from std_srvs.srv import Trigger
from visualization_msgs.msg import Marker

from mvreg_ros.core.geometry.transforms import make_T, matrix_from_quaternion
from mvreg_ros.core.imaging.overlay import fusion_rgb
from mvreg_ros.core.imaging.xray import check_image
from mvreg_ros.core.registration.initialisers import (
    AcceptedPose,
    ModelError,
    default_initialisers,
    load_coarse_model,
    supine_at_isocentre,
)
from mvreg_ros.core.registration.pipeline import RegistrationPipeline
from mvreg_ros.core.registration.refine import Registrar
from mvreg_ros.ros.camera_info_pairing import CameraInfoPairing
from mvreg_ros.ros.compute_threads import compute_thread, light_thread, run_in_compute_thread
from mvreg_ros.ros.conversions import (
    camera_info_to_K,
    image_to_tensor,
    ns_to_stamp,
    pose_with_covariance_from_T,
    rgb_to_image,
    stamp_to_ns,
    transform_stamped_from_T,
)
from mvreg_ros.ros.held_pose import HeldPose, ImageLag, StaleEpoch
from mvreg_ros.ros.joint_buffer import JointStateBuffer, JointStateError
from mvreg_ros.ros.marker import bone_surface, marker_msg
from mvreg_ros.ros.motion import MotionConfig, MotionState, held_pose_contradicted, judge_set
from mvreg_ros.ros.params import NODE_SPECS, ConfigError, build_config, declare_parameters, validate
from mvreg_ros.ros.pending import PendingStamps
from mvreg_ros.ros.pipeline import SetOutcome, probe_view, register_frames
from mvreg_ros.ros.seed import SeedPose, check_seed
from mvreg_ros.ros.sync import ApproximateTimeSync, Frame, SequentialViewBuffer
from mvreg_ros.ros.tf_publisher import make_transform_broadcaster
from mvreg_ros.ros.time_jump import TimeJumpDetector
from mvreg_ros.ros.volume_source import VolumeError, load_ct
from mvreg_ros.ros.warmup import warm_up
from mvreg_ros.ros.worker import LatestJobWorker

NODE_NAME = "register_node"
OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR
SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


class InputError(ValueError):
    """A message that cannot be used (the text is the reason)."""


@dataclasses.dataclass(eq=False)
class Job:
    """A view set handed to the worker: its stamp, the epoch of the held pose when it was queued
    (a reset or time jump since discards it) and whether it is a full registration (~/register_now:
    the last accepted pose is not a start)."""

    frames: list[Frame]
    stamp_ns: int
    epoch: int
    full: bool = False
    finished: bool = False


class RegisterNode(LifecycleNode):
    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        try:
            self._init()
        except BaseException:
            self.destroy_node()
            raise

    # ------------------------------------------------------------------- construction
    def _init(self) -> None:
        """What lives in every lifecycle state: the declared parameters, ~/status, ~/pose_valid and
        the services. Parameters that rclpy cannot declare make configure fail."""
        self._declare_error: ConfigError | None = None
        try:
            self._values = declare_parameters(self)
        except ConfigError as e:
            self._values, self._declare_error = {}, e
        try:
            self.autostart = validate(NODE_SPECS["autostart"], self._values.get("autostart", True))
        except ConfigError as e:
            self.autostart, self._declare_error = True, self._declare_error or e
        self.cfg = None
        self.configure_error: tuple[int, str] | None = None  # (exit code, message) of a failed configure
        self.finalized = False
        self._active = False
        self._closing = False
        self._publish_lock = threading.RLock()  # publication vs. deactivate/reset/cleanup
        self._status_lock = threading.Lock()
        self._counts = dict(
            images=0, inputs_rejected=0, registrations_accepted=0, registrations_rejected=0, motions_detected=0
        )
        self._last_input_status_t: dict[str, float] = {}
        self._io: list = []  # subscriptions and timers of the active state
        self._jump_handle = None
        self.worker = self.held = None
        self._pose_valid: bool | None = None
        self.status_pub = self.create_publisher(DiagnosticArray, "~/status", QoSProfile(depth=50))
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.diag_pub = (
            self.create_publisher(DiagnosticArray, "/diagnostics", reliable)
            if self._values.get("publish_diagnostics", True) is True
            else None
        )
        latched = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        self.pose_valid_pub = self.create_publisher(Bool, "~/pose_valid", latched)
        self._set_pose_valid(False)
        self.create_service(Trigger, "~/reset", self._on_reset)
        self.create_service(Trigger, "~/register_now", self._on_register_now)
        self._status(OK, "started", "waiting for configure" + (" (autostart)" if self.autostart else ""), {})

    @property
    def lifecycle_state(self) -> str:
        if self.finalized:
            return "finalized"
        if self.cfg is None:
            return "unconfigured"
        return "active" if self._active else "inactive"

    # ----------------------------------------------------------------- lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.configure_error = None
        try:  # in a thread of its own whose OpenMP pool ends with it (compute_threads.py)
            run_in_compute_thread(self._configure, name="configure")
        except (ConfigError, VolumeError, ModelError) as e:
            return self._configure_failed(2, str(e))
        except Exception as e:  # anything else: one clear line, no traceback
            return self._configure_failed(1, f"configure failed: {type(e).__name__}: {e}")
        return SUCCESS

    def _configure_failed(self, code: int, message: str) -> TransitionCallbackReturn:
        self._teardown()
        self.configure_error = (code, message)
        if not self.autostart:  # with autostart main() prints it as the FATAL line
            self.get_logger().error(message)
        self._status(ERROR, "configure_failed", message, {})
        return FAILURE

    def _configure(self) -> None:
        if self._declare_error is not None:
            raise self._declare_error
        cfg = build_config(self._values)
        log = self.get_logger()
        t0 = time.perf_counter()
        # the loaded CT lives only in this method: the registrar keeps what the engine needs (for a big
        # CT a pooled copy only), the network is checked against it and the marker made from it here
        volume = load_ct(cfg.volume_path)
        self.registrar = Registrar(volume, cfg.refine)
        log.info(
            f"CT {cfg.volume_path!r}: {tuple(volume.data.shape)} voxels, spacing "
            f"{[round(float(s), 3) for s in volume.spacing]} mm, loaded in {time.perf_counter() - t0:.1f} s; "
            f"engine on {cfg.refine.device}"
        )
        self.model = None
        if cfg.model_path:  # the patient-specific coarse network, made for this CT
            t0 = time.perf_counter()
            self.model = load_coarse_model(
                cfg.model_path,
                volume,
                device=cfg.refine.device,
                sids_mm={f"plane {p.name!r}": p.sid_mm for p in cfg.planes},
            )
            log.info(
                f"coarse network {cfg.model_path!r}: {self.model.arch.size} px views, loaded in "
                f"{time.perf_counter() - t0:.2f} s; the last accepted pose is a start for "
                f"{cfg.tracking_max_age_s:g} s, then the network"
            )
        configured = cfg.initial_T_ref_from_ct
        if configured is None:
            configured = supine_at_isocentre(cfg.planes[0], self.registrar.centre_ct)
        self.held = HeldPose(hold_s=cfg.pose_hold_s, republish=cfg.tf_republish_hz > 0)
        self.seed = SeedPose()
        self.motion = MotionState()
        self.image_lag = ImageLag()
        self.motion_cfg = MotionConfig(
            similarity_drop=cfg.motion_similarity_drop,
            min_similarity=cfg.pipeline.acceptance.min_view_similarity,
            max_shift_mm=cfg.motion_max_shift_mm,
            min_gain=cfg.motion_min_gain,
        )
        chain = default_initialisers(
            configured=configured, tracker=self.held, model=self.model, tracking_max_age_s=cfg.tracking_max_age_s
        )
        # the node accepts poses itself (HeldPose.offer: epochs, publication), so no tracker here
        self.pipeline = RegistrationPipeline(
            self.registrar, initialisers=[self.seed, *chain], config=cfg.pipeline, tracker=None
        )
        self.pipeline_full = RegistrationPipeline(
            self.registrar,
            initialisers=[self.seed, *(i for i in chain if i.name != "last_accepted")],
            config=cfg.pipeline,
            tracker=None,
        )
        self.cfg = cfg
        self._make_buffers()
        self.jumps = TimeJumpDetector(joint_jump_s=cfg.time_jump_s)
        self._pending = PendingStamps()
        self._last_set: list[Frame] | None = None
        self.tf, self._tf_kind = make_transform_broadcaster(self)
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.pose_pub = self.create_publisher(PoseWithCovarianceStamped, "~/pose", reliable)
        self.overlay_pub = (
            self.create_publisher(Image, "~/overlay", QoSProfile(depth=1)) if cfg.publish_overlay else None
        )
        self.worker = LatestJobWorker(self._register, on_error=self._on_worker_error, on_start=compute_thread)
        # a big CT's surface from the engine's pooled copy of its voxels (bone_surface would pool the full array again)
        self._make_marker(cfg, volume if self.registrar.full_resolution else self.registrar.box)
        del volume
        values = {}
        if cfg.warmup:
            try:
                report = warm_up(self.registrar, cfg, configured, model=self.model, overlay=cfg.publish_overlay)
            except ValueError as e:
                raise ConfigError(str(e)) from e
            values = report.values()
            log.info(
                f"warm-up: {report.views} views of {report.image_size[0]}x{report.image_size[1]} px in "
                f"{report.time_s:.2f} s ({', '.join(f'{k} {v:.2f} s' for k, v in report.parts.items())})"
            )
        log.info(
            f"configured: {cfg.acquisition_mode} mode on {list(cfg.image_topics)} (planes "
            f"{[p.name for p in cfg.planes]}), joints {list(cfg.joint_names)} on {cfg.joint_states_topic}; "
            f"TF {cfg.reference_frame} -> {cfg.anatomy_frame} via {self._tf_kind}"
            f"{' (sim time)' if self.get_parameter('use_sim_time').value else ''}"
        )
        self._status(OK, "configured", "configured" + (f", warm-up {values['warmup_s']} s" if values else ""), values)

    def _make_marker(self, cfg, volume) -> None:
        """The bone surface for ~/anatomy_marker (published on activate: a lifecycle node's
        publishers are not active before). A failure only costs the picture."""
        self.marker = self.marker_pub = None
        if not cfg.publish_marker:
            return
        t0 = time.perf_counter()
        try:
            vertices, triangles = bone_surface(
                volume, threshold_hu=cfg.marker_threshold_hu, max_triangles=cfg.marker_max_triangles
            )
            self.marker = marker_msg(vertices, triangles, frame_id=cfg.anatomy_frame)
        except Exception as e:
            self.get_logger().warning(f"anatomy marker failed: {type(e).__name__}: {e}")
            return
        if not len(triangles):
            self.get_logger().warning(
                f"anatomy marker: no CT value crosses marker_threshold_hu {cfg.marker_threshold_hu} HU; not published"
            )
            self.marker = None
            return
        latched = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        self.marker_pub = self.create_publisher(Marker, "~/anatomy_marker", latched)
        self.get_logger().info(
            f"anatomy marker: {len(triangles)} triangles at {cfg.marker_threshold_hu:g} HU in "
            f"{time.perf_counter() - t0:.2f} s"
        )

    def _make_buffers(self) -> None:
        """Fresh input buffers (configure, and a backward time jump)."""
        cfg = self.cfg
        self.joints = JointStateBuffer(
            window_s=cfg.joint_state_window_s,
            tolerance_s=cfg.joint_state_tolerance_s,
            max_gap_s=cfg.joint_state_max_gap_s,
            joints=cfg.joint_names,
        )
        if cfg.acquisition_mode == "synchronized":
            self.views = ApproximateTimeSync(
                len(cfg.image_topics), slop_ns=int(cfg.sync_slop_s * 1e9), queue_size=cfg.sync_queue_size
            )
        else:
            self.views = SequentialViewBuffer(
                num_views=cfg.num_views,
                min_separation_deg=cfg.min_view_separation_deg,
                max_age_ns=int(cfg.max_view_age_s * 1e9),
            )
        self._pairing = CameraInfoPairing(len(cfg.image_topics), wait_s=cfg.camera_info_wait_s)
        self._last_image_ns: list[int | None] = [None] * len(cfg.image_topics)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        cfg = self.cfg
        image_qos = qos_profile_sensor_data if cfg.image_qos == "sensor_data" else QoSProfile(depth=5)
        io = self._io
        for i, (image_topic, info_topic) in enumerate(zip(cfg.image_topics, cfg.camera_info_topics)):
            io.append(
                self.create_subscription(Image, image_topic, functools.partial(self._on_image, index=i), image_qos)
            )
            io.append(
                self.create_subscription(
                    CameraInfo, info_topic, functools.partial(self._on_camera_info, index=i), image_qos
                )
            )
        joint_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.BEST_EFFORT)  # matches reliable publishers too
        io.append(self.create_subscription(JointState, cfg.joint_states_topic, self._on_joint_state, joint_qos))
        io.append(
            self.create_subscription(
                PoseWithCovarianceStamped, "~/initial_pose", self._on_initial_pose, QoSProfile(depth=10)
            )
        )
        # the timers run on the steady clock: with sim time and a stopped /clock the hold still ends
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        period = 1.0 / cfg.tf_republish_hz if cfg.tf_republish_hz > 0 else 0.5
        io.append(self.create_timer(period, self._on_timer, clock=steady))
        io.append(self.create_timer(0.05, self._flush_waiting_images, clock=steady))
        self._jump_handle = self.get_clock().create_jump_callback(
            JumpThreshold(min_forward=None, min_backward=Duration(nanoseconds=-1), on_clock_change=True),
            post_callback=self._on_clock_jump,
        )
        self.jumps.restart(self.get_clock().now().nanoseconds)
        self._active = True
        if self.marker_pub is not None and self.marker is not None:
            self.marker_pub.publish(self.marker)  # transient local: late subscribers get it too
        self._status(OK, "activated", "active: registering view sets", {})
        return SUCCESS

    def _stop_io(self) -> None:
        for entity in self._io:
            if hasattr(entity, "cancel"):
                entity.cancel()
                self.destroy_timer(entity)
            else:
                self.destroy_subscription(entity)
        self._io.clear()
        if self._jump_handle is not None:
            self._jump_handle.unregister()
            self._jump_handle = None

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        self._status(WARN, "deactivated", "inactive: the pose is withdrawn, TF is no longer published", {})
        return SUCCESS

    def _deactivate(self) -> None:
        with self._publish_lock:  # after this no TF leaves the node, not even from the worker
            self._active = False
            if self.held is not None:
                self.held.withdraw("inactive")
            self._set_pose_valid(False)
        self._stop_io()

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self._status(OK, "cleaned_up", "unconfigured: CT, network and state freed", {})
        return SUCCESS

    def _teardown(self) -> None:
        """Back to unconfigured from any state (cleanup, shutdown, a failed configure)."""
        self._deactivate()
        if self.worker is not None:
            self.worker.stop(timeout=5.0)
        with self._publish_lock:
            for name in ("pose_pub", "overlay_pub", "marker_pub"):
                pub = getattr(self, name, None)
                if pub is not None:
                    self.destroy_publisher(pub)
                setattr(self, name, None)
            tf = getattr(self, "tf", None)
            if tf is not None:
                self.destroy_publisher(tf.pub_tf)
            if self.held is not None:
                self.held.forget()
            self.tf = self.worker = self.held = self.cfg = self.marker = None
            self.registrar = self.model = self.pipeline = self.pipeline_full = None

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self.finalized = True
        self._status(OK, "shutdown", "shut down: TF withdrawn, the process ends", {})
        return SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self._status(
            ERROR, "lifecycle_error", f"error during a transition from {state.label}: back to unconfigured", {}
        )
        return SUCCESS

    def close(self) -> None:
        """Stop the worker (a running registration may finish within a few seconds), then give the
        last status, ~/pose_valid and /diagnostics up to a second each to reach their subscribers (a lifecycle
        'shutdown' ends the process right after publishing them)."""
        self._closing = True
        if self.worker is not None:
            self.worker.stop(timeout=5.0)
        for pub in (self.status_pub, self.pose_valid_pub, self.diag_pub):
            if pub is not None:
                try:
                    pub.wait_for_all_acked(Duration(seconds=1.0))
                except Exception:  # the context is already shut down (Ctrl-C): nothing to flush
                    pass

    # ------------------------------------------------------------------- services
    def _on_reset(self, request, response):
        if self.cfg is None:
            response.success, response.message = False, "unconfigured: there is no pose to forget"
            return response
        with self._publish_lock:
            had = self.held.latest() is not None
            self.held.forget()  # a registration running now cannot bring its pose back
            self.motion.forget()
            self.worker.drop_waiting()
            self._pending.clear()
            self.seed.clear()
            self._set_pose_valid(False)
        msg = "held pose forgotten; the next set starts from " + ("the configured pose or the network")
        self.get_logger().info(f"~/reset: {msg}")
        self._status(OK, "reset", msg, {"had_pose": str(had)})
        response.success, response.message = True, msg
        return response

    def _on_register_now(self, request, response):
        if not self._active:
            response.success, response.message = False, f"not active (lifecycle state {self.lifecycle_state})"
            return response
        frames = self._last_set
        if frames is None:
            response.success, response.message = False, "no complete view set received yet"
            return response
        stamp = self._submit(frames, full=True)
        msg = f"queued a full registration of the newest set ({len(frames)} views, stamp {stamp * 1e-9:.9f})"
        self._status(OK, "register_now", msg, {"stamp": f"{stamp * 1e-9:.9f}"})
        response.success, response.message = True, msg
        return response

    def _on_initial_pose(self, msg: PoseWithCovarianceStamped) -> None:
        p, o = msg.pose.pose.position, msg.pose.pose.orientation
        stamp = stamp_to_ns(msg.header.stamp)
        try:
            position, q = check_seed(
                msg.header.frame_id, (p.x, p.y, p.z), (o.x, o.y, o.z, o.w), reference_frame=self.cfg.reference_frame
            )
            T = make_T(matrix_from_quaternion(*q), torch.tensor(position, dtype=torch.float64) * 1000.0)
            n = self.seed.set(T)
        except (ValueError, TypeError) as e:
            self._reject_input(f"~/initial_pose: {e}", stamp, key="initial_pose")
            return
        text = f"initial pose {n} received: the next registration starts there"
        self.get_logger().info(text)
        self._status(OK, "initial_pose", text, {"initial_pose_seq": str(n), "stamp": f"{stamp * 1e-9:.9f}"})

    # ------------------------------------------------------------------ callbacks
    def _on_camera_info(self, msg: CameraInfo, index: int) -> None:
        for p in self._pairing.add_info(index, stamp_to_ns(msg.header.stamp), msg):
            self._use_image(p.image, p.index, p.stamp_ns, p.info)

    def _on_joint_state(self, msg: JointState) -> None:
        stamp = stamp_to_ns(msg.header.stamp)
        try:
            if stamp == 0:
                raise JointStateError("joint state without a stamp")
            jump = self.jumps.joint_stamp(stamp)
            if jump is not None:
                self._time_jump(jump)
            self.joints.add(stamp, list(msg.name), list(msg.position))
        except (JointStateError, ValueError, TypeError) as e:
            self._reject_input(f"{self.cfg.joint_states_topic}: {e}", stamp, key="joint_states")

    def _on_image(self, msg: Image, index: int) -> None:
        """Use the image with the CameraInfo of the same stamp; the two topics are not ordered, so
        without one it waits up to camera_info_wait_s, then takes the latest CameraInfo."""
        self._count("images")
        stamp = stamp_to_ns(msg.header.stamp)
        if stamp > 0:
            self.image_lag.arrived(stamp, self.get_clock().now().nanoseconds)
        for p in self._pairing.add_image(index, msg, stamp):
            self._use_image(p.image, p.index, p.stamp_ns, p.info)

    def _flush_waiting_images(self) -> None:
        for p in self._pairing.flush_due():
            self._use_image(p.image, p.index, p.stamp_ns, p.info)

    def _use_image(self, msg: Image, index: int, stamp: int, info: CameraInfo | None) -> None:
        if not self._active:
            return
        topic = self.cfg.image_topics[index]
        try:
            frame = self._frame(msg, index, stamp, info)
        except (InputError, JointStateError, ValueError, KeyError) as e:
            self._reject_input(f"{topic}: {e}", stamp, key=f"image{index}")
            return
        except Exception as e:  # never let one message take the node down
            self._reject_input(f"{topic}: unexpected {type(e).__name__}: {e}", stamp, key=f"image{index}")
            return
        self._last_image_ns[index] = stamp
        view_set = self.views.add(frame)
        if view_set is not None and not self._closing:
            self._last_set = view_set
            self._submit(view_set, full=False)

    def _submit(self, frames: list[Frame], *, full: bool) -> int:
        stamp = max(f.stamp_ns for f in frames)
        job = Job(frames=list(frames), stamp_ns=stamp, epoch=self.held.epoch, full=full)
        if not self._pending.submit(self.worker, job, stamp):  # hand-off and bookkeeping in one step
            self.get_logger().warning(
                f"registration busy: dropped a waiting view set ({self.worker.dropped} dropped so far)",
                throttle_duration_sec=2.0,
            )
        return stamp

    def _frame(self, msg: Image, index: int, stamp: int, info: CameraInfo | None) -> Frame:
        """The checked frame of an image, or an exception whose text is the reason."""
        if stamp == 0:
            raise InputError("image without a stamp")
        last = self._last_image_ns[index]
        if last is not None and stamp <= last:
            raise InputError(
                f"out-of-order image: stamp {stamp * 1e-9:.6f} s is not newer than the previous image "
                f"({last * 1e-9:.6f} s)"
            )
        if info is None:
            raise InputError(f"no CameraInfo received yet on {self.cfg.camera_info_topics[index]}")
        raw = image_to_tensor(msg)
        K = camera_info_to_K(info, height=raw.shape[0], width=raw.shape[1])
        check_image(raw, "image")
        plane = self.cfg.planes[index]
        T_ref_from_cam = plane.T_ref_from_cam(self.joints.positions_at(stamp, plane.joint_names))
        return Frame(source=index, stamp_ns=stamp, raw=raw, K=K, T_ref_from_cam=T_ref_from_cam)

    def _on_clock_jump(self, jump) -> None:
        change = jump.clock_change
        if change in (ClockChange.ROS_TIME_ACTIVATED, ClockChange.ROS_TIME_DEACTIVATED):
            self._time_jump(f"the clock changed ({change.name})")
        elif jump.delta.nanoseconds < 0:
            self._time_jump(f"the ROS clock went back {-jump.delta.nanoseconds * 1e-9:.3f} s")

    def _time_jump(self, reason: str) -> None:
        """A backward time jump: everything of the old time line goes (executor thread)."""
        with self._publish_lock:
            if self.cfg is None:
                return
            had = self.held.latest() is not None
            self.held.forget()
            self.motion.forget()
            self.image_lag.clear()
            self.worker.drop_waiting()
            self._pending.clear()
            self._make_buffers()
            self._last_set = None
            self.jumps.restart(self.get_clock().now().nanoseconds)
            self._set_pose_valid(False)
        text = f"backward time jump: {reason}; joint states, images, pending sets and the held pose cleared"
        self.get_logger().warning(text)
        self._status(WARN, "time_jump", text, {"had_pose": str(had)})

    def _on_timer(self) -> None:
        if not self._active or self._closing:
            return
        now = self.get_clock().now().nanoseconds
        jump = self.jumps.clock(now)
        if jump is not None:
            self._time_jump(jump)
            return
        with self._publish_lock:
            if not self._active:
                return
            tick = self.held.tick(
                now_ns=now, steady_ns=time.monotonic_ns(), pending=self._pending.any(), lag_ns=self.image_lag.lag_ns()
            )
            pose = self.held.latest()
            if tick.stamp_ns is not None and pose is not None:
                self._send_tf(pose.T_ref_from_ct, tick.stamp_ns)
            if tick.expired:
                self._set_pose_valid(False)
        if tick.expired and pose is not None:
            msg = (
                f"pose stale: the last accepted pose (stamp {pose.stamp_ns * 1e-9:.3f} s) is older than "
                f"pose_hold_s {self.cfg.pose_hold_s} s; no longer published on TF"
            )
            self.get_logger().warning(msg)
            self._status(WARN, "pose_stale", msg, {"pose_stamp": f"{pose.stamp_ns * 1e-9:.9f}"})

    # ------------------------------------------------------------------- the worker
    def _finish(self, job: Job) -> None:
        if not job.finished:
            job.finished = True
            self._pending.finish(job.stamp_ns)

    def _register(self, job: Job) -> None:
        try:
            held = self.held
            if held is None or job.epoch != held.epoch:
                return  # queued before a reset or a time jump
            cfg = self.cfg
            frames = sorted(job.frames, key=lambda f: f.stamp_ns)
            guarded = cfg.acquisition_mode == "sequential" and cfg.motion_check
            if guarded:
                frames, refused = self._motion_filter(job, frames)
                if refused is not None:
                    if not self._closing:
                        self._publish_outcome(job, refused)
                    return
            pipeline = self.pipeline_full if job.full else self.pipeline
            outcome = self._register_frames(pipeline, frames)
            if guarded:
                outcome = self._judge_set(pipeline, frames, outcome)
            if self._closing:
                return
            self._publish_outcome(job, outcome)
        finally:
            self._finish(job)

    def _register_frames(self, pipeline, frames: list[Frame]) -> SetOutcome:
        return register_frames(
            pipeline, frames, i0=self.cfg.i0, raw_is_line_integral=self.cfg.images_are_line_integrals
        )

    # --------------------------------------------------------------- motion safety
    def _motion_filter(self, job: Job, frames: list[Frame]) -> tuple[list[Frame], SetOutcome | None]:
        """Sequential mode, before registering: views known to be pre-motion leave the set; a held
        pose that the newest view contradicts is withdrawn at once (motion_detected), and the views
        it was computed from leave the set too. Returns the views to register, or the rejection."""
        newest = frames[-1]
        required = min(2, self.cfg.num_views)
        held, pose = self.held, self.held.latest()
        level = self.motion.accepted_level
        if held.valid and pose is not None and level is not None and pose.stamp_ns < newest.stamp_ns:
            try:
                p = probe_view(  # full first steps (not agreement_step_scale): motion of millimetres is sought
                    self.registrar,
                    newest,
                    pose.T_ref_from_ct,
                    iterations=self.cfg.pipeline.acceptance.agreement_iterations,
                    i0=self.cfg.i0,
                    raw_is_line_integral=self.cfg.images_are_line_integrals,
                )
                values = (p.similarity, p.shift_mm, p.gain)
            except Exception as e:  # an unchecked view must not keep the pose: counts as a contradiction
                self.get_logger().warning(f"motion check failed: {type(e).__name__}: {e}")
                values = (float("nan"),) * 3
            reason = held_pose_contradicted(*values, accepted_level=level, config=self.motion_cfg)
            if reason:
                self.motion.moved(pose.stamp_ns)
                self._motion_detected(job, newest.stamp_ns, pose.stamp_ns, values, level, reason)
        keep = [frames[i] for i in self.motion.after_motion([f.stamp_ns for f in frames])]
        if len(keep) < len(frames) and len(keep) < required:
            cut = self.motion.pre_motion_ns or 0
            return keep, SetOutcome(
                accepted=False,
                stamp_ns=newest.stamp_ns,
                reason=(
                    f"motion: {len(keep)} view(s) of the set taken after the motion (views stamped at or before "
                    f"{cut * 1e-9:.3f} s show the anatomy before it), {required} needed"
                ),
                sources=tuple(f.source for f in frames),
                motion="pre_motion_views_dropped",
            )
        return keep, None

    def _motion_detected(
        self, job: Job, stamp_ns: int, pose_stamp_ns: int, values: tuple, level: float, reason: str
    ) -> None:
        with self._publish_lock:
            held = self.held
            if held is None or job.epoch != held.epoch:
                return
            withdrawn = held.withdraw("motion")
            self._set_pose_valid(False)
        self._count("motions_detected")
        text = f"motion detected: {reason}; the held pose (stamp {pose_stamp_ns * 1e-9:.3f} s) is withdrawn"
        self.get_logger().warning(text)
        similarity, shift, gain = values
        self._status(
            WARN,
            "motion_detected",
            text,
            {
                "stamp": f"{stamp_ns * 1e-9:.9f}",
                "pose_stamp": f"{pose_stamp_ns * 1e-9:.9f}",
                "similarity_at_held": f"{similarity:.4f}",
                "accepted_level": f"{level:.4f}",
                "view_shift_mm": f"{shift:.2f}",
                "view_gain": f"{gain:.4f}",
                "withdrawn": str(withdrawn),
            },
        )

    def _judge_set(self, pipeline, frames: list[Frame], outcome: SetOutcome) -> SetOutcome:
        """Sequential mode, after registering: when views disagree, the views on the newest view's
        side are registered again (at least two, fewer than all) or the set is rejected."""
        verdict = outcome.outcome.verdict if outcome.outcome is not None else None
        if verdict is None or len(frames) < 2 or not verdict.disagreeing_views:
            return outcome
        stamps = [f.stamp_ns for f in frames]
        required = min(2, self.cfg.num_views)
        d = judge_set(stamps, verdict.disagreeing_views, min_views=required)
        self.motion.moved(d.pre_motion_ns)
        if d.action != "reregister":
            return dataclasses.replace(outcome, accepted=False, reason=d.reason, motion="rejected")
        subset = [frames[i] for i in d.views]
        again = self._register_frames(pipeline, subset)
        v = again.outcome.verdict if again.outcome is not None else None
        if v is not None and v.disagreeing_views:
            d2 = judge_set([f.stamp_ns for f in subset], v.disagreeing_views, min_views=required, subset=True)
            self.motion.moved(d2.pre_motion_ns)
            return dataclasses.replace(again, accepted=False, reason=d2.reason, motion="rejected")
        return dataclasses.replace(again, motion=d.reason)

    def _publish_outcome(self, job: Job, outcome: SetOutcome) -> None:
        info = self._outcome_values(outcome)
        if job.full:
            info["full"] = "True"
        if outcome.accepted:
            self._accepted(job, outcome, info)
        else:
            with self._publish_lock:
                self._finish(job)
                held = self.held
                pose = held.latest() if held is not None else None
                withdrawn = (
                    held is not None
                    and job.epoch == held.epoch
                    and pose is not None
                    and outcome.stamp_ns >= pose.stamp_ns
                    and held.withdraw("rejected")
                )
                if withdrawn:
                    self._set_pose_valid(False)
            self._count("registrations_rejected")
            text = outcome.reason + ("; the held pose is withdrawn (TF no longer published)" if withdrawn else "")
            self.get_logger().warning(f"registration rejected: {text}")
            self._status(WARN, "registration_rejected", text, dict(info, withdrawn=str(withdrawn)))
        self._publish_overlay(outcome)

    def _accepted(self, job: Job, outcome: SetOutcome, info: dict) -> None:
        r = outcome.result
        pose = AcceptedPose(
            T_ref_from_ct=r.T_ref_from_ct.detach().to(torch.float64).cpu(),
            stamp_ns=outcome.stamp_ns,
            covariance_ref=r.covariance_ref(),
            curvature=r.curvature,
        )
        with self._publish_lock:
            self._finish(job)  # this set is no longer pending: the copy below may follow
            if self.held is None:
                return
            active = self._active
            try:
                stamp = self.held.offer(pose, epoch=job.epoch, steady_ns=time.monotonic_ns(), publish=active)
            except StaleEpoch:
                stamp = None
                discarded = True
            else:
                discarded = False
                self.seed.used(outcome.init_values)
                self.motion.accepted(r.view_similarity)
            if active and not discarded:
                if stamp is not None:
                    self._send_tf(pose.T_ref_from_ct, stamp)
                self.pose_pub.publish(
                    pose_with_covariance_from_T(
                        pose.T_ref_from_ct,
                        pose.covariance_ref,
                        frame_id=self.cfg.reference_frame,
                        stamp=ns_to_stamp(outcome.stamp_ns),
                    )
                )
                self._set_pose_valid(True)
                # make 'latest' lookups see the new pose right away (the stamp rule decides)
                tick = self.held.tick(
                    now_ns=self.get_clock().now().nanoseconds,
                    steady_ns=time.monotonic_ns(),
                    pending=self._pending.any(),
                    lag_ns=self.image_lag.lag_ns(),
                )
                if tick.stamp_ns is not None:
                    self._send_tf(pose.T_ref_from_ct, tick.stamp_ns)
        if discarded:
            text = "registration accepted but discarded: the held pose was reset or time jumped back meanwhile"
            self.get_logger().warning(text)
            self._status(WARN, "registration_discarded", text, info)
            return
        self._count("registrations_accepted")
        self.get_logger().info(
            f"registered {len(job.frames)} views (from {outcome.init_source} pose; "
            f"{'+'.join(outcome.outcome.stages)}) in {outcome.outcome.time_s:.2f} s: similarity "
            f"{info['view_similarity']}, uncertainty {r.uncertainty_mm:.2f} mm"
            + ("" if active else " (inactive: not published)")
        )
        self._status(OK, "registered", "registration accepted" + ("" if active else " (inactive: not published)"), info)

    def _publish_overlay(self, outcome: SetOutcome) -> None:
        if self.overlay_pub is None or outcome.views is None or outcome.result is None:
            return
        try:  # a picture for humans: its failure must not turn an accepted registration into a rejection
            rgb = fusion_rgb(self.registrar, outcome.views, outcome.result.T_ref_from_ct)
        except Exception as e:
            self.get_logger().warning(f"overlay failed: {type(e).__name__}: {e}", throttle_duration_sec=5.0)
            return
        with self._publish_lock:
            if self._active and self.overlay_pub is not None:
                self.overlay_pub.publish(
                    rgb_to_image(rgb, stamp=ns_to_stamp(outcome.stamp_ns), frame_id=self.cfg.reference_frame)
                )

    def _on_worker_error(self, e: BaseException) -> None:
        if self._closing:
            return
        self._count("registrations_rejected")
        msg = f"registration raised {type(e).__name__}: {e}"
        self.get_logger().error(msg)
        self._status(ERROR, "registration_rejected", msg, {})

    # ------------------------------------------------------------------ publishing
    def _set_pose_valid(self, valid: bool) -> None:
        """~/pose_valid (latched), published when it changes."""
        with self._publish_lock:
            if self._pose_valid is not valid:
                self._pose_valid = valid
                self.pose_valid_pub.publish(Bool(data=valid))

    def _send_tf(self, T_ref_from_ct: torch.Tensor, stamp_ns: int) -> None:
        self.tf.sendTransform(
            transform_stamped_from_T(
                T_ref_from_ct,
                parent_frame=self.cfg.reference_frame,
                child_frame=self.cfg.anatomy_frame,
                stamp=ns_to_stamp(stamp_ns),
            )
        )

    def _outcome_values(self, outcome: SetOutcome) -> dict:
        r = outcome.result
        values = {
            "stamp": f"{outcome.stamp_ns * 1e-9:.9f}",
            "views": ",".join(self.cfg.image_topics[s] for s in outcome.sources),
            "init_source": outcome.init_source,
            **outcome.init_values,
        }
        if outcome.motion:
            values["motion"] = outcome.motion
        if r is not None:
            values.update(
                view_similarity=",".join(f"{s:.4f}" for s in r.view_similarity),
                similarity=f"{r.similarity:.4f}",
                uncertainty_mm=f"{r.uncertainty_mm:.3f}",
                iterations=str(r.iterations),
                converged=str(r.converged),
                time_s=f"{outcome.outcome.time_s:.3f}",
                stages="+".join(outcome.outcome.stages),
            )
            v = outcome.outcome.verdict
            if v is not None and v.view_shift_mm:
                values.update(view_shift_mm=",".join(f"{x:.2f}" for x in v.view_shift_mm))
        return values

    def _count(self, key: str) -> None:
        with self._status_lock:
            self._counts[key] += 1

    def _reject_input(self, reason: str, stamp_ns: int, *, key: str) -> None:
        """Log and report an unusable message. Joint states come fast: their rejections are
        logged at most once a second and reported at most twice a second (all are counted)."""
        self._count("inputs_rejected")
        if key == "joint_states":
            self.get_logger().warning(f"input rejected: {reason}", throttle_duration_sec=1.0)
            now = time.monotonic()
            with self._status_lock:
                if now - self._last_input_status_t.get(key, -1e9) < 0.5:
                    return
                self._last_input_status_t[key] = now
        else:
            self.get_logger().warning(f"input rejected: {reason}")
        self._status(WARN, "input_rejected", reason, {"stamp": f"{stamp_ns * 1e-9:.9f}"})

    def _status(self, level: bytes, event: str, message: str, values: dict) -> None:
        lifecycle = self.lifecycle_state
        held = self.held
        state = held.state() if lifecycle == "active" and held is not None else lifecycle
        now = self.get_clock().now()
        with self._status_lock:
            counts = dict(self._counts)
        counts["sets_dropped_busy"] = self.worker.dropped if self.worker is not None else 0
        views = getattr(self, "views", None) if self.cfg is not None else None
        # the bounded input buffers: frames waiting for a set now, frames that left unused so far
        counts["frames_queued"] = (
            views.pending() if isinstance(views, ApproximateTimeSync) else len(views.frames) if views else 0
        )
        counts["frames_dropped_sync"] = getattr(views, "dropped", 0)
        kv = {
            "state": state,
            "lifecycle": lifecycle,
            "pose_valid": str(bool(self._pose_valid)),
            "event": event,
            "reason": "" if level == OK else message,
            **values,
            **{k: str(v) for k, v in counts.items()},
        }
        status = DiagnosticStatus(
            level=level,
            name=f"{self.get_name()}: registration",
            message=f"{state}: {message}",
            hardware_id=self.cfg.reference_frame
            if self.cfg is not None
            else str(self._values.get("reference_frame", "")),
            values=[KeyValue(key=k, value=str(v)) for k, v in kv.items()],
        )
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = now.to_msg()
        self.status_pub.publish(msg)
        if self.diag_pub is not None:
            self.diag_pub.publish(msg)


def interrupted(*, ok=rclpy.ok, wait_s: float = 1.0) -> bool:
    """Whether an error out of rclpy came from Ctrl-C: rclpy's signal thread shuts the context down
    (within ``wait_s``), while the interrupt itself can surface inside a message take as a
    ``RuntimeError`` ("Unable to convert call argument", ros/joint_state_publisher#117)."""
    deadline = time.monotonic() + wait_s
    while ok():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def main(args: list[str] | None = None) -> int:
    """Console script ``register_node`` (``ros2 run mvreg_ros register_node`` on a ROS install).

    With ``autostart`` (default) the node configures and activates itself; a failed configure
    ends the process with a FATAL line and exit code 2 (a bad parameter, CT or network) or 1."""
    rclpy.init(args=args)
    light_thread()  # the executor's thread converts and publishes; the node computes in its own threads
    logger = rclpy.logging.get_logger(NODE_NAME)
    try:
        node = RegisterNode()
    except (KeyboardInterrupt, ExternalShutdownException):
        rclpy.try_shutdown()
        return 0
    except Exception as e:  # anything else at start-up: one clear line, no traceback
        logger.fatal(f"start-up failed: {type(e).__name__}: {e}")
        rclpy.try_shutdown()
        return 1
    code = 0
    try:
        if node.autostart:
            if node.trigger_configure() != SUCCESS:
                code, message = node.configure_error or (1, "configure failed")
                logger.fatal(message)
                return code
            if node.trigger_activate() != SUCCESS:
                logger.fatal("activate failed")
                return 1
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        while rclpy.ok() and not node.finalized:  # a lifecycle 'shutdown' ends the process too
            executor.spin_once(timeout_sec=0.2)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except RuntimeError:
        if not interrupted():
            raise
    finally:
        if code == 0:  # Ctrl-C shuts the context (and rosout) down while we get here: stderr only
            print(f"[INFO] [{node.get_name()}]: shutting down", file=sys.stderr, flush=True)
        node.close()
        node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
