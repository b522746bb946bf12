"""What the end-to-end benchmarks (`bench.delivery`, `bench.payments`) run: the
arguments they share, and one run per database and `serve --workers` count."""

import argparse
import sys
from pathlib import Path


def add_arguments(
    parser: argparse.ArgumentParser, *, out: str, drain: float, concurrency: int
) -> None:
    parser.add_argument("--seconds", type=float, default=20.0, help="sustained phase (≥ 20)")
    parser.add_argument(
        "--concurrency", type=int, default=concurrency, help="clients in the sustained phase"
    )
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument(
        "--workers",
        default="1,2",
        help="`serve --workers N` counts to run, comma-separated (each on each database)",
    )
    parser.add_argument("--drain", type=float, default=drain, help="max wait after the load")
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument(
        "--server-python",
        default=sys.executable,
        help="the interpreter that runs `serve` (default: this one), e.g. that of a venv "
        "with the server extra only, as an operator installs it (see bench/README.md)",
    )


def planned(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple[str, int]]:
    """(database, workers) for every run asked for; a bad argument ends in parser.error."""
    kinds = [k.strip() for k in args.databases.split(",") if k.strip()]
    for kind in kinds:
        if kind not in ("sqlite", "postgresql"):
            parser.error(f"unknown database {kind!r}")
    try:
        counts = [int(n) for n in args.workers.split(",") if n.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        parser.error(f"--workers: expected counts like 1,2, got {args.workers!r}")
    return [(kind, workers) for kind in kinds for workers in counts]


def label(kind: str, workers: int) -> str:
    return kind if workers == 1 else f"{kind} x{workers}"
