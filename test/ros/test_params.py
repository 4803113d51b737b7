"""Parameters: the shipped YAML files against the declared specs, the real rclpy declaration,
and the errors a bad value gives."""

import math

import pytest
import torch
import yaml

from mvreg_ros.core.kinematics import T_from_xyz_rpy
from mvreg_ros.ros.params import (NODE_PARAMETERS, NODE_SPECS, PLANE_PARAMETERS, ConfigError, T_from_param,
                                  build_config, spec_for, validate)
from ros_scenario import CONFIG, read_params

# node parameter files (config/ also holds other tools' YAML files)
CONFIGS = sorted(p for p in CONFIG.glob("*.yaml") if "register_node" in (yaml.safe_load(p.read_text()) or {}))


def test_the_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"register.yaml", "biplane.yaml", "mobile_carm.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_key_is_a_declared_parameter_with_a_valid_value(path):
    values = read_params(path)
    assert values, path
    for key, value in values.items():
        spec = spec_for(key)
        assert spec is not None, f"{path.name}: {key!r} is not a parameter of the node"
        validate(spec, value, key)  # exact types: a double written as 1 fails here
    planes = values.get("planes", NODE_SPECS["planes"].default)
    for key in values:
        if key.startswith("plane."):
            assert key.split(".")[1] in planes, f"{path.name}: {key!r} configures a plane not in 'planes'"
    cfg = build_config(dict(values, volume_path="example:8"), resolve=False)
    assert len(cfg.planes) == len(cfg.image_topics)


def test_register_yaml_holds_the_defaults():
    values = read_params(CONFIG / "register.yaml")
    for key, value in values.items():
        if key.startswith("plane."):
            spec = spec_for(key)
            assert value == spec.default, key
        else:
            assert value == NODE_SPECS[key].default, key
    # and lists every node parameter except the engine budgets, which default to RefineConfig
    missing = {s.name for s in NODE_PARAMETERS} - set(values)
    assert missing == {"initial_T_ref_from_ct", "refine_sizes", "refine_iterations", "refine_samples", "refine_patches"}


def test_biplane_and_mobile_geometry():
    bi = build_config(dict(read_params(CONFIG / "biplane.yaml"), volume_path="x"), resolve=False)
    assert bi.acquisition_mode == "synchronized" and [p.name for p in bi.planes] == ["frontal", "lateral"]
    # the lateral plane at zero joints looks along the patient's left-right axis, same isocentre
    zero = {n: 0.0 for n in bi.joint_names}
    z_front = bi.planes[0].T_ref_from_cam(zero)[:3, 2]
    z_lat = bi.planes[1].T_ref_from_cam(zero)[:3, 2]
    assert abs(float(z_front @ z_lat)) < 1e-12
    torch.testing.assert_close(bi.planes[0].isocentre_ref(zero), bi.planes[1].isocentre_ref(zero))
    mob = build_config(dict(read_params(CONFIG / "mobile_carm.yaml"), volume_path="x"), resolve=False)
    assert mob.acquisition_mode == "sequential" and mob.planes[0].prismatic_joints == ("carm_lift", "carm_horizontal")
    q = {n: 0.0 for n in mob.joint_names}
    iso0 = mob.planes[0].isocentre_ref(q)
    q["carm_horizontal"] = 0.1  # 10 cm toward the table = cart +x
    torch.testing.assert_close(mob.planes[0].isocentre_ref(q) - iso0, torch.tensor([100.0, 0.0, 0.0], dtype=torch.float64))


def test_defaults_validate():
    for spec in NODE_PARAMETERS + PLANE_PARAMETERS:
        validate(spec, spec.default)


def test_render_backend_reaches_the_refine_config():
    assert build_config(dict(BASE), resolve=False).refine.render_backend == "auto"
    assert build_config({**BASE, "render_backend": "grid_sample"}, resolve=False).refine.render_backend == "grid_sample"


BASE = {"volume_path": "example:8"}


@pytest.mark.parametrize("values, match", [
    ({"volume_path": ""}, "volume_path"),
    ({"max_uncertainty_mm": 5}, "must be double"),
    ({"max_uncertainty_mm": -1.0}, "must lie in"),
    ({"acquisition_mode": "burst"}, "must be one of"),
    ({"render_backend": "opencl"}, "render_backend"),
    ({"image_topics": ["/a", "/b"], "camera_info_topics": ["/a_info"], "acquisition_mode": "synchronized"},
     "camera_info_topics"),
    ({"image_topics": ["/a", "/b"], "camera_info_topics": ["/ai", "/bi"]}, "sequential"),
    ({"image_topics": ["/a", "/a"], "camera_info_topics": ["/ai", "/bi"], "acquisition_mode": "synchronized"}, "twice"),
    ({"planes": ["p", "q"]}, "one plane per image topic"),
    ({"refine_sizes": [16, 32, 64, 128]}, "refine_iterations"),
    ({"refine_sizes": [4]}, "must lie in"),
    ({"initial_T_ref_from_ct": [1.0, 2.0]}, "needs 0 or 7 or 16 values"),
    ({"initial_T_ref_from_ct": [2.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]},
     "not a rigid transform"),
    ({"plane.main.sid_m": 0.0}, "plane.main.sid_m"),
    ({"plane.main.orbital_sign": 0.5}, "multiple of 2.0"),
    ({"plane.main.prismatic_joints": ["lift"]}, "3 values per prismatic joint"),
    ({"plane.main.prismatic_joints": ["lift"], "plane.main.prismatic_axes": [0.0, 0.0, 0.5]}, "unit vector"),
    ({"plane.main.angular_joint": "carm_orbital"}, "must differ"),
    ({"reference_frame": "anatomy"}, "two different"),
])
def test_bad_values_name_the_parameter(values, match):
    with pytest.raises(ConfigError, match=match):
        build_config({**BASE, **values}, resolve=False)


def test_pose_parameter_forms_agree():
    R = T_from_xyz_rpy([0.0, 0.0, 0.0], [0.3, -0.2, 1.0])[:3, :3]
    from mvreg_ros.core.geometry import quaternion_from_matrix

    T16 = torch.eye(4, dtype=torch.float64)
    T16[:3, :3] = R
    T16[:3, 3] = torch.tensor([0.1, -0.2, 1.5], dtype=torch.float64)
    a = T_from_param([float(v) for v in T16.reshape(-1)], "p")
    b = T_from_param([0.1, -0.2, 1.5, *quaternion_from_matrix(R)], "p")
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[:3, 3], torch.tensor([100.0, -200.0, 1500.0], dtype=torch.float64))
    assert T_from_param([], "p") is None


# ---------------------------------------------------------------- the real rclpy declaration

def declare(ros_context, *args, describe=()):
    from rclpy.node import Node

    from mvreg_ros.ros.params import declare_and_read

    node = Node("register_node", context=ros_context, cli_args=["--ros-args", *args], start_parameter_services=False)
    try:
        cfg = declare_and_read(node, resolve=False)
        return (cfg, node.describe_parameters(list(describe))) if describe else cfg
    finally:
        node.destroy_node()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_rclpy_reads_the_yaml_like_the_spec_table(ros_context, path):
    pytest.importorskip("rclpy")
    cfg = declare(ros_context, "--params-file", str(path), "-p", "volume_path:=example:8")
    ref = build_config(dict(read_params(path), volume_path="example:8"), resolve=False)
    assert cfg.image_topics == ref.image_topics and cfg.camera_info_topics == ref.camera_info_topics
    assert cfg.acquisition_mode == ref.acquisition_mode and cfg.joint_names == ref.joint_names
    assert cfg.refine == ref.refine and cfg.pipeline == ref.pipeline and cfg.pose_hold_s == ref.pose_hold_s
    for a, b in zip(cfg.planes, ref.planes):
        assert (a.name, a.joint_names, a.sid_mm, a.prismatic_axes) == (b.name, b.joint_names, b.sid_mm, b.prismatic_axes)
        torch.testing.assert_close(a.T_ref_from_iso, b.T_ref_from_iso)


def test_rclpy_descriptors_carry_ranges_and_reject_bad_values(ros_context):
    pytest.importorskip("rclpy")
    cfg, desc = declare(ros_context, "--params-file", str(CONFIG / "register.yaml"), "-p", "volume_path:=x",
                        describe=["max_uncertainty_mm", "num_views", "plane.main.sid_m", "image_topics"])
    unc, views, sid, topics = desc
    assert unc.read_only and unc.description and unc.floating_point_range[0].to_value == 1000.0
    assert views.integer_range[0].from_value == 1 and views.integer_range[0].to_value == 16
    assert sid.floating_point_range[0].from_value == 0.05
    assert topics.description and not topics.floating_point_range
    with pytest.raises(ConfigError, match="decimal point"):
        declare(ros_context, "-p", "volume_path:=x", "-p", "max_uncertainty_mm:=5")
    with pytest.raises(ConfigError, match="max_uncertainty_mm"):
        declare(ros_context, "-p", "volume_path:=x", "-p", "max_uncertainty_mm:=5000.0")
    with pytest.raises(ConfigError, match="plane.main.sid_m"):
        declare(ros_context, "-p", "volume_path:=x", "-p", "plane.main.sid_m:=9.0")
    cfg = declare(ros_context, "-p", "volume_path:=x", "-p", "initial_T_ref_from_ct:=[0.1, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]")
    torch.testing.assert_close(cfg.initial_T_ref_from_ct[:3, 3], torch.tensor([100.0, 0.0, 1000.0], dtype=torch.float64))
    assert math.isclose(float(cfg.initial_T_ref_from_ct[0, 0]), 1.0)
