"""Checks of the acceptance test computed again at recorded final poses.

A check computed from a registration's result (the per-view agreement's probes,
:func:`mvreg_ros.core.registration.acceptance.view_agreement`; restarts around the result; a probe
with another similarity) depends only on the final pose and the views. So such a check can be
judged on recorded ``mvreg eval`` cases, e.g. those of ``scripts/calibrate_acceptance.py``, without
registering again: each case's views are rebuilt from its DeepFluoro-layout file as ``mvreg eval``
builds them (no geometry noise), and its final pose comes from its ``pose_est``.
``scripts/reprobe_acceptance.py`` and ``scripts/acceptance_alternatives.py`` are the commands;
docs/acceptance.md (*Shorter probes*, *Restarts*) uses them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from mvreg_ros.core.data.deepfluoro import DeepFluoroFile, views_from_projections
from mvreg_ros.core.geometry.transforms import T_cam_from_ct_deepfluoro
from mvreg_ros.core.imaging.views import ViewSet
from mvreg_ros.core.registration.acceptance import AcceptanceConfig, disagreeing_views, view_agreement
from mvreg_ros.core.registration.refine import RefineConfig, Registrar

REQUIRED = ("file", "specimen", "views", "pose_est", "registration_success")


def _check(case: dict) -> None:
    missing = [k for k in REQUIRED if k not in case]
    if missing:
        raise ValueError(f"case {case.get('specimen')} {case.get('views')} lacks {missing}: not an `mvreg eval` record")


def default_registrar(refine: RefineConfig) -> Callable[[DeepFluoroFile, str], Registrar]:
    """A registrar of the specimen's CT loaded as ``mvreg eval`` loads it, with ``refine``."""
    return lambda f, specimen: Registrar(f.volume(specimen, with_mask=False), refine)


def at_recorded_poses(
    cases: Sequence[dict],
    *,
    make_registrar: Callable[[DeepFluoroFile, str], Registrar],
    i0: float | None = None,
    select: Callable[[dict], bool] = lambda c: True,
) -> Iterator[tuple[int, Registrar, ViewSet, Tensor]]:
    """For each selected case (in file and specimen groups, one registrar per specimen from
    ``make_registrar``): its index in ``cases``, the registrar, its views as ``mvreg eval`` built
    them (``i0`` as ``mvreg eval --i0``) and its recorded final ``T_ref_from_ct`` (mm)."""
    for case in cases:
        _check(case)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, c in enumerate(cases):
        if select(c):
            groups.setdefault((str(c["file"]), str(c["specimen"])), []).append(i)
    for (path, specimen), indices in groups.items():
        with DeepFluoroFile(path) as f:
            registrar = make_registrar(f, specimen)
            for i in indices:
                c = cases[i]
                views, _ = views_from_projections([f.projection(specimen, k) for k in c["views"]], i0=i0)
                T_ref_from_ct = T_cam_from_ct_deepfluoro(f.extrinsic, torch.tensor(c["pose_est"], dtype=torch.float64))
                yield i, registrar, views, T_ref_from_ct


def reprobe(
    cases: Sequence[dict],
    *,
    iterations: int,
    step_scale: float = 1.0,
    refine: RefineConfig = RefineConfig(),
    i0: float | None = None,
) -> list[dict]:
    """Copies of ``cases`` with ``view_shift_mm`` and ``view_gain`` recomputed by probes of
    ``iterations`` steps (first steps ``step_scale`` times the finest level's, as
    ``AcceptanceConfig.agreement_step_scale``) at each case's recorded final pose (``pose_est``), with a
    registrar built from ``refine`` (the settings the cases were registered with). A case without probes
    (its refinement failed, so none ran) is copied unchanged. ``i0``: as ``mvreg eval --i0``."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    out = [dict(c) for c in cases]
    probed = at_recorded_poses(
        cases,
        make_registrar=default_registrar(refine),
        i0=i0,
        select=lambda c: bool(c["registration_success"] and c.get("view_shift_mm")),
    )
    for i, registrar, views, T_ref_from_ct in probed:
        out[i]["view_shift_mm"], out[i]["view_gain"] = view_agreement(
            registrar, views, T_ref_from_ct, iterations=iterations, step_scale=step_scale
        )
    return out


def agreement_flags(cases: Sequence[dict], config: AcceptanceConfig = AcceptanceConfig()) -> dict:
    """How many of the cases with probes the per-view agreement flags by itself (a view beyond both
    ``max_view_shift_mm`` and ``max_view_gain``), among the wrong and the correct results: the
    check's own power, which the final verdicts hide when another check rejects the same cases."""
    counts = {"wrong": 0, "wrong_flagged": 0, "correct": 0, "correct_flagged": 0}
    for c in cases:
        if not c.get("view_shift_mm"):
            continue
        key = "correct" if c["success"] else "wrong"
        counts[key] += 1
        counts[f"{key}_flagged"] += bool(disagreeing_views(c["view_shift_mm"], c["view_gain"], config))
    return counts
