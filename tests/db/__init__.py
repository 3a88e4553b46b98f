"""Integration tests of the database layer on PostgreSQL: migrations, unit of work, row locks."""
