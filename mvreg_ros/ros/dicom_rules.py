"""What the DICOM bridge accepts, and for which plane (pure: no ROS, no network).

Every check raises ValueError whose text is the reason; the reason names the attribute or
parameter, never patient data (Patient ID, names, dates of birth are not repeated): objects are
named in logs by :func:`object_tag`, a short hash of their SOP Instance UID.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

# the X-ray storage SOP classes the bridge accepts (the pixels of all of them are detector
# intensities that mvreg_ros.core.data.dicom reads; DX "for presentation" is display-processed)
SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.12.1": "XRayAngiographicImageStorage",
    "1.2.840.10008.5.1.4.1.1.12.1.1": "EnhancedXAImageStorage",
    "1.2.840.10008.5.1.4.1.1.12.2": "XRayRadiofluoroscopicImageStorage",
    "1.2.840.10008.5.1.4.1.1.12.2.1": "EnhancedXRFImageStorage",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DigitalXRayImageStorageForProcessing",
    "1.2.840.10008.5.1.4.1.1.1": "ComputedRadiographyImageStorage",
}

PLANE_IDS = ("single", "A", "B")
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def object_tag(ds) -> str:
    """A short name of an object for logs and the status: ``obj-`` + 12 hex digits of the SHA-256
    of its SOP Instance UID (no patient data; the same object always gets the same tag)."""
    uid = str(getattr(ds, "SOPInstanceUID", "") or "")
    return "obj-" + hashlib.sha256(uid.encode()).hexdigest()[:12] if uid else "obj-without-uid"


def check_ae_title(title: str, what: str = "AE title") -> str:
    """An AE title without its padding; ValueError when it is not a valid one."""
    if not isinstance(title, str):
        raise TypeError(f"{what} must be a string, got {type(title).__name__}")
    t = title.strip()
    if not _AE_TITLE.match(t):
        raise ValueError(f"{what} {title!r} is not a valid AE title (1..16 characters, no backslash or control)")
    return t


def check_calling_ae(calling: str, allowed: Iterable[str]) -> str:
    """The calling AE title if it is on the list (exact match after trimming the padding)."""
    t = str(calling).strip()
    if t not in {a.strip() for a in allowed}:
        raise ValueError(f"calling AE title {t!r} is not in allowed_calling_ae_titles")
    return t


def check_sop_class(uid) -> str:
    """The SOP Class UID if it is one of :data:`SOP_CLASSES`."""
    u = str(uid or "").strip()
    if u not in SOP_CLASSES:
        raise ValueError(f"SOPClassUID {u!r} is not an accepted X-ray storage SOP class")
    return u


def check_size(nbytes: int, limit: int, what: str = "object") -> None:
    if int(nbytes) > int(limit):
        raise ValueError(f"{what} of {int(nbytes)} bytes exceeds max_object_bytes ({int(limit)})")


def check_dimensions(ds, max_pixels: int) -> None:
    """Rows x Columns x NumberOfFrames within ``max_pixels`` (checked before the pixels are decoded)."""
    for keyword in ("Rows", "Columns", "PixelData"):
        if keyword not in ds:
            raise ValueError(f"{keyword} is missing")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise ValueError("Rows, Columns and NumberOfFrames must be integers") from None
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise ValueError(f"Rows {rows}, Columns {cols}, NumberOfFrames {frames} must be positive")
    if rows * cols * frames > max_pixels:
        raise ValueError(f"Rows x Columns x NumberOfFrames = {rows * cols * frames} exceeds max_pixels ({max_pixels})")


def check_patient(ds, expected_id: str) -> None:
    """Refuse an object of another patient (the message does not repeat either ID)."""
    if "PatientID" not in ds or ds.PatientID is None or str(ds.PatientID).strip() == "":
        raise ValueError("PatientID is missing")
    if str(ds.PatientID).strip() != expected_id.strip():
        raise ValueError("PatientID differs from the configured patient_id")


def check_object(ds, *, expected_patient_id: str, max_pixels: int) -> str:
    """The object-level checks before the pixels are read: SOP class (also against the file
    meta's), patient, image size. Returns the SOP Class UID."""
    uid = check_sop_class(ds.get("SOPClassUID", ""))
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPClassUID" in meta and str(meta.MediaStorageSOPClassUID) != uid:
        raise ValueError("MediaStorageSOPClassUID differs from SOPClassUID")
    sop_instance = str(ds.get("SOPInstanceUID", "") or "")
    if not _UID.match(sop_instance) or len(sop_instance) > 64:
        raise ValueError("SOPInstanceUID is missing or not a valid UID")
    check_patient(ds, expected_patient_id)
    check_dimensions(ds, max_pixels)
    return uid


# ------------------------------------------------------------------------------- planes


def plane_identification(ds) -> str:
    """``A``, ``B`` or ``single`` from the Enhanced objects' ``PlaneIdentification`` (PLANE A,
    PLANE B, MONOPLANE) or the legacy XA/XRF ``ImageType`` value 3 (BIPLANE A, BIPLANE B, SINGLE
    PLANE); ``""`` when the object says nothing."""
    value = str(ds.get("PlaneIdentification", "") or "").strip().upper()
    if value in ("PLANE A", "A"):
        return "A"
    if value in ("PLANE B", "B"):
        return "B"
    if value == "MONOPLANE":
        return "single"
    image_type = ds.get("ImageType", None)
    values = [str(v).strip().upper() for v in image_type] if isinstance(image_type, Sequence) else []
    if len(values) >= 3:
        if values[2] == "BIPLANE A":
            return "A"
        if values[2] == "BIPLANE B":
            return "B"
        if values[2] == "SINGLE PLANE":
            return "single"
    return ""


@dataclasses.dataclass(frozen=True)
class PlaneRule:
    """Which objects belong to plane ``name``: every non-empty list must contain the object's
    value (calling AE title, Station Name, plane identification); empty lists match anything."""

    name: str
    calling_ae_titles: tuple[str, ...] = ()
    station_names: tuple[str, ...] = ()
    plane_ids: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.name:
            raise ValueError("a plane rule needs a plane name")
        for p in self.plane_ids:
            if p not in PLANE_IDS:
                raise ValueError(f"plane.{self.name}.plane_ids: {p!r} is not one of {', '.join(PLANE_IDS)}")
        object.__setattr__(self, "calling_ae_titles", tuple(t.strip() for t in self.calling_ae_titles))
        object.__setattr__(self, "station_names", tuple(s.strip() for s in self.station_names))

    def matches(self, *, calling_ae: str, station_name: str, plane_id: str) -> bool:
        return (
            (not self.calling_ae_titles or calling_ae.strip() in self.calling_ae_titles)
            and (not self.station_names or station_name.strip() in self.station_names)
            and (not self.plane_ids or plane_id in self.plane_ids)
        )


def map_plane(rules: Sequence[PlaneRule], *, calling_ae: str, station_name: str, plane_id: str) -> str:
    """The one plane whose rule matches; ValueError when none or several do (never a guess)."""
    hits = [r.name for r in rules if r.matches(calling_ae=calling_ae, station_name=station_name, plane_id=plane_id)]
    described = f"(calling AE {calling_ae.strip()!r}, StationName {station_name.strip()!r}, plane {plane_id or '-'})"
    if not hits:
        raise ValueError(f"no plane rule matches the object {described}")
    if len(hits) > 1:
        raise ValueError(f"plane rules {hits} all match the object {described}: make them exclusive")
    return hits[0]


# ------------------------------------------------------------------------------ storage


def sanitise_filename(name: str, *, suffix: str = ".dcm") -> str:
    """A file name made of ``[A-Za-z0-9._-]`` only, without leading dots, at most 128 characters."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", str(name)).lstrip(".")[:120]
    if not clean:
        raise ValueError(f"nothing of the name {name!r} is usable as a file name")
    return clean if clean.endswith(suffix) else clean + suffix


def storage_path(folder: str | Path, sop_instance_uid: str) -> Path:
    """Where a received object is stored: ``folder/<sanitised SOP Instance UID>.dcm``, checked to
    lie inside ``folder`` (no path from the object ever reaches the file system unsanitised)."""
    root = Path(folder).resolve()
    path = (root / sanitise_filename(sop_instance_uid)).resolve()
    if path.parent != root:
        raise ValueError(f"storage path {path} is not inside {root}")
    return path
