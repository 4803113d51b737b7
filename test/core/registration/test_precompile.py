"""Kernels compiled ahead of time on a phantom serve any CT; the compile cache's folder."""

import os

import pytest
import torch

from mvreg_ros.core.data.simulate import make_scene
from mvreg_ros.core.geometry import transforms as geometry
from mvreg_ros.core.registration.acceptance import AcceptanceConfig
from mvreg_ros.core.registration.global_search import GlobalConfig
from mvreg_ros.core.registration.initialisers import Start
from mvreg_ros.core.registration.pipeline import PipelineConfig
from mvreg_ros.core.registration.precompile import PHANTOM_SHAPE_IJK, exercise, phantom_volume, precompile
from mvreg_ros.core.registration.refine import RefineConfig, Registrar
from mvreg_ros.core.rendering.renderer import Renderer, compile_cache_counts, compile_cache_dir

# the sample counts of the other registration tests (their kernels are compiled anyway); short budgets
REFINE = RefineConfig(sizes=(24, 32), iterations=(3, 3), n_samples=(48, 64), patches=(8, 8))
PIPELINE = PipelineConfig(
    global_search=GlobalConfig(candidates=6, keep=2, iterations=3, rank_size=32),
    acceptance=AcceptanceConfig(agreement_iterations=3),
)


def test_phantom_has_distinct_sides_and_bone():
    v = phantom_volume()
    assert v.shape_ijk == PHANTOM_SHAPE_IJK
    assert len(set(v.shape_ijk)) == 3  # a kernel compiled on it cannot assume two equal sides
    assert float(v.data.max()) > 0.04 and float(v.data.min()) == 0.0  # bone inside soft tissue inside air
    # the phantom's views show it: a line integral through the middle is long, one beside it is zero
    scene = make_scene(v.centre_ct(), [(0.0, 0.0)])
    drr = Renderer(v, backend="grid_sample")(scene.T_cam_from_ct, scene.K, scene.height, scene.width)
    assert float(drr[0, scene.height // 2, scene.width // 2]) > 1.0 and float(drr[0, 0, 0]) == 0.0


def test_a_ct_registered_after_precompile_compiles_nothing(tiny_ct):
    report = precompile(PIPELINE, refine=REFINE, overlay=False, size=32)
    assert report.time_s > 0 and report.compiled >= 0 and report.loaded >= 0
    assert set(report.parts) >= {"registration", "agreement"}
    assert report.cache_dir == str(compile_cache_dir())
    # another CT (other sizes), other image sizes, three views: every kernel is already there
    before = compile_cache_counts()
    registrar = Registrar(tiny_ct, REFINE)
    scene = make_scene(registrar.centre_ct, [(0.0, 0.0), (60.0, 0.0), (90.0, 10.0)])
    views = scene.views(Renderer(registrar.volume, backend="grid_sample"), generator=torch.Generator().manual_seed(1))
    T = geometry.perturb(
        scene.T_ref_from_ct, rot_deg=3, trans_mm=5, centre_ct=registrar.centre_ct, generator=torch.Generator()
    )
    outcome, parts = exercise(registrar, views, [Start(T_ref_from_ct=T, source="test")], PIPELINE)
    assert outcome is not None and outcome.result is not None and "registration" in parts
    assert compile_cache_counts() == before  # neither compiled nor loaded: the phantom's kernels served


@pytest.mark.parametrize("bad", [0, True, 1.5])
def test_precompile_rejects_bad_view_counts(bad):
    with pytest.raises(ValueError, match="views"):
        precompile(views=bad)


def test_compile_cache_dir_is_persistent_unless_set(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = compile_cache_dir()
    assert path == tmp_path / "xdg" / "mvreg_ros" / "torchinductor" and path.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)  # torch reads it from there
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"  # the user's choice stays
    # importing Dynamo sets torch's default (under the temporary directory): that counts as unset
    import torch._inductor.runtime.cache_dir_utils as torch_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", torch_cache.default_cache_dir())
    assert compile_cache_dir() == path and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
