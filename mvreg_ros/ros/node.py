"""The ROS 2 node: C-arm images + joint states in, the anatomy pose out on TF.

callbacks (executor thread: check and convert each message, resolve the C-arm pose at the
image stamp) -> view sets (synchronized or sequential) -> one worker thread (engine
refinement, quality gates) -> TF ``reference_frame -> anatomy_frame``, ``~/pose``,
``~/status``. Bad input is logged and reported on ``~/status``, never published as TF.
Interfaces, frames and parameters: docs/node.md.
"""

from __future__ import annotations

import functools
import sys
import threading
import time

import rclpy
import rclpy.logging
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseWithCovarianceStamped
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image, JointState

from mvreg_ros.core.imaging.overlay import fusion_rgb
from mvreg_ros.core.registration.refine import Registrar
from mvreg_ros.core.registration.initialisers import (ModelError, PoseTracker, default_initialisers, load_coarse_model,
                                               supine_at_isocentre)
from mvreg_ros.core.registration.pipeline import RegistrationPipeline
from mvreg_ros.core.imaging.xray import check_image
from mvreg_ros.ros.camera_info_pairing import CameraInfoPairing
from mvreg_ros.ros.conversions import (camera_info_to_K, image_to_tensor, ns_to_stamp, pose_with_covariance_from_T, rgb_to_image,
                          stamp_to_ns, transform_stamped_from_T)
from mvreg_ros.ros.joint_buffer import JointStateBuffer, JointStateError
from mvreg_ros.ros.params import ConfigError, declare_and_read
from mvreg_ros.ros.pending import PendingStamps
from mvreg_ros.ros.pipeline import SetOutcome, register_frames
from mvreg_ros.ros.sync import ApproximateTimeSync, Frame, SequentialViewBuffer
from mvreg_ros.ros.tf_publisher import make_transform_broadcaster
from mvreg_ros.ros.volume_source import VolumeError, load_ct
from mvreg_ros.ros.worker import LatestJobWorker

NODE_NAME = "register_node"
OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR


class InputError(ValueError):
    """A message that cannot be used (the text is the reason)."""


class RegisterNode(Node):
    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        try:
            self._setup()
        except BaseException:
            self.destroy_node()
            raise

    # ------------------------------------------------------------------------- start-up
    def _setup(self) -> None:
        cfg = self.cfg = declare_and_read(self)
        log = self.get_logger()
        t0 = time.perf_counter()
        self.volume = load_ct(cfg.volume_path)  # once, at start-up
        self.registrar = Registrar(self.volume, cfg.refine)
        log.info(f"CT {cfg.volume_path!r}: {tuple(self.volume.data.shape)} voxels, spacing "
                 f"{[round(float(s), 3) for s in self.volume.spacing]} mm, loaded in {time.perf_counter() - t0:.1f} s; "
                 f"engine on {cfg.refine.device}")
        self.model = None
        if cfg.model_path:  # the patient-specific coarse network, once, made for this CT
            t0 = time.perf_counter()
            self.model = load_coarse_model(cfg.model_path, self.volume, device=cfg.refine.device)
            log.info(f"coarse network {cfg.model_path!r}: {self.model.arch.size} px views, loaded in "
                     f"{time.perf_counter() - t0:.2f} s; the last accepted pose is a start for "
                     f"{cfg.tracking_max_age_s:g} s, then the network")
        configured = cfg.initial_T_ref_from_ct
        if configured is None:
            configured = supine_at_isocentre(cfg.planes[0], self.registrar.centre_ct)
        self.tracker = PoseTracker()
        initialisers = default_initialisers(configured=configured, tracker=self.tracker, model=self.model,
                                            tracking_max_age_s=cfg.tracking_max_age_s)
        self.pipeline = RegistrationPipeline(self.registrar, initialisers=initialisers, config=cfg.pipeline,
                                             tracker=self.tracker)
        self.joints = JointStateBuffer(window_s=cfg.joint_state_window_s, tolerance_s=cfg.joint_state_tolerance_s,
                                       max_gap_s=cfg.joint_state_max_gap_s, joints=cfg.joint_names)
        if cfg.acquisition_mode == "synchronized":
            self.views = ApproximateTimeSync(len(cfg.image_topics), slop_ns=int(cfg.sync_slop_s * 1e9),
                                             queue_size=cfg.sync_queue_size)
        else:
            self.views = SequentialViewBuffer(num_views=cfg.num_views, min_separation_deg=cfg.min_view_separation_deg,
                                              max_age_ns=int(cfg.max_view_age_s * 1e9))
        # recent CameraInfo of each image topic by stamp, and an image waiting for its CameraInfo
        self._pairing = CameraInfoPairing(len(cfg.image_topics), wait_s=cfg.camera_info_wait_s)
        self._last_image_ns: list[int | None] = [None] * len(cfg.image_topics)
        self._status_lock = threading.Lock()
        self._counts = dict(images=0, inputs_rejected=0, registrations_accepted=0, registrations_rejected=0)
        self._last_joint_status_t = -1e9
        self._stale_reported_for: int | None = None
        self._closing = False
        # stamps of view sets handed to the worker and not finished: the held pose is never
        # republished with a stamp at or after one of them (a newer registration is pending)
        self._pending = PendingStamps()

        # publications
        self.tf, tf_kind = make_transform_broadcaster(self)
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.pose_pub = self.create_publisher(PoseWithCovarianceStamped, "~/pose", reliable)
        self.status_pub = self.create_publisher(DiagnosticArray, "~/status", QoSProfile(depth=50))
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", reliable) if cfg.publish_diagnostics else None
        self.overlay_pub = self.create_publisher(Image, "~/overlay", QoSProfile(depth=1)) if cfg.publish_overlay else None

        # subscriptions
        image_qos = qos_profile_sensor_data if cfg.image_qos == "sensor_data" else QoSProfile(depth=5)
        for i, (image_topic, info_topic) in enumerate(zip(cfg.image_topics, cfg.camera_info_topics)):
            self.create_subscription(Image, image_topic, functools.partial(self._on_image, index=i), image_qos)
            self.create_subscription(CameraInfo, info_topic, functools.partial(self._on_camera_info, index=i), image_qos)
        joint_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.BEST_EFFORT)  # matches reliable publishers too
        self.create_subscription(JointState, cfg.joint_states_topic, self._on_joint_state, joint_qos)

        self.worker = LatestJobWorker(self._register, on_error=self._on_worker_error)
        period = 1.0 / cfg.tf_republish_hz if cfg.tf_republish_hz > 0 else 0.5
        self.create_timer(period, self._on_timer)
        self.create_timer(0.05, self._flush_waiting_images)
        log.info(f"{cfg.acquisition_mode} mode on {list(cfg.image_topics)} (planes "
                 f"{[p.name for p in cfg.planes]}), joints {list(cfg.joint_names)} on {cfg.joint_states_topic}; "
                 f"TF {cfg.reference_frame} -> {cfg.anatomy_frame} via {tf_kind}"
                 f"{' (sim time)' if self.get_parameter('use_sim_time').value else ''}")
        self._status(OK, "started", "waiting for images", {})

    def close(self) -> None:
        """Stop the worker (a running registration may finish within a few seconds)."""
        self._closing = True
        if hasattr(self, "worker"):
            self.worker.stop(timeout=5.0)

    # ------------------------------------------------------------------------ callbacks
    def _on_camera_info(self, msg: CameraInfo, index: int) -> None:
        for p in self._pairing.add_info(index, stamp_to_ns(msg.header.stamp), msg):
            self._use_image(p.image, p.index, p.stamp_ns, p.info)

    def _on_joint_state(self, msg: JointState) -> None:
        stamp = stamp_to_ns(msg.header.stamp)
        try:
            if stamp == 0:
                raise JointStateError("joint state without a stamp")
            self.joints.add(stamp, list(msg.name), list(msg.position))
        except (JointStateError, ValueError, TypeError) as e:
            self._reject_input(f"{self.cfg.joint_states_topic}: {e}", stamp, key="joint_states")

    def _on_image(self, msg: Image, index: int) -> None:
        """Use the image with the CameraInfo of the same stamp; the two topics are not ordered, so
        without one it waits up to camera_info_wait_s, then takes the latest CameraInfo."""
        self._count("images")
        for p in self._pairing.add_image(index, msg, stamp_to_ns(msg.header.stamp)):
            self._use_image(p.image, p.index, p.stamp_ns, p.info)

    def _flush_waiting_images(self) -> None:
        for p in self._pairing.flush_due():
            self._use_image(p.image, p.index, p.stamp_ns, p.info)

    def _use_image(self, msg: Image, index: int, stamp: int, info: CameraInfo | None) -> None:
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
            stamp_set = max(f.stamp_ns for f in view_set)
            if not self._pending.submit(self.worker, view_set, stamp_set):  # hand-off and bookkeeping in one step
                self.get_logger().warning(f"registration busy: dropped a waiting view set "
                                          f"({self.worker.dropped} dropped so far)", throttle_duration_sec=2.0)

    def _frame(self, msg: Image, index: int, stamp: int, info: CameraInfo | None) -> Frame:
        """The checked frame of an image, or an exception whose text is the reason."""
        if stamp == 0:
            raise InputError("image without a stamp")
        last = self._last_image_ns[index]
        if last is not None and stamp <= last:
            raise InputError(f"out-of-order image: stamp {stamp * 1e-9:.6f} s is not newer than the previous image "
                             f"({last * 1e-9:.6f} s)")
        if info is None:
            raise InputError(f"no CameraInfo received yet on {self.cfg.camera_info_topics[index]}")
        raw = image_to_tensor(msg)
        K = camera_info_to_K(info, height=raw.shape[0], width=raw.shape[1])
        check_image(raw, "image")
        plane = self.cfg.planes[index]
        T_ref_from_cam = plane.T_ref_from_cam(self.joints.positions_at(stamp, plane.joint_names))
        return Frame(source=index, stamp_ns=stamp, raw=raw, K=K, T_ref_from_cam=T_ref_from_cam)

    def _on_timer(self) -> None:
        pose = self.tracker.latest()
        if pose is None or self._closing:
            return
        now = self.get_clock().now().nanoseconds
        age_s = (now - pose.stamp_ns) * 1e-9
        if age_s <= self.cfg.pose_hold_s:
            stamp = self._pending.republish_stamp(now, pose.stamp_ns)  # never at or after a pending set's
            if self.cfg.tf_republish_hz > 0 and stamp is not None:
                self._send_tf(pose.T_ref_from_ct, stamp)
        elif self._stale_reported_for != pose.stamp_ns:
            self._stale_reported_for = pose.stamp_ns
            msg = (f"pose stale: last accepted pose is {age_s:.1f} s old (pose_hold_s {self.cfg.pose_hold_s}); "
                   f"no longer published on TF")
            self.get_logger().warning(msg)
            self._status(WARN, "pose_stale", msg, {"pose_stamp": f"{pose.stamp_ns * 1e-9:.9f}"})

    # ---------------------------------------------------------------------- the worker
    def _register(self, frames: list[Frame]) -> None:
        try:
            self._register_and_publish(frames)
        finally:
            self._pending.finish(max(f.stamp_ns for f in frames))

    def _register_and_publish(self, frames: list[Frame]) -> None:
        outcome = register_frames(self.pipeline, frames, i0=self.cfg.i0,
                                  raw_is_line_integral=self.cfg.images_are_line_integrals)
        if self._closing:
            return
        info = self._outcome_values(outcome)
        if outcome.accepted:
            self._count("registrations_accepted")
            pose = self.tracker.latest()
            self._send_tf(pose.T_ref_from_ct, outcome.stamp_ns)
            self.pose_pub.publish(pose_with_covariance_from_T(
                pose.T_ref_from_ct, pose.covariance_ref, frame_id=self.cfg.reference_frame,
                stamp=ns_to_stamp(outcome.stamp_ns)))
            self.get_logger().info(f"registered {len(frames)} views (from {outcome.init_source} pose; "
                                   f"{'+'.join(outcome.outcome.stages)}) in {outcome.outcome.time_s:.2f} s: similarity {info['view_similarity']}, uncertainty "
                                   f"{outcome.result.uncertainty_mm:.2f} mm")
            self._status(OK, "registered", "registration accepted", info)
            self._stale_reported_for = None
            if self.cfg.tf_republish_hz > 0:  # make 'latest' lookups see the new pose right away
                self._send_tf(pose.T_ref_from_ct, self.get_clock().now().nanoseconds)
        else:
            self._count("registrations_rejected")
            self.get_logger().warning(f"registration rejected: {outcome.reason}")
            self._status(WARN, "registration_rejected", outcome.reason, info)
        if self.overlay_pub is not None and outcome.views is not None and outcome.result is not None:
            try:  # a picture for humans: its failure must not turn an accepted registration into a rejection
                rgb = fusion_rgb(self.registrar, outcome.views, outcome.result.T_ref_from_ct)
            except Exception as e:  # noqa: BLE001
                self.get_logger().warning(f"overlay failed: {type(e).__name__}: {e}", throttle_duration_sec=5.0)
                return
            self.overlay_pub.publish(rgb_to_image(rgb, stamp=ns_to_stamp(outcome.stamp_ns),
                                                  frame_id=self.cfg.reference_frame))

    def _on_worker_error(self, e: BaseException) -> None:
        if self._closing:
            return
        self._count("registrations_rejected")
        msg = f"registration raised {type(e).__name__}: {e}"
        self.get_logger().error(msg)
        self._status(ERROR, "registration_rejected", msg, {})

    # ---------------------------------------------------------------------- publishing
    def _send_tf(self, T_ref_from_ct: torch.Tensor, stamp_ns: int) -> None:
        self.tf.sendTransform(transform_stamped_from_T(
            T_ref_from_ct, parent_frame=self.cfg.reference_frame, child_frame=self.cfg.anatomy_frame,
            stamp=ns_to_stamp(stamp_ns)))

    def _outcome_values(self, outcome: SetOutcome) -> dict:
        r = outcome.result
        values = {"stamp": f"{outcome.stamp_ns * 1e-9:.9f}",
                  "views": ",".join(self.cfg.image_topics[s] for s in outcome.sources),
                  "init_source": outcome.init_source, **outcome.init_values}
        if r is not None:
            values.update(view_similarity=",".join(f"{s:.4f}" for s in r.view_similarity),
                          similarity=f"{r.similarity:.4f}", uncertainty_mm=f"{r.uncertainty_mm:.3f}",
                          iterations=str(r.iterations), converged=str(r.converged),
                          time_s=f"{outcome.outcome.time_s:.3f}", stages="+".join(outcome.outcome.stages))
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
                if now - self._last_joint_status_t < 0.5:
                    return
                self._last_joint_status_t = now
        else:
            self.get_logger().warning(f"input rejected: {reason}")
        self._status(WARN, "input_rejected", reason, {"stamp": f"{stamp_ns * 1e-9:.9f}"})

    def _status(self, level: bytes, event: str, message: str, values: dict) -> None:
        pose = self.tracker.latest() if hasattr(self, "tracker") else None
        now = self.get_clock().now()
        if pose is None:
            state = "waiting"
        elif (now.nanoseconds - pose.stamp_ns) * 1e-9 <= self.cfg.pose_hold_s:
            state = "tracking"
        else:
            state = "stale"
        with self._status_lock:
            counts = dict(self._counts)
        counts["sets_dropped_busy"] = self.worker.dropped if hasattr(self, "worker") else 0
        kv = {"state": state, "event": event, "reason": "" if level == OK else message, **values,
              **{k: str(v) for k, v in counts.items()}}
        status = DiagnosticStatus(level=level, name=f"{self.get_name()}: registration", message=f"{state}: {message}",
                                  hardware_id=self.cfg.reference_frame,
                                  values=[KeyValue(key=k, value=str(v)) for k, v in kv.items()])
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = now.to_msg()
        self.status_pub.publish(msg)
        if self.diag_pub is not None:
            self.diag_pub.publish(msg)


def main(args: list[str] | None = None) -> int:
    """Console script ``register_node`` (``ros2 run mvreg_ros register_node`` on a ROS install)."""
    rclpy.init(args=args)
    logger = rclpy.logging.get_logger(NODE_NAME)
    try:
        node = RegisterNode()
    except (ConfigError, VolumeError, ModelError) as e:
        logger.fatal(str(e))
        rclpy.try_shutdown()
        return 2
    except (KeyboardInterrupt, ExternalShutdownException):
        rclpy.try_shutdown()
        return 0
    except Exception as e:  # anything else at start-up: one clear line, no traceback
        logger.fatal(f"start-up failed: {type(e).__name__}: {e}")
        rclpy.try_shutdown()
        return 1
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        # Ctrl-C shuts the context (and rosout) down while we get here: log to stderr only
        print(f"[INFO] [{node.get_name()}]: shutting down", file=sys.stderr, flush=True)
        node.close()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
