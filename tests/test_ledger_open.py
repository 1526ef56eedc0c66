"""[ledger] url / path / pool_size in the config, and open_ledger picking the backend."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from procpoll.config import parse_config
from procpoll.errors import ConfigError
from procpoll.ledger import Ledger
from procpoll.ledger_open import open_ledger, open_url
from tests.pg import fresh_schema_url


def document(**ledger: Any) -> dict[str, Any]:
    return {"ledger": ledger, "sinks": [{"name": "out", "type": "stdout"}]}


def problems(**ledger: Any) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse_config(document(**ledger), "cfg.toml")
    return raised.value.problems


def test_sqlite_url_sets_the_path(tmp_path: Path) -> None:
    """sqlite:// followed by the file's path is the same as ledger.path; url reads ""."""
    config = parse_config(document(url=f"sqlite://{tmp_path}/l.sqlite3"), "cfg.toml")
    assert (config.ledger.path, config.ledger.url) == (tmp_path / "l.sqlite3", "")


def test_postgresql_url_is_kept_with_its_pool_size() -> None:
    """A postgresql:// URL is the ledger's url; pool_size defaults to 4 and can be set."""
    url = "postgresql://procpoll@db.internal:5432/procpoll?schema=prod"
    assert parse_config(document(url=url), "cfg.toml").ledger.url == url
    assert parse_config(document(url=url), "cfg.toml").ledger.pool_size == 4
    assert parse_config(document(url=url, pool_size=8), "cfg.toml").ledger.pool_size == 8


def test_url_and_path_together_are_refused(tmp_path: Path) -> None:
    """Two places for one ledger is a mistake: the error names ledger.url."""
    [found] = problems(url="postgresql://u@h/db", path=str(tmp_path / "l.sqlite3"))
    assert "ledger.url" in found and "not both" in found


@pytest.mark.parametrize("url", ["mysql://u@h/db", "/var/lib/procpoll/ledger.sqlite3",
                                 "postgresql://u@h:port/db", "postgresql://u@h/db?schema="])
def test_malformed_url_names_the_key(url: str) -> None:
    """An unknown scheme, a bare path, a non-numeric port, an empty schema: each is one
    problem naming ledger.url."""
    [found] = problems(url=url)
    assert found.startswith("cfg.toml: ledger.url: ")


def test_postgresql_url_without_psycopg_names_the_extra(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without psycopg installed, a postgresql URL is a config error saying what to install."""
    monkeypatch.setitem(sys.modules, "psycopg", None)
    [found] = problems(url="postgresql://u@h/db")
    assert "ledger.url" in found and "procpoll[postgresql]" in found


def test_open_url_without_psycopg_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening a PostgreSQL ledger without psycopg raises ConfigError naming the extra,
    not an ImportError traceback."""
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.delitem(sys.modules, "procpoll.ledger_pg", raising=False)
    with pytest.raises(ConfigError, match=r"procpoll\[postgresql\]"):
        open_url("postgresql://u@h/db", retention_s=3600)


def test_open_ledger_gives_sqlite_for_a_path(tmp_path: Path) -> None:
    """No url: the SQLite ledger at ledger.path, shared as asked."""
    config = parse_config(document(path=str(tmp_path / "l.sqlite3")), "cfg.toml")
    ledger = open_ledger(config, shared=True)
    try:
        assert isinstance(ledger, Ledger) and ledger.shared
        assert (tmp_path / "l.sqlite3").exists()
    finally:
        ledger.close()


def test_open_ledger_gives_postgresql_for_a_postgresql_url() -> None:
    """A postgresql URL opens a shared PostgreSQL ledger whose name hides the password."""
    with fresh_schema_url() as url:
        config = parse_config(document(url=url.replace("postgres@", "postgres:pw@")),
                              "cfg.toml")
        ledger = open_ledger(config, shared=False)
        try:
            assert ledger.shared
            assert "pw" not in ledger.name and ":***@" in ledger.name
            ledger.ping()
        finally:
            ledger.close()
