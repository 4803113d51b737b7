"""Start mvreg_ros's DICOM bridge (DICOM X-ray objects in, register_node's inputs out).

    ros2 launch mvreg_ros dicom_bridge.launch.py patient_id:=12345678
    ros2 launch mvreg_ros dicom_bridge.launch.py params_file:=/path/to/bridge.yaml patient_id:=... port:=11113

Arguments: params_file (default: the package's config/dicom_bridge.yaml), patient_id and port
(each overrides the params file's value when not empty), use_sim_time, log_level.
Parameters, security rules and stamps: docs/dicom_bridge.md.
"""

from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import evaluate_condition_expression
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription


def _bridge(context):
    overrides = {"use_sim_time": evaluate_condition_expression(context, [LaunchConfiguration("use_sim_time")])}
    patient_id = LaunchConfiguration("patient_id").perform(context)
    if patient_id:
        overrides["patient_id"] = patient_id
    port = LaunchConfiguration("port").perform(context).strip()
    if port:
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"port must be an integer in 1..65535, got {port!r}")
        overrides["port"] = int(port)
    return [
        Node(
            package="mvreg_ros",
            executable="dicom_bridge",
            name="dicom_bridge",
            namespace="",
            output="screen",
            emulate_tty=True,
            parameters=[LaunchConfiguration("params_file").perform(context), overrides],
            arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level").perform(context)],
        )
    ]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "params_file",
                default_value=PathJoinSubstitution([FindPackageShare("mvreg_ros"), "config", "dicom_bridge.yaml"]),
                description="Parameter file of the bridge (config/dicom_bridge.yaml or yours).",
            ),
            DeclareLaunchArgument(
                "patient_id", default_value="", description="Patient ID of the registered patient (required)."
            ),
            DeclareLaunchArgument("port", default_value="", description="Storage SCP port; empty: the params file's."),
            DeclareLaunchArgument("use_sim_time", default_value="false", description="Use /clock (bag replay)."),
            DeclareLaunchArgument("log_level", default_value="info", description="debug, info, warn, error or fatal."),
            OpaqueFunction(function=_bridge),
        ]
    )
