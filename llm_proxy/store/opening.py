"""Opening the store a database URL names: SQLite (the embedded default) or PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from llm_proxy.store import Store
from llm_proxy.store.postgres import PostgresStore
from llm_proxy.store.sqlite import SqliteStore


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///`` URL (SQLAlchemy's convention: ``sqlite:////abs`` is absolute)."""
    if not url.startswith("sqlite:///"):
        raise ValueError(f"not a sqlite URL: {url.split('://')[0]}://…")
    rest = url[len("sqlite:///") :]
    if not rest:
        raise ValueError("the sqlite URL names no file")
    return Path(rest)


def default_database_url(data_dir: Path) -> str:
    """The database used when ``DATABASE_URL`` is not set: SQLite under ``DATA_DIR``."""
    return f"sqlite:///{data_dir}/llm-proxy.db"


def is_postgres(url: str) -> bool:
    return url.startswith("postgresql://")


async def open_store(url: str, *, pool_size: int = 10, migrate: bool = True) -> Store:
    """The store at ``url``, migrated to the current schema unless ``migrate`` is False."""
    if is_postgres(url):
        return await PostgresStore.open(url, pool_size=pool_size, migrate=migrate)
    return await SqliteStore.open(sqlite_path(url), migrate=migrate)
