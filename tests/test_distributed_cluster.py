"""The private Ray cluster and the compute settings (visrec_pipeline.distributed.cluster)."""

from __future__ import annotations

import os

import pytest

from visrec_pipeline.distributed.cluster import ComputeSettings, parse_local_address


def test_compute_settings_validate_and_count_workers():
    assert not ComputeSettings().distributed
    assert ComputeSettings(engine="ray").distributed
    with pytest.raises(ValueError, match="engine"):
        ComputeSettings(engine="spark")
    with pytest.raises(ValueError, match="workers"):
        ComputeSettings(engine="ray", workers=-1)
    assert ComputeSettings(engine="ray").worker_count(cluster_cpus=6) == 6
    assert ComputeSettings(engine="ray", workers=2).worker_count(cluster_cpus=6) == 2
    assert ComputeSettings(engine="ray", workers=9, cpus_per_worker=2).worker_count(cluster_cpus=6) == 3
    assert ComputeSettings(engine="ray", gpus_per_worker=1).worker_count(cluster_cpus=8, cluster_gpus=2) == 2
    with pytest.raises(RuntimeError, match="not enough for one worker"):
        ComputeSettings(engine="ray", gpus_per_worker=1).worker_count(cluster_cpus=8, cluster_gpus=0)


def test_local_address_parsing():
    assert parse_local_address("local:3") == 3
    assert parse_local_address("local") == 2
    assert parse_local_address("auto") is None
    assert parse_local_address("ray://head:10001") is None
    with pytest.raises(ValueError, match="local:<workers>"):
        parse_local_address("local:two")
    with pytest.raises(ValueError, match="at least one"):
        parse_local_address("local:0")


def test_private_cluster_runs_tasks_in_two_worker_processes(ray_cluster):
    import ray

    resources = ray.cluster_resources()
    assert resources["CPU"] == 2
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 3  # the head (no CPU) and two worker nodes

    @ray.remote(num_cpus=1)
    def where(i: int) -> tuple[int, str, bool]:
        import time

        import visrec_pipeline  # workers import the package as the driver does

        time.sleep(0.5)  # both nodes get one while the other is busy
        return os.getpid(), ray.get_runtime_context().get_node_id(), visrec_pipeline is not None

    out = ray.get([where.remote(i) for i in range(4)])
    assert {pid for pid, _, _ in out} - {os.getpid()}, "tasks ran in the driver"
    assert len({node for _, node, _ in out}) == 2
    assert all(ok for _, _, ok in out)


def test_private_cluster_stops_its_processes_only():
    from visrec_pipeline.distributed.cluster import LocalRayCluster

    cluster = LocalRayCluster(workers=1)
    pids = [p.pid for p in cluster._procs]
    temp = cluster.temp_dir
    assert temp.exists()
    cluster.close()
    assert not _live_members(set(pids)), "a node's raylet, GCS or worker outlived close()"
    assert not temp.exists()


def _live_members(groups: set[int]) -> list[str]:
    """Processes of these process groups that are not zombies (a container's init may not reap them)."""
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc to list process groups")
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp, ...
        if int(fields[2]) in groups and fields[0] != "Z":
            live.append(stat[:80])
    return live


def test_one_private_cluster_for_a_run_is_joined_by_address():
    import subprocess
    import sys

    from visrec_pipeline.distributed.cluster import _COUNT_NODES, cluster_for_run

    local = ComputeSettings()
    with cluster_for_run(local) as same:
        assert same is local  # nothing to start
    with cluster_for_run(ComputeSettings(engine="ray", address="ray://head:10001")) as same:
        assert same.address == "ray://head:10001"
    with cluster_for_run(ComputeSettings(engine="ray", address="local:1", workers=3)) as run:
        assert run.address.startswith("127.0.0.1:") and run.workers == 3
        # a step process joins it by address, with Ray's default settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        out = subprocess.run([sys.executable, "-c", _COUNT_NODES, run.address], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "2", out.stderr[-2000:]
