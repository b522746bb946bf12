"""The `insertcoin` command. Server commands import server libraries only when run, so
the command works on a cabinet that installed `insertcoin` without the server extra."""

import typer

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="insertcoin: card and phone payments for arcade cabinets.",
)


def _register() -> None:
    from insertcoin.agent.cli import register as register_agent  # noqa: PLC0415

    register_agent(app)
    from insertcoin.server.cli import register  # noqa: PLC0415

    register(app)


def main() -> None:
    _register()
    app()
