"""Checks of the ``mvreg`` commands' options, run at the top of each command's ``run()`` before
any work: a bad value ends the command with one line on stderr naming the option and what it
allows, and exit status 2 (argparse's own choices and types are checked before that)."""

from __future__ import annotations

import argparse
import math
import re
import sys
import typing
from collections.abc import Mapping

DEVICE_FORMS = "'cpu', 'cuda', 'cuda:N' or 'auto'"


def _available_devices() -> list[str]:
    import torch  # lazily: `mvreg --help` stays fast

    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]


@typing.no_type_check  # validates its own inputs (tests check its errors); no jaxtyping/beartype wrapper
def check_device(text: str, option: str = "--device") -> str:
    """The torch device named by ``text``, checked against this machine: ``cpu``, ``cuda``,
    ``cuda:N`` (only where that CUDA device exists) or ``auto`` (``cuda`` where there is one,
    else ``cpu``). Returns the device to use; raises ValueError naming the bad value, the
    allowed forms and the devices that exist here."""
    if not isinstance(text, str):
        raise TypeError(f"{option} must be a string, got {type(text).__name__}")
    available = _available_devices()
    here = f"this machine has {', '.join(available)}"
    if text == "auto":
        return "cuda" if len(available) > 1 else "cpu"
    if text == "cpu":
        return text
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if m is None:
        raise ValueError(f"{option} must be {DEVICE_FORMS}, got {text!r} ({here})")
    if len(available) == 1:
        import torch

        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"{option} {text!r}: CUDA is not available ({why}); {here}")
    if m.group(1) is not None and f"cuda:{int(m.group(1))}" not in available:
        raise ValueError(f"{option} {text!r}: no such CUDA device; {here}")
    return text


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_number(dest: str, value, bound: float, strict: bool) -> None:
    if value is None:  # an optional option that was not given
        return
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > bound if strict else value >= bound)
    if not ok:
        raise ValueError(f"{_flag(dest)} must be a finite number {'>' if strict else '>='} {bound:g}, got {value!r}")


def check_options(
    args: argparse.Namespace, *, at_least: Mapping[str, float] | None = None, above: Mapping[str, float] | None = None
) -> None:
    """Check a command's parsed options in place: ``device`` (see :func:`check_device`; replaced by
    the device to use) and ``threads`` (>= 1) wherever the command has them, each ``at_least``
    option ``>=`` its bound and each ``above`` option ``>`` its bound. Options the namespace lacks,
    or left at None, are skipped. Raises ValueError naming the first bad option."""
    if getattr(args, "device", None) is not None:
        args.device = check_device(args.device)
    _check_number("threads", getattr(args, "threads", None), 1, strict=False)
    for bounds, strict in ((at_least or {}, False), (above or {}, True)):
        for dest, bound in bounds.items():
            _check_number(dest, getattr(args, dest, None), bound, strict)


def options_ok(command: str, args: argparse.Namespace, **bounds) -> bool:
    """:func:`check_options`, reporting a bad option as one line ``mvreg COMMAND: error: ...`` on
    stderr; False then, and the command returns 2::

        if not options_ok("demo", args, at_least={"downsample": 1}):
            return 2
    """
    try:
        check_options(args, **bounds)
    except (ValueError, TypeError) as e:
        print(f"mvreg {command}: error: {e}", file=sys.stderr)
        return False
    return True
