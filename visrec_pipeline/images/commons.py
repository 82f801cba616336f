"""A small, polite client for the Wikimedia Commons API and file servers.

It follows Wikimedia's API etiquette and User-Agent policy:

- a User-Agent naming the tool, its version and a way to contact the operator
  (``tool/version (contact) requests/x.y``), see :func:`make_user_agent`;
- ``maxlag=5`` on every API request; a ``maxlag`` error (HTTP 200 or 503 with
  ``Retry-After``) makes the client wait and retry;
- requests in series on one keep-alive session, titles batched 50 per query;
- ``Retry-After`` honoured on 429/503 (and wherever else a retryable response
  sends it); otherwise exponential backoff with full jitter on 5xx, connection
  errors, timeouts and truncated bodies; a bounded number of retries;
- thumbnails requested at a standard width only (see ``STANDARD_THUMB_WIDTHS``).

Downloads check the declared type and size before fetching, stream with a
byte cap and, where the bytes fetched are the original file, verify its size
and SHA-1 against ``imageinfo``. Every failure is a typed :class:`CommonsError`
whose ``status`` is the ``item_images`` status it maps to.

Plain Python over ``requests``; no Dagster.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterable, Iterator, TypeVar
from urllib.parse import urlencode

import requests

from visrec_pipeline.images.validate import ALLOWED_MIME_TYPES, DEFAULT_MAX_BYTES, ImageStatus

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://commons.wikimedia.org/w/api.php"
TOOL_NAME = "visrec-pipeline"
TOOL_VERSION = "0.1.0"

# Wikimedia now serves thumbnails only at a fixed set of widths ("thumbnail steps":
# 20, 40, 60, 120, 250, 330, 500, 960, ...); requests for other widths are refused
# at the edge (HTTP 429) or answered with the next standard size. 250 and 330 are
# the standard widths that fit a 256 px thumbnail: 330 gives a shorter side >= 256
# for every portrait and square image, 250 the smallest transfer.
STANDARD_THUMB_WIDTHS: tuple[int, ...] = (250, 330)

MAX_TITLES_PER_REQUEST = 50  # the API's limit for non-bot clients
MAXLAG_S = 5  # the value Wikimedia recommends for non-interactive clients
_MAX_GET_URL = 4000  # longer queries go as a POST form (same API semantics, no URL-length limit)
_MAX_API_RESPONSE_BYTES = 16 * 1024 * 1024
_CHUNK = 64 * 1024

T = TypeVar("T")


class CommonsError(Exception):
    """Base of every client error; ``status`` is the ``item_images`` status it maps to."""

    status: ImageStatus = ImageStatus.HTTP_ERROR

    def __init__(self, reason: str, url: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.url = url


class HttpError(CommonsError):
    """A request failed: an HTTP error status, a connection failure or retries exhausted."""

    def __init__(self, reason: str, url: str | None = None, status_code: int | None = None):
        super().__init__(reason, url)
        self.status_code = status_code


class ApiError(CommonsError):
    """The API answered with an error object (other than a retryable maxlag/ratelimited)."""

    def __init__(self, code: str, info: str, url: str | None = None):
        super().__init__(f"API error {code}: {info}", url)
        self.code = code


class MissingFileError(CommonsError):
    status = ImageStatus.MISSING


class TooLargeError(CommonsError):
    status = ImageStatus.TOO_LARGE


class UnsupportedTypeError(CommonsError):
    status = ImageStatus.CORRUPT


class IntegrityError(CommonsError):
    """The bytes do not match the declared size or SHA-1."""

    status = ImageStatus.CORRUPT


@dataclass(frozen=True)
class ImageInfo:
    """``imageinfo`` of one file. ``size``, ``mime`` and ``sha1`` describe the ORIGINAL file."""

    title: str
    url: str
    size: int
    width: int
    height: int
    mime: str
    sha1: str
    thumb_url: str | None = None
    thumb_width: int | None = None
    thumb_height: int | None = None

    @property
    def thumb_is_original(self) -> bool:
        """Commons hands back the original as the 'thumbnail' when it is no wider than requested."""
        return self.thumb_url is None or self.thumb_url == self.url


@dataclass(frozen=True)
class MissingFile:
    """A requested title with no file behind it, and why."""

    title: str
    reason: str


def make_user_agent(contact: str, tool: str = TOOL_NAME, version: str = TOOL_VERSION) -> str:
    """``tool/version (contact) requests/x.y`` as Wikimedia's User-Agent policy asks.

    ``contact`` must be a URL or an e-mail address where the operator can be reached.
    """
    contact = (contact or "").strip()
    if not contact or not ("@" in contact or contact.startswith(("http://", "https://"))):
        raise ValueError(
            "Wikimedia's User-Agent policy requires contact information: give a URL or an e-mail address "
            f"(e.g. VISREC_COMMONS_CONTACT), got {contact!r}"
        )
    if any(c in contact for c in "()\r\n"):
        raise ValueError(f"contact must not contain parentheses or line breaks: {contact!r}")
    return f"{tool}/{version} ({contact}) requests/{requests.__version__}"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date); None if absent/invalid."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - (now if now is not None else datetime.now(timezone.utc).timestamp())
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def _batches(items: list[str], n: int) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class _Retry(Exception):
    """Internal: a retryable failure; ``wait`` is the server's Retry-After when it gave one."""

    def __init__(self, error: CommonsError, wait: float | None = None):
        super().__init__(error.reason)
        self.error = error
        self.wait = wait


class CommonsClient:
    """Commons ``imageinfo`` lookups and file downloads with retries, caps and integrity checks."""

    def __init__(
        self,
        api_url: str,
        user_agent: str,
        *,
        thumb_width: int = 330,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
        transfer_timeout_s: float = 300.0,
        max_retries: int = 5,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 60.0,
        max_retry_after_s: float = 300.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        allowed_mime_types: Iterable[str] = ALLOWED_MIME_TYPES,
        maxlag_s: int = MAXLAG_S,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ):
        if thumb_width not in STANDARD_THUMB_WIDTHS:
            raise ValueError(
                f"thumb_width must be one of Commons' standard thumbnail widths {STANDARD_THUMB_WIDTHS}, "
                f"got {thumb_width}: Commons no longer renders other widths"
            )
        if max_retries < 0 or max_bytes <= 0 or connect_timeout_s <= 0 or read_timeout_s <= 0:
            raise ValueError("max_retries must be >= 0 and max_bytes and timeouts > 0")
        if not user_agent or not user_agent.strip():
            raise ValueError("a User-Agent is required (see make_user_agent)")
        self.api_url = api_url
        self.user_agent = user_agent
        self.thumb_width = thumb_width
        self.timeout = (connect_timeout_s, read_timeout_s)
        # the read timeout bounds each socket read; this bounds a whole body (a server dripping bytes)
        self.transfer_timeout_s = transfer_timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.max_retry_after_s = max_retry_after_s
        self.max_bytes = max_bytes
        self.allowed_mime_types = frozenset(allowed_mime_types)
        self.maxlag_s = maxlag_s
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = self.user_agent
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.retries = 0  # total retries made, for metadata and tests

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "CommonsClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ transport

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
        return self._rng.uniform(0.0, min(self.backoff_cap_s, self.backoff_base_s * (2**attempt)))

    def _check_response(self, resp: requests.Response, url: str) -> None:
        code = resp.status_code
        if code < 400:
            return
        error = HttpError(f"HTTP {code} {resp.reason or ''}".strip() + f" from {url}", url, code)
        if code == 429 or code >= 500:
            wait = parse_retry_after(resp.headers.get("Retry-After"))
            raise _Retry(error, wait)
        raise error  # 4xx other than 429: retrying will not help

    def _call(self, method: str, url: str, read: Callable[[requests.Response], T], **kwargs) -> T:
        """Send a request and ``read`` its response, retrying transient failures."""
        attempt = 0
        while True:
            try:
                with self.session.request(method, url, timeout=self.timeout, stream=True, **kwargs) as resp:
                    self._check_response(resp, url)
                    return read(resp)
            except _Retry as r:
                error, wait = r.error, r.wait
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError,
            ) as exc:
                # also a body cut short mid-transfer (urllib3 IncompleteRead / ProtocolError)
                error, wait = HttpError(f"{type(exc).__name__} for {url}: {exc}", url), None
            if attempt >= self.max_retries:
                error.reason = f"{error.reason} (gave up after {attempt + 1} attempts)"
                error.args = (error.reason,)
                raise error
            if wait is not None and wait > self.max_retry_after_s:
                error.reason = f"{error.reason} (Retry-After {wait:.0f}s exceeds the {self.max_retry_after_s:.0f}s limit)"
                error.args = (error.reason,)
                raise error
            delay = wait if wait is not None else self._backoff(attempt)
            log.info("retrying %s in %.2fs after: %s", url, delay, error.reason)
            self._sleep(delay)
            attempt += 1
            self.retries += 1

    def _read_capped(self, resp: requests.Response, cap: int, url: str, what: str = "response") -> bytes:
        declared = resp.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise TooLargeError(f"{what} declares {declared} bytes, above the limit of {cap} bytes", url)
        deadline = time.monotonic() + self.transfer_timeout_s
        buf = bytearray()
        for chunk in resp.iter_content(_CHUNK):
            buf += chunk
            if len(buf) > cap:
                raise TooLargeError(f"{what} exceeded {cap} bytes; download aborted", url)
            if time.monotonic() > deadline:
                raise _Retry(HttpError(f"{what} took over {self.transfer_timeout_s:.0f}s; transfer aborted", url))
        return bytes(buf)

    # ------------------------------------------------------------------ API

    def _api(self, params: dict[str, str]) -> dict:
        params = {**params, "format": "json", "formatversion": "2", "maxlag": str(self.maxlag_s)}
        url = self.api_url

        def read(resp: requests.Response) -> dict:
            body = self._read_capped(resp, _MAX_API_RESPONSE_BYTES, url, "API response")
            try:
                payload = json.loads(body)
            except ValueError:
                # a proxy error page instead of JSON is transient as far as we can tell
                raise _Retry(HttpError(f"API answered non-JSON ({resp.headers.get('Content-Type')})", url))
            if not isinstance(payload, dict):
                raise ApiError("badresponse", f"expected a JSON object, got {type(payload).__name__}", url)
            error = payload.get("error")
            if error:
                code, info = str(error.get("code", "")), str(error.get("info", ""))
                if code == "maxlag":
                    wait = parse_retry_after(resp.headers.get("Retry-After"))
                    raise _Retry(HttpError(f"API maxlag: {info}", url), wait if wait is not None else float(MAXLAG_S))
                if code == "ratelimited":
                    raise _Retry(HttpError(f"API ratelimited: {info}", url), parse_retry_after(resp.headers.get("Retry-After")))
                raise ApiError(code, info, url)
            for module, warning in (payload.get("warnings") or {}).items():
                log.warning("Commons API warning (%s): %s", module, warning)
            return payload

        if len(url) + 1 + len(urlencode(params)) > _MAX_GET_URL:
            return self._call("POST", url, read, data=params)
        return self._call("GET", url, read, params=params)

    def query(self, params: dict[str, str]) -> dict:
        """One Action API request (``format=json``, ``formatversion=2``, ``maxlag`` added) with the
        client's retries, size cap and error handling; for lists other modules page through."""
        return self._api(params)

    def image_info(self, titles: Iterable[str]) -> dict[str, ImageInfo | MissingFile]:
        """``imageinfo`` for every title, keyed by the title as given.

        Titles without a namespace get ``File:``; at most 50 go in one request;
        continuations are followed; normalised and redirected titles map back to
        the title asked for. A title with no file behind it maps to ``MissingFile``.
        """
        requested: dict[str, str] = {}  # asked -> query title
        out: dict[str, ImageInfo | MissingFile] = {}
        for title in titles:
            if title in requested or title in out:
                continue
            query_title = _file_title(title)
            if query_title is None:
                out[title] = MissingFile(title, f"invalid file title {title!r}")
            else:
                requested[title] = query_title
        unique = list(dict.fromkeys(requested.values()))
        found: dict[str, ImageInfo | MissingFile] = {}
        for batch in _batches(unique, MAX_TITLES_PER_REQUEST):
            found.update(self._image_info_batch(batch))
        for asked, query_title in requested.items():
            out[asked] = found.get(query_title) or MissingFile(asked, "not returned by the API")
        return out

    def _image_info_batch(self, titles: list[str]) -> dict[str, ImageInfo | MissingFile]:
        params = {
            "action": "query",
            "prop": "imageinfo",
            "iiprop": "url|size|mime|sha1",
            "iiurlwidth": str(self.thumb_width),
            "redirects": "1",
            "titles": "|".join(titles),
        }
        pages: dict[str, dict] = {}
        alias: dict[str, str] = {}
        cont: dict[str, str] = {}
        while True:
            payload = self._api({**params, **cont})
            query = payload.get("query") or {}
            for key in ("normalized", "redirects"):
                for entry in query.get(key) or []:
                    alias[str(entry["from"])] = str(entry["to"])
            for page in query.get("pages") or []:
                title = str(page.get("title", ""))
                merged = pages.setdefault(title, {})
                infos = merged.get("imageinfo", []) + list(page.get("imageinfo") or [])
                merged.update(page)
                if infos:
                    merged["imageinfo"] = infos
            if "continue" not in payload:
                break
            cont = {str(k): str(v) for k, v in payload["continue"].items()}

        result: dict[str, ImageInfo | MissingFile] = {}
        for title in titles:
            final, seen = title, set()
            while final in alias and final not in seen:  # normalised, then redirected
                seen.add(final)
                final = alias[final]
            page = pages.get(final)
            result[title] = _page_to_info(title, page)
        return result

    # ------------------------------------------------------------------ files

    def check_downloadable(self, info: ImageInfo, *, verify_original: bool = False) -> None:
        """Refuse, before any request, a file of the wrong type or (when the original is fetched) too big."""
        if info.mime not in self.allowed_mime_types:
            raise UnsupportedTypeError(
                f"{info.title}: type {info.mime or 'unknown'} is not one of {sorted(self.allowed_mime_types)}", info.url
            )
        if (verify_original or info.thumb_is_original) and info.size > self.max_bytes:
            raise TooLargeError(
                f"{info.title}: declared size {info.size} bytes is above the limit of {self.max_bytes} bytes", info.url
            )

    def download(self, info: ImageInfo, *, verify_original: bool = False) -> bytes:
        """The thumbnail (default) or the original file (``verify_original=True``) of ``info``.

        ``imageinfo``'s size and SHA-1 describe the original file only, so:
        - original downloads (also a 'thumbnail' URL that is the original) are
          capped at the declared size and checked against size and SHA-1;
        - thumbnail downloads are capped at ``max_bytes`` and their
          Content-Type checked; their pixels are verified by decoding them
          (``validate.make_thumbnail``), the only check that applies to them.
        """
        self.check_downloadable(info, verify_original=verify_original)
        original = verify_original or info.thumb_is_original
        url = info.url if original else info.thumb_url
        assert url is not None
        cap = min(info.size, self.max_bytes) if original else self.max_bytes

        def read(resp: requests.Response) -> bytes:
            ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype and not ctype.startswith("image/"):
                raise UnsupportedTypeError(f"{info.title}: server sent {ctype}, not an image", url)
            try:
                return self._read_capped(resp, cap, url, "original file" if original else "thumbnail")
            except TooLargeError as exc:
                if original and cap == info.size:
                    raise IntegrityError(f"{info.title}: body longer than the declared {info.size} bytes", url) from exc
                raise

        try:
            data = self._call("GET", url, read)
        except HttpError as exc:
            if exc.status_code in (404, 410):  # deleted since imageinfo was fetched
                raise MissingFileError(f"{info.title}: file gone (HTTP {exc.status_code})", url) from exc
            raise
        if original:
            if len(data) != info.size:
                raise IntegrityError(f"{info.title}: got {len(data)} bytes, declared {info.size}", url)
            digest = hashlib.sha1(data, usedforsecurity=False).hexdigest()
            if info.sha1 and digest != info.sha1.lower():
                raise IntegrityError(
                    f"{info.title}: SHA-1 {digest} does not match the declared {info.sha1} "
                    "(corrupted in transit, or re-uploaded since imageinfo)",
                    url,
                )
        return data


def _file_title(title: str) -> str | None:
    """``File:<name>`` for a Commons file title or bare file name; None for an unusable title."""
    t = (title or "").strip()
    if not t or any(c in t for c in "|#<>[]{}\x00\n\r\x1f"):
        return None
    head, sep, rest = t.partition(":")
    if sep and head.strip().lower() in ("file", "image"):
        t = rest.strip()
    if not t:
        return None
    return f"File:{t}"


def _page_to_info(title: str, page: dict | None) -> ImageInfo | MissingFile:
    if page is None:
        return MissingFile(title, "not returned by the API")
    if page.get("invalid"):
        return MissingFile(title, f"invalid title: {page.get('invalidreason', '')}".rstrip(": "))
    infos = page.get("imageinfo") or []
    if not infos:
        if page.get("missing"):
            return MissingFile(title, "no such file on Commons (deleted or never uploaded)")
        if page.get("filemissing"):
            return MissingFile(title, "the file page exists but has no file")
        return MissingFile(title, "no imageinfo returned")
    ii = infos[0]
    try:
        return ImageInfo(
            title=str(page.get("title", title)),
            url=str(ii["url"]),
            size=int(ii["size"]),
            width=int(ii.get("width") or 0),
            height=int(ii.get("height") or 0),
            mime=str(ii.get("mime", "")),
            sha1=str(ii.get("sha1", "")),
            thumb_url=str(ii["thumburl"]) if ii.get("thumburl") else None,
            thumb_width=int(ii["thumbwidth"]) if ii.get("thumbwidth") else None,
            thumb_height=int(ii["thumbheight"]) if ii.get("thumbheight") else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        return MissingFile(title, f"malformed imageinfo ({type(exc).__name__}: {exc})")
