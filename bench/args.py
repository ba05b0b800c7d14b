"""What the bench's commands share: where results go, serve's flags from the command line, SIGTERM."""

from __future__ import annotations

import argparse

from .runner import REPO_DIR

DEFAULT_RESULTS_DIR = REPO_DIR / "bench" / "results"


def serve_flags(args: argparse.Namespace) -> dict:
    """serve's flags: --max-inflight, --batch-size and every --serve-arg FLAG=VALUE."""
    flags = {"max_inflight": getattr(args, "max_inflight", None), "batch_size": getattr(args, "batch_size", None)}
    for item in args.serve_arg:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--serve-arg {item!r}: expected FLAG=VALUE")
        flags[name.lstrip("-").replace("-", "_")] = value
    return {name: value for name, value in flags.items() if value is not None}


def raise_interrupt(signo, frame) -> None:
    """SIGTERM as Ctrl-C: the finally blocks stop every process the bench started."""
    raise KeyboardInterrupt(f"signal {signo}")
