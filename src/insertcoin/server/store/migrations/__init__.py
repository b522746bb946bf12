"""Alembic migrations. Keep LATEST_REVISION equal to the head (a test checks it), so a
server that is up to date starts without importing Alembic."""

LATEST_REVISION = "0003"
