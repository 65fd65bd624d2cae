"""The databases behind Optuna studies and MLflow runs: an sqlite file on one machine, a server
(PostgreSQL) when workers on several machines share them.

Passwords never go into a URL here: libpq, under psycopg and SQLAlchemy, reads them itself from
$PGPASSWORD or a `.pgpass` file ($PGPASSFILE, default ~/.pgpass) when the URL names none. So a URL
such as `postgresql+psycopg://scpl@db.cluster:5432/optuna` can sit in a config or a log safely.
"""

from __future__ import annotations

import re
from typing import Any

from scpl_kit.preflight import PreflightError, check_sqlite_file

CONNECT_TIMEOUT_S = 5  # a server (database, MLflow) that does not answer in 5 s is down, not slow
PASSWORD_IN_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^/@\s:]*:[^/@\s]+@", re.IGNORECASE)


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for logs, tags and messages."""
    return PASSWORD_IN_URL.sub(lambda found: found.group(0).rsplit(":", 1)[0] + ":***@", url)


def engine_options(url: str) -> dict[str, Any] | None:
    """SQLAlchemy engine options that make a lost server an error in seconds rather than a hang:
    libpq waits forever for an unroutable host by default."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}  # sqlite's lock wait: several local workers write the same file
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}, "pool_pre_ping": True}
    return None


def check_database(url: str, what: str) -> None:
    """Fail in seconds, in one line naming the database, when it cannot be used: an sqlite file must
    be writable where it lies, a server must accept a connection (credentials included)."""
    if url.startswith("sqlite:///"):
        check_sqlite_file(url.removeprefix("sqlite:///"), what)
        return
    import sqlalchemy  # imported here: only a server URL needs it

    try:
        engine = sqlalchemy.create_engine(url, **(engine_options(url) or {}))
    except ModuleNotFoundError as error:
        raise PreflightError(f"{what} {redact(url)}: its driver is not installed ({error}); for PostgreSQL use postgresql+psycopg://") from None
    try:
        with engine.connect():
            pass
    except Exception as error:  # SQLAlchemy wraps the driver's error; its first line says why
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise PreflightError(
            f"{what} {redact(url)} cannot be used ({redact(reason)}); is the server up, and the password in $PGPASSWORD or ~/.pgpass?"
        ) from None
    finally:
        engine.dispose()


def refuse_passwords(overrides: list[str]) -> None:
    """A password typed into an override ends up in shell history, `ps` and the run's saved config."""
    for override in overrides:
        if PASSWORD_IN_URL.search(override):
            raise PreflightError(
                f"{redact(override)}: keep the password out of the command line and configs; "
                "put it in $PGPASSWORD or a ~/.pgpass line (host:port:database:user:password) and leave it out of the URL"
            )
