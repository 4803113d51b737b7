"""``dicom_bridge``: DICOM X-ray objects in, the registration node's inputs out.

A short adapter: a DICOM Storage SCP (pynetdicom) or a watched folder hands each object to
:meth:`DicomBridge.handle_object`, which runs the pure checks (dicom_rules: SOP class, patient, size,
plane mapping), reads the view (mvreg_ros.core.data.dicom), builds the messages
(dicom_messages), assigns the stamp (dicom_stamps) and queues the shot; one publishing thread
sends, per shot, the plane's ``JointState``, then (``joint_state_lead_s`` later) its
``CameraInfo`` and ``Image``, all with one stamp. A refused object is logged (WARN, no patient
data), reported on ``~/status`` and never published. Parameters and rules: docs/dicom_bridge.md.
"""

from __future__ import annotations

import dataclasses
import io
import queue
import sys
import threading
import time
from pathlib import Path

import rclpy
import rclpy.logging
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile
from sensor_msgs.msg import CameraInfo, Image, JointState

from mvreg_ros.core.data.dicom import SKIN_DISTANCE_MODALITIES, frame_count, view_from_dataset
from mvreg_ros.ros import dicom_rules as rules
from mvreg_ros.ros.conversions import ns_to_stamp
from mvreg_ros.ros.dicom_config import BRIDGE_PARAMETERS, NODE_NAME, PLANE_PARAMETERS, BridgeConfig, build_config
from mvreg_ros.ros.dicom_folder import SettledFiles, list_folder
from mvreg_ros.ros.dicom_messages import ShotMessages, shot_messages
from mvreg_ros.ros.dicom_stamps import Shot, StampMatcher, acquisition_datetime, acquisition_to_ns
from mvreg_ros.ros.dicom_tls import server_context

OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR
# C-STORE response statuses (PS3.4 B.2.3)
STORE_OK, STORE_OUT_OF_RESOURCES, STORE_CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
_ARRAY_TYPES = {
    "string_array": Parameter.Type.STRING_ARRAY,
    "double_array": Parameter.Type.DOUBLE_ARRAY,
    "integer_array": Parameter.Type.INTEGER_ARRAY,
}


def _seconds(ns: int) -> str:
    """Exact decimal seconds of a stamp (a float64 loses the last digits of today's stamps)."""
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


class Refused(ValueError):
    """An object that is not published; ``status`` is the C-STORE response status."""

    def __init__(self, reason: str, status: int = STORE_CANNOT_UNDERSTAND):
        super().__init__(reason)
        self.status = status


class DicomBridge(Node):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self.status_pub = self.create_publisher(DiagnosticArray, "~/status", QoSProfile(depth=50))
        self.counts = dict.fromkeys(("received", "published", "refused", "associations_rejected"), 0)
        self.cfg: BridgeConfig = build_config(self._declare())
        cfg = self.cfg
        self.matcher = StampMatcher(
            source=cfg.stamp_source,
            pair_window_s=cfg.pair_window_s,
            pair_tolerance_s=cfg.pair_tolerance_s,
            pair_same_series=cfg.pair_same_series,
            max_backward_s=cfg.max_backward_s,
        )
        reliable = QoSProfile(depth=10)
        self.joint_pub = self.create_publisher(JointState, cfg.joint_states_topic, QoSProfile(depth=100))
        self.image_pubs = {p.name: self.create_publisher(Image, p.image_topic, reliable) for p in cfg.planes}
        self.info_pubs = {p.name: self.create_publisher(CameraInfo, p.camera_info_topic, reliable) for p in cfg.planes}
        if cfg.store_folder:
            Path(cfg.store_folder).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one object at a time: stamp order == publishing order
        self._queue: queue.Queue = queue.Queue()
        self._closing = threading.Event()
        self._publisher = threading.Thread(target=self._publish_loop, name="dicom_bridge_publisher", daemon=True)
        self._publisher.start()
        self._bytes: dict[int, int] = {}  # association id -> bytes received since its last C-STORE
        self.server = None
        self.port = 0
        self._folder = None
        if cfg.source == "scp":
            self._start_scp()
            where = f"DICOM Storage SCP {cfg.ae_title} on {cfg.bind_address}:{self.port}" + (
                " (TLS)" if cfg.tls_cert else ""
            )
        else:
            folder = Path(cfg.watch_folder)
            if not folder.is_dir():
                raise ValueError(f"watch_folder {folder} is not a folder")
            self._folder = SettledFiles(list_folder(folder))
            self.create_timer(cfg.poll_interval_s, self._poll_folder)
            where = f"watching {folder}"
        planes = ", ".join(f"{p.name} -> {p.image_topic}" for p in cfg.planes)
        text = f"{where}; planes {planes}; joint states on {cfg.joint_states_topic}; stamps: {cfg.stamp_source}"
        self.get_logger().info(text)
        self._status(OK, "started", text, {"port": str(self.port) if self.server else ""})

    # ------------------------------------------------------------------ parameters
    def _declare_one(self, name: str, kind: str, default, description: str):
        from rcl_interfaces.msg import ParameterDescriptor

        d = ParameterDescriptor(name=name, description=description, read_only=True)
        value = _ARRAY_TYPES[kind] if isinstance(default, list) and not default else default
        try:
            p = self.declare_parameter(name, value, d)
        except Exception as e:  # rclpy's InvalidParameterType/ValueException: name the parameter
            raise ValueError(f"parameter {name!r} must be {kind.replace('_', ' ')}: {e}") from None
        v = p.value
        if v is None:
            v = list(default) if isinstance(default, list) else default
        return list(v) if kind.endswith("_array") else v

    def _declare(self) -> dict:
        values = {name: self._declare_one(name, kind, d, text) for name, kind, d, text in BRIDGE_PARAMETERS}
        for plane in dict.fromkeys(values["planes"]):
            if not plane or "." in plane or "/" in plane:
                raise ValueError(f"parameter 'planes': invalid plane name {plane!r}")
            for name, kind, d, text in PLANE_PARAMETERS:
                full = f"plane.{plane}.{name}"
                values[full] = self._declare_one(full, kind, d, text)
        return values

    # ------------------------------------------------------------------ sources
    def _start_scp(self) -> None:
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        cfg = self.cfg
        ae = AE(ae_title=cfg.ae_title)
        syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
        for uid in rules.SOP_CLASSES:
            ae.add_supported_context(uid, syntaxes)
        ae.add_supported_context(Verification)
        ae.require_calling_aet = list(cfg.allowed_calling_ae_titles)
        ae.maximum_associations = cfg.max_associations
        ae.network_timeout = 30
        ae.dimse_timeout = 30
        ae.acse_timeout = 30
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_DATA_RECV, self._on_data),
        ]
        self.server = ae.start_server(
            (cfg.bind_address, cfg.port), block=False, evt_handlers=handlers, ssl_context=self._ssl_context()
        )
        self.port = self.server.server_address[1]

    def _ssl_context(self):
        cfg = self.cfg
        if not cfg.tls_cert:
            return None
        return server_context(cfg.tls_cert, cfg.tls_key, cfg.tls_ca)

    def _on_rejected(self, event) -> None:
        with self._lock:
            self.counts["associations_rejected"] += 1
        calling = str(event.assoc.requestor.ae_title).strip()
        text = f"association from calling AE title {calling!r} rejected (not in allowed_calling_ae_titles, or busy)"
        self.get_logger().warning(text)
        self._status(WARN, "association_rejected", text, {"calling_ae": calling, "reason": text})

    def _on_data(self, event) -> None:
        """Abort an association that sends more than max_object_bytes for one object (the
        object is assembled in memory before the C-STORE handler runs)."""
        key = id(event.assoc)
        n = self._bytes.get(key, 0) + len(event.data)
        self._bytes[key] = n
        if n > self.cfg.max_object_bytes + 65536 and n - len(event.data) <= self.cfg.max_object_bytes + 65536:
            text = f"association aborted: more than max_object_bytes ({self.cfg.max_object_bytes}) for one object"
            self.get_logger().warning(text)
            self._refused_count()
            self._status(WARN, "refused", text, {"reason": text})
            threading.Thread(target=event.assoc.abort, daemon=True).start()  # not from the DUL thread itself

    def _on_store(self, event) -> int:
        receive_ns = self.get_clock().now().nanoseconds
        self._bytes.pop(id(event.assoc), None)
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            nbytes = len(event.request.DataSet.getvalue())
            rules.check_size(nbytes, self.cfg.max_object_bytes)
            ds = event.dataset
            ds.file_meta = event.file_meta
        except ValueError as e:
            return self._refuse(str(e), "", STORE_OUT_OF_RESOURCES, calling)
        except Exception as e:  # pydicom cannot decode it
            return self._refuse(
                f"cannot decode the data set ({type(e).__name__})", "", STORE_CANNOT_UNDERSTAND, calling
            )
        return self.handle_object(ds, calling_ae=calling, receive_ns=receive_ns, origin="scp")

    def _poll_folder(self) -> None:
        import pydicom

        folder = Path(self.cfg.watch_folder)
        try:
            names = self._folder.poll(list_folder(folder))
        except OSError as e:
            self.get_logger().warning(f"watch_folder: {e}", throttle_duration_sec=5.0)
            return
        for name in names:
            receive_ns = self.get_clock().now().nanoseconds
            path = folder / name
            label = rules.sanitise_filename(name, suffix="")
            try:
                rules.check_size(path.stat().st_size, self.cfg.max_object_bytes, what=f"file {label}")
                ds = pydicom.dcmread(path)
            except ValueError as e:
                self._refuse(str(e), "", STORE_OUT_OF_RESOURCES, "")
                continue
            except Exception as e:
                self._refuse(f"file {label} is not a readable DICOM file ({type(e).__name__})", "", 0, "")
                continue
            self.handle_object(ds, calling_ae="", receive_ns=receive_ns, origin="folder")

    # ------------------------------------------------------------------ one object
    def handle_object(self, ds, *, calling_ae: str, receive_ns: int, origin: str) -> int:
        """Check, convert, stamp and queue one object; the C-STORE status (0 when queued)."""
        tag = rules.object_tag(ds)
        with self._lock:
            self.counts["received"] += 1
            try:
                plane, shot, msgs = self._convert(ds, calling_ae, receive_ns, tag)
                stamp_ns, paired = self.matcher.assign(shot)
                msgs.set_stamp(ns_to_stamp(stamp_ns))
                if self.cfg.store_folder:
                    self._store(ds)
            except Refused as e:
                return self._refuse(str(e), tag, e.status, calling_ae)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
                return self._refuse(str(e), tag, STORE_CANNOT_UNDERSTAND, calling_ae)
            except Exception as e:  # never let one object take the bridge down
                return self._refuse(f"unexpected {type(e).__name__}: {e}", tag, STORE_CANNOT_UNDERSTAND, calling_ae)
            self._queue.put((plane, stamp_ns, paired, tag, origin, msgs))
        return STORE_OK

    def _convert(self, ds, calling_ae: str, receive_ns: int, tag: str) -> tuple[str, Shot, ShotMessages]:
        cfg = self.cfg
        rules.check_object(ds, expected_patient_id=cfg.patient_id, max_pixels=cfg.max_pixels)
        station = str(ds.get("StationName", "") or "")
        plane = rules.map_plane(
            cfg.rules, calling_ae=calling_ae, station_name=station, plane_id=rules.plane_identification(ds)
        )
        out = cfg.plane(plane)
        n = frame_count(ds)
        if n > 1 and cfg.multi_frame == "refuse":
            raise Refused(f"multi-frame object ({n} frames) refused (multi_frame: refuse)")
        frame = n - 1 if n > 1 else None
        dicom_cfg = cfg.dicom
        if str(ds.get("Modality", "")).strip() in SKIN_DISTANCE_MODALITIES:  # DX/CR: the plane's SID
            dicom_cfg = dataclasses.replace(dicom_cfg, sid_mm=out.sid_m * 1000.0)
        view = view_from_dataset(ds, frame, config=dicom_cfg, name=tag)
        if view.patient_position != cfg.patient_position:
            raise Refused(
                f"PatientPosition {view.patient_position} differs from patient_position {cfg.patient_position} "
                "(the node's plane mounting assumes the latter)"
            )
        msgs = shot_messages(view, out, encoding=cfg.image_encoding, sid_tolerance_mm=cfg.sid_tolerance_mm)
        acquired = acquisition_datetime(ds, frame)
        acquired_ns = None
        if cfg.stamp_source == "acquisition":
            if acquired is None:
                raise Refused("stamp_source acquisition: the object has no acquisition date-time")
            acquired_ns = acquisition_to_ns(acquired, time_zone=cfg.time_zone, offset_s=cfg.acquisition_offset_s)
        shot = Shot(
            plane=plane,
            receive_ns=receive_ns,
            study_uid=str(ds.get("StudyInstanceUID", "") or ""),
            series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
            acquired=acquired,
            acquired_ns=acquired_ns,
        )
        return plane, shot, msgs

    def _store(self, ds) -> None:
        path = rules.storage_path(self.cfg.store_folder, str(ds.SOPInstanceUID))
        tmp = path.with_name(path.name + ".part")
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)  # atomic: a reader of the folder never sees half a file

    def _refused_count(self) -> None:
        self.counts["refused"] += 1

    def _refuse(self, reason: str, tag: str, status: int, calling_ae: str) -> int:
        self._refused_count()
        text = f"{tag or 'object'} refused: {reason}"
        self.get_logger().warning(text)
        self._status(WARN, "refused", text, {"object": tag, "reason": reason, "calling_ae": calling_ae})
        return status or STORE_CANNOT_UNDERSTAND

    # ------------------------------------------------------------------ publishing
    def _publish_loop(self) -> None:
        while not self._closing.is_set():
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            plane, stamp_ns, paired, tag, origin, msgs = item
            try:
                self.joint_pub.publish(msgs.joint_state)
                if self.cfg.joint_state_lead_s > 0:
                    time.sleep(self.cfg.joint_state_lead_s)
                self.info_pubs[plane].publish(msgs.camera_info)
                self.image_pubs[plane].publish(msgs.image)
            except Exception as e:  # the context is shutting down
                if not self._closing.is_set():
                    self.get_logger().error(f"{tag}: publishing failed: {type(e).__name__}: {e}")
                continue
            self.counts["published"] += 1
            text = f"{tag} published on plane {plane} at {_seconds(stamp_ns)} s" + (
                " (biplane partner)" if paired else ""
            )
            self.get_logger().info(text)
            values = {
                "object": tag,
                "plane": plane,
                "stamp": f"{_seconds(stamp_ns)}",
                "stamp_ns": str(stamp_ns),
                "paired": str(paired),
                "source": origin,
                "encoding": msgs.image.encoding,
            }
            self._status(OK, "published", text, values)

    def _status(self, level: bytes, event: str, message: str, values: dict) -> None:
        status = DiagnosticStatus(level=level, name=NODE_NAME, message=f"{event}: {message}", hardware_id="")
        merged = {"event": event, "reason": "", **values, **{k: str(v) for k, v in self.counts.items()}}
        status.values = [KeyValue(key=k, value=str(v)) for k, v in merged.items()]
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.status = [status]
        try:
            self.status_pub.publish(msg)
        except Exception:  # the context is shutting down
            pass

    def close(self) -> None:
        self._closing.set()
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self._publisher.join(timeout=2.0)


def main(args: list[str] | None = None) -> int:
    """Console script ``dicom_bridge``: exit code 2 and a FATAL line for a bad parameter."""
    rclpy.init(args=args)
    logger = rclpy.logging.get_logger(NODE_NAME)
    try:
        node = DicomBridge()
    except (KeyboardInterrupt, ExternalShutdownException):
        rclpy.try_shutdown()
        return 0
    except (ValueError, TypeError, OSError) as e:
        logger.fatal(f"start-up failed: {e}")
        rclpy.try_shutdown()
        return 2
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        while rclpy.ok():
            executor.spin_once(timeout_sec=0.2)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        print(f"[INFO] [{NODE_NAME}]: shutting down", file=sys.stderr, flush=True)
        node.close()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
