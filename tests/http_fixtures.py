"""Test helpers for the image tests: real image payloads and a real local Commons emulator.

``FakeCommons`` is an ``http.server`` on 127.0.0.1 (ephemeral port, its own
thread) that answers the MediaWiki ``action=query&prop=imageinfo`` API
(formatversion 2, title normalisation, the 50-title limit, continuation) and
serves original files and thumbnails. Per-path scripts inject failures (429 /
503 / 500 with or without ``Retry-After``, maxlag errors, truncated bodies,
bodies without Content-Length); every request is logged with its time, query
and headers so tests can assert what the client really sent.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------- image payloads


def gradient_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic, non-trivial RGB image (gradients + noise) so JPEGs are realistic in size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    r = (x * 255 // max(width - 1, 1)).astype(np.uint8)
    g = (y * 255 // max(height - 1, 1)).astype(np.uint8)
    b = ((x + y) * 3 % 256).astype(np.uint8)
    arr = np.stack([r, g, b], axis=-1).astype(np.int16) + rng.integers(-12, 12, (height, width, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def jpeg_bytes(width: int = 320, height: int = 240, seed: int = 0, *, exif_orientation: int | None = None) -> bytes:
    im = Image.fromarray(gradient_rgb(width, height, seed))
    buf = io.BytesIO()
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(buf, format="JPEG", quality=92, exif=exif.tobytes())
    else:
        im.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def png_rgba_bytes(width: int = 200, height: int = 300) -> bytes:
    """Red square on a fully transparent background (transparent pixels are black underneath)."""
    arr = np.zeros((height, width, 4), np.uint8)
    s = min(width, height) // 4
    cy, cx = height // 2, width // 2
    arr[cy - s : cy + s, cx - s : cx + s] = (255, 0, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGBA").save(buf, format="PNG")
    return buf.getvalue()


def png_bytes(width: int = 300, height: int = 200, seed: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gradient_rgb(width, height, seed)).save(buf, format="PNG")
    return buf.getvalue()


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("P", (40, 40)).save(buf, format="GIF")
    return buf.getvalue()


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def bomb_png_bytes(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit greyscale PNG of ``width x height`` pixels, all black: tiny on disk, huge decoded."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b"")


HTML_PAGE = b"<!DOCTYPE html><html><head><title>Error</title></head><body>Not an image</body></html>"


# ----------------------------------------------------------------------------- the fake Commons


@dataclass
class Reply:
    """A scripted response. ``truncate_to``: send the full Content-Length but only this many bytes.
    ``content_length=False``: no Content-Length header (the body ends when the connection closes)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    content_length: bool = True
    truncate_to: int | None = None
    drip_s: float = 0.0  # pause between the two halves of the body (a slow server)


@dataclass
class FakeFile:
    name: str  # without "File:"
    data: bytes
    mime: str
    width: int
    height: int
    thumb: bytes | None = None  # None: the thumbnail is the original (small image)
    thumb_mime: str | None = None
    declared_size: int | None = None
    declared_sha1: str | None = None
    content_type: str | None = None  # served Content-Type (default: mime)
    send_content_length: bool = True


@dataclass
class Logged:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    at: float


def normalise_title(title: str) -> str:
    """MediaWiki-like: 'file:a_b.jpg' -> 'File:A b.jpg'."""
    t = title.replace("_", " ").strip()
    head, sep, rest = t.partition(":")
    if sep and head.lower() in ("file", "image"):
        rest = rest.strip()
        return "File:" + rest[:1].upper() + rest[1:]
    return t[:1].upper() + t[1:]


class FakeCommons:
    API_PATH = "/w/api.php"
    TITLE_LIMIT = 50

    def __init__(self) -> None:
        self.files: dict[str, FakeFile] = {}  # by normalised title
        self.scripts: dict[str, deque[Reply]] = {}
        self.log: list[Logged] = []
        self.page_limit: int | None = None  # imageinfo for at most this many pages per response (continuation)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def __enter__(self) -> "FakeCommons":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: a body may end at close

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                fake._handle(self, b"")

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                fake._handle(self, self.rfile.read(n))

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def api_url(self) -> str:
        return self.base_url + self.API_PATH

    # -- content
    def add_file(self, name: str, data: bytes, mime: str, width: int, height: int, **kw) -> str:
        title = normalise_title("File:" + name)
        self.files[title] = FakeFile(title.removeprefix("File:"), data, mime, width, height, **kw)
        return title

    def file_path(self, title: str) -> str:
        return "/files/" + quote(self.files[normalise_title(title)].name)

    def thumb_path(self, title: str, width: int) -> str:
        return f"/thumbs/{width}px-" + quote(self.files[normalise_title(title)].name)

    def script(self, path: str, *replies: Reply) -> None:
        self.scripts.setdefault(path, deque()).extend(replies)

    def requests_to(self, path: str) -> list[Logged]:
        with self._lock:
            return [r for r in self.log if r.path == path]

    # -- serving
    def _handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        parts = urlsplit(h.path)
        path = unquote(parts.path) if not parts.path.startswith(("/files/", "/thumbs/")) else parts.path
        query = parse_qs(parts.query, keep_blank_values=True)
        if body:
            query.update(parse_qs(body.decode("utf-8"), keep_blank_values=True))
        with self._lock:
            self.log.append(Logged(h.command, path, query, dict(h.headers.items()), time.monotonic()))
            scripted = self.scripts.get(path)
            reply = scripted.popleft() if scripted else None
        if reply is None:
            reply = self._default(path, query)
        self._send(h, reply)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, reply: Reply) -> None:
        h.send_response(reply.status)
        for k, v in reply.headers.items():
            h.send_header(k, v)
        if reply.content_length:
            h.send_header("Content-Length", str(len(reply.body)))
        h.end_headers()
        body = reply.body if reply.truncate_to is None else reply.body[: reply.truncate_to]
        try:
            if reply.drip_s:
                h.wfile.write(body[: len(body) // 2])
                h.wfile.flush()
                time.sleep(reply.drip_s)
                body = body[len(body) // 2 :]
            h.wfile.write(body)
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client aborted (byte cap): expected in some tests
        if reply.truncate_to is not None:
            h.close_connection = True

    def _default(self, path: str, query: dict[str, list[str]]) -> Reply:
        if path == self.API_PATH:
            return self._api(query)
        for prefix in ("/files/", "/thumbs/"):
            if path.startswith(prefix):
                name = unquote(path[len(prefix) :])
                if prefix == "/thumbs/":
                    name = name.split("px-", 1)[1]
                f = self.files.get(normalise_title("File:" + name))
                if f is None:
                    return Reply(404, {"Content-Type": "text/html"}, HTML_PAGE)
                if prefix == "/files/":
                    data, ctype = f.data, f.content_type or f.mime
                else:
                    data, ctype = f.thumb if f.thumb is not None else f.data, f.content_type or f.thumb_mime or f.mime
                return Reply(200, {"Content-Type": ctype}, data, content_length=f.send_content_length)
        return Reply(404, {"Content-Type": "text/html"}, HTML_PAGE)

    def _api(self, query: dict[str, list[str]]) -> Reply:
        q = {k: v[-1] for k, v in query.items()}
        if q.get("action") != "query" or q.get("prop") != "imageinfo" or q.get("format") != "json":
            return _json({"error": {"code": "badparams", "info": f"unsupported request {sorted(q)}"}})
        if q.get("formatversion") != "2":
            return _json({"error": {"code": "badparams", "info": "this fake speaks formatversion=2 only"}})
        titles = [t for t in q.get("titles", "").split("|") if t]
        warnings = {}
        if len(titles) > self.TITLE_LIMIT:
            warnings = {"main": {"warnings": f"Too many values supplied for parameter \"titles\". The limit is {self.TITLE_LIMIT}."}}
            titles = titles[: self.TITLE_LIMIT]
        width = int(q.get("iiurlwidth", "0") or 0)
        normalized, pages = [], []
        start = int(q.get("iicontinue", "0") or 0)
        served = 0
        for k, t in enumerate(titles):
            n = normalise_title(t)
            if n != t:
                normalized.append({"fromencoded": False, "from": t, "to": n})
            f = self.files.get(n)
            if f is None:
                pages.append({"ns": 6, "title": n, "missing": True, "known": False, "imagerepository": ""})
                continue
            page = {"pageid": 1000 + k, "ns": 6, "title": n, "imagerepository": "local"}
            if k >= start and (self.page_limit is None or served < self.page_limit):
                page["imageinfo"] = [self._imageinfo(f, width)]
                served += 1
            pages.append(page)
        payload: dict = {"batchcomplete": True, "query": {"pages": pages}}
        if normalized:
            payload["query"]["normalized"] = normalized
        if warnings:
            payload["warnings"] = warnings
        unserved = [
            k for k, t in enumerate(titles) if k >= start and normalise_title(t) in self.files
        ][served:]
        if unserved:
            del payload["batchcomplete"]
            payload["continue"] = {"iicontinue": str(unserved[0]), "continue": "||"}
        return _json(payload)

    def _imageinfo(self, f: FakeFile, width: int) -> dict:
        url = self.base_url + "/files/" + quote(f.name)
        info = {
            "size": f.declared_size if f.declared_size is not None else len(f.data),
            "width": f.width,
            "height": f.height,
            "url": url,
            "descriptionurl": self.base_url + "/wiki/File:" + quote(f.name),
            "sha1": f.declared_sha1 or hashlib.sha1(f.data).hexdigest(),
            "mime": f.mime,
        }
        if width:
            if f.thumb is None or width >= f.width:
                info.update(thumburl=url, thumbwidth=f.width, thumbheight=f.height)
            else:
                info.update(
                    thumburl=f"{self.base_url}/thumbs/{width}px-{quote(f.name)}",
                    thumbwidth=width,
                    thumbheight=round(f.height * width / f.width),
                )
        return info


def _json(payload: dict, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, json.dumps(payload).encode())


def maxlag_reply(retry_after: int = 1, status: int = 200) -> Reply:
    """MediaWiki's maxlag error: HTTP 200 (T33156) with Retry-After and X-Database-Lag."""
    return _json(
        {"error": {"code": "maxlag", "info": "Waiting for db1234: 7 seconds lagged.", "host": "db1234", "lag": 7}},
        status,
        {"Retry-After": str(retry_after), "X-Database-Lag": "7"},
    )
