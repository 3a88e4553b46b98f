"""Database plumbing: the declarative base, the shared schema, the unit of work, outbox and inbox."""

from shared.db.base import Base, create_engine, create_schema, session_factory
from shared.db.uow import UnitOfWork, UnitOfWorkFactory

__all__ = ["Base", "UnitOfWork", "UnitOfWorkFactory", "create_engine", "create_schema", "session_factory"]
