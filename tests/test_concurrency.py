"""One writer: overlapping runs in separate processes, a held file lock, and a killed ingest.

Every writer here is a separate OS process (the test's own and children it
starts) on the same DuckDB file; the Dagster runs use an instance built from a copy of the
project's ``dagster_home/dagster.yaml`` (its ``duckdb`` pool limits).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pandas as pd
import pytest

from visrec_pipeline import db
from visrec_pipeline.defs.ingest import INGEST_ASSETS
from visrec_pipeline.defs.resources import DUCKDB_POOL, VisrecDuckDB, default_resources
from visrec_pipeline.ingest import ingest_batch
from visrec_pipeline.paths import Workspace

REPO = Path(__file__).resolve().parent.parent
INSTANCE_YAML = REPO / "dagster_home" / "dagster.yaml"
TIMEOUT_S = 240

MATERIALIZE_SCRIPT = r"""
import sys, time
from pathlib import Path
import dagster as dg
from visrec_pipeline.defs.ingest import INGEST_ASSETS
from visrec_pipeline.defs.resources import default_resources

go = Path(sys.argv[1])
with dg.DagsterInstance.get() as instance:
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.01)
    result = dg.materialize(INGEST_ASSETS, resources=default_resources(), instance=instance, raise_on_error=False)
print("run", result.run_id, result.success, flush=True)
sys.exit(0 if result.success else 1)
"""

HOLD_LOCK_SCRIPT = r"""
import sys, time, duckdb
conn = duckdb.connect(sys.argv[1])
conn.execute("CREATE TABLE IF NOT EXISTS held (x INTEGER)")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.close()
print("released", flush=True)
"""

KILLED_INGEST_SCRIPT = r"""
import sys, time, duckdb
from visrec_pipeline.ingest import ingest_batch, store

real_run_sql = store.run_sql

def run_sql_then_hang(conn, name, params=None):
    out = real_run_sql(conn, name, params)
    if name == "ingest_write_batch":  # rows deleted and inserted, transaction not committed
        print("in transaction", conn.execute("SELECT count(*) FROM raw_interactions").fetchone()[0], flush=True)
        time.sleep(600)
    return out

store.run_sql = run_sql_then_hang
with duckdb.connect(sys.argv[1]) as conn:
    ingest_batch(conn, "initial", sys.argv[2])
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def _spawn(script: str, *args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=env or _env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(proc: subprocess.Popen, marker: str) -> str:
    """Read stdout lines until one starts with ``marker``; fail with the child's stderr if it exits first."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(marker):
            return line
        if not line and proc.poll() is not None:
            pytest.fail(f"child exited with {proc.returncode} before {marker!r}:\n{proc.stderr.read()[-4000:]}")
    pytest.fail(f"no {marker!r} from the child within {TIMEOUT_S} s")


def _write_interactions(path: Path, n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "user_id": rng.integers(0, 400, n),
            "item_id": rng.integers(0, 2000, n),
            "timestamp": rng.integers(1_500_000_000, 1_600_000_000, n),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return df


def _step_intervals(instance, run_id: str) -> dict[str, tuple[float, float]]:
    from dagster import DagsterEventType

    starts, ends = {}, {}
    for record in instance.get_records_for_run(run_id).records:
        entry = record.event_log_entry
        if entry.dagster_event is None:
            continue
        if entry.dagster_event.event_type == DagsterEventType.STEP_START:
            starts[entry.step_key] = entry.timestamp
        elif entry.dagster_event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
            ends[entry.step_key] = entry.timestamp
    return {k: (starts[k], ends[k]) for k in starts}


def test_two_processes_materialize_the_same_database_at_once(tmp_path, monkeypatch):
    """This test process and a child process run the ingest assets at the same moment."""
    dataset = tmp_path / "dataset"
    df = _write_interactions(dataset / "interactions.csv", 10_000, seed=5)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(INSTANCE_YAML, home / "dagster.yaml")
    data_dir = tmp_path / "data"
    env = _env(DAGSTER_HOME=str(home), VISREC_DATA_DIR=str(data_dir), VISREC_DATASET=str(dataset))
    go = tmp_path / "go"
    monkeypatch.chdir(home)  # a relative storage folder in dagster.yaml stays inside the temp home
    ws = Workspace.from_settings(data_dir, str(dataset))

    # this instance creates the storage once, as `dagster dev` would; the child only uses it
    with dg.DagsterInstance.from_config(str(home)) as instance:
        # Dagster creates a pool at its first claim; two runs claiming that very first slot at the same
        # moment could both get one (seen once), so the pool exists before they start, as it does on
        # any instance that has run the pipeline before. The database itself is safe either way (lock
        # retries); this test checks the pool.
        instance.event_log_storage.initialize_concurrency_limit_to_default(DUCKDB_POOL)
        child = _spawn(MATERIALIZE_SCRIPT, str(go), env=env, cwd=home)
        try:
            _wait_for(child, "ready")
            go.touch()  # both start their runs now
            mine = dg.materialize(INGEST_ASSETS, resources=default_resources(ws), instance=instance)
            out, err = child.communicate(timeout=TIMEOUT_S)
            assert child.returncode == 0, f"the child's run failed:\n{out}\n{err[-6000:]}"
        finally:
            if child.poll() is None:
                child.kill()
        assert mine.success
        run_ids = [mine.run_id, out.split("run ")[1].split()[0]]

    db_path = tmp_path / "data" / "dataset" / "visrec.duckdb"
    with db.connect(db_path, read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM raw_interactions").fetchone() == (len(df),)
        assert conn.execute("SELECT count(*) FROM ingest_batches").fetchone() == (1,)
        pairs = df.drop_duplicates(["user_id", "item_id"]).shape[0]
        assert conn.execute("SELECT count(*) FROM interactions").fetchone() == (pairs,)
        assert conn.execute(
            "SELECT count(*) FROM (SELECT user_id, item_id FROM interactions GROUP BY ALL HAVING count(*) > 1)"
        ).fetchone() == (0,)
        n_train, n_predict = conn.execute(
            "SELECT (SELECT count(*) FROM split_train), (SELECT sum(len(predict)) FROM split_holdout)"
        ).fetchone()
        assert n_train + n_predict == pairs
        assert conn.execute("SELECT count(*) FROM item_catalog").fetchone() == (df["item_id"].nunique(),)

    # the duckdb pool (limit 1) let one step of the two runs hold the database at a time
    with dg.DagsterInstance.from_config(str(home)) as instance:
        a, b = (_step_intervals(instance, run_id) for run_id in run_ids)
    assert set(a) == set(b) == {"raw_interactions", "interactions", "item_catalog", "split"}
    first_a, last_a = min(v[0] for v in a.values()), max(v[1] for v in a.values())
    first_b, last_b = min(v[0] for v in b.values()), max(v[1] for v in b.values())
    assert first_a < last_b and first_b < last_a, "the two runs did not overlap in time"
    for ka, (sa, ea) in a.items():
        for kb, (sb, eb) in b.items():
            assert ea <= sb or eb <= sa, f"two duckdb-pool steps ran at the same time: {ka} and {kb}"


def test_open_with_retry_waits_for_a_lock_held_by_another_process(tmp_path):
    path = tmp_path / "held.duckdb"
    holder = _spawn(HOLD_LOCK_SCRIPT, str(path), "3")
    try:
        _wait_for(holder, "locked")
        # while the other process holds the file, a short timeout gives up with DuckDB's lock error
        with pytest.raises(duckdb.IOException, match="lock"):
            db.open_with_retry(path, timeout_s=0.3)
        started = time.monotonic()
        conn = db.open_with_retry(path, timeout_s=60)
        waited = time.monotonic() - started
        try:
            assert conn.execute("SELECT count(*) FROM held").fetchone() == (0,)
            conn.execute("INSERT INTO held VALUES (1)")
        finally:
            conn.close()
        assert holder.wait(timeout=TIMEOUT_S) == 0
        assert "released" in holder.stdout.read()
        assert waited > 1.0  # it waited for the holder instead of failing
    finally:
        if holder.poll() is None:
            holder.kill()


def test_resource_connection_waits_for_a_lock_held_by_another_process(tmp_path):
    path = tmp_path / "held.duckdb"
    holder = _spawn(HOLD_LOCK_SCRIPT, str(path), "2")
    try:
        _wait_for(holder, "locked")
        with VisrecDuckDB(database=str(path), lock_timeout_s=60).get_connection() as conn:
            assert conn.execute("SELECT count(*) FROM held").fetchone() == (0,)
        assert holder.wait(timeout=TIMEOUT_S) == 0
    finally:
        if holder.poll() is None:
            holder.kill()


def test_ingest_killed_inside_its_transaction_loses_and_duplicates_nothing(tmp_path):
    db_path = tmp_path / "visrec.duckdb"
    first = _write_interactions(tmp_path / "first.csv", 1_000, seed=1)
    with db.connect(db_path) as conn:
        ingest_batch(conn, "initial", tmp_path / "first.csv")
        before = conn.execute("SELECT * FROM raw_interactions ORDER BY source_line").fetchall()
    assert len(before) == len(first)

    big = _write_interactions(tmp_path / "big.csv", 200_000, seed=2)
    child = _spawn(KILLED_INGEST_SCRIPT, str(db_path), str(tmp_path / "big.csv"))
    try:
        line = _wait_for(child, "in transaction")
        assert int(line.split()[-1]) == len(big)  # the new rows were in, uncommitted
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=TIMEOUT_S) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()

    with db.connect(db_path) as conn:
        assert conn.execute("SELECT * FROM raw_interactions ORDER BY source_line").fetchall() == before
        assert conn.execute("SELECT count(*) FROM ingest_batches").fetchone() == (1,)
        # re-running the killed ingest completes it, once
        ingest_batch(conn, "initial", tmp_path / "big.csv")
        ingest_batch(conn, "initial", tmp_path / "big.csv")
        assert conn.execute("SELECT count(*) FROM raw_interactions").fetchone() == (len(big),)
        assert conn.execute("SELECT sum(user_id), sum(item_id), sum(ts) FROM raw_interactions").fetchone() == (
            int(big["user_id"].sum()),
            int(big["item_id"].sum()),
            int(big["timestamp"].sum()),
        )
