"""`moonpipe`: the command line for data engineers (and the entry point that Airflow calls).

Only argparse is imported at module level so that `moonpipe --help` answers at once; each
command imports what it needs (Spark, Delta, torch) when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from collections.abc import Callable, Sequence
from datetime import date

DEFAULT_SAMPLE_START = date(2026, 11, 1)


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date: use YYYY-MM-DD, e.g. 2026-11-01") from None


def _print_json(payload: object) -> None:
    print(json.dumps(payload, indent=2, default=str))


# -- commands -----------------------------------------------------------------------------------


def cmd_snapshots_build(args: argparse.Namespace) -> int:
    from jobs.sample_catalog import build_sample_snapshots
    from moonpipe.settings import Settings

    settings = Settings.from_env()
    infos = build_sample_snapshots(
        out_uri=settings.snapshots_uri,
        raw_data_dir=settings.raw_data_dir,
        start_date=args.start,
        days=args.days,
        fashion_items=args.fashion_items,
        seed=args.seed,
    )
    for info in infos:
        state = "reused" if info.reused else "built"
        print(
            f"{info.date}  {info.rows:6,d} products  +{info.added} ~{info.changed} -{info.deleted}  "
            f"{state}  {info.uri}"
        )
    return 0


def cmd_load_snapshot(args: argparse.Namespace) -> dict:
    from jobs.load_snapshot import load_snapshot

    return load_snapshot(args.date).as_dict()


def cmd_ingest(args: argparse.Namespace) -> dict:
    from jobs.ingest import ingest

    return ingest(args.date, source_uri=args.source, allow_older=args.allow_older).as_dict()


def cmd_embed(args: argparse.Namespace) -> dict:
    from jobs.embed import embed
    from moonpipe.settings import Settings

    model_dir = args.model or Settings.from_env().moon3_model
    summary = embed(args.date, model_dir, full=args.full, reasoning=args.reasoning or None, device=args.device)
    return summary.as_dict()


def cmd_model_init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from model.moon3_checkpoint import build_model, read_manifest, save_checkpoint
    from model.moon3_config import Moon3Config
    from moonpipe.settings import Settings

    target = Path(args.out or Settings.from_env().moon3_model)
    if target.exists():
        print(f"{target}: already a model ({read_manifest(target)['model_version']}); nothing to do")
        return 0
    version = save_checkpoint(build_model(Moon3Config(backbone=args.preset, seed=args.seed)), target)
    print(f"{target}: untrained MOON3.0 ({args.preset}, seed {args.seed}), version {version}")
    return 0


def cmd_tables(args: argparse.Namespace) -> int:
    from moonpipe import delta
    from moonpipe.settings import Settings
    from schemas import TABLES

    settings = Settings.from_env()
    print(f"{'table':22s} {'version':>7s} {'files':>6s} {'rows':>9s}  location")
    for name, contract in TABLES.items():
        if not contract.is_delta_table:
            continue
        uri = settings.table_uri(name)
        try:
            actions = delta.file_actions(uri)
        except FileNotFoundError:
            print(f"{name:22s} {'-':>7s} {'-':>6s} {'-':>9s}  (not created yet)")
            continue
        rows = sum(v or 0 for v in actions.column("num_records").to_pylist())
        print(f"{name:22s} {delta.version(uri):7d} {actions.num_rows:6d} {rows:9,d}  {uri}")
    return 0


def cmd_table_history(args: argparse.Namespace) -> int:
    from moonpipe import delta
    from moonpipe.settings import Settings

    for commit in delta.history(Settings.from_env().table_uri(args.table), args.limit):
        metrics = commit.get("operationMetrics", {})
        print(f"v{commit.get('version')}  {commit.get('operation'):24s} {json.dumps(metrics)[:140]}")
    return 0


def cmd_table_compact(args: argparse.Namespace) -> int:
    from moonpipe import delta
    from moonpipe.settings import Settings
    from schemas import TABLES

    _print_json(delta.compact(Settings.from_env().table_uri(args.table), TABLES.get(args.table)))
    return 0


def cmd_table_vacuum(args: argparse.Namespace) -> int:
    from moonpipe import delta
    from moonpipe.settings import Settings

    removed = delta.vacuum(
        Settings.from_env().table_uri(args.table), retention_hours=args.retention_hours, dry_run=args.dry_run
    )
    print(f"{'would remove' if args.dry_run else 'removed'} {len(removed)} file(s)")
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from moonpipe import delta
    from moonpipe.settings import Settings
    from moonpipe.spark_session import get_spark
    from schemas import TABLES

    settings = Settings.from_env()
    spark = get_spark()
    lake = {name: settings.table_uri(name) for name, contract in TABLES.items() if contract.is_delta_table}
    registered = delta.register_views(spark, lake)
    print(f"tables: {', '.join(registered) or '(none yet)'}", file=sys.stderr)
    spark.sql(args.query).show(args.limit, truncate=args.truncate)
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from schemas import TABLES, tables_markdown

    if args.markdown:
        sys.stdout.write(tables_markdown())
        return 0
    for name, contract in TABLES.items():
        key = f" key=({', '.join(contract.key)})" if contract.key else ""
        parts = f" partitioned by ({', '.join(contract.partition_by)})" if contract.partition_by else ""
        print(f"{name}: {len(contract.columns)} columns{key}{parts}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "moon3":
        from benchmarks.moon3_predictor import main as bench_moon3

        return bench_moon3(args.options)
    from benchmarks.catalog_pipeline import main as bench_pipeline

    return bench_pipeline(args.options)


def cmd_demo(args: argparse.Namespace) -> int:
    from jobs.demo import run_demo

    run_demo(days=args.days, fashion_items=args.fashion_items)
    return 0


# -- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moonpipe",
        description="Offline product-understanding pipeline: catalog snapshots -> validated products -> "
        "MOON3.0 embeddings and FAISS index; Creative4U creative scores; retraining, evaluation, promotion.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--summary-out",
        metavar="PATH",
        help="also write the job's run summary (JSON) here: how a cluster-mode Airflow task gets it back",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    demo = add(
        "demo", cmd_demo, "Run the DAGs end to end on the embedded default (Airflow with SQLite, local Spark and "
        "Delta, sample data)."
    )
    demo.add_argument("--days", type=int, default=2, help="consecutive sample dates through catalog_nightly (2)")
    demo.add_argument("--fashion-items", type=int, default=300, help="Fashion-MNIST products per snapshot")

    snapshots = add("snapshots", lambda a: a.snapshots_parser.print_help() or 2, "Sample catalog snapshots.")
    snapshots.set_defaults(snapshots_parser=snapshots)
    snapshot_commands = snapshots.add_subparsers(dest="snapshots_command", metavar="ACTION")
    build = snapshot_commands.add_parser(
        "build", help="Build dated snapshots with churn from the real sample data (Vendure + Fashion-MNIST)."
    )
    build.set_defaults(handler=cmd_snapshots_build)
    build.add_argument("--start", type=_date, default=DEFAULT_SAMPLE_START, help="first date (YYYY-MM-DD)")
    build.add_argument("--days", type=int, default=3, help="number of consecutive days")
    build.add_argument("--fashion-items", type=int, default=300, help="Fashion-MNIST products on day 1")
    build.add_argument("--seed", type=int, default=7, help="churn seed (same seed, same snapshots)")

    load = add("load-snapshot", cmd_load_snapshot, "Load one day's snapshot into the catalog_snapshots table.")
    load.add_argument("--date", type=_date, required=True, help="snapshot date (YYYY-MM-DD)")

    ingest = add("ingest", cmd_ingest, "Validate a day's snapshot (Great Expectations) into products + quarantine.")
    ingest.add_argument("--date", type=_date, required=True, help="snapshot date (YYYY-MM-DD)")
    ingest.add_argument("--source", default=None, help="snapshot folder/URI (default: $MOONPIPE_SNAPSHOTS_URI/dt=DATE)")
    ingest.add_argument("--allow-older", action="store_true", help="ingest a date older than the newest ingested")

    embed = add("embed", cmd_embed, "Embed new and changed products with MOON3.0 into product_embeddings.")
    embed.add_argument("--date", type=_date, required=True, help="snapshot date the products come from")
    embed.add_argument("--model", default=None, help="MOON3.0 checkpoint directory (default: $MOONPIPE_MOON3_MODEL)")
    embed.add_argument("--full", action="store_true", help="re-embed every live product")
    embed.add_argument("--reasoning", action="store_true", help="generate attribute reasoning (slower)")
    embed.add_argument("--device", default=None, help="cuda:N or cpu (default: the task's GPU, else CPU)")

    model = add("model", lambda a: a.model_parser.print_help() or 2, "Model checkpoints.")
    model.set_defaults(model_parser=model)
    model_commands = model.add_subparsers(dest="model_command", metavar="ACTION")
    init = model_commands.add_parser("init", help="Save an untrained MOON3.0 checkpoint to start the pipeline with.")
    init.add_argument("--preset", default="tiny", help="backbone preset (tiny, small, ...)")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--out", default=None, help="directory (default: $MOONPIPE_MOON3_MODEL)")
    init.set_defaults(handler=cmd_model_init)

    add("tables", cmd_tables, "List the lake's Delta tables with version, files and rows.")
    table = add("table", lambda a: a.table_parser.print_help() or 2, "Maintain one Delta table.")
    table.set_defaults(table_parser=table)
    table_commands = table.add_subparsers(dest="table_command", metavar="ACTION")
    history = table_commands.add_parser("history", help="Commits, newest first.")
    history.add_argument("table")
    history.add_argument("--limit", type=int, default=20)
    history.set_defaults(handler=cmd_table_history)
    compact = table_commands.add_parser("compact", help="Rewrite small files into larger ones.")
    compact.add_argument("table")
    compact.set_defaults(handler=cmd_table_compact)
    vacuum = table_commands.add_parser("vacuum", help="Delete files unreferenced for longer than the retention.")
    vacuum.add_argument("table")
    vacuum.add_argument("--retention-hours", type=int, default=168, help="keep time travel this far back (168)")
    vacuum.add_argument("--dry-run", action="store_true", help="list, do not delete")
    vacuum.set_defaults(handler=cmd_table_vacuum)

    sql = add("sql", cmd_sql, "Run a Spark SQL query over the lake's tables (each table is a view by its name).")
    sql.add_argument("query", help="e.g. \"SELECT snapshot_date, count(*) FROM catalog_snapshots GROUP BY 1\"")
    sql.add_argument("--limit", type=int, default=20, help="rows to show (20)")
    sql.add_argument("--truncate", type=int, default=40, help="truncate cells to this many characters (40)")

    bench = add("bench", cmd_bench, "Benchmarks, measured side by side in one run (`moonpipe bench moon3 -h`).")
    bench.add_argument(
        "what", choices=["moon3", "pipeline"], help="moon3: the batch predictor; pipeline: Spark embedding vs bare model"
    )
    bench.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options")

    schemas = add("schemas", cmd_schemas, "Show every table's contract.")
    schemas.add_argument("--markdown", action="store_true", help="print docs/tables.md")

    import moonpipe.commands

    for module_info in sorted(pkgutil.iter_modules(moonpipe.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"moonpipe.commands.{module_info.name}").register(add)
    return parser


def run_command(argv: Sequence[str]) -> dict | None:
    """Run one command in this process; return the run summary of a job command (None for others).

    Airflow's local mode calls this with the same argument list that cluster mode hands to
    spark-submit, so both modes run one code path."""
    args = build_parser().parse_args(argv)
    from moonpipe.progress import configure_logging

    configure_logging(10 if args.verbose else 20)
    result = args.handler(args)
    if not isinstance(result, dict):
        if result:
            raise SystemExit(int(result))
        return None
    _print_json(result)
    if args.summary_out:
        from pathlib import Path

        out = Path(args.summary_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
        tmp.replace(out)
    return json.loads(json.dumps(result, default=str))  # JSON-able, as XCom stores it


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run_command(sys.argv[1:] if argv is None else argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
