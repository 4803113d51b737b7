"""Overlay pictures: sizes, value ranges, and that the DRR at the true pose agrees with the X-ray."""

import numpy as np
import pytest
import torch

from mvreg_ros.core.data.simulate import AcquisitionConfig, DetectorConfig, make_scene
from mvreg_ros.core.geometry import transforms as geometry
from mvreg_ros.core.imaging.overlay import fusion_rgb, normalise_for_display, overlay_rgb
from mvreg_ros.core.imaging.volume import load_example_ct
from mvreg_ros.core.registration.refine import RefineConfig, Registrar
from mvreg_ros.core.rendering.renderer import Renderer


@pytest.fixture(scope="module")
def setup():
    ct = load_example_ct(downsample=8)
    scene = make_scene(
        ct.bone_centre_ct(), [(0.0, 0.0), (90.0, 0.0)], detector=DetectorConfig(height=48, width=40, pixel_mm=6.0)
    )
    views = scene.views(
        Renderer(ct, backend="grid_sample"),
        config=AcquisitionConfig(n_samples=64),
        generator=torch.Generator().manual_seed(0),
    )
    return ct, scene, views


def test_normalise_spans_zero_to_one_inside_the_mask():
    x = torch.linspace(-3, 7, 100).reshape(10, 10)
    mask = torch.zeros(10, 10)
    mask[2:8, 2:8] = 1
    y = normalise_for_display(x, mask)
    assert float(y.min()) == 0.0 and float(y.max()) == 1.0
    inside = y[mask > 0]
    assert float(inside.min()) < 0.05 and float(inside.max()) > 0.95
    torch.testing.assert_close(
        normalise_for_display(x, torch.zeros(10, 10)), normalise_for_display(x, None)
    )  # empty mask: whole image


def test_demo_overlay_has_three_panels(setup):
    _, _, views = setup
    rgb = overlay_rgb(views.images[0], views.images[0], views.masks[0])
    assert rgb.shape == (48, 120, 3) and rgb.dtype == np.uint8
    left, middle = rgb[:, :40], rgb[:, 40:80]
    np.testing.assert_array_equal(left, middle)  # the same image normalised the same way


@pytest.mark.parametrize("max_size", [256, 20])
def test_fusion_is_grey_at_the_true_pose_and_coloured_off_it(setup, max_size):
    ct, scene, views = setup
    registrar = Registrar(ct, RefineConfig(render_backend="grid_sample"))
    rgb = fusion_rgb(registrar, views, scene.T_ref_from_ct, max_size=max_size)
    factor = 1 if max_size >= 48 else 3
    assert rgb.shape == (48 // factor, 2 * (40 // factor), 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])  # the X-ray drives red and blue (magenta)
    off = geometry.translation(torch.tensor([25.0, 0.0, 0.0], dtype=torch.float64)) @ scene.T_ref_from_ct
    rgb_off = fusion_rgb(registrar, views, off, max_size=max_size)

    def disagreement(img):  # green against magenta
        return float(np.abs(img[..., 1].astype(float) - img[..., 0].astype(float)).mean())

    assert disagreement(rgb) < 0.5 * disagreement(rgb_off)
