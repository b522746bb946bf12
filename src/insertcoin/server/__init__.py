"""The insertcoin server: HTTP API, store, dispatcher and listener (extra `[server]`)."""
