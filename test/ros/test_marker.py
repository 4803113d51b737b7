"""~/anatomy_marker's surface (pure): marching cubes of the CT's bone, in metres in the anatomy frame."""

import numpy as np
import pytest
import torch

from mvreg_ros.core.imaging.volume import Volume, from_hu, load_example_ct
from mvreg_ros.ros.marker import bone_surface, marker_msg


@pytest.fixture(scope="module")
def ct():
    return load_example_ct(downsample=8)


def box_m(volume: Volume):
    c = volume.corners_ct().to(torch.float64).numpy() / 1000.0
    return c.min(0), c.max(0)


def test_surface_is_bounded_in_metres_inside_the_ct_box(ct):
    v, t = bone_surface(ct, max_triangles=2000)
    assert 0 < len(t) <= 2000
    assert v.dtype == np.float64 and t.dtype == np.int64 and t.min() >= 0 and t.max() < len(v)
    lo, hi = box_m(ct)
    assert (v >= lo - 1e-9).all() and (v <= hi + 1e-9).all()
    assert (hi - lo).max() < 2.0  # metres, not mm


def test_default_budget_and_a_finer_budget(ct):
    _, t = bone_surface(ct)
    assert 0 < len(t) <= 50_000
    _, t2 = bone_surface(ct, max_triangles=200)
    assert 0 < len(t2) <= 200


def test_surface_of_a_sphere_sits_at_its_radius():
    n, spacing = 40, 2.0
    A = torch.diag(torch.tensor([spacing, spacing, spacing, 1.0], dtype=torch.float64))
    A[:3, 3] = torch.tensor([100.0, -50.0, 20.0])
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64)] * 3, indexing="ij"), -1)
    r_mm = ((idx - (n - 1) / 2) * spacing).norm(dim=-1)
    hu = torch.where(r_mm < 25.0, 1000.0, -1000.0)
    v, t = bone_surface(from_hu(hu, A), threshold_hu=0.0)
    centre_m = (A[:3, 3].numpy() + spacing * (n - 1) / 2) / 1000.0
    r = np.linalg.norm(v - centre_m, axis=1)
    assert len(t) > 100 and abs(np.median(r) - 0.025) < 0.002


def test_nothing_above_threshold_gives_empty(ct):
    v, t = bone_surface(ct, threshold_hu=3900.0)
    assert v.shape == (0, 3) and t.shape == (0, 3)


@pytest.mark.parametrize("bad", [0, -5, 1.5, True])
def test_bad_budget_is_named(ct, bad):
    with pytest.raises(ValueError, match="max_triangles"):
        bone_surface(ct, max_triangles=bad)


def test_bad_inputs_are_named(ct):
    with pytest.raises(TypeError, match="Volume"):
        bone_surface(np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="threshold_hu"):
        bone_surface(ct, threshold_hu=float("nan"))


def test_marker_message():
    pytest.importorskip("visualization_msgs.msg")
    from visualization_msgs.msg import Marker

    v = np.array([[0.0, 0, 0], [0.1, 0, 0], [0, 0.1, 0], [0, 0, 0.1]])
    t = np.array([[0, 1, 2], [0, 2, 3]])
    m = marker_msg(v, t, frame_id="anatomy")
    assert m.header.frame_id == "anatomy" and m.type == Marker.TRIANGLE_LIST and m.action == Marker.ADD
    assert len(m.points) == 6 and m.points[4].y == pytest.approx(0.1) and m.pose.orientation.w == 1.0
    assert m.color.a == 1.0 and m.scale.x == 1.0
    with pytest.raises(ValueError, match="frame_id"):
        marker_msg(v, t, frame_id="")
    with pytest.raises(ValueError, match="triangles"):
        marker_msg(v, np.array([[0, 1, 9]]), frame_id="anatomy")
    with pytest.raises(ValueError, match="vertices_m"):
        marker_msg(v[:, :2], t, frame_id="anatomy")


def test_viewer_configs_show_the_marker_transient_local():
    import json
    from pathlib import Path

    import yaml

    config = Path(__file__).resolve().parents[2] / "config"
    rviz = yaml.safe_load((config / "register.rviz").read_text())
    displays = {d["Class"]: d for d in rviz["Visualization Manager"]["Displays"]}
    marker = displays["rviz_default_plugins/Marker"]["Topic"]
    assert marker["Value"] == "/register_node/anatomy_marker" and marker["Durability Policy"] == "Transient Local"
    assert "rviz_default_plugins/TF" in displays
    assert rviz["Visualization Manager"]["Global Options"]["Fixed Frame"] == "carm_base"
    fox = json.loads((config / "foxglove_layout.json").read_text())
    panels = fox["configById"]
    assert "/register_node/anatomy_marker" in panels["3D!anatomy"]["topics"]
    assert panels["RawMessages!status"]["topicPath"].startswith("/register_node/status")
    assert panels["Image!overlay"]["imageMode"]["imageTopic"] == "/register_node/overlay"


def test_a_big_cts_surface_from_the_engines_pooled_voxels_sits_where_the_full_ones_does():
    """The node makes a big CT's marker from ``Registrar.box`` (pooled once, no full-resolution copy):
    the same bone, in the same place, to within the pooling."""
    from mvreg_ros.core.registration.refine import RefineConfig, Registrar

    ct = load_example_ct(downsample=4)
    registrar = Registrar(ct, RefineConfig(full_resolution_max_voxels=1000, base_voxel_mm=6.0))
    assert not registrar.full_resolution and registrar.base_factor > 1
    v_full, _ = bone_surface(ct)
    v_box, _ = bone_surface(registrar.box)
    coarse_mm = float(registrar.box.spacing.max())
    for q in (0.05, 0.5, 0.95):  # the surface's extent and middle, per axis
        diff_mm = 1000 * np.abs(np.quantile(v_box, q, axis=0) - np.quantile(v_full, q, axis=0))
        assert (diff_mm < 2 * coarse_mm).all(), (q, diff_mm, coarse_mm)
