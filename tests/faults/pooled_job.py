"""A one-step job whose step holds a slot of the ``duckdb`` pool, for the dead-run tests.

Run as ``python pooled_job.py project|plain`` with DAGSTER_HOME set: ``project`` executes it with the
code location's executor (``visrec_pipeline.definitions.EXECUTOR``), ``plain`` with Dagster's own
multiprocess executor (lighter: no torch preloaded; the run the tests kill). The step writes its pid
to ``$VISREC_TEST_MARK`` once it holds the slot, then sleeps ``$VISREC_TEST_HOLD_S`` seconds.
"""

import os
import sys
import time
from pathlib import Path

import dagster as dg

POOL = "duckdb"  # DUCKDB_POOL of visrec_pipeline/defs/resources.py


@dg.asset(pool=POOL)
def holds_the_pool() -> None:
    Path(os.environ["VISREC_TEST_MARK"]).write_text(str(os.getpid()))
    time.sleep(float(os.environ.get("VISREC_TEST_HOLD_S", "0")))


def project_job() -> dg.JobDefinition:
    from visrec_pipeline.definitions import EXECUTOR

    return dg.define_asset_job("pooled_project", executor_def=EXECUTOR).resolve(
        asset_graph=dg.Definitions(assets=[holds_the_pool]).resolve_asset_graph()
    )


def plain_job() -> dg.JobDefinition:
    executor = dg.multiprocess_executor.configured({"max_concurrent": 1})
    return dg.define_asset_job("pooled_plain", executor_def=executor).resolve(
        asset_graph=dg.Definitions(assets=[holds_the_pool]).resolve_asset_graph()
    )


if __name__ == "__main__":
    target = {"project": project_job, "plain": plain_job}[sys.argv[1]]
    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(dg.reconstructable(target), instance=instance, raise_on_error=False)
    print("run", result.run_id, result.success, flush=True)
    sys.exit(0 if result.success else 1)
