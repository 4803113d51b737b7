"""The soak benchmark's pure parts (mvreg_ros/ros/soak.py): the memory reading and the report."""

import os

import pytest

from mvreg_ros.ros.soak import SoakRecord, rss_kib, soak_budget, soak_summary


def test_rss_of_this_process():
    assert 10_000 < rss_kib(os.getpid()) < 100_000_000


@pytest.mark.parametrize("bad", [0, -1, True, "1"])
def test_bad_pid_is_named(bad):
    with pytest.raises(ValueError, match="pid"):
        rss_kib(bad)


def test_report_counts_growth_latency_and_crashes():
    summary = {
        "n": 3,
        "node_registrations_accepted": 3,
        "node_registrations_rejected": 1,
        "node_inputs_rejected": 5,
        "node_sets_dropped_busy": 2,
        "tf_from_rejected_inputs": 0,
        "tf_messages": 40,
    }
    rec = SoakRecord(rss=[(0.0, 500_000), (5.0, 1_000_000), (6.0, 1_010_000), (9.0, 1_020_000)])
    rec.first_registration_s = 5.0
    rec.exit_code = 0
    r = soak_summary(summary, [1.0, 2.0, 3.0, 4.0], rec, sets=4)
    assert r["registrations"] == 3 and r["registrations_rejected"] == 1 and r["sets_dropped_busy"] == 2
    assert r["rss_growth_pct"] == pytest.approx(2.0) and r["rss_max_mib"] == pytest.approx(1_020_000 / 1024)
    assert r["latency_p50_s"] == pytest.approx(2.5) and r["latency_max_s"] == 4.0
    assert r["crashes"] == 0 and r["tf_from_rejected_inputs"] == 0
    rec.node_alive_at_end, rec.exit_code, rec.raised = False, -9, 1
    assert soak_summary(summary, [], rec, sets=4)["crashes"] == 3
    with pytest.raises(ValueError, match="sets"):
        soak_summary(summary, [], rec, sets=0)


def test_soak_budget_is_one_level_at_the_image_size():
    assert soak_budget(64)["refine_sizes"] == "[64]"
    assert soak_budget(256)["refine_sizes"] == "[96]"  # the default pyramid's finest level at most
    b = soak_budget(64)
    assert b["refine_iterations"] == "[60]" and b["refine_samples"] == "[64]" and b["device"] == "cpu"
    with pytest.raises(ValueError, match="size"):
        soak_budget(4)
