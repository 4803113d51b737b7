#!/usr/bin/env python3
"""Check 6 of the acceptance test (a stable optimum: `acceptance.second_pass`) at recorded final poses
(docs/acceptance.md, *A second pass*): judges it on recorded cases without registering again.

`run` takes every case that the acceptance test accepts at its defaults without check 6 (the
other checks recomputed from the record, as scripts/acceptance_roc.py does), rebuilds its views from
its DeepFluoro-layout file as `mvreg eval` builds them, runs the second pass from its recorded final
pose with the engine's default RefineConfig and writes the rows (shift, gain, time) to ROWS.json.
`merge` writes the cases of CASES.json with `confirm_shift_mm` / `confirm_gain` from ROWS.json to
OUT.json (scripts/acceptance_roc.py reads it; cases without a row keep none, and are judged without
check 6). Both print how many correct and wrong results check 6 flags. Capture-range reports of
`mvreg eval --capture-range --json` are read too (their cases get the report's file and offset).

    .venv/bin/python scripts/second_pass_acceptance.py run ROWS.json CASES.json [CASES.json ...]
    .venv/bin/python scripts/second_pass_acceptance.py merge OUT.json ROWS.json CASES.json [CASES.json ...]
"""

import json
import sys
import time

from mvreg_ros.core.evaluation.evaluate import write_json
from mvreg_ros.core.evaluation.reprobe import at_recorded_poses, default_registrar
from mvreg_ros.core.evaluation.roc import accepts, default_curvature_scale
from mvreg_ros.core.registration.acceptance import AcceptanceConfig, second_pass, unstable_optimum
from mvreg_ros.core.registration.refine import RefineConfig


def load_cases(paths: list[str]) -> list[dict]:
    """The cases of calibration records (``cases``) and of capture-range reports (``reports``)."""
    cases = []
    for p in paths:
        d = json.loads(open(p).read())
        if "reports" in d:
            for offset, report in zip(d["offsets"], d["reports"]):
                off = [offset["rot_deg"], offset["trans_mm"]] if isinstance(offset, dict) else offset
                cases += [dict(c, file=report["file"], offset=off, _from=p) for c in report["cases"]]
        else:
            cases += [dict(c, _from=p) for c in d["cases"]]
    return cases


def key(c: dict) -> tuple:
    return (str(c["file"]), str(c["specimen"]), tuple(c["views"]), tuple(c.get("offset") or ()))


def summary(rows: list[dict], config: AcceptanceConfig = AcceptanceConfig()) -> str:
    def flagged(r):
        return unstable_optimum(r["shift_mm"], r["gain"], config)

    ok = [r for r in rows if r["success"]]
    bad = [r for r in rows if not r["success"]]
    return (
        f"check 6 at shift > {config.max_confirm_shift_mm} mm and gain > {config.max_confirm_gain}: flags "
        f"{sum(map(flagged, bad))} of {len(bad)} wrong and {sum(map(flagged, ok))} of {len(ok)} correct results "
        "that the other checks accept"
    )


def run(out: str, paths: list[str]) -> int:
    cases = load_cases(paths)
    config, scale = AcceptanceConfig(confirm=False), default_curvature_scale()  # the other checks only
    rows = []
    for i, registrar, views, T in at_recorded_poses(
        cases,
        make_registrar=default_registrar(RefineConfig()),
        select=lambda c: accepts(c, config, max_curvature_scale=scale),
    ):
        c = cases[i]
        t = time.perf_counter()
        p = second_pass(registrar, views, T)
        rows.append(
            dict(
                file=c["file"],
                specimen=c["specimen"],
                views=c["views"],
                offset=c.get("offset"),
                success=c["success"],
                mtre_mm=c["mtre_mm"],
                shift_mm=p.shift_mm,
                gain=p.gain,
                time_s=time.perf_counter() - t,
                source=c["_from"],
            )
        )
        print(
            len(rows), f"{p.shift_mm:.3f} mm, gain {p.gain:.5f}, {'correct' if c['success'] else 'WRONG'}", flush=True
        )
    write_json({"rows": rows, "from": paths}, out)
    print(summary(rows))
    return 0


def merge(out: str, rows_path: str, paths: list[str]) -> int:
    rows = {key(r): r for r in json.loads(open(rows_path).read())["rows"]}
    cases = load_cases(paths)
    merged = []
    for c in cases:
        r = rows.get(key(c))
        c = {k: v for k, v in c.items() if k != "_from"}
        if r is not None:
            c.update(confirm_shift_mm=r["shift_mm"], confirm_gain=r["gain"])
        merged.append(c)
    write_json({"cases": merged, "rows": rows_path, "from": paths}, out)
    mine = [r for c in cases if (r := rows.get(key(c))) is not None]
    print(f"{len(mine)} of {len(cases)} cases with check 6; " + summary(mine))
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "run":
        sys.exit(run(sys.argv[2], sys.argv[3:]))
    if len(sys.argv) >= 5 and sys.argv[1] == "merge":
        sys.exit(merge(sys.argv[2], sys.argv[3], sys.argv[4:]))
    sys.exit(__doc__)
