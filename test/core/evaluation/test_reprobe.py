"""Per-view agreement probes recomputed at recorded final poses (scripts/reprobe_acceptance.py)."""

import pytest

from mvreg_ros.core.evaluation import evaluate as ev
from mvreg_ros.core.evaluation.reprobe import agreement_flags, reprobe
from mvreg_ros.core.registration.acceptance import AcceptanceConfig
from mvreg_ros.core.registration.refine import RefineConfig

QUICK = RefineConfig(sizes=(32,), iterations=(40,), n_samples=(48,), patches=(8,))


@pytest.fixture(scope="module")
def recorded(tiny_file):
    report = ev.run(tiny_file, ev.EvalConfig(refine=QUICK, perturb_rot_deg=5.0, perturb_trans_mm=10.0, seed=1))
    for c in report["cases"]:  # mvreg eval records no file per case; scripts/calibrate_acceptance.py adds it
        c["file"] = str(tiny_file)
    return report["cases"]


def test_the_recorded_probes_are_recomputed_exactly(recorded):
    """At the recorded final pose, probes of the recorded length give the recorded values: the views
    and the pose are rebuilt as ``mvreg eval`` built them."""
    probed = [c for c in recorded if c["view_shift_mm"]]
    assert probed, "no case reached the per-view agreement"
    again = reprobe(recorded, iterations=AcceptanceConfig().agreement_iterations, refine=QUICK)
    assert len(again) == len(recorded)
    for old, new in zip(recorded, again):
        assert new["view_shift_mm"] == pytest.approx(old["view_shift_mm"], abs=1e-6)
        assert new["view_gain"] == pytest.approx(old["view_gain"], abs=1e-7)
        assert {k: v for k, v in new.items() if not k.startswith("view_")} == {
            k: v for k, v in old.items() if not k.startswith("view_")
        }


def test_another_length_changes_only_the_probes(recorded):
    again = reprobe(recorded, iterations=1, refine=QUICK)
    for old, new in zip(recorded, again):
        assert len(new["view_shift_mm"]) == len(old["view_shift_mm"])
        assert new["pose_est"] == old["pose_est"] and new["success"] == old["success"]
        # one step from the optimum: the shift is the first Adam step's, never more than ~2 mm at the anatomy
        assert all(0 <= s < 5 for s in new["view_shift_mm"])
    assert recorded[0]["view_shift_mm"] is not again[0]["view_shift_mm"]  # copies, the input is kept


def test_a_step_scale_reaches_the_probes(recorded):
    """reprobe's step_scale is the probes' (AcceptanceConfig.agreement_step_scale): at a quarter of the
    finest level's first steps the recomputed probes differ from the recorded ones (full steps), and
    nothing else of a case changes."""
    again = reprobe(recorded, iterations=AcceptanceConfig().agreement_iterations, step_scale=0.25, refine=QUICK)
    probed = [(old, new) for old, new in zip(recorded, again) if old["view_shift_mm"]]
    assert probed
    assert any(new["view_shift_mm"] != pytest.approx(old["view_shift_mm"], abs=1e-6) for old, new in probed)
    for old, new in zip(recorded, again):
        assert all(g >= 0 for g in new["view_gain"])  # the best iterate is kept
        assert {k: v for k, v in new.items() if not k.startswith("view_")} == {
            k: v for k, v in old.items() if not k.startswith("view_")
        }


def test_cases_without_probes_are_copied_and_bad_records_refused(recorded):
    failed = dict(recorded[0], registration_success=False, view_shift_mm=[], view_gain=[], file="/nonexistent.h5")
    assert reprobe([failed], iterations=3) == [failed]  # nothing to probe: the file is not even opened
    with pytest.raises(ValueError, match="pose_est"):
        reprobe([{k: v for k, v in recorded[0].items() if k != "pose_est"}], iterations=3)
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="iterations"):
            reprobe(recorded, iterations=bad)


def test_agreement_flags_counts_what_the_check_flags_alone():
    cfg = AcceptanceConfig(max_view_shift_mm=1.0, max_view_gain=0.01)
    cases = [
        {"success": False, "view_shift_mm": [2.0, 0.1], "view_gain": [0.02, 0.0]},  # flagged: both exceeded
        {"success": False, "view_shift_mm": [2.0, 0.1], "view_gain": [0.005, 0.0]},  # shift alone: not
        {"success": True, "view_shift_mm": [0.5, 0.5], "view_gain": [0.05, 0.05]},  # gain alone: not
        {"success": True, "view_shift_mm": [0.0, 3.0], "view_gain": [0.0, 0.011]},  # flagged
        {"success": False, "view_shift_mm": [], "view_gain": []},  # no probes: not counted
    ]
    assert agreement_flags(cases, cfg) == {"wrong": 2, "wrong_flagged": 1, "correct": 2, "correct_flagged": 1}
