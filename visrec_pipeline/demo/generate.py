"""Generate the bundled demo dataset: deterministic from a seed, written atomically.

The folder has exactly the layout of a user's own dataset (``docs/DESIGN.md``):
``interactions.csv``, ``items.csv``, ``images/<item_id>.jpg|png``, plus
``later_batches/`` (held-back interactions and items for incremental-refresh
tests), a ``README.md`` and, written last, the ``.complete`` marker.

Everything is built in a temp sibling folder and renamed into place, under a
lock file next to the folder, so a killed generation never leaves a half
dataset and two processes never build the same folder at once.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from visrec_pipeline.demo import behaviour as bh
from visrec_pipeline.demo.catalog import commons_url, file_title
from visrec_pipeline.demo.folder import folder_lock, make_temp_sibling, remove_leftovers, swap_into_place
from visrec_pipeline.demo.render import encode_image, render_image
from visrec_pipeline.demo.simulate import BuiltCatalog, simulate_demo

# Bump when the output for a given seed changes; ensure_demo_dataset then regenerates.
GENERATOR_VERSION = "1"
MARKER = ".complete"
INTERACTION_HEADER = ("user_id", "item_id", "timestamp")
ITEM_HEADER = ("item_id", "title", "creator", "url")


@dataclass(frozen=True)
class BatchSummary:
    name: str  # e.g. "batch_001"
    n_rows: int
    n_users: int
    n_new_users: int
    n_new_items: int  # rows of batch_XXX_items.csv
    n_new_items_used: int  # of those, items that appear in the batch's rows
    first_ts: int
    last_ts: int


@dataclass(frozen=True)
class DemoSummary:
    out_dir: str
    generator_version: str
    seed: int
    n_items: int
    n_users: int
    n_interactions: int  # rows of interactions.csv, duplicates included
    n_unique_pairs: int
    n_duplicate_rows: int
    n_items_without_creator: int
    n_images: int  # all images, later-batch items included
    n_png: int
    image_bytes: int
    first_ts: int
    last_ts: int
    batches: tuple[BatchSummary, ...] = field(default_factory=tuple)
    seconds: float = 0.0  # wall time of this generation (0 when read back from a marker)

    def to_json(self) -> dict:
        return asdict(self)


def _params_record(seed: int, n_items: int, n_users: int, target_interactions: int, later_batches: int) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "n_items": int(n_items),
        "n_users": int(n_users),
        "target_interactions": int(target_interactions),
        "later_batches": int(later_batches),
    }


def _validate(n_items: int, n_users: int, target_interactions: int, later_batches: int) -> None:
    if not 50 <= n_items <= 30_000:  # at most 999 uploads a month over 72 months
        raise ValueError(f"n_items must be in 50..30000, got {n_items}")
    if not 10 <= n_users <= 100_000:
        raise ValueError(f"n_users must be in 10..100000, got {n_users}")
    if not 0 <= later_batches <= 12:
        raise ValueError(f"later_batches must be in 0..12, got {later_batches}")
    cap = int(bh.BehaviourParams().max_share_of_catalog * n_items)
    if not 3 * n_users <= target_interactions <= cap * n_users // 2:
        raise ValueError(
            f"target_interactions must be in {3 * n_users}..{cap * n_users // 2} "
            f"for {n_users} users and {n_items} items, got {target_interactions}"
        )


def _csv_bytes(header: tuple[str, ...], rows) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _interaction_rows(user_ids: np.ndarray, item_ids: np.ndarray, ts: np.ndarray) -> bytes:
    order = np.lexsort((item_ids, user_ids, ts))
    rows = zip(user_ids[order].tolist(), item_ids[order].tolist(), ts[order].tolist())
    return _csv_bytes(INTERACTION_HEADER, rows)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def _items_csv(built: BuiltCatalog, rng: np.random.Generator, index: slice) -> bytes:
    cat = built.catalog
    rows = []
    for k in range(index.start, index.stop):
        item_id = int(cat.item_id[k])
        title = file_title(rng, item_id, bool(cat.is_png[k]))
        creator = built.creator_names[int(cat.creator[k])] if cat.creator_shown[k] else ""
        rows.append((item_id, title, creator, commons_url(title)))
    return _csv_bytes(ITEM_HEADER, rows)


def _write_images(built: BuiltCatalog, images_dir: Path) -> tuple[int, int]:
    """Render every item; returns (image count, total bytes)."""
    cat = built.catalog
    images_dir.mkdir(parents=True, exist_ok=True)
    total = 0
    for k in range(len(cat)):
        image = render_image(
            int(cat.palette[k]), int(cat.texture[k]), int(cat.shape[k]), int(cat.brightness[k]),
            int(cat.width[k]), int(cat.height[k]), int(cat.render_seed[k]),
        )
        data = encode_image(image, bool(cat.is_png[k]))
        # The id is an int we generated, so this name is safe.
        _write(images_dir / f"{int(cat.item_id[k])}.{'png' if cat.is_png[k] else 'jpg'}", data)
        total += len(data)
    return len(cat), total


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d")


def _readme(record: dict, summary: DemoSummary) -> bytes:
    batches = "\n".join(
        f"| `later_batches/{b.name}.csv` | {b.n_rows} | {b.n_users} ({b.n_new_users} new) | "
        f"{b.n_new_items} (`{b.name}_items.csv`, {b.n_new_items_used} used) |"
        for b in summary.batches
    )
    text = f"""# visrec-pipeline demo dataset

Synthetic, Wikimedia-Commons-like image interactions generated by
`visrec_pipeline.demo` (generator version {record['generator_version']}, seed {record['seed']}).
Regenerate the identical folder with:

    python -m visrec_pipeline.demo --out DIR --seed {record['seed']} --items {record['n_items']} \\
        --users {record['n_users']} --interactions {record['target_interactions']} --batches {record['later_batches']}

## Contents

| file | what |
|---|---|
| `interactions.csv` | `user_id,item_id,timestamp` (integer unix seconds, UTC): {summary.n_interactions} rows, {summary.n_unique_pairs} distinct (user, item) pairs, {summary.n_duplicate_rows} exact repeats with an earlier timestamp (keep the latest) |
| `items.csv` | `item_id,title,creator,url`: {summary.n_items} items, {summary.n_items_without_creator} with an empty creator |
| `images/<item_id>.jpg` / `.png` | {summary.n_images} images ({summary.n_png} PNG), 160-640 px per side, square, portrait, landscape and panoramas up to 3:1 |
| `later_batches/` | interactions held back for incremental-refresh tests (all later than `interactions.csv`); their new items' rows are in `batch_XXX_items.csv`, their images already in `images/` |

| batch | rows | users | new items |
|---|---|---|---|
{batches}

Users: {summary.n_users}. Item ids are `YYYYMMNNN` (upload year, month,
sequence in the month), uploads 2016-2021; interactions from {_iso(summary.first_ts)}
to {_iso(summary.last_ts)} ({summary.first_ts}..{summary.last_ts} unix seconds), each after
its item's upload month.

## How it was generated

Every item has latent visual attributes (palette family, texture, dominant
shape, brightness) rendered into its image. Every user has a taste over
those attributes that drifts slowly over their active period; each next item
is drawn with probability proportional to
`exp(beta * visual affinity + gamma * log popularity + loyalty * log1p(items already taken from that creator))`,
so appearance dominates, popularity and creator loyalty matter moderately.
User activity is long-tailed (at least 3 interactions per user).
"""
    return text.encode("utf-8")


def _build_into(
    root: Path, *, seed: int, n_items: int, n_users: int, target_interactions: int, later_batches: int
) -> DemoSummary:
    started = time.perf_counter()
    sim = simulate_demo(
        seed=seed, n_items=n_items, n_users=n_users,
        target_interactions=target_interactions, later_batches=later_batches,
    )
    cat, uid = sim.built.catalog, sim.user_id
    _write(root / "interactions.csv", _interaction_rows(uid[sim.user], cat.item_id[sim.item], sim.ts))
    _write(root / "items.csv", _items_csv(sim.built, sim.text_rng, slice(0, n_items)))
    batches = []
    for b in sim.batches:
        _write(root / "later_batches" / f"{b.name}.csv", _interaction_rows(uid[b.user], cat.item_id[b.item], b.ts))
        _write(root / "later_batches" / f"{b.name}_items.csv", _items_csv(sim.built, sim.text_rng, b.fresh))
        used = np.unique(b.item[(b.item >= b.fresh.start) & (b.item < b.fresh.stop)]).size
        batches.append(
            BatchSummary(b.name, int(b.user.size), b.n_users, b.n_new_users, b.fresh.stop - b.fresh.start,
                         int(used), int(b.ts.min()), int(b.ts.max()))
        )

    n_images, image_bytes = _write_images(sim.built, root / "images")
    record = _params_record(seed, n_items, n_users, target_interactions, later_batches)
    summary = DemoSummary(
        out_dir="",
        generator_version=GENERATOR_VERSION,
        seed=int(seed),
        n_items=n_items,
        n_users=n_users,
        n_interactions=int(sim.user.size),
        n_unique_pairs=sim.n_unique,
        n_duplicate_rows=int(sim.user.size - sim.n_unique),
        n_items_without_creator=int((~cat.creator_shown[:n_items]).sum()),
        n_images=n_images,
        n_png=int(cat.is_png.sum()),
        image_bytes=int(image_bytes),
        first_ts=int(sim.ts.min()),
        last_ts=int(sim.ts.max()),
        batches=tuple(batches),
    )
    _write(root / "README.md", _readme(record, summary))
    # The marker goes last: its presence means every other file is complete.
    marker = {"params": record, "summary": summary.to_json()}
    _write(root / MARKER, (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return _replace(summary, seconds=time.perf_counter() - started)


def _replace(summary: DemoSummary, **changes) -> DemoSummary:
    values = asdict(summary)
    values["batches"] = summary.batches
    values.update(changes)
    return DemoSummary(**values)


def _generate_locked(out_dir: Path, record: dict) -> DemoSummary:
    if (out_dir.exists() or out_dir.is_symlink()) and not out_dir.is_dir():
        raise NotADirectoryError(f"demo dataset target {out_dir} exists and is not a folder")
    remove_leftovers(out_dir)
    tmp = make_temp_sibling(out_dir)
    try:
        kwargs = {k: v for k, v in record.items() if k != "generator_version"}
        summary = _build_into(tmp, **kwargs)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _replace(summary, out_dir=str(out_dir))


def generate_demo_dataset(
    out_dir: Path,
    *,
    seed: int = 7,
    n_items: int = 1500,
    n_users: int = 300,
    target_interactions: int = 30000,
    later_batches: int = 1,
) -> DemoSummary:
    """(Re)generate the demo dataset into ``out_dir``, replacing whatever is there (``incoming/`` is kept)."""
    _validate(n_items, n_users, target_interactions, later_batches)
    out_dir = Path(out_dir).expanduser().absolute()
    record = _params_record(seed, n_items, n_users, target_interactions, later_batches)
    with folder_lock(out_dir):
        return _generate_locked(out_dir, record)


def read_marker(out_dir: Path) -> dict | None:
    """The ``.complete`` record of a finished generation, or None if there is none (or it is unreadable)."""
    try:
        record = json.loads((Path(out_dir) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("params"), dict) else None


def is_complete(out_dir: Path, record: dict) -> bool:
    marker = read_marker(out_dir)
    if marker is None or marker["params"] != record:
        return False
    return all((Path(out_dir) / name).exists() for name in ("interactions.csv", "items.csv", "images"))


def load_demo_summary(out_dir: Path) -> DemoSummary | None:
    """The summary recorded in a complete dataset's marker (``seconds`` is 0), or None."""
    marker = read_marker(out_dir)
    if marker is None or not isinstance(marker.get("summary"), dict):
        return None
    values = dict(marker["summary"])
    values["batches"] = tuple(BatchSummary(**b) for b in values.get("batches", ()))
    values["out_dir"] = str(Path(out_dir).expanduser().absolute())
    values["seconds"] = 0.0
    return DemoSummary(**values)


def ensure_demo_dataset(
    out_dir: Path,
    *,
    seed: int = 7,
    n_items: int = 1500,
    n_users: int = 300,
    target_interactions: int = 30000,
    later_batches: int = 1,
) -> Path:
    """Generate the demo dataset into ``out_dir`` unless a complete one with these parameters is there.

    A folder without the ``.complete`` marker, or with one for another seed, size or
    generator version, is replaced (its ``incoming/`` is kept).
    """
    out_dir = Path(out_dir).expanduser().absolute()
    ensure_demo_summary(
        out_dir, seed=seed, n_items=n_items, n_users=n_users,
        target_interactions=target_interactions, later_batches=later_batches,
    )
    return out_dir


def ensure_demo_summary(
    out_dir: Path,
    *,
    seed: int = 7,
    n_items: int = 1500,
    n_users: int = 300,
    target_interactions: int = 30000,
    later_batches: int = 1,
) -> DemoSummary:
    """``ensure_demo_dataset``, returning the summary: fresh (with ``seconds``) or read from the marker."""
    _validate(n_items, n_users, target_interactions, later_batches)
    out_dir = Path(out_dir).expanduser().absolute()
    record = _params_record(seed, n_items, n_users, target_interactions, later_batches)
    if not is_complete(out_dir, record):
        with folder_lock(out_dir):
            if not is_complete(out_dir, record):  # another process may have finished it meanwhile
                return _generate_locked(out_dir, record)
    summary = load_demo_summary(out_dir)
    if summary is None:  # pragma: no cover - is_complete just read the same marker
        raise RuntimeError(f"{out_dir / MARKER} vanished while reading it")
    return summary
