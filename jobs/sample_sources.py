"""Readers for the real sample data behind the local catalog: Vendure's demo catalog and Fashion-MNIST.

Both live under the raw-data directory (``Settings.raw_data_dir``); ``make setup`` puts them there:

    <raw_data_dir>/vendure/products.csv     Vendure's sample catalog (npm @vendure/create)
    <raw_data_dir>/vendure/images/*.jpg     its product photos
    <raw_data_dir>/fashion-mnist/*-ubyte.gz Fashion-MNIST IDX files (gzip)

The readers only parse; turning rows into catalog products is jobs.sample_catalog's work.
``load_fashion_mnist`` is also meant for training code, which needs the same images as arrays.
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Fashion-MNIST label -> class name, in label order (https://github.com/zalandoresearch/fashion-mnist).
FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class SampleDataMissing(FileNotFoundError):
    """Raw sample data is not where the pipeline expects it; the message says how to get it."""


# -- Fashion-MNIST --------------------------------------------------------------------------------


def fashion_mnist_files(raw_data_dir: str | Path, split: str = "test") -> tuple[Path, Path]:
    """Paths of the (images, labels) IDX files of ``split``, checked to exist."""
    if split not in _FASHION_FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}: use 'train' or 'test'")
    folder = Path(raw_data_dir) / "fashion-mnist"
    paths = tuple(folder / name for name in _FASHION_FILES[split])
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SampleDataMissing(
            f"Fashion-MNIST {split} files not found: {', '.join(missing)}. Run `make setup` "
            f"(it links the Fashion-MNIST IDX .gz files into {folder}), or point MOONPIPE_RAW_DATA "
            f"at a folder that has them."
        )
    return paths  # type: ignore[return-value]


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into an array of its declared type and shape.

    IDX is a 4-byte magic (0, 0, type code, number of dimensions), one big-endian uint32 per
    dimension, then the values, row-major.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (magic bytes {data[:4]!r})")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 1
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(
            f"{path}: header declares shape {dims} ({count * dtype.itemsize} bytes of values) but the "
            f"file holds {len(data) - offset}; the file is truncated or corrupt, fetch it again"
        )
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def load_fashion_mnist(raw_data_dir: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` as (images uint8 [N, 28, 28], labels uint8 [N]); labels index FASHION_CLASSES."""
    image_path, label_path = fashion_mnist_files(raw_data_dir, split)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
        raise ValueError(
            f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match "
            f"(expected [N, 28, 28] and [N]); the files are not Fashion-MNIST, fetch them again"
        )
    if labels.size and int(labels.max()) >= len(FASHION_CLASSES):
        raise ValueError(f"Fashion-MNIST {split}: label {int(labels.max())} is outside 0..9")
    return images.astype(np.uint8, copy=False), labels.astype(np.uint8, copy=False)


# -- Vendure --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VendureVariant:
    """One purchasable variant: its own sku, price and option values (group name -> value)."""

    sku: str
    price: float
    options: tuple[tuple[str, str], ...]
    facets: tuple[tuple[str, str], ...]  # variant-level facets (Vendure's `variantFacets`)


@dataclass(frozen=True)
class VendureProduct:
    """A Vendure product as its CSV describes it: shared fields plus its variants in CSV order."""

    name: str
    slug: str
    description: str
    image_path: Path
    facets: tuple[tuple[str, str], ...]  # (facet name, value) in CSV order, repeats allowed
    variants: tuple[VendureVariant, ...]

    @property
    def category_path(self) -> str:
        """The `category:` facet values in order (root first), joined by ' > '."""
        return " > ".join(value for name, value in self.facets if name == "category")


def _split(text: str, sep: str = "|") -> list[str]:
    return [part.strip() for part in text.split(sep)] if text.strip() else []


def _facets(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in _split(text):
        name, colon, value = item.partition(":")
        if not colon or not name.strip() or not value.strip():
            raise ValueError(f"Vendure facet {item!r} is not 'name:value'")
        pairs.append((name.strip(), value.strip()))
    return tuple(pairs)


def vendure_dir(raw_data_dir: str | Path) -> Path:
    """The Vendure sample folder, checked to hold products.csv and images/."""
    folder = Path(raw_data_dir) / "vendure"
    if not (folder / "products.csv").is_file() or not (folder / "images").is_dir():
        raise SampleDataMissing(
            f"Vendure sample data not found at {folder} (need products.csv and images/): run "
            f"`make setup` (it fetches npm @vendure/create and copies its assets/products.csv and "
            f"assets/images/ there), or point MOONPIPE_RAW_DATA at a folder that has them."
        )
    return folder


def read_vendure_products(raw_data_dir: str | Path) -> list[VendureProduct]:
    """Parse Vendure's products.csv: a row with a name starts a product, name-less rows add variants.

    Every key and value is space-padded in the file, so all are stripped. Option groups may carry a
    code after a colon (``size:shoe-size``); the name before it is kept.
    """
    folder = vendure_dir(raw_data_dir)
    csv_path = folder / "products.csv"
    with csv_path.open(newline="", encoding="utf-8") as handle:
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(handle)]

    products: list[VendureProduct] = []
    current: dict | None = None
    for line, row in enumerate(rows, start=2):
        if row.get("name"):
            if current is not None:
                products.append(_product(current))
            groups = [g.partition(":")[0].strip() for g in _split(row.get("optionGroups", ""))]
            image = folder / "images" / row.get("assets", "")
            if not row.get("assets") or not image.is_file():
                raise SampleDataMissing(
                    f"{csv_path}:{line}: product {row['name']!r} names image {row.get('assets')!r}, "
                    f"not found in {folder / 'images'}: run `make setup` to fetch the Vendure assets again"
                )
            current = {"row": row, "groups": groups, "image": image, "variants": []}
        elif current is None:
            raise ValueError(f"{csv_path}:{line}: a variant row comes before any product row")
        values = _split(row.get("optionValues", ""))
        if len(values) != len(current["groups"]):
            raise ValueError(
                f"{csv_path}:{line}: option values {values} do not pair with option groups {current['groups']}"
            )
        if not row.get("sku"):
            raise ValueError(f"{csv_path}:{line}: variant has no sku")
        try:
            price = float(row.get("price", ""))
        except ValueError:
            raise ValueError(f"{csv_path}:{line}: price {row.get('price')!r} is not a number") from None
        current["variants"].append(
            VendureVariant(
                sku=row["sku"],
                price=price,
                options=tuple(zip(current["groups"], values)),
                facets=_facets(row.get("variantFacets", "")),
            )
        )
    if current is not None:
        products.append(_product(current))
    if not products:
        raise ValueError(f"{csv_path} holds no products; fetch the Vendure assets again with `make setup`")
    return products


def _product(parsed: dict) -> VendureProduct:
    row = parsed["row"]
    return VendureProduct(
        name=row["name"],
        slug=row.get("slug", ""),
        description=row.get("description", ""),
        image_path=parsed["image"],
        facets=_facets(row.get("facets", "")),
        variants=tuple(parsed["variants"]),
    )
