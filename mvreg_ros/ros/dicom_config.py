"""The DICOM bridge's parameters: a table (name, type, default, description) and a frozen
:class:`BridgeConfig` built and checked from the values (pure; config/dicom_bridge.yaml is
checked against it by the tests). Every bad value is a ValueError naming the parameter."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from mvreg_ros.core.data.dicom import PATIENT_POSITIONS, DicomConfig
from mvreg_ros.ros.dicom_messages import ENCODINGS, PlaneOutput
from mvreg_ros.ros.dicom_rules import PLANE_IDS, PlaneRule, check_ae_title
from mvreg_ros.ros.dicom_stamps import STAMP_SOURCES, parse_time_zone

NODE_NAME = "dicom_bridge"
SOURCES = ("scp", "folder")
MULTI_FRAME = ("last", "refuse")

# name, type, default, description
BRIDGE_PARAMETERS: tuple[tuple[str, str, Any, str], ...] = (
    ("source", "string", "scp", "Where objects come from: 'scp' (DICOM Storage SCP) or 'folder' (watched folder)."),
    ("ae_title", "string", "MVREG_BRIDGE", "scp: the bridge's own AE title (called AE title)."),
    ("bind_address", "string", "127.0.0.1", "scp: address to listen on ('0.0.0.0': every interface)."),
    ("port", "integer", 11112, "scp: TCP port (1..65535; 0: any free port, logged and on ~/status)."),
    (
        "allowed_calling_ae_titles",
        "string_array",
        [],
        "scp: calling AE titles whose associations are accepted; every other is rejected. Required.",
    ),
    ("tls_cert", "string", "", "scp: PEM certificate of the bridge; with tls_key, the SCP speaks TLS only."),
    ("tls_key", "string", "", "scp: PEM private key of tls_cert."),
    ("tls_ca", "string", "", "scp with TLS: CA file; when set, callers must present a certificate it signed."),
    ("max_associations", "integer", 4, "scp: most simultaneous associations."),
    ("watch_folder", "string", "", "folder: the folder to watch (files that appear after start-up)."),
    ("poll_interval_s", "double", 0.5, "folder: seconds between two listings (a file is read once settled)."),
    ("store_folder", "string", "", "Keep every received object as <SOPInstanceUID>.dcm here ('' : keep nothing)."),
    ("max_object_bytes", "integer", 64 * 1024 * 1024, "Largest accepted object (bytes)."),
    ("max_pixels", "integer", 32 * 1024 * 1024, "Largest accepted Rows x Columns x NumberOfFrames."),
    ("patient_id", "string", "", "Patient ID of the registered patient; objects of any other are refused. Required."),
    (
        "patient_position",
        "string",
        "HFS",
        "PatientPosition that the node's plane mounting assumes; objects stating another are refused.",
    ),
    (
        "assume_patient_position",
        "bool",
        True,
        "Objects without PatientPosition are taken as patient_position (false: refused).",
    ),
    ("sid_tolerance_mm", "double", 5.0, "Largest difference between an object's SID and its plane's sid_m (mm)."),
    ("multi_frame", "string", "last", "Multi-frame objects: 'last' publishes the last frame, 'refuse' refuses them."),
    ("image_encoding", "string", "auto", "'auto' (mono16 when the values fit, else 32FC1), 'mono16' or '32FC1'."),
    ("log_units_per_neper", "double", 0.0, "LOG objects without a Modality LUT: stored units per ln unit (0: refuse)."),
    ("allow_distortion", "bool", False, "Read NON_UNIFORM (uncorrected image-intensifier) frames with a warning."),
    ("joint_states_topic", "string", "/joint_states", "Topic of the JointState messages (the node's)."),
    ("joint_state_lead_s", "double", 0.05, "Pause between a shot's JointState and its CameraInfo + Image (s)."),
    ("stamp_source", "string", "receive", "'receive' (the receive time) or 'acquisition' (acquisition date-time)."),
    ("acquisition_time_zone", "string", "", "acquisition: zone of date-times without an offset (IANA name, +HH:MM)."),
    ("acquisition_offset_s", "double", 0.0, "acquisition: added to the mapped time (the C-arm clock's offset, s)."),
    ("pair_window_s", "double", 10.0, "Biplane partners arrive within this many seconds of each other."),
    ("pair_tolerance_s", "double", 0.5, "Biplane partners' acquisition date-times differ by at most this (s)."),
    ("pair_same_series", "bool", False, "Biplane partners must also share SeriesInstanceUID."),
    ("max_backward_s", "double", 1.0, "A stamp this much older than the newest published is refused (s)."),
    ("planes", "string_array", ["main"], "The node's planes fed by the bridge; each configured by plane.NAME.*"),
)

# per plane NAME: plane.NAME.<name>
PLANE_PARAMETERS: tuple[tuple[str, str, Any, str], ...] = (
    ("image_topic", "string", "/carm/image_raw", "Image topic of the plane (the node's image_topics entry)."),
    ("camera_info_topic", "string", "/carm/camera_info", "CameraInfo topic of the plane."),
    ("frame_id", "string", "carm_optical", "header.frame_id of the Image and CameraInfo."),
    ("orbital_joint", "string", "carm_orbital", "The node's orbital joint of this plane."),
    ("angular_joint", "string", "carm_angular", "The node's angular joint of this plane."),
    ("orbital_sign", "double", 1.0, "The node's orbital_sign of this plane (+1 or -1)."),
    ("angular_sign", "double", 1.0, "The node's angular_sign of this plane (+1 or -1)."),
    ("sid_m", "double", 0.7, "The node's sid_m of this plane (m)."),
    ("table_joints", "string_array", [], "Joints for the table position (longitudinal, lateral, vertical) or []."),
    ("calling_ae_titles", "string_array", [], "Rule: objects from these calling AE titles ([]: any)."),
    ("station_names", "string_array", [], "Rule: objects with these StationName values ([]: any)."),
    ("plane_ids", "string_array", [], "Rule: biplane plane identification, of 'A', 'B', 'single' ([]: any)."),
)


def plane_parameter_names(plane: str) -> list[str]:
    return [f"plane.{plane}.{name}" for name, *_ in PLANE_PARAMETERS]


@dataclasses.dataclass(frozen=True)
class BridgeConfig:
    source: str
    ae_title: str
    bind_address: str
    port: int
    allowed_calling_ae_titles: tuple[str, ...]
    tls_cert: str
    tls_key: str
    tls_ca: str
    max_associations: int
    watch_folder: str
    poll_interval_s: float
    store_folder: str
    max_object_bytes: int
    max_pixels: int
    patient_id: str
    patient_position: str
    assume_patient_position: bool
    sid_tolerance_mm: float
    multi_frame: str
    image_encoding: str
    joint_states_topic: str
    joint_state_lead_s: float
    stamp_source: str
    acquisition_offset_s: float
    pair_window_s: float
    pair_tolerance_s: float
    pair_same_series: bool
    max_backward_s: float
    planes: tuple[PlaneOutput, ...]
    rules: tuple[PlaneRule, ...]
    dicom: DicomConfig
    time_zone: Any  # datetime.tzinfo | None
    acquisition_time_zone: str

    def plane(self, name: str) -> PlaneOutput:
        return next(p for p in self.planes if p.name == name)


def _choice(v: Mapping, name: str, choices) -> str:
    value = str(v[name])
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _number(v: Mapping, name: str, lo: float, hi: float) -> float:
    x = v[name]
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not lo <= x <= hi:
        raise ValueError(f"{name} must be a number within [{lo:g}, {hi:g}], got {x!r}")
    return float(x)


def _integer(v: Mapping, name: str, lo: int, hi: int) -> int:
    x = v[name]
    if isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi:
        raise ValueError(f"{name} must be an integer within [{lo}, {hi}], got {x!r}")
    return int(x)


def _strings(v: Mapping, name: str) -> tuple[str, ...]:
    x = v[name]
    if isinstance(x, str) or not all(isinstance(s, str) for s in x):
        raise TypeError(f"{name} must be a list of strings, got {x!r}")
    return tuple(s.strip() for s in x if s.strip())


def build_config(values: Mapping[str, Any]) -> BridgeConfig:
    """The checked configuration from parameter values (missing ones take their default)."""
    known = {name for name, *_ in BRIDGE_PARAMETERS}
    v = {name: default for name, _, default, _ in BRIDGE_PARAMETERS}
    v.update({k: val for k, val in values.items() if k in known})
    planes_names = _strings(v, "planes")
    if not planes_names or len(set(planes_names)) != len(planes_names):
        raise ValueError(f"planes must name at least one plane, each once, got {list(planes_names)}")
    allowed_extra = {f"plane.{p}.{n}" for p in planes_names for n, *_ in PLANE_PARAMETERS}
    unknown = sorted(k for k in values if k not in known and k not in allowed_extra)
    if unknown:
        raise ValueError(f"unknown parameters {unknown}")

    source = _choice(v, "source", SOURCES)
    allowed = tuple(
        check_ae_title(t, "allowed_calling_ae_titles entry") for t in _strings(v, "allowed_calling_ae_titles")
    )
    if source == "scp":
        check_ae_title(str(v["ae_title"]), "ae_title")
        if not allowed:
            raise ValueError("allowed_calling_ae_titles must name the C-arms allowed to send (source scp)")
    if source == "folder" and not str(v["watch_folder"]).strip():
        raise ValueError("watch_folder must be set when source is folder")
    if bool(v["tls_cert"]) != bool(v["tls_key"]):
        raise ValueError("tls_cert and tls_key go together")
    if v["tls_ca"] and not v["tls_cert"]:
        raise ValueError("tls_ca needs tls_cert and tls_key")
    patient_id = str(v["patient_id"]).strip()
    if not patient_id:
        raise ValueError("patient_id must be set: objects of any other patient are refused")
    position = _choice(v, "patient_position", PATIENT_POSITIONS)
    units = _number(v, "log_units_per_neper", -1e9, 1e9)

    planes, rules = [], []
    for name in planes_names:
        p = {n: values.get(f"plane.{name}.{n}", default) for n, _, default, _ in PLANE_PARAMETERS}
        planes.append(
            PlaneOutput(
                name=name,
                image_topic=str(p["image_topic"]),
                camera_info_topic=str(p["camera_info_topic"]),
                frame_id=str(p["frame_id"]).lstrip("/"),
                orbital_joint=str(p["orbital_joint"]),
                angular_joint=str(p["angular_joint"]),
                orbital_sign=float(p["orbital_sign"]),
                angular_sign=float(p["angular_sign"]),
                sid_m=float(p["sid_m"]),
                table_joints=_strings(p, "table_joints"),
            )
        )
        ids = _strings(p, "plane_ids")
        bad = [i for i in ids if i not in PLANE_IDS]
        if bad:
            raise ValueError(f"plane.{name}.plane_ids: {bad} not among {', '.join(PLANE_IDS)}")
        rules.append(
            PlaneRule(
                name=name,
                calling_ae_titles=_strings(p, "calling_ae_titles"),
                station_names=_strings(p, "station_names"),
                plane_ids=ids,
            )
        )
    topics = [t for pl in planes for t in (pl.image_topic, pl.camera_info_topic)]
    if len(set(topics)) != len(topics):
        raise ValueError(f"every plane needs its own image_topic and camera_info_topic, got {topics}")
    joints = [j for pl in planes for j in pl.joint_names]
    if len(set(joints)) != len(joints):
        raise ValueError(f"planes must not share joints, got {joints}")
    if len(planes) > 1 and any(not (r.calling_ae_titles or r.station_names or r.plane_ids) for r in rules):
        raise ValueError("with several planes every plane needs a rule (calling_ae_titles, station_names or plane_ids)")

    return BridgeConfig(
        source=source,
        ae_title=str(v["ae_title"]).strip(),
        bind_address=str(v["bind_address"]).strip(),
        port=_integer(v, "port", 0, 65535),
        allowed_calling_ae_titles=allowed,
        tls_cert=str(v["tls_cert"]),
        tls_key=str(v["tls_key"]),
        tls_ca=str(v["tls_ca"]),
        max_associations=_integer(v, "max_associations", 1, 64),
        watch_folder=str(v["watch_folder"]).strip(),
        poll_interval_s=_number(v, "poll_interval_s", 0.01, 60.0),
        store_folder=str(v["store_folder"]).strip(),
        max_object_bytes=_integer(v, "max_object_bytes", 1024, 2**34),
        max_pixels=_integer(v, "max_pixels", 1, 2**32),
        patient_id=patient_id,
        patient_position=position,
        assume_patient_position=bool(v["assume_patient_position"]),
        sid_tolerance_mm=_number(v, "sid_tolerance_mm", 0.0, 1000.0),
        multi_frame=_choice(v, "multi_frame", MULTI_FRAME),
        image_encoding=_choice(v, "image_encoding", ENCODINGS),
        joint_states_topic=str(v["joint_states_topic"]),
        joint_state_lead_s=_number(v, "joint_state_lead_s", 0.0, 5.0),
        stamp_source=_choice(v, "stamp_source", STAMP_SOURCES),
        acquisition_offset_s=_number(v, "acquisition_offset_s", -1e9, 1e9),
        pair_window_s=_number(v, "pair_window_s", 0.0, 3600.0),
        pair_tolerance_s=_number(v, "pair_tolerance_s", 0.0, 3600.0),
        pair_same_series=bool(v["pair_same_series"]),
        max_backward_s=_number(v, "max_backward_s", 0.0, 86400.0),
        planes=tuple(planes),
        rules=tuple(rules),
        dicom=DicomConfig(
            patient_position=position if v["assume_patient_position"] else None,
            log_units_per_neper=units if units != 0 else None,
            allow_distortion=bool(v["allow_distortion"]),
        ),
        time_zone=parse_time_zone(str(v["acquisition_time_zone"])),
        acquisition_time_zone=str(v["acquisition_time_zone"]),
    )
