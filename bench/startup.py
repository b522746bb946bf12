"""Start-up benchmark: `python -m insertcoin serve` → first `GET /status` 200.

    uv run python -m bench.startup [--runs 5] [--out bench/results/startup.json]

Median of `--runs` starts on a fresh SQLite file (migrations run) and on an
already-migrated one, against a private Mosquitto (`/status` is 200 only once the broker
is connected). Baselines in the same run: `python -c pass` and
`python -c "import fastapi"`. Everything is measured twice: without bytecode caches (as
this environment runs: PYTHONDONTWRITEBYTECODE=1 and no __pycache__ in the venv, so
every start compiles every module), and with a warm private bytecode cache
(PYTHONPYCACHEPREFIX), as an installed wheel or a Lambda package with .pyc files runs.
Finally `python -X importtime` lists the 15 imports that cost the most, cumulatively, in
`import insertcoin.server.app, insertcoin.server.runtime` and during a real `serve`.
"""

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.services import free_port

from bench.services import SERVER_ENV, http_status, mosquitto
from bench.stats import table

TARGET_SECONDS = 0.6
APP_IMPORTS = "import insertcoin.server.app, insertcoin.server.runtime"


def _env(cache: Path | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    if cache is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    else:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(cache)
    return env


def _time_command(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _serve_env(db: Path, broker_url: str, cache: Path | None) -> dict[str, str]:
    return _env(
        cache,
        {
            **SERVER_ENV,
            "INSERTCOIN_DATABASE_URL": f"sqlite:///{db}",
            "INSERTCOIN_MQTT_URL": broker_url,
            "INSERTCOIN_LOG_LEVEL": "warning",
        },
    )


def _time_serve(db: Path, broker_url: str, cache: Path | None, importtime: bool = False) -> Any:
    """Seconds from spawning `serve` to the first /status 200 (and, with importtime, the
    child's `-X importtime` lines)."""
    port = free_port()
    command = [sys.executable, "-m", "insertcoin", "serve", "--port", str(port)]
    if importtime:
        command[1:1] = ["-X", "importtime"]
    errors = db.parent / "stderr.txt"
    start = time.perf_counter()
    with errors.open("wb") as sink:
        process = subprocess.Popen(
            command,
            env=_serve_env(db, broker_url, cache),
            cwd=db.parent,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        while http_status(port, timeout=1.0) != 200:
            if process.poll() is not None:
                raise RuntimeError(f"serve exited with {process.returncode}")
            if time.perf_counter() - start > 60:
                raise RuntimeError("serve did not answer /status 200 within 60 s")
            time.sleep(0.002)
        elapsed = time.perf_counter() - start
    finally:
        process.terminate()
        process.wait(15)
    if importtime:
        return elapsed, errors.read_text(errors="replace")
    return elapsed


def _migrated_template(workdir: Path, broker_url: str, cache: Path | None) -> Path:
    """A database migrated by `insertcoin db upgrade` (a process that exits cleanly, so
    the WAL is checkpointed into the file), checked to be at a revision."""
    template = workdir / f"template-{'c' if cache else 'n'}" / "insertcoin.db"
    template.parent.mkdir()
    subprocess.run(
        [sys.executable, "-m", "insertcoin", "db", "upgrade"],
        env=_serve_env(template, broker_url, cache),
        cwd=template.parent,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    with sqlite3.connect(template) as conn:
        (revision,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    assert revision, "template database is not migrated"
    return template


def _migrated_copy(template: Path, workdir: Path, n: int) -> Path:
    target = workdir / f"migrated-{n}" / "insertcoin.db"
    target.parent.mkdir()
    for suffix in ("", "-wal", "-shm"):
        source = template.with_name(template.name + suffix)
        if source.exists():
            shutil.copy(source, target.with_name(target.name + suffix))
    return target


def _importtime_top(stderr: str, top: int = 15) -> dict[str, Any]:
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cumulative_us, name = line.removeprefix("import time:").split("|")
        indent = len(name) - len(name.lstrip())
        rows.append((name.strip(), int(self_us), int(cumulative_us), indent))
    # Top-level imports (least indented) add up to the total.
    depth = min((r[3] for r in rows), default=0)
    total = sum(r[2] for r in rows if r[3] == depth)
    ranked = sorted(rows, key=lambda r: r[2], reverse=True)[:top]
    return {
        "total_import_ms": round(total / 1000, 1),
        "modules_imported": len(rows),
        "top_cumulative": [
            {"module": name, "cumulative_ms": round(cum / 1000, 1), "self_ms": round(own / 1000, 1)}
            for name, own, cum, _ in ranked
        ],
        # Every module's own time, added up per top-level package: where the total goes.
        "by_package_self_ms": {
            package: round(us / 1000, 1)
            for package, us in sorted(
                _by_package(rows).items(), key=lambda item: item[1], reverse=True
            )[:top]
        },
        "top_self": [
            {"module": name, "self_ms": round(own / 1000, 1)}
            for name, own, _, _ in sorted(rows, key=lambda r: r[1], reverse=True)[:top]
        ],
    }


def _by_package(rows: list[tuple[str, int, int, int]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for name, own, _, _ in rows:
        package = name.split(".")[0]
        totals[package] = totals.get(package, 0) + own
    return totals


def measure(runs: int, workdir: Path, broker_url: str, cache: Path | None) -> dict[str, Any]:
    python = sys.executable
    env = _env(cache)
    if cache is not None:  # warm the bytecode cache first
        subprocess.run([python, "-c", f"{APP_IMPORTS}, uvicorn, fastapi"], env=env, check=True)
    out: dict[str, Any] = {}
    out["python -c pass"] = [_time_command([python, "-c", "pass"], env) for _ in range(runs)]
    out["python -c 'import fastapi'"] = [
        _time_command([python, "-c", "import fastapi"], env) for _ in range(runs)
    ]
    out[f"python -c '{APP_IMPORTS}'"] = [
        _time_command([python, "-c", APP_IMPORTS], env) for _ in range(runs)
    ]
    template = _migrated_template(workdir, broker_url, cache)
    _time_serve(_migrated_copy(template, workdir, 200 + (1 if cache else 0)), broker_url, cache)
    fresh = []
    for n in range(runs):
        db = workdir / f"fresh-{'c' if cache else 'n'}{n}" / "insertcoin.db"
        db.parent.mkdir()
        fresh.append(_time_serve(db, broker_url, cache))
    out["serve → /status 200, fresh SQLite (migrates)"] = fresh
    out["serve → /status 200, migrated SQLite"] = [
        _time_serve(_migrated_copy(template, workdir, n + (100 if cache else 0)), broker_url, cache)
        for n in range(runs)
    ]
    return {
        name: {
            "median_s": round(statistics.median(values), 3),
            "min_s": round(min(values), 3),
            "max_s": round(max(values), 3),
            "runs_s": [round(v, 3) for v in values],
        }
        for name, values in out.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/startup.json"))
    args = parser.parse_args()
    report: dict[str, Any] = {
        "benchmark": "startup",
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": os.getloadavg(),
        },
        "target_seconds": TARGET_SECONDS,
        "notes": [
            "no_bytecode_cache: PYTHONDONTWRITEBYTECODE=1 and the venv holds no .pyc, so "
            "every module is compiled from source at every start (this environment).",
            "bytecode_cache: a private warm PYTHONPYCACHEPREFIX, like an installed wheel.",
            "The admin token is given by environment, so no start writes one.",
        ],
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        workdir = Path(tmp)
        cache = workdir / "pycache"
        with mosquitto(workdir) as broker:
            report["no_bytecode_cache"] = measure(args.runs, workdir, broker.url, None)
            report["bytecode_cache"] = measure(args.runs, workdir, broker.url, cache)
            result = subprocess.run(
                [sys.executable, "-X", "importtime", "-c", APP_IMPORTS],
                env=_env(cache),
                capture_output=True,
                text=True,
                check=True,
            )
            report["importtime_app_runtime"] = _importtime_top(result.stderr)
            db = _migrated_copy(workdir / "template-c" / "insertcoin.db", workdir, 300)
            elapsed, stderr = _time_serve(db, broker.url, cache, importtime=True)
            report["importtime_serve"] = {
                "serve_to_status_s_with_importtime": round(elapsed, 3),
                **_importtime_top(stderr),
            }
    report["machine"]["load_average_after"] = os.getloadavg()
    report["elapsed_seconds"] = round(time.monotonic() - started, 1)
    _print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} ({report['elapsed_seconds']} s)")


def _print(report: dict[str, Any]) -> None:
    rows = []
    for name in report["bytecode_cache"]:
        cold, warm = report["no_bytecode_cache"][name], report["bytecode_cache"][name]
        rows.append([name, cold["median_s"], warm["median_s"], f"{warm['min_s']}-{warm['max_s']}"])
    print(table(["median of runs (s)", "no .pyc", "with .pyc", "with .pyc min-max"], rows))
    print(f"target: serve → /status 200 ≤ {report['target_seconds']} s")
    for key, title in (
        ("importtime_app_runtime", APP_IMPORTS),
        ("importtime_serve", "python -m insertcoin serve (migrated DB, until /status 200)"),
    ):
        data = report[key]
        print(
            f"\n-X importtime, {title}: {data['total_import_ms']} ms in "
            f"{data['modules_imported']} modules (with .pyc)"
        )
        print(
            table(
                ["module", "cumulative ms", "self ms"],
                [[r["module"], r["cumulative_ms"], r["self_ms"]] for r in data["top_cumulative"]],
            )
        )
        print(
            "own import time per top-level package (ms): "
            + ", ".join(f"{name} {ms}" for name, ms in data["by_package_self_ms"].items())
        )


if __name__ == "__main__":
    main()
