"""Alembic migrations of the fedhub schema; applied with `fedhub.db.upgrade` (`fedhub db upgrade`)."""
