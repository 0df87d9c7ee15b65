"""The embedding pipeline against the bare model, measured side by side in one run.

1. Throughput: the bare batch predictor over N products vs the Spark pipeline (read Delta ->
   Arrow UDF -> MERGE) over the same products with the same model and batch size; their ratio.
2. Nightly runs with 1% churn (three in a row) vs a full re-embed: wall time of each (Spark
   start-up excluded).
3. Peak memory (driver JVM + Python + workers, summed RSS of the process tree) of a full embed at
   two catalog sizes ten times apart: it must not grow with the catalog.

    moonpipe bench pipeline --model-preset small --products 1000 --memory-sizes 1000,10000

Products are the real sample catalog (Vendure photos, Fashion-MNIST items), repeated under new ids
to reach the sizes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

DAY = date(2026, 11, 1)


@dataclass
class PeakMemory:
    """Samples the summed RSS of this process and its children (JVM, Python workers)."""

    interval: float = 0.2
    peak_bytes: int = 0

    def __enter__(self) -> "PeakMemory":
        import psutil

        self._stop = threading.Event()
        me = psutil.Process()

        def sample() -> None:
            while not self._stop.is_set():
                total = 0
                for proc in [me, *me.children(recursive=True)]:
                    try:
                        total += proc.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_bytes = max(self.peak_bytes, total)
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _catalog(spark, settings, count: int):
    """``count`` products in the products table, from the real sample snapshot repeated under new ids."""
    from pyspark.sql import functions as F

    from jobs.ingest import _products_source, read_snapshot
    from jobs.sample_catalog import build_sample_snapshots
    from moonpipe import delta
    from schemas.tables import PRODUCTS

    build_sample_snapshots(settings.snapshots_uri, settings.raw_data_dir, DAY, days=1, fashion_items=300)
    base = read_snapshot(spark, settings.snapshot_uri(DAY.isoformat())).drop("image_load_error")
    rows = base.count()
    copies = -(-count // rows)
    repeated = (
        base.crossJoin(spark.range(copies).withColumnRenamed("id", "copy"))
        .withColumn("product_id", F.concat_ws("-r", "product_id", F.col("copy").cast("string")))
        .withColumn("title", F.concat_ws(" #", "title", F.col("copy").cast("string")))
        .drop("copy")
        .limit(count)
    )
    delta.write(_products_source(repeated, DAY), settings.table_uri(PRODUCTS.name), PRODUCTS, mode="overwrite")
    return delta.read(spark, settings.table_uri(PRODUCTS.name))


def _fresh_settings(root: str):
    from moonpipe.settings import Settings

    return Settings.from_env(home=tempfile.mkdtemp(prefix="lake-", dir=root))


def _model(root: str, preset: str) -> str:
    from model.moon3_checkpoint import build_model, save_checkpoint
    from model.moon3_config import Moon3Config

    path = f"{root}/model-{preset}"
    if not Path(path).exists():
        save_checkpoint(build_model(Moon3Config(backbone=preset)), path)
    return path


def throughput(spark, root: str, model_dir: str, count: int, threads: int) -> dict:
    """Bare predictor vs Spark pipeline on the same products, model and Arrow batch size."""
    from jobs.embed import MODEL_COLUMNS, embed
    from model.moon3_predictor import make_predict_fn, products_from_arrow

    settings = _fresh_settings(root)
    products = _catalog(spark, settings, count).select(*MODEL_COLUMNS).toArrow()
    batch_rows = int(spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch"))
    predict = make_predict_fn(model_dir, threads=threads)
    predict(products_from_arrow(products.slice(0, 16)))  # warm-up, as the pipeline's workers get
    started = time.perf_counter()
    for offset in range(0, products.num_rows, batch_rows):
        predict(products_from_arrow(products.slice(offset, batch_rows)))
    bare = products.num_rows / (time.perf_counter() - started)

    embed(DAY, model_dir, settings, spark, full=True)  # warm-up: workers load the model
    summary = embed(DAY, model_dir, settings, spark, full=True)
    pipeline = summary.embedded / sum(summary.seconds.values())
    return {
        "products": products.num_rows,
        "bare_products_per_s": round(bare, 1),
        "pipeline_products_per_s": round(pipeline, 1),
        "ratio": round(pipeline / bare, 3),
        "pipeline_seconds": summary.seconds,
    }


def churn(spark, root: str, model_dir: str, count: int, rate: float, nights: int = 3) -> dict:
    """Wall time of ``nights`` nightly runs in a row, each after ``rate`` of the products changed,
    vs a full re-embed; the worst night is the headline."""
    from pyspark.sql import functions as F

    from jobs.embed import embed
    from moonpipe import delta
    from schemas.tables import PRODUCTS

    settings = _fresh_settings(root)
    _catalog(spark, settings, count)
    embed(DAY, model_dir, settings, spark)  # the catalog as embedded last night
    full = embed(DAY, model_dir, settings, spark, full=True)
    full_s = sum(full.seconds.values())
    uri = settings.table_uri(PRODUCTS.name)
    runs = []
    for night in range(nights):
        # The day's changes, written the way ingest writes them (a MERGE by product_id). A uniform
        # sample (hash order, a new one each night), so the changed products have the catalog's mix
        # of photo sizes: the file's first rows are its large Vendure photos.
        changed = (
            delta.read(spark, uri).orderBy(F.xxhash64("product_id", F.lit(night))).limit(max(1, int(count * rate)))
            .withColumn("title", F.concat("title", F.lit(" (new season)")))
            .withColumn("content_hash", F.sha2(F.concat("content_hash", F.lit("x")), 256))
        )
        delta.merge(changed, uri, PRODUCTS)
        nightly = embed(DAY, model_dir, settings, spark)
        nightly_s = sum(nightly.seconds.values())
        runs.append({"changed": nightly.to_embed, "nightly_s": round(nightly_s, 2),
                     "fraction": round(nightly_s / full_s, 4), "seconds": nightly.seconds})
    return {
        "products": count,
        "full_reembed_s": round(full_s, 2),
        "worst_fraction": max(r["fraction"] for r in runs),
        "nights": runs,
    }


def memory(spark, root: str, model_dir: str, sizes: list[int]) -> list[dict]:
    from jobs.embed import embed

    rows = []
    for count in sizes:
        settings = _fresh_settings(root)
        _catalog(spark, settings, count)
        with PeakMemory() as peak:
            summary = embed(DAY, model_dir, settings, spark, full=True)
        rows.append({"products": count, "embedded": summary.embedded, "peak_rss_mib": round(peak.peak_bytes / 2**20)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moonpipe bench pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-preset", default="small", help="model for the throughput comparison")
    parser.add_argument("--products", type=int, default=1000, help="products for the throughput comparison")
    parser.add_argument("--churn-preset", default="small", help="model for the churn and memory runs")
    parser.add_argument("--churn-products", type=int, default=10000)
    parser.add_argument("--churn-rate", type=float, default=0.01)
    parser.add_argument("--churn-nights", type=int, default=3, help="nightly runs in a row after the full one")
    parser.add_argument("--memory-sizes", default="1000,10000")
    parser.add_argument("--only", default="throughput,churn,memory", help="which measurements to run")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from moonpipe.spark_session import get_spark

    spark = get_spark()
    spark.sparkContext.setLogLevel("ERROR")
    threads = spark.sparkContext.defaultParallelism  # the bare model gets the cores the workers share
    root = tempfile.mkdtemp(prefix="moonpipe-bench-")
    results: dict = {}
    wanted = {part.strip() for part in args.only.split(",")}
    if "throughput" in wanted:
        model = _model(root, args.model_preset)
        results["throughput"] = throughput(spark, root, model, args.products, threads)
        print(f"throughput ({args.model_preset}): {json.dumps(results['throughput'])}", flush=True)
    churn_model = _model(root, args.churn_preset)
    if "churn" in wanted:
        results["churn"] = churn(spark, root, churn_model, args.churn_products, args.churn_rate, args.churn_nights)
        print(f"nightly vs full ({args.churn_preset}): {json.dumps(results['churn'])}", flush=True)
    if "memory" in wanted:
        results["memory"] = memory(spark, root, churn_model, [int(s) for s in args.memory_sizes.split(",")])
        print(f"peak memory ({args.churn_preset}): {json.dumps(results['memory'])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
