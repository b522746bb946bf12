"""`insertcoin demo --smoke`: the whole system from a fresh start (server with simulated
payments, embedded broker, three real agents), one purchase made by itself."""

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.support.services import free_port


def test_demo_smoke_makes_one_purchase_and_exits_0(tmp_path: Path) -> None:
    """The smoke run scans a cabinet's pay link, pays on the simulated checkout, sees the
    credit reach the agent (its game starts) and the purchase captured, prints one
    summary line and exits 0 — from an empty working directory, with no configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INSERTCOIN_", "STRIPE_"))}
    done = subprocess.run(
        [sys.executable, "-m", "insertcoin", "demo", "--smoke", "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    assert re.fullmatch(
        r"smoke: paid on Galaga; credit on the cabinet after [0-9.]+ s, game started, "
        r"purchase credited after [0-9.]+ s",
        lines[0],
    ), lines[0]
    assert list(tmp_path.iterdir()) == []  # it leaves nothing behind
