"""Opening the configured ledger: SQLite by default, PostgreSQL for a postgresql:// URL.

psycopg is an optional dependency (procpoll[postgresql]): it is imported only here, and
only when the configuration names a PostgreSQL ledger.
"""

from __future__ import annotations

from collections.abc import Callable

from procpoll.config import Config
from procpoll.errors import ConfigError
from procpoll.ledger import DeliveryLedger, Ledger

EXTRA_HINT = "pip install 'procpoll[postgresql]'"


def open_ledger(config: Config, *, shared: bool,
                on_commit: Callable[[float], None] | None = None) -> DeliveryLedger:
    """The ledger `config` names. A PostgreSQL ledger is always shared.

    Raises LedgerError when it cannot be opened, ConfigError when a PostgreSQL ledger is
    configured but psycopg is not installed.
    """
    ledger = config.ledger
    if not ledger.url:
        return Ledger(ledger.path, retention_s=ledger.retention_s, shared=shared,
                      on_commit=on_commit)
    return open_url(ledger.url, retention_s=ledger.retention_s, pool_size=ledger.pool_size,
                    on_commit=on_commit, source=config.source)


def open_url(url: str, *, retention_s: float, pool_size: int = 4,
             on_commit: Callable[[float], None] | None = None,
             source: str = "ledger") -> DeliveryLedger:
    """The PostgreSQL ledger at `url` (psycopg imported now, not before)."""
    try:
        from procpoll.ledger_pg import PostgresLedger  # noqa: PLC0415 -- optional dependency
    except ImportError as exc:
        raise ConfigError(f"{source}: ledger.url: a PostgreSQL ledger needs psycopg "
                          f"({exc}): {EXTRA_HINT}") from None
    return PostgresLedger(url, retention_s=retention_s, pool_size=pool_size,
                          on_commit=on_commit)
