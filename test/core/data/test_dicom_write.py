"""Simulated DICOM: every Type 1 attribute of the XA IOD present, pydicom reads it without warnings."""

import warnings

import pydicom
import pytest
import torch

from mvreg_ros.core.data import dicom_write as dw
from mvreg_ros.core.data.simulate import DetectorConfig

DET = DetectorConfig(height=32, width=40, pixel_mm=1.164 * 256 / 40)


def _raw(v=2):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(v, DET.height, DET.width, generator=g) * 60000 + 100).round()


def _read_strictly(path):
    """Read every element and the pixels with any warning turned into an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = pydicom.dcmread(path)
        for elem in ds.iterall():
            _ = elem.value
        for elem in ds.file_meta:
            _ = elem.value
        pixels = ds.pixel_array
    return ds, pixels


def _missing(ds, keywords):
    return [k for k in keywords if k not in ds or ds[k].value in (None, "", b"") or ds[k].VM == 0]


@pytest.mark.parametrize("variant", dw.VARIANTS)
def test_xa_has_every_type1_attribute_and_reads_without_warnings(tmp_path, variant):
    study = dw.StudyInfo.new(seed=3)
    raw = _raw(1)[0]
    ds = dw.xa_dataset(raw, orbital_deg=-30.0, angular_deg=15.0, detector=DET, study=study, variant=variant)
    path = dw.save(ds, tmp_path / "x.dcm")
    back, pixels = _read_strictly(path)
    assert _missing(back, dw.XA_TYPE1) == []
    assert _missing(back.file_meta, dw.FILE_META_TYPE1) == []
    for k in dw.XA_TYPE2:
        assert k in back, k
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.12.1" and back.Modality == "XA"
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
    assert pixels.shape == (DET.height, DET.width)
    # the geometry in the standard attributes
    assert float(back.PositionerPrimaryAngle) == -30.0 and float(back.PositionerSecondaryAngle) == 15.0
    assert float(back.DistanceSourceToPatient) == DET.sid_mm and float(back.DistanceSourceToDetector) == DET.sdd_mm
    assert [float(x) for x in back.ImagerPixelSpacing] == pytest.approx([DET.pixel_mm] * 2, rel=1e-9)
    assert float(back.EstimatedRadiographicMagnificationFactor) == pytest.approx(DET.sdd_mm / DET.sid_mm, rel=1e-9)


def test_enhanced_xa_multiframe(tmp_path):
    study = dw.StudyInfo.new(seed=4)
    ds = dw.enhanced_xa_dataset(
        _raw(3), angles_deg=[(0, 0), (45, -10), (-90, 5)], detector=DET, study=study, table_mm=[(0, 0, 0)] * 3
    )
    back, pixels = _read_strictly(dw.save(ds, tmp_path / "e.dcm"))
    assert _missing(back, dw.ENHANCED_XA_TYPE1) == []
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.12.1.1"
    assert pixels.shape == (3, DET.height, DET.width) and int(back.NumberOfFrames) == 3
    frame = back.PerFrameFunctionalGroupsSequence[1]
    assert float(frame.PositionerPositionSequence[0].PositionerPrimaryAngle) == 45.0
    assert "FrameContentSequence" in frame and "TablePositionSequence" in frame
    assert float(back.SharedFunctionalGroupsSequence[0].XRayGeometrySequence[0].DistanceSourceToIsocenter) == 700.0


def test_writer_rejects_bad_input():
    study = dw.StudyInfo.new()
    with pytest.raises(ValueError, match="variant"):
        dw.xa_dataset(_raw(1)[0], orbital_deg=0, angular_deg=0, detector=DET, study=study, variant="DISP")
    with pytest.raises(ValueError, match="orbital_deg"):
        dw.xa_dataset(_raw(1)[0], orbital_deg=200, angular_deg=0, detector=DET, study=study)
    with pytest.raises(ValueError, match="differs from the detector"):
        dw.xa_dataset(torch.ones(8, 8), orbital_deg=0, angular_deg=0, detector=DET, study=study)
    with pytest.raises(ValueError, match="patient_position"):
        dw.StudyInfo.new(patient_position="XYZ")


def test_enhanced_xa_isocenter_reference_system(tmp_path):
    ds = dw.enhanced_xa_dataset(
        _raw(2),
        angles_deg=[(0, 0), (30, -10)],
        detector=DET,
        study=dw.StudyInfo.new(seed=4),
        table_mm=[(0, 0, 0), (5, 6, 7)],
    )
    back, _ = _read_strictly(dw.save(ds, tmp_path / "e.dcm"))
    iso = back.PerFrameFunctionalGroupsSequence[1].IsocenterReferenceSystemSequence[0]
    assert back["PerFrameFunctionalGroupsSequence"][0]["IsocenterReferenceSystemSequence"].VR == "SQ"
    assert (float(iso.PositionerIsocenterPrimaryAngle), float(iso.PositionerIsocenterSecondaryAngle)) == (30.0, -10.0)
    assert float(iso.PositionerIsocenterDetectorRotationAngle) == 0.0
    assert (iso.TableXPositionToIsocenter, iso.TableYPositionToIsocenter, iso.TableZPositionToIsocenter) == (6, -7, 5)
    assert (iso.TableHorizontalRotationAngle, iso.TableHeadTiltAngle, iso.TableCradleTiltAngle) == (0, 0, 0)
    assert iso["PositionerIsocenterPrimaryAngle"].VR == "FL"
    # HFP: the equipment sees the prone patient's AP view from above
    hfp = dw.enhanced_xa_dataset(
        _raw(1), angles_deg=[(0, 0)], detector=DET, study=dw.StudyInfo.new(seed=4, patient_position="HFP")
    )
    assert (
        float(
            hfp.PerFrameFunctionalGroupsSequence[0].IsocenterReferenceSystemSequence[0].PositionerIsocenterPrimaryAngle
        )
        == -180.0
    )


def test_feet_first_has_no_isocenter_reference_system_unless_asked():
    study = dw.StudyInfo.new(seed=4, patient_position="FFS")
    ds = dw.enhanced_xa_dataset(_raw(1), angles_deg=[(20, 5)], detector=DET, study=study)
    assert "IsocenterReferenceSystemSequence" not in ds.PerFrameFunctionalGroupsSequence[0]
    with pytest.raises(ValueError, match="detector rotation"):
        dw.enhanced_xa_dataset(_raw(1), angles_deg=[(20, 5)], detector=DET, study=study, isocenter_reference=True)
    hfs = dw.enhanced_xa_dataset(
        _raw(1), angles_deg=[(20, 5)], detector=DET, study=dw.StudyInfo.new(), isocenter_reference=False
    )
    assert "IsocenterReferenceSystemSequence" not in hfs.PerFrameFunctionalGroupsSequence[0]
