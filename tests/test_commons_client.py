"""The Commons client against a real HTTP server on 127.0.0.1 emulating the API and file servers."""

from __future__ import annotations

import hashlib
import re
import time

import pytest

from http_fixtures import HTML_PAGE, FakeCommons, Reply, jpeg_bytes, maxlag_reply, png_bytes, truncated
from visrec_pipeline.images.commons import (
    MAX_TITLES_PER_REQUEST,
    CommonsClient,
    HttpError,
    ImageInfo,
    IntegrityError,
    MissingFile,
    MissingFileError,
    TooLargeError,
    UnsupportedTypeError,
    make_user_agent,
    parse_retry_after,
)
from visrec_pipeline.images.validate import ImageStatus, make_thumbnail

CONTACT = "https://example.org/visrec-operator"
UA_PATTERN = re.compile(r"^visrec-pipeline/\d+\.\d+\.\d+ \((https?://\S+|\S+@\S+)\) requests/\d+\.\d+(\.\d+)?$")


@pytest.fixture
def fake():
    with FakeCommons() as server:
        yield server


def client_for(fake: FakeCommons, **kw) -> CommonsClient:
    options = dict(max_retries=3, backoff_base_s=0.02, backoff_cap_s=0.1, connect_timeout_s=2, read_timeout_s=5)
    options.update(kw)
    return CommonsClient(fake.api_url, make_user_agent(CONTACT), **options)


def _info(client: CommonsClient, title: str) -> ImageInfo:
    info = client.image_info([title])[title]
    assert isinstance(info, ImageInfo), info
    return info


def _gaps(fake: FakeCommons, path: str) -> list[float]:
    times = [r.at for r in fake.requests_to(path)]
    return [b - a for a, b in zip(times, times[1:])]


# ---------------------------------------------------------------- etiquette


def test_user_agent_follows_wikimedia_policy(fake):
    fake.add_file("A.jpg", jpeg_bytes(), "image/jpeg", 320, 240)
    client = client_for(fake)
    assert UA_PATTERN.match(client.user_agent), client.user_agent
    assert UA_PATTERN.match(make_user_agent("ops@example.org"))
    _info(client, "File:A.jpg")
    client.download(_info(client, "File:A.jpg"))
    agents = {r.headers.get("User-Agent") for r in fake.log}
    assert agents == {client.user_agent}
    for bad in ["", "   ", "just a name", "https://x.org (evil)"]:
        with pytest.raises(ValueError):
            make_user_agent(bad)


def test_only_standard_thumbnail_widths(fake):
    for width in (500, 256, 0):
        with pytest.raises(ValueError, match="standard thumbnail widths"):
            client_for(fake, thumb_width=width)
    assert client_for(fake, thumb_width=250).thumb_width == 250


def test_120_titles_are_batched_50_per_request(fake):
    titles = []
    for i in range(120):
        fake.add_file(f"Item {i:03d}.jpg", b"x", "image/jpeg", 800, 600, thumb=b"t")
        # mix of spellings the API normalises: underscores, lowercase namespace, bare name
        titles.append([f"File:Item_{i:03d}.jpg", f"file:Item {i:03d}.jpg", f"Item {i:03d}.jpg"][i % 3])
    client = client_for(fake)
    infos = client.image_info(titles)
    api = fake.requests_to(fake.API_PATH)
    sizes = [len(r.query["titles"][0].split("|")) for r in api]
    assert sizes == [50, 50, 20] and max(sizes) <= MAX_TITLES_PER_REQUEST
    assert set(infos) == set(titles)
    assert all(isinstance(v, ImageInfo) for v in infos.values())
    assert infos["File:Item_006.jpg"].title == "File:Item 006.jpg"
    q = api[0].query
    assert q["maxlag"] == ["5"] and q["formatversion"] == ["2"] and q["format"] == ["json"]
    assert q["iiurlwidth"] == ["330"] and set(q["iiprop"][0].split("|")) >= {"url", "size", "mime", "sha1"}
    assert infos["file:Item 007.jpg"].thumb_url.endswith("/thumbs/330px-Item%20007.jpg")


def test_missing_and_invalid_titles(fake):
    fake.add_file("Here.png", png_bytes(), "image/png", 300, 200)
    infos = client_for(fake).image_info(["File:Here.png", "File:Gone.jpg", "bad|title", "", "File:"])
    assert isinstance(infos["File:Here.png"], ImageInfo)
    assert isinstance(infos["File:Gone.jpg"], MissingFile) and "no such file" in infos["File:Gone.jpg"].reason
    for t in ("bad|title", "", "File:"):
        assert isinstance(infos[t], MissingFile) and "invalid" in infos[t].reason
    assert len(fake.requests_to(fake.API_PATH)) == 1


def test_continuation_is_followed(fake):
    fake.page_limit = 7
    titles = [fake.add_file(f"C{i}.jpg", b"x", "image/jpeg", 10, 10) for i in range(20)]
    infos = client_for(fake).image_info(titles)
    assert all(isinstance(infos[t], ImageInfo) for t in titles)
    api = fake.requests_to(fake.API_PATH)
    assert len(api) == 3 and api[1].query["iicontinue"] == ["7"]


def test_long_queries_are_posted(fake):
    titles = [fake.add_file(f"{'Long name ' * 9}{i}.jpg", b"x", "image/jpeg", 10, 10) for i in range(50)]
    infos = client_for(fake).image_info(titles)
    assert all(isinstance(infos[t], ImageInfo) for t in titles)
    assert [r.method for r in fake.requests_to(fake.API_PATH)] == ["POST"]


# ---------------------------------------------------------------- retries


def test_429_retry_after_is_honoured(fake):
    fake.add_file("A.jpg", jpeg_bytes(), "image/jpeg", 320, 240)
    fake.script(fake.API_PATH, Reply(429, {"Retry-After": "1"}, b"slow down"))
    client = client_for(fake)
    start = time.monotonic()
    _info(client, "File:A.jpg")
    assert time.monotonic() - start >= 1.0
    assert _gaps(fake, fake.API_PATH)[0] >= 1.0
    assert client.retries == 1


def test_503_retry_after_is_honoured_on_downloads(fake):
    data = jpeg_bytes(900, 600)
    title = fake.add_file("Big.jpg", data, "image/jpeg", 900, 600, thumb=jpeg_bytes(330, 220))
    client = client_for(fake)
    info = _info(client, title)
    fake.script(fake.thumb_path(title, 330), Reply(503, {"Retry-After": "1"}, b"busy"))
    assert client.download(info) == jpeg_bytes(330, 220)
    assert _gaps(fake, fake.thumb_path(title, 330))[0] >= 1.0


def test_maxlag_error_waits_and_retries(fake):
    fake.add_file("A.jpg", jpeg_bytes(), "image/jpeg", 320, 240)
    fake.script(fake.API_PATH, maxlag_reply(retry_after=1))
    client = client_for(fake)
    _info(client, "File:A.jpg")
    api = fake.requests_to(fake.API_PATH)
    assert len(api) == 2 and all(r.query["maxlag"] == ["5"] for r in api)
    assert api[1].at - api[0].at >= 1.0


def test_500s_back_off_then_succeed(fake):
    title = fake.add_file("A.jpg", jpeg_bytes(), "image/jpeg", 320, 240)
    client = client_for(fake)
    info = _info(client, title)
    fake.script(fake.file_path(title), Reply(500), Reply(502))
    start = time.monotonic()
    assert client.download(info) == jpeg_bytes()
    assert time.monotonic() - start < 1.0  # jittered backoff with a small base, no Retry-After
    assert client.retries == 2


def test_persistent_500_is_an_http_error_after_max_retries(fake):
    title = fake.add_file("A.jpg", jpeg_bytes(), "image/jpeg", 320, 240)
    client = client_for(fake, max_retries=2)
    info = _info(client, title)
    fake.script(fake.file_path(title), *[Reply(500)] * 5)
    with pytest.raises(HttpError) as err:
        client.download(info)
    assert err.value.status_code == 500 and err.value.status is ImageStatus.HTTP_ERROR
    assert "gave up after 3 attempts" in err.value.reason
    assert len(fake.requests_to(fake.file_path(title))) == 3


def test_retry_after_beyond_the_limit_gives_up_at_once(fake):
    fake.add_file("A.jpg", jpeg_bytes(), "image/jpeg", 320, 240)
    fake.script(fake.API_PATH, Reply(429, {"Retry-After": "3600"}))
    with pytest.raises(HttpError, match="exceeds"):
        client_for(fake, max_retry_after_s=10).image_info(["File:A.jpg"])
    assert len(fake.requests_to(fake.API_PATH)) == 1


def test_404_is_not_retried(fake):
    title = fake.add_file("A.jpg", jpeg_bytes(), "image/jpeg", 320, 240)
    client = client_for(fake)
    info = _info(client, title)
    path = fake.file_path(title)
    fake.files.clear()
    with pytest.raises(MissingFileError, match="HTTP 404"):
        client.download(info)
    assert len(fake.requests_to(path)) == 1


def test_a_dripping_transfer_is_cut_off(fake):
    data = jpeg_bytes(320, 240)
    title = fake.add_file("A.jpg", data, "image/jpeg", 320, 240)
    client = client_for(fake, max_retries=0, transfer_timeout_s=0.2, read_timeout_s=5)
    info = _info(client, title)
    fake.script(fake.file_path(title), Reply(200, {"Content-Type": "image/jpeg"}, data, drip_s=0.5))
    with pytest.raises(HttpError, match="transfer aborted"):
        client.download(info)


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after("-5") == 0.0


# ---------------------------------------------------------------- bodies, sizes, integrity


def test_truncated_transfer_is_retried_then_succeeds(fake):
    data = jpeg_bytes(320, 240)
    title = fake.add_file("A.jpg", data, "image/jpeg", 320, 240)
    client = client_for(fake)
    info = _info(client, title)
    fake.script(fake.file_path(title), Reply(200, {"Content-Type": "image/jpeg"}, data, truncate_to=100))
    assert client.download(info) == data
    assert client.retries == 1


def test_persistently_truncated_transfer_is_an_http_error(fake):
    data = jpeg_bytes(320, 240)
    title = fake.add_file("A.jpg", data, "image/jpeg", 320, 240)
    client = client_for(fake, max_retries=1)
    info = _info(client, title)
    cut = Reply(200, {"Content-Type": "image/jpeg"}, data, truncate_to=100)
    fake.script(fake.file_path(title), cut, cut)
    with pytest.raises(HttpError):
        client.download(info)


def test_truncated_file_downloads_but_does_not_validate(fake):
    data = truncated(jpeg_bytes(640, 480))
    title = fake.add_file("Cut.jpg", data, "image/jpeg", 640, 480, thumb=data)
    client = client_for(fake)
    got = client.download(_info(client, title))
    assert make_thumbnail(got).status is ImageStatus.CORRUPT


def test_declared_size_too_big_is_skipped_before_download(fake):
    title = fake.add_file("Huge.jpg", jpeg_bytes(), "image/jpeg", 9000, 6000, thumb=jpeg_bytes(330, 220),
                          declared_size=500_000_000)
    client = client_for(fake, max_bytes=10_000_000)
    info = _info(client, title)
    with pytest.raises(TooLargeError, match="declared size"):
        client.download(info, verify_original=True)
    assert fake.requests_to(fake.file_path(title)) == []  # never requested
    # the thumbnail is small whatever the original's size: downloading it is fine
    assert client.download(info) == jpeg_bytes(330, 220)


def test_content_length_over_the_cap_aborts(fake):
    big = jpeg_bytes(1200, 900, seed=5)
    title = fake.add_file("Wide.jpg", big, "image/jpeg", 4000, 3000, thumb=big)
    client = client_for(fake, max_bytes=len(big) // 2)
    with pytest.raises(TooLargeError, match="declares") as err:
        client.download(_info(client, title))
    assert err.value.status is ImageStatus.TOO_LARGE


def test_body_over_the_cap_without_length_aborts(fake):
    big = jpeg_bytes(1200, 900, seed=5)
    title = fake.add_file("Wide.jpg", big, "image/jpeg", 4000, 3000, thumb=big, send_content_length=False)
    client = client_for(fake, max_bytes=len(big) // 2)
    with pytest.raises(TooLargeError, match="exceeded"):
        client.download(_info(client, title))


def test_body_longer_than_declared_is_aborted(fake):
    data = jpeg_bytes(640, 480)
    title = fake.add_file("Liar.jpg", data, "image/jpeg", 640, 480, declared_size=len(data) // 3,
                          send_content_length=False)
    client = client_for(fake)
    with pytest.raises(IntegrityError, match="longer than the declared") as err:
        client.download(_info(client, title), verify_original=True)
    assert err.value.status is ImageStatus.CORRUPT


def test_sha1_is_verified_for_originals(fake):
    data = jpeg_bytes(640, 480)
    good = fake.add_file("Good.jpg", data, "image/jpeg", 640, 480)
    bad = fake.add_file("Bad.jpg", data, "image/jpeg", 640, 480, declared_sha1="0" * 40)
    client = client_for(fake)
    assert client.download(_info(client, good), verify_original=True) == data
    assert _info(client, good).sha1 == hashlib.sha1(data).hexdigest()
    with pytest.raises(IntegrityError, match="SHA-1"):
        client.download(_info(client, bad), verify_original=True)


def test_small_original_served_as_thumbnail_is_verified_too(fake):
    data = jpeg_bytes(200, 150)  # narrower than 330: Commons returns the original as the thumbnail
    title = fake.add_file("Small.jpg", data, "image/jpeg", 200, 150, declared_sha1="f" * 40)
    client = client_for(fake)
    info = _info(client, title)
    assert info.thumb_is_original
    with pytest.raises(IntegrityError):
        client.download(info)


def test_html_served_as_jpeg_is_caught_by_validation(fake):
    title = fake.add_file("Page.jpg", HTML_PAGE, "image/jpeg", 640, 480)
    client = client_for(fake)
    result = make_thumbnail(client.download(_info(client, title)))
    assert result.status is ImageStatus.CORRUPT and "HTML" in result.reason


def test_non_image_content_type_is_refused(fake):
    title = fake.add_file("Page.jpg", HTML_PAGE, "image/jpeg", 640, 480, content_type="text/html; charset=utf-8")
    client = client_for(fake)
    with pytest.raises(UnsupportedTypeError, match="text/html"):
        client.download(_info(client, title))


def test_disallowed_mime_is_skipped_before_download(fake):
    title = fake.add_file("Scan.tif", b"II*\x00", "image/tiff", 5000, 4000)
    client = client_for(fake)
    with pytest.raises(UnsupportedTypeError, match="image/tiff"):
        client.download(_info(client, title))
    assert fake.requests_to(fake.file_path(title)) == []
