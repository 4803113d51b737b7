from glob import glob

from setuptools import find_packages, setup

package_name = "mvreg_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    package_data={"mvreg_ros.core.rendering": ["csrc/*.cpp"]},
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        ("share/" + package_name + "/config", glob("config/*.yaml") + glob("config/*.rviz") + glob("config/*.json")),
    ],
    install_requires=["setuptools"],
    zip_safe=False,
    maintainer="mvreg_ros maintainers",
    maintainer_email="maintainers@mvreg-ros.org",
    description="Multi-view 2D/3D CT to X-ray registration with a ROS 2 node publishing the anatomy TF.",
    license="Apache-2.0",
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [
            "mvreg = mvreg_ros.cli.main:main",
            "register_node = mvreg_ros.ros.node:main",
            "dicom_bridge = mvreg_ros.ros.dicom_bridge:main",
        ],
    },
)
