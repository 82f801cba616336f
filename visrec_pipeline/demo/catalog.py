"""The demo catalogue: Wikimedia-like item ids, upload months, creators, titles and hidden looks.

Every item gets latent visual attributes (palette family, texture, dominant
shape, brightness level) that ``render.py`` draws into its image and that the
simulated users in ``behaviour.py`` choose by. Creators have a house style, so
a creator is partly a proxy for a look, as on Commons.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

# Attribute vocabularies. Order matters: attribute codes index these tuples.
PALETTES = ("red", "orange", "yellow", "green", "teal", "blue", "purple", "pink")
PALETTE_HUES = (0.0, 0.075, 0.15, 0.33, 0.48, 0.61, 0.76, 0.9)
TEXTURES = ("stripes", "dots", "checker", "noise", "gradient", "rings")
SHAPES = ("disc", "square", "triangle", "ring", "cross")
BRIGHTNESS = ("dark", "mid", "light")

# Image size families (width:height); panoramas go up to 3:1.
ASPECTS = (
    ("square", 1.0),
    ("landscape", 4 / 3),
    ("landscape", 3 / 2),
    ("portrait", 3 / 4),
    ("portrait", 2 / 3),
    ("panorama", 2.2),
    ("panorama", 3.0),
)
ASPECT_WEIGHTS = (0.22, 0.25, 0.15, 0.14, 0.1, 0.08, 0.06)
MIN_SIDE, MAX_SIDE = 160, 640
MAX_ASPECT = 3.0

FIRST_UPLOAD_YEAR, LAST_UPLOAD_YEAR = 2016, 2021

_SUBJECTS = (
    "Bridge", "Cathedral", "Harbour", "Market", "Mountain", "Lighthouse", "Garden", "Station",
    "Mosaic", "Fresco", "Window", "Tram", "Festival", "Lake", "Forest", "Castle", "Mural",
    "Fountain", "Street", "Museum", "Tower", "Valley", "Beach", "Library", "Palace", "Canal",
    "Quilt", "Textile", "Ceramic", "Poster",
)
_PLACES = (
    "Lisbon", "Krakow", "Valparaiso", "Kyoto", "Tallinn", "Porto", "Ghent", "Cusco", "Oaxaca",
    "Bergen", "Tbilisi", "Hanoi", "Seville", "Zanzibar", "Quebec", "Riga", "Matera", "Cordoba",
    "Lyon", "Hobart",
)
_NAME_A = (
    "Ana", "Bram", "Chen", "Dario", "Eszter", "Femi", "Greta", "Hugo", "Ines", "Jonas", "Kaito",
    "Lena", "Mateo", "Nadia", "Olek", "Priya", "Quinn", "Rosa", "Sami", "Tove", "Uri", "Vera",
    "Wim", "Yara", "Zoltan",
)
_NAME_B = ("Photo", "Commons", "Lens", "Wiki", "Archive", "Travels", "Pics", "Shots", "Bot", "Maps")


def month_start(year: int, month: int) -> int:
    """Unix seconds (UTC) at the start of a month; month may overflow into the next year."""
    year, month = year + (month - 1) // 12, (month - 1) % 12 + 1
    return int(datetime(year, month, 1, tzinfo=timezone.utc).timestamp())


@dataclass(frozen=True)
class Catalog:
    """Parallel arrays, one entry per item, ordered by ascending ``item_id``."""

    item_id: np.ndarray  # int64 YYYYMMNNN
    upload_end: np.ndarray  # int64 unix seconds: first second after the upload month
    creator: np.ndarray  # int64 hidden creator index (also for items shown without one)
    creator_shown: np.ndarray  # bool: False for the ~10% shown with an empty creator
    palette: np.ndarray  # int64 index into PALETTES
    texture: np.ndarray  # int64 index into TEXTURES
    shape: np.ndarray  # int64 index into SHAPES
    brightness: np.ndarray  # int64 index into BRIGHTNESS
    width: np.ndarray  # int64 pixels
    height: np.ndarray  # int64 pixels
    is_png: np.ndarray  # bool
    render_seed: np.ndarray  # uint64, one independent stream per image
    log_popularity: np.ndarray  # float64 intrinsic appeal, standard normal

    def __len__(self) -> int:
        return int(self.item_id.shape[0])

    def attribute_onehots(self) -> np.ndarray:
        """[n_items, 22] one-hot of (palette, texture, shape, brightness)."""
        blocks = []
        for codes, vocab in (
            (self.palette, PALETTES),
            (self.texture, TEXTURES),
            (self.shape, SHAPES),
            (self.brightness, BRIGHTNESS),
        ):
            block = np.zeros((len(self), len(vocab)))
            block[np.arange(len(self)), codes] = 1.0
            blocks.append(block)
        return np.concatenate(blocks, axis=1)

    def concat(self, other: "Catalog") -> "Catalog":
        return Catalog(**{f: np.concatenate([getattr(self, f), getattr(other, f)]) for f in self.__dataclass_fields__})


@dataclass(frozen=True)
class Creators:
    names: tuple[str, ...]
    palette: np.ndarray  # house style: preferred palette
    texture: np.ndarray  # house style: preferred texture
    weight: np.ndarray  # share of uploads (Zipf-like)


def make_creators(rng: np.random.Generator, n_creators: int) -> Creators:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n_creators:
        style = rng.integers(4)
        a, b = _NAME_A[rng.integers(len(_NAME_A))], _NAME_B[rng.integers(len(_NAME_B))]
        n = int(rng.integers(2, 999))
        name = (f"{a}_{b}", f"{a}{n}", f"{b}{a}{n}", f"{a}_{n}")[style]
        if name not in seen:
            seen.add(name)
            names.append(name)
    weight = 1.0 / np.arange(1, n_creators + 1) ** 0.8
    return Creators(
        names=tuple(names),
        palette=rng.integers(len(PALETTES), size=n_creators),
        texture=rng.integers(len(TEXTURES), size=n_creators),
        weight=weight / weight.sum(),
    )


def _month_ids(rng: np.random.Generator, months: list[tuple[int, int]], n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids ``YYYYMMNNN`` spread over ``months``, more uploads in later months."""
    w = 1.0 + np.arange(len(months)) / 36.0
    counts = rng.multinomial(n_items, w / w.sum())
    if counts.max() > 999:
        raise ValueError(f"{n_items} items do not fit in {len(months)} months of at most 999 uploads")
    ids, ends = [], []
    for (year, month), c in zip(months, counts):
        seq = np.sort(rng.choice(np.arange(1, 1000), size=int(c), replace=False))
        ids.append((year * 100 + month) * 1000 + seq)
        ends.append(np.full(int(c), month_start(year, month + 1), np.int64))
    return np.concatenate(ids).astype(np.int64), np.concatenate(ends)


def _image_sizes(rng: np.random.Generator, n: int, is_png: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    aspect_idx = rng.choice(len(ASPECTS), size=n, p=np.asarray(ASPECT_WEIGHTS))
    ratio = np.array([ASPECTS[k][1] for k in aspect_idx])  # width / height
    long_side = rng.integers(240, MAX_SIDE + 1, size=n)
    # PNG stays small (lossless noise textures are heavy); panoramas keep a wide long side.
    long_side = np.where(is_png, rng.integers(200, 361, size=n), long_side)
    long_side = np.where(ratio >= 2.0, np.maximum(long_side, np.ceil(MIN_SIDE * ratio)), long_side)
    short_side = np.round(long_side / np.maximum(ratio, 1 / ratio))
    short_side = np.clip(np.maximum(short_side, np.ceil(long_side / MAX_ASPECT)), MIN_SIDE, MAX_SIDE)
    width = np.where(ratio >= 1.0, long_side, short_side).astype(np.int64)
    height = np.where(ratio >= 1.0, short_side, long_side).astype(np.int64)
    return width, height


def make_items(
    rng: np.random.Generator,
    creators: Creators,
    n_items: int,
    months: list[tuple[int, int]],
    *,
    empty_creator_share: float = 0.1,
    png_share: float = 0.05,
) -> Catalog:
    item_id, upload_end = _month_ids(rng, months, n_items)
    n_creators = len(creators.names)
    creator = rng.choice(n_creators, size=n_items, p=creators.weight)
    # House style: most of a creator's uploads share its palette and texture.
    own_palette = rng.random(n_items) < 0.55
    own_texture = rng.random(n_items) < 0.45
    palette = np.where(own_palette, creators.palette[creator], rng.integers(len(PALETTES), size=n_items))
    texture = np.where(own_texture, creators.texture[creator], rng.integers(len(TEXTURES), size=n_items))
    is_png = rng.random(n_items) < png_share
    width, height = _image_sizes(rng, n_items, is_png)
    return Catalog(
        item_id=item_id,
        upload_end=upload_end,
        creator=creator.astype(np.int64),
        creator_shown=rng.random(n_items) >= empty_creator_share,
        palette=palette.astype(np.int64),
        texture=texture.astype(np.int64),
        shape=rng.integers(len(SHAPES), size=n_items),
        brightness=rng.choice(len(BRIGHTNESS), size=n_items, p=[0.3, 0.4, 0.3]),
        width=width,
        height=height,
        is_png=is_png,
        render_seed=rng.integers(0, 2**63, size=n_items, dtype=np.int64).astype(np.uint64),
        log_popularity=rng.standard_normal(n_items),
    )


def upload_months(first_year: int = FIRST_UPLOAD_YEAR, last_year: int = LAST_UPLOAD_YEAR) -> list[tuple[int, int]]:
    return [(y, m) for y in range(first_year, last_year + 1) for m in range(1, 13)]


def file_title(rng: np.random.Generator, item_id: int, is_png: bool) -> str:
    subject = _SUBJECTS[rng.integers(len(_SUBJECTS))]
    place = _PLACES[rng.integers(len(_PLACES))]
    ext = "png" if is_png else "jpg"
    return f"File:{subject}_of_{place}_{item_id}.{ext}"  # the id keeps titles unique


def commons_url(title: str) -> str:
    """The upload.wikimedia.org layout: /<md5[0]>/<md5[:2]>/<file name>."""
    name = title.removeprefix("File:")
    digest = hashlib.md5(name.encode("utf-8"), usedforsecurity=False).hexdigest()
    return f"https://upload.wikimedia.org/wikipedia/commons/{digest[0]}/{digest[:2]}/{name}"
