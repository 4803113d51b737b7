"""Pure tests of the DICOM bridge's logic: acceptance rules, plane mapping, stamps, the watched
folder, DicomView -> messages, and the parameter file (no DDS, no network)."""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("rclpy")
pytest.importorskip("pydicom")

from mvreg_ros.core.data.dicom import view_from_dataset
from mvreg_ros.core.data.dicom_write import StudyInfo, enhanced_xa_dataset, xa_dataset
from mvreg_ros.core.data.simulate import DetectorConfig
from mvreg_ros.ros import dicom_rules as rules
from mvreg_ros.ros.conversions import camera_info_to_K, image_to_tensor
from mvreg_ros.ros.dicom_config import build_config
from mvreg_ros.ros.dicom_folder import SettledFiles, list_folder
from mvreg_ros.ros.dicom_messages import PlaneOutput, image_pixels, joint_values, shot_messages
from mvreg_ros.ros.dicom_stamps import (
    Acquired,
    Shot,
    StampMatcher,
    acquisition_datetime,
    acquisition_to_ns,
    parse_time_zone,
)

REPO = Path(__file__).resolve().parents[2]
DET = DetectorConfig(height=24, width=32, pixel_mm=4.0, sid_mm=785.0, sdd_mm=1200.0)
STUDY = StudyInfo.new(seed=7)


def raw(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 60000, (DET.height, DET.width), generator=g).to(torch.float32)


def xa(orbital=20.0, angular=-10.0, **kw):
    return xa_dataset(raw(), orbital_deg=orbital, angular_deg=angular, detector=DET, study=STUDY, **kw)


PLANE = PlaneOutput(
    name="frontal",
    image_topic="/carm/frontal/image_raw",
    camera_info_topic="/carm/frontal/camera_info",
    frame_id="carm_frontal_optical",
    orbital_joint="frontal_orbital",
    angular_joint="frontal_angular",
    sid_m=0.785,
)


# ------------------------------------------------------------------------------ checks


def test_sop_classes_and_ae_titles():
    assert rules.check_sop_class("1.2.840.10008.5.1.4.1.1.12.1") == "1.2.840.10008.5.1.4.1.1.12.1"
    for uid in ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.1.1", ""):  # CT, DX for presentation
        with pytest.raises(ValueError, match="SOPClassUID"):
            rules.check_sop_class(uid)
    assert rules.check_calling_ae("CARM_A  ", ["CARM_A"]) == "CARM_A"
    with pytest.raises(ValueError, match="calling AE title 'EVIL'"):
        rules.check_calling_ae("EVIL", ["CARM_A"])
    for bad in ("", "A" * 17, "BACK\\SLASH"):
        with pytest.raises(ValueError, match="AE title"):
            rules.check_ae_title(bad)
    with pytest.raises(TypeError):
        rules.check_ae_title(5)


def test_object_checks_patient_size():
    ds = xa()
    assert rules.check_object(ds, expected_patient_id="SIM-0001", max_pixels=10_000) == ds.SOPClassUID
    with pytest.raises(ValueError, match="differs from the configured patient_id") as e:
        rules.check_object(ds, expected_patient_id="OTHER-42", max_pixels=10_000)
    assert "SIM-0001" not in str(e.value) and "OTHER-42" not in str(e.value)  # no patient data
    with pytest.raises(ValueError, match="max_pixels"):
        rules.check_object(ds, expected_patient_id="SIM-0001", max_pixels=100)
    del ds.PatientID
    with pytest.raises(ValueError, match="PatientID is missing"):
        rules.check_patient(ds, "SIM-0001")
    with pytest.raises(ValueError, match="max_object_bytes"):
        rules.check_size(2000, 1000)
    ds = xa()
    del ds.PixelData
    with pytest.raises(ValueError, match="PixelData is missing"):
        rules.check_dimensions(ds, 10_000)
    ds = xa()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    with pytest.raises(ValueError, match="MediaStorageSOPClassUID"):
        rules.check_object(ds, expected_patient_id="SIM-0001", max_pixels=10_000)


def test_object_tag_has_no_patient_data():
    ds = xa()
    tag = rules.object_tag(ds)
    assert tag.startswith("obj-") and len(tag) == 16 and tag == rules.object_tag(ds)
    assert ds.SOPInstanceUID not in tag


def test_plane_identification_and_mapping():
    ds = xa()
    assert rules.plane_identification(ds) == "single"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "BIPLANE B"]
    assert rules.plane_identification(ds) == "B"
    ds.PlaneIdentification = "PLANE A"
    assert rules.plane_identification(ds) == "A"
    del ds.PlaneIdentification
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    assert rules.plane_identification(ds) == ""

    biplane = [rules.PlaneRule("frontal", plane_ids=("A", "single")), rules.PlaneRule("lateral", plane_ids=("B",))]
    assert rules.map_plane(biplane, calling_ae="X", station_name="", plane_id="B") == "lateral"
    assert rules.map_plane(biplane, calling_ae="X", station_name="", plane_id="single") == "frontal"
    with pytest.raises(ValueError, match="no plane rule"):
        rules.map_plane(biplane, calling_ae="X", station_name="", plane_id="")
    two_carms = [
        rules.PlaneRule("left", calling_ae_titles=("CARM_L",)),
        rules.PlaneRule("right", calling_ae_titles=("CARM_R",), station_names=("OR3",)),
    ]
    assert rules.map_plane(two_carms, calling_ae="CARM_R ", station_name="OR3", plane_id="") == "right"
    with pytest.raises(ValueError, match="no plane rule"):
        rules.map_plane(two_carms, calling_ae="CARM_R", station_name="OR4", plane_id="")
    overlapping = [rules.PlaneRule("a"), rules.PlaneRule("b", station_names=("OR3",))]
    with pytest.raises(ValueError, match="all match"):
        rules.map_plane(overlapping, calling_ae="", station_name="OR3", plane_id="")
    with pytest.raises(ValueError, match="plane_ids"):
        rules.PlaneRule("x", plane_ids=("C",))


def test_storage_names_are_sanitised(tmp_path):
    assert rules.sanitise_filename("1.2.3") == "1.2.3.dcm"
    assert rules.sanitise_filename("../../etc/passwd") == "_.._etc_passwd.dcm"
    assert "/" not in rules.sanitise_filename("a/b\\c")
    for name in ("1.2.840.1", "../../x", "/abs/path", "a\x00b"):
        p = rules.storage_path(tmp_path, name)
        assert p.parent == tmp_path.resolve()
    for name in ("", "..", "..."):
        with pytest.raises(ValueError, match="usable as a file name"):
            rules.storage_path(tmp_path, name)


# ------------------------------------------------------------------------------ stamps


def test_acquisition_datetime_parsing():
    ds = xa()
    assert acquisition_datetime(ds) is None
    ds.AcquisitionDateTime = "20250101120000.5+0100"
    a = acquisition_datetime(ds)
    assert a.local == datetime.datetime(2025, 1, 1, 12, 0, 0, 500000)
    assert a.offset == datetime.timezone(datetime.timedelta(hours=1))
    assert acquisition_to_ns(a, time_zone=None, offset_s=0.0) == int((1735729200.5) * 1e9)
    ds.AcquisitionDateTime = "20250101120000"
    ds.TimezoneOffsetFromUTC = "-0500"
    assert acquisition_datetime(ds).offset == datetime.timezone(datetime.timedelta(hours=-5))
    del ds.TimezoneOffsetFromUTC
    a = acquisition_datetime(ds)
    with pytest.raises(ValueError, match="acquisition_time_zone"):
        acquisition_to_ns(a, time_zone=None, offset_s=0.0)
    berlin = acquisition_to_ns(a, time_zone=parse_time_zone("Europe/Berlin"), offset_s=2.0)
    assert berlin == int((1735729200 + 2.0) * 1e9)  # UTC+1 in January, plus the offset
    assert acquisition_to_ns(a, time_zone=parse_time_zone("+01:00"), offset_s=0.0) == int(1735729200 * 1e9)
    ds.AcquisitionDateTime = "2025010112"  # no seconds
    with pytest.raises(ValueError, match="AcquisitionDateTime"):
        acquisition_datetime(ds)
    del ds.AcquisitionDateTime
    ds.AcquisitionDate, ds.AcquisitionTime = "20250101", "120001.25"
    assert acquisition_datetime(ds).local == datetime.datetime(2025, 1, 1, 12, 0, 1, 250000)
    with pytest.raises(ValueError, match="time zone"):
        parse_time_zone("Mars/Olympus")
    with pytest.raises(ValueError, match="UTC offset"):
        parse_time_zone("+25:00")
    enhanced = enhanced_xa_dataset(
        torch.stack([raw(0), raw(1)]), angles_deg=[(0, 0), (30, 5)], detector=DET, study=STUDY
    )
    assert acquisition_datetime(enhanced, 1).local == STUDY.when + datetime.timedelta(seconds=1)


def _shot(plane, t_s, acquired_s=None, study="1.2", series="1.2.3", acquired_ns=None):
    acq = None
    if acquired_s is not None:
        acq = Acquired(datetime.datetime(2025, 1, 1, 12) + datetime.timedelta(seconds=acquired_s), None)
    return Shot(plane, int(t_s * 1e9), study, series, acq, acquired_ns)


def test_stamps_receive_time_and_biplane_pairs():
    m = StampMatcher(pair_window_s=5.0, pair_tolerance_s=0.5)
    assert m.assign(_shot("frontal", 100.0, acquired_s=0.0)) == (int(100e9), False)
    # the lateral partner (same study, acquisition time within 0.5 s) takes the frontal stamp
    assert m.assign(_shot("lateral", 100.7, acquired_s=0.2)) == (int(100e9), True)
    # a partner is used once: the next lateral shot with the same time has its own stamp
    assert m.assign(_shot("lateral", 101.0, acquired_s=0.2)) == (int(101e9), False)
    # other study / far in acquisition time / outside the window: no pair
    assert m.assign(_shot("frontal", 102.0, acquired_s=0.2, study="9.9")) == (int(102e9), False)
    assert m.assign(_shot("lateral", 103.0, acquired_s=5.0)) == (int(103e9), False)
    assert m.assign(_shot("frontal", 110.0, acquired_s=5.0)) == (int(110e9), False)
    # no acquisition time: never paired
    assert m.assign(_shot("lateral", 110.5)) == (int(110.5e9), False)


def test_stamps_same_series_and_order():
    m = StampMatcher(pair_same_series=True)
    m.assign(_shot("frontal", 10.0, acquired_s=0.0, series="A"))
    assert m.assign(_shot("lateral", 10.1, acquired_s=0.0, series="B"))[1] is False
    # a partner whose stamp is not newer than the plane's previous shot is refused, nothing recorded
    m = StampMatcher()
    m.assign(_shot("frontal", 10.0, acquired_s=0.0))
    m.assign(_shot("lateral", 11.0))
    with pytest.raises(ValueError, match="not newer than its previous shot"):
        m.assign(_shot("lateral", 11.5, acquired_s=0.1))
    assert m.assign(_shot("lateral", 11.6)) == (int(11.6e9), False)


def test_stamps_acquisition_mode():
    m = StampMatcher(source="acquisition", max_backward_s=1.0)
    assert m.assign(_shot("frontal", 50.0, acquired_s=0.0, acquired_ns=int(20e9)))[0] == int(20e9)
    with pytest.raises(ValueError, match="no acquisition date-time"):
        m.assign(_shot("frontal", 51.0))
    with pytest.raises(ValueError, match="older than the newest"):
        m.assign(_shot("lateral", 51.0, acquired_s=30.0, acquired_ns=int(18e9)))
    with pytest.raises(ValueError, match="stamp_source"):
        StampMatcher(source="clock")


# ------------------------------------------------------------------------------ folder


def test_settled_files(tmp_path):
    (tmp_path / "old.dcm").write_bytes(b"x" * 10)
    w = SettledFiles(list_folder(tmp_path))
    (tmp_path / "new.dcm").write_bytes(b"y" * 5)
    (tmp_path / ".hidden").write_bytes(b"z")
    (tmp_path / "busy.dcm.part").write_bytes(b"z")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.dcm").symlink_to(tmp_path / "old.dcm")
    assert w.poll(list_folder(tmp_path)) == []  # first sight
    with open(tmp_path / "new.dcm", "ab") as f:  # still growing
        f.write(b"y")
    assert w.poll(list_folder(tmp_path)) == []
    assert w.poll(list_folder(tmp_path)) == ["new.dcm"]  # unchanged across two polls
    assert w.poll(list_folder(tmp_path)) == []  # once only
    # pure: size or mtime changing keeps a file waiting; empty files wait
    w = SettledFiles({})
    assert w.poll({"a": (1, 1), "e": (0, 1)}) == []
    assert w.poll({"a": (1, 2), "e": (0, 1)}) == []
    assert w.poll({"a": (1, 2), "e": (0, 1)}) == ["a"]
    assert w.poll({}) == []
    assert w.poll({"a": (3, 3)}) == [] and w.poll({"a": (3, 3)}) == ["a"]  # written again after removal


# ------------------------------------------------------------------------------ messages


def test_messages_match_the_dicom_geometry():
    view = view_from_dataset(xa(orbital=25.0, angular=-12.0), name="t")
    msgs = shot_messages(view, PLANE)
    js, info, img = msgs.joint_state, msgs.camera_info, msgs.image
    values = dict(zip(js.name, js.position))
    assert values == pytest.approx({"frontal_orbital": math.radians(25.0), "frontal_angular": math.radians(-12.0)})
    assert img.encoding == "mono16" and (img.height, img.width) == (DET.height, DET.width)
    assert torch.equal(image_to_tensor(img), view.image)
    K = camera_info_to_K(info, height=img.height, width=img.width)  # the node's own check
    assert torch.allclose(K, DET.K(), atol=1e-9)
    assert img.header.frame_id == info.header.frame_id == "carm_frontal_optical"
    msgs.set_stamp(msgs.image.header.stamp.__class__(sec=5, nanosec=7))
    assert {(m.header.stamp.sec, m.header.stamp.nanosec) for m in (js, info, img)} == {(5, 7)}
    # the node's plane model places the camera where DICOM does (signs flipped both sides)
    from mvreg_ros.core.geometry.kinematics import PlaneConfig

    flipped = PlaneOutput(**{**PLANE.__dict__, "orbital_sign": -1.0})
    node_plane = PlaneConfig(
        name="frontal",
        orbital_joint="frontal_orbital",
        angular_joint="frontal_angular",
        orbital_sign=-1.0,
        sid_mm=785.0,
    )
    T = node_plane.T_ref_from_cam(joint_values(view, flipped, sid_tolerance_mm=1.0))
    assert torch.allclose(T, view.T_iso_from_cam, atol=1e-6)


def test_messages_refuse_what_the_node_cannot_model():
    view = view_from_dataset(xa(), name="t")
    far = PlaneOutput(**{**PLANE.__dict__, "sid_m": 0.7})
    with pytest.raises(ValueError, match="sid_tolerance_mm"):
        joint_values(view, far, sid_tolerance_mm=5.0)
    enhanced = enhanced_xa_dataset(
        torch.stack([raw(0)]), angles_deg=[(0, 0)], detector=DET, study=STUDY, table_mm=[(10.0, 0.0, 0.0)]
    )
    tview = view_from_dataset(enhanced, 0, name="e")
    with pytest.raises(ValueError, match="table_joints is empty"):
        joint_values(tview, PLANE, sid_tolerance_mm=5.0)
    with_table = PlaneOutput(**{**PLANE.__dict__, "table_joints": ("lon", "lat", "vert")})
    assert joint_values(tview, with_table, sid_tolerance_mm=5.0)["lon"] == pytest.approx(-0.01)
    with pytest.raises(ValueError, match="must be \\+1 or -1"):
        PlaneOutput(**{**PLANE.__dict__, "angular_sign": 2.0})
    with pytest.raises(ValueError, match="table_joints"):
        PlaneOutput(**{**PLANE.__dict__, "table_joints": ("a",)})


def test_image_encodings():
    view = view_from_dataset(xa(variant="LOG"), name="log")
    pixels, enc = image_pixels(view, "auto")
    assert enc == "32FC1" and pixels.dtype == np.float32
    with pytest.raises(ValueError, match="mono16"):
        image_pixels(view, "mono16")
    lin = view_from_dataset(xa(), name="lin")
    assert image_pixels(lin, "32FC1")[1] == "32FC1"
    with pytest.raises(ValueError, match="image_encoding"):
        image_pixels(lin, "rgb8")
    const = type(lin)(**{**lin.__dict__, "image": torch.ones(4, 4)})
    with pytest.raises(ValueError, match="constant"):
        image_pixels(const, "auto")


# ------------------------------------------------------------------------------ config


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def shipped_values() -> dict:
    doc = yaml.safe_load((REPO / "config" / "dicom_bridge.yaml").read_text())
    return _flatten(doc["dicom_bridge"]["ros__parameters"])


def test_shipped_config_and_refusals():
    values = shipped_values()
    with pytest.raises(ValueError, match="patient_id must be set"):
        build_config(values)
    cfg = build_config({**values, "patient_id": "P1"})
    assert [p.name for p in cfg.planes] == ["frontal", "lateral"]
    # the node's biplane config uses the same topics and joints
    node = _flatten(yaml.safe_load((REPO / "config" / "biplane.yaml").read_text())["register_node"]["ros__parameters"])
    assert [p.image_topic for p in cfg.planes] == node["image_topics"]
    assert [p.camera_info_topic for p in cfg.planes] == node["camera_info_topics"]
    for p in cfg.planes:
        assert p.orbital_joint == node[f"plane.{p.name}.orbital_joint"]
        assert p.angular_joint == node[f"plane.{p.name}.angular_joint"]
        assert p.sid_m == node[f"plane.{p.name}.sid_m"]
    good = {**values, "patient_id": "P1"}
    for change, match in (
        ({"allowed_calling_ae_titles": []}, "allowed_calling_ae_titles"),
        ({"source": "pacs"}, "source"),
        ({"source": "folder"}, "watch_folder"),
        ({"port": 70000}, "port"),
        ({"tls_cert": "c.pem"}, "tls_key"),
        ({"patient_position": "LFP"}, "patient_position"),
        ({"plane.lateral.plane_ids": []}, "needs a rule"),
        ({"plane.lateral.image_topic": "/carm/frontal/image_raw"}, "own image_topic"),
        ({"plane.lateral.orbital_joint": "frontal_orbital"}, "share joints"),
        ({"acquisition_time_zone": "Nowhere/Land"}, "acquisition_time_zone"),
        ({"typo_param": 1}, "unknown parameters"),
        ({"plane.frontal.plane_ids": ["C"]}, "plane_ids"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            build_config({**good, **change})
