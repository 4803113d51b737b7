"""`mvreg demo` end to end on the shipped CT pooled by 4: registers and writes one overlay per view."""

import re

from PIL import Image

from mvreg_ros.cli.main import main


def test_demo_writes_overlays(tmp_path, capsys):
    rc = main(["demo", "--downsample", "2", "--views", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    # the demo scores its estimate against the simulation's truth: the start is far off, the estimate is not
    start = re.search(r"^start: .*mTRE ([0-9.]+) mm$", out, re.M)
    final = re.search(r"^stage 2 \(refinement\): mTRE ([0-9.]+) mm", out, re.M)
    assert start and final, out
    assert float(start.group(1)) > 15.0, out  # 10 deg / 20 mm from the truth
    # the shipped CT pooled by 2 (5 mm slices) as fast as by 4: 0.51 mm at the 128 px finest level; pooled by 4
    # (10 mm slices) the 128 px level is biased to 2.9 mm (85 px: 1.8 mm), docs/acceptance.md
    assert float(final.group(1)) < 1.5, out
    for i in range(2):
        img = Image.open(tmp_path / f"overlay_view{i}.png")
        assert img.size == (3 * 256, 256) and img.mode == "RGB"


def test_help_lists_every_command(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "eval", "simulate", "bench", "train", "bag", "precompile"):
        assert cmd in out


def test_bench_backend_choices_are_the_renderers():
    import argparse

    from mvreg_ros.cli import bench
    from mvreg_ros.core.rendering.renderer import BACKENDS

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    assert tuple(next(a for a in p._actions if a.dest == "backend").choices) == BACKENDS
