"""Poll Wikimedia Commons for new user-file events since a stored cursor, as incoming batches (no dagster).

An interaction is a registered, non-bot user creating, editing or uploading
a file page (namespace 6) — ``list=recentchanges``, oldest first. ``user_id``
is the user's id, ``item_id`` the file page's id, ``timestamp`` the event
time. Each poll's events are written as one batch ``incoming/commons-<from>-<to>-<newest event id>.csv``
(items file first), which ``incoming_files_sensor`` then ingests like any file.

The cursor is the timestamp of the newest event seen plus the ids of the events
at that second: ``rcstart`` is inclusive, so those are skipped on the next poll.
Commons keeps recent changes for 30 days; a cursor older than that resumes at
the oldest change still listed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from visrec_pipeline.images.commons import CommonsClient
from visrec_pipeline.ingest.incoming import ITEMS_SUFFIX

FILE_NAMESPACE = "6"
PAGE_LIMIT = 500  # recentchanges' maximum for ordinary clients
WIKI_URL = "https://commons.wikimedia.org/wiki/"


@dataclass(frozen=True)
class EventsCursor:
    start: str | None = None  # ISO-8601 UTC timestamp of the newest event seen (inclusive rcstart)
    seen_at_start: tuple[int, ...] = ()  # rcids at exactly ``start``, already delivered

    def to_json(self) -> str:
        return json.dumps({"start": self.start, "seen_at_start": list(self.seen_at_start)})

    @classmethod
    def from_json(cls, raw: str | None) -> "EventsCursor":
        if not raw:
            return cls()
        data = json.loads(raw)
        return cls(data.get("start"), tuple(int(i) for i in data.get("seen_at_start", ())))


@dataclass
class EventsPage:
    rows: list[tuple[int, int, int]] = field(default_factory=list)  # user_id, item_id, unix seconds
    items: dict[int, str] = field(default_factory=dict)  # item_id -> file title
    cursor: EventsCursor = field(default_factory=EventsCursor)


def _unix(ts: str) -> int:
    return int(datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())


def poll_file_events(
    client: CommonsClient, cursor: EventsCursor, *, max_events: int = 5000, first_start: str | None = None
) -> EventsPage:
    """Events after ``cursor`` (or from ``first_start`` on a first poll), oldest first, at most ``max_events``."""
    params = {
        "action": "query",
        "list": "recentchanges",
        "rcnamespace": FILE_NAMESPACE,
        "rctype": "new|edit|log",
        "rcshow": "!bot|!anon",
        "rcprop": "title|ids|userid|timestamp",
        "rcdir": "newer",
        "rclimit": str(PAGE_LIMIT),
    }
    start = cursor.start or first_start
    if start:
        params["rcstart"] = start
    skip = set(cursor.seen_at_start)
    page = EventsPage(cursor=cursor)
    newest, at_newest = cursor.start, set(cursor.seen_at_start)
    extra: dict[str, str] = {}
    while len(page.rows) < max_events:
        payload = client.query({**params, **extra})
        for change in payload.get("query", {}).get("recentchanges", []):
            rcid, ts = int(change.get("rcid", 0)), str(change.get("timestamp", ""))
            user, item = int(change.get("userid") or 0), int(change.get("pageid") or 0)
            if rcid in skip or not ts or user <= 0 or item <= 0:
                continue  # already delivered, hidden user, or a page that no longer exists
            page.rows.append((user, item, _unix(ts)))
            page.items[item] = str(change.get("title", ""))
            if ts != newest:
                newest, at_newest = ts, set()
            at_newest.add(rcid)
            if len(page.rows) >= max_events:
                break
        cont = payload.get("continue")
        if not cont:
            break
        extra = {k: str(v) for k, v in cont.items()}
    page.cursor = EventsCursor(newest, tuple(sorted(at_newest)))
    return page


def _write_atomic(path: Path, text: str) -> None:
    # a dot-named temp file in the same folder: the sensor ignores it until the rename
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _compact(ts: int) -> str:
    return f"{datetime.fromtimestamp(ts, timezone.utc):%Y%m%dT%H%M%S}"


def _csv(header, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_events_batch(incoming_dir: Path, page: EventsPage) -> Path | None:
    """``incoming/commons-<first>-<last>-<id>.csv`` and its ``_items.csv`` (written first); None when no events."""
    if not page.rows:
        return None
    incoming_dir.mkdir(parents=True, exist_ok=True)
    first = min(ts for _, _, ts in page.rows)
    last = max(ts for _, _, ts in page.rows)
    # the newest event id too: two polls within one second still get different names
    newest_id = max(page.cursor.seen_at_start, default=0)
    stem = f"commons-{_compact(first)}-{_compact(last)}-{newest_id}"
    items = [
        (item_id, title, "", WIKI_URL + quote(title.replace(" ", "_"), safe=":/")) for item_id, title in sorted(page.items.items())
    ]
    _write_atomic(incoming_dir / f"{stem}{ITEMS_SUFFIX}", _csv(("item_id", "title", "creator", "url"), items))
    path = incoming_dir / f"{stem}.csv"
    _write_atomic(path, _csv(("user_id", "item_id", "timestamp"), page.rows))
    return path
