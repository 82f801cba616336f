"""Column-wise parsing of ids, timestamps and evaluation flags, from strings or typed Arrow arrays.

Every parser returns the parsed values plus a per-row problem code; nothing
loops over rows in Python. Text rules:
- ids: digits only (surrounding blanks allowed), non-negative, fit in int64;
- timestamps: an integer is unix seconds; anything else must be an ISO-8601
  date or date-time (naive ones are read as UTC; fractions of a second are
  dropped); before 1970 or after the year 3000 (milliseconds by mistake) is
  refused, and so is anything later than ``max_ts`` when the caller gives one
  (now plus a tolerance: a future interaction would become its user's holdout);
- evaluation: true/false, t/f, yes/no, y/n, 1/0 (any case, also 1.0/0.0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from visrec_pipeline.ingest.errors import show_value

INT64_MAX = np.iinfo(np.int64).max
# Unix seconds at 3000-01-01: a larger value is almost surely milliseconds.
MAX_UNIX_SECONDS = 32_503_680_000

OK = 0
EMPTY = 1
NOT_INTEGER = 2
NEGATIVE = 3
TOO_LARGE = 4
NOT_A_DATE = 5
NOT_WHOLE = 6
NOT_BOOLEAN = 7
IN_FUTURE = 8

# (short reason, message template) per (kind, code); {value} is the shown cell value.
_MESSAGES = {
    "id": {
        EMPTY: ("empty", "empty value; expected a non-negative integer id"),
        NOT_INTEGER: ("not an integer", "{value} is not an integer id"),
        NEGATIVE: ("negative", "{value} is negative; ids must be non-negative integers"),
        TOO_LARGE: ("too large", "{value} does not fit a 64-bit integer id"),
    },
    "timestamp": {
        EMPTY: ("empty", "empty value; expected unix seconds or an ISO-8601 date"),
        NOT_A_DATE: ("not a timestamp", "{value} is not a unix timestamp or ISO-8601 date"),
        NOT_WHOLE: ("not whole seconds", "{value} is not a whole number of unix seconds"),
        NEGATIVE: ("before 1970", "{value} is before 1970-01-01 (a negative unix timestamp)"),
        TOO_LARGE: (
            "after year 3000",
            "{value} is after the year 3000: unix timestamps must be in seconds (milliseconds?)",
        ),
        IN_FUTURE: (
            "in the future",
            "{value} is in the future: later than {max_ts} (now plus the future_tolerance_hours setting)",
        ),
    },
    "boolean": {
        EMPTY: ("empty", "empty value; expected true/false or 1/0"),
        NOT_BOOLEAN: ("not a boolean", "{value} is not a boolean (true/false, 1/0)"),
    },
}

_TRUE = ["true", "t", "yes", "y", "1", "1.0"]
_FALSE = ["false", "f", "no", "n", "0", "0.0"]


class UnsupportedColumnType(TypeError):
    """A typed (Parquet) column whose Arrow type cannot hold this kind of value."""


@dataclass
class ParsedColumn:
    kind: str  # "id", "timestamp" or "boolean"
    raw: pa.Array  # the input, to show bad values
    values: np.ndarray  # int64 or bool; meaningless where ``codes != OK``
    codes: np.ndarray  # uint8 problem code per row
    details: dict[str, str] = field(default_factory=dict)  # more fields of the message templates

    @property
    def bad(self) -> np.ndarray:
        return self.codes != OK

    def describe(self, index: int) -> tuple[str, str | None, str]:
        """(short reason, shown value or None, message) for bad row ``index``."""
        code = int(self.codes[index])
        reason, template = _MESSAGES[self.kind][code]
        raw = self.raw[index].as_py()
        value = None if raw is None else str(raw)
        shown = show_value(value if value is not None else "")
        return reason, value, template.format(value=shown, **self.details)


def _np(mask) -> np.ndarray:
    """Boolean Arrow array/scalar -> numpy bool, null as False."""
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


def _codes(n: int, *pairs: tuple[np.ndarray, int]) -> np.ndarray:
    """First matching code per row (earlier pairs win)."""
    codes = np.zeros(n, np.uint8)
    for mask, code in reversed(pairs):
        codes[mask] = code
    return codes


def _decode(arr: pa.Array) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_large_string(arr.type) or pa.types.is_string_view(arr.type):
        arr = arr.cast(pa.string())
    return arr


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t)


def _digits_to_int64(digits: pa.Array, ok: np.ndarray) -> np.ndarray:
    """Cast strings of digits (no sign, leading zeros stripped) where ``ok``; 0 elsewhere."""
    safe = pc.if_else(pa.array(ok), digits, pa.scalar("0"))
    return np.asarray(safe.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)


def _plain_integers(s: pa.Array) -> np.ndarray | None:
    """Values of trimmed text when every entry is a plain decimal integer (the common case), else None.

    Arrow's cast alone would also accept hexadecimal ("0x1F"), hence the digit check.
    """
    if len(s) == 0 or s.null_count:
        return None
    try:
        values = pc.cast(s, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if not pc.all(pc.ascii_is_decimal(pc.utf8_ltrim(s, characters="-"))).as_py():
        return None
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.int64)


def _parse_integer_text(s: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(values, is_empty, is_integer, is_negative, too_large) of trimmed text, sign allowed."""
    n = len(s)
    plain = _plain_integers(s)
    if plain is not None:
        none = np.zeros(n, bool)
        return plain, none, ~none, plain < 0, none
    empty = _np(pc.or_kleene(pc.is_null(s), pc.equal(pc.utf8_length(s), 0)))
    is_int = _np(pc.match_substring_regex(s, r"^[+-]?[0-9]+$"))
    minus = _np(pc.starts_with(s, "-"))
    unsigned = pc.replace_substring_regex(s, r"^[+-]", "")
    digits = pc.replace_substring_regex(unsigned, r"^0+([0-9])", r"\1")
    length = np.asarray(pc.fill_null(pc.utf8_length(digits), 0).to_numpy(zero_copy_only=False))
    longest = _np(pc.greater(digits, pa.scalar(str(INT64_MAX))))
    too_large = is_int & ((length > 19) | ((length == 19) & longest))
    ok = is_int & ~too_large
    values = _digits_to_int64(digits, ok)
    values = np.where(minus, -values, values)
    return values, empty, is_int, is_int & (values < 0), too_large


def _parse_numeric(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(values, is_null, not_whole, negative, too_large) of an integer or floating array."""
    t = arr.type
    if pa.types.is_floating(t):
        x = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float64)
        null = np.isnan(x)  # nulls come back as NaN
        finite = np.isfinite(x)
        not_whole = ~null & (~finite | (np.floor(np.where(finite, x, 0)) != np.where(finite, x, 0)))
        negative = ~null & ~not_whole & (x < 0)
        too_large = ~null & ~not_whole & (x >= 2.0**63)
        ok = ~(null | not_whole | negative | too_large)
        values = np.where(ok, np.where(finite, x, 0), 0).astype(np.int64)
        return values, null, not_whole, negative, too_large
    null = _np(pc.is_null(arr))
    if pa.types.is_unsigned_integer(t):
        too_large = (
            _np(pc.greater(arr, pa.scalar(INT64_MAX, pa.uint64()))) if t.bit_width == 64 else np.zeros(len(arr), bool)
        )
        negative = np.zeros(len(arr), bool)
        safe = pc.if_else(pa.array(~too_large), arr, pa.scalar(0, t))
    else:
        negative = _np(pc.less(arr, pa.scalar(0, t)))
        too_large = np.zeros(len(arr), bool)
        safe = arr
    values = np.asarray(pc.fill_null(safe.cast(pa.int64()), 0).to_numpy(zero_copy_only=False), dtype=np.int64)
    return values, null, np.zeros(len(arr), bool), negative, too_large


def parse_ids(arr: pa.Array) -> ParsedColumn:
    arr = _decode(arr)
    t, n = arr.type, len(arr)
    if _is_text(t):
        s = pc.utf8_trim_whitespace(arr)
        values, empty, is_int, negative, too_large = _parse_integer_text(s)
        codes = _codes(n, (empty, EMPTY), (~is_int, NOT_INTEGER), (negative, NEGATIVE), (too_large, TOO_LARGE))
    elif pa.types.is_integer(t) or pa.types.is_floating(t):
        values, null, not_whole, negative, too_large = _parse_numeric(arr)
        codes = _codes(n, (null, EMPTY), (not_whole, NOT_INTEGER), (negative, NEGATIVE), (too_large, TOO_LARGE))
    elif pa.types.is_null(t):
        values, codes = np.zeros(n, np.int64), np.full(n, EMPTY, np.uint8)
    else:
        raise UnsupportedColumnType(f"has type {t}; expected integers or text")
    return ParsedColumn("id", arr, values, codes)


def _iso_to_seconds(s: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(unix seconds floored, parsed ok) of ISO-8601 text; naive times are UTC."""
    if len(s) == 0:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    parsed = pd.to_datetime(pd.Series(s.to_pylist(), dtype=object), format="ISO8601", utc=True, errors="coerce")
    ok = ~parsed.isna().to_numpy()
    us = parsed.dt.tz_convert(None).to_numpy().astype("datetime64[us]").astype(np.int64)
    seconds = np.where(ok, np.floor_divide(us, 1_000_000), 0)
    return seconds.astype(np.int64), ok


def _utc_text(ts: int) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamps(arr: pa.Array, max_ts: int | None = None) -> ParsedColumn:
    """Unix seconds of ``arr``; values after ``max_ts`` (unix seconds, when given) are refused as
    being in the future."""
    column = _parse_timestamps(arr)
    if max_ts is not None:
        column.codes[(column.codes == OK) & (column.values > max_ts)] = IN_FUTURE
        column.details["max_ts"] = _utc_text(max_ts)
    return column


def _parse_timestamps(arr: pa.Array) -> ParsedColumn:
    arr = _decode(arr)
    t, n = arr.type, len(arr)
    if _is_text(t):
        s = pc.utf8_trim_whitespace(arr)
        values, empty, is_int, negative, too_large = _parse_integer_text(s)
        too_large = too_large | (is_int & ~negative & (values > MAX_UNIX_SECONDS))
        textual = np.flatnonzero(~empty & ~is_int)
        not_a_date = np.zeros(n, bool)
        if textual.size:
            secs, ok = _iso_to_seconds(s.take(pa.array(textual)))
            values[textual] = secs
            not_a_date[textual] = ~ok
            negative[textual] = ok & (secs < 0)
            too_large[textual] = ok & (secs > MAX_UNIX_SECONDS)
        codes = _codes(n, (empty, EMPTY), (not_a_date, NOT_A_DATE), (negative, NEGATIVE), (too_large, TOO_LARGE))
    elif pa.types.is_integer(t) or pa.types.is_floating(t):
        values, null, not_whole, negative, too_large = _parse_numeric(arr)
        too_large = too_large | (~null & ~not_whole & ~negative & (values > MAX_UNIX_SECONDS))
        codes = _codes(n, (null, EMPTY), (not_whole, NOT_WHOLE), (negative, NEGATIVE), (too_large, TOO_LARGE))
    elif pa.types.is_timestamp(t) or pa.types.is_date(t):
        if pa.types.is_date(t):
            arr_ts = arr.cast(pa.timestamp("s"))
            per_second = 1
        else:
            arr_ts = arr
            per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[t.unit]
        null = _np(pc.is_null(arr_ts))
        raw = np.asarray(pc.fill_null(arr_ts.cast(pa.int64()), 0).to_numpy(zero_copy_only=False), dtype=np.int64)
        values = np.floor_divide(raw, per_second)
        codes = _codes(n, (null, EMPTY), (values < 0, NEGATIVE), (values > MAX_UNIX_SECONDS, TOO_LARGE))
    elif pa.types.is_null(t):
        values, codes = np.zeros(n, np.int64), np.full(n, EMPTY, np.uint8)
    else:
        raise UnsupportedColumnType(f"has type {t}; expected unix seconds, ISO-8601 text or a timestamp type")
    return ParsedColumn("timestamp", arr, values, codes)


def parse_booleans(arr: pa.Array) -> ParsedColumn:
    arr = _decode(arr)
    t, n = arr.type, len(arr)
    if _is_text(t):
        s = pc.utf8_lower(pc.utf8_trim_whitespace(arr))
        empty = _np(pc.or_kleene(pc.is_null(s), pc.equal(pc.utf8_length(s), 0)))
        true = _np(pc.is_in(s, value_set=pa.array(_TRUE)))
        false = _np(pc.is_in(s, value_set=pa.array(_FALSE)))
        codes = _codes(n, (empty, EMPTY), (~true & ~false, NOT_BOOLEAN))
        values = true
    elif pa.types.is_boolean(t):
        codes = _codes(n, (_np(pc.is_null(arr)), EMPTY))
        values = _np(arr)
    elif pa.types.is_integer(t) or pa.types.is_floating(t):
        null = _np(pc.is_null(arr)) | (_np(pc.is_nan(arr)) if pa.types.is_floating(t) else False)
        one = _np(pc.equal(arr, pa.scalar(1).cast(t)))
        zero = _np(pc.equal(arr, pa.scalar(0).cast(t)))
        codes = _codes(n, (null, EMPTY), (~one & ~zero, NOT_BOOLEAN))
        values = one
    elif pa.types.is_null(t):
        values, codes = np.zeros(n, bool), np.full(n, EMPTY, np.uint8)
    else:
        raise UnsupportedColumnType(f"has type {t}; expected booleans, 0/1 or text")
    return ParsedColumn("boolean", arr, np.asarray(values, bool), codes)
