"""MOON3.0's training examples, read from the Delta tables that jobs/training_data.py exports.

A step's batch is a pure function of (seed, step, rank): a resumed run draws exactly the batches
it would have drawn, and ranks draw different ones. Each example is a query->product pair (the
query and its clicked product) plus a positive product of the clicked product's category.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import numpy as np

from model.moon3_processing import ProductInput
from moonpipe import delta
from moonpipe.settings import Settings

NEUTRAL_TITLE = "product"  # the title an image-only view carries (the processor needs some text)
MAX_SHIFT = 1 / 14  # of the image's side: 2 pixels of a 28x28 Fashion-MNIST photo


@dataclass
class ProductRecord:
    product_id: str
    title: str
    description: str | None
    category: str
    category_path: str | None
    attributes: dict[str, str]
    image_bytes: bytes
    reasoning_target: str

    def view(self, with_text: bool, augment: np.random.Generator | None = None,
             max_shift: float = MAX_SHIFT) -> ProductInput:
        """The product as the model reads it: everything, or its image alone (no text naming it).
        With ``augment``, the image is randomly mirrored and shifted (see ``augmented_image``)."""
        image = augmented_image(self.image_bytes, augment, max_shift) if augment is not None else self.image_bytes
        if with_text:
            return ProductInput(self.title, image, self.category_path, self.attributes, self.description)
        return ProductInput(NEUTRAL_TITLE, image)


def augmented_image(image_bytes: bytes, rng: np.random.Generator, max_shift: float = MAX_SHIFT) -> bytes:
    """The photo mirrored left-right half of the time and shifted by up to ``max_shift`` of its
    side (edge pixels fill the gap; 0: mirrored only): a product photo's class does not depend on
    either, so the contrastive objective learns to ignore them instead of memorising exact pixels.
    PNG-encoded."""
    import io

    from PIL import Image, ImageOps

    image = Image.open(io.BytesIO(image_bytes))
    image.load()
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    width, height = image.size
    dx, dy = (int(rng.integers(-round(side * max_shift), round(side * max_shift) + 1)) for side in (width, height))
    if dx or dy:
        array = np.asarray(image)
        pad = ((abs(dy), abs(dy)), (abs(dx), abs(dx))) + ((0, 0),) * (array.ndim - 2)
        padded = np.pad(array, pad, mode="edge")
        top, left = abs(dy) - dy, abs(dx) - dx
        image = Image.fromarray(padded[top:top + height, left:left + width])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@dataclass
class Example:
    query: str
    product: ProductRecord
    positive: ProductRecord
    category_id: int


class TrainingSet:
    """The training split of one export: products, query pairs and product pairs."""

    def __init__(self, products: dict[str, ProductRecord], query_pairs: list[tuple[str, str]],
                 product_pairs: dict[str, str], export_date: str) -> None:
        self.products = products
        self.export_date = export_date
        self.categories = sorted({p.category for p in products.values()})
        self.category_ids = {c: i for i, c in enumerate(self.categories)}
        # Only pairs whose product has a positive can feed both objectives.
        self.query_pairs = [(q, pid) for q, pid in query_pairs if pid in product_pairs and pid in products]
        self.product_pairs = product_pairs
        # For partners drawn afresh each step: the products of each category that has a pair.
        by_category: dict[str, list[str]] = {}
        for product_id in sorted(product_pairs):
            if product_id in products:
                by_category.setdefault(products[product_id].category, []).append(product_id)
        self.paired_by_category = by_category
        self.place_in_category = {pid: i for members in by_category.values() for i, pid in enumerate(members)}
        if not self.query_pairs:
            raise ValueError(
                f"export {export_date} has no usable training pairs (query pairs whose product has a "
                f"same-category positive): run `moonpipe training-data export` with more products"
            )

    def __len__(self) -> int:
        return len(self.query_pairs)

    def batch(self, seed: int, step: int, rank: int, size: int, fresh_partners: bool = False) -> list[Example]:
        """``fresh_partners``: each product's positive is drawn from its category at every step
        (another product of it, seeded by step and rank) instead of the export's fixed pair, so
        that over many epochs an anchor meets many partners and cannot memorise one."""
        rng = np.random.default_rng([seed, step, rank])
        picks = rng.choice(len(self.query_pairs), size=min(size, len(self.query_pairs)), replace=False)
        partners = np.random.default_rng([seed, step, rank, 2]) if fresh_partners else None
        examples = []
        for index in picks:
            query, product_id = self.query_pairs[int(index)]
            product = self.products[product_id]
            partner_id = self.product_pairs[product_id] if partners is None else self._other_of_category(product, partners)
            examples.append(Example(query, product, self.products[partner_id], self.category_ids[product.category]))
        return examples

    def _other_of_category(self, product: ProductRecord, rng: np.random.Generator) -> str:
        members = self.paired_by_category[product.category]  # two products at least (it has a pair)
        drawn = int(rng.integers(len(members) - 1))  # uniform over the others: skip the product's own place
        return members[drawn + 1] if drawn >= self.place_in_category[product.product_id] else members[drawn]


def latest_export_date(settings: Settings) -> str:
    uri = settings.table_uri("moon3_query_pairs")
    if not delta.exists(uri):
        raise FileNotFoundError(
            f"no MOON3.0 training pairs at {uri}: export them first (`moonpipe training-data export --date D`)"
        )
    dates = delta.read_arrow(uri, columns=["export_date"]).column("export_date").to_pylist()
    if not dates:
        raise ValueError(f"{uri} is empty: export the training sets first")
    return max(dates).isoformat()


def load_products(settings: Settings, splits: tuple[str, ...], limit: int | None = None) -> dict[str, ProductRecord]:
    table = delta.read_arrow(
        settings.table_uri("training_products"),
        columns=["product_id", "split", "title", "description", "category", "category_path", "attributes",
                 "image_bytes", "reasoning_target"],
        filters=[("split", "in", list(splits))],
    )
    rows = table.to_pylist()
    rows.sort(key=lambda r: r["product_id"])
    if limit is not None:
        rows = rows[:limit]
    return {
        r["product_id"]: ProductRecord(r["product_id"], r["title"], r["description"], r["category"],
                                       r["category_path"], dict(r["attributes"] or []), r["image_bytes"],
                                       r["reasoning_target"])
        for r in rows
    }


def load_training_set(settings: Settings, export_date: str | None = None, split: str = "train",
                      matching_clicks_only: bool = False) -> TrainingSet:
    """``matching_clicks_only``: keep the query pairs whose query names the clicked product's
    category (``matches_category``), dropping clicks that contradict the catalog."""
    export_date = export_date or latest_export_date(settings)
    day = date.fromisoformat(export_date)
    products = load_products(settings, (split,))
    query_rows = delta.read_arrow(
        settings.table_uri("moon3_query_pairs"), columns=["query", "product_id", "matches_category"],
        filters=[("export_date", "=", day), ("split", "=", split)],
    ).to_pylist()
    if matching_clicks_only:
        query_rows = [r for r in query_rows if r["matches_category"]]
    pair_rows = delta.read_arrow(
        settings.table_uri("moon3_product_pairs"), columns=["anchor_id", "positive_id"],
        filters=[("export_date", "=", day), ("split", "=", split)],
    ).to_pylist()
    return TrainingSet(
        products,
        sorted((r["query"], r["product_id"]) for r in query_rows),
        {r["anchor_id"]: r["positive_id"] for r in pair_rows},
        export_date,
    )
