"""Domain randomisation of the training views (mvreg_ros/core/learning/augment.py)."""

import dataclasses
import math

import pytest
import torch

from mvreg_ros.core.learning.augment import (
    AugmentConfig,
    column_gain,
    deform_soft_tissue,
    metal_tools,
    shutter_masks,
)
from mvreg_ros.core.learning.train_config import TrainConfig

OFF = AugmentConfig(p_deform=0.0, p_metal=0.0, p_shutter=0.0, p_gain=0.0)
ALWAYS = AugmentConfig(p_deform=1.0, p_metal=1.0, p_shutter=1.0, p_gain=1.0)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _ramp(n=3, h=24, w=32):
    """Channels whose soft tissue is a ramp along x (slope 1 per pixel) and bone a blob."""
    x = torch.arange(w, dtype=torch.float32).expand(n, h, w)
    bone = torch.rand(n, h, w, generator=_g(5))
    return torch.stack([x.clone(), bone], 1)


def test_switched_off_every_randomisation_is_the_identity():
    ch = _ramp()
    assert torch.equal(deform_soft_tissue(ch, config=OFF, generator=_g()), ch)
    assert torch.equal(metal_tools(3, 24, 32, config=OFF, generator=_g()), torch.zeros(3, 24, 32))
    assert torch.equal(shutter_masks(3, 24, 32, config=OFF, generator=_g()), torch.ones(3, 24, 32))
    assert torch.equal(column_gain(3, 32, config=OFF, generator=_g()), torch.ones(3, 1, 32))


def test_deformation_moves_soft_tissue_within_its_bound_and_keeps_bone_rigid():
    cfg = dataclasses.replace(ALWAYS, deform_px=(2.0, 2.0), density_change=(0.0, 0.0))
    ch = _ramp()
    out = deform_soft_tissue(ch, config=cfg, generator=_g(1))
    assert torch.equal(out[:, 1], ch[:, 1])  # the target's bone does not move
    # a ramp of slope 1 shows the x displacement directly; inside the image (border clamp aside)
    shift = (out[:, 0] - ch[:, 0])[:, :, 3:-3]
    assert float(shift.abs().max()) <= 2.0 + 1e-4
    assert float(shift.abs().max()) > 0.5  # it did move
    # smooth: neighbouring pixels move alike
    assert float((shift[..., 1:] - shift[..., :-1]).abs().max()) < 0.5


def test_density_change_scales_soft_tissue_within_its_range():
    cfg = dataclasses.replace(ALWAYS, deform_px=(0.0, 0.0), density_change=(0.1, 0.1))
    ch = torch.stack([torch.ones(2, 16, 16), torch.zeros(2, 16, 16)], 1)
    out = deform_soft_tissue(ch, config=cfg, generator=_g(2))
    assert float(out[:, 0].min()) >= 0.9 - 1e-5 and float(out[:, 0].max()) <= 1.1 + 1e-5
    assert float(out[:, 0].std()) > 0.005


def test_deformation_refuses_other_channel_counts():
    with pytest.raises(ValueError, match="soft tissue, bone excess"):
        deform_soft_tissue(torch.zeros(1, 3, 8, 8), config=ALWAYS, generator=_g())


def test_a_metal_tool_integrates_to_its_capsule_volume():
    """One tool of radius r and length L inside the image: the image sums to mu * (pi r^2 L + 4/3 pi r^3)
    (a cylinder with hemispherical caps, in pixels), whatever its direction."""
    r, mu, w = 2.0, 0.7, 96
    cfg = dataclasses.replace(
        ALWAYS, metal_tools=(1, 1), metal_radius_px=(r, r), metal_mu_per_px=(mu, mu), metal_length=(0.3, 0.3)
    )
    out = metal_tools(4, 96, w, config=cfg, generator=_g(3))
    L = 0.3 * w
    expected = mu * (math.pi * r**2 * L + 4 / 3 * math.pi * r**3)
    for img in out:
        assert float(img.sum()) == pytest.approx(expected, rel=0.03)
        assert float(img.max()) == pytest.approx(mu * 2 * r, rel=0.05)  # the chord through the axis


def test_a_tool_thinner_than_a_pixel_keeps_its_integral():
    r, mu = 0.25, 1.0
    cfg = dataclasses.replace(
        ALWAYS, metal_tools=(1, 1), metal_radius_px=(r, r), metal_mu_per_px=(mu, mu), metal_length=(0.3, 0.3)
    )
    out = metal_tools(2, 96, 96, config=cfg, generator=_g(4))
    L = 0.3 * 96
    for img in out:  # the cylinder's cross-section integral, pi r^2 per unit length (caps included loosely)
        assert float(img.sum()) == pytest.approx(mu * math.pi * r**2 * L, rel=0.1)


def test_shutters_cut_one_or_two_sides_to_the_configured_depth():
    cfg = dataclasses.replace(ALWAYS, shutter_sides=(1, 2), shutter_depth=(0.1, 0.2))
    masks = shutter_masks(50, 40, 60, config=cfg, generator=_g(5))
    closed = 1 - masks.mean((-2, -1))
    assert float(closed.min()) >= 0.1 - 0.02  # at least one side at 10 %
    assert float(closed.max()) <= 0.2 + 0.2 + 0.02  # at most two sides at 20 %
    # every closed pixel lies within 20 % of an edge; the centre stays open
    assert bool((masks[:, 8:-8, 12:-12] == 1).all())
    # each cut is a full row or column band (a shutter, not a blob)
    for m in masks:
        rows_closed = (m == 0).all(1)
        cols_closed = (m == 0).all(0)
        assert torch.equal(m == 0, rows_closed[:, None] | cols_closed[None, :])


def test_column_gain_is_one_factor_per_column():
    cfg = dataclasses.replace(ALWAYS, column_gain_std=(0.03, 0.03))
    gain = column_gain(200, 64, config=cfg, generator=_g(6))
    assert gain.shape == (200, 1, 64)
    assert float((gain - 1).std()) == pytest.approx(0.03, rel=0.1)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(p_metal=1.5), "p_metal"),
        (dict(deform_px=(2.0, 1.0)), "deform_px"),
        (dict(shutter_sides=(1, 5)), "shutter_sides"),
        (dict(shutter_depth=(0.1, 0.6)), "shutter_depth"),
        (dict(column_gain_std=(-0.1, 0.1)), "column_gain_std"),
    ],
)
def test_bad_settings_are_refused_by_name(change, match):
    with pytest.raises(ValueError, match=match):
        AugmentConfig(**change)


def test_the_training_config_round_trips_its_randomisation_and_the_shipped_yaml_is_the_default(tmp_path):
    cfg = TrainConfig(augment=dataclasses.replace(OFF, metal_tools=(2, 3)))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_yaml("config/train.yaml") == TrainConfig()
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  augment:\n    p_wobble: 0.5\n")
    with pytest.raises(ValueError, match="augment.p_wobble"):
        TrainConfig.from_yaml(bad)
