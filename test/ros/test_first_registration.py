"""Measurement, not a check (skipped unless MVREG_MEASURE_FIRST_REGISTRATION=1): the first
registration after activate against a warm one, with and without the configure-time warm-up,
each node on a fresh compile cache (empty TORCHINDUCTOR_CACHE_DIR and TORCH_EXTENSIONS_DIR).

    MVREG_MEASURE_FIRST_REGISTRATION=1 .venv/bin/python -m pytest -q -s test/ros/test_first_registration.py

prints one line per case: configure time (warm-up included), warm-up time, and the engine's
time_s of the first and the second registration, and of a warm full registration (``~/register_now``:
the same stages as the first, global stage and refinement) as the like-for-like reference
(docs/node.md, *Lifecycle*)."""

import os
import time

import pytest

pytest.importorskip("rclpy")
pytest.importorskip("tf2_msgs.msg")
if os.environ.get("MVREG_MEASURE_FIRST_REGISTRATION") != "1":
    pytest.skip("a measurement: set MVREG_MEASURE_FIRST_REGISTRATION=1", allow_module_level=True)

from node_harness import register_good_set, start_node
from ros_harness import wait_until


@pytest.mark.parametrize("warmup", [True, False])
def test_first_registration_after_activate(ros_env, ros_context, tmp_path, warmup):
    env = dict(
        ros_env,
        TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
        TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"),
    )
    h = start_node(ros_context, env, tmp_path / "node", extra={"autostart": False, "warmup": warmup}, wait=False)
    try:
        t0 = time.monotonic()
        assert h.transition("configure", timeout=600)
        configure_s = time.monotonic() - t0
        configured = [s for s in h.statuses_since(0, "configured")]
        assert h.transition("activate")
        h.wait_matched()
        times, stages = [], []
        for _ in range(2):
            _, st = register_good_set(h)
            times.append(float(st["time_s"]))
            stages.append(st.get("stages", "?"))
        # the first registration starts from the configured pose (global stage + refinement), the
        # second tracks (refinement only): the like-for-like warm reference is a full registration
        # of the newest set again (~/register_now: global stage + refinement, nothing to compile)
        start = h.count("statuses")
        assert h.trigger("register_now").success
        full = wait_until(
            lambda: [s for s in h.statuses_since(start, "registered") if s.get("full") == "True"],
            90,
            what="the full registration",
        )[0]
        warm = configured[0].get("warmup_s", "-") if configured else "?"
        print(
            f"\nwarmup={warmup}: configure {configure_s:.1f} s (warm-up {warm} s); "
            f"first registration {times[0]:.2f} s ({stages[0]}), second {times[1]:.2f} s ({stages[1]}), "
            f"warm full registration {float(full['time_s']):.2f} s ({full.get('stages')}): first / warm full "
            f"{times[0] / float(full['time_s']):.2f}"
        )
    finally:
        h.close()
