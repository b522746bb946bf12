"""`serve --workers N`: N whole server processes (API, dispatcher, listener, payments)
behind one listening socket, for more than one core's worth of work. uvicorn's process
manager starts them, restarts one that dies and stops them all on SIGTERM. They share
the database and the broker exactly as replicas on different hosts do (leases,
`SKIP LOCKED`, shared subscriptions); the parent only migrates the database, settles
the admin token and prints the banner before they start.
"""

import os
import shutil
import sys
import tempfile

import structlog
import uvicorn
from fastapi import FastAPI

from insertcoin.logs import configure as configure_logs
from insertcoin.server import SWITCH_INTERVAL
from insertcoin.server.admin import AdminToken
from insertcoin.server.errors import ConfigError
from insertcoin.server.metrics import SHARED_DIR_VARIABLE
from insertcoin.server.runtime import EMBEDDED, resolve_broker
from insertcoin.server.settings import Settings, load_settings
from insertcoin.server.store.database import open_database, upgrade

log = structlog.get_logger(__name__)


def prepare(settings: Settings, workers: int) -> tuple[str, str, str | None]:
    """Check that `workers` processes can share this setup, then migrate and settle the
    admin token once. Returns (database, broker, new admin token) for the banner."""
    if settings.payments_mode == "simulated":
        raise ConfigError(
            f"--workers {workers}: simulated payments keep the local Stripe's state in one "
            "process; set INSERTCOIN_STRIPE_API_KEY (a test key will do) or serve one worker"
        )
    if settings.mqtt_shared_subscriptions is False:
        raise ConfigError(
            f"--workers {workers}: INSERTCOIN_MQTT_SHARED_SUBSCRIPTIONS=false would hand "
            "every ack to every worker; unset it"
        )
    target, kind = resolve_broker(settings)
    if kind == EMBEDDED:
        raise ConfigError(
            f"--workers {workers}: the embedded broker has no shared subscriptions; set "
            "INSERTCOIN_MQTT_URL to a Mosquitto or EMQX broker, or serve one worker"
        )
    db = open_database(settings.sqlalchemy_url)
    try:
        upgrade(db)
        admin = AdminToken.load(db, settings)
        return db.describe(), f"{target.display()} ({kind})", admin.new_token
    finally:
        db.dispose()


def run(settings: Settings, host: str, port: int, workers: int) -> None:
    # Each worker reads its settings from the environment: hand it the public URL that
    # `serve` derived from --host/--port.
    os.environ["INSERTCOIN_PUBLIC_URL"] = settings.public_url
    # ... and a directory for their metrics, so that /metrics counts every worker's
    # observations whichever of them answers; fresh for each run.
    shared = tempfile.mkdtemp(prefix="insertcoin-metrics-")
    os.environ[SHARED_DIR_VARIABLE] = shared
    try:
        uvicorn.run(
            f"{__name__}:worker_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            ws="none",
            log_level="warning",
            access_log=False,
        )
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def worker_app() -> FastAPI:
    """The app of one worker process; its lifespan starts and stops the runtime."""
    from insertcoin.server.app import create_app  # noqa: PLC0415

    configure_logs()
    sys.setswitchinterval(SWITCH_INTERVAL)
    settings = load_settings()
    log.info("worker_started", pid=os.getpid())
    return create_app(settings)
