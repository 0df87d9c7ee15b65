"""Ingest and embed one sample date on a Spark standalone cluster, in a process of its own.

Run by tests/test_spark_standalone.py: the test process already holds the suite's local Spark
session, and a Python process can hold only one. The jobs write to ``MOONPIPE_HOME`` of this
process's environment; what ran where is written as JSON to ``--report``.

    python tests/spark_standalone_job.py --date D --model DIR --report OUT.json --conf k=v ...
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--date", required=True, type=date.fromisoformat)
    parser.add_argument("--model", required=True)
    parser.add_argument("--report", required=True, type=Path)
    parser.add_argument("--conf", action="append", default=[], help="Spark key=value over the standalone profile")
    args = parser.parse_args()
    conf = dict(item.split("=", 1) for item in args.conf)

    from jobs.embed import embed
    from jobs.ingest import ingest
    from moonpipe.settings import Settings
    from moonpipe.spark_session import get_spark

    spark = get_spark(profile="standalone", conf=conf, app_name=conf.get("spark.app.name", "moonpipe-standalone"))
    try:
        spark.sparkContext.setLogLevel("WARN")
        settings = Settings.from_env()
        ingested = ingest(args.date, settings, spark)
        embedded = embed(args.date, args.model, settings, spark)
        sc = spark.sparkContext
        # Block managers of the driver and of every executor, as host:port.
        block_managers = sorted(f"{e.host()}:{e.port()}" for e in sc._jsc.sc().statusTracker().getExecutorInfos())
        report = {
            "master": sc.master,
            "app_id": sc.applicationId,
            "default_parallelism": sc.defaultParallelism,
            "block_managers": block_managers,
            "ingest": ingested.as_dict(),
            "embed": embedded.as_dict(),
        }
    finally:
        spark.stop()
    args.report.write_text(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
