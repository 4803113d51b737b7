"""``mvreg precompile``: which settings it compiles for (the run itself: test_precompile.py)."""

import argparse
from pathlib import Path

from mvreg_ros.cli import precompile as cli
from mvreg_ros.cli.main import main
from mvreg_ros.core.registration.pipeline import PipelineConfig
from mvreg_ros.core.registration.refine import RefineConfig

CONFIG = Path(__file__).resolve().parents[2] / "config"


def _args(**kw):
    ns = argparse.Namespace(params_file=None, node_name="register_node", device=None, no_overlay=False)
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_defaults_are_the_engines():
    s = cli.settings(_args())
    assert s == {"refine": RefineConfig(device="cpu"), "overlay": True}
    assert cli.settings(_args(no_overlay=True))["overlay"] is False


def test_the_shipped_node_configs_need_nothing_beyond_the_defaults():
    """The set-up compiles with the defaults: every shipped node configuration uses the same budgets."""
    for name in ("register.yaml", "biplane.yaml", "mobile_carm.yaml"):
        s = cli.settings(_args(params_file=str(CONFIG / name)))
        assert s["refine"].n_samples == RefineConfig().n_samples, name
        assert s["config"].global_search.n_samples == PipelineConfig().global_search.n_samples, name
        assert s["config"].global_search.rank_samples == PipelineConfig().global_search.rank_samples, name


def test_a_params_file_sets_the_budgets_and_the_overlay(tmp_path):
    f = tmp_path / "node.yaml"
    f.write_text(
        "register_node:\n  ros__parameters:\n    refine_sizes: [32, 64]\n    refine_iterations: [10, 10]\n"
        "    refine_samples: [32, 48]\n    refine_patches: [8, 8]\n    publish_overlay: true\n"
    )
    s = cli.settings(_args(params_file=str(f)))
    assert s["refine"].n_samples == (32, 48) and s["refine"].sizes == (32, 64) and s["overlay"] is True
    assert s["refine"].device == "cpu"
    assert cli.settings(_args(params_file=str(f), no_overlay=True))["overlay"] is False


def test_a_bad_params_file_is_one_line_and_status_2(tmp_path, capsys):
    f = tmp_path / "node.yaml"
    f.write_text("other_node:\n  ros__parameters:\n    refine_samples: [32]\n")
    assert main(["precompile", "--params-file", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mvreg precompile: error:") and "register_node" in err[0]
    assert main(["precompile", "--params-file", str(tmp_path / "missing.yaml")]) == 2
