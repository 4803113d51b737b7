"""Start mvreg_ros's registration node.

    ros2 launch mvreg_ros register.launch.py volume_path:=/data/patient_ct.nii.gz
    ros2 launch mvreg_ros register.launch.py params_file:=/path/to/biplane.yaml volume_path:=... use_sim_time:=true
    ros2 launch mvreg_ros register.launch.py volume_path:=/data/ct.nii.gz model_path:=/data/ct_coarse.safetensors
    ros2 launch mvreg_ros register.launch.py volume_path:=/data/ct.nii.gz autostart:=false   # for a supervisor

Arguments: params_file (default: the package's config/register.yaml), volume_path and
model_path (each overrides the params file's value when not empty), use_sim_time, log_level,
autostart. The node is a managed (lifecycle) node, started with launch_ros's LifecycleNode;
with autostart (default) it configures (CT, network, warm-up) and activates itself, exactly as
before; autostart:=false leaves it unconfigured for a lifecycle supervisor
(``ros2 lifecycle set /register_node configure``, then ``activate``).
"""

from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import evaluate_condition_expression
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode, Node
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription


def _register_node(context):
    params_file = LaunchConfiguration("params_file").perform(context)
    overrides = {
        "use_sim_time": evaluate_condition_expression(context, [LaunchConfiguration("use_sim_time")]),
        # the node drives itself to active (one process, one owner of its transitions)
        "autostart": evaluate_condition_expression(context, [LaunchConfiguration("autostart")]),
    }
    for name in ("volume_path", "model_path"):  # empty: keep the params file's value
        value = LaunchConfiguration(name, default="").perform(context)
        if value:
            overrides[name] = value
    log_level = LaunchConfiguration("log_level").perform(context)
    nodes = [
        LifecycleNode(
            package="mvreg_ros",
            executable="register_node",
            name="register_node",
            namespace="",
            output="screen",
            emulate_tty=True,
            parameters=[params_file, overrides],
            arguments=["--ros-args", "--log-level", log_level],
        )
    ]
    if evaluate_condition_expression(context, [LaunchConfiguration("with_dicom_bridge")]):
        bridge_overrides = {"use_sim_time": overrides["use_sim_time"]}
        patient_id = LaunchConfiguration("patient_id").perform(context)
        if patient_id:
            bridge_overrides["patient_id"] = patient_id
        nodes.append(
            Node(
                package="mvreg_ros",
                executable="dicom_bridge",
                name="dicom_bridge",
                namespace="",
                output="screen",
                emulate_tty=True,
                parameters=[LaunchConfiguration("bridge_params_file").perform(context), bridge_overrides],
                arguments=["--ros-args", "--log-level", log_level],
            )
        )
    return nodes


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "params_file",
                default_value=PathJoinSubstitution([FindPackageShare("mvreg_ros"), "config", "register.yaml"]),
                description="Parameter file of the node (config/register.yaml, biplane.yaml, mobile_carm.yaml or yours).",
            ),
            DeclareLaunchArgument(
                "volume_path",
                default_value="",
                description="Patient CT (NIfTI, NRRD, MHA or DICOM folder, in HU); empty: the params file's volume_path.",
            ),
            DeclareLaunchArgument(
                "model_path",
                default_value="",
                description="Coarse network checkpoint from `mvreg train` for this CT; empty: the params file's model_path "
                "(none by default).",
            ),
            DeclareLaunchArgument("use_sim_time", default_value="false", description="Use /clock (bag replay)."),
            DeclareLaunchArgument("log_level", default_value="info", description="debug, info, warn, error or fatal."),
            DeclareLaunchArgument(
                "autostart",
                default_value="true",
                description="Configure and activate the lifecycle node at start-up; false: leave it unconfigured "
                "for a supervisor.",
            ),
            DeclareLaunchArgument(
                "with_dicom_bridge",
                default_value="false",
                description="Also start dicom_bridge, which feeds DICOM X-rays to the node (docs/dicom_bridge.md).",
            ),
            DeclareLaunchArgument(
                "bridge_params_file",
                default_value=PathJoinSubstitution([FindPackageShare("mvreg_ros"), "config", "dicom_bridge.yaml"]),
                description="Parameter file of dicom_bridge.",
            ),
            DeclareLaunchArgument(
                "patient_id", default_value="", description="dicom_bridge: Patient ID of the registered patient."
            ),
            OpaqueFunction(function=_register_node),
        ]
    )
