"""The SQL files ship inside the package: read through importlib.resources and present in a built wheel."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import duckdb
import pytest

import visrec_pipeline
from visrec_pipeline import db

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIR = Path(visrec_pipeline.__file__).resolve().parent
SQL_DIR = PACKAGE_DIR / "sql"
SQL_NAMES = sorted(p.stem for p in SQL_DIR.glob("*.sql"))
# A runner call with a literal file name: db.run_sql(conn, "name"), query_df(conn, "name", ...), ...
RUNNER_CALL = re.compile(r"\b(?:run_sql|query_df|query_one)\(\s*\w+,\s*\"(\w+)\"")


def _uv() -> str | None:
    """uv as `make install` finds it; `uv run` exports its own path as UV."""
    for candidate in (os.environ.get("UV"), shutil.which("uv"), str(Path.home() / ".local/bin/uv")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def test_the_package_holds_the_sql_and_the_repo_top_level_does_not():
    assert len(SQL_NAMES) >= 30
    assert not (REPO / "sql").exists()


@pytest.mark.parametrize("name", SQL_NAMES)
def test_every_sql_file_loads_through_importlib_resources_and_parses(name):
    text = db.sql(name)
    assert text == (SQL_DIR / f"{name}.sql").read_text(encoding="utf-8")
    assert duckdb.extract_statements(text)


def test_every_file_name_the_code_runs_exists():
    used = {
        m.group(1)
        for path in PACKAGE_DIR.rglob("*.py")
        for m in RUNNER_CALL.finditer(path.read_text(encoding="utf-8"))
    }
    assert {"ingest_write_batch", "embeddings_todo", "images_upsert", "triple_sets_table"} <= used
    assert used <= set(SQL_NAMES), sorted(used - set(SQL_NAMES))


def test_run_sql_binds_each_statement_its_own_named_parameters_and_names_a_missing_one():
    conn = duckdb.connect()
    db.run_sql(conn, "ingest_tables")
    assert db.query_df(conn, "ingest_batches_summary").empty
    with pytest.raises(KeyError, match=r"sql/split_build.sql needs parameter\(s\) \['n', 'use_given'\]"):
        db.run_sql(conn, "split_build")
    assert db.query_one(conn, "ingest_counts") == {"raw_rows_total": 0, "rejected_rows_total": 0, "batches": 0}


def test_a_built_wheel_contains_every_sql_file(tmp_path):
    uv = _uv()
    if uv is None:
        pytest.skip("uv not found (UV, PATH, ~/.local/bin/uv): cannot build the wheel")
    # --offline: the build backend (hatchling) is in uv's cache since `make install` built the project
    built = subprocess.run(
        [uv, "build", "--wheel", "--offline", "--quiet", "--out-dir", str(tmp_path), str(REPO)],
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-4000:]
    (wheel,) = tmp_path.glob("visrec_pipeline-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n for n in zf.namelist() if n.startswith("visrec_pipeline/sql/")}
    assert shipped == {f"visrec_pipeline/sql/{name}.sql" for name in SQL_NAMES}
