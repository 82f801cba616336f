"""Validate an image file and turn it into the pipeline's standard thumbnail.

Every image, from a dataset folder or from Commons, goes through
:func:`make_thumbnail`: it accepts JPEG, PNG and WEBP only, refuses
decompression bombs and oversized files, rejects truncated or undecodable
data (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off: a half-decoded image
would silently become a grey-bottomed thumbnail), applies the EXIF
orientation, flattens transparency onto white, resizes the shorter side to
``THUMBNAIL_SIZE`` and centre-crops a square, and encodes it as a JPEG.

Why JPEG/PNG/WEBP only: they are the raster formats Commons serves thumbnails
in and that Pillow decodes completely and safely. GIF is left out because
Commons GIFs are mostly animations and diagrams whose first frame is an
arbitrary still; TIFF (large scans, many compressions) and SVG (vector, not
decodable by Pillow) are left out too. Restricting ``Image.open`` to these
decoders also keeps Pillow's rarer format parsers away from untrusted bytes.

Plain Python (Pillow + numpy); safe to call from threads and worker processes.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

THUMBNAIL_SIZE = 256
JPEG_QUALITY = 90
DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: larger than almost any photo, far below Pillow's bomb limit (89 MP)
DEFAULT_MAX_BYTES = 50 * 1024 * 1024  # 50 MiB per source file

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
ALLOWED_MIME_TYPES: frozenset[str] = frozenset({"image/jpeg", "image/png", "image/webp"})

# Enough to start decoding at 2x the target; the final step is a proper LANCZOS resample.
_RESIZE_REDUCING_GAP = 3.0


class ImageStatus(StrEnum):
    """The status recorded per item in ``item_images``."""

    OK = "ok"
    MISSING = "missing"  # no image for the item (no file, no such file on Commons, no title)
    CORRUPT = "corrupt"  # not a decodable JPEG/PNG/WEBP, truncated, wrong type, integrity check failed
    TOO_LARGE = "too_large"  # file bytes or pixel count above the configured limits
    HTTP_ERROR = "http_error"  # the download failed (HTTP status, connection, retries exhausted)


STATUSES: tuple[str, ...] = tuple(s.value for s in ImageStatus)


@dataclass(frozen=True)
class ImageLimits:
    """Upper bounds applied before and while decoding an image."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        if self.max_pixels <= 0 or self.max_bytes <= 0:
            raise ValueError(f"image limits must be positive, got {self}")


@dataclass(frozen=True)
class ImageResult:
    """Outcome of validating one image: a thumbnail when ``status == 'ok'``, else a reason."""

    status: ImageStatus
    reason: str
    thumbnail: bytes | None = None
    orig_width: int | None = None
    orig_height: int | None = None
    format: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is ImageStatus.OK

    @classmethod
    def failure(
        cls, status: ImageStatus, reason: str, size: tuple[int, int] | None = None, fmt: str | None = None
    ) -> "ImageResult":
        w, h = size if size else (None, None)
        return cls(status, reason, None, w, h, fmt)


def sniff_kind(head: bytes) -> str:
    """A human description of what the first bytes of an unsupported file look like."""
    h = head.lstrip()[:64].lower()
    if head.startswith(b"GIF8"):
        return "a GIF (unsupported format)"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "a TIFF (unsupported format)"
    if head.startswith(b"BM"):
        return "a BMP (unsupported format)"
    if head[4:12] in (b"ftypavif", b"ftypheic", b"ftypmif1"):
        return "an AVIF/HEIC (unsupported format)"
    if h.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "HTML text, not an image"
    if h.startswith(b"<?xml") or b"<svg" in h:
        return "XML/SVG text (unsupported format)"
    if h.startswith((b"{", b"[")):
        return "JSON text, not an image"
    return "not a JPEG, PNG or WEBP image"


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (not black, which is what a bare convert does)."""
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit/float greyscale PNGs: scale to 8 bits instead of clipping everything above 255 to white
        arr = np.asarray(im, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / (65535.0 if hi > 255 else 255.0)
        im = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
        return im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB


def _square_thumbnail(im: Image.Image, size: int) -> Image.Image:
    """Shorter side scaled to ``size`` and the centre ``size x size`` kept.

    Resampling only the centred square box of the source gives the same pixels as
    resize-then-crop without resampling the parts that are cropped away.
    """
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return im.resize(
        (size, size),
        Image.Resampling.LANCZOS,
        box=(left, top, left + side, top + side),
        reducing_gap=_RESIZE_REDUCING_GAP if side >= 2 * size else None,
    )


def make_thumbnail(data: bytes, limits: ImageLimits = ImageLimits(), *, size: int = THUMBNAIL_SIZE) -> ImageResult:
    """Validate ``data`` (a whole image file) and return its JPEG thumbnail or the reason it failed."""
    if len(data) == 0:
        return ImageResult.failure(ImageStatus.CORRUPT, "empty file (0 bytes)")
    if len(data) > limits.max_bytes:
        return ImageResult.failure(
            ImageStatus.TOO_LARGE, f"file is {len(data)} bytes, above the limit of {limits.max_bytes} bytes"
        )
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        return ImageResult.failure(ImageStatus.TOO_LARGE, f"decompression bomb refused by Pillow: {exc}")
    except UnidentifiedImageError:
        return ImageResult.failure(ImageStatus.CORRUPT, f"unreadable: {sniff_kind(data[:512])}")
    except Image.DecompressionBombWarning as exc:  # only raised when a warnings filter turns it into an error
        return ImageResult.failure(ImageStatus.TOO_LARGE, f"decompression bomb refused by Pillow: {exc}")
    except Exception as exc:  # a malformed header in an otherwise identified format
        return ImageResult.failure(ImageStatus.CORRUPT, f"unreadable header: {type(exc).__name__}: {exc}")

    with im:
        fmt = im.format
        orig = im.size
        pixels = orig[0] * orig[1]
        if orig[0] <= 0 or orig[1] <= 0:
            return ImageResult.failure(ImageStatus.CORRUPT, f"invalid dimensions {orig[0]}x{orig[1]}", orig, fmt)
        if pixels > limits.max_pixels:
            return ImageResult.failure(
                ImageStatus.TOO_LARGE,
                f"{orig[0]}x{orig[1]} = {pixels} pixels, above the limit of {limits.max_pixels}",
                orig,
                fmt,
            )
        if fmt == "JPEG":
            # decode at 1/2, 1/4 or 1/8 scale in libjpeg (DCT scaling), never below the target size
            im.draft("RGB", (size, size))
        try:
            im.load()  # a truncated or broken stream raises here (LOAD_TRUNCATED_IMAGES stays False)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return ImageResult.failure(ImageStatus.TOO_LARGE, f"decompression bomb refused by Pillow: {exc}", orig, fmt)
        except MemoryError:
            return ImageResult.failure(ImageStatus.TOO_LARGE, "not enough memory to decode", orig, fmt)
        except Exception as exc:
            return ImageResult.failure(
                ImageStatus.CORRUPT, f"cannot decode {fmt}: {type(exc).__name__}: {exc}", orig, fmt
            )

        note = ""
        decoded = im.size
        try:
            ImageOps.exif_transpose(im, in_place=True)
        except Exception as exc:  # malformed EXIF does not make the pixels unusable
            note = f"EXIF orientation not applied ({type(exc).__name__})"
        if im.size != decoded:  # rotated by 90/270 degrees: record the size as displayed
            orig = (orig[1], orig[0])
        try:
            rgb = _to_rgb(im)
            thumb = _square_thumbnail(rgb, size)
            buf = io.BytesIO()
            thumb.save(buf, format="JPEG", quality=JPEG_QUALITY)
        except Exception as exc:
            return ImageResult.failure(
                ImageStatus.CORRUPT, f"cannot convert {fmt} ({im.mode}): {type(exc).__name__}: {exc}", orig, fmt
            )
    return ImageResult(ImageStatus.OK, note, buf.getvalue(), orig[0], orig[1], fmt)


def make_thumbnail_from_file(path: str | os.PathLike, limits: ImageLimits = ImageLimits()) -> ImageResult:
    """:func:`make_thumbnail` of a file, checking existence and size before reading it."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return ImageResult.failure(ImageStatus.MISSING, f"file not found: {path.name}")
    except OSError as exc:
        return ImageResult.failure(ImageStatus.MISSING, f"cannot stat {path.name}: {exc.strerror or exc}")
    if not path.is_file():
        return ImageResult.failure(ImageStatus.CORRUPT, f"{path.name} is not a regular file")
    if st.st_size > limits.max_bytes:
        return ImageResult.failure(
            ImageStatus.TOO_LARGE, f"{path.name} is {st.st_size} bytes, above the limit of {limits.max_bytes} bytes"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        return ImageResult.failure(ImageStatus.MISSING, f"cannot read {path.name}: {exc.strerror or exc}")
    return make_thumbnail(data, limits)
