"""Run the statements of one ``sql/<name>.sql`` file, each with the parameters it names.

DuckDB binds prepared parameters only for single statements, so a file is
split with DuckDB's own parser and every statement gets just the ``$name``
parameters it uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import duckdb

from visrec_pipeline import db


def run_sql(conn: duckdb.DuckDBPyConnection, name: str, params: Mapping[str, Any] | None = None):
    """Execute every statement of ``sql/<name>.sql``; returns the connection after the last one."""
    params = dict(params or {})
    conn.execute("SET enable_progress_bar = false")  # no terminal bars in step logs
    result = conn
    for statement in duckdb.extract_statements(db.sql(name)):
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
