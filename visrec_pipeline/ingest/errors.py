"""Problems found in input files, each naming the file, the line (or row) and the column."""

from __future__ import annotations

from dataclasses import dataclass

_MAX_VALUE_CHARS = 60


def show_value(value: str) -> str:
    """``repr`` of a (possibly long) cell value, cut to a readable length."""
    if len(value) > _MAX_VALUE_CHARS:
        value = value[: _MAX_VALUE_CHARS - 3] + "..."
    return repr(value)


@dataclass(frozen=True)
class Problem:
    """One bad cell, line or file.

    ``position`` is the 1-based line of a CSV file as a text editor shows it
    (the header is line 1) or the 0-based row index of a Parquet file
    (``unit == "row index"``); None when the whole file or column is at fault.
    ``column`` is a header name, or e.g. ``"field 5"`` for a value beyond the
    header. ``reason`` is short (stored in ``raw_interaction_rejects``);
    ``message`` is the full sentence after the location.
    """

    file: str
    position: int | None
    column: str | None
    value: str | None
    reason: str
    message: str
    unit: str = "line"

    @property
    def location(self) -> str:
        where = self.file
        if self.position is not None:
            where += f" {self.unit} {self.position}"
        if self.column is not None:
            # a value beyond the header has no name, only its 1-based field number ("field 5")
            extra = self.column.startswith("field ")
            where += f", column {self.column[6:]}" if extra else f", column {self.column!r}"
        return where

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


class InputFileError(ValueError):
    """An input file that cannot be loaded as it is. ``problems`` lists every bad cell found (sorted)."""

    def __init__(self, problems: list[Problem], hint: str = "", *, shown: int = 5):
        if not problems:
            raise ValueError("InputFileError needs at least one problem")
        self.problems = problems
        self.hint = hint
        bad_positions = {(p.file, p.position) for p in problems}
        lines = [str(p) for p in problems[:shown]]
        rest = len(problems) - len(lines)
        if rest:
            lines.append(f"... and {rest} more problem(s); {len(bad_positions)} bad row(s) in all")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))

    @property
    def first(self) -> Problem:
        return self.problems[0]


class DatasetFolderError(ValueError):
    """A dataset folder without exactly one interactions file."""
