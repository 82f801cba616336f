"""Image validation/thumbnailing, the content-addressed store, dataset image lookup and image grids."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from http_fixtures import (
    HTML_PAGE,
    bomb_png_bytes,
    gif_bytes,
    jpeg_bytes,
    png_bytes,
    png_rgba_bytes,
    truncated,
)
from visrec_pipeline.images.store import DatasetImages, ImageStore, find_dataset_image, validated_item_id
from visrec_pipeline.images.validate import (
    THUMBNAIL_SIZE,
    ImageLimits,
    ImageStatus,
    make_thumbnail,
    make_thumbnail_from_file,
)
from visrec_pipeline.reporting.grids import image_grid_png, png_markdown


def _decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


# ---------------------------------------------------------------- validate


@pytest.mark.parametrize(
    "data, size",
    [(jpeg_bytes(640, 480), (640, 480)), (png_bytes(300, 200), (300, 200)), (jpeg_bytes(120, 90), (120, 90))],
    ids=["jpeg-landscape", "png", "small-upscaled"],
)
def test_ok_images_become_256_square_rgb_jpegs(data, size):
    r = make_thumbnail(data)
    assert r.status is ImageStatus.OK and r.ok
    assert (r.orig_width, r.orig_height) == size
    im = _decode(r.thumbnail)
    assert im.format == "JPEG" and im.mode == "RGB" and im.size == (THUMBNAIL_SIZE, THUMBNAIL_SIZE)


def test_webp_is_accepted():
    buf = io.BytesIO()
    Image.new("RGB", (300, 260), (10, 120, 200)).save(buf, format="WEBP")
    r = make_thumbnail(buf.getvalue())
    assert r.ok and r.format == "WEBP"


def test_centre_crop_keeps_the_middle_of_a_panorama():
    # left third red, middle third green, right third blue: the square crop must be all green
    arr = np.zeros((200, 600, 3), np.uint8)
    arr[:, :200] = (255, 0, 0)
    arr[:, 200:400] = (0, 255, 0)
    arr[:, 400:] = (0, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    thumb = np.asarray(_decode(make_thumbnail(buf.getvalue()).thumbnail)).astype(int)
    assert thumb[:, 8:-8, 1].min() > 200 and thumb[:, 8:-8, 0].max() < 60 and thumb[:, 8:-8, 2].max() < 60


def test_alpha_is_composited_on_white():
    r = make_thumbnail(png_rgba_bytes(200, 300))
    im = _decode(r.thumbnail)
    corner, centre = np.asarray(im)[2, 2], np.asarray(im)[128, 128]
    assert corner.min() >= 245, corner  # transparent background -> white, not black
    assert centre[0] > 230 and centre[1] < 30 and centre[2] < 30  # the opaque red square


def test_palette_png_with_transparency_is_composited_on_white():
    im = Image.new("P", (300, 300), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.info["transparency"] = 0
    buf = io.BytesIO()
    im.save(buf, format="PNG", transparency=0)
    thumb = np.asarray(_decode(make_thumbnail(buf.getvalue()).thumbnail))
    assert thumb.min() >= 245


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    arr = (np.linspace(0, 65535, 300 * 300).reshape(300, 300)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    thumb = np.asarray(_decode(make_thumbnail(buf.getvalue()).thumbnail))[..., 0].astype(int)
    assert thumb[5, 128] < 40 and thumb[-5, 128] > 215 and 90 < thumb[128, 128] < 165


def test_exif_orientation_is_applied_and_size_recorded_as_displayed():
    # stored 300x200 landscape with orientation 6 (rotate 90 cw): displayed as 200x300 portrait
    data = jpeg_bytes(300, 200, exif_orientation=6)
    r = make_thumbnail(data)
    assert r.ok and (r.orig_width, r.orig_height) == (200, 300)
    plain = make_thumbnail(jpeg_bytes(300, 200))
    assert plain.thumbnail != r.thumbnail


def test_truncated_jpeg_is_corrupt():
    r = make_thumbnail(truncated(jpeg_bytes(640, 480), 0.5))
    assert r.status is ImageStatus.CORRUPT and "truncated" in r.reason
    assert (r.orig_width, r.orig_height) == (640, 480)  # known from the header
    assert r.thumbnail is None


def test_truncated_png_is_corrupt():
    r = make_thumbnail(truncated(png_bytes(400, 400), 0.6))
    assert r.status is ImageStatus.CORRUPT


@pytest.mark.parametrize(
    "data, words",
    [(HTML_PAGE, "HTML"), (b"hello, not an image\n", "not a JPEG"), (gif_bytes(), "GIF"), (b"", "empty")],
    ids=["html", "text", "gif", "empty"],
)
def test_non_images_are_corrupt_with_a_reason(data, words):
    r = make_thumbnail(data)
    assert r.status is ImageStatus.CORRUPT and words in r.reason


def test_decompression_bomb_is_too_large():
    bomb = bomb_png_bytes(20000, 20000)
    assert len(bomb) < 200_000  # tiny file, 400 MP declared
    r = make_thumbnail(bomb)
    assert r.status is ImageStatus.TOO_LARGE and "decompression bomb" in r.reason


def test_configured_pixel_limit():
    data = bomb_png_bytes(3000, 3000)  # 9 MP
    assert make_thumbnail(data, ImageLimits(max_pixels=8_000_000)).status is ImageStatus.TOO_LARGE
    assert make_thumbnail(data, ImageLimits(max_pixels=10_000_000)).ok


def test_byte_limit():
    data = jpeg_bytes(640, 480)
    r = make_thumbnail(data, ImageLimits(max_bytes=len(data) - 1))
    assert r.status is ImageStatus.TOO_LARGE and str(len(data)) in r.reason


def test_from_file_checks_size_before_reading(tmp_path):
    p = tmp_path / "1.jpg"
    p.write_bytes(jpeg_bytes())
    assert make_thumbnail_from_file(p).ok
    assert make_thumbnail_from_file(p, ImageLimits(max_bytes=10)).status is ImageStatus.TOO_LARGE
    assert make_thumbnail_from_file(tmp_path / "nope.jpg").status is ImageStatus.MISSING


def test_limits_must_be_positive():
    with pytest.raises(ValueError):
        ImageLimits(max_pixels=0)


def test_thumbnail_is_deterministic():
    data = jpeg_bytes(500, 400, seed=3)
    assert make_thumbnail(data).thumbnail == make_thumbnail(data).thumbnail


# ---------------------------------------------------------------- store


def test_store_put_is_content_addressed_atomic_and_idempotent(tmp_path):
    store = ImageStore(tmp_path / "images")
    thumb = make_thumbnail(jpeg_bytes()).thumbnail
    h, rel = store.put(thumb)
    assert h == hashlib.sha256(thumb).hexdigest()
    assert rel == f"images/{h[:2]}/{h}.jpg"
    assert (tmp_path / rel).read_bytes() == thumb
    mtime = (tmp_path / rel).stat().st_mtime_ns
    assert store.put(thumb) == (h, rel)
    assert (tmp_path / rel).stat().st_mtime_ns == mtime  # not rewritten
    assert [p.name for p in (tmp_path / "images" / h[:2]).iterdir()] == [f"{h}.jpg"]  # no temp files left
    assert store.verify(h)


def test_store_repairs_a_damaged_file(tmp_path):
    store = ImageStore(tmp_path / "images")
    thumb = make_thumbnail(jpeg_bytes()).thumbnail
    h, _ = store.put(thumb)
    store.path_for(h).write_bytes(b"x" * len(thumb))
    assert not store.verify(h)
    store.put(thumb)
    assert store.verify(h)


def test_store_refuses_paths_not_made_of_a_hash(tmp_path):
    store = ImageStore(tmp_path / "images")
    for bad in ["../../etc/passwd", "ab", "A" * 64, "g" * 64, 123]:
        with pytest.raises(ValueError):
            store.path_for(bad)
    with pytest.raises(ValueError):
        store.put(b"")


def test_store_open_and_load_batch(tmp_path):
    store = ImageStore(tmp_path / "images")
    hashes = [store.put(make_thumbnail(jpeg_bytes(300, 300, seed=s)).thumbnail)[0] for s in range(3)]
    im = store.open(hashes[0])
    assert im.size == (256, 256) and im.mode == "RGB"
    batch = store.load_batch(hashes)
    assert batch.shape == (3, 256, 256, 3) and batch.dtype == np.uint8
    assert np.array_equal(batch[1], np.asarray(store.open(hashes[1])))
    missing = "0" * 64
    with pytest.raises(FileNotFoundError, match=missing):
        store.load_batch([hashes[0], missing])
    filled = store.load_batch([hashes[0], missing, None], fill_missing=127)
    assert (filled[1] == 127).all() and (filled[2] == 127).all()


def test_dataset_lookup_formats_validated_integer_ids(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    (d / "7.JPG").write_bytes(b"a")
    (d / "8.png").write_bytes(b"b")
    (d / "9.jpeg").write_bytes(b"c")
    (d / "9.png").write_bytes(b"d")
    (d / "10.gif").write_bytes(b"e")
    (d / "11.jpg").mkdir()  # a folder is not an image file
    images = DatasetImages(d)
    assert images.find(7) == d / "7.JPG"
    assert images.find(np.int64(8)) == d / "8.png"
    assert images.find(9) == d / "9.jpeg"  # .jpeg preferred over .png
    assert images.find(10) is None and images.find(11) is None and images.find(12) is None
    assert find_dataset_image(d, 8) == d / "8.png"
    for bad in ["7", "../7", 7.0, True, None]:
        with pytest.raises(TypeError):
            images.find(bad)
    assert validated_item_id(np.int32(5)) == 5
    assert DatasetImages(tmp_path / "absent").find(1) is None


# ---------------------------------------------------------------- grids


def test_image_grid_png_layout_captions_and_outline():
    imgs = [Image.new("RGB", (256, 256), (0, 0, 255)), np.zeros((100, 50, 3), np.uint8), np.ones((3, 64, 64), np.float32)]
    png = image_grid_png(imgs, captions=["a", "a very long caption that must be shortened", None], cols=2,
                         outline=["green", None, (255, 0, 0)], tile=64)
    im = _decode(png)
    assert im.format == "PNG"
    assert im.width == 2 * (64 + 8) and im.height > 2 * (64 + 8)  # 2 columns, 2 rows with captions
    px = np.asarray(im.convert("RGB"))
    assert tuple(px[2, 2]) == (0, 128, 0)  # green outline of tile 0
    assert imgs[0].size == (256, 256)  # caller's image untouched
    assert png_markdown(png, "x").startswith("![x](data:image/png;base64,")
    assert _decode(image_grid_png([])).size[0] > 0
    with pytest.raises(ValueError):
        image_grid_png(imgs, captions=["only one"])


def test_no_truncated_loading_flag_set():
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
