"""Settings (PROTOCOL §5) and the command line (PROTOCOL §6).

Settings come from the environment and `.env`, with the prototype's variable names as
fallbacks; a misconfiguration is one line naming the variable. The CLI is run for real,
as a subprocess, the way an operator runs it."""

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from insertcoin.mqtt_url import parse_mqtt_url
from insertcoin.protocol.topics import DEFAULT_PREFIX
from insertcoin.server.cabinets.models import amount_from_decimal
from insertcoin.server.errors import ConfigError
from insertcoin.server.settings import load_settings
from insertcoin.server.store.database import open_database
from insertcoin.server.store.migrations import LATEST_REVISION

OUR_PREFIXES = ("INSERTCOIN_", "MQTT_", "STRIPE_")


def _foreign_env() -> dict[str, str]:
    """The test process's environment without any of our variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(OUR_PREFIXES)}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No inherited settings, and a working directory of our own (for `.env`, `ca.crt`)."""
    for name in list(os.environ):
        if name.startswith(OUR_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _config_error(**env: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- defaults and fallbacks ---------------------------------------------------------------


def test_defaults():
    """With nothing set: SQLite in the working directory, no broker configured (use
    127.0.0.1:1883 or the embedded one), system CAs, the default prefix, TTL 120 s."""
    settings = load_settings()
    assert settings.database_url == "sqlite:///./insertcoin.db"
    assert settings.is_sqlite
    assert settings.mqtt_target() is None
    assert settings.ca_file() is None
    assert settings.public_url == "http://127.0.0.1:8000"
    assert settings.pay_url("arcade123") == "http://127.0.0.1:8000/pay/arcade123"
    assert settings.admin_token is None
    assert settings.credit_ttl_seconds == 120
    assert settings.topics().prefix == DEFAULT_PREFIX == "arcade/machine"


def test_settings_are_read_when_loaded_not_when_imported(monkeypatch):
    """A variable set after import is seen by the next load_settings()."""
    assert load_settings().public_url == "http://127.0.0.1:8000"
    monkeypatch.setenv("INSERTCOIN_PUBLIC_URL", "https://arcade.example.com/")
    assert load_settings().public_url == "https://arcade.example.com"


def test_prototype_mqtt_variables_are_a_fallback(monkeypatch):
    """MQTT_BROKER/PORT/USERNAME/PASSWORD from the prototype's `.env` name the broker;
    port 8883 means TLS, as on EMQX Cloud."""
    monkeypatch.setenv("MQTT_BROKER", "x1.emqxsl.com")
    monkeypatch.setenv("MQTT_PORT", "8883")
    monkeypatch.setenv("MQTT_USERNAME", "server")
    monkeypatch.setenv("MQTT_PASSWORD", "s3cret")
    target = load_settings().mqtt_target()
    assert target is not None
    assert (target.host, target.port, target.tls) == ("x1.emqxsl.com", 8883, True)
    assert (target.username, target.password) == ("server", "s3cret")
    assert "s3cret" not in target.display()


def test_prototype_broker_without_port_is_plain_1883(monkeypatch):
    """MQTT_BROKER alone means port 1883 without TLS."""
    monkeypatch.setenv("MQTT_BROKER", "broker.local")
    target = load_settings().mqtt_target()
    assert target is not None
    assert (target.host, target.port, target.tls, target.username) == (
        "broker.local",
        1883,
        False,
        None,
    )


def test_insertcoin_variables_win_over_prototype_ones(monkeypatch):
    """INSERTCOIN_MQTT_URL beats MQTT_BROKER and friends when both are set."""
    monkeypatch.setenv("MQTT_BROKER", "old.example.com")
    monkeypatch.setenv("MQTT_PORT", "8883")
    monkeypatch.setenv("MQTT_USERNAME", "old")
    monkeypatch.setenv("INSERTCOIN_MQTT_URL", "mqtt://new:pw@new.example.com:1884")
    target = load_settings().mqtt_target()
    assert target is not None
    assert (target.host, target.port, target.tls, target.username, target.password) == (
        "new.example.com",
        1884,
        False,
        "new",
        "pw",
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://h", ("h", 1883, False, None, None)),
        ("mqtts://h", ("h", 8883, True, None, None)),
        ("mqtts://h:9000", ("h", 9000, True, None, None)),
        ("mqtt://us%40er:p%3Ass%2Fw@h:1", ("h", 1, False, "us@er", "p:ss/w")),
        ("mqtt://[::1]:1884", ("::1", 1884, False, None, None)),
    ],
)
def test_mqtt_urls(url, expected):
    """`mqtt://user:pass@host:port`, `mqtts://` for TLS on 8883 by default, %-escapes decoded."""
    target = parse_mqtt_url(url)
    assert (target.host, target.port, target.tls, target.username, target.password) == expected


def test_dotenv_file_is_read(clean_env: Path):
    """A `.env` in the working directory is read, prototype names included."""
    (clean_env / ".env").write_text(
        "INSERTCOIN_DATABASE_URL=postgresql://u@db.example.com/arcade\n"
        "INSERTCOIN_PUBLIC_URL=https://arcade.example.com\n"
        "MQTT_BROKER=x1.emqxsl.com\n"
        "MQTT_PORT=8883\n"
        "MQTT_USERNAME=server\n"
        "MQTT_PASSWORD=from-dotenv\n"
    )
    settings = load_settings()
    assert settings.sqlalchemy_url == "postgresql+psycopg://u@db.example.com/arcade"
    assert not settings.is_sqlite
    assert settings.pay_url("a") == "https://arcade.example.com/pay/a"
    target = settings.mqtt_target()
    assert target is not None
    assert (target.host, target.port, target.tls, target.password) == (
        "x1.emqxsl.com",
        8883,
        True,
        "from-dotenv",
    )


def test_environment_wins_over_dotenv(clean_env: Path, monkeypatch):
    """A variable set in the environment overrides the same one in `.env`."""
    (clean_env / ".env").write_text("INSERTCOIN_PUBLIC_URL=https://from-dotenv.example.com\n")
    monkeypatch.setenv("INSERTCOIN_PUBLIC_URL", "https://from-env.example.com")
    assert load_settings().public_url == "https://from-env.example.com"


def test_prototype_ca_crt_in_working_directory_is_used(clean_env: Path, monkeypatch):
    """Without INSERTCOIN_MQTT_CA_FILE a `ca.crt` in the working directory is the CA file;
    the variable, when set, wins."""
    (clean_env / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    assert load_settings().ca_file() == Path("ca.crt")
    mine = clean_env / "mine.pem"
    mine.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("INSERTCOIN_MQTT_CA_FILE", str(mine))
    assert load_settings().ca_file() == mine


# --- invalid values -----------------------------------------------------------------------

INVALID = [
    ("INSERTCOIN_DATABASE_URL", "mysql://root@localhost/arcade"),
    ("INSERTCOIN_DATABASE_URL", "insertcoin.db"),
    ("INSERTCOIN_MQTT_URL", "http://broker.example.com"),
    ("INSERTCOIN_MQTT_URL", "broker.example.com:1883"),
    ("INSERTCOIN_MQTT_URL", "mqtt://:1883"),
    ("INSERTCOIN_MQTT_URL", "mqtt://h:port"),
    ("INSERTCOIN_MQTT_URL", "mqtt://h:99999"),
    ("INSERTCOIN_MQTT_TOPIC_PREFIX", "arcade/+/machine"),
    ("INSERTCOIN_MQTT_TOPIC_PREFIX", "arcade/machine/"),
    ("INSERTCOIN_MQTT_SHARED_SUBSCRIPTIONS", "sometimes"),
    ("INSERTCOIN_PUBLIC_URL", "arcade.example.com"),
    ("INSERTCOIN_PUBLIC_URL", "ftp://arcade.example.com"),
    ("INSERTCOIN_CREDIT_TTL_SECONDS", "0"),
    ("INSERTCOIN_CREDIT_TTL_SECONDS", "-5"),
    ("INSERTCOIN_CREDIT_TTL_SECONDS", "two minutes"),
    ("INSERTCOIN_RETRY_INITIAL_SECONDS", "0"),
    ("INSERTCOIN_RETRY_MAX_SECONDS", "-1"),
    ("INSERTCOIN_DISPATCH_INTERVAL_SECONDS", "x"),
    ("MQTT_PORT", "eighty"),
    pytest.param(
        "MQTT_PORT",
        "70000",
    ),
    pytest.param(
        "MQTT_PORT",
        "0",
    ),
    pytest.param(
        "INSERTCOIN_MQTT_URL",
        "mqtt://h:0",
    ),
]


@pytest.mark.parametrize(("variable", "value"), INVALID)
def test_invalid_value_is_one_line_naming_the_variable(monkeypatch, variable, value):
    """Each bad value stops loading with ConfigError `VARIABLE: reason`, on one line."""
    monkeypatch.setenv(variable, value)
    if variable.startswith("MQTT_"):
        monkeypatch.setenv("MQTT_BROKER", "broker.example.com")
    assert _config_error().startswith(f"{variable}: ")


def test_missing_ca_file_names_the_variable(clean_env: Path, monkeypatch):
    """A CA file that does not exist is a ConfigError naming INSERTCOIN_MQTT_CA_FILE."""
    missing = clean_env / "nope" / "ca.crt"
    monkeypatch.setenv("INSERTCOIN_MQTT_CA_FILE", str(missing))
    message = _config_error()
    assert message.startswith("INSERTCOIN_MQTT_CA_FILE: ")
    assert str(missing) in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_ca_file_names_the_variable(clean_env: Path, monkeypatch):
    """A CA file without read permission is a ConfigError naming INSERTCOIN_MQTT_CA_FILE."""
    ca = clean_env / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    ca.chmod(0)
    monkeypatch.setenv("INSERTCOIN_MQTT_CA_FILE", str(ca))
    assert _config_error().startswith("INSERTCOIN_MQTT_CA_FILE: ")


def test_ca_file_that_is_a_directory_names_the_variable(clean_env: Path, monkeypatch):
    """A directory is not a CA file: ConfigError naming INSERTCOIN_MQTT_CA_FILE."""
    monkeypatch.setenv("INSERTCOIN_MQTT_CA_FILE", str(clean_env))
    assert _config_error().startswith("INSERTCOIN_MQTT_CA_FILE: ")


@pytest.mark.parametrize(
    ("price", "currency", "amount"),
    [("1.00", "usd", 100), ("1.5", "usd", 150), ("0", "eur", 0), ("500", "jpy", 500)],
)
def test_decimal_prices_become_minor_units(price, currency, amount):
    """`--price 1.00` is 100 cents; zero-decimal currencies (JPY) are whole units."""
    assert amount_from_decimal(price, currency) == amount


@pytest.mark.parametrize(
    ("price", "currency"), [("1.005", "usd"), ("-1", "usd"), ("1.5", "jpy"), ("abc", "usd")]
)
def test_prices_that_are_not_amounts_are_refused(price, currency):
    """Fractions of a cent, negative prices and non-numbers raise ValueError with a reason."""
    with pytest.raises(ValueError, match="price"):
        amount_from_decimal(price, currency)


# --- the command line, as a subprocess ----------------------------------------------------


def _cli(
    *args: str, cwd: Path, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "insertcoin", *args],
        cwd=cwd,
        env={**_foreign_env(), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _assert_one_line_error(result: subprocess.CompletedProcess[str], *mentions: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for mention in mentions:
        assert mention in lines[0]
    return lines[0]


SERVE_MISCONFIGURED = [
    ("INSERTCOIN_MQTT_URL", "http://broker.example.com"),
    ("INSERTCOIN_DATABASE_URL", "postgresql://insertcoin@127.0.0.1:1/insertcoin"),
    ("INSERTCOIN_MQTT_CA_FILE", "/nonexistent-insertcoin-dir/ca.crt"),
    ("MQTT_PORT", "eighty"),
]


@pytest.mark.parametrize(("variable", "value"), SERVE_MISCONFIGURED)
def test_serve_misconfigured_stops_with_one_line(tmp_path: Path, variable, value):
    """`insertcoin serve` with a bad URL, an unreachable database or an unreadable CA file
    exits 2 with one `error:` line naming the variable, and no traceback."""
    env = {
        "INSERTCOIN_DATABASE_URL": f"sqlite:///{tmp_path / 'ok.db'}",
        # Were the check missing, the server would start and hang on this dead broker
        # until the subprocess timeout fails the test.
        "MQTT_BROKER": "127.0.0.1",
        "MQTT_PORT": "1",
        variable: value,
    }
    result = _cli("serve", "--port", "1", cwd=tmp_path, timeout=30, **env)
    _assert_one_line_error(result, variable)


WORKERS_REFUSED = [
    ({}, "INSERTCOIN_STRIPE_API_KEY"),
    (
        {
            "INSERTCOIN_STRIPE_API_KEY": "sk_test_x",
            "INSERTCOIN_STRIPE_WEBHOOK_SECRET": "whsec_x",
            "INSERTCOIN_MQTT_SHARED_SUBSCRIPTIONS": "false",
        },
        "INSERTCOIN_MQTT_SHARED_SUBSCRIPTIONS",
    ),
]


@pytest.mark.parametrize(("env", "named"), WORKERS_REFUSED, ids=["simulated", "unshared"])
def test_serve_workers_refuses_what_one_process_owns(tmp_path: Path, env, named):
    """`serve --workers 2` with simulated payments (the stand-in's state lives in one
    process) or without shared subscriptions (every worker would get every ack) exits 2
    with one line naming the setting, before touching the database."""
    db = tmp_path / "w.db"
    result = _cli(
        "serve",
        "--workers",
        "2",
        cwd=tmp_path,
        timeout=30,
        INSERTCOIN_DATABASE_URL=f"sqlite:///{db}",
        INSERTCOIN_MQTT_URL="mqtt://127.0.0.1:1",
        **env,
    )
    _assert_one_line_error(result, "--workers 2", named)
    assert not db.exists()


def test_with_no_broker_configured_the_one_answering_locally_is_used_else_the_embedded_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """INSERTCOIN_MQTT_URL unset: whatever answers on the default address is used, and
    when nothing does the embedded broker is started there; `how` is what the banner shows."""
    from insertcoin.server import runtime  # noqa: PLC0415

    settings = load_settings(database_url="sqlite://")
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        monkeypatch.setattr(runtime, "DEFAULT_MQTT_PORT", port)
        target, how = runtime.resolve_broker(settings)
        assert (target.host, target.port, how) == ("127.0.0.1", port, "found listening locally")
    target, how = runtime.resolve_broker(settings)
    assert (target.host, target.port, how) == ("127.0.0.1", port, runtime.EMBEDDED)
    configured = load_settings(database_url="sqlite://", mqtt_url=f"mqtt://127.0.0.1:{port}")
    assert runtime.resolve_broker(configured)[1] == "configured"


def test_serve_workers_refuses_the_embedded_broker(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """With no broker configured and none answering on 127.0.0.1:1883, one process would
    start the embedded broker; several are refused (it has no shared subscriptions)."""
    from insertcoin.server import runtime, workers  # noqa: PLC0415

    monkeypatch.setattr(runtime, "is_listening", lambda host, port: False)
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path / 'w.db'}",
        stripe_api_key="sk_test_x",
        stripe_webhook_secret="whsec_x",
    )
    with pytest.raises(ConfigError, match="INSERTCOIN_MQTT_URL") as caught:
        workers.prepare(settings, 3)
    assert str(caught.value).startswith("--workers 3: the embedded broker")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://insertcoin@127.0.0.1:1/insertcoin",
        "sqlite:////nonexistent-insertcoin-dir/x.db",
    ],
)
def test_unreachable_database_is_a_config_error(url):
    """Opening a database that does not answer raises ConfigError naming the variable."""
    with pytest.raises(ConfigError) as caught:
        open_database(url)
    message = str(caught.value)
    assert message.startswith("INSERTCOIN_DATABASE_URL: cannot open")
    assert "\n" not in message


def test_database_error_does_not_reveal_the_password():
    """The error line for an unreachable PostgreSQL does not print its password."""
    with pytest.raises(ConfigError) as caught:
        open_database("postgresql+psycopg://insertcoin:hunter2-secret@127.0.0.1:1/insertcoin")
    assert "hunter2-secret" not in str(caught.value)


def _stored_cabinets(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if "cabinets" not in tables:
            return 0
        count: int = conn.execute("SELECT count(*) FROM cabinets").fetchone()[0]
        return count


BAD_ADD = [
    (["bad/id", "--name", "N", "--price", "1.00"], "machine_id"),
    (["c1", "--name", "N", "--price", "one dollar"], "price"),
    (["c1", "--name", "N", "--price=-1"], "price"),
    (["c1", "--name", "N", "--price", "1.005"], "price"),
    (["c1", "--name", "N", "--price", "1e10"], "price"),
    (["c1", "--name", "N", "--price", "1.00", "--currency", "dollars"], "currency"),
    (["c1", "--name", "N", "--price", "1.00", "--credits-per-purchase", "0"], "credits"),
    pytest.param(
        ["c1", "--name", "N", "--price", "Infinity"],
        "price",
    ),
    pytest.param(
        ["c1", "--name", "N", "--price", "sNaN"],
        "price",
    ),
    pytest.param(
        ["c1", "--name", "N", "--price", "1e999999"],
        "price",
    ),
]


@pytest.mark.parametrize(
    ("args", "mention"),
    BAD_ADD,
    ids=[
        "bad-id",
        "price-in-words",
        "negative-price",
        "fraction-of-a-cent",
        "price-over-stripe-max",
        "bad-currency",
        "zero-credits",
        "price-infinity",
        "price-snan",
        "price-overflow",
    ],
)
def test_cabinet_add_with_bad_values_stores_nothing(tmp_path: Path, args, mention):
    """A bad id, price, currency, name or credit count: one clear error line, nothing stored."""
    db = tmp_path / "insertcoin.db"
    result = _cli("cabinet", "add", *args, cwd=tmp_path, INSERTCOIN_DATABASE_URL=f"sqlite:///{db}")
    _assert_one_line_error(result, mention)
    assert _stored_cabinets(db) == 0


def test_cabinet_add_json_list_show_disable(tmp_path: Path):
    """`cabinet add --json` prints the PROTOCOL §6 shape with credentials shown once (and
    stored only hashed); a duplicate is refused; list/show/disable work."""
    db = tmp_path / "insertcoin.db"
    env = {
        "INSERTCOIN_DATABASE_URL": f"sqlite:///{db}",
        "INSERTCOIN_PUBLIC_URL": "https://arcade.example.com",
    }
    added = _cli(
        "cabinet", "add", "pacman1", "--name", "Pac-Man", "--price", "1.50", "--currency",
        "usd", "--credits-per-purchase", "3", "--json", cwd=tmp_path, **env,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    cabinet = json.loads(added.stdout)
    assert {
        "machineId",
        "name",
        "enabled",
        "price",
        "creditsPerPurchase",
        "payUrl",
        "mqtt",
        "token",
    } <= set(cabinet)
    assert cabinet["machineId"] == "pacman1"
    assert cabinet["name"] == "Pac-Man"
    assert cabinet["enabled"] is True
    assert cabinet["price"] == {"amount": 150, "currency": "usd"}
    assert cabinet["creditsPerPurchase"] == 3
    assert cabinet["payUrl"] == "https://arcade.example.com/pay/pacman1"
    assert set(cabinet["mqtt"]) == {"username", "password"}
    assert cabinet["mqtt"]["username"] == "pacman1"
    password, token = cabinet["mqtt"]["password"], cabinet["token"]
    assert len(password) >= 32
    assert len(token) >= 32
    assert password != token

    stored = b"".join(p.read_bytes() for p in tmp_path.glob("insertcoin.db*"))
    assert password.encode() not in stored
    assert token.encode() not in stored

    duplicate = _cli(
        "cabinet", "add", "pacman1", "--name", "X", "--price", "1", cwd=tmp_path, **env
    )
    _assert_one_line_error(duplicate, "already exists")

    listed = _cli("cabinet", "list", "--json", cwd=tmp_path, **env)
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert entry["machineId"] == "pacman1"
    assert "token" not in entry
    assert "mqtt" not in entry

    disabled = _cli("cabinet", "disable", "pacman1", cwd=tmp_path, **env)
    assert disabled.returncode == 0, disabled.stderr
    assert "pacman1" in disabled.stdout

    shown = _cli("cabinet", "show", "pacman1", "--json", cwd=tmp_path, **env)
    assert shown.returncode == 0, shown.stderr
    shown_cabinet = json.loads(shown.stdout)
    assert shown_cabinet["enabled"] is False
    assert shown_cabinet["price"] == {"amount": 150, "currency": "usd"}
    assert "token" not in shown_cabinet

    unknown = _cli("cabinet", "show", "nope", cwd=tmp_path, **env)
    _assert_one_line_error(unknown, "nope")


def test_db_upgrade_creates_the_schema_from_env_or_dotenv(tmp_path: Path):
    """`insertcoin db upgrade` migrates the database named by INSERTCOIN_DATABASE_URL (or
    by `.env`) to the latest revision, and running it again changes nothing."""
    first = _cli("db", "upgrade", cwd=tmp_path, INSERTCOIN_DATABASE_URL="sqlite:///./a.db")
    assert first.returncode == 0, first.stderr
    assert LATEST_REVISION in first.stdout
    again = _cli("db", "upgrade", cwd=tmp_path, INSERTCOIN_DATABASE_URL="sqlite:///./a.db")
    assert again.returncode == 0, again.stderr

    (tmp_path / ".env").write_text("INSERTCOIN_DATABASE_URL=sqlite:///./b.db\n")
    from_dotenv = _cli("db", "upgrade", cwd=tmp_path)
    assert from_dotenv.returncode == 0, from_dotenv.stderr

    for name in ("a.db", "b.db"):
        with sqlite3.connect(tmp_path / name) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
            revision = conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]
        assert revision == LATEST_REVISION
        assert {"cabinets", "cabinet_credentials", "grants", "history", "gameovers"} <= tables
