"""Durable state behind one interface (`StateStore`): an embedded SQLite file by default, PostgreSQL for several
workers sharing a batch; and the per-batch run lock of the SQLite mode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import ModuleType
from urllib.parse import urlsplit

from lpengine.config import BatchConfig, Secrets
from lpengine.errors import ConfigError, StateStoreError
from lpengine.state.base import StateStore, StoredItem, StoredUpload
from lpengine.state.lock import BatchLock
from lpengine.state.sqlite import SqliteStateStore

__all__ = [
    "BatchLock",
    "SqliteStateStore",
    "StateStore",
    "StoredItem",
    "StoredUpload",
    "batch_name",
    "open_store",
    "state_secrets",
    "state_url",
    "state_where",
    "upgrade_schema",
]


def state_url(config: BatchConfig, secrets: Secrets) -> str | None:
    """The PostgreSQL URL to use, if any: `LPENGINE_STATE_URL` (environment or .env) over `state.url`."""
    if secrets.state_url is not None:
        return secrets.state_url.get_secret_value()
    return config.state.url


def state_secrets(config: BatchConfig, secrets: Secrets) -> list[str]:
    """What a log must never show of the database URL: its password."""
    url = state_url(config, secrets)
    password = urlsplit(url).password if url else None
    return [password] if password else []


def batch_name(config: BatchConfig) -> str:
    return config.state.batch or str(config.output_dir)


@asynccontextmanager
async def open_store(config: BatchConfig, secrets: Secrets, *, worker: bool = False) -> AsyncIterator[StateStore]:
    """The configured backend, open. PostgreSQL is imported only when used (it is the `postgres` extra).

    `worker`: this process works on the batch (not only reads it): with PostgreSQL it joins the batch's workers.
    """
    url = state_url(config, secrets)
    if url is None:
        async with SqliteStateStore(config.state_path) as sqlite_store:
            yield sqlite_store
        return
    lease_s = config.state.lease_s
    if worker and lease_s < 2 * config.api.request_timeout_s:
        raise ConfigError(
            [
                f"state.lease_s: {lease_s:g} s is less than twice api.request_timeout_s "
                f"({config.api.request_timeout_s:g} s): a worker taking over must know whether a dead worker's last "
                "submit happened; raise state.lease_s"
            ]
        )
    store = _postgres().PostgresStateStore(url, batch_name(config), lease_s=lease_s if worker else None)
    async with store as pg_store:
        yield pg_store


def state_where(config: BatchConfig, secrets: Secrets) -> str:
    """Where the batch's state lives, for people (no password)."""
    url = state_url(config, secrets)
    if url is None:
        return str(config.state_path)
    return f"{_postgres().where(url)}, batch {batch_name(config)!r}"


async def upgrade_schema(config: BatchConfig, secrets: Secrets) -> str:
    """`lpengine db upgrade`: apply the database's missing migrations; says what it did."""
    url = state_url(config, secrets)
    if url is None:
        return f"state is the SQLite file {config.state_path}, which sets up its own tables: nothing to upgrade"
    postgres = _postgres()
    before, after = await postgres.upgrade(url)
    if before == after:
        return f"the state {postgres.where(url)} is at schema version {after}: nothing to do"
    return f"the state {postgres.where(url)}: schema version {before} -> {after}"


def _postgres() -> ModuleType:
    """lpengine.state.postgres, imported only when used (psycopg is the `postgres` extra)."""
    try:
        from lpengine.state import postgres
    except ImportError:
        raise StateStoreError(
            "state.url / LPENGINE_STATE_URL names PostgreSQL, but psycopg is not installed: "
            "pip install 'lpengine[postgres]'"
        ) from None
    return postgres
