"""`insertcoin agent --config cabinet.toml`."""

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from insertcoin import logs

CONFIG_ERROR_EXIT = 2


def agent(
    config: Annotated[Path, typer.Option("--config", help="The cabinet's TOML file.")],
) -> None:
    """Run the cabinet agent: receive credits over MQTT, pass them to the game."""
    # Imported here: `insertcoin serve` registers this command too, and must not pay for
    # the agent's modules at start-up.
    from insertcoin.agent.config import ConfigError, load_config  # noqa: PLC0415
    from insertcoin.agent.runner import Agent  # noqa: PLC0415

    try:
        settings = load_config(config)
        running = Agent(settings)
    except ConfigError as exc:
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(CONFIG_ERROR_EXIT) from None
    logs.configure()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    running.start()
    try:
        done.wait()
    finally:
        running.stop()


def register(app: typer.Typer) -> None:
    app.command()(agent)
