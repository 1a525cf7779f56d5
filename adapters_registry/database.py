"""The registry's database connection: an engine with each backend's settings, driver errors
turned into ``DatabaseError``s that name the database and the condition, and the schema
migrations (Alembic, ``migrations/``). The tables are ``db``'s."""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, ExceptionContext
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError

from adapters_registry.errors import DatabaseError, DatabaseUnreachableError

__all__ = ["CONNECT_TIMEOUT_S", "current_revision", "head_revision", "make_engine", "upgrade"]


def make_engine(url: str, *, migrate: bool = True, lock_timeout_s: float = 10.0) -> Engine:
    """An engine with the settings each backend needs, its schema migrated to head.

    Every driver error it raises afterwards is a DatabaseError naming the database and
    the condition (read-only, locked, unreachable), never a driver traceback.
    ``lock_timeout_s`` is how long a statement waits for another's lock (SQLite's busy
    timeout; PostgreSQL's ``lock_timeout``), then fails as "locked": nothing waits forever
    behind a stuck transaction.
    """
    # A PostgreSQL server that is away behind a dropped route answers nothing: without a
    # connect timeout, a lookup would wait for the kernel's TCP timeout (minutes).
    extra = ({"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
             if url.startswith("postgresql") and "connect_timeout" not in url else {})
    try:
        engine = create_engine(url, future=True, pool_pre_ping=True, **extra)
    except (ArgumentError, ImportError) as exc:
        raise DatabaseError(f"database URL {_redacted(url)} is not usable: {exc}") from None
    event.listen(engine, "handle_error", _as_database_error)
    wait_ms = max(1, int(lock_timeout_s * 1000))
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", lambda conn, rec: _sqlite_pragmas(conn, wait_ms))
    elif engine.dialect.name == "postgresql":
        event.listen(engine, "connect", lambda conn, rec: _postgres_session(conn, wait_ms),
                     insert=True)
    if migrate:
        upgrade(engine)
    return engine


# Conditions by driver code, never by message text: SQLite's primary result codes and
# PostgreSQL's SQLSTATE (exact code, else its two-character class).
CONNECT_TIMEOUT_S = 5  # PostgreSQL, unless the URL sets connect_timeout itself
_READ_ONLY = "it is read-only for this user"
_UNREACHABLE = "it is unreachable"
_LOCKED = "another process holds its lock; retry when it is done"
_SQLITE_HINTS = {
    3: "permission denied", 5: _LOCKED, 6: _LOCKED, 8: _READ_ONLY, 10: "disk I/O error",
    13: "disk full",
    14: "it cannot be opened (missing folder, or no permission on the file or its folder)",
}
_SQLSTATE_HINTS = {
    "25006": _READ_ONLY, "55P03": _LOCKED, "40P01": _LOCKED, "42501": "permission denied",
    "3D000": "the database does not exist", "53100": "disk full",
    "08": _UNREACHABLE, "28": "authentication failed", "53": "the server is out of resources",
    "57": "the server is shutting down or cancelled the operation",
}


def _as_database_error(context: ExceptionContext) -> DatabaseError | None:
    """The one translation of driver errors (SQLAlchemy calls it for every failure)."""
    exc = context.original_exception
    if isinstance(context.sqlalchemy_exception, IntegrityError):
        return None  # a constraint: the service turns it into a ConflictError
    if not isinstance(exc, Exception):
        return None
    sqlite_code = getattr(exc, "sqlite_errorcode", None)
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlite_code, int):
        hint = _SQLITE_HINTS.get(sqlite_code & 0xFF)
    elif isinstance(sqlstate, str):
        hint = _SQLSTATE_HINTS.get(sqlstate) or _SQLSTATE_HINTS.get(sqlstate[:2])
    else:
        hint = None
    # A driver's OperationalError without a SQLSTATE is about the connection itself
    # (refused, reset, timed out): the server never answered the statement.
    lost = context.is_disconnect or (sqlite_code is None and sqlstate is None and isinstance(
        context.sqlalchemy_exception, OperationalError))
    if hint is None:
        hint = _UNREACHABLE if lost else "the database refused the operation"
    engine = context.engine
    where = (f"database {_redacted(engine.url.render_as_string(hide_password=True))}" if engine
             else "the database")
    first = str(exc).strip().splitlines()
    detail = first[0][:200] if first else type(exc).__name__
    message = f"{where}: {hint} ({detail})"
    if hint == _UNREACHABLE or (isinstance(sqlstate, str) and sqlstate[:2] in ("08", "57")):
        return DatabaseUnreachableError(message)
    return DatabaseError(message)


def _redacted(url: str) -> str:
    return url.split("?", 1)[0]


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the versioned migrations in adapters_registry/migrations (idempotent)."""
    if revision == "head" and current_revision(engine) == head_revision():
        return  # the usual case: no need to read the migration scripts at all
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "adapters_registry:migrations")
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Two processes starting at once (gateway and CLI) must not both migrate.
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7418001)")
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


@functools.cache
def head_revision() -> str:
    """The newest migration revision this code knows (read once per process)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", "adapters_registry:migrations")
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None, "the migrations folder has no head revision"
    return head


def current_revision(engine: Engine) -> str | None:
    """The migration revision the database is at (None before the first migration)."""
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _sqlite_pragmas(dbapi_conn: Any, busy_ms: int) -> None:
    # WAL lets the gateway read while the CLI registers; busy_timeout waits instead of failing.
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={busy_ms}")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _postgres_session(dbapi_conn: Any, lock_ms: int) -> None:
    """Each connection's lock wait bound, set outside any transaction (a rolled-back one
    would take a plain SET back with it)."""
    autocommit = dbapi_conn.autocommit
    dbapi_conn.autocommit = True
    try:
        with dbapi_conn.cursor() as cur:
            cur.execute(f"SET lock_timeout = {int(lock_ms)}")
    finally:
        dbapi_conn.autocommit = autocommit
