"""Sample catalog snapshots from real data, with realistic day-to-day churn.

The pipeline's input is a nightly catalog export (the ``catalog_snapshot`` contract). To run it
locally and in tests without a merchant feed, this job builds dated snapshots from two real sources:

* Vendure's demo catalog (54 products, real descriptions, facets, variants and photos);
* Fashion-MNIST's test split (real 28x28 grayscale product photos of 10 clothing classes), so the
  catalog has many items of few classes, which is what retrieval needs to be measured on. The test
  split is used so that models trained on the train split never see catalog images.

Day 1 holds every Vendure product (its first variant) and ``fashion_items`` Fashion-MNIST items. Each
following day deletes ~4% of live products, changes ~10% (title, attributes, price or image) and adds
~5% (Vendure's remaining variants as products of their own, and unused Fashion-MNIST items), so that
ingest's MERGE, soft deletes and changed-only embedding have real work to do. Each day's
``_churn.json`` lists exactly what changed, so tests can check the pipeline against ground truth.

What is synthetic, and says so: Fashion-MNIST listings (title, price, attributes beyond the class)
and every edit (title wording, attribute values, prices, image crops). The images themselves are real.

Output, per day::

    <out_uri>/dt=YYYY-MM-DD/catalog.parquet   the snapshot, conformed to CATALOG_SNAPSHOT
    <out_uri>/dt=YYYY-MM-DD/_churn.json       parameters, row counts, ids added / changed / deleted

Same parameters give byte-identical files; a day whose manifest matches the parameters is reused.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.load_snapshot import READY_MARKER
from jobs.sample_sources import (
    FASHION_CLASSES,
    VendureProduct,
    VendureVariant,
    fashion_mnist_files,
    load_fashion_mnist,
    read_vendure_products,
    vendure_dir,
)
from moonpipe.progress import stage
from moonpipe.settings import local_path
from moonpipe.storage import sha256_file
from schemas.tables import CATALOG_SNAPSHOT

log = logging.getLogger("moonpipe.jobs.sample_catalog")

# Bump when the generated content changes for the same parameters, so old snapshots are rebuilt.
GENERATOR_VERSION = 1
SNAPSHOT_FILE = "catalog.parquet"
MANIFEST_FILE = "_churn.json"  # leading underscore: Spark and Arrow dataset discovery skip it
CURRENCY = "USD"  # Vendure's demo store default
FASHION_SPLIT = "test"

CHANGE_KINDS = ("title", "attributes", "price", "image")


@dataclass(frozen=True)
class ChurnRates:
    """Share of the previous day's live products deleted, changed and added each day.

    ``kind_weights`` is how often each kind of change is drawn (title, attributes, price, image);
    ``second_change`` the chance that a changed product also gets a second, different kind.
    """

    delete: float = 0.04
    change: float = 0.10
    add: float = 0.05
    kind_weights: tuple[float, float, float, float] = (0.25, 0.25, 0.35, 0.15)
    second_change: float = 0.2

    def __post_init__(self) -> None:
        for name in ("delete", "change", "add", "second_change"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"churn rate {name}={value} must be within [0, 1]")
        if self.delete + self.change > 1.0:
            raise ValueError(f"delete + change = {self.delete + self.change} must not exceed 1")


CHURN = ChurnRates()


@dataclass(frozen=True)
class SnapshotInfo:
    """One day's snapshot: where it is, its size, its churn versus the day before, whether it was reused."""

    date: datetime.date
    uri: str
    rows: int
    added: int
    changed: int
    deleted: int
    reused: bool


# -- Fashion-MNIST listing conventions (synthetic, documented) -------------------------------------

# Category group of each class, so that the category path reads like a shop's tree.
FASHION_GROUPS: dict[str, str] = {
    "T-shirt/top": "Tops",
    "Trouser": "Bottoms",
    "Pullover": "Tops",
    "Dress": "Dresses",
    "Coat": "Outerwear",
    "Sandal": "Footwear",
    "Shirt": "Tops",
    "Sneaker": "Footwear",
    "Bag": "Accessories",
    "Ankle boot": "Footwear",
}

# Synthetic base prices (USD); an item's price is its class base +-15%, seeded per item, ending in .99.
FASHION_BASE_PRICES: dict[str, float] = {
    "T-shirt/top": 19.0,
    "Trouser": 45.0,
    "Pullover": 39.0,
    "Dress": 59.0,
    "Coat": 119.0,
    "Sandal": 29.0,
    "Shirt": 35.0,
    "Sneaker": 79.0,
    "Bag": 49.0,
    "Ankle boot": 99.0,
}

_TITLE_TEMPLATES = ("{base} - New Season", "{base} (Best Seller)", "Premium {base}", "{base} - Limited Edition")
_COLORS = ("black", "white", "gray", "blue", "red", "green", "brown", "beige", "navy", "yellow")
_CLOTHING_SIZES = ("XS", "S", "M", "L", "XL")
_SHOE_SIZES = tuple(str(s) for s in range(36, 46))
_BAG_MATERIALS = ("leather", "canvas", "nylon", "suede")


# -- Products in memory ----------------------------------------------------------------------------


@dataclass
class _Product:
    """A live product: the contract's fields plus where it came from, which edits need."""

    product_id: str
    title: str
    description: str
    category_path: str
    brand: str | None
    attributes: dict[str, str]
    price: float
    image_bytes: bytes
    source: str
    updated_at: datetime.datetime
    base_title: str
    photo: Path | None = None  # Vendure: the original photo, re-cropped on image changes
    label: int | None = None  # Fashion-MNIST class
    option_values: dict[str, tuple[str, ...]] = field(default_factory=dict)  # Vendure: values per option group


@dataclass
class _Sources:
    """The raw data, read once per build."""

    vendure: list[VendureProduct]
    images: np.ndarray
    labels: np.ndarray
    fingerprint: str


@dataclass
class _DayResult:
    products: dict[str, _Product]
    added: list[str]
    changed: dict[str, list[str]]
    deleted: list[str]


def _rate_count(rate: float, n: int) -> int:
    """``rate * n`` rounded half up (Python's round() rounds half to even)."""
    return int(math.floor(rate * n + 0.5))


def _unit(*keys: object) -> float:
    """A uniform number in [0, 1) fixed by ``keys``: stable across runs, processes and Python versions."""
    digest = hashlib.sha256(":".join(str(k) for k in keys).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _day_start(day: datetime.date) -> datetime.datetime:
    return datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.timezone.utc)


def _sku_ids(products: list[VendureProduct]) -> dict[tuple[int, int], str]:
    """Product id of each (product, variant): its sku, made unique when the CSV repeats one.

    Vendure's demo repeats a sku across variants (Modern Cafe Chair); later repeats get the
    option values appended (``404.038.96-mint``) so that every variant can become a product.
    """
    ids: dict[tuple[int, int], str] = {}
    seen: set[str] = set()
    for p, product in enumerate(products):
        for v, variant in enumerate(product.variants):
            candidate = variant.sku
            if candidate in seen:
                suffix = "-".join(value for _, value in variant.options).lower().replace(" ", "-") or str(v)
                candidate = f"{variant.sku}-{suffix}"
                while candidate in seen:
                    candidate += f"-{v}"
            seen.add(candidate)
            ids[(p, v)] = candidate
    return ids


def _vendure_product(
    product: VendureProduct, variant: VendureVariant, product_id: str, is_first: bool, updated_at: datetime.datetime
) -> _Product:
    # Attributes: product facets (repeats joined, e.g. "blue, pink"), then the variant's facets,
    # then its options; a later source wins on the same name (the option is the most specific).
    facet_values: dict[str, list[str]] = {}
    for name, value in product.facets:
        if name != "category":
            facet_values.setdefault(name, []).append(value)
    attributes = {name: ", ".join(values) for name, values in facet_values.items()}
    attributes.update(dict(variant.facets))
    attributes.update(dict(variant.options))
    brand = next((value for name, value in product.facets if name == "brand"), None)
    title = product.name if is_first else " ".join([product.name, *(value for _, value in variant.options)])
    option_values: dict[str, list[str]] = {}
    for other in product.variants:
        for group, value in other.options:
            if value not in option_values.setdefault(group, []):
                option_values[group].append(value)
    return _Product(
        product_id=product_id,
        title=title,
        description=product.description,
        category_path=product.category_path,
        brand=brand,
        attributes=attributes,
        price=variant.price,
        image_bytes=product.image_path.read_bytes(),  # the real JPEG, as it is
        source="vendure",
        updated_at=updated_at,
        base_title=title,
        photo=product.image_path,
        option_values={group: tuple(values) for group, values in option_values.items()},
    )


def _fashion_product(index: int, sources: _Sources, seed: int, updated_at: datetime.datetime) -> _Product:
    label = int(sources.labels[index])
    name = FASHION_CLASSES[label]
    product_id = f"FM-{FASHION_SPLIT[0].upper()}-{index:05d}"
    noise = 0.3 * _unit(seed, "fashion-price", index) - 0.15
    price = math.floor(FASHION_BASE_PRICES[name] * (1.0 + noise)) + 0.99
    title = f"{name} {product_id}"
    return _Product(
        product_id=product_id,
        title=title,
        description=(
            f"{name} from Fashion-MNIST ({FASHION_SPLIT} split): a real 28x28 grayscale product photo. "
            f"Sample listing: the title, price and attributes other than the category are synthetic."
        ),
        category_path=f"Fashion > {FASHION_GROUPS[name]} > {name}",
        brand=None,
        attributes={"category": name},
        price=price,
        image_bytes=_png(sources.images[index]),  # the real 28x28 image, not upscaled
        source="fashion-mnist",
        updated_at=updated_at,
        base_title=title,
        label=label,
    )


# -- Edits -----------------------------------------------------------------------------------------


def _edit_title(product: _Product, rng: random.Random) -> None:
    options = [t.format(base=product.base_title) for t in _TITLE_TEMPLATES]
    product.title = rng.choice([t for t in options if t != product.title])


def _edit_attributes(product: _Product, rng: random.Random) -> None:
    attributes = dict(product.attributes)
    if product.source == "vendure":
        # Prefer a real alternative: another value the product's own option groups offer.
        groups = sorted(g for g, values in product.option_values.items() if len(values) > 1)
        if groups:
            group = rng.choice(groups)
            attributes[group] = rng.choice([v for v in product.option_values[group] if v != attributes.get(group)])
        else:
            attributes["color"] = rng.choice([c for c in _COLORS if c != attributes.get("color")])
    else:
        assert product.label is not None
        name = FASHION_CLASSES[product.label]
        group = FASHION_GROUPS[name]
        key, values = (
            ("material", _BAG_MATERIALS) if group == "Accessories"
            else ("size", _SHOE_SIZES) if group == "Footwear"
            else ("size", _CLOTHING_SIZES)
        )
        attributes[key] = rng.choice([v for v in values if v != attributes.get(key)])
    product.attributes = attributes


def _edit_price(product: _Product, rng: random.Random) -> None:
    change = rng.uniform(-0.25, -0.05) if rng.random() < 0.6 else rng.uniform(0.03, 0.15)
    price = max(0.01, round(product.price * (1.0 + change), 2))
    product.price = price if price != product.price else round(product.price + 0.01, 2)


def _crop_photo(photo: Path, rng: random.Random) -> bytes:
    """A re-encoded crop (and maybe a mirror image) of the original photo, as merchants re-shoot."""
    from PIL import Image, ImageOps

    with Image.open(photo) as image:
        image = image.convert("RGB")
        width, height = image.size
        scale = rng.uniform(0.75, 0.95)
        w, h = max(1, int(width * scale)), max(1, int(height * scale))
        left, top = rng.randrange(width - w + 1), rng.randrange(height - h + 1)
        image = image.crop((left, top, left + w, top + h))
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _edit_image(product: _Product, rng: random.Random, sources: _Sources, pool: list[int]) -> bool:
    """Give the product a new real image; False when none is left (Fashion-MNIST class exhausted)."""
    if product.source == "vendure":
        assert product.photo is not None
        new = _crop_photo(product.photo, rng)
    else:
        index = next((i for i in pool if int(sources.labels[i]) == product.label), None)
        if index is None:
            return False
        pool.remove(index)  # consumed: it will not also become a product of its own
        new = _png(sources.images[index])
    if new == product.image_bytes:
        return False
    product.image_bytes = new
    return True


def _changed_fields(before: _Product, after: _Product) -> list[str]:
    """The change kinds (title, attributes, price, image) in which two versions of a product differ."""
    columns = {"title": "title", "attributes": "attributes", "price": "price", "image": "image_bytes"}
    return sorted(kind for kind, name in columns.items() if getattr(before, name) != getattr(after, name))


# -- The simulation --------------------------------------------------------------------------------


class _Catalog:
    """The catalog's state across days: live products and the real items not used yet."""

    def __init__(self, sources: _Sources, start_date: datetime.date, fashion_items: int, seed: int) -> None:
        self.sources = sources
        self.seed = seed
        self.day = start_date
        ids = _sku_ids(sources.vendure)
        rng = random.Random(f"{seed}:day:0")
        self.live: dict[str, _Product] = {}
        self.unused_variants: list[tuple[int, int]] = []
        for p, product in enumerate(sources.vendure):
            for v, variant in enumerate(product.variants):
                if v == 0:
                    # Existing products were last edited some time before the first export.
                    age = datetime.timedelta(days=rng.randrange(1, 366), seconds=rng.randrange(86400))
                    item = _vendure_product(product, variant, ids[(p, v)], True, _day_start(start_date) - age)
                    self.live[item.product_id] = item
                else:
                    self.unused_variants.append((p, v))
        self.variant_ids = ids
        order = list(range(len(sources.labels)))
        random.Random(f"{seed}:fashion-order").shuffle(order)
        self.fashion_pool = order[fashion_items:]
        for index in sorted(order[:fashion_items]):
            age = datetime.timedelta(days=rng.randrange(1, 366), seconds=rng.randrange(86400))
            item = _fashion_product(index, sources, seed, _day_start(start_date) - age)
            self.live[item.product_id] = item
        self.first = _DayResult(dict(self.live), sorted(self.live), {}, [])

    def advance(self, day_index: int, rates: ChurnRates) -> _DayResult:
        """Move to the next day: delete, change and add products, all drawn from the seed and the day."""
        self.day += datetime.timedelta(days=1)
        rng = random.Random(f"{self.seed}:day:{day_index}")
        day_start = _day_start(self.day)
        live_ids = sorted(self.live)
        n_live = len(live_ids)

        deleted = sorted(rng.sample(live_ids, _rate_count(rates.delete, n_live)))
        for product_id in deleted:
            del self.live[product_id]

        changed: dict[str, list[str]] = {}
        candidates = sorted(self.live)
        for product_id in sorted(rng.sample(candidates, min(len(candidates), _rate_count(rates.change, n_live)))):
            # Copy before editing: the previous day's result must keep its own values.
            current = self.live[product_id]
            product = _Product(**{**current.__dict__, "attributes": dict(current.attributes)})
            kinds = [rng.choices(CHANGE_KINDS, weights=rates.kind_weights)[0]]
            if rng.random() < rates.second_change:
                others = [k for k in CHANGE_KINDS if k not in kinds]
                weights = [rates.kind_weights[CHANGE_KINDS.index(k)] for k in others]
                kinds.append(rng.choices(others, weights=weights)[0])
            for kind in kinds:
                if kind == "title":
                    _edit_title(product, rng)
                elif kind == "attributes":
                    _edit_attributes(product, rng)
                elif kind == "price":
                    _edit_price(product, rng)
                elif not _edit_image(product, rng, self.sources, self.fashion_pool):
                    _edit_price(product, rng)  # no image left for the class: a price change instead
            # Record what really differs, so the manifest is exact whatever the edits did.
            done = _changed_fields(current, product)
            if not done:
                _edit_price(product, rng)
                done = _changed_fields(current, product)
            product.updated_at = day_start + datetime.timedelta(seconds=rng.randrange(86400))
            self.live[product_id] = product
            changed[product_id] = done

        added: list[str] = []
        n_add = _rate_count(rates.add, n_live)
        vendure_live = sum(1 for p in self.live.values() if p.source == "vendure")
        n_vendure = 0
        if self.unused_variants and n_add:
            # Each source grows in proportion to its share of the catalog, Vendure at least by one.
            share = _rate_count(vendure_live / max(1, len(self.live)), n_add)
            n_vendure = min(len(self.unused_variants), max(1, share))
        for p, v in sorted(rng.sample(self.unused_variants, n_vendure)):
            self.unused_variants.remove((p, v))
            product = self.sources.vendure[p]
            updated_at = day_start + datetime.timedelta(seconds=rng.randrange(86400))
            item = _vendure_product(product, product.variants[v], self.variant_ids[(p, v)], False, updated_at)
            self.live[item.product_id] = item
            added.append(item.product_id)
        n_fashion = min(n_add - n_vendure, len(self.fashion_pool))
        new_fashion, self.fashion_pool = self.fashion_pool[:n_fashion], self.fashion_pool[n_fashion:]
        for index in sorted(new_fashion):
            updated_at = day_start + datetime.timedelta(seconds=rng.randrange(86400))
            item = _fashion_product(index, self.sources, self.seed, updated_at)
            self.live[item.product_id] = item
            added.append(item.product_id)
        return _DayResult(dict(self.live), sorted(added), changed, deleted)


# -- Writing ---------------------------------------------------------------------------------------


def _to_table(products: dict[str, _Product]) -> pa.Table:
    rows = [products[k] for k in sorted(products)]
    table = pa.table(
        {
            "product_id": pa.array([p.product_id for p in rows], pa.string()),
            "title": pa.array([p.title for p in rows], pa.string()),
            "description": pa.array([p.description for p in rows], pa.string()),
            "category_path": pa.array([p.category_path for p in rows], pa.string()),
            "brand": pa.array([p.brand for p in rows], pa.string()),
            "attributes": pa.array(
                [sorted(p.attributes.items()) for p in rows], pa.map_(pa.string(), pa.string())
            ),
            "price": pa.array([p.price for p in rows], pa.float64()),
            "currency": pa.array([CURRENCY] * len(rows), pa.string()),
            "image_bytes": pa.array([p.image_bytes for p in rows], pa.binary()),
            "image_uri": pa.nulls(len(rows), pa.string()),
            "source": pa.array([p.source for p in rows], pa.string()),
            "updated_at": pa.array([p.updated_at for p in rows], pa.timestamp("us", tz="UTC")),
        }
    )
    return CATALOG_SNAPSHOT.conform(table)


def _atomic_write(path: Path, write) -> None:
    """Write through a hidden temp file in the same folder, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_parquet(table: pa.Table, path: Path) -> None:
    # Fixed writer options so that equal tables give equal bytes. Images are already compressed:
    # store them as they are; keep statistics off the large binary/text columns.
    small = [c for c in table.column_names if c not in ("image_bytes", "description", "attributes")]
    compression = {c: ("none" if c == "image_bytes" else "zstd") for c in table.column_names}
    _atomic_write(
        path,
        lambda tmp: pq.write_table(
            table,
            tmp,
            compression=compression,
            compression_level={c: 3 for c, codec in compression.items() if codec == "zstd"},
            use_dictionary=["currency", "source", "category_path", "brand"],
            write_statistics=small,
            row_group_size=max(1, table.num_rows),
            version="2.6",
            data_page_version="1.0",
            store_schema=True,
        ),
    )


def _reusable(folder: Path, parameters: dict, snapshot_date: datetime.date) -> dict | None:
    """The day's manifest, when the folder holds a complete snapshot built with ``parameters``."""
    manifest_path, parquet_path = folder / MANIFEST_FILE, folder / SNAPSHOT_FILE
    if not manifest_path.is_file() or not parquet_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("parameters") != parameters or manifest.get("snapshot_date") != snapshot_date.isoformat():
        return None
    if manifest.get("parquet", {}).get("sha256") != sha256_file(parquet_path):
        return None  # replaced or damaged since: rebuild
    return manifest


def _read_sources(raw_data_dir: str) -> _Sources:
    raw = local_path(raw_data_dir)
    vendure = read_vendure_products(raw)
    images, labels = load_fashion_mnist(raw, FASHION_SPLIT)
    # Fingerprint what the snapshots are made of, so new raw data invalidates old snapshots.
    digest = hashlib.sha256()
    paths = [
        vendure_dir(raw) / "products.csv",
        *sorted({p.image_path for p in vendure}),
        *fashion_mnist_files(raw, FASHION_SPLIT),
    ]
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return _Sources(vendure=vendure, images=images, labels=labels, fingerprint=digest.hexdigest())


def build_sample_snapshots(
    out_uri: str,
    raw_data_dir: str,
    start_date: datetime.date,
    days: int = 3,
    fashion_items: int = 300,
    seed: int = 7,
) -> list[SnapshotInfo]:
    """Write ``days`` daily catalog snapshots from real sample data, starting at ``start_date``.

    Day 1 is every Vendure product plus ``fashion_items`` Fashion-MNIST test items; later days churn
    (see ChurnRates). Each day goes to ``<out_uri>/dt=YYYY-MM-DD/`` as ``catalog.parquet`` and
    ``_churn.json``. A day whose manifest has the same parameters (and whose parquet is intact) is
    left as it is and reported ``reused``; content never depends on ``days``, so extending a series
    reuses its first days. Returns one SnapshotInfo per day, in date order.
    """
    if isinstance(start_date, datetime.datetime) or not isinstance(start_date, datetime.date):
        raise TypeError(f"start_date must be a datetime.date, got {start_date!r}")
    if days < 1:
        raise ValueError(f"days={days}: build at least one day")
    out = local_path(out_uri)
    sources = _read_sources(raw_data_dir)
    if not 0 <= fashion_items <= len(sources.labels):
        raise ValueError(
            f"fashion_items={fashion_items}: the Fashion-MNIST {FASHION_SPLIT} split has "
            f"{len(sources.labels)} items; choose 0..{len(sources.labels)}"
        )
    parameters = {
        "generator": f"jobs.sample_catalog v{GENERATOR_VERSION}",
        "start_date": start_date.isoformat(),
        "seed": seed,
        "fashion_items": fashion_items,
        "fashion_split": FASHION_SPLIT,
        "churn": asdict(CHURN),
        "raw_data_sha256": sources.fingerprint,
    }
    parameters = json.loads(json.dumps(parameters))  # as a manifest reads back (tuples become lists)

    catalog = _Catalog(sources, start_date, fashion_items, seed)
    infos: list[SnapshotInfo] = []
    for day_index in range(days):
        snapshot_date = start_date + datetime.timedelta(days=day_index)
        with stage(f"sample snapshot dt={snapshot_date}", log) as progress:
            result = catalog.first if day_index == 0 else catalog.advance(day_index, CHURN)
            folder = out / f"dt={snapshot_date.isoformat()}"
            reused = _reusable(folder, parameters, snapshot_date) is not None
            if not reused:
                folder.mkdir(parents=True, exist_ok=True)
                table = _to_table(result.products)
                _write_parquet(table, folder / SNAPSHOT_FILE)
                by_source: dict[str, int] = {}
                for product in result.products.values():
                    by_source[product.source] = by_source.get(product.source, 0) + 1
                manifest = {
                    "table": CATALOG_SNAPSHOT.name,
                    "snapshot_date": snapshot_date.isoformat(),
                    "day_index": day_index,
                    "previous_snapshot_date": (
                        (snapshot_date - datetime.timedelta(days=1)).isoformat() if day_index else None
                    ),
                    "parameters": parameters,
                    "rows": table.num_rows,
                    "rows_by_source": dict(sorted(by_source.items())),
                    "parquet": {
                        "file": SNAPSHOT_FILE,
                        "bytes": (folder / SNAPSHOT_FILE).stat().st_size,
                        "sha256": sha256_file(folder / SNAPSHOT_FILE),
                    },
                    "counts": {
                        "added": len(result.added),
                        "changed": len(result.changed),
                        "deleted": len(result.deleted),
                    },
                    "added": result.added,
                    "changed": dict(sorted(result.changed.items())),
                    "deleted": result.deleted,
                }
                text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
                _atomic_write(folder / MANIFEST_FILE, lambda tmp: tmp.write_text(text))
            # The ready marker goes last: the nightly DAG waits for it before reading the day.
            (folder / READY_MARKER).touch()
            progress.rows = len(result.products)
            added = len(result.added)  # day 1: every product is new
            infos.append(
                SnapshotInfo(
                    date=snapshot_date,
                    uri=str(folder),
                    rows=len(result.products),
                    added=added,
                    changed=len(result.changed),
                    deleted=len(result.deleted),
                    reused=reused,
                )
            )
            log.info(
                "dt=%s: %d rows, +%d ~%d -%d%s", snapshot_date, len(result.products), added,
                len(result.changed), len(result.deleted), " (reused)" if reused else "",
            )
    return infos

