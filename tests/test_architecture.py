"""The shape the project promises (ARCHITECTURE.md): `protocol` is pure, the agent never
pulls in server libraries, and the import-linter contracts that say so are enforced."""

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
SERVER_LIBRARIES = (
    "fastapi",
    "starlette",
    "sqlalchemy",
    "alembic",
    "stripe",
    "uvicorn",
    "psycopg",
    "pydantic_settings",
    "amqtt",
    "prometheus_client",
)


def _contracts() -> list[dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts: list[dict[str, object]] = config["tool"]["importlinter"]["contracts"]
    return contracts


def _lint_imports(config: Path, cwd: Path, pythonpath: Path | None = None) -> str:
    env = None
    if pythonpath is not None:
        import os  # noqa: PLC0415

        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(config)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return f"exit={result.returncode}\n{result.stdout}{result.stderr}"


def test_import_contracts_are_kept():
    """`lint-imports` passes: every contract in pyproject.toml is kept, none broken."""
    contracts = _contracts()
    names = {str(contract["name"]) for contract in contracts}
    assert any("protocol" in name for name in names)
    assert any("agent" in name for name in names)
    output = _lint_imports(ROOT / "pyproject.toml", ROOT)
    assert output.startswith("exit=0"), output
    assert f"Contracts: {len(contracts)} kept, 0 broken." in output


def test_import_contracts_catch_a_violation(tmp_path: Path):
    """The contracts have teeth: in a copy of the source where `protocol` imports the server
    and the agent imports SQLAlchemy, `lint-imports` fails and names both contracts."""
    shutil.copytree(
        ROOT / "src" / "insertcoin",
        tmp_path / "src" / "insertcoin",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    package = tmp_path / "src" / "insertcoin"
    (package / "protocol" / "_violation.py").write_text("import insertcoin.server.settings\n")
    (package / "agent" / "_violation.py").write_text("import sqlalchemy\n")
    output = _lint_imports(tmp_path / "pyproject.toml", tmp_path, pythonpath=tmp_path / "src")
    assert not output.startswith("exit=0"), output
    assert f"Contracts: 0 kept, {len(_contracts())} broken." in output
    assert "insertcoin.protocol._violation" in output
    assert "insertcoin.agent._violation" in output


def _modules_after_import(*modules: str) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded: set[str] = set(json.loads(result.stdout))
    return loaded


def _server_side(loaded: set[str]) -> list[str]:
    return sorted(
        name
        for name in loaded
        if name.split(".")[0] in SERVER_LIBRARIES or name.startswith("insertcoin.server")
    )


def test_protocol_and_agent_load_no_server_libraries():
    """A fresh interpreter importing `insertcoin.protocol` and `insertcoin.agent` loads no
    FastAPI, SQLAlchemy, Stripe, Alembic (nor any other server library or module)."""
    loaded = _modules_after_import("insertcoin.protocol", "insertcoin.agent")
    assert {"insertcoin.protocol", "insertcoin.agent", "msgspec"} <= loaded
    assert _server_side(loaded) == []


def test_the_agent_command_loads_neither_pydantic_nor_rich():
    """`insertcoin agent`, through typer's parsing and up to its config check, stays off
    pydantic and rich: together 23 MiB of the cabinet's 40 MB (bench/agent.py)."""
    code = (
        "import json, sys\n"
        "sys.argv = ['insertcoin', 'agent', '--config', '/nonexistent/cabinet.toml']\n"
        "from insertcoin.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    print(json.dumps([exc.code, sorted(sys.modules)]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    code, loaded = json.loads(result.stdout)
    assert code == 2, result.stderr  # the config error: typer parsed the command line
    assert "cannot read" in result.stderr
    packages = {name.split(".")[0] for name in loaded}
    assert packages & {"pydantic", "pydantic_core", "rich", *SERVER_LIBRARIES} == set()


def test_the_command_line_entry_loads_no_server_libraries():
    """`insertcoin.cli` (the console script every install has, cabinets included) imports
    server libraries only when a server command runs."""
    loaded = _modules_after_import("insertcoin.cli")
    assert "typer" in loaded
    assert _server_side(loaded) == []
