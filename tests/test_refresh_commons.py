"""The Commons poll: new file events since the cursor become one incoming batch (a real local HTTP server)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import dagster as dg
import pytest

from visrec_pipeline.defs.commons_poll import commons_events_sensor
from visrec_pipeline.defs.images import CommonsImageSource
from visrec_pipeline.defs.refresh import incoming_files_sensor
from visrec_pipeline.defs.resources import VisrecDuckDB, VisrecSettings
from visrec_pipeline.ingest import read_interactions
from visrec_pipeline.ingest.incoming import read_catalog_items


def change(rcid, ts, user, page, title):
    return {"type": "edit", "ns": 6, "rcid": rcid, "timestamp": ts, "userid": user, "pageid": page, "title": title}


class RecentChanges:
    """Serves list=recentchanges oldest first from ``changes``, honouring rcstart and a 2-per-page continuation."""

    def __init__(self):
        self.changes = []
        self.requests: list[dict] = []

    def answer(self, q: dict) -> dict:
        self.requests.append(q)
        start = q.get("rcstart", "")
        listed = [c for c in self.changes if c["timestamp"] >= start]
        offset = int(q.get("rccontinue", "0"))
        body = {"batchcomplete": True, "query": {"recentchanges": listed[offset : offset + 2]}}
        if offset + 2 < len(listed):
            body["continue"] = {"rccontinue": str(offset + 2), "continue": "-||"}
        return body


@pytest.fixture
def commons_api():
    state = RecentChanges()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            q = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
            data = json.dumps(state.answer(q)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}/w/api.php"
    server.shutdown()
    server.server_close()


def test_commons_events_since_the_cursor_become_incoming_batches(workspace, commons_api):
    state, url = commons_api
    state.changes = [
        change(1, "2021-07-01T10:00:00Z", 5, 100, "File:A b.jpg"),
        change(2, "2021-07-01T10:00:05Z", 0, 101, "File:Hidden user.jpg"),  # user hidden: skipped
        change(3, "2021-07-01T10:00:09Z", 6, 102, "File:C.png"),
    ]
    resources = {
        "settings": VisrecSettings(data_dir=str(workspace.data_dir), dataset=workspace.dataset),
        "duckdb": VisrecDuckDB(database=str(workspace.db_path)),
        "commons": CommonsImageSource(api_url=url, contact="visrec-tests@example.org", max_retries=0),
    }
    with dg.DagsterInstance.ephemeral() as instance:
        first = commons_events_sensor(dg.build_sensor_context(instance=instance, resources=resources))
        (batch,) = sorted(workspace.incoming_dir.glob("commons-*[0-9].csv"))
        rows = read_interactions(batch, file=batch.name).rows
        assert list(zip(*(rows.column(c).to_pylist() for c in ("user_id", "item_id", "ts")))) == [
            (5, 100, 1625133600),
            (6, 102, 1625133609),
        ]
        items, _ = read_catalog_items(workspace.dataset_dir)
        assert items.column("url").to_pylist() == [
            "https://commons.wikimedia.org/wiki/File:A_b.jpg",
            "https://commons.wikimedia.org/wiki/File:C.png",
        ]
        assert [r.get("rccontinue") for r in state.requests] == [None, "2"]  # the continuation was followed

        # the file sensor registers what the poll wrote, like any delivered file
        tick = incoming_files_sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert [r.tags["visrec/source_file"] for r in tick.run_requests] == [f"incoming/{batch.name}"]

        # next poll: from the cursor (inclusive), the event already delivered at that second is skipped
        state.changes.append(change(4, "2021-07-01T10:00:09Z", 7, 103, "File:D.jpg"))
        state.requests.clear()
        second = commons_events_sensor(
            dg.build_sensor_context(instance=instance, resources=resources, cursor=first.cursor)
        )
        assert state.requests[0]["rcstart"] == "2021-07-01T10:00:09Z"
        new = sorted(set(workspace.incoming_dir.glob("commons-*[0-9].csv")) - {batch})
        assert len(new) == 1
        assert read_interactions(new[0]).rows.column("user_id").to_pylist() == [7]

        # nothing new: no file, the cursor stays
        third = commons_events_sensor(
            dg.build_sensor_context(instance=instance, resources=resources, cursor=second.cursor)
        )
        assert third.cursor == second.cursor
        assert len(list(workspace.incoming_dir.glob("commons-*[0-9].csv"))) == 2
