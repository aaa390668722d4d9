"""A throwaway PostgreSQL schema per test session (127.0.0.1:5432, trust auth, database test)."""

from __future__ import annotations

import contextlib
import os
import secrets
from urllib.parse import quote

import pytest

BASE_DSN = os.environ.get("PARLEY_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def available() -> bool:
    import psycopg

    try:
        with psycopg.connect(BASE_DSN, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def require() -> None:
    if available():
        return
    message = f"PostgreSQL is not reachable at {BASE_DSN} (set PARLEY_TEST_PG_DSN); PostgreSQL store not tested"
    if os.environ.get("CI"):
        pytest.fail(message)  # CI starts PostgreSQL (.ci/run): absence there is a failure
    pytest.skip(message)


@contextlib.contextmanager
def fresh_schema():
    """Yield a DSN whose search_path is a new, empty schema; drop it afterwards."""
    import psycopg

    require()
    schema = "parley_test_" + secrets.token_hex(4)
    with psycopg.connect(BASE_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in BASE_DSN else "?"
    try:
        yield f"{BASE_DSN}{separator}options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(BASE_DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@contextlib.contextmanager
def store_for(kind: str, tmp_path):
    """Settings of a store of `kind` ("sqlite" or "postgres", a throwaway schema) for a test."""
    if kind == "sqlite":
        yield {"store_path": tmp_path / "store.sqlite3"}
    else:
        with fresh_schema() as dsn:
            yield {"store_dsn": dsn}
