"""Training's held-out evaluation runs the engine's whole registration (network start, global stage,
refinement, acceptance test) and scores it against the truth with the shared landmark policy."""

import dataclasses
import types

import pytest
import torch

from mvreg_ros.core.data.simulate import DetectorConfig
from mvreg_ros.core.geometry.transforms import perturb
from mvreg_ros.core.imaging.volume import load_example_ct
from mvreg_ros.core.learning.coarse import CoarseEstimate
from mvreg_ros.core.learning.heldout import evaluate_heldout, heldout_sets
from mvreg_ros.core.registration.acceptance import AcceptanceConfig
from mvreg_ros.core.registration.global_search import GlobalConfig
from mvreg_ros.core.registration.pipeline import PipelineConfig
from mvreg_ros.core.registration.refine import RefineConfig

QUICK_REFINE = RefineConfig(sizes=(32, 64), iterations=(40, 30), n_samples=(48, 64), patches=(8, 8))
QUICK_PIPELINE = PipelineConfig(
    global_search=GlobalConfig(enabled=False), acceptance=AcceptanceConfig(view_agreement=False)
)


class OracleNetwork:
    """A stand-in for the coarse network: the truth of each held-out set moved by a fixed offset."""

    def __init__(self, sets, centre_ct, *, rot_deg: float, trans_mm: float):
        self.truth = {id(s.views): s.T_ref_from_ct for s in sets}
        self.centre_ct = centre_ct
        self.offset = (rot_deg, trans_mm)
        self.metadata = {}
        self.geometry = types.SimpleNamespace(centre_ct=tuple(float(x) for x in centre_ct))

    def predict(self, views):
        g = torch.Generator().manual_seed(0)
        T = perturb(
            self.truth[id(views)],
            rot_deg=self.offset[0],
            trans_mm=self.offset[1],
            centre_ct=self.centre_ct,
            generator=g,
        )
        V = len(views.images)
        return CoarseEstimate(
            T_ref_from_ct=T,
            T_cam_from_ct=T[None].expand(V, 4, 4),
            T_ref_from_ct_views=T[None].expand(V, 4, 4),
            inliers=torch.ones(V, dtype=torch.bool),
            ms=0.1,
        )


@pytest.fixture(scope="module")
def ct():
    return load_example_ct(downsample=4)


@pytest.fixture(scope="module")
def sets(ct):
    det = DetectorConfig(height=128, width=128, pixel_mm=2.328)
    return heldout_sets(ct, centre_ct=ct.bone_centre_ct(), n_sets=2, seed=5, detector=det)


def test_heldout_reports_the_pipelines_errors_against_the_truth(ct, sets):
    net = OracleNetwork(sets, ct.bone_centre_ct(), rot_deg=3.0, trans_mm=6.0)
    r = evaluate_heldout(
        net, ct, sets=sets, refine_config=QUICK_REFINE, pipeline_config=QUICK_PIPELINE, log=lambda s: None
    )
    s = r["summary"]
    assert s["landmarks"]["policy"] == "structure-centroids" and s["landmarks"]["count"] >= 4
    assert s["n_sets"] == 2 and all(row["stages"] == ["local"] for row in r["rows"])
    # the coarse error is the oracle's offset; the registration brings it well below
    assert all(row["coarse_mtre_mm"] > 4.0 for row in r["rows"])
    assert all(row["mtre_mm"] < 0.4 * row["coarse_mtre_mm"] for row in r["rows"]), r["rows"]
    assert s["refined_median_mtre_mm"] < s["coarse_median_mtre_mm"]
    assert s["false_acceptances"] == sum(row["accepted"] and not row["success"] for row in r["rows"])


def test_heldout_counts_an_accepted_result_above_the_threshold_as_a_false_acceptance(ct, sets):
    net = OracleNetwork(sets, ct.bone_centre_ct(), rot_deg=3.0, trans_mm=6.0)
    lenient = dataclasses.replace(
        QUICK_PIPELINE,
        acceptance=dataclasses.replace(QUICK_PIPELINE.acceptance, min_view_similarity=-1.0, max_uncertainty_mm=1e9),
    )
    r = evaluate_heldout(
        net,
        ct,
        sets=sets,
        refine_config=QUICK_REFINE,
        pipeline_config=lenient,
        success_mm=1e-6,  # nothing succeeds, so every acceptance is a false one
        log=lambda s: None,
    )
    s = r["summary"]
    assert s["success_rate"] == 0.0
    assert s["accepted"] == s["false_acceptances"] == sum(row["accepted"] for row in r["rows"])
    assert s["accepted"] >= 1
