"""Load and validate one interactions file (CSV or Parquet) into an Arrow table.

The file has ``user_id,item_id,timestamp`` and optionally ``evaluation``
(other columns are ignored). Every bad cell becomes a ``Problem`` naming the
file, the line (CSV, header = line 1) or row index (Parquet, 0-based) and the
column. By default any problem raises ``InputFileError``; with
``quarantine=True`` the bad rows are returned in ``rejects`` and the good
rows are kept. A timestamp later than now plus ``future_tolerance_s`` is one
of those problems.
"""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from visrec_pipeline.ingest.csv_reader import normalise_name, read_csv_columns
from visrec_pipeline.ingest.errors import DatasetFolderError, InputFileError, Problem
from visrec_pipeline.ingest.values import (
    ParsedColumn,
    UnsupportedColumnType,
    parse_booleans,
    parse_ids,
    parse_timestamps,
)

REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp")
OPTIONAL_COLUMNS = ("evaluation",)
INTERACTION_FILE_NAMES = ("interactions.csv", "interactions.parquet")
SUFFIXES = (".csv", ".parquet")

# Arrow schema of the validated rows (the columns of raw_interactions that come from the file).
ROWS_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("ts", pa.int64()),
        ("evaluation", pa.bool_()),
        ("source_line", pa.int64()),
    ]
)

# A day: clocks and time zones of the systems that log interactions disagree by hours, not more.
DEFAULT_FUTURE_TOLERANCE_S = 24 * 3600

_PARSERS = {"user_id": parse_ids, "item_id": parse_ids, "timestamp": parse_timestamps, "evaluation": parse_booleans}
_COLUMN_RANK = {c: i for i, c in enumerate((*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS))}


@dataclass
class InteractionBatch:
    """Validated rows of one file plus what was wrong with the rest."""

    file: str  # name used in messages and stored as source_file
    path: Path
    rows: pa.Table  # ROWS_SCHEMA; source_line = CSV line or Parquet row index
    rejects: list[Problem] = field(default_factory=list)
    n_read: int = 0  # data rows in the file, good and bad
    has_evaluation: bool = False
    ignored_columns: list[str] = field(default_factory=list)
    reader: str = ""
    sha256: str = ""

    @property
    def n_rows(self) -> int:
        return self.rows.num_rows

    @property
    def n_rejected_rows(self) -> int:
        return len({p.position for p in self.rejects})


def find_interactions_file(dataset_dir: str | Path) -> Path:
    """``interactions.csv`` or ``interactions.parquet`` of a dataset folder (exactly one of them)."""
    dataset_dir = Path(dataset_dir)
    found = [dataset_dir / name for name in INTERACTION_FILE_NAMES if (dataset_dir / name).is_file()]
    if not found:
        raise DatasetFolderError(
            f"no interactions file in {dataset_dir}: expected interactions.csv or interactions.parquet "
            "with columns user_id,item_id,timestamp[,evaluation]"
        )
    if len(found) > 1:
        raise DatasetFolderError(f"both interactions.csv and interactions.parquet are in {dataset_dir}; keep only one")
    return found[0]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_parquet(path: Path, file: str) -> tuple[dict[str, pa.Array], np.ndarray, list[str]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputFileError(
            [Problem(file, None, None, None, "unreadable", f"is not a readable Parquet file: {exc}")]
        ) from None
    names = [normalise_name(n) for n in table.column_names]
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise InputFileError(
            [
                Problem(
                    file,
                    None,
                    None,
                    None,
                    "missing columns",
                    f"lacks required column(s) {', '.join(repr(m) for m in missing)}; "
                    f"found {', '.join(repr(n) for n in names)}; expected user_id,item_id,timestamp[,evaluation]",
                )
            ]
        )
    for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS):
        if names.count(c) > 1:
            raise InputFileError([Problem(file, None, c, None, "duplicate column", "appears more than once")])
    columns = {c: table.column(names.index(c)) for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in names}
    ignored = [n for n in names if n not in _COLUMN_RANK]
    return columns, np.arange(table.num_rows, dtype=np.int64), ignored


def read_interactions(
    path: str | Path,
    *,
    file: str | None = None,
    quarantine: bool = False,
    future_tolerance_s: float | None = DEFAULT_FUTURE_TOLERANCE_S,
) -> InteractionBatch:
    """Validate an interactions file; see the module docstring. ``file`` names it in messages.
    ``future_tolerance_s``: how far past now a timestamp may lie (None: no limit but the year 3000)."""
    path = Path(path)
    max_ts = None if future_tolerance_s is None else int(time.time() + future_tolerance_s)
    parsers = {**_PARSERS, "timestamp": functools.partial(parse_timestamps, max_ts=max_ts)}
    file = file or path.name
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputFileError([Problem(file, None, None, None, "unknown format", "is neither .csv nor .parquet")])
    problems: list[Problem] = []
    if suffix == ".csv":
        cols = read_csv_columns(path, file=file, required=REQUIRED_COLUMNS, optional=OPTIONAL_COLUMNS)
        columns, positions, unit, reader = cols.columns, cols.lines, "line", cols.reader
        ignored = [n for n in cols.header if n not in _COLUMN_RANK]
        problems.extend(cols.problems)
    else:
        columns, positions, ignored = _read_parquet(path, file)
        unit, reader = "row index", "parquet"

    n = int(positions.shape[0])
    parsed: dict[str, ParsedColumn] = {}
    for name, raw in columns.items():
        try:
            parsed[name] = parsers[name](raw)
        except UnsupportedColumnType as exc:
            raise InputFileError([Problem(file, None, name, None, "wrong type", str(exc))]) from None

    bad = np.zeros(n, bool)
    for name, col in parsed.items():
        idx = np.flatnonzero(col.bad)
        bad[idx] = True
        for i in idx.tolist():
            reason, value, message = col.describe(i)
            problems.append(Problem(file, int(positions[i]), name, value, reason, message, unit))
    problems.sort(key=lambda p: (p.position if p.position is not None else -1, _COLUMN_RANK.get(p.column, 99)))
    if problems and not quarantine:
        raise InputFileError(problems)

    keep = ~bad
    has_evaluation = "evaluation" in parsed
    evaluation = (
        pa.array(parsed["evaluation"].values[keep], pa.bool_())
        if has_evaluation
        else pa.nulls(int(keep.sum()), pa.bool_())
    )
    rows = pa.Table.from_arrays(
        [
            pa.array(parsed["user_id"].values[keep], pa.int64()),
            pa.array(parsed["item_id"].values[keep], pa.int64()),
            pa.array(parsed["timestamp"].values[keep], pa.int64()),
            evaluation,
            pa.array(positions[keep], pa.int64()),
        ],
        schema=ROWS_SCHEMA,
    )
    n_structural = len({p.position for p in problems if p.reason in ("missing field", "extra field")})
    return InteractionBatch(
        file=file,
        path=path,
        rows=rows,
        rejects=problems,
        n_read=n + n_structural,
        has_evaluation=has_evaluation,
        ignored_columns=ignored,
        reader=reader,
        sha256=file_sha256(path),
    )
