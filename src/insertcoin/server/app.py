"""The ASGI application. `create_app(settings)` has no import-time side effects; the
lifespan owns the runtime (database, broker connection, background threads)."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from insertcoin import __version__
from insertcoin.server.payments.service import STANDIN_PATH
from insertcoin.server.runtime import Runtime
from insertcoin.server.settings import Settings
from insertcoin.server.web import (
    cabinet_routes,
    errors,
    health,
    operator,
    pay_links,
    pay_pages,
    purchases_api,
    webhooks,
)


def _attach(app: FastAPI, runtime: Runtime) -> None:
    app.state.runtime = runtime
    if runtime.payments.mode == "simulated":
        # Simulated payments: the local Stripe is served by this very server.
        app.mount(STANDIN_PATH, runtime.payments.serve_standin)


def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    """Build the app. Given a runtime, the caller owns starting and stopping it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if runtime is not None:
            _attach(app, runtime)
            yield
            return
        owned = Runtime(settings)
        owned.start()
        _attach(app, owned)
        try:
            yield
        finally:
            owned.stop()

    app = FastAPI(
        title="insertcoin",
        version=__version__,
        lifespan=lifespan,
        # The server's metrics are Prometheus' (/metrics). FastAPI's own OpenTelemetry
        # hooks, left on, look up the global providers on every request: 5 % of the
        # server's CPU under webhook load, for nothing.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    errors.install(app)
    app.add_middleware(errors.BodyLimit)
    # Matching walks the routes in order: the busiest callers (Stripe, then the grant
    # API) come first. No two routers share a path.
    routers = (webhooks, operator, health, cabinet_routes, pay_links, pay_pages, purchases_api)
    for module in routers:
        app.include_router(module.router)
    return app
