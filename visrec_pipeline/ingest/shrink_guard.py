"""Refuse a batch that would empty the interaction data or shrink it by more than a set share.

An interactions file cut short by a failed copy, or exported with a header and no rows, is valid
CSV; replacing a batch with it would silently remove those interactions and, after them, the
interactions, catalogue and split every model trains on. Such a batch is only written when the
caller explicitly allows shrinking.
"""

from __future__ import annotations

from dataclasses import dataclass

from visrec_pipeline.ingest.interactions_file import InteractionBatch

DEFAULT_MAX_SHRINK_SHARE = 0.5


class BatchShrinkRefused(ValueError):
    """A batch with no rows, or one that would shrink ``raw_interactions`` by more than allowed; nothing written."""


@dataclass(frozen=True)
class ShrinkPolicy:
    """``allow_shrinking``: write such batches anyway; ``max_shrink_share``: the largest share of
    ``raw_interactions`` rows one batch may remove without it (0..1)."""

    allow_shrinking: bool = False
    max_shrink_share: float = DEFAULT_MAX_SHRINK_SHARE

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_shrink_share <= 1.0:
            raise ValueError(f"max_shrink_share must be in [0, 1], got {self.max_shrink_share}")


def check_batch_size(
    batch: InteractionBatch, batch_id: str, file: str, *, total_rows: int, batch_rows: int, policy: ShrinkPolicy
) -> None:
    """Raise :class:`BatchShrinkRefused` unless replacing batch ``batch_id`` (``batch_rows`` of the
    ``total_rows`` rows of ``raw_interactions`` now) with ``batch`` is allowed by ``policy``."""
    if policy.allow_shrinking:
        return
    after = total_rows - batch_rows + batch.n_rows
    left = f"{after:,} of its {total_rows:,} rows (interactions, item_catalog and split follow)"
    if batch.n_rows == 0:
        what = "a header and no data rows" if batch.n_read == 0 else f"no valid rows ({batch.n_rejected_rows} rejected)"
        effect = (
            f"loading it as batch {batch_id!r} would remove that batch's {batch_rows:,} rows, leaving "
            f"raw_interactions with {left}"
            if batch_rows
            else f"an empty batch {batch_id!r} is most likely a failed export or copy"
        )
        raise BatchShrinkRefused(f"{file} has {what}: {effect}. Nothing was written.")
    if total_rows and after < total_rows:
        share = (total_rows - after) / total_rows
        if share > policy.max_shrink_share:
            raise BatchShrinkRefused(
                f"{file} is much smaller than the data it replaces: loading it as batch {batch_id!r} would shrink "
                f"raw_interactions to {left}, {share:.0%} fewer, more than max_shrink_share "
                f"{policy.max_shrink_share:.0%} allows. Nothing was written."
            )
