"""Parameters: the shipped YAML files against the declared specs, the real rclpy declaration,
and the errors a bad value gives."""

import dataclasses
import math
import re

import pytest
import torch
import yaml
from ros_scenario import CONFIG, REPO, read_params

from mvreg_ros.core.geometry.kinematics import T_from_xyz_rpy
from mvreg_ros.ros.params import (
    DERIVED_FIELDS,
    NODE_PARAMETERS,
    NODE_SPECS,
    PLANE_PARAMETERS,
    PLANE_SPECS,
    ConfigError,
    NodeConfig,
    T_from_param,
    build_config,
    spec_for,
    validate,
)

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
    assert missing == {
        "initial_T_ref_from_ct",
        "refine_sizes",
        "refine_iterations",
        "refine_samples",
        "refine_patches",
        "refine_grad_weight",
        "warmup_image_size",
    }


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
    torch.testing.assert_close(
        mob.planes[0].isocentre_ref(q) - iso0, torch.tensor([100.0, 0.0, 0.0], dtype=torch.float64)
    )


def test_defaults_validate():
    for spec in NODE_PARAMETERS + PLANE_PARAMETERS:
        validate(spec, spec.default)


def test_render_backend_reaches_the_refine_config():
    assert build_config(dict(BASE), resolve=False).refine.render_backend == "auto"
    assert build_config({**BASE, "render_backend": "grid_sample"}, resolve=False).refine.render_backend == "grid_sample"


def test_similarity_defaults_and_grad_weight_reach_the_refine_config():
    from mvreg_ros.core.registration.acceptance import AcceptanceConfig
    from mvreg_ros.core.registration.refine import RefineConfig

    cfg = build_config(dict(BASE), resolve=False)
    assert cfg.refine.grad_weight == RefineConfig().grad_weight == 0.75
    # one node parameter sets the refinement's mean floor and the acceptance test's per-view floor: same defaults
    assert cfg.refine.min_similarity == cfg.pipeline.acceptance.min_view_similarity == RefineConfig().min_similarity
    assert AcceptanceConfig().min_view_similarity == RefineConfig().min_similarity
    assert build_config({**BASE, "refine_grad_weight": 0.5}, resolve=False).refine.grad_weight == 0.5
    with pytest.raises(ConfigError, match="refine_grad_weight"):
        build_config({**BASE, "refine_grad_weight": 1.5}, resolve=False)


BASE = {"volume_path": "example:8"}


# ---------------------------------------------------------------- one table: every parameter reaches NodeConfig


def _plain(x):
    """A comparable form of a config value: tensors as lists, dataclasses field by field."""
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if dataclasses.is_dataclass(x):
        return tuple((f.name, _plain(getattr(x, f.name))) for f in dataclasses.fields(x))
    if isinstance(x, (tuple, list)):
        return tuple(_plain(v) for v in x)
    return x


OTHER = {  # an empty default has no element to change
    "initial_T_ref_from_ct": [0.1, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
    "warmup_image_size": [768, 1024],
}


def _other_scalar(spec, v):
    """A valid value of one element of ``spec`` that differs from ``v``."""
    if spec.choices:
        return next(c for c in spec.choices if c != v)
    if isinstance(v, bool):
        return not v
    if isinstance(v, str):
        return v + "_x" if v else "x"
    lo, hi = spec.range if spec.range is not None else (-math.inf, math.inf)
    if isinstance(v, int):
        return v + 1 if v + 1 <= hi else v - 1
    return (v + hi) / 2 if math.isfinite(hi) and hi > v else (lo + v) / 2 if math.isfinite(lo) else v + 1.0


def _other(spec, value):
    if spec.name in OTHER:
        return OTHER[spec.name]
    if spec.type.endswith("_array"):
        return [_other_scalar(spec, value[0]), *value[1:]]
    return _other_scalar(spec, value)


def _config_fields(cfg) -> dict:
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


@pytest.mark.parametrize("spec", NODE_PARAMETERS, ids=lambda s: s.name)
def test_every_parameter_reaches_the_config(spec):
    """Changing any one parameter changes exactly the NodeConfig fields it is declared to reach:
    its own field (pass-through) or the derived fields its spec names in ``into``; none is dropped."""
    value = validate(spec, BASE.get(spec.name, spec.default))
    other = validate(spec, _other(spec, value))
    assert other != value
    ref = build_config(BASE, resolve=False)
    cfg = build_config({**BASE, spec.name: other}, resolve=False)
    before, after = _config_fields(ref), _config_fields(cfg)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == set(spec.into or (spec.name,)), f"{spec.name}: {other!r} changed {sorted(changed)}"
    if not spec.into:  # passed through: the checked value, arrays as tuples, cleaned
        expected = tuple(other) if spec.type.endswith("_array") else other
        expected = spec.clean(expected) if spec.clean is not None else expected
        assert getattr(cfg, spec.name) == expected and type(getattr(cfg, spec.name)) is type(expected)


def test_node_config_fields_are_the_parameters_and_the_documented_derived_fields():
    fields = {f.name: f for f in dataclasses.fields(NodeConfig)}
    passed = {s.name for s in NODE_PARAMETERS if not s.into}
    targets = {name for s in NODE_PARAMETERS for name in s.into}
    assert passed <= set(fields), f"parameters without a NodeConfig field: {sorted(passed - set(fields))}"
    assert targets <= set(DERIVED_FIELDS), f"'into' names no derived field: {sorted(targets - set(DERIVED_FIELDS))}"
    extra = set(fields) - passed - set(DERIVED_FIELDS)
    assert not extra, f"NodeConfig fields that are neither a parameter nor a derived field: {sorted(extra)}"
    assert not passed & set(DERIVED_FIELDS)
    for name in DERIVED_FIELDS:
        assert fields[name].metadata.get("doc"), f"derived field {name!r} has no doc"
        assert name in targets, f"derived field {name!r} is built from no parameter"
    for s in NODE_PARAMETERS:
        if not s.into:
            assert fields[s.name].metadata.get("doc") == s.description
    cfg = build_config(BASE, resolve=False)
    assert isinstance(cfg.image_topics, tuple) and isinstance(cfg.sync_slop_s, float) and cfg.i0 is None
    assert build_config({**BASE, "reference_frame": "/world"}, resolve=False).reference_frame == "world"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sync_slop_s = 1.0


def test_bad_spec_declarations_fail():
    from mvreg_ros.ros.params import ParamSpec

    assert ParamSpec("p", "double", 0.0, "d", into="refine").into == ("refine",)
    with pytest.raises(TypeError, match="into"):
        ParamSpec("p", "double", 0.0, "d", into=["refine"])
    with pytest.raises(ValueError, match="clean"):
        ParamSpec("p", "string", "", "d", into="refine", clean=str.strip)
    with pytest.raises(TypeError, match="clean"):
        ParamSpec("p", "string", "", "d", clean="strip")


def _doc_rows(part: str) -> list[list[str]]:
    """The rows ``| `name` | type | default | meaning |`` of a markdown table, as cells."""
    return [
        [c.strip() for c in line.strip().strip("|").split(" | ")]
        for line in part.splitlines()
        if re.match(r"\| `[^`]+` \|", line)
    ]


def test_every_parameter_has_a_row_in_docs_node_md():
    text = (REPO / "docs" / "node.md").read_text()
    section = text.split("\n## Parameters\n", 1)[1].split("\n## ", 1)[0]
    node_part, plane_part = section.split("For each plane", 1)
    for part, specs in ((node_part, NODE_SPECS), (plane_part, PLANE_SPECS)):
        rows = _doc_rows(part)
        names = [row[0].strip("`") for row in rows]
        assert len(names) == len(set(names)), f"docs/node.md lists a parameter twice: {names}"
        assert not set(specs) - set(names), f"docs/node.md lacks rows for {sorted(set(specs) - set(names))}"
        assert not set(names) - set(specs), (
            f"docs/node.md documents unknown parameters {sorted(set(names) - set(specs))}"
        )
        for name, row in zip(names, rows):
            spec = specs[name]
            assert row[1] == spec.type.replace("_", " "), f"docs/node.md: {name} is a {spec.type}, not {row[1]}"
            if re.fullmatch(r"`[^`]*`", row[2]):  # a literal default (not '(required)' or the engine's)
                assert yaml.safe_load(row[2].strip("`")) == spec.default, f"docs/node.md: default of {name}"


@pytest.mark.parametrize(
    "values, match",
    [
        ({"volume_path": ""}, "volume_path"),
        ({"max_uncertainty_mm": 5}, "must be double"),
        ({"max_uncertainty_mm": -1.0}, "must lie in"),
        ({"acquisition_mode": "burst"}, "must be one of"),
        ({"render_backend": "opencl"}, "render_backend"),
        (
            {"image_topics": ["/a", "/b"], "camera_info_topics": ["/a_info"], "acquisition_mode": "synchronized"},
            "camera_info_topics",
        ),
        ({"image_topics": ["/a", "/b"], "camera_info_topics": ["/ai", "/bi"]}, "sequential"),
        (
            {"image_topics": ["/a", "/a"], "camera_info_topics": ["/ai", "/bi"], "acquisition_mode": "synchronized"},
            "twice",
        ),
        ({"planes": ["p", "q"]}, "one plane per image topic"),
        ({"refine_sizes": [16, 32, 64, 128]}, "refine_iterations"),
        ({"refine_sizes": [4]}, "must lie in"),
        (
            {"refine_sizes": [96, 32], "refine_iterations": [5, 5], "refine_samples": [8, 8], "refine_patches": [8, 8]},
            "must ascend",
        ),
        ({"initial_T_ref_from_ct": [1.0, 2.0]}, "needs 0 or 7 or 16 values"),
        (
            {"initial_T_ref_from_ct": [2.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]},
            "not a rigid transform",
        ),
        ({"plane.main.sid_m": 0.0}, "plane.main.sid_m"),
        ({"plane.main.orbital_sign": 0.5}, "multiple of 2.0"),
        ({"plane.main.prismatic_joints": ["lift"]}, "3 values per prismatic joint"),
        ({"plane.main.prismatic_joints": ["lift"], "plane.main.prismatic_axes": [0.0, 0.0, 0.5]}, "unit vector"),
        ({"plane.main.angular_joint": "carm_orbital"}, "must differ"),
        ({"reference_frame": "anatomy"}, "two different"),
    ],
)
def test_bad_values_name_the_parameter(values, match):
    with pytest.raises(ConfigError, match=match):
        build_config({**BASE, **values}, resolve=False)


def test_pose_parameter_forms_agree():
    R = T_from_xyz_rpy([0.0, 0.0, 0.0], [0.3, -0.2, 1.0])[:3, :3]
    from mvreg_ros.core.geometry.transforms import quaternion_from_matrix

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
        assert (a.name, a.joint_names, a.sid_mm, a.prismatic_axes) == (
            b.name,
            b.joint_names,
            b.sid_mm,
            b.prismatic_axes,
        )
        torch.testing.assert_close(a.T_ref_from_iso, b.T_ref_from_iso)


def test_rclpy_descriptors_carry_ranges_and_reject_bad_values(ros_context):
    pytest.importorskip("rclpy")
    cfg, desc = declare(
        ros_context,
        "--params-file",
        str(CONFIG / "register.yaml"),
        "-p",
        "volume_path:=x",
        describe=["max_uncertainty_mm", "num_views", "plane.main.sid_m", "image_topics"],
    )
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
    cfg = declare(
        ros_context, "-p", "volume_path:=x", "-p", "initial_T_ref_from_ct:=[0.1, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]"
    )
    torch.testing.assert_close(
        cfg.initial_T_ref_from_ct[:3, 3], torch.tensor([100.0, 0.0, 1000.0], dtype=torch.float64)
    )
    assert math.isclose(float(cfg.initial_T_ref_from_ct[0, 0]), 1.0)
