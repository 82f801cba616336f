"""Reading and validating interaction and item files: every malformed input names file, line and column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visrec_pipeline.ingest import InputFileError, csv_reader, find_interactions_file, read_interactions, read_items
from visrec_pipeline.ingest.errors import DatasetFolderError

HEADER = "user_id,item_id,timestamp,evaluation\n"


def _csv(tmp_path: Path, text: str, name: str = "interactions.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _error(path: Path, **kw) -> InputFileError:
    with pytest.raises(InputFileError) as info:
        read_interactions(path, **kw)
    return info.value


def _rows(batch) -> list[tuple]:
    df = batch.rows.to_pandas()
    return list(df.itertuples(index=False, name=None))


# --- well-formed input -------------------------------------------------------------------------


def test_reads_integer_and_iso_timestamps_and_flags(tmp_path):
    path = _csv(
        tmp_path,
        HEADER
        + "1,10,1600000000,False\n"
        + "1,11,2021-01-05T10:00:00Z,True\n"
        + "2,10,2021-01-05 12:00:00+02:00,1\n"
        + "3,12,2021-01-05,0\n"
        + "3,13,2021-01-05T00:00:01.9,yes\n",
    )
    batch = read_interactions(path)
    assert batch.reader == "pyarrow" and batch.has_evaluation and batch.n_read == 5
    assert _rows(batch) == [
        (1, 10, 1600000000, False, 2),
        (1, 11, 1609840800, True, 3),
        (2, 10, 1609840800, True, 4),
        (3, 12, 1609804800, False, 5),
        (3, 13, 1609804801, True, 6),  # fractions of a second dropped, naive = UTC
    ]


def test_without_evaluation_column_flags_are_null_and_extra_columns_are_ignored(tmp_path):
    path = _csv(tmp_path, ",user_id,item_id,timestamp,comment\n0,1,10,5,a\n1,2,11,6,b\n")
    batch = read_interactions(path)
    assert not batch.has_evaluation
    assert batch.ignored_columns == ["", "comment"]
    assert batch.rows.column("evaluation").null_count == 2
    assert batch.rows.column("user_id").to_pylist() == [1, 2]


def test_line_numbers_count_blank_lines_crlf_and_bom_in_both_readers(tmp_path):
    text = '\ufeffuser_id,item_id,timestamp,note\r\n\r\n1,10,5,"a, b"\r\n\r\n\r\n2,11,6,c\r\n'
    fast = read_interactions(_csv(tmp_path, text, "a.csv"))
    # a quoted value spanning lines needs the exact reader
    exact = read_interactions(_csv(tmp_path, text.replace(",c\r\n", ',"c\r\nd"\r\n'), "b.csv"))
    assert fast.reader == "pyarrow" and exact.reader == "python-csv"
    assert fast.rows.column("source_line").to_pylist() == [3, 6]
    assert fast.rows.equals(exact.rows)


def test_quoted_newline_keeps_later_line_numbers_right(tmp_path):
    text = 'user_id,item_id,timestamp,note\n1,10,5,"two\nlines"\n2,x,6,ok\n'
    err = _error(_csv(tmp_path, text))
    assert str(err).splitlines()[0] == "interactions.csv line 4, column 'item_id': 'x' is not an integer id"


def test_fast_and_exact_readers_agree_on_a_larger_file(tmp_path):
    rng = np.random.default_rng(3)
    n = 5000
    df = pd.DataFrame(
        {
            "user_id": rng.integers(0, 300, n),
            "item_id": rng.integers(0, 900, n),
            "timestamp": rng.integers(1_400_000_000, 1_600_000_000, n),
            "evaluation": rng.random(n) < 0.1,
        }
    )
    df["note"] = np.where(rng.random(n) < 0.2, "x, y", "")  # quoted values with commas
    path = tmp_path / "interactions.csv"
    df.to_csv(path, index=False)
    required, optional = ("user_id", "item_id", "timestamp"), ("evaluation",)
    fast = csv_reader._read_fast("f.csv", path.read_bytes(), required, optional)
    exact = csv_reader._read_exact("f.csv", path.read_text(), required, optional)
    assert (fast.reader, exact.reader) == ("pyarrow", "python-csv")
    assert fast.lines.tolist() == exact.lines.tolist() == list(range(2, n + 2))
    for c in (*required, *optional):
        assert fast.columns[c].equals(exact.columns[c])
    batch = read_interactions(path)
    assert batch.reader == "pyarrow"
    assert batch.rows.column("user_id").to_numpy().tolist() == df["user_id"].tolist()


def test_header_only_file_gives_zero_rows(tmp_path):
    batch = read_interactions(_csv(tmp_path, "user_id,item_id,timestamp\n"))
    assert batch.n_rows == 0


# --- malformed CSV: one test per kind, each asserting file, line and column ----------------------


@pytest.mark.parametrize(
    "row, expected",
    [
        ("abc,10,5,0", "line 3, column 'user_id': 'abc' is not an integer id"),
        ("1.5,10,5,0", "line 3, column 'user_id': '1.5' is not an integer id"),
        ("0x10,10,5,0", "line 3, column 'user_id': '0x10' is not an integer id"),
        ("1,-4,5,0", "line 3, column 'item_id': '-4' is negative; ids must be non-negative integers"),
        (",10,5,0", "line 3, column 'user_id': empty value; expected a non-negative integer id"),
        (
            "1,99999999999999999999,5,0",
            "line 3, column 'item_id': '99999999999999999999' does not fit a 64-bit integer id",
        ),
        ("1,10,yesterday,0", "line 3, column 'timestamp': 'yesterday' is not a unix timestamp or ISO-8601 date"),
        ("1,10,2021-02-30,0", "line 3, column 'timestamp': '2021-02-30' is not a unix timestamp or ISO-8601 date"),
        ("1,10,-5,0", "line 3, column 'timestamp': '-5' is before 1970-01-01 (a negative unix timestamp)"),
        (
            "1,10,1969-12-31T23:59:59,0",
            "line 3, column 'timestamp': '1969-12-31T23:59:59' is before 1970-01-01 (a negative unix timestamp)",
        ),
        (
            "1,10,1600000000000,0",
            (
                "line 3, column 'timestamp': '1600000000000' is after the year 3000: unix timestamps must be in "
                "seconds (milliseconds?)"
            ),
        ),
        ("1,10,,0", "line 3, column 'timestamp': empty value; expected unix seconds or an ISO-8601 date"),
        ("1,10,5,maybe", "line 3, column 'evaluation': 'maybe' is not a boolean (true/false, 1/0)"),
        ("1,10,5,", "line 3, column 'evaluation': empty value; expected true/false or 1/0"),
        ("1,10,5", "line 3, column 'evaluation': missing: the line has 3 field(s), the header 4"),
        ("1,10", "line 3, column 'timestamp': missing: the line has 2 field(s), the header 4"),
        ("1,10,5,0,7", "line 3, column 5: unexpected extra value '7': the line has 5 fields, the header 4"),
    ],
)
def test_malformed_row_names_file_line_and_column(tmp_path, row, expected):
    path = _csv(tmp_path, HEADER + "1,11,6,0\n" + row + "\n2,12,7,1\n")
    err = _error(path)
    assert str(err).splitlines()[0] == f"interactions.csv {expected}"
    assert err.first.position == 3


def test_blank_lines_before_a_bad_row_count_in_its_line_number(tmp_path):
    err = _error(_csv(tmp_path, HEADER + "\n\n1,10,yesterday,0\n"))
    assert str(err).startswith("interactions.csv line 4, column 'timestamp': 'yesterday'")


def test_every_bad_row_is_listed_and_a_count_follows(tmp_path):
    rows = "".join(f"{i},x{i},5,0\n" for i in range(8))
    err = _error(_csv(tmp_path, HEADER + rows))
    lines = str(err).splitlines()
    assert lines[0] == "interactions.csv line 2, column 'item_id': 'x0' is not an integer id"
    assert lines[4] == "interactions.csv line 6, column 'item_id': 'x4' is not an integer id"
    assert lines[5] == "... and 3 more problem(s); 8 bad row(s) in all"
    assert len(err.problems) == 8


def test_file_name_given_by_the_caller_is_used(tmp_path):
    err = _error(_csv(tmp_path, HEADER + "1,10,soon,0\n"), file="incoming/2021-06.csv")
    assert str(err).startswith("incoming/2021-06.csv line 2, column 'timestamp': 'soon'")


def test_missing_header_column(tmp_path):
    err = _error(_csv(tmp_path, "user_id,item,ts\n1,2,3\n"))
    assert str(err) == (
        "interactions.csv line 1: the header lacks required column(s) 'item_id', 'timestamp'; "
        "found 'user_id', 'item', 'ts'; expected user_id,item_id,timestamp[,evaluation]"
    )


def test_headerless_file_is_reported_as_missing_header_columns(tmp_path):
    err = _error(_csv(tmp_path, "1,10,5\n2,11,6\n"))
    assert str(err).startswith("interactions.csv line 1: the header lacks required column(s) 'user_id'")


def test_duplicate_header_column(tmp_path):
    err = _error(_csv(tmp_path, "user_id,item_id,timestamp,item_id\n1,2,3,4\n"))
    assert str(err) == "interactions.csv line 1, column 'item_id': appears more than once in the header"


def test_empty_file(tmp_path):
    err = _error(_csv(tmp_path, "\n\n"))
    assert str(err) == (
        "interactions.csv: is empty: expected a header line user_id,item_id,timestamp[,evaluation] and rows"
    )


def test_not_utf8(tmp_path):
    err = _error(_csv(tmp_path, HEADER.encode() + b"1,10,5,0\n2,\xff\xfe,6,0\n"))
    assert str(err) == "interactions.csv line 3: is not UTF-8 text (byte offset 48)"


def test_unterminated_quote(tmp_path):
    err = _error(_csv(tmp_path, HEADER + '1,10,5,0\n2,"11,6,0\n'))
    assert str(err).startswith("interactions.csv line 3: malformed CSV: ")


def test_quarantine_keeps_good_rows_and_returns_every_problem(tmp_path):
    path = _csv(tmp_path, HEADER + "1,10,5,0\n1,x,yesterday,0\n2,11,6,1\n3,12,7\n4,13,8,nope\n")
    batch = read_interactions(path, quarantine=True)
    assert _rows(batch) == [(1, 10, 5, False, 2), (2, 11, 6, True, 4)]
    assert batch.n_read == 5 and batch.n_rejected_rows == 3
    assert [(p.position, p.column, p.value, p.reason) for p in batch.rejects] == [
        (3, "item_id", "x", "not an integer"),
        (3, "timestamp", "yesterday", "not a timestamp"),
        (5, "evaluation", None, "missing field"),
        (6, "evaluation", "nope", "not a boolean"),
    ]


# --- Parquet -----------------------------------------------------------------------------------


def _parquet(tmp_path: Path, table: pa.Table) -> Path:
    path = tmp_path / "interactions.parquet"
    pq.write_table(table, path)
    return path


def test_parquet_with_typed_columns(tmp_path):
    table = pa.table(
        {
            "user_id": pa.array([1, 2], pa.int32()),
            "item_id": pa.array(["10", "11"]),
            "timestamp": pa.array([1_600_000_000_500, 1_600_000_001_000], pa.timestamp("ms", tz="UTC")),
            "evaluation": pa.array([True, False]),
        }
    )
    batch = read_interactions(_parquet(tmp_path, table))
    assert batch.reader == "parquet"
    assert _rows(batch) == [(1, 10, 1_600_000_000, True, 0), (2, 11, 1_600_000_001, False, 1)]


def test_parquet_errors_name_the_row_index(tmp_path):
    table = pa.table(
        {
            "user_id": pa.array([1, None, 3], pa.int64()),
            "item_id": pa.array([10.0, 11.0, 12.5]),
            "timestamp": pa.array([5, 6, -7]),
        }
    )
    err = _error(_parquet(tmp_path, table))
    assert str(err).splitlines()[:3] == [
        "interactions.parquet row index 1, column 'user_id': empty value; expected a non-negative integer id",
        "interactions.parquet row index 2, column 'item_id': '12.5' is not an integer id",
        ("interactions.parquet row index 2, column 'timestamp': '-7' is before 1970-01-01 (a negative unix timestamp)"),
    ]


def test_parquet_column_of_the_wrong_type(tmp_path):
    table = pa.table({"user_id": [True], "item_id": [1], "timestamp": [5]})
    err = _error(_parquet(tmp_path, table))
    assert str(err) == "interactions.parquet, column 'user_id': has type bool; expected integers or text"


def test_parquet_missing_column(tmp_path):
    err = _error(_parquet(tmp_path, pa.table({"user_id": [1], "item_id": [2]})))
    assert str(err) == (
        "interactions.parquet: lacks required column(s) 'timestamp'; found 'user_id', 'item_id'; "
        "expected user_id,item_id,timestamp[,evaluation]"
    )


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "interactions.parquet"
    path.write_bytes(b"not parquet at all")
    err = _error(path)
    assert str(err).startswith("interactions.parquet: is not a readable Parquet file: ")


# --- the dataset folder ------------------------------------------------------------------------


def test_find_interactions_file(tmp_path):
    with pytest.raises(DatasetFolderError, match="no interactions file in .*: expected interactions.csv or"):
        find_interactions_file(tmp_path)
    (tmp_path / "interactions.csv").write_text(HEADER)
    assert find_interactions_file(tmp_path) == tmp_path / "interactions.csv"
    (tmp_path / "interactions.parquet").write_text("")
    with pytest.raises(DatasetFolderError, match="both interactions.csv and interactions.parquet"):
        find_interactions_file(tmp_path)


# --- items.csv ---------------------------------------------------------------------------------


def test_items_file_blank_text_is_null_and_quotes_work(tmp_path):
    path = _csv(tmp_path, 'item_id,title,creator\n10,"Bridge, at night",Ana\n11,Harbour,  \n', "items.csv")
    table = read_items(path).to_pandas()
    assert table["title"].tolist() == ["Bridge, at night", "Harbour"]
    assert table["creator"].isna().tolist() == [False, True]
    assert table["url"].isna().all()


@pytest.mark.parametrize(
    "rows, expected",
    [
        ("10,a\n11,b\n10,c\n", "items.csv line 4, column 'item_id': item 10 is listed again (first on line 2)"),
        ("10,a\nten,b\n", "items.csv line 3, column 'item_id': 'ten' is not an integer id"),
        (
            "10,a\n11,b,extra\n",
            "items.csv line 3, column 3: unexpected extra value 'extra': the line has 3 fields, the header 2",
        ),
    ],
)
def test_items_file_errors(tmp_path, rows, expected):
    with pytest.raises(InputFileError) as info:
        read_items(_csv(tmp_path, "item_id,title\n" + rows, "items.csv"))
    assert str(info.value).splitlines()[0] == expected


def test_items_file_without_item_id_column(tmp_path):
    with pytest.raises(InputFileError, match=r"items.csv line 1: the header lacks required column\(s\) 'item_id'"):
        read_items(_csv(tmp_path, "id,title\n1,a\n", "items.csv"))
