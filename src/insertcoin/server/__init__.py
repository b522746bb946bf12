"""The insertcoin server: HTTP API, store, dispatcher and listener (extra `[server]`)."""

import insertcoin.logs  # noqa: F401  (structlog's first import, without rich: see logs.py)
