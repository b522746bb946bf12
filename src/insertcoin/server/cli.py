"""Server commands: serve, db, cabinet, broker. Settings errors end in one line that
names the variable to fix, exit code 2, and no traceback."""

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from insertcoin.logs import configure as configure_logs

if TYPE_CHECKING:
    from insertcoin.server.store.database import Database

F = TypeVar("F", bound=Callable[..., Any])

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
cabinet_app = typer.Typer(help="Register and inspect cabinets.", no_args_is_help=True)
broker_app = typer.Typer(help="Configure an MQTT broker for your cabinets.", no_args_is_help=True)
payments_app = typer.Typer(help="Stripe payments.", no_args_is_help=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def _friendly(func: F) -> F:
    """Turn domain and settings errors into one line on stderr."""
    import functools  # noqa: PLC0415

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from insertcoin.server.errors import InsertcoinError  # noqa: PLC0415

        try:
            return func(*args, **kwargs)
        except InsertcoinError as exc:
            raise _fail(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def _settings() -> Any:
    from insertcoin.server.settings import load_settings  # noqa: PLC0415

    return load_settings()


def _store() -> Any:
    """Settings, migrated database and registry, for commands that need no broker."""
    from insertcoin.server.cabinets.registry import CabinetRegistry  # noqa: PLC0415
    from insertcoin.server.store.database import open_database, upgrade  # noqa: PLC0415

    settings = _settings()
    db = open_database(settings.sqlalchemy_url)
    upgrade(db)
    return settings, db, CabinetRegistry(db, settings)


@_friendly
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Server processes sharing the port, the database and the broker "
            "(more than one needs a Stripe key and an external broker).",
        ),
    ] = 1,
) -> None:
    """Run the API, dispatcher and MQTT listener (migrates the database first)."""
    configure_logs()
    settings = _settings()  # before the heavy imports: a bad setting is reported at once
    if "public_url" not in settings.model_fields_set:
        # QR codes and pay links must point at where this server really listens.
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104
        settings = settings.model_copy(update={"public_url": f"http://{shown}:{port}"})
    from insertcoin.server import SWITCH_INTERVAL  # noqa: PLC0415

    sys.setswitchinterval(SWITCH_INTERVAL)
    if workers > 1:
        from insertcoin.server import workers as processes  # noqa: PLC0415

        database, broker, new_token = processes.prepare(settings, workers)
        _banner(settings, host, port, database, broker, new_token, workers)
        processes.run(settings, host, port, workers)
        return
    import uvicorn  # noqa: PLC0415

    from insertcoin.server.app import create_app  # noqa: PLC0415
    from insertcoin.server.runtime import Runtime  # noqa: PLC0415

    runtime = Runtime(settings)
    _migrate_apart(runtime.db, settings.database_url)
    runtime.start()
    try:
        assert runtime.admin is not None
        _banner(
            settings,
            host,
            port,
            runtime.db.describe(),
            runtime.broker_description,
            runtime.admin.new_token,
        )
        uvicorn.run(
            create_app(settings, runtime),
            host=host,
            port=port,
            ws="none",
            log_level="warning",
            access_log=False,
        )
    finally:
        runtime.stop()


def _migrate_apart(db: "Database", database_url: str) -> None:
    """Apply pending migrations in a child process (`insertcoin db upgrade`), so the
    server, which runs for months, never loads Alembic, Mako and Pygments: 13.5 MiB it
    would keep to the end. The server's own upgrade at start then finds the schema
    current, which costs one query. (With --workers the parent migrates: it serves
    nothing, and uvicorn spawns the workers as fresh interpreters.)"""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    from insertcoin.server.store.database import current_revision  # noqa: PLC0415
    from insertcoin.server.store.migrations import LATEST_REVISION  # noqa: PLC0415

    if current_revision(db) == LATEST_REVISION:
        return
    # The child's output is the server's: "database … is at revision …", or one line
    # naming the fix.
    child = subprocess.run(
        [sys.executable, "-m", "insertcoin", "db", "upgrade"],
        env={**os.environ, "INSERTCOIN_DATABASE_URL": database_url},
        check=False,
    )
    if child.returncode != 0:
        raise typer.Exit(child.returncode)


@_friendly
def demo(
    port: Annotated[int, typer.Option(help="Port of the demo server.")] = 8000,
    smoke: Annotated[
        bool, typer.Option("--smoke", help="Make one purchase by itself, print a summary, exit.")
    ] = False,
) -> None:
    """The whole system on this machine: a server with simulated payments and three
    simulated cabinets with their attract screens. Nothing to configure."""
    configure_logs("warning")
    from insertcoin.server import SWITCH_INTERVAL  # noqa: PLC0415

    sys.setswitchinterval(SWITCH_INTERVAL)
    from insertcoin.server.demo import run  # noqa: PLC0415

    try:
        summary = run(port, smoke=smoke)
    except TimeoutError as exc:
        raise _fail(f"demo failed: {exc}", code=1) from None
    if summary is not None:
        typer.echo(summary)


def _payments_line(mode: str) -> str:
    if mode == "simulated":
        return "simulated (no INSERTCOIN_STRIPE_API_KEY: a local Stripe stand-in, test cards only)"
    return mode


def _banner(
    settings: Any,
    host: str,
    port: int,
    database: str,
    broker: str,
    new_admin_token: str | None,
    workers: int = 1,
) -> None:
    lines = [
        f"insertcoin serving on http://{host}:{port}  (public URL {settings.public_url})",
        f"  database: {database}",
        f"  broker:   {broker}",
        f"  payments: {_payments_line(settings.payments_mode)}",
        f"  API docs: http://{host}:{port}/docs",
    ]
    if workers > 1:
        lines.insert(1, f"  workers:  {workers} processes")
    if new_admin_token:
        lines.append(f"  admin token (shown once, keep it): {new_admin_token}")
    typer.echo("\n".join(lines), err=False)
    sys.stdout.flush()


@db_app.command("upgrade")
@_friendly
def db_upgrade() -> None:
    """Apply database migrations."""
    configure_logs("warning")
    from insertcoin.server.store.database import open_database, upgrade  # noqa: PLC0415

    settings = _settings()
    db = open_database(settings.sqlalchemy_url)
    revision = upgrade(db)
    typer.echo(f"database {db.describe()} is at revision {revision}")


def _print_cabinet(cabinet: Any, as_json: bool) -> None:
    if as_json:
        typer.echo(cabinet.model_dump_json(by_alias=True, indent=2))
        return
    from insertcoin.server.cabinets.models import format_amount  # noqa: PLC0415

    state = "online" if cabinet.online else "offline"
    typer.echo(
        f"{cabinet.machine_id}  {cabinet.name!r}  {format_amount(cabinet.price)} "
        f"for {cabinet.credits_per_purchase} credit(s)  "
        f"{'enabled' if cabinet.enabled else 'disabled'}  {state}  {cabinet.pay_url}"
    )


@cabinet_app.command("add")
@_friendly
def cabinet_add(
    machine_id: Annotated[str, typer.Argument(help="Cabinet id: A-Z a-z 0-9 _ - (≤ 64).")],
    name: Annotated[str, typer.Option(help="Name shown to players.")],
    price: Annotated[str, typer.Option(help="Price of one purchase, e.g. 1.00.")],
    currency: Annotated[str, typer.Option(help="ISO currency code, e.g. usd.")] = "usd",
    credits_per_purchase: Annotated[int, typer.Option(help="Credits one purchase buys.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (with secrets).")] = False,
) -> None:
    """Register a cabinet and print its credentials (shown once)."""
    configure_logs("warning")
    from pydantic import ValidationError  # noqa: PLC0415

    from insertcoin.server.cabinets.models import (  # noqa: PLC0415
        CabinetCreate,
        PriceIn,
        amount_from_decimal,
    )

    try:
        spec = CabinetCreate(
            machine_id=machine_id,
            name=name,
            price=PriceIn(amount=amount_from_decimal(price, currency), currency=currency),
            credits_per_purchase=credits_per_purchase,
        )
    except ValueError as exc:
        if isinstance(exc, ValidationError):
            err = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in err["loc"])
            raise _fail(f"{where}: {err['msg']}") from None
        raise _fail(str(exc)) from None
    _, _, registry = _store()
    cabinet = registry.create(spec)
    if as_json:
        _print_cabinet(cabinet, True)
        return
    _print_cabinet(cabinet, False)
    typer.echo(
        "Credentials (shown once, store them on the cabinet):\n"
        f"  MQTT username: {cabinet.mqtt.username}\n"
        f"  MQTT password: {cabinet.mqtt.password}\n"
        f"  HTTP token:    {cabinet.token}"
    )


@cabinet_app.command("list")
@_friendly
def cabinet_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List cabinets with their presence."""
    configure_logs("warning")
    _, _, registry = _store()
    cabinets = registry.list()
    if as_json:
        typer.echo(
            json.dumps([c.model_dump(mode="json", by_alias=True) for c in cabinets], indent=2)
        )
        return
    if not cabinets:
        typer.echo(
            "no cabinets yet: add one with 'insertcoin cabinet add ID --name N --price 1.00'"
        )
    for cabinet in cabinets:
        _print_cabinet(cabinet, False)


@cabinet_app.command("show")
@_friendly
def cabinet_show(
    machine_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one cabinet."""
    configure_logs("warning")
    _, _, registry = _store()
    _print_cabinet(registry.get(machine_id), as_json)


@cabinet_app.command("disable")
@_friendly
def cabinet_disable(machine_id: str) -> None:
    """Stop selling credits for a cabinet (its pay page says so)."""
    configure_logs("warning")
    from insertcoin.server.cabinets.models import CabinetPatch  # noqa: PLC0415

    _, _, registry = _store()
    registry.update(machine_id, CabinetPatch(enabled=False))
    typer.echo(f"cabinet {machine_id} disabled")


@cabinet_app.command("qr")
@_friendly
def cabinet_qr(
    machine_id: str,
    out: Annotated[
        Path,
        typer.Option("-o", "--out", help="Sticker file to write: .png, .svg or .pdf (A6)."),
    ],
) -> None:
    """Write a printable sticker with the cabinet's QR code, name and price."""
    configure_logs("warning")
    fmt = out.suffix.lower().lstrip(".")
    supported = ("png", "svg", "pdf")
    if fmt not in supported:
        raise _fail(
            f"cannot write {out.name!r}: use a file name ending in "
            + ", ".join(f".{ext}" for ext in supported)
        )
    settings, _, registry = _store()
    cabinet = registry.get(machine_id)
    from insertcoin.server.cabinets import qr  # noqa: PLC0415

    data = qr.sticker(cabinet, cabinet.pay_url, fmt)
    try:
        out.write_bytes(data)
    except OSError as exc:
        raise _fail(f"cannot write {out}: {exc.strerror or exc}") from None
    typer.echo(f"wrote {out}  (sticker for {cabinet.machine_id}; QR → {cabinet.pay_url})")
    if "public_url" not in settings.model_fields_set:
        typer.secho(
            "warning: INSERTCOIN_PUBLIC_URL is not set, so the QR points at "
            f"{settings.public_url}; set it to the server's public address before printing",
            err=True,
            fg=typer.colors.YELLOW,
        )


@broker_app.command("mosquitto-config")
@_friendly
def broker_mosquitto_config(
    out: Annotated[
        Path,
        typer.Option("-o", "--out", help="Directory to write the three files into."),
    ],
) -> None:
    """Write Mosquitto's password file, ACL and a config snippet for all cabinets."""
    configure_logs("warning")
    from insertcoin.server.brokerconfig import write_mosquitto_config  # noqa: PLC0415

    settings, db, _ = _store()
    files = write_mosquitto_config(settings, db, out)
    typer.echo(
        f"wrote {files.password_file}  (server account {files.server_user!r} "
        f"and {files.cabinets} cabinet(s))\n"
        f"wrote {files.acl_file}  (each cabinet may use only its own topics)\n"
        f"wrote {files.conf_file}\n"
        "Next:\n"
        "  1. Add this line at the end of mosquitto.conf, unless it includes this directory:\n"
        f"       include_dir {files.conf_file.parent}\n"
        "  2. Let the broker's user read the password file (once; later runs keep its owner):\n"
        f"       chown mosquitto: {files.password_file}\n"
        "  3. Reload Mosquitto now, and after every run (e.g. after adding cabinets):\n"
        "       systemctl reload mosquitto   (or: kill -HUP <its pid>)"
    )


@payments_app.command("reconcile")
@_friendly
def payments_reconcile() -> None:
    """Page through Stripe's events since the last run and record any purchase whose
    webhook never arrived (`serve` also does this periodically)."""
    configure_logs("warning")
    from insertcoin.server.delivery.service import schedule_of  # noqa: PLC0415
    from insertcoin.server.payments.gateway import StripeRefused, StripeUnavailable  # noqa: PLC0415
    from insertcoin.server.payments.service import Payments  # noqa: PLC0415

    settings, db, _ = _store()
    # Grants recorded here are published by the running server's dispatcher.
    payments = Payments(settings, db, schedule_of(settings), send=lambda _: None)
    try:
        missed = payments.intake.reconcile()
    except (StripeUnavailable, StripeRefused) as exc:
        raise _fail(f"could not reach Stripe ({payments.mode}): {exc}") from None
    typer.echo(f"reconciled with Stripe ({payments.mode}): {missed} missed event(s) recorded")


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(demo)
    app.add_typer(db_app, name="db")
    app.add_typer(cabinet_app, name="cabinet")
    app.add_typer(broker_app, name="broker")
    app.add_typer(payments_app, name="payments")
