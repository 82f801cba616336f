"""DuckDB access shared by the Dagster layer, benchmarks and tests.

DuckDB allows one writing process per database file. Every connection is
opened through :func:`connect`, which waits for the file lock with jittered
exponential backoff instead of failing, and callers hold connections only for
short reads and writes (heavy compute happens with the connection closed).
Together with the ``duckdb`` concurrency pool (limit 1, ``dagster_home``)
this makes overlapping steps and runs queue rather than crash.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import duckdb

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"

_LOCK_MARKERS = ("lock", "Conflicting lock", "being used by another process")


def _is_lock_error(exc: BaseException) -> bool:
    return isinstance(exc, (duckdb.IOException, duckdb.ConnectionException)) or any(
        m in str(exc) for m in _LOCK_MARKERS
    )


def open_with_retry(
    database: str | Path,
    *,
    read_only: bool = False,
    config: dict[str, Any] | None = None,
    timeout_s: float = 600.0,
    base_delay_s: float = 0.05,
    max_delay_s: float = 2.0,
) -> duckdb.DuckDBPyConnection:
    """Open ``database``, retrying with full-jitter backoff while another process holds the lock."""
    database = str(database)
    if database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while True:
        try:
            return duckdb.connect(database, read_only=read_only, config=config or {})
        except (duckdb.Error, RuntimeError) as exc:
            if not _is_lock_error(exc) or time.monotonic() >= deadline:
                raise
            delay = min(max_delay_s, base_delay_s * (2**attempt))
            time.sleep(random.uniform(0, delay) + 0.01)
            attempt += 1


@contextmanager
def connect(database: str | Path, *, read_only: bool = False, timeout_s: float = 600.0) -> Iterator[duckdb.DuckDBPyConnection]:
    conn = open_with_retry(database, read_only=read_only, timeout_s=timeout_s)
    try:
        yield conn
    finally:
        conn.close()


def sql(name: str) -> str:
    """Text of ``sql/<name>.sql``."""
    path = SQL_DIR / f"{name}.sql"
    return path.read_text()


def run_script(conn: duckdb.DuckDBPyConnection, name: str) -> None:
    """Run every statement of ``sql/<name>.sql`` (DDL/DML without parameters)."""
    conn.execute(sql(name))


@contextmanager
def transaction(conn: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN/COMMIT, ROLLBACK on any error: a killed or failed step leaves the previous state."""
    conn.execute("BEGIN TRANSACTION")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def table_exists(conn: duckdb.DuckDBPyConnection, table: str) -> bool:
    # fetchall, not fetchone: DuckDB refuses e.g. register() while a result is unfinished
    return bool(
        conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]
        ).fetchall()[0][0]
    )
