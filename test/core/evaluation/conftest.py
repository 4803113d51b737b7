"""Fixtures of the evaluation tests."""

import pytest

from mvreg_ros.core.data import deepfluoro_write as dfw
from mvreg_ros.core.data.simulate import DetectorConfig
from mvreg_ros.core.imaging.volume import MU_WATER_PER_MM

SPEC = "sim-01"


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, tiny_ct):
    """A DeepFluoro-layout file of the tiny CT: one specimen (``SPEC``), three 64 px views, its label map."""
    path = tmp_path_factory.mktemp("ev") / "tiny.h5"
    hu = tiny_ct.data / MU_WATER_PER_MM * 1000 - 1000
    dfw.write_simulated(
        path,
        hu,
        tiny_ct.T_ct_from_index,
        specimen=SPEC,
        angles_deg=[(0.0, 0.0), (40.0, 10.0), (5.0, -12.0)],
        detector=DetectorConfig(height=64, width=64, pixel_mm=1.164 * 4),
        mask=tiny_ct.mask,
        label_names={32: "vertebrae_T12", 36: "vertebrae_T8", 116: "sternum", 71: "scapula_left", 72: "scapula_right"},
        seed=4,
    )
    return path
