"""Issue 14, case 1: a run killed while its step holds the ``duckdb`` pool slot does not block later runs.

Real Dagster runs in child processes on an instance built from a copy of the project's
``dagster_home/dagster.yaml`` (pool ``duckdb``, limit 1), killed with SIGKILL mid-step; no daemon runs.
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
import pytest

REPO = Path(__file__).resolve().parents[2]
JOB_SCRIPT = Path(__file__).with_name("pooled_job.py")
POOL = "duckdb"
# the second run's whole budget (a fresh process importing torch and the location twice: ~10-20 s
# on 2 busy cores); before the fix it waited for the killed run's slot forever
NEXT_RUN_LIMIT_S = 150


def _home(tmp_path: Path) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    return home


def _start(home: Path, which: str, mark: Path, hold_s: float) -> subprocess.Popen:
    env = dict(os.environ, DAGSTER_HOME=str(home), VISREC_TEST_MARK=str(mark), VISREC_TEST_HOLD_S=str(hold_s))
    return subprocess.Popen(
        [sys.executable, str(JOB_SCRIPT), which],
        cwd=home,  # a relative storage folder of dagster.yaml stays inside the temp home
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the run, its step worker and helpers
    )


def _holding_step_pid(proc: subprocess.Popen, mark: Path, timeout_s: float = 90) -> int:
    """Wait until the run's step holds the pool slot (it wrote its pid); the step's pid."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if mark.is_file() and mark.read_text():
            return int(mark.read_text())
        if proc.poll() is not None:
            pytest.fail(f"the run exited with {proc.returncode} before its step started:\n{proc.stderr.read()[-4000:]}")
        time.sleep(0.05)
    pytest.fail(f"the pooled step did not start within {timeout_s} s")


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _claims(instance: dg.DagsterInstance) -> list[str]:
    return [slot.run_id for slot in instance.event_log_storage.get_concurrency_info(POOL).claimed_slots]


def _failure_message(instance: dg.DagsterInstance, run_id: str) -> str:
    from dagster import DagsterEventType

    (record,) = instance.get_records_for_run(run_id, of_type=DagsterEventType.RUN_FAILURE).records
    return record.event_log_entry.dagster_event.message


@pytest.mark.timeout(NEXT_RUN_LIMIT_S + 120)
def test_a_run_killed_in_a_pooled_step_does_not_block_the_next_run(tmp_path):
    home = _home(tmp_path)
    killed = _start(home, "plain", tmp_path / "killed.pid", hold_s=600)
    try:
        _holding_step_pid(killed, tmp_path / "killed.pid")
    finally:
        _kill_group(killed)  # kill -9 of the run and its step process, mid-step

    with dg.DagsterInstance.from_config(str(home)) as instance:
        (dead,) = instance.get_runs()
        assert dead.status == dg.DagsterRunStatus.STARTED and _claims(instance) == [dead.run_id]

    # the next run, with the code location's executor (as `make demo` and the UI launch), completes
    nxt = _start(home, "project", tmp_path / "next.pid", hold_s=0)
    try:
        out, err = nxt.communicate(timeout=NEXT_RUN_LIMIT_S)
    except subprocess.TimeoutExpired:
        _kill_group(nxt)
        pytest.fail(f"the next run did not finish within {NEXT_RUN_LIMIT_S} s: blocked by the killed run's slot")
    assert nxt.returncode == 0, out[-3000:] + err[-6000:]
    next_run_id = out.split("run ")[1].split()[0]

    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_run_by_id(dead.run_id).status == dg.DagsterRunStatus.FAILURE
        message = _failure_message(instance, dead.run_id)
        assert dead.run_id in message and f"pool {POOL}" in message and "processes are gone" in message
        assert _claims(instance) == [] and instance.event_log_storage.get_concurrency_run_ids() == set()
        # the next run's own log says what it released
        engine = [r.event_log_entry.dagster_event.message for r in instance.get_records_for_run(next_run_id).records
                  if r.event_log_entry.dagster_event is not None]
        assert any(dead.run_id in m and "slots freed" in m for m in engine if m)


@pytest.mark.timeout(180)
def test_a_live_step_keeps_its_slot_until_its_process_is_gone(tmp_path):
    from visrec_pipeline.defs.dead_runs import release_dead_runs, watching_dead_runs

    home = _home(tmp_path)
    run = _start(home, "plain", tmp_path / "step.pid", hold_s=600)
    try:
        step_pid = _holding_step_pid(run, tmp_path / "step.pid")
        os.kill(run.pid, signal.SIGKILL)  # only the run's own process: its step worker goes on
        run.wait(timeout=30)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            (orphaned,) = instance.get_runs()
            assert release_dead_runs(instance) == []  # the step's process still runs
            assert _claims(instance) == [orphaned.run_id]
            assert instance.get_run_by_id(orphaned.run_id).status == dg.DagsterRunStatus.STARTED

            released = []
            with watching_dead_runs(instance, "no-own-run", released.append, interval_s=0.2):
                time.sleep(1.0)
                assert released == []
                os.kill(step_pid, signal.SIGKILL)  # now the last process of the run is gone too
                deadline = time.monotonic() + 30
                while not released and time.monotonic() < deadline:
                    time.sleep(0.1)
            (gone,) = released
            assert (gone.run_id, gone.pools) == (orphaned.run_id, (POOL,))
            assert {run.pid, step_pid} <= set(gone.pids)
            assert _claims(instance) == []
            assert instance.get_run_by_id(orphaned.run_id).status == dg.DagsterRunStatus.FAILURE
    finally:
        _kill_group(run)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="start times and zombies are read from /proc")
def test_process_alive_tells_a_reused_pid_and_a_zombie_from_a_live_process():
    from visrec_pipeline.processes import process_alive

    me = os.getpid()
    assert process_alive(me) and process_alive(me, seen_at=time.time())
    # this pid, seen running an hour ago? this process started later: that was another one
    assert not process_alive(me, seen_at=time.time() - 3600)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # exited but not reaped yet: a zombie
        if Path(f"/proc/{child.pid}/stat").read_text().rsplit(") ", 1)[1][0] == "Z":
            break
        time.sleep(0.02)
    assert not process_alive(child.pid)
    child.wait()
    assert not process_alive(child.pid)
