"""The ASGI application. `create_app(settings)` has no import-time side effects; the
lifespan owns the runtime (database, broker connection, background threads)."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from insertcoin import __version__
from insertcoin.server.runtime import Runtime
from insertcoin.server.settings import Settings
from insertcoin.server.web import cabinet_routes, errors, health, operator


def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    """Build the app. Given a runtime, the caller owns starting and stopping it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if runtime is not None:
            app.state.runtime = runtime
            yield
            return
        owned = Runtime(settings)
        owned.start()
        app.state.runtime = owned
        try:
            yield
        finally:
            owned.stop()

    app = FastAPI(
        title="insertcoin",
        version=__version__,
        lifespan=lifespan,
    )
    errors.install(app)
    app.add_middleware(errors.BodyLimit)
    for module in (health, cabinet_routes, operator):
        app.include_router(module.router)
    return app
