"""C-arm kinematics: camera poses from joint values, and the patient placement used by
simulations.

Isocentre frame ``iso`` (right-handed, mm): x toward the patient's head (cranial), y toward
the patient's right, z up (anterior of a supine patient). At zero joint values the C-arm
takes an AP view: the source is ``sid_mm`` below the isocentre, the detector above, the
camera's z axis points up, image rows run toward the feet and columns toward the patient's
right. The orbital joint (LAO/RAO, positive = LAO) turns the C about the table's long axis
x; the angular joint (cranial/caudal, positive = cranial) turns it about the axis y carried
by the orbital rotation::

    T_iso_from_cam = Rx(orbital) @ Ry(angular) @ T_iso_from_cam0
    T_iso_from_cam0 = [x_cam = +y, y_cam = -x, z_cam = +z, source at (0, 0, -sid)]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mvreg_ros.core.geometry.transforms import axis_rotation, make_T

# columns: the camera axes expressed in the isocentre frame at zero angles
R_ISO_FROM_CAM0 = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
# a supine patient, head toward +x: LPS L -> -y, P -> -z, S -> +x
R_ISO_FROM_CT_SUPINE = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)


def T_iso_from_cam(
    orbital_rad: Tensor | float, angular_rad: Tensor | float, *, sid_mm: float, dtype=torch.float64
) -> Float[Tensor, "... 4 4"]:
    """Camera pose of a C-arm at the given joint values (radians), mm."""
    orbital = torch.as_tensor(orbital_rad, dtype=dtype)
    angular = torch.as_tensor(angular_rad, dtype=dtype)
    orbital, angular = torch.broadcast_tensors(orbital, angular)
    R = axis_rotation(0, orbital) @ axis_rotation(1, angular) @ R_ISO_FROM_CAM0.to(dtype)
    # the isocentre lies at +sid on the camera's z axis, so the source is at -sid * z_cam
    return make_T(R, -sid_mm * R[..., :, 2])


def T_iso_from_ct_supine(
    centre_ct: Float[Tensor, "3"], offset_mm: Float[Tensor, "3"] | Sequence[float] | None = None
) -> Float[Tensor, "4 4"]:
    """A supine patient whose CT point ``centre_ct`` sits at the isocentre (+ ``offset_mm``)."""
    R = R_ISO_FROM_CT_SUPINE.to(centre_ct)
    t = -R @ centre_ct
    if offset_mm is not None:
        t = t + torch.as_tensor(offset_mm).to(t)
    return make_T(R, t)
