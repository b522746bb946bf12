"""The insertcoin server: HTTP API, store, dispatcher and listener (extra `[server]`)."""

import insertcoin.logs  # noqa: F401  (structlog's first import, without rich: see logs.py)

# For sys.setswitchinterval in every server process. Work hops between threads (HTTP
# loop, grant writer, MQTT network thread); with the default 5 ms GIL switch interval
# each hop can wait that long behind a busy thread.
SWITCH_INTERVAL = 0.0005
