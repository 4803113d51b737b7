"""The warm-up at configure time without DDS (mvreg_ros/ros/warmup.py): synthetic views of the
configured count and size, the whole pipeline run on them, nothing kept. The plain PyTorch
renderer (grid_sample) and a tiny budget keep it quick: no compilation here."""

import pytest
import torch
from ros_scenario import CONFIG, QUICK, read_params

from mvreg_ros.core.imaging.volume import load_example_ct
from mvreg_ros.core.registration.initialisers import PoseTracker, supine_at_isocentre
from mvreg_ros.core.registration.refine import Registrar
from mvreg_ros.ros.params import build_config
from mvreg_ros.ros.warmup import synthetic_views, views_per_set, warm_up, warmup_image_size


def config(name, **extra):
    values = read_params(CONFIG / name)
    values.update(QUICK, render_backend="grid_sample", **extra)
    return build_config(values, resolve=False)


@pytest.fixture(scope="module")
def volume():
    return load_example_ct(downsample=8)


@pytest.mark.parametrize("name, views", [("biplane.yaml", 2), ("mobile_carm.yaml", 2)])
def test_synthetic_views_have_the_configured_count_and_size(volume, name, views):
    cfg = config(name, warmup_image_size=[48, 64])
    registrar = Registrar(volume, cfg.refine)
    T = supine_at_isocentre(cfg.planes[0], registrar.centre_ct)
    v = synthetic_views(registrar, cfg, T, 48, 64)
    assert views_per_set(cfg) == views == len(v) and (v.height, v.width) == (48, 64)
    assert bool(torch.isfinite(v.images).all()) and float(v.images.std()) > 0
    if cfg.acquisition_mode == "sequential":  # distinct views, wider apart than min_view_separation_deg
        z = v.T_ref_from_cam[:, :3, 2]
        angle = torch.rad2deg(torch.arccos((z[0] @ z[1]).clamp(-1, 1)))
        assert float(angle) > cfg.min_view_separation_deg


def test_image_size_defaults():
    assert warmup_image_size(config("biplane.yaml", warmup_image_size=[])) == (32, 32)  # largest refine size
    assert warmup_image_size(config("biplane.yaml", warmup_image_size=[])) == (32, 32)

    class Model:
        detector_shape = (96, 128)

    assert warmup_image_size(config("biplane.yaml", warmup_image_size=[]), Model()) == (96, 128)
    assert warmup_image_size(config("biplane.yaml"), Model()) == (64, 64)  # the parameter wins


def test_warm_up_runs_the_pipeline_and_keeps_nothing(volume):
    cfg = config("biplane.yaml", refine_iterations=[3], global_search=False)  # a short run of every stage
    registrar = Registrar(volume, cfg.refine)
    T = supine_at_isocentre(cfg.planes[0], registrar.centre_ct)
    report = warm_up(registrar, cfg, T)
    assert report.views == 2 and report.image_size == (64, 64) and report.time_s > 0
    assert report.parts["registration"] > 0
    values = report.values()
    assert values["warmup_image_size"] == "64x64" and float(values["warmup_s"]) > 0
    assert PoseTracker().latest() is None  # (no tracker is involved at all)


def test_a_network_that_cannot_take_the_warmup_images_names_the_parameter(volume):
    cfg = config("biplane.yaml")
    registrar = Registrar(volume, cfg.refine)

    class Model:
        detector_shape = (64, 64)

        def predict(self, views):
            raise ValueError("detector aspect 1.00 differs from the trained 1.33")

    with pytest.raises(ValueError, match="warmup_image_size 64x64"):
        warm_up(registrar, cfg, supine_at_isocentre(cfg.planes[0], registrar.centre_ct), model=Model())


@pytest.mark.parametrize("name", ["biplane.yaml", "mobile_carm.yaml"])
def test_shipped_configs_warm_up_for_the_simulated_detector(name):
    """config/biplane.yaml and config/mobile_carm.yaml carry the warm-up hints of what their
    (simulated) C-arms send: the tests' and `mvreg bag simulate`'s 64 px detector."""
    from ros_scenario import DETECTOR

    from mvreg_ros.cli.bag import DETECTOR_MM
    from mvreg_ros.core.data.simulate import DetectorConfig

    cfg = config(name)
    assert list(cfg.warmup_image_size) == [DETECTOR.height, DETECTOR.width]
    assert cfg.warmup_focal_px == pytest.approx(float(DETECTOR.K()[0, 0]), abs=1e-3)
    bag_default = DetectorConfig(height=64, width=64, pixel_mm=DETECTOR_MM / 64)
    assert cfg.warmup_focal_px == pytest.approx(float(bag_default.K()[0, 0]), abs=1e-3)
