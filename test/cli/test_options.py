"""Every ``mvreg`` command rejects a bad --device or numeric option before any work: exit status 2 and
one line on stderr naming the option and what it allows, no traceback."""

import argparse

import pytest
import torch

from mvreg_ros.cli.main import build_parser, main
from mvreg_ros.cli.options import check_device, check_options


def _no_cuda_here():
    return "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_check_device_on_a_machine_with_two_gpus(two_gpus):
    assert [check_device(d) for d in ("cpu", "cuda", "cuda:0", "cuda:1", "auto")] == [
        "cpu",
        "cuda",
        "cuda:0",
        "cuda:1",
        "cuda",
    ]
    with pytest.raises(
        ValueError, match=r"--device 'cuda:2': no such CUDA device; this machine has cpu, cuda:0, cuda:1"
    ):
        check_device("cuda:2")


def test_check_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device("cpu") == "cpu" and check_device("auto") == "cpu"
    for d in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=rf"--device '{d}': CUDA is not available \(.*\); this machine has cpu$"):
            check_device(d)


@pytest.mark.parametrize("bad", ["gpu", "CPU", "cuda:", "cuda:-1", "cuda:0:1", "mps", ""])
def test_check_device_names_the_allowed_forms(bad):
    with pytest.raises(ValueError, match=r"--device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got " + repr(bad)):
        check_device(bad)


def test_check_device_type():
    with pytest.raises(TypeError, match="--device must be a string, got int"):
        check_device(0)


def test_check_options_bounds_and_skips():
    ns = argparse.Namespace(device="auto", threads=None, size=8, rate=0.5, max_sets=None)
    check_options(ns, at_least={"size": 8, "max_sets": 1, "absent": 3}, above={"rate": 0})
    assert ns.device in ("cpu", "cuda")  # auto resolved
    for change, message in [
        (dict(size=7), "--size must be a finite number >= 8, got 7"),
        (dict(rate=0.0), "--rate must be a finite number > 0, got 0.0"),
        (dict(rate=float("nan")), "--rate must be a finite number > 0, got nan"),
        (dict(rate=float("inf")), "--rate must be a finite number > 0, got inf"),
        (dict(threads=0), "--threads must be a finite number >= 1, got 0"),
        (dict(max_sets=0), "--max-sets must be a finite number >= 1, got 0"),
    ]:
        bad = argparse.Namespace(**{**vars(ns), **change})
        with pytest.raises(ValueError) as e:
            check_options(bad, at_least={"size": 8, "max_sets": 1}, above={"rate": 0})
        assert str(e.value) == message


def _commands_with_device():
    parser, _ = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(name for name, p in sub.choices.items() if any(a.dest == "device" for a in p._actions))


def _argv(command, tmp_path):
    """A command line that would start real work if its options were not checked first."""
    return {
        "demo": ["demo", "--out", str(tmp_path / "demo")],
        "eval": ["eval", str(tmp_path / "missing.h5")],
        "bench": ["bench", "--cases", "1", "--reference-cases", "1"],
        "train": ["train", "example", "--out", str(tmp_path / "m.safetensors"), "--steps", "1"],
        "simulate": ["simulate", str(tmp_path / "sim.h5"), "--downsample", "8", "--size", "16"],
        "register": ["register", "example:8", str(tmp_path / "x.dcm")],
        "precompile": ["precompile"],
    }[command]


def _one_line_error(capsys, prefix):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


def test_the_device_commands_are_the_expected_ones():
    assert {"demo", "eval", "bench", "train"} <= set(_commands_with_device())


@pytest.mark.parametrize("command", _commands_with_device())
@pytest.mark.parametrize("device", ["gpu", _no_cuda_here()])
def test_bad_device_is_one_line_and_status_2(command, device, tmp_path, capsys):
    assert main(_argv(command, tmp_path) + ["--device", device]) == 2
    line = _one_line_error(capsys, f"mvreg {command}: error: --device")
    assert repr(device) in line and "this machine has cpu" in line
    if device == "gpu":
        assert "'cpu', 'cuda', 'cuda:N' or 'auto'" in line


@pytest.mark.parametrize(
    "argv,prefix",
    [
        (["demo", "--downsample", "0"], "mvreg demo: error: --downsample must be a finite number >= 1, got 0"),
        (["demo", "--perturb-rot-deg", "nan"], "mvreg demo: error: --perturb-rot-deg must be a finite number >= 0"),
        (["eval", "{tmp}/x.h5", "--success-mm", "0"], "mvreg eval: error: --success-mm must be a finite number > 0"),
        (
            ["eval", "{tmp}/x.h5", "--threads", "-2"],
            "mvreg eval: error: --threads must be a finite number >= 1, got -2",
        ),
        (["bench", "--cases", "0"], "mvreg bench: error: --cases must be a finite number >= 1, got 0"),
        (
            ["train", "example", "--out", "{tmp}/m.safetensors", "--minutes", "0"],
            "mvreg train: error: --minutes must be a finite number > 0",
        ),
        (
            ["simulate", "{tmp}/s.h5", "--size", "4"],
            "mvreg simulate: error: --size must be a finite number >= 8, got 4",
        ),
        (
            ["bag", "simulate", "{tmp}/bag", "--period-s", "0"],
            "mvreg bag simulate: error: --period-s must be a finite number > 0",
        ),
        (
            ["bag", "simulate", "{tmp}/bag", "--threads", "0"],
            "mvreg bag simulate: error: --threads must be a finite number >= 1",
        ),
        (
            ["bag", "replay", "{tmp}/bag", "--rate", "-1"],
            "mvreg bag replay: error: --rate must be a finite number > 0, got -1.0",
        ),
    ],
)
def test_bad_number_is_one_line_and_status_2(argv, prefix, tmp_path, capsys):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    _one_line_error(capsys, prefix)
