"""MOON3.0 offline evaluation on the held-out products of the training export.

* product->product: each test product (its image alone: no text that could name the category)
  against a gallery of training-split products; relevant = same leaf category.
* query->product: the distinct test-split queries of the export against the test products;
  relevant = products whose category the query names (ground truth, not the noisy clicks).
* kNN category accuracy: majority category of the k nearest gallery products.
* Its memorisation check: the same kNN accuracy for gallery products the model was trained on
  (as many as there are held-out products, each against the rest of the gallery, itself left
  out). Far above the held-out figure, the model has learned its training images rather than
  their categories (docs/training.md: what closed that gap on Fashion-MNIST, and what it cost).
* With reasoning on (the model's own setting, or ``reasoning`` overriding it for both models), each
  product is embedded after the reasoning the model writes from its image, and the share of
  held-out products whose generated ``category`` is their catalog category is reported
  (``reasoning_category_accuracy``): how far search teams can filter on the generated attributes.
* The raw-pixel kNN baseline (images resized to 28x28 grayscale, Euclidean) on the same split and
  gallery, so the model's accuracy has a reference measured on the same data.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from moonpipe.settings import Settings
from training.moon3_data import ProductRecord, latest_export_date, load_products
from training.retrieval_metrics import knn_accuracy, recall_and_map, top_k

if TYPE_CHECKING:
    from collections.abc import Callable

    from model.moon3_predictor import Predictions
    from model.moon3_processing import ProductInput

LOG = logging.getLogger("moonpipe.training.moon3_eval")
KS = (1, 5, 10)
MAP_DEPTH = 100


@dataclass
class EvalSet:
    queries: list[ProductRecord]  # the held-out products
    gallery: list[ProductRecord]
    search_queries: list[str]
    categories: list[str]

    def labels(self, records: list[ProductRecord]) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.categories)}
        return np.array([index[r.category] for r in records])


def load_eval_set(settings: Settings, *, split: str = "test", gallery_split: str = "train",
                  query_limit: int | None = None, gallery_limit: int | None = 10_000,
                  search_query_limit: int = 500) -> EvalSet:
    from moonpipe import delta

    held_out = list(load_products(settings, (split,)).values())
    if query_limit is not None:
        held_out = held_out[:query_limit]
    gallery = list(load_products(settings, (gallery_split,), limit=gallery_limit).values())
    if not held_out or not gallery:
        raise ValueError(f"evaluation needs products in the {split!r} and {gallery_split!r} splits of "
                         f"training_products: export the training sets first")
    export_date = latest_export_date(settings)
    from datetime import date

    queries = delta.read_arrow(settings.table_uri("moon3_query_pairs"), columns=["query"],
                               filters=[("export_date", "=", date.fromisoformat(export_date)), ("split", "=", split)])
    search_queries = sorted(set(queries.column("query").to_pylist()))[:search_query_limit]
    categories = sorted({r.category for r in held_out + gallery})
    return EvalSet(held_out, gallery, search_queries, categories)


def _pixels(record: ProductRecord) -> np.ndarray:
    from PIL import Image

    image = Image.open(io.BytesIO(record.image_bytes)).convert("L").resize((28, 28))
    return np.asarray(image, dtype=np.float32).reshape(-1) / 255.0


def raw_pixel_knn(eval_set: EvalSet, k: int = 10) -> float:
    queries = np.stack([_pixels(r) for r in eval_set.queries])
    gallery = np.stack([_pixels(r) for r in eval_set.gallery])
    indexes, scores = top_k(queries, gallery, k, metric="l2")
    gallery_labels = eval_set.labels(eval_set.gallery)
    return knn_accuracy(gallery_labels[indexes], scores - scores.min(), eval_set.labels(eval_set.queries))


def _category_in(query: str, category: str) -> bool:
    return category.lower().replace("/", " ") in query.lower()


def embed_products(predict: Callable[[list[ProductInput]], Predictions], records: list[ProductRecord]) -> Predictions:
    """Image-only embeddings (and, with reasoning, the generated attributes) through ``predict``,
    the batch predictor the embed job uses."""
    result = predict([r.view(with_text=False) for r in records])
    if not result.ok.all():
        bad = [records[i].product_id for i in np.flatnonzero(~result.ok)[:5]]
        raise ValueError(f"the model could not embed {int((~result.ok).sum())} evaluation products (e.g. {bad}): "
                         f"{[e for e in result.errors if e][:1]}")
    return result


def embed_queries(checkpoint: str, queries: list[str], batch: int = 128) -> np.ndarray:
    import torch

    from model.moon3_checkpoint import load_checkpoint
    from model.moon3_processing import Moon3Processor

    model = load_checkpoint(checkpoint).eval()
    processor = Moon3Processor(model.tokenizer, model.image_processor, model.config.prompt)
    vectors = []
    with torch.inference_mode():
        for start in range(0, len(queries), batch):
            items = [processor.encode_query(q) for q in queries[start:start + batch]]
            vectors.append(model(**processor.collate(items)).embeddings.numpy())
    return np.concatenate(vectors) if vectors else np.zeros((0, model.config.embedding_dim), np.float32)


def evaluate_checkpoint(checkpoint: str, eval_set: EvalSet, *, k: int = 10, threads: int | None = None,
                        reasoning: bool | None = None) -> dict[str, Any]:
    """Metrics of one checkpoint on ``eval_set`` (all floats, JSON-able); ``reasoning`` None: the
    model's own setting."""
    from model.moon3_predictor import make_predict_fn

    predict = make_predict_fn(checkpoint, threads=threads, device="cpu" if threads else None, reasoning=reasoning)
    held_predictions = embed_products(predict, eval_set.queries)
    held = held_predictions.vectors
    gallery = embed_products(predict, eval_set.gallery).vectors
    held_labels, gallery_labels = eval_set.labels(eval_set.queries), eval_set.labels(eval_set.gallery)
    indexes, scores = top_k(held, gallery, max(MAP_DEPTH, k))
    hits = gallery_labels[indexes] == held_labels[:, None]
    counts = np.bincount(gallery_labels, minlength=len(eval_set.categories))[held_labels]
    metrics = {f"p2p_{name}": value for name, value in recall_and_map(hits, counts, KS).items()}
    metrics["knn_accuracy"] = knn_accuracy(gallery_labels[indexes[:, :k]], scores[:, :k], held_labels)
    seen = min(len(held), len(gallery) - 1)
    if seen > 0:
        seen_indexes, seen_scores = top_k(gallery[:seen], gallery, k, exclude_self=True)
        metrics["train_knn_accuracy"] = knn_accuracy(gallery_labels[seen_indexes], seen_scores, gallery_labels[:seen])
        metrics["generalisation_gap"] = metrics["train_knn_accuracy"] - metrics["knn_accuracy"]
    # Per-category kNN accuracy, for the report's plot.
    predicted_ok = _knn_correct(gallery_labels[indexes[:, :k]], scores[:, :k], held_labels)
    per_category = {c: float(predicted_ok[held_labels == i].mean()) for i, c in enumerate(eval_set.categories)
                    if (held_labels == i).any()}
    relevant_sets = [np.array([_category_in(q, c) for c in eval_set.categories]) for q in eval_set.search_queries]
    usable = [i for i, r in enumerate(relevant_sets) if r.any()]
    if usable:
        queries = embed_queries(checkpoint, [eval_set.search_queries[i] for i in usable])
        q_indexes, _ = top_k(queries, held, MAP_DEPTH)
        relevant_of_product = np.stack([relevant_sets[i] for i in usable])  # [Q, categories]
        q_hits = np.take_along_axis(relevant_of_product, held_labels[q_indexes], axis=1)
        q_counts = (relevant_of_product[:, held_labels]).sum(axis=1)
        metrics.update({f"q2p_{name}": value for name, value in recall_and_map(q_hits, q_counts, KS).items()})
    reasoned = any(text is not None for text in held_predictions.reasoning)
    metrics["reasoning_on"] = float(reasoned)
    if reasoned:
        metrics["reasoning_category_accuracy"] = category_agreement(
            held_predictions.attributes, [eval_set.categories[label] for label in held_labels])
    metrics["eval_products"] = float(len(eval_set.queries))
    metrics["gallery_products"] = float(len(eval_set.gallery))
    metrics["search_queries"] = float(len(usable))
    return {"metrics": metrics, "knn_accuracy_by_category": per_category}


def category_agreement(generated: list[dict[str, str]], categories: list[str]) -> float:
    """Share of products whose generated ``category`` attribute names their catalog category
    (case and surrounding spaces aside); a product whose reasoning names none counts as wrong."""
    if len(generated) != len(categories):
        raise ValueError(f"{len(generated)} generated attribute sets for {len(categories)} products")
    if not categories:
        return 0.0
    said = [attributes.get("category", "").strip().lower() for attributes in generated]
    return float(np.mean([s == c.strip().lower() for s, c in zip(said, categories)]))


def _knn_correct(labels: np.ndarray, scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.array([knn_accuracy(labels[i:i + 1], scores[i:i + 1], truth[i:i + 1]) for i in range(len(truth))])
