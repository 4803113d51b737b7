"""Fixtures of this package's tests on the shipped CT (conftest.py offers them to every module): the CT
pooled by 4, a Registrar with a small pyramid (REFINE), and a biplane set of it (DETECTOR). Modules that
define their own ``ct`` or ``registrar`` use theirs."""

import pytest
import torch

from mvreg_ros.core.data.simulate import AcquisitionConfig, DetectorConfig, make_scene
from mvreg_ros.core.imaging.volume import load_example_ct
from mvreg_ros.core.registration.refine import RefineConfig, Registrar
from mvreg_ros.core.rendering.renderer import Renderer

REFINE = RefineConfig(sizes=(32, 48), iterations=(40, 30), n_samples=(48, 64), patches=(8, 8))
DETECTOR = DetectorConfig(height=96, width=96, pixel_mm=3.1)


@pytest.fixture(scope="module")
def ct():
    return load_example_ct(downsample=4)


@pytest.fixture(scope="module")
def registrar(ct):
    return Registrar(ct, REFINE)


@pytest.fixture(scope="module")
def biplane(ct):
    scene = make_scene(ct.bone_centre_ct(), [(0.0, 0.0), (70.0, 10.0)], detector=DETECTOR)
    views = scene.views(
        Renderer(ct), config=AcquisitionConfig(n_samples=128), generator=torch.Generator().manual_seed(3)
    )
    return scene.T_ref_from_ct, views
