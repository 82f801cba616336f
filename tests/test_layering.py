"""The library packages stay Dagster-free: importing them never imports dagster (docs/DESIGN.md, Layout)."""

from __future__ import annotations

import subprocess
import sys

# every package and module the layout table marks "imports dagster? no"
LIBRARY = (
    "visrec_pipeline.paths",
    "visrec_pipeline.db",
    "visrec_pipeline.atomic",
    "visrec_pipeline.processes",
    "visrec_pipeline.diskspace",
    "visrec_pipeline.step_memory",
    "visrec_pipeline.lineage",
    "visrec_pipeline.model_io",
    "visrec_pipeline.demo",
    "visrec_pipeline.ingest",
    "visrec_pipeline.images",
    "visrec_pipeline.embeddings",
    "visrec_pipeline.recsys",
    "visrec_pipeline.pipeline",
    "visrec_pipeline.reporting",
    "visrec_pipeline.distributed",
)

# imports every module of LIBRARY (packages walked; __main__ modules would run) and prints the
# first one after whose import dagster is loaded
_PROBE = """
import importlib, pkgutil, sys

def load(name):
    module = importlib.import_module(name)
    if "dagster" in sys.modules:
        print("dagster imported by", name)
        sys.exit(1)
    return module

count = 0
for name in sys.argv[1:]:
    module = load(name)
    count += 1
    if hasattr(module, "__path__"):
        # walk_packages imports subpackages (not modules) to look inside them
        for sub in list(pkgutil.walk_packages(module.__path__, name + ".")):
            if not sub.name.endswith("__main__"):
                load(sub.name)
                count += 1
print(count, "modules")
"""


def _probe(*modules: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PROBE, *modules], capture_output=True, text=True, timeout=300)


def test_library_packages_do_not_import_dagster():
    run = _probe(*LIBRARY)
    assert run.returncode == 0, run.stdout + run.stderr
    assert int(run.stdout.split()[0]) > len(LIBRARY)  # the packages' modules were walked, not just imported


def test_the_probe_sees_a_dagster_import():
    run = _probe("visrec_pipeline.paths", "visrec_pipeline.defs.resources")
    assert run.returncode == 1 and "dagster imported by visrec_pipeline.defs.resources" in run.stdout
