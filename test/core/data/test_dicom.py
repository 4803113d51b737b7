"""DICOM X-ray objects -> raw intensities, K and the C-arm kinematic model's joints: round trips,
LAO/RAO and CRA/CAU signs, MONOCHROME1 and LOG against LIN, orientation, and every refusal
naming its attribute."""

import math

import numpy as np
import pytest
import torch

from mvreg_ros.core.data import dicom
from mvreg_ros.core.data import dicom_write as dw
from mvreg_ros.core.data.simulate import DetectorConfig
from mvreg_ros.core.geometry import carm
from mvreg_ros.core.geometry.transforms import make_T, translation
from mvreg_ros.core.imaging.xray import prepare

F64 = torch.float64
DET = DetectorConfig(height=48, width=64, pixel_mm=1.164 * 256 / 64, sdd_mm=1100.0, sid_mm=750.0)
STUDY = dw.StudyInfo.new(seed=7)


def _raw(seed=0):
    """Raw intensities with structure, dark bone-like blobs and a circular field of view."""
    g = torch.Generator().manual_seed(seed)
    v, u = torch.meshgrid(torch.arange(DET.height, dtype=F64), torch.arange(DET.width, dtype=F64), indexing="ij")
    P = 1.5 + torch.sin(u / 5) * 0.8 + torch.cos(v / 7) * 0.6 + 0.05 * torch.rand(DET.height, DET.width, generator=g)
    raw = 60000 * torch.exp(-P)
    inside = (u - (DET.width - 1) / 2) ** 2 + (v - (DET.height - 1) / 2) ** 2 <= (0.45 * DET.width) ** 2
    return (raw * inside).round()


def _xa(orbital=0.0, angular=0.0, variant="LIN", raw=None):
    return dw.xa_dataset(
        _raw() if raw is None else raw,
        orbital_deg=orbital,
        angular_deg=angular,
        detector=DET,
        study=STUDY,
        variant=variant,
    )


def _view(ds, config=dicom.DicomConfig(), frame=None):
    return dicom.view_from_dataset(ds, frame, config=config, name="t.dcm")


# ---------------------------------------------------------------------------------------
# round trips and signs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "orbital,angular", [(0, 0), (90, 0), (-90, 0), (0, 90), (0, -90), (30, 20), (-45, -25), (120, 35)]
)
def test_joints_and_K_round_trip_against_the_kinematic_model(orbital, angular):
    view = _view(_xa(orbital, angular))
    assert (view.orbital_deg, view.angular_deg) == (orbital, angular)
    assert view.joint_positions["orbital"] == pytest.approx(math.radians(orbital))
    assert view.joint_positions["angular"] == pytest.approx(math.radians(angular))
    assert view.sid_mm == DET.sid_mm and view.sdd_mm == DET.sdd_mm
    torch.testing.assert_close(view.K, DET.K(), rtol=1e-9, atol=1e-9)
    expected = carm.T_iso_from_cam(math.radians(orbital), math.radians(angular), sid_mm=DET.sid_mm)
    torch.testing.assert_close(view.T_iso_from_cam, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(view.image.double(), _raw())


def _beam(orbital, angular):
    """Unit beam direction (source -> detector) in the isocentre frame (x head, y right, z up)."""
    return _view(_xa(orbital, angular)).T_iso_from_cam[:3, 2]


def test_clinical_signs_of_the_positioner_angles():
    e = torch.eye(3, dtype=F64)
    torch.testing.assert_close(_beam(0, 0), e[2])  # AP: source below, detector above
    torch.testing.assert_close(_beam(90, 0), -e[1], atol=1e-12, rtol=0)  # LAO 90: detector on the patient's left
    torch.testing.assert_close(_beam(-90, 0), e[1], atol=1e-12, rtol=0)  # RAO 90: detector on the right
    torch.testing.assert_close(_beam(0, 90), e[0], atol=1e-12, rtol=0)  # CRA 90: detector toward the head
    torch.testing.assert_close(_beam(0, -90), -e[0], atol=1e-12, rtol=0)  # CAU 90: toward the feet
    # combined: the angular rotation acts about the axis carried by the orbital one, so the cranial
    # component of the beam is sin(angular) whatever the orbital angle
    o, a = math.radians(30), math.radians(20)
    expected = torch.tensor([math.sin(a), -math.sin(o) * math.cos(a), math.cos(o) * math.cos(a)], dtype=F64)
    torch.testing.assert_close(_beam(30, 20), expected, atol=1e-12, rtol=0)
    # the source sits at SID from the isocentre, opposite the detector
    T = _view(_xa(30, 20)).T_iso_from_cam
    torch.testing.assert_close(T[:3, 3], -DET.sid_mm * expected, atol=1e-9, rtol=0)


def test_patient_position_rotates_cameras_and_default_start_together():
    centre = torch.tensor([10.0, -20.0, 30.0], dtype=F64)
    for position in dicom.PATIENT_POSITIONS:
        ds = _xa(25, -10)
        ds.PatientPosition = position
        view = _view(ds)
        R = make_T(dicom.R_iso_from_pat(position), torch.zeros(3, dtype=F64))
        assert float(torch.linalg.det(R[:3, :3])) == pytest.approx(1.0)
        torch.testing.assert_close(
            view.T_iso_from_cam, R @ carm.T_iso_from_cam(math.radians(25), math.radians(-10), sid_mm=DET.sid_mm)
        )
        start = dicom.default_start(position, centre)
        torch.testing.assert_close(start, R @ carm.T_iso_from_ct_supine(centre))
        # the camera sees the default patient the same way whatever the position
        T_cam_from_ct = torch.linalg.inv(view.T_iso_from_cam) @ start
        hfs = torch.linalg.inv(carm.T_iso_from_cam(math.radians(25), math.radians(-10), sid_mm=DET.sid_mm))
        torch.testing.assert_close(T_cam_from_ct, hfs @ carm.T_iso_from_ct_supine(centre))
    # head first prone: the patient's anterior points down
    start = dicom.default_start("HFP", centre)
    a_ct = torch.tensor([0.0, -1.0, 0.0], dtype=F64)  # LPS anterior
    torch.testing.assert_close(start[:3, :3] @ a_ct, torch.tensor([0.0, 0.0, -1.0], dtype=F64))
    # FFS: the head points to -x
    torch.testing.assert_close(
        dicom.default_start("FFS", centre)[:3, :3] @ torch.tensor([0.0, 0, 1], dtype=F64),
        torch.tensor([-1.0, 0, 0], dtype=F64),
    )


def test_absent_patient_position_uses_the_configured_default():
    ds = _xa()
    del ds.PatientPosition
    assert _view(ds).patient_position == "HFS"
    assert _view(ds, dicom.DicomConfig(patient_position="FFS")).patient_position == "FFS"
    with pytest.raises(ValueError, match="PatientPosition"):
        _view(ds, dicom.DicomConfig(patient_position=None))


def test_enhanced_multiframe_per_frame_geometry_and_table_as_prismatic_joints():
    angles = [(0.0, 0.0), (60.0, -15.0)]
    tables = [(0.0, 0.0, 0.0), (40.0, -12.0, 25.0)]
    raw = torch.stack([_raw(0), _raw(1)])
    ds = dw.enhanced_xa_dataset(raw, angles_deg=angles, detector=DET, study=STUDY, table_mm=tables)
    views = [_view(ds, frame=i) for i in range(2)]
    for v, (o, a), t, r in zip(views, angles, tables, raw):
        assert (v.orbital_deg, v.angular_deg, v.table_mm) == (o, a, t)
        torch.testing.assert_close(v.image.double(), r)
        torch.testing.assert_close(v.K, DET.K())
    j = views[1].joint_positions
    assert (j["table_longitudinal"], j["table_lateral"], j["table_vertical"]) == pytest.approx((-0.040, 0.012, -0.025))
    # the table moves the patient: the camera moves the other way in the table-top frame
    shift = torch.tensor([40.0, 12.0, 25.0], dtype=F64)  # longitudinal +x, lateral toward LAO (-y), vertical +z
    expected = translation(-shift) @ carm.T_iso_from_cam(math.radians(60), math.radians(-15), sid_mm=DET.sid_mm)
    torch.testing.assert_close(views[1].T_iso_from_cam, expected)
    with pytest.raises(ValueError, match="has 2 frames"):
        _view(ds)


def test_uncorrected_distortion_is_refused_or_warned():
    ds = dw.enhanced_xa_dataset(
        _raw()[None], angles_deg=[(0, 0)], detector=DET, study=STUDY, uncorrected_distortion=True
    )
    with pytest.raises(ValueError, match="GeometricalProperties"):
        _view(ds, frame=0)
    with pytest.warns(UserWarning, match="GeometricalProperties"):
        _view(ds, dicom.DicomConfig(allow_distortion=True), frame=0)


# ---------------------------------------------------------------------------------------
# intensities
# ---------------------------------------------------------------------------------------


def test_monochrome1_and_log_give_the_line_integrals_of_lin():
    prepared = {}
    for variant in dw.VARIANTS:
        v = _view(_xa(variant=variant))
        prepared[variant] = prepare(v.image, v.K)
    lin = prepared["LIN"]
    for variant in ("MONOCHROME1", "LOG"):
        p = prepared[variant]
        assert torch.equal(p.mask, lin.mask), variant
        torch.testing.assert_close(p.image, lin.image, atol=2e-3, rtol=0, msg=variant)
    assert float(lin.image.max()) > 1.0  # real line integrals, not a constant


def test_log_scale_from_config_and_enhanced_lut():
    ds = _xa(variant="LOG")
    del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType
    with pytest.raises(ValueError, match="RescaleSlope"):
        _view(ds)
    v = _view(ds, dicom.DicomConfig(log_units_per_neper=dw.LOG_UNITS_PER_NEPER))
    ref = _view(_xa())
    torch.testing.assert_close(prepare(v.image, v.K).image, prepare(ref.image, ref.K).image, atol=2e-3, rtol=0)
    # an Enhanced object's TO_LINEAR Pixel Intensity Relationship LUT wins
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    enh = dw.enhanced_xa_dataset(_raw()[None], angles_deg=[(0, 0)], detector=DET, study=STUDY, variant="MONOCHROME1")
    lut = Dataset()
    lut.LUTDescriptor = [0, 0, 16]
    lut.LUTData = (65535 - np.arange(65536)).astype(np.uint16).tolist()
    lut.LUTFunction = "TO_LINEAR"
    enh.PerFrameFunctionalGroupsSequence[0].PixelIntensityRelationshipLUTSequence = Sequence([lut])
    torch.testing.assert_close(_view(enh, frame=0).image.double(), _raw())


def test_bits_stored_and_rescale():
    ds = _xa()
    ds.BitsStored, ds.HighBit = 12, 11
    pixels = np.minimum(_raw().numpy(), 4095).astype(np.uint16) | np.uint16(0xF000)  # garbage above bit 11
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 2, 10
    image = _view(ds).image.double()
    torch.testing.assert_close(image, torch.from_numpy((pixels & 0x0FFF) * 2.0 + 10))


# ---------------------------------------------------------------------------------------
# orientation and principal point
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
@pytest.mark.parametrize("flip", [False, True])
def test_field_of_view_rotation_and_flip_are_undone(rotation, flip):
    raw = _raw()
    stored = np.rot90(raw.numpy(), -rotation // 90)  # clockwise
    if flip:
        stored = stored[:, ::-1]
    ds = _xa()
    ds.Rows, ds.Columns = stored.shape
    ds.PixelData = np.ascontiguousarray(stored).astype("<u2").tobytes()
    ds.FieldOfViewRotation = str(rotation)
    ds.FieldOfViewHorizontalFlip = "YES" if flip else "NO"
    v = _view(ds)
    torch.testing.assert_close(v.image.double(), raw)
    torch.testing.assert_close(v.K, DET.K())


def test_detector_active_area_gives_the_principal_point():
    ds = _xa()
    s = DET.pixel_mm
    ds.DetectorElementSpacing = [s, s]
    ds.FieldOfViewOrigin = [10, 20]  # stored image starts 10 rows, 20 columns into the detector
    ds.DetectorActiveOrigin = [0.0, 0.0]
    ds.DetectorActiveDimensions = [100 * s, 120 * s]  # centre at row 50, column 60 of the detector
    v = _view(ds)
    assert float(v.K[0, 2]) == pytest.approx(60 - 20 - 0.5) and float(v.K[1, 2]) == pytest.approx(50 - 10 - 0.5)
    del ds.DetectorElementSpacing
    with pytest.raises(ValueError, match="DetectorElementSpacing"):
        _view(ds)


def test_pixel_spacing_at_the_isocentre_needs_the_magnification():
    ds = _xa()
    del ds.ImagerPixelSpacing
    torch.testing.assert_close(_view(ds).K, DET.K(), rtol=1e-9, atol=1e-6)  # PixelSpacing x magnification
    del ds.EstimatedRadiographicMagnificationFactor
    with pytest.raises(ValueError, match="EstimatedRadiographicMagnificationFactor"):
        _view(ds)
    ds = _xa()
    ds.EstimatedRadiographicMagnificationFactor = 1.2
    with pytest.raises(ValueError, match="PixelSpacing .* disagrees with ImagerPixelSpacing"):
        _view(ds)


def test_dx_needs_the_isocentre_distance_from_the_config():
    ds = _xa()
    ds.Modality = "DX"
    ds.DistanceSourceToPatient = 600  # to the skin
    with pytest.raises(ValueError, match="DistanceSourceToPatient"):
        _view(ds)
    assert _view(ds, dicom.DicomConfig(sid_mm=720.0)).sid_mm == 720.0


# ---------------------------------------------------------------------------------------
# refusals: each names its attribute
# ---------------------------------------------------------------------------------------


def _without(keyword):
    def edit(ds):
        delattr(ds, keyword)

    return edit


def _set(keyword, value):
    def edit(ds):
        setattr(ds, keyword, value)

    return edit


@pytest.mark.parametrize(
    "edit,attribute",
    [
        (_set("PixelIntensityRelationship", "DISP"), "PixelIntensityRelationship"),
        (_without("PixelIntensityRelationship"), "PixelIntensityRelationship"),
        (_set("PresentationIntentType", "FOR PRESENTATION"), "PresentationIntentType"),
        (_set("PixelIntensityRelationshipSign", 0), "PixelIntensityRelationshipSign"),
        (_set("PhotometricInterpretation", "RGB"), "PhotometricInterpretation"),
        (_without("DistanceSourceToDetector"), "DistanceSourceToDetector"),
        (_without("DistanceSourceToPatient"), "DistanceSourceToPatient"),
        (_set("DistanceSourceToPatient", 2000), "DistanceSourceToDetector"),
        (_without("PositionerPrimaryAngle"), "PositionerPrimaryAngle"),
        (_set("PositionerSecondaryAngle", 270), "PositionerSecondaryAngle"),
        (_set("FieldOfViewRotation", "45"), "FieldOfViewRotation"),
        (_without("FieldOfViewHorizontalFlip"), "FieldOfViewHorizontalFlip"),
        (_set("PatientPosition", "LFP"), "PatientPosition"),
        (_set("Modality", "CT"), "Modality"),
        (_set("ImagerPixelSpacing", [1.0, -1.0]), "ImagerPixelSpacing"),
        (_set("RescaleSlope", 1.0), "RescaleIntercept"),
    ],
)
def test_refusals_name_the_attribute(edit, attribute):
    ds = _xa()
    edit(ds)
    with pytest.raises(ValueError, match=attribute):
        _view(ds)


def test_monochrome1_without_sign_is_refused():
    ds = _xa(variant="MONOCHROME1")
    del ds.PixelIntensityRelationshipSign
    with pytest.raises(ValueError, match="PixelIntensityRelationshipSign"):
        _view(ds)


def test_files_and_frames(tmp_path):
    path = dw.save(_xa(), tmp_path / "a.dcm")
    assert len(dicom.read_views(path)) == 1
    with pytest.raises(ValueError, match="single-frame"):
        dicom.read_views(path, frames=[1])
    multi = dw.save(
        dw.enhanced_xa_dataset(
            torch.stack([_raw(0), _raw(1)]), angles_deg=[(0, 0), (30, 0)], detector=DET, study=STUDY
        ),
        tmp_path / "m.dcm",
    )
    assert [v.orbital_deg for v in dicom.read_views(multi, frames=[1])] == [30.0]
    with pytest.raises(ValueError, match="out of range"):
        dicom.read_views(multi, frames=[2])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(ValueError, match="not a DICOM file"):
        dicom.read_views(junk)
    with pytest.raises(ValueError, match="sid_mm"):
        dicom.DicomConfig(sid_mm=-1)


# ---------------------------------------------------------------------------------------
# X-Ray Isocenter Reference System (Enhanced XA/XRF, PS3.3 C.8.19.6.13)
# ---------------------------------------------------------------------------------------

HEAD_FIRST = ("HFS", "HFP", "HFDR", "HFDL")


def _enhanced(angles, tables=None, position="HFS", **kw):
    study = dw.StudyInfo.new(seed=7, patient_position=position)
    raw = torch.stack([_raw(i) for i in range(len(angles))])
    return dw.enhanced_xa_dataset(raw, angles_deg=angles, detector=DET, study=study, table_mm=tables, **kw)


def _iso_item(ds, frame=0):
    return ds.PerFrameFunctionalGroupsSequence[frame].IsocenterReferenceSystemSequence[0]


@pytest.mark.parametrize("position", HEAD_FIRST)
def test_isocenter_angles_round_trip_and_give_the_patient_relative_camera(position):
    angles = [(0.0, 0.0), (30.0, 20.0), (-45.0, -25.0), (120.0, 35.0)]
    tables = [(0.0, 0.0, 0.0), (40.0, -12.0, 25.0), (-5.0, 7.0, -3.0), (0.0, 0.0, 10.0)]
    ds = _enhanced(angles, tables, position)
    for k, ((o, a), t) in enumerate(zip(angles, tables)):
        item = _iso_item(ds, k)
        assert float(item.PositionerIsocenterDetectorRotationAngle) == 0.0
        view = _view(ds, frame=k)
        assert view.angle_reference == dicom.ISOCENTER_ANGLES and view.patient_angles_deg == (o, a)
        expected = dw.isocenter_angles(o, a, position)
        assert (view.orbital_deg, view.angular_deg) == pytest.approx(expected, abs=1e-4)
        assert view.table_mm == pytest.approx(t)
        # the same camera as the patient-relative angles placed by PatientPosition
        del ds.PerFrameFunctionalGroupsSequence[k].IsocenterReferenceSystemSequence
        legacy = _view(ds, frame=k)
        ds.PerFrameFunctionalGroupsSequence[k].IsocenterReferenceSystemSequence = [item]
        assert legacy.angle_reference == dicom.PATIENT_ANGLES and (legacy.orbital_deg, legacy.angular_deg) == (o, a)
        torch.testing.assert_close(view.T_iso_from_cam, legacy.T_iso_from_cam, atol=1e-4, rtol=0)
        torch.testing.assert_close(view.plane().T_ref_from_cam(view.joint_positions), view.T_iso_from_cam)


def _standard_source_iso(ap1, ap2, sid):
    """The X-ray source in ``iso`` from PS3.3's own definitions, independently of carm: in the
    isocentre reference system (X table left, Y down, Z table head) the source is at
    (R2 R1)^T (0, sid, 0) (PS3.17 FFF.1.2.4.1), R1 about Z (Ap1, -Y toward +X positive), R2 about X."""
    c1, s1, c2, s2 = math.cos(ap1), math.sin(ap1), math.cos(ap2), math.sin(ap2)
    R1 = torch.tensor([[c1, s1, 0], [-s1, c1, 0], [0, 0, 1]], dtype=F64)
    R2 = torch.tensor([[1, 0, 0], [0, c2, -s2], [0, s2, c2]], dtype=F64)
    X, Y, Z = (R2 @ R1).T @ torch.tensor([0.0, sid, 0.0], dtype=F64)
    return torch.stack([Z, -X, -Y])  # iso: x head end (+Z), y table right (-X), z up (-Y)


@pytest.mark.parametrize("ap1,ap2", [(0, 0), (90, 0), (-90, 0), (0, 60), (0, -60), (30, 20), (-135, -25)])
def test_isocenter_angle_signs_follow_the_standard(ap1, ap2):
    ds = _enhanced([(0.0, 0.0)], position="HFP")  # the patient-relative angles removed below
    item = _iso_item(ds)
    item.PositionerIsocenterPrimaryAngle, item.PositionerIsocenterSecondaryAngle = float(ap1), float(ap2)
    pos = ds.PerFrameFunctionalGroupsSequence[0].PositionerPositionSequence[0]
    del pos.PositionerPrimaryAngle, pos.PositionerSecondaryAngle
    view = _view(ds, frame=0)
    assert view.angle_reference == dicom.ISOCENTER_ANGLES and view.patient_angles_deg is None
    source = _standard_source_iso(math.radians(ap1), math.radians(ap2), DET.sid_mm)
    torch.testing.assert_close(view.T_iso_from_cam[:3, 3], source, atol=1e-6, rtol=0)
    # equipment angles do not depend on the patient position
    ds.PatientPosition = "HFS"
    torch.testing.assert_close(_view(ds, frame=0).T_iso_from_cam, view.T_iso_from_cam)


def test_table_positions_to_the_isocentre_are_prismatic_joints_with_the_opposite_sign():
    ds = _enhanced([(30.0, 10.0)], [(100.0, 100.0, 100.0)])  # table-top positions: another origin, not used
    item = _iso_item(ds)
    item.TableXPositionToIsocenter, item.TableYPositionToIsocenter, item.TableZPositionToIsocenter = 15.0, -40.0, 250.0
    view = _view(ds, frame=0)
    # X toward the table's left (the LAO side), Y down, Z toward the head end
    assert view.table_mm == (250.0, 15.0, 40.0)
    j = view.joint_positions
    assert (j["table_longitudinal"], j["table_lateral"], j["table_vertical"]) == pytest.approx((-0.25, -0.015, -0.04))
    shift = torch.tensor([250.0, -15.0, 40.0], dtype=F64)  # the table's displacement in iso
    expected = translation(-shift) @ carm.T_iso_from_cam(math.radians(30), math.radians(10), sid_mm=DET.sid_mm)
    torch.testing.assert_close(view.T_iso_from_cam, expected, atol=1e-4, rtol=0)


def test_patient_and_isocenter_angles_must_agree_for_the_patient_position():
    ds = _enhanced([(30.0, 20.0)])
    pos = ds.PerFrameFunctionalGroupsSequence[0].PositionerPositionSequence[0]
    pos.PositionerPrimaryAngle = 30.3  # within the tolerance
    assert _view(ds, frame=0).angle_reference == dicom.ISOCENTER_ANGLES
    pos.PositionerPrimaryAngle = 35.0
    with pytest.raises(ValueError, match="PositionerPrimaryAngle.*PositionerIsocenterPrimaryAngle"):
        _view(ds, frame=0)
    # the same angles, but the object says the patient lies prone: the beams disagree
    ds = _enhanced([(30.0, 20.0)])
    ds.PatientPosition = "HFP"
    with pytest.raises(ValueError, match="PatientPosition HFP"):
        _view(ds, frame=0)


@pytest.mark.parametrize("keyword", [dicom.DETECTOR_ROTATION_KEYWORD, *dicom.TABLE_ANGLE_KEYWORDS])
def test_detector_rotation_and_table_angles_are_refused_unless_zero(keyword):
    ds = _enhanced([(10.0, 5.0)])
    setattr(_iso_item(ds), keyword, 0.0)
    assert _view(ds, frame=0).angle_reference == dicom.ISOCENTER_ANGLES  # exactly zero: fine
    setattr(_iso_item(ds), keyword, 2.5)
    with pytest.raises(ValueError, match=f"{keyword} is 2.5 degrees, not 0"):
        _view(ds, frame=0)


@pytest.mark.parametrize("keyword", dicom.TABLE_ANGLE_KEYWORDS)
def test_table_angles_in_the_table_position_sequence_are_refused_too(keyword):
    ds = _enhanced([(10.0, 5.0)], isocenter_reference=False)
    setattr(ds.PerFrameFunctionalGroupsSequence[0].TablePositionSequence[0], keyword, -1.0)
    with pytest.raises(ValueError, match=keyword):
        _view(ds, frame=0)


@pytest.mark.parametrize(
    "keyword",
    [
        "PositionerIsocenterSecondaryAngle",
        dicom.DETECTOR_ROTATION_KEYWORD,
        *dicom.ISOCENTER_TABLE_KEYWORDS,
        *dicom.TABLE_ANGLE_KEYWORDS,
    ],
)
def test_isocenter_reference_system_attributes_missing_are_named(keyword):
    ds = _enhanced([(10.0, 5.0)])
    delattr(_iso_item(ds), keyword)
    with pytest.raises(ValueError, match=f"{keyword} is missing"):
        _view(ds, frame=0)


def test_isocenter_angle_out_of_range_is_named():
    ds = _enhanced([(10.0, 5.0)])
    _iso_item(ds).PositionerIsocenterPrimaryAngle = 200.0
    with pytest.raises(ValueError, match="PositionerIsocenterPrimaryAngle must be within"):
        _view(ds, frame=0)
