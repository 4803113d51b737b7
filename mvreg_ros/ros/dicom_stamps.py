"""Stamps of the DICOM bridge's shots (pure: no ROS).

- ``receive`` (default): a shot is stamped with the time it was received (ROS clock), except that
  the second plane of a biplane acquisition takes the stamp of its partner: the object of the
  other plane, received within ``pair_window_s``, of the same study (and series with
  ``pair_same_series``) whose acquisition date-time lies within ``pair_tolerance_s``.
- ``acquisition``: the acquisition date-time mapped to ROS time: the date-time's own UTC offset
  (``&ZZXX`` suffix), else ``TimezoneOffsetFromUTC``, else the configured time zone, then
  ``+ acquisition_offset_s`` (the C-arm clock's offset from the ROS clock). Biplane partners also
  share one stamp (the first one's).

Every stamp must be newer than the previous stamp of its plane (the registration node drops
out-of-order images and joint states) and not more than ``max_backward_s`` older than the newest
stamp published (the node would see a backward time jump); otherwise the shot is refused.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import threading
import zoneinfo

STAMP_SOURCES = ("receive", "acquisition")
_DT = re.compile(r"^(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(?:\.(\d{1,6}))?([+-]\d{4})?$")
_TM = re.compile(r"^(\d{2})(\d{2})(\d{2})(?:\.(\d{1,6}))?$")
_OFFSET = re.compile(r"^([+-])(\d{2}):?(\d{2})$")


def parse_offset(text: str, what: str) -> datetime.timezone:
    """``+HHMM`` / ``-HH:MM`` as a fixed UTC offset."""
    m = _OFFSET.match(text.strip())
    if not m or int(m.group(2)) > 14 or int(m.group(3)) > 59:
        raise ValueError(f"{what} must be a UTC offset like +0100 or -05:00, got {text!r}")
    minutes = int(m.group(2)) * 60 + int(m.group(3))
    return datetime.timezone(datetime.timedelta(minutes=minutes if m.group(1) == "+" else -minutes))


def parse_time_zone(text: str) -> datetime.tzinfo | None:
    """The configured time zone: an IANA name (``Europe/Berlin``, ``UTC``), a fixed offset
    (``+01:00``), or ``""`` (none: objects need their own offset)."""
    text = str(text).strip()
    if not text:
        return None
    if text[0] in "+-":
        return parse_offset(text, "acquisition_time_zone")
    try:
        return zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"acquisition_time_zone {text!r} is not a known time zone (IANA name or +HH:MM)") from None


@dataclasses.dataclass(frozen=True)
class Acquired:
    """An object's acquisition date-time: the wall-clock value as written, and its UTC offset
    when the object states one."""

    local: datetime.datetime  # naive
    offset: datetime.timezone | None


def _dt(text: str, keyword: str) -> Acquired:
    m = _DT.match(text.strip())
    if not m:
        raise ValueError(f"{keyword} {text!r} is not a date-time with seconds (YYYYMMDDHHMMSS[.FFFFFF][&ZZXX])")
    y, mo, d, h, mi, s = (int(m.group(i)) for i in range(1, 7))
    us = int((m.group(7) or "0").ljust(6, "0"))
    try:
        local = datetime.datetime(y, mo, d, h, mi, s, us)
    except ValueError:
        raise ValueError(f"{keyword} {text!r} is not a valid date-time") from None
    return Acquired(local, parse_offset(m.group(8), keyword) if m.group(8) else None)


def acquisition_datetime(ds, frame: int | None = None) -> Acquired | None:
    """The acquisition date-time of an object (frame): ``FrameAcquisitionDateTime`` of the
    frame's functional group, ``AcquisitionDateTime``, or ``AcquisitionDate`` + ``AcquisitionTime``;
    None when it has none; ValueError naming the keyword when it is malformed. An offset comes from
    the value itself or ``TimezoneOffsetFromUTC``."""
    found = None
    if frame is not None and "PerFrameFunctionalGroupsSequence" in ds:
        groups = ds.PerFrameFunctionalGroupsSequence
        if 0 <= frame < len(groups):
            for item in groups[frame].get("FrameContentSequence", []) or []:
                if str(item.get("FrameAcquisitionDateTime", "") or "").strip():
                    found = _dt(str(item.FrameAcquisitionDateTime), "FrameAcquisitionDateTime")
    if found is None and str(ds.get("AcquisitionDateTime", "") or "").strip():
        found = _dt(str(ds.AcquisitionDateTime), "AcquisitionDateTime")
    if found is None:
        date = str(ds.get("AcquisitionDate", "") or "").strip()
        time = str(ds.get("AcquisitionTime", "") or "").strip()
        if date and time:
            t = _TM.match(time)
            if not t or not re.match(r"^\d{8}$", date):
                raise ValueError(f"AcquisitionDate/AcquisitionTime {date!r}/{time!r} are not a date and a time")
            found = _dt(date + time, "AcquisitionDate/AcquisitionTime")
        elif date or time:
            raise ValueError("AcquisitionDate and AcquisitionTime must come together")
    if found is None:
        return None
    if found.offset is None and str(ds.get("TimezoneOffsetFromUTC", "") or "").strip():
        found = Acquired(found.local, parse_offset(str(ds.TimezoneOffsetFromUTC), "TimezoneOffsetFromUTC"))
    return found


def acquisition_to_ns(acquired: Acquired, *, time_zone: datetime.tzinfo | None, offset_s: float) -> int:
    """ROS time (ns) of an acquisition date-time (its own offset first, else ``time_zone``)."""
    if acquired.offset is not None:
        aware = acquired.local.replace(tzinfo=acquired.offset)
    elif time_zone is not None:
        aware = acquired.local.replace(tzinfo=time_zone)
    else:
        raise ValueError(
            "the acquisition date-time has no UTC offset (no &ZZXX, no TimezoneOffsetFromUTC): "
            "set acquisition_time_zone"
        )
    ns = int(round((aware.timestamp() + offset_s) * 1e9))
    if ns <= 0:
        raise ValueError(f"the acquisition date-time maps to a non-positive ROS time ({ns} ns)")
    return ns


@dataclasses.dataclass(frozen=True)
class Shot:
    """What the stamp of one shot depends on."""

    plane: str
    receive_ns: int
    study_uid: str
    series_uid: str
    acquired: Acquired | None
    acquired_ns: int | None = None  # acquisition mode: the mapped ROS time


@dataclasses.dataclass
class _Record:
    shot: Shot
    stamp_ns: int
    partnered: bool = False


class StampMatcher:
    """Assigns stamps (thread-safe); :meth:`assign` either refuses a shot or records it."""

    def __init__(
        self,
        *,
        source: str = "receive",
        pair_window_s: float = 10.0,
        pair_tolerance_s: float = 0.5,
        pair_same_series: bool = False,
        max_backward_s: float = 1.0,
    ):
        if source not in STAMP_SOURCES:
            raise ValueError(f"stamp_source must be one of {', '.join(STAMP_SOURCES)}, got {source!r}")
        for name, v in (("pair_window_s", pair_window_s), ("pair_tolerance_s", pair_tolerance_s)):
            if not 0 <= v < 1e6:
                raise ValueError(f"{name} must be within [0, 1e6) s, got {v}")
        if not 0 <= max_backward_s < 1e6:
            raise ValueError(f"max_backward_s must be within [0, 1e6) s, got {max_backward_s}")
        self.source = source
        self.window_ns = int(pair_window_s * 1e9)
        self.tolerance = datetime.timedelta(seconds=pair_tolerance_s)
        self.same_series = pair_same_series
        self.backward_ns = int(max_backward_s * 1e9)
        self._recent: list[_Record] = []
        self._last: dict[str, int] = {}
        self._newest = 0
        self._lock = threading.Lock()

    def _partner(self, shot: Shot) -> _Record | None:
        if shot.acquired is None:
            return None
        best, best_dt = None, None
        for r in self._recent:
            o = r.shot
            if r.partnered or o.plane == shot.plane or o.acquired is None or o.study_uid != shot.study_uid:
                continue
            if self.same_series and o.series_uid != shot.series_uid:
                continue
            if abs(shot.receive_ns - o.receive_ns) > self.window_ns:
                continue
            dt = abs(o.acquired.local - shot.acquired.local)
            if dt <= self.tolerance and (best_dt is None or dt < best_dt):
                best, best_dt = r, dt
        return best

    def assign(self, shot: Shot) -> tuple[int, bool]:
        """``(stamp_ns, paired)``; ValueError (nothing recorded) when the stamp would go back."""
        with self._lock:
            self._recent = [r for r in self._recent if shot.receive_ns - r.shot.receive_ns <= self.window_ns]
            partner = self._partner(shot)
            if partner is not None:
                stamp = partner.stamp_ns
            elif self.source == "acquisition":
                if shot.acquired_ns is None:
                    raise ValueError("stamp_source is acquisition but the object has no acquisition date-time")
                stamp = shot.acquired_ns
            else:
                stamp = shot.receive_ns
            last = self._last.get(shot.plane)
            if last is not None and stamp <= last:
                raise ValueError(
                    f"stamp {stamp * 1e-9:.6f} s of plane {shot.plane!r} is not newer than its previous shot "
                    f"({last * 1e-9:.6f} s)"
                )
            if stamp < self._newest - self.backward_ns:
                raise ValueError(
                    f"stamp {stamp * 1e-9:.6f} s is {(self._newest - stamp) * 1e-9:.3f} s older than the newest "
                    f"published (max_backward_s {self.backward_ns * 1e-9:g})"
                )
            if partner is not None:
                partner.partnered = True
            self._recent.append(_Record(shot, stamp, partnered=partner is not None))
            self._last[shot.plane] = stamp
            self._newest = max(self._newest, stamp)
            return stamp, partner is not None
