"""Where distributed work runs: connecting to a Ray cluster, and starting a private one on this machine.

No Dagster import: the steps, the benchmark, the CLI and the tests use the same code.

A Ray cluster's workers import ``visrec_pipeline`` from their own Python environment (the same
package and version as the driver) and read the pipeline's files (image store, feature shards,
checkpoints) at the paths the driver gives them: the data folder must be shared storage that every
node mounts at the same path. A private cluster started here (:class:`LocalRayCluster`) satisfies
both, since its nodes are processes of this machine started from this interpreter.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

ENGINES = ("local", "ray")

# A driver started under `uv run` (make, the tests) would have Ray rebuild a uv environment for every
# worker from an uploaded copy of the working dir (a hook Ray turns on by default), and those workers
# then lack the installed packages; the workers use the Python their node was started with.
NO_UV_RUN_HOOK = {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}


def _disable_uv_run_hook() -> None:
    os.environ.update(NO_UV_RUN_HOOK)  # read when ray is first imported
    from ray._private import ray_constants

    ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False  # ray may be imported already


@dataclass(frozen=True)
class ComputeSettings:
    """How the heavy steps run. ``engine``: ``local`` (in the step's own process, the default) or
    ``ray``. ``address``: the Ray cluster to use: ``auto`` (the cluster this machine belongs to,
    e.g. after ``ray start``), ``ray://host:10001`` (Ray client), ``host:port`` (a head's GCS), or
    ``local:N`` (start a private cluster of N worker processes on this machine for the step's
    duration: no setup, for trying it out and for tests). ``workers``: parallel tasks or actors a
    step uses (0: one per CPU the cluster has; capped by it). ``cpus_per_worker`` / ``gpus_per_worker``:
    the resources each of them declares (GPUs: one per actor where the cluster has them)."""

    engine: str = "local"
    address: str = "auto"
    workers: int = 0
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"compute engine must be one of {ENGINES}, got {self.engine!r}")
        if self.workers < 0:
            raise ValueError(f"compute workers must be >= 0, got {self.workers}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ValueError("compute cpus_per_worker must be > 0 and gpus_per_worker >= 0")

    @property
    def distributed(self) -> bool:
        return self.engine == "ray"

    def worker_count(self, cluster_cpus: float, cluster_gpus: float = 0.0) -> int:
        """Workers to start on a cluster of ``cluster_cpus`` CPUs (and GPUs): as asked, at most what fits."""
        fit = int(cluster_cpus // self.cpus_per_worker)
        if self.gpus_per_worker > 0:
            fit = min(fit, int(cluster_gpus // self.gpus_per_worker))
        if fit < 1:
            raise RuntimeError(
                f"the Ray cluster has {cluster_cpus:g} CPU(s) and {cluster_gpus:g} GPU(s): not enough for one worker "
                f"of {self.cpus_per_worker:g} CPU(s) and {self.gpus_per_worker:g} GPU(s)"
            )
        return fit if self.workers == 0 else min(self.workers, fit)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    # explicit free ports: two private clusters on one machine (tests, a demo beside a bench) must not
    # collide on Ray's fixed defaults (the dashboard agent's, the metrics', the runtime-env agent's)
    return [
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
    ]


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _ray_cli() -> str:
    cli = Path(sys.executable).with_name("ray")
    if not cli.exists():
        found = shutil.which("ray")
        if found is None:
            raise RuntimeError("the `ray` command is not installed beside this Python (pip install 'ray[data,train]')")
        return found
    return str(cli)


class LocalRayCluster:
    """A private Ray cluster of this machine: a head that runs no tasks and ``workers`` worker nodes
    (separate processes) of ``cpus_per_worker`` CPUs (and ``gpus_per_worker`` of this machine's GPUs)
    each, started from this interpreter; ``close()`` stops exactly these processes (never ``ray
    stop``, which stops every Ray process of the machine).

    Token authentication is off for it: its nodes are processes of this machine and its state lives
    in a private temp dir. A shared cluster should keep Ray's token authentication on."""

    def __init__(
        self,
        workers: int = 2,
        cpus_per_worker: int = 1,
        object_store_mb: int = 256,
        gpus_per_worker: int = 0,
        start_timeout_s: float = 90.0,
    ):
        if workers < 1:
            raise ValueError(f"a local Ray cluster needs >= 1 worker, got {workers}")
        self.workers = int(workers)
        # Ray's socket paths must stay under the 107-byte limit of AF_UNIX: a short temp dir
        self.temp_dir = Path(tempfile.mkdtemp(prefix="vray-", dir="/tmp" if os.path.isdir("/tmp") else None))
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            **NO_UV_RUN_HOOK,
            # the nodes must import this package as the driver does (e.g. a checkout that is not installed)
            "PYTHONPATH": os.pathsep.join(p for p in [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")] if p),
        }
        self._procs: list[subprocess.Popen] = []
        self.address = f"127.0.0.1:{_free_port()}"
        common = [
            "--block", "--disable-usage-stats", f"--temp-dir={self.temp_dir}",
            f"--object-store-memory={int(object_store_mb) * 2**20}",
        ]
        try:
            self._start(
                [_ray_cli(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.address.split(':')[1]}",
                 "--num-cpus=0", "--num-gpus=0", "--include-dashboard=false",
                 f"--ray-client-server-port={_free_port()}", *common, *_node_ports()],
                "head",
            )
            self._wait_for_port(start_timeout_s)
            for i in range(self.workers):
                # one node at a time: nodes of one machine starting at once race on the shared
                # session dir and one of them times out (seen with two)
                self._start(
                    [_ray_cli(), "start", f"--address={self.address}", "--node-ip-address=127.0.0.1",
                     f"--num-cpus={int(cpus_per_worker)}", f"--num-gpus={int(gpus_per_worker)}", *common, *_node_ports()],
                    f"worker{i}",
                )
                self._wait_for_log(f"worker{i}", start_timeout_s)
            self._wait_for(lambda n: n >= 1 + self.workers, start_timeout_s)
        except BaseException:
            self.close()
            raise

    def _start(self, argv: list[str], name: str) -> None:
        log = open(self.temp_dir / f"{name}.log", "wb")
        # own session: close() can signal the node's whole process group (raylet, workers, agents)
        self._procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True))

    def _wait_for_port(self, timeout_s: float) -> None:
        """Until the head's GCS accepts connections (cheap: no Ray driver started)."""
        host, port = self.address.rsplit(":", 1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._procs[0].poll() is not None:
                raise RuntimeError(f"the Ray head exited with code {self._procs[0].returncode}:\n{self._log_tails()}")
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"the Ray head did not listen within {timeout_s:.0f} s:\n{self._log_tails()}")

    def _wait_for_log(self, name: str, timeout_s: float) -> None:
        """Until node ``name`` says it started (its `ray start` prints so once its raylet is up)."""
        log, proc = self.temp_dir / f"{name}.log", self._procs[-1]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"Ray node {name} exited with code {proc.returncode}:\n{self._log_tails()}")
            if "Ray runtime started" in log.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise TimeoutError(f"Ray node {name} did not start within {timeout_s:.0f} s:\n{self._log_tails()}")

    def _alive_nodes(self) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _COUNT_NODES, self.address], env=self.env, capture_output=True, text=True, timeout=60
        )
        return int(out.stdout.strip() or 0) if out.returncode == 0 else 0

    def _wait_for(self, done, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for p in self._procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a Ray node process exited with code {p.returncode}:\n{self._log_tails()}")
            if done(self._alive_nodes()):
                return
            time.sleep(0.5)
        raise TimeoutError(f"the local Ray cluster did not start within {timeout_s:.0f} s:\n{self._log_tails()}")

    def _log_tails(self, lines: int = 15) -> str:
        # the temp dir goes with close(): the error carries what the nodes said
        out = []
        for log in sorted(self.temp_dir.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(out)

    def close(self, grace_s: float = 3.0) -> None:
        """Stop this cluster's processes: SIGTERM to each node's process group, SIGKILL to what is
        left after ``grace_s`` (a `ray start --block` takes tens of seconds to wind down by itself,
        and a private cluster has nothing to save)."""
        for p in self._procs:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self._procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self._procs:
            _signal_group(p, signal.SIGKILL)  # the group: raylet, GCS, workers and agents too
            p.wait(timeout=10)
        self._procs.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalRayCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# counts the live nodes of a cluster from a separate process: the caller's process may itself become
# a driver of that cluster later, and ray.init/shutdown in it would be wasted work
_COUNT_NODES = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
"""


def start_private_cluster(workers: int, attempts: int = 2) -> LocalRayCluster:
    """A :class:`LocalRayCluster`, started again once if a node fails to come up: on a loaded machine
    a node now and then times out while registering (seen under a test suite on 2 busy cores)."""
    for attempt in range(1, attempts + 1):
        try:
            return LocalRayCluster(workers=workers)
        except (RuntimeError, TimeoutError) as exc:
            if attempt == attempts:
                raise
            print(f"a private Ray cluster failed to start ({str(exc).splitlines()[0]}); starting it again", file=sys.stderr)
    raise AssertionError("unreachable")


def parse_local_address(address: str) -> int | None:
    """``local:N`` -> N (workers of a private cluster); anything else -> None."""
    if not address.startswith("local"):
        return None
    _, _, n = address.partition(":")
    try:
        workers = int(n) if n else 2
    except ValueError:
        raise ValueError(f"compute address {address!r}: expected local:<workers>, e.g. local:2") from None
    if workers < 1:
        raise ValueError(f"compute address {address!r}: needs at least one worker")
    return workers


@contextmanager
def ray_session(settings: ComputeSettings) -> Iterator[str]:
    """Connect this process to the cluster of ``settings`` (starting a private one for ``local:N``)
    for the duration of the block; yields the address connected to. Reuses a connection this process
    already has (ray.init is process-wide)."""
    import ray

    workers = parse_local_address(settings.address)
    cluster = start_private_cluster(workers) if workers is not None else None
    address = cluster.address if cluster is not None else settings.address
    started_here = False
    _disable_uv_run_hook()  # also when already connected: Ray Train reads it when it starts workers
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    try:
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network calls home
            if cluster is not None:
                os.environ["RAY_AUTH_MODE"] = "disabled"  # as its nodes (see LocalRayCluster)
            ray.init(address=address, logging_level="WARNING", log_to_driver=True)
            started_here = True
        yield address
    finally:
        if started_here:
            ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if cluster is not None:
            cluster.close()


@contextmanager
def cluster_for_run(settings: ComputeSettings) -> Iterator[ComputeSettings]:
    """For a whole run of many steps: with address ``local:N``, start one private cluster that every
    step joins (each step's :func:`ray_session` connects to the address yielded) instead of one
    cluster per step (~15 s each, and two steps at once would run two). Other settings pass through."""
    workers = parse_local_address(settings.address) if settings.distributed else None
    if workers is None:
        yield settings
        return
    with start_private_cluster(workers) as cluster:
        yield replace(settings, address=cluster.address)
