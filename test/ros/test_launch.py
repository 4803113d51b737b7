"""launch/register.launch.py: statically here; with the real launch packages when importable."""

import ast
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH_FILE = REPO / "launch" / "register.launch.py"


def calls(tree, name):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == name]


def keyword(call, name):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def test_launch_file_declares_the_arguments_and_starts_the_node():
    tree = ast.parse(LAUNCH_FILE.read_text())
    args = {c.args[0].value: c for c in calls(tree, "DeclareLaunchArgument")}
    assert set(args) >= {"params_file", "volume_path", "model_path", "use_sim_time", "autostart"}
    assert keyword(args["use_sim_time"], "default_value").value == "false"
    assert keyword(args["autostart"], "default_value").value == "true"  # today's one-command behaviour
    assert keyword(args["model_path"], "default_value").value == ""  # empty: the params file's (no network)
    # the registration node is managed (LifecycleNode); the only plain Node is the optional DICOM bridge
    (bridge,) = calls(tree, "Node")
    assert keyword(bridge, "executable").value == "dicom_bridge" and keyword(bridge, "name").value == "dicom_bridge"
    assert "dicom_bridge = mvreg_ros.ros.dicom_bridge:main" in (REPO / "setup.py").read_text()
    assert keyword(args["with_dicom_bridge"], "default_value").value == "false"  # off unless asked for
    nodes = calls(tree, "LifecycleNode")
    assert len(nodes) == 1
    node = nodes[0]
    assert keyword(node, "package").value == "mvreg_ros"
    # the console script of setup.py and the node name the YAML files use
    assert keyword(node, "executable").value == "register_node"
    assert "register_node = mvreg_ros.ros.node:main" in (REPO / "setup.py").read_text()
    assert keyword(node, "name").value == "register_node"
    assert keyword(node, "namespace").value == ""  # required by LifecycleNode before Jazzy
    assert "register_node:" in (REPO / "config" / "register.yaml").read_text()
    # the default params file is the package's config/register.yaml
    default = ast.unparse(keyword(args["params_file"], "default_value"))
    assert "FindPackageShare('mvreg_ros')" in default and "'config'" in default and "'register.yaml'" in default
    assert (REPO / "config" / "register.yaml").is_file()


def test_launch_file_with_the_launch_packages():
    launch = pytest.importorskip("launch")
    if not hasattr(launch, "LaunchDescription"):  # the repo's launch/ folder seen as a namespace package
        pytest.skip("the launch package is not installed")
    pytest.importorskip("launch_ros")
    from launch.actions import OpaqueFunction

    from launch import LaunchContext

    spec = importlib.util.spec_from_file_location("register_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ld = module.generate_launch_description()
    assert {a.name for a in ld.get_launch_arguments()} >= {
        "params_file",
        "volume_path",
        "model_path",
        "use_sim_time",
        "autostart",
    }
    ctx = LaunchContext()
    ctx.launch_configurations.update(
        params_file=str(REPO / "config" / "biplane.yaml"),
        volume_path="/ct.nii.gz",
        model_path="/ct_coarse.safetensors",
        use_sim_time="true",
        log_level="info",
        autostart="false",
        with_dicom_bridge="false",
        patient_id="",
    )
    opaque = [e for e in ld.entities if isinstance(e, OpaqueFunction)][0]
    (node,) = opaque.execute(ctx)
    assert node.node_package == "mvreg_ros" and node.node_executable == "register_node"
    # launch's own boolean rule (IfCondition's): true/1/false/0, anything else refused
    from launch.conditions import InvalidConditionExpressionError

    ctx.launch_configurations.update(autostart="maybe")
    with pytest.raises(InvalidConditionExpressionError, match="maybe"):
        opaque.execute(ctx)
