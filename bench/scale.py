"""Every model at scale: fit (one epoch, or the closed form) and full evaluation on power-law data.

    uv run --frozen --no-sync python bench/scale.py                       # S, M, L (hours on 2 cores)
    uv run --frozen --no-sync python bench/scale.py --sizes S --models bpr_mf,ease --timeout 600
    uv run --frozen --no-sync python bench/scale.py --write-dataset L /path/to/folder   # for make demo

Sizes (``visrec_pipeline/demo/scale_data.py``): S = 100k interactions / 10k items / 2k users,
M = 500k / 50k / 10k, L = 1M / 100k / 20k, with 2048-d pooled features and 49 x 2048 feature maps
(float16; 20 GB at L); XS (3k / 400 / 120, 64-d) is for tests. The data is generated once per size
and seed into ``--cache-dir`` (a dataset folder, the same that ``--write-dataset`` writes).

How the data reaches the models: each step process reads the dataset folder into ``RecData`` (the
split of ``split_build.sql``: each user's last interaction is the holdout) and ``FitInputs`` (the
features memory-mapped from the folder, as shipped), then runs what ``pipeline.train_model`` and
``pipeline.evaluate_model`` run: validation split, cost check, ``model.fit``, checkpoint; checkpoint,
``evaluate``. It skips DuckDB and the feature store, whose reading is being reworked separately and is
exercised end to end by ``VISREC_DATASET=<folder> make demo``; so these figures are the models' own.
CuratorNet samples its guided triples inside ``fit`` (the pipeline's ``triples_guided`` asset does
it beforehand), on the planted clusters in place of ``visual_clusters``. DVBPR gets synthetic 64 px
images and, on a CPU, its CPU preset.

Every fit and every evaluation runs in its own process (1 torch / BLAS thread by default), watched:
wall time, CPU time (user + sys, ``os.wait4``), peak RSS (``ru_maxrss`` of that process); a step
past ``--timeout`` or past ``--max-rss-gb`` is killed and reported as ``timeout`` / ``oom-killed``,
one the system kills as ``oom-killed``, an exception as ``failed`` with its message. The baseline is
linear scaling: each model's growth exponent from the smallest to the largest size (fit: in
interactions; evaluation: in items x users; from the CPU seconds of the in-process ``fit`` / ``evaluate``,
``fit_wall`` / ``eval_wall`` from their wall seconds) is printed with its ratio to 1.0 (null where the small
size's step took under 0.05 s), the largest of them as ``max_exponent``, and each step's time relative to
bpr_mf's at the same size. ``--jobs 2`` runs two models' step processes at once (on 2 cores: half the
wall time; CPU seconds and each process's peak RSS are its own). The last line printed is one JSON
object (also written to ``<out>/scale.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from visrec_pipeline.demo import scale_data  # noqa: E402

BASELINE_MODELS = ("bpr_mf", "most_popular")
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# ------------------------------------------------------------------------------------ step processes


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def bench_config(name: str) -> dict:
    """One epoch for the models trained on triples; DVBPR's CPU preset where there is no GPU."""
    import dataclasses

    import torch

    from visrec_pipeline.recsys.registry import get_spec

    spec = get_spec(name)
    config: dict = {}
    if "train" in {f.name for f in dataclasses.fields(spec.config_cls)}:
        config["train"] = {"epochs": 1}
    if name == "dvbpr" and not torch.cuda.is_available():
        config["preset"] = "cpu"
    return config


def child_fit(name: str, folder: Path, ckpt: Path, result: Path) -> None:
    import dataclasses

    from visrec_pipeline.recsys.checkpoint import save_checkpoint
    from visrec_pipeline.recsys.cost import check_before_fit
    from visrec_pipeline.recsys.registry import build_model, get_spec

    started = time.perf_counter()
    spec = get_spec(name)
    data = scale_data.load_rec_data(folder)
    fit_data, validation = data.validation_split()
    inputs = scale_data.fit_inputs(folder, fit_data, spec.needs)
    inputs.validation = validation
    config = bench_config(name)
    model = build_model(name, config)
    load_s = time.perf_counter() - started
    estimate = check_before_fit(model, fit_data, inputs)
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    history = model.fit(fit_data, inputs)
    fit_s, fit_cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    fit_peak = _peak_rss_gb()
    save_checkpoint(
        ckpt, model_name=name, config=config, state=model.state_dict(), data_versions={},
        history=dataclasses.asdict(history), extra={"train_seconds": fit_s},
    )
    out = {
        "load_seconds": round(load_s, 3),
        "seconds": round(fit_s, 3),
        "cpu_seconds": round(fit_cpu, 3),
        "peak_rss_gb_after_fit": round(fit_peak, 3),
        "checkpoint_mb": round(ckpt.stat().st_size / 2**20, 2),
        "epochs_run": len(history.loss),
        "estimate": None if estimate is None else estimate.as_dict(),
    }
    result.write_text(json.dumps(out))


def child_eval(name: str, folder: Path, ckpt: Path, result: Path) -> None:
    from visrec_pipeline.pipeline.evaluation import DEFAULT_BATCH_SIZE, DEFAULT_KS, DEFAULT_PROTOCOL, cold_items
    from visrec_pipeline.recsys.checkpoint import load_checkpoint
    from visrec_pipeline.recsys.evaluate import evaluate
    from visrec_pipeline.recsys.registry import build_model, get_spec

    started = time.perf_counter()
    data = scale_data.load_rec_data(folder)
    inputs = scale_data.fit_inputs(folder, data, get_spec(name).needs)
    stored = load_checkpoint(ckpt)
    model = build_model(name, stored["config"])
    if hasattr(model, "attach_inputs"):
        model.attach_inputs(data, inputs)
    model.load_state_dict(stored["state"])
    load_s = time.perf_counter() - started
    cold = cold_items(data)
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    res = evaluate(
        model.score, data.holdout, data.n_items, ks=DEFAULT_KS, protocol=DEFAULT_PROTOCOL,
        batch_size=DEFAULT_BATCH_SIZE, cold_items=cold if cold.size else None,
    )
    out = {
        "load_seconds": round(load_s, 3),
        "seconds": round(time.perf_counter() - wall0, 3),
        "cpu_seconds": round(_cpu_seconds() - cpu0, 3),
        "rows": len(res.per_row),
        "means": {k: round(float(v), 5) for k, v in res.means.items() if k in ("auc", "ndcg@20", "recall@20", "rr")},
    }
    result.write_text(json.dumps(out))


def child_generate(size: str, folder: Path, seed: int, result: Path) -> None:
    info = scale_data.write_dataset(folder, size, seed)
    result.write_text(json.dumps(info))


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _failure_reason(log: Path) -> str:
    """The exception line of a child's log (its last line naming an error), else its last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) or head.startswith("MemoryError"):
            return line[:2000]
    return lines[-1][:2000] if lines else "no output"


def run_step(argv: list[str], log: Path, result: Path, *, timeout: float, max_rss_gb: float, threads: int) -> dict:
    """Run ``scale.py --child ...argv`` in its own process group and measure it."""
    env = {**os.environ, **{k: str(threads) for k in THREAD_ENV}, "VISREC_BENCH_THREADS": str(threads)}
    result.unlink(missing_ok=True)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", *argv, "--result", str(result)],
            stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    started = time.monotonic()
    killed = None
    cap_kb = max_rss_gb * 2**20
    while True:
        pid, status, usage = os.wait4(proc.pid, 0 if killed else os.WNOHANG)
        if pid:
            break
        if time.monotonic() - started > timeout:
            killed = "timeout"
        elif max_rss_gb > 0 and _rss_kb(proc.pid) > cap_kb:
            killed = "memory"
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    wall = time.monotonic() - started
    out = {
        "status": "completed",
        "wall_seconds": round(wall, 2),
        "process_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3),
    }
    if killed == "timeout":
        out.update(status="timeout", reason=f"ran past --timeout {timeout:g} s and was killed")
    elif killed == "memory":
        out.update(status="oom-killed", reason=f"its RSS passed --max-rss-gb {max_rss_gb:g} and the bench killed it")
    elif os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status))
        if sig == signal.SIGKILL:
            out.update(status="oom-killed", reason="killed by SIGKILL (the kernel's OOM killer, most likely)")
        else:
            out.update(status="failed", reason=f"killed by {sig.name}")
    elif proc.returncode != 0:
        out.update(status="failed", reason=_failure_reason(log))
    elif result.is_file():
        out.update(json.loads(result.read_text()))
    else:
        out.update(status="failed", reason="exited without writing its result")
    out["log"] = str(log)
    return out


# ------------------------------------------------------------------------------------ the bench


MIN_SECONDS_FOR_EXPONENT = 0.05  # below this the small size's time is process noise, not growth


def _exponent(t_small: float | None, t_large: float | None, n_small: float, n_large: float) -> float | None:
    if not t_small or not t_large or t_small < MIN_SECONDS_FOR_EXPONENT or t_large <= 0 or n_large <= n_small:
        return None
    return round(math.log(t_large / t_small) / math.log(n_large / n_small), 3)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _model_names(arg: str | None) -> list[str]:
    from visrec_pipeline.recsys.registry import MODEL_SPECS

    if not arg:
        return list(MODEL_SPECS)
    names = [m.strip() for m in arg.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODEL_SPECS]
    if unknown:
        raise SystemExit(f"--models: unknown model(s) {unknown}; registered: {list(MODEL_SPECS)}")
    return names


def run_size(size_name: str, models: list[str], args) -> dict:
    size = scale_data.size_named(size_name)
    folder = Path(args.cache_dir) / f"{size.name}-seed{args.seed}"
    work = Path(args.out) / size.name
    work.mkdir(parents=True, exist_ok=True)
    step = dict(timeout=args.timeout, max_rss_gb=args.max_rss_gb, threads=args.threads)
    cached = scale_data.is_complete(folder, size, args.seed)
    gen = run_step(
        ["generate", size.name, str(folder), "--seed", str(args.seed)], work / "generate.log", work / "generate.json",
        timeout=max(args.timeout, 7200), max_rss_gb=args.max_rss_gb, threads=args.threads,
    )
    gen["cached"] = cached
    if gen["status"] == "completed":
        gen["disk_gb"] = round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**30, 2)
    print(f"[{size.name}] data: {gen['status']} ({'cached' if cached else 'generated'}) "
          f"{gen['wall_seconds']} s, peak {gen['peak_rss_gb']} GB", file=sys.stderr, flush=True)
    entry: dict = {
        "interactions": size.interactions, "items": size.items, "users": size.users,
        "data": gen, "models": {},
    }
    if gen["status"] != "completed":
        for name in models:
            entry["models"][name] = {"status": "failed", "reason": f"no data: {gen.get('reason')}"}
        return entry
    def run_model(name: str) -> dict:
        ckpt = work / f"{name}.pt"
        fit = run_step(["fit", name, str(folder), str(ckpt)], work / f"{name}.fit.log", work / f"{name}.fit.json", **step)
        record: dict = {"status": fit["status"], "fit": fit}
        if fit["status"] == "completed":
            ev = run_step(
                ["eval", name, str(folder), str(ckpt)], work / f"{name}.eval.log", work / f"{name}.eval.json", **step
            )
            record["eval"] = ev
            record["status"] = ev["status"]
            if ev["status"] != "completed":
                record["reason"] = f"evaluation: {ev.get('reason')}"
        else:
            record["reason"] = f"fit: {fit.get('reason')}"
        ckpt.unlink(missing_ok=True)  # checkpoints of L run to GBs: keep the figures, not them
        Path(f"{ckpt}.sha256").unlink(missing_ok=True)
        print(f"[{size.name}] {name}: {record['status']}"
              f" fit {fit.get('seconds')} s / peak {fit.get('peak_rss_gb')} GB"
              + (f", eval {record['eval'].get('seconds')} s / peak {record['eval'].get('peak_rss_gb')} GB"
                 if "eval" in record else "")
              + (f" ({record['reason']})" if "reason" in record else ""), file=sys.stderr, flush=True)
        return record

    # --jobs step processes at once (each watched and measured on its own; the exponents use CPU seconds,
    # which a neighbour on another core barely changes)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        records = dict(zip(models, pool.map(run_model, models)))
    entry["models"] = {name: records[name] for name in models}
    base = entry["models"].get("bpr_mf", {})
    for name, rec in entry["models"].items():
        rec["fit_vs_bpr_mf"] = _ratio(rec.get("fit", {}).get("seconds"), base.get("fit", {}).get("seconds"))
        rec["eval_vs_bpr_mf"] = _ratio(rec.get("eval", {}).get("seconds"), base.get("eval", {}).get("seconds"))
    return entry


def summarise(results: dict, models: list[str]) -> dict:
    sizes = list(results)
    exponents: dict = {}
    if len(sizes) >= 2:
        small, large = results[sizes[0]], results[sizes[-1]]
        exponents = {"from": sizes[0], "to": sizes[-1], "baseline_linear": 1.0, "models": {}}
        for name in models:
            s, l = small["models"].get(name, {}), large["models"].get(name, {})
            grow = {"fit": (small["interactions"], large["interactions"]),
                    "eval": (small["items"] * small["users"], large["items"] * large["users"])}
            e = {}
            for step, (n_small, n_large) in grow.items():
                # CPU seconds of the step's own work (1 thread: its wall time on an idle machine)
                e[step] = _exponent(s.get(step, {}).get("cpu_seconds"), l.get(step, {}).get("cpu_seconds"), n_small, n_large)
                e[f"{step}_wall"] = _exponent(s.get(step, {}).get("seconds"), l.get(step, {}).get("seconds"), n_small, n_large)
                e[f"{step}_vs_linear"] = e[step]  # ratio to the baseline exponent 1.0
            exponents["models"][name] = e
    peaks = [
        step.get("peak_rss_gb", 0.0)
        for entry in results.values()
        for rec in entry["models"].values()
        for step in (rec.get("fit", {}), rec.get("eval", {}))
    ]
    worst = {
        step: max((e[step] for e in exponents.get("models", {}).values() if e.get(step) is not None), default=None)
        for step in ("fit", "eval")
    }
    return {
        "bench": "scale",
        "sizes": results,
        "exponents": exponents,
        "max_exponent": worst,
        "baseline": {"exponent": 1.0, "models": list(BASELINE_MODELS)},
        "max_peak_rss_gb": round(max(peaks, default=0.0), 3),
        "all_completed": all(
            rec["status"] == "completed" for entry in results.values() for rec in entry["models"].values()
        ),
    }


def main(argv: list[str] | None = None) -> int:
    data_dir = Path(os.environ.get("VISREC_DATA_DIR") or ROOT / "data")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="S,M,L", help="comma-separated: XS, S, M, L (default S,M,L)")
    p.add_argument("--models", default=None, help="comma-separated registered models (default: all)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per step process (fit or evaluation)")
    p.add_argument("--max-rss-gb", type=float, default=8.0,
                   help="kill a step whose RSS passes this (0: never), reported as oom-killed; 8 GB is the goal")
    p.add_argument("--threads", type=int, default=1, help="torch / BLAS threads per step process")
    p.add_argument("--jobs", type=int, default=1, help="step processes run at once (models in parallel)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(data_dir / "bench" / "scale"), help="logs and scale.json")
    p.add_argument("--cache-dir", default=str(data_dir / "cache" / "scale"), help="generated datasets, by size + seed")
    p.add_argument("--write-dataset", nargs=2, metavar=("SIZE", "FOLDER"),
                   help="only write the dataset folder of SIZE (for VISREC_DATASET=FOLDER make demo)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        return _child(args)
    if args.write_dataset:
        size, folder = args.write_dataset
        info = scale_data.write_dataset(folder, size, args.seed)
        print(json.dumps({"folder": str(Path(folder).resolve()), **info}))
        return 0
    models = _model_names(args.models)
    sizes = [scale_data.size_named(s.strip()).name for s in args.sizes.split(",") if s.strip()]
    sizes.sort(key=lambda s: scale_data.SIZES[s].interactions)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = {s: run_size(s, models, args) for s in sizes}
    summary = summarise(results, models)
    for name, e in summary["exponents"].get("models", {}).items():
        print(f"{name}: exponent fit {e['fit']} eval {e['eval']} (baseline 1.0)", file=sys.stderr)
    (Path(args.out) / "scale.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


def _child(args) -> int:
    threads = int(os.environ.get("VISREC_BENCH_THREADS", "1"))
    import torch

    torch.set_num_threads(threads)
    kind, *rest = args.child
    result = Path(args.result)
    if kind == "generate":
        child_generate(rest[0], Path(rest[1]), args.seed, result)
    elif kind == "fit":
        child_fit(rest[0], Path(rest[1]), Path(rest[2]), result)
    elif kind == "eval":
        child_eval(rest[0], Path(rest[1]), Path(rest[2]), result)
    else:
        raise SystemExit(f"unknown child step {kind!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
