"""A PostgreSQL schema of its own for each test, on the local server; skips when there is none.

The server is `PROCPOLL_TEST_POSTGRES` (default: the local one, trust auth, database
`test`). Without psycopg or a reachable server the tests that need it skip with the
reason, unless PROCPOLL_REQUIRE_POSTGRES=1 (CI), where they fail instead.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

import pytest

SERVER_URL = os.environ.get("PROCPOLL_TEST_POSTGRES",
                            "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE_ENV = "PROCPOLL_REQUIRE_POSTGRES"
CONNECT_TIMEOUT_S = 5


def unavailable_reason() -> str | None:
    """Why no test PostgreSQL can be used here, or None when it can."""
    try:
        import psycopg  # noqa: PLC0415 -- optional dependency, only for these tests
        import psycopg_pool  # noqa: F401, PLC0415
    except ImportError as exc:
        return f"psycopg is not installed (pip install 'procpoll[postgresql]'): {exc}"
    try:
        with psycopg.connect(SERVER_URL, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"no PostgreSQL at {SERVER_URL}: {' '.join(str(exc).split())}"
    return None


def require_postgres() -> None:
    """Skip the calling test (or module) without PostgreSQL; fail instead when CI requires it."""
    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
    pytest.skip(reason, allow_module_level=True)


def execute(statement: str, params: tuple[object, ...] = ()) -> None:
    """Run one statement on the test server outside any ledger (autocommit)."""
    import psycopg  # noqa: PLC0415

    with psycopg.connect(SERVER_URL, connect_timeout=CONNECT_TIMEOUT_S,
                         autocommit=True) as conn:
        conn.execute(statement, params)  # type: ignore[arg-type]


@contextlib.contextmanager
def fresh_schema_url() -> Iterator[str]:
    """Yield a ledger URL on a schema nobody else uses; drop the schema afterwards."""
    require_postgres()
    schema = f"t_{secrets.token_hex(6)}"
    try:
        yield f"{SERVER_URL}?schema={schema}"
    finally:
        execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


