"""The sharded build, for collections larger than one machine's memory: the driver trains the index
on a sample; every Spark task adds its partition's vectors to a copy of the trained (empty) index
and writes that sub-index to shared storage; the driver merges the sub-indices in partition order,
shifting each one's ids by the vectors before it (autofaiss' and clip-retrieval's distributed
scheme). The exact top-k of the held-out queries is computed per partition on the executors and
merged on the driver, so recall is still measured against exact search.

Only indices whose parts can be merged qualify: Flat, IVF (fast-scan PQ included) and their
refined variants. HNSW graphs cannot be merged; the build refuses them with that reason.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moonpipe import delta, storage
from moonpipe.progress import stage
from moonpipe.vector_index.build import (
    BuildOptions,
    BuiltIndex,
    ExactTopK,
    ShardBuilder,
    finish,
    split_queries,
    train_index,
)
from moonpipe.vector_index.choice import choose_index
from moonpipe.vector_index.sources import DeltaEmbeddings, RejectedRow, split_valid

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

LOG = logging.getLogger("moonpipe.vector_index.sharded")
SHARD_RECORD = pa.schema([
    ("partition", pa.int32()),
    ("vectors", pa.int64()),
    ("index_path", pa.string()),
    ("id_map_path", pa.string()),
    ("exact_scores", pa.list_(pa.float32())),
    ("exact_ids", pa.list_(pa.int64())),
    ("rejected", pa.string()),  # JSON list of rejected rows
])


def merge_into(target: faiss.Index, shard: faiss.Index, id_offset: int) -> None:
    """Append ``shard``'s vectors to ``target``, its ids shifted by ``id_offset`` (= target.ntotal)."""
    target, shard = faiss.downcast_index(target), faiss.downcast_index(shard)
    if isinstance(target, faiss.IndexRefine):
        merge_into(target.base_index, faiss.downcast_index(shard.base_index), id_offset)
        merge_into(target.refine_index, faiss.downcast_index(shard.refine_index), id_offset)
        target.ntotal = faiss.downcast_index(target.base_index).ntotal
    elif isinstance(target, faiss.IndexIVF):
        target.merge_from(shard, id_offset)
    elif isinstance(target, faiss.IndexFlatCodes):
        target.merge_from(shard, 0)  # positional ids: appending is the shift
    else:
        raise ValueError(f"{type(target).__name__} sub-indices cannot be merged: build it without --shards")


def _shard_task(batches: Iterator[pa.RecordBatch], trained: bytes, queries: np.ndarray, k: int, dimension: int,
                staging_uri: str, threads: int) -> Iterator[pa.RecordBatch]:
    from pyspark import TaskContext

    faiss.omp_set_num_threads(threads)
    partition = TaskContext.get().partitionId()
    builder = ShardBuilder(faiss.deserialize_index(np.frombuffer(trained, np.uint8)), queries, k)
    for batch in batches:
        if batch.num_rows:
            builder.add(*split_valid(batch, dimension))
    filesystem, root = storage.resolve(staging_uri)
    name = f"shard-{partition:05d}-{uuid.uuid4().hex[:8]}"
    index_path, id_map_path = f"{root}/{name}.faiss", f"{root}/{name}.parquet"
    with filesystem.open_output_stream(index_path) as out:
        out.write(faiss.serialize_index(builder.index).tobytes())
    pq.write_table(builder.id_map(), id_map_path, filesystem=filesystem)
    rejected = [{"product_id": r.product_id, "reason_code": r.reason_code, "reason": r.reason,
                 "snapshot_date": r.snapshot_date.isoformat() if r.snapshot_date else None} for r in builder.rejected]
    yield pa.RecordBatch.from_pylist([{
        "partition": partition, "vectors": int(builder.index.ntotal), "index_path": index_path,
        "id_map_path": id_map_path, "exact_scores": builder.exact.scores.ravel().tolist(),
        "exact_ids": builder.exact.ids.ravel().tolist(), "rejected": json.dumps(rejected),
    }], schema=SHARD_RECORD)


def build_sharded(spark: SparkSession, source: DeltaEmbeddings, options: BuildOptions, shards: int,
                  staging_uri: str) -> BuiltIndex:
    """Build over ``source`` with ``shards`` Spark tasks adding vectors; sub-indices pass through
    ``staging_uri`` (shared storage the executors and the driver both reach)."""
    from datetime import date
    from functools import partial

    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    seconds: dict[str, float] = {}
    choice = choose_index(source.row_count, source.dimension, options.memory_budget, options.latency_target_ms,
                          hnsw_max_vectors=options.hnsw_max_vectors, force=options.force_index)
    if not choice.shardable:
        raise ValueError(f"{choice.factory} cannot be built in shards (graphs do not merge): pass --index "
                         "with an IVF or Flat factory string, or build without --shards")
    frame = (delta.read(spark, source.table_uri, version=source.table_version)
             .where(F.col("model_version") == source.model_version)
             .select(*DeltaEmbeddings.COLUMNS))
    clock = time.perf_counter()
    with stage("index (sharded): sample queries and training vectors", LOG) as record:
        wanted = options.queries + choice.train_size
        fraction = min(1.0, 1.05 * wanted / source.row_count + 1e-9)
        sampled = frame.sample(fraction=fraction, seed=options.seed).toArrow()
        good, _ = split_valid(sampled, source.dimension)  # rejected rows are counted by the shard tasks
        sample = good.vectors[np.random.default_rng(options.seed).permutation(len(good))]
        queries, training = split_queries(sample, options, choice)
        record.rows = len(sample)
    seconds["sample"] = round(time.perf_counter() - clock, 3)
    clock = time.perf_counter()
    with stage(f"index (sharded): train {choice.factory}", LOG):
        trained = train_index(choice, training)
    seconds["train"] = round(time.perf_counter() - clock, 3)

    staging = f"{staging_uri.rstrip('/')}/_shards-{uuid.uuid4().hex[:8]}"
    filesystem, root = storage.resolve(staging)
    filesystem.create_dir(root, recursive=True)
    clock = time.perf_counter()
    try:
        with stage(f"index (sharded): add vectors on {shards} Spark tasks", LOG) as record:
            task = partial(_shard_task, trained=faiss.serialize_index(trained).tobytes(), queries=queries,
                           k=options.k, dimension=source.dimension, staging_uri=staging,
                           threads=int(spark.conf.get("spark.task.cpus", "1")))
            rows = (frame.repartition(shards).mapInArrow(task, from_arrow_schema(SHARD_RECORD))
                    .toArrow().to_pylist())
            rows.sort(key=lambda r: r["partition"])
            record.rows = sum(r["vectors"] for r in rows)
        seconds["add"] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()
        with stage(f"index (sharded): merge {len(rows)} sub-indices", LOG) as record:
            # A deserialised copy: shards come back as the types FAISS reads (IndexFlatIP, not the
            # factory's IndexFlat), and merging checks that both sides have the same type.
            merged = faiss.deserialize_index(faiss.serialize_index(trained))
            exact, id_maps, rejected = ExactTopK(queries, options.k), [], []
            for row in rows:
                offset = int(merged.ntotal)
                with filesystem.open_input_stream(row["index_path"]) as handle:
                    shard = faiss.deserialize_index(np.frombuffer(handle.read(), np.uint8))
                merge_into(merged, shard, offset)
                shape = (len(queries), options.k)
                ids = np.asarray(row["exact_ids"], np.int64).reshape(shape)
                exact.merge(np.asarray(row["exact_scores"], np.float32).reshape(shape), np.where(ids >= 0, ids + offset, -1))
                id_map = pq.read_table(row["id_map_path"], filesystem=filesystem)
                id_maps.append(id_map.set_column(0, "faiss_id", pa.array(id_map.column("faiss_id").to_numpy() + offset)))
                rejected += [RejectedRow(r["product_id"], r["reason_code"], r["reason"],
                                         date.fromisoformat(r["snapshot_date"]) if r["snapshot_date"] else None)
                             for r in json.loads(row["rejected"])]
            record.rows = int(merged.ntotal)
        seconds["merge"] = round(time.perf_counter() - clock, 3)
    finally:
        filesystem.delete_dir_contents(root, missing_dir_ok=True)
        filesystem.delete_dir(root)
    if merged.ntotal == 0:
        raise ValueError(f"{source.description}: every row was rejected ({len(rejected)}), nothing to index")
    id_map = pa.concat_tables(id_maps, promote_options="default")
    return finish(merged, id_map, exact.ids, queries, choice, options, rejected, seconds)
