"""Plots and one summary table for every figure of the README, from the JSON files that
scripts/reproduce_figures.sh writes into a report folder (default out/report). A part whose JSON
is missing is skipped with a note. Usage: python scripts/report_plots.py [REPORT_DIR]"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mvreg_ros.core.evaluation import stats


def _load(path: Path) -> dict | None:
    if not path.exists():
        print(f"[report] skipped: {path} not found")
        return None
    return json.loads(path.read_text())


def accuracy(report: Path, lines: list[str]) -> None:
    runs = {v: _load(report / "accuracy" / f"eval_{v}view.json") for v in (1, 2, 3)}
    runs = {v: r for v, r in runs.items() if r is not None}
    if not runs:
        return
    lines += [
        "## Accuracy: 1, 2 and 3 views (out/report/accuracy)",
        "",
        "| views | sets | mTRE median | mean | p95 | mPD median | success | accepted | false acceptances | time median |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for v, r in runs.items():
        s = r["summary"]
        errs = [c["mtre_mm"] for c in r["cases"]]
        lines.append(
            f"| {v} | {s['n']} | {s['mtre_mm']['median']:.2f} mm | {s['mtre_mm']['mean']:.2f} mm | "
            f"{s['mtre_mm']['p95']:.2f} mm | {s['mpd_mm']['median']:.2f} mm | {100 * s['success_rate']:.1f} % | "
            f"{s['accepted']} | {s['false_acceptances']} | {s['time_s']['median']:.2f} s |"
        )
        ax.hist(errs, bins=[0.05 * 1.25**k for k in range(30)], histtype="step", label=f"{v} view(s)", linewidth=1.5)
    ax.set_xscale("log")
    ax.axvline(2.0, color="grey", linestyle=":", label="success threshold")
    ax.set_xlabel("mTRE (mm)")
    ax.set_ylabel("view sets")
    ax.legend()
    ax.set_title("Registration error by number of views")
    fig.tight_layout()
    fig.savefig(report / "accuracy_errors.png", dpi=120)
    plt.close(fig)
    lines += ["", f"landmarks: {next(iter(runs.values())).get('landmarks')}", ""]
    net = _load(report / "accuracy" / "eval_2view_network.json")
    if net is not None:
        coarse = [c["coarse_mtre_mm"] for c in net["cases"]]
        refined = [c["mtre_mm"] for c in net["cases"]]
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.scatter(coarse, refined, s=14)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(2.0, color="grey", linestyle=":")
        ax.set_xlabel("coarse network mTRE (mm)")
        ax.set_ylabel("after registration mTRE (mm)")
        ax.set_title("Coarse versus refined (2 views)")
        fig.tight_layout()
        fig.savefig(report / "coarse_vs_refined.png", dpi=120)
        plt.close(fig)
        s = net["summary"]
        lines += [
            f"Both stages, no starting pose (2 views): coarse median {stats.median(coarse):.2f} mm, "
            f"registered median {stats.median(refined):.2f} mm, success {100 * s['success_rate']:.1f} %, "
            f"accepted {s['accepted']}, false acceptances {s['false_acceptances']}",
            "",
        ]


def speed(report: Path, lines: list[str]) -> None:
    b = _load(report / "speed" / "bench.json")
    if b is None:
        return
    eng, ref = b["refine"], b["reference_refine"]
    r = b["renderer"]
    lines += [
        "## Speed (out/report/speed/bench.json)",
        "",
        f"- device {b['device']}, {b['torch_threads']} threads, landmarks {b.get('landmarks')}",
        f"- 2-view refinement from 10/20: engine {eng['time_s']:.2f} s (mTRE {eng['median_mtre_mm']:.2f} mm), "
        f"reference {ref['time_s']:.1f} s (mTRE {ref['median_mtre_mm']:.2f} mm), {b['refine_speedup']:.0f}x",
        f"- full registration from 15/30 (global stage, refinement, acceptance): {b['pipeline']['time_s']:.2f} s, "
        f"mTRE median {b['pipeline']['median_mtre_mm']:.2f} mm, false acceptances {b['pipeline'].get('false_acceptances')}",
        f"- renderer: {json.dumps(r)[:400]}",
        f"- coarse network per set: {b.get('coarse_ms_per_set')} ms; peak memory {b.get('peak_memory_mb'):.0f} MB",
        "",
    ]
    fig, ax = plt.subplots(figsize=(5, 3))
    names = ["engine", "reference (DiffDRR Siddon)"]
    ax.barh(names, [eng["time_s"], ref["time_s"]], color=["tab:blue", "tab:grey"])
    ax.set_xscale("log")
    ax.set_xlabel("median seconds per 2-view refinement (log)")
    ax.set_title(f"Refinement time: {b['refine_speedup']:.0f}x faster")
    fig.tight_layout()
    fig.savefig(report / "speed.png", dpi=120)
    plt.close(fig)


def capture_range(report: Path, lines: list[str]) -> None:
    found = False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for path in sorted((report / "stress").glob("report_*.json")):
        d = json.loads(path.read_text())
        profile = path.stem.removeprefix("report_")
        rows = d["offsets"]
        if not found:
            lines += ["## Capture range (out/report/stress)", ""]
            found = True
        lines += [
            f"**{profile}**",
            "",
            "| start offset | sets | success | median mTRE | accepted | false acceptances | false rejections |",
            "|---|---|---|---|---|---|---|",
        ]
        xs, ys = [], []
        for row in rows:
            s = row["summary"]
            lines.append(
                f"| {row['rot_deg']:g} deg / {row['trans_mm']:g} mm | {s['n']} | {100 * s['success_rate']:.0f} % | "
                f"{s['mtre_mm']['median']:.2f} mm | {s['accepted']} | **{s['false_acceptances']}** | "
                f"{s['false_rejections']} |"
            )
            xs.append(row["rot_deg"])
            ys.append(100 * s["success_rate"])
        lines.append("")
        ax.plot(xs, ys, marker="o", label=profile)
    if not found:
        print(f"[report] skipped: no {report / 'stress'}/report_*.json")
        plt.close(fig)
        return
    ax.set_xlabel("starting rotation offset (deg; translation = 2x in mm)")
    ax.set_ylabel("success (%)")
    ax.set_ylim(-5, 105)
    ax.legend()
    ax.set_title("Success against the starting offset")
    fig.tight_layout()
    fig.savefig(report / "capture_range.png", dpi=120)
    plt.close(fig)


def coarse(report: Path, lines: list[str]) -> None:
    meta = _load(report / "coarse" / "main.json")
    if meta is not None:
        hist = meta.get("extra", {}).get("history", [])
        pts = [(h["time_s"] / 60, h["val_median_mtre_mm"]) for h in hist if h.get("val_median_mtre_mm") is not None]
        if pts:
            fig, ax = plt.subplots(figsize=(5, 3))
            ax.plot(*zip(*pts), marker=".")
            ax.set_xlabel("training minutes")
            ax.set_ylabel("validation median mTRE (mm)")
            ax.set_title("Coarse network training curve")
            fig.tight_layout()
            fig.savefig(report / "training_curve.png", dpi=120)
            plt.close(fig)
    for path in sorted((report / "coarse").glob("heldout_*.json")):
        s = json.loads(path.read_text())["summary"]
        lines += [
            f"- {path.name}: {s['n_sets']} sets (seed {s['seed']}), landmarks {s['landmarks']}: coarse median "
            f"{s['coarse_median_mtre_mm']:.2f} mm, registered median {s.get('refined_median_mtre_mm', float('nan')):.2f} mm, "
            f"success {100 * s.get('success_rate', float('nan')):.1f} %, accepted {s.get('accepted')}, "
            f"false acceptances {s.get('false_acceptances')}",
        ]


def main(argv: list[str]) -> int:
    report = Path(argv[0] if argv else "out/report")
    if not report.is_dir():
        print(f"report folder not found: {report}", file=sys.stderr)
        return 2
    lines = ["# Figures (generated by scripts/report_plots.py)", ""]
    for part in (accuracy, speed, capture_range, coarse):
        part(report, lines)
    (report / "figures.md").write_text("\n".join(lines) + "\n")
    print(f"[report] wrote {report / 'figures.md'} and the PNGs beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
