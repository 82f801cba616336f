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
from collections.abc import Mapping
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterator

import duckdb

# Read as package data (not a path beside the source tree): an installed wheel carries them.
SQL_PACKAGE = "visrec_pipeline.sql"

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
    """Text of ``visrec_pipeline/sql/<name>.sql``."""
    return files(SQL_PACKAGE).joinpath(f"{name}.sql").read_text(encoding="utf-8")


def run_sql(conn: duckdb.DuckDBPyConnection, name: str, params: Mapping[str, Any] | None = None):
    """Execute every statement of ``sql/<name>.sql``; returns the connection after the last one.

    DuckDB binds prepared parameters only for single statements, so the file is split with
    DuckDB's own parser and every statement gets just the ``$name`` parameters it uses.
    """
    params = dict(params or {})
    conn.execute("SET enable_progress_bar = false")  # no terminal bars in step logs
    result = conn
    for statement in duckdb.extract_statements(sql(name)):
        wanted = statement.named_parameters
        missing = wanted - params.keys()
        if missing:
            raise KeyError(f"sql/{name}.sql needs parameter(s) {sorted(missing)}")
        result = conn.execute(statement, {k: params[k] for k in wanted}) if wanted else conn.execute(statement)
    return result


def query_df(conn: duckdb.DuckDBPyConnection, name: str, params: Mapping[str, Any] | None = None):
    """The last statement's result of ``sql/<name>.sql`` as a pandas DataFrame."""
    return run_sql(conn, name, params).df()


def query_one(conn: duckdb.DuckDBPyConnection, name: str, params: Mapping[str, Any] | None = None) -> dict:
    """The single row of the last statement of ``sql/<name>.sql`` as a dict."""
    cursor = run_sql(conn, name, params)
    names = [d[0] for d in cursor.description]
    rows = cursor.fetchall()  # fetch everything: DuckDB refuses new work while a result is unfinished
    if len(rows) != 1:
        raise ValueError(f"sql/{name}.sql returned {len(rows)} rows, expected 1")
    return dict(zip(names, rows[0]))


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
