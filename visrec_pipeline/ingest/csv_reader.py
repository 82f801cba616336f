"""Read a CSV file into string columns, remembering the line each record starts on.

Well-formed files with one record per line take the fast path (pyarrow's
multi-threaded reader, line numbers computed with numpy from the newline
positions). Anything else (a quoted value spanning lines, a row with the
wrong number of fields, a lone carriage return) is read by Python's ``csv``
module, which tracks physical lines exactly, so every problem names the line
a text editor shows.
Values stay strings here; ``values.py`` parses them column-wise.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from visrec_pipeline.ingest.errors import InputFileError, Problem, show_value

_BOM = b"\xef\xbb\xbf"


@dataclass
class CsvColumns:
    file: str  # name used in messages
    header: list[str]  # normalised (stripped, lower-case) header names, in file order
    header_line: int
    columns: dict[str, pa.Array]  # the wanted columns present in the header, as strings
    lines: np.ndarray  # int64: the line each well-formed record starts on, aligned with ``columns``
    problems: list[Problem] = field(default_factory=list)  # records with a wrong field count
    reader: str = "pyarrow"

    @property
    def n_rows(self) -> int:
        return int(self.lines.shape[0])


def normalise_name(name: str) -> str:
    return name.strip().lower()


def _check_header(file: str, header: list[str], header_line: int, required, optional) -> list[str]:
    names = [normalise_name(h) for h in header]
    missing = [c for c in required if c not in names]
    if missing:
        found = ", ".join(repr(n) for n in names)
        expected = ",".join(required) + "".join(f"[,{c}]" for c in optional)
        raise InputFileError(
            [
                Problem(
                    file,
                    header_line,
                    None,
                    None,
                    "missing columns",
                    f"the header lacks required column(s) {', '.join(repr(m) for m in missing)}; "
                    f"found {found}; expected {expected}",
                )
            ]
        )
    for name in (*required, *optional):
        if names.count(name) > 1:
            raise InputFileError(
                [Problem(file, header_line, name, None, "duplicate column", "appears more than once in the header")]
            )
    return names


def _decode(file: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputFileError(
            [Problem(file, line, None, None, "not UTF-8", f"is not UTF-8 text (byte offset {exc.start})")]
        ) from None


def _nonempty_lines(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(1-based numbers, start offsets, end offsets) of the lines that are not empty.

    Lines are split on \\n; a trailing \\r (CRLF) is not part of a line.
    """
    arr = np.frombuffer(data, np.uint8)
    newlines = np.flatnonzero(arr == 10)
    starts = np.concatenate(([0], newlines + 1))
    ends = np.concatenate((newlines, [arr.size]))
    last = np.maximum(ends - 1, 0)
    cr = (ends > starts) & (arr[last] == 13)
    ends = ends - cr
    keep = np.flatnonzero(ends > starts)
    return (keep + 1).astype(np.int64), starts[keep], ends[keep]


def _fast_path_possible(data: bytes) -> bool:
    """Lines end in \\n or \\r\\n (a lone \\r, which CSV readers also split on, would shift line numbers)."""
    return data.count(b"\r") == data.count(b"\r\n")


def _read_fast(file: str, data: bytes, required, optional) -> CsvColumns | None:
    """pyarrow reader; None when the file needs the exact reader (e.g. a malformed row)."""
    line_numbers, starts, ends = _nonempty_lines(data)
    if line_numbers.size == 0:
        return None
    # the header is the first non-empty line (a header spanning lines fails the record count below)
    header_line = int(line_numbers[0])
    header = next(csv.reader([_decode(file, data[starts[0] : ends[0]])]), [])
    names = _check_header(file, header, header_line, required, optional)
    if len(set(names)) != len(names):
        return None
    wanted = [c for c in (*required, *optional) if c in names]
    invalid: list[int] = []

    def on_invalid(row) -> str:
        invalid.append(1)
        return "skip"

    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=names, use_threads=True),
            parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names},
                include_columns=wanted,
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return None
    # column_names given explicitly, so the header comes back as the first record. A quoted
    # value spanning lines makes fewer records than non-empty lines (nothing makes more
    # without also making an invalid row), so equal counts mean record k is on line k.
    if invalid or table.num_rows != line_numbers.size:
        return None
    table = table.slice(1)
    columns = {c: table.column(c).combine_chunks() for c in wanted}
    return CsvColumns(file, names, header_line, columns, line_numbers[1:], [], "pyarrow")


def _read_exact(file: str, text: str, required, optional) -> CsvColumns:
    # strict: an unclosed quote or text after a closing quote is an error, not a silently merged field
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    header_line = 0
    good_rows: list[list[str]] = []
    good_lines: list[int] = []
    problems: list[Problem] = []
    prev_end = 0
    n_fields = 0
    try:
        for row in reader:
            start = prev_end + 1
            prev_end = reader.line_num
            if not row:  # blank line
                continue
            if header is None:
                header, header_line, n_fields = row, start, len(row)
                names = _check_header(file, header, header_line, required, optional)
                continue
            if len(row) == n_fields:
                good_rows.append(row)
                good_lines.append(start)
            elif len(row) < n_fields:
                problems.append(
                    Problem(
                        file,
                        start,
                        names[len(row)],
                        None,
                        "missing field",
                        f"missing: the line has {len(row)} field(s), the header {n_fields}",
                    )
                )
            else:
                extra = row[n_fields]
                problems.append(
                    Problem(
                        file,
                        start,
                        f"field {n_fields + 1}",
                        extra,
                        "extra field",
                        f"unexpected extra value {show_value(extra)}: the line has {len(row)} fields, "
                        f"the header {n_fields}",
                    )
                )
    except csv.Error as exc:
        # the record that failed starts on the line after the last complete one
        raise InputFileError(
            [Problem(file, prev_end + 1, None, None, "malformed CSV", f"malformed CSV: {exc}")]
        ) from None
    if header is None:
        raise _empty(file, required, optional)
    wanted = [c for c in (*required, *optional) if c in names]
    columns = {}
    for c in wanted:
        idx = names.index(c)
        columns[c] = pa.array([r[idx] for r in good_rows], pa.string())
    return CsvColumns(file, names, header_line, columns, np.asarray(good_lines, np.int64), problems, "python-csv")


def _empty(file: str, required, optional) -> InputFileError:
    expected = ",".join(required) + "".join(f"[,{c}]" for c in optional)
    return InputFileError(
        [Problem(file, None, None, None, "empty file", f"is empty: expected a header line {expected} and rows")]
    )


def read_csv_columns(
    path: str | Path, *, file: str | None = None, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> CsvColumns:
    """The ``required`` and ``optional`` columns of a CSV file as string arrays.

    Raises ``InputFileError`` for an empty file, a header without a required
    column, non-UTF-8 bytes or a CSV syntax error. Records with the wrong
    number of fields are returned in ``problems`` (and left out of the columns)
    so the caller decides whether to fail or quarantine them. Extra header
    columns are ignored.
    """
    path = Path(path)
    file = file or path.name
    data = path.read_bytes()
    data = data.removeprefix(_BOM)
    if not data or data.isspace():
        raise _empty(file, required, optional)
    if _fast_path_possible(data):
        fast = _read_fast(file, data, required, optional)
        if fast is not None:
            return fast
    return _read_exact(file, _decode(file, data), required, optional)
