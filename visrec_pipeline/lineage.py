"""What exactly a model was trained on: batches (partitions), embeddings and triples (no dagster).

Recorded in every checkpoint and shown as metadata of the model and
evaluation assets, so a model's inputs can be traced after the data moved on.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from visrec_pipeline import db, triple_sets
from visrec_pipeline.images.store import file_sha256

_BATCH_COLUMNS = "batch_id, batch_seq, source_file, left(sha256, 12), n_rows"


def batches_used(conn: duckdb.DuckDBPyConnection) -> list[dict]:
    """Every batch in raw_interactions, in arrival order; ``batch_id`` is the partition key of later ones."""
    if not db.table_exists(conn, "ingest_batches"):
        return []
    rows = conn.execute(f"SELECT {_BATCH_COLUMNS} FROM ingest_batches ORDER BY batch_seq, batch_id").fetchall()
    return [
        {"batch_id": b, "seq": int(s), "source_file": f, "sha256": h, "rows": int(n)} for b, s, f, h, n in rows
    ]


def embeddings_used(conn: duckdb.DuckDBPyConnection, backbone: str) -> dict:
    """The feature rows a model reads: weights, item count, shard files and an index fingerprint."""
    if not db.table_exists(conn, "embedding_index"):
        return {"backbone": backbone, "items": 0}
    n, tags, shards, h = conn.execute(
        "SELECT count(*), list(DISTINCT weights_tag ORDER BY weights_tag), list(DISTINCT shard ORDER BY shard), "
        "coalesce(sum(hash(item_id, shard, \"row\", content_hash)), 0) FROM embedding_index WHERE backbone = ?",
        [backbone],
    ).fetchall()[0]  # fetch to the end: DuckDB refuses other work while a result is unfinished
    return {
        "backbone": backbone,
        "items": int(n),
        "weights_tags": list(tags or []),
        "shards": list(shards or []),
        "index_fingerprint": f"{int(h) & 0xFFFFFFFFFFFFFFFF:016x}",
    }


def triples_used(conn: duckdb.DuckDBPyConnection, name: str) -> dict:
    """The triple set's row of ``triple_sets`` (and the stored file's hash for guided triples)."""
    row = triple_sets.read(conn, name)
    if row is None:
        return {"name": name, "present": False}
    seed, users, items, positives, per_epoch, file, created = row
    out = {
        "name": name,
        "present": True,
        "seed": seed,
        "users": users,
        "items": items,
        "positives": positives,
        "triples": per_epoch,
        "created_at": created,
    }
    if file and Path(file).is_file():
        out["file"] = str(file)
        out["file_sha256"] = file_sha256(Path(file))[:16]
    return out


def training_lineage(conn: duckdb.DuckDBPyConnection, needs) -> dict:
    """Batches, embeddings and triples behind a model with inputs ``needs`` (``ModelSpec.needs``)."""
    batches = batches_used(conn)
    out: dict = {
        "batches": batches,
        "partitions": [b["batch_id"] for b in batches if b["seq"] > 0],
    }
    backbones = sorted({n.partition(":")[2] for n in needs if n.partition(":")[0] in ("features", "spatial")})
    if backbones:
        out["embeddings"] = {b: embeddings_used(conn, b) for b in backbones}
    triple_sets = sorted({n.partition(":")[0] for n in needs if n.startswith("triples_")})
    if triple_sets:
        out["triples"] = {t: triples_used(conn, t.removeprefix("triples_")) for t in triple_sets}
    return out
