"""Small summaries for metadata: distributions of counts and markdown tables."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

DISTRIBUTION_POINTS = (("min", 0), ("p25", 25), ("median", 50), ("p75", 75), ("p90", 90), ("max", 100))


def distribution(counts: Sequence[int] | np.ndarray) -> dict[str, float]:
    """min / p25 / median / p75 / p90 / max (linear interpolation); zeros when empty."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.size == 0:
        return {name: 0.0 for name, _ in DISTRIBUTION_POINTS}
    values = np.percentile(counts, [q for _, q in DISTRIBUTION_POINTS])
    return {name: float(v) for (name, _), v in zip(DISTRIBUTION_POINTS, values)}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def distribution_markdown(dist: Mapping[str, float], what: str) -> str:
    return markdown_table(["", *dist.keys()], [[what, *dist.values()]])


def sparsity(n_interactions: int, n_users: int, n_items: int) -> float:
    cells = n_users * n_items
    return 1.0 - n_interactions / cells if cells else 0.0
