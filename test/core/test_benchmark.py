"""mvreg bench's measurements on a tiny CT: consistent, positive, ratios as documented."""

import dataclasses

import pytest

from mvreg_ros.core import render_native
from mvreg_ros.core.benchmark import BenchConfig, memory_bandwidth_gbs, run
from mvreg_ros.core.refine import RefineConfig


def test_memory_bandwidth_is_positive():
    assert memory_bandwidth_gbs("cpu", mb=8) > 0.1


@pytest.mark.parametrize("backend", ["grid_sample", pytest.param("native", marks=pytest.mark.skipif(
    render_native.load() is None, reason="the native kernel cannot be built here"))])
def test_bench_run_on_tiny_ct(tiny_ct, backend):
    cfg = BenchConfig(cases=1, reference_cases=1, reference_iterations=2, reference_size=16, render_size=16,
                      render_samples=16, refine=RefineConfig(sizes=(16,), iterations=(3,), n_samples=(16,), patches=(8,),
                                                             uncertainty=False, newton_steps=0, render_backend=backend))
    r = run(tiny_ct, cfg, log=lambda *_: None)
    rr = r["renderer"]
    for name in ("engine", "reference"):
        assert rr[name]["forward_samples_per_s"] > 0 and rr[name]["forward_backward_samples_per_s"] > 0
        assert rr[name]["rays"] == 2 * 16 * 16
    assert rr["engine"]["samples_per_ray"] == 16
    assert rr["engine_backend"] == backend  # as configured in cfg.refine
    if rr["engine_backend"] == "native":  # the compiled backend is measured beside it
        assert rr["engine_compiled"]["rays"] == rr["engine"]["rays"]
        assert rr["engine_native_isa"] in ("avx512", "avx2", "scalar")
    bounds = (rr["bandwidth_bound_samples_per_s"], rr["read_bandwidth_bound_samples_per_s"])
    assert rr["engine_forward_times_from_bound"] == pytest.approx(max(bounds) / rr["engine"]["forward_samples_per_s"])
    assert rr["bandwidth_bound_samples_per_s"] == pytest.approx(rr["memory_bandwidth_gbs"] * 1e9 / 32)
    assert rr["read_bandwidth_bound_samples_per_s"] == pytest.approx(rr["memory_read_bandwidth_gbs"] * 1e9 / 32)
    assert r["refine"]["n"] == 1 and r["reference_refine"]["n"] == 1
    assert r["refine_speedup"] == pytest.approx(r["reference_refine"]["time_s"] / r["refine"]["time_s"])
    assert r["coarse_ms_per_set"] is None  # no model given
    assert r["peak_memory_mb"] > 0
    assert set(r["refine"]) >= {"time_s", "median_mtre_mm"}


def test_bench_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        BenchConfig().cases = 3
