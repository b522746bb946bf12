"""Everything the server knows lives here: SQLite or PostgreSQL, one schema, Alembic migrations."""
