"""``commons_events_sensor``: for a dataset sourced from Wikimedia Commons, poll new file events
since the cursor and deliver them as a batch file into ``incoming/`` (``ingest/commons_events.py``).

It only writes the file; ``incoming_files_sensor`` registers and ingests it like any other
delivery, so one code path validates every batch. Ships stopped; switch it on in the UI.
"""

# No ``from __future__ import annotations``: Dagster resolves resource annotations at definition time.

import os

import dagster as dg

from visrec_pipeline.defs.images import CommonsImageSource
from visrec_pipeline.defs.resources import VisrecSettings
from visrec_pipeline.images.commons import CommonsError
from visrec_pipeline.ingest.commons_events import EventsCursor, poll_file_events, write_events_batch

FIRST_START_ENV = "VISREC_COMMONS_EVENTS_SINCE"
MAX_EVENTS_PER_POLL = 5000


@dg.sensor(
    name="commons_events_sensor",
    minimum_interval_seconds=600,
    description="Polls Wikimedia Commons recent changes to file pages (registered, non-bot users) since the "
    "stored cursor and writes them as a batch into incoming/ (user_id, file page id, time), with the files' "
    f"titles in its _items.csv. First poll: from {FIRST_START_ENV} (ISO-8601), else what Commons still lists.",
)
def commons_events_sensor(
    context: dg.SensorEvaluationContext, settings: VisrecSettings, commons: CommonsImageSource
) -> dg.SensorResult:
    cursor = EventsCursor.from_json(context.cursor)
    try:
        with commons.client() as client:
            page = poll_file_events(
                client, cursor, max_events=MAX_EVENTS_PER_POLL, first_start=os.environ.get(FIRST_START_ENV) or None
            )
    except CommonsError as exc:  # the cursor stays: the next tick retries from the same point
        return dg.SensorResult(skip_reason=f"Commons poll failed: {exc}")
    path = write_events_batch(settings.workspace.incoming_dir, page)
    if path is None:
        return dg.SensorResult(skip_reason="no new file events on Commons", cursor=page.cursor.to_json())
    context.log.info(f"{len(page.rows)} events from Commons written to {path}")
    # the file is picked up by incoming_files_sensor on its next tick
    return dg.SensorResult(skip_reason=f"wrote {path.name}", cursor=page.cursor.to_json())


defs = dg.Definitions(sensors=[commons_events_sensor])
