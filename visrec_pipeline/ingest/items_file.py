"""Load and validate the optional ``items.csv`` (``item_id[,title,creator,url]``) of a dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from visrec_pipeline.ingest.csv_reader import read_csv_columns
from visrec_pipeline.ingest.errors import InputFileError, Problem
from visrec_pipeline.ingest.values import parse_ids

ITEMS_FILE_NAME = "items.csv"
ITEM_TEXT_COLUMNS = ("title", "creator", "url")

ITEMS_SCHEMA = pa.schema(
    [
        ("item_id", pa.int64()),
        ("title", pa.string()),
        ("creator", pa.string()),
        ("url", pa.string()),
        ("source_line", pa.int64()),
    ]
)


def empty_items() -> pa.Table:
    return ITEMS_SCHEMA.empty_table()


def read_items(path: str | Path, *, file: str | None = None) -> pa.Table:
    """Rows of ``items.csv`` (ITEMS_SCHEMA); blank text becomes NULL.

    Raises ``InputFileError`` naming the line and column of every bad id, row
    with the wrong field count, or item listed twice.
    """
    path = Path(path)
    file = file or path.name
    cols = read_csv_columns(path, file=file, required=("item_id",), optional=ITEM_TEXT_COLUMNS)
    problems = list(cols.problems)
    ids = parse_ids(cols.columns["item_id"])
    for i in np.flatnonzero(ids.bad).tolist():
        reason, value, message = ids.describe(i)
        problems.append(Problem(file, int(cols.lines[i]), "item_id", value, reason, message))

    good = np.flatnonzero(~ids.bad)
    values, lines = ids.values[good], cols.lines[good]
    order = np.argsort(values, kind="stable")
    repeat = np.zeros(order.size, bool)
    repeat[1:] = values[order][1:] == values[order][:-1]
    first_line = np.maximum.accumulate(np.where(~repeat, np.arange(order.size), 0))
    for k in np.flatnonzero(repeat).tolist():
        dup, first = order[k], order[first_line[k]]
        problems.append(
            Problem(
                file,
                int(lines[dup]),
                "item_id",
                str(values[dup]),
                "duplicate",
                f"item {values[dup]} is listed again (first on line {lines[first]})",
            )
        )
    if problems:
        problems.sort(key=lambda p: (p.position or 0, p.column or ""))
        raise InputFileError(problems)

    n = cols.n_rows
    arrays = [pa.array(ids.values, pa.int64())]
    for c in ITEM_TEXT_COLUMNS:
        if c in cols.columns:
            text = pc.utf8_trim_whitespace(cols.columns[c])
            arrays.append(pc.if_else(pc.equal(pc.utf8_length(text), 0), pa.scalar(None, pa.string()), text))
        else:
            arrays.append(pa.nulls(n, pa.string()))
    arrays.append(pa.array(cols.lines, pa.int64()))
    return pa.Table.from_arrays(arrays, schema=ITEMS_SCHEMA)


def read_dataset_items(dataset_dir: str | Path) -> pa.Table | None:
    """``items.csv`` of a dataset folder, or None when the folder has none."""
    path = Path(dataset_dir) / ITEMS_FILE_NAME
    return read_items(path) if path.is_file() else None
