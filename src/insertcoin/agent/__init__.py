"""The cabinet agent (insertcoin agent --config cabinet.toml). Imports no server library."""

import insertcoin.logs  # noqa: F401  (structlog's first import, without rich: see logs.py)
