"""Creative4U commands: `moonpipe score-creatives` and the `moonpipe creatives ...` group
(init-model, build-data, report, query, bench). Heavy imports stay inside the handlers."""

from __future__ import annotations

import argparse
import sys
from datetime import date


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date: use YYYY-MM-DD, e.g. 2026-11-01") from None


def cmd_score(args: argparse.Namespace) -> dict:
    from jobs.score_creatives import score_creatives

    summary = score_creatives(
        args.date, model_dir=args.model, full=args.full, decoding=args.decoding, device=args.device
    )
    return summary.as_dict()  # printed by the CLI, and XCom in the DAG


def cmd_init_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from model.creative4u_checkpoint import build_model, read_manifest, save_checkpoint
    from model.creative4u_config import Creative4UConfig
    from moonpipe.settings import Settings

    target = Path(args.out or Settings.from_env().creative_model)
    if target.exists():
        print(f"{target}: already a model ({read_manifest(target)['model_version']}); nothing to do")
        return 0
    config = Creative4UConfig(backbone=args.preset, seed=args.seed, decoding=args.decoding)
    version = save_checkpoint(build_model(config), target)
    print(f"{target}: untrained Creative4U ({args.preset}, seed {args.seed}, {args.decoding} decoding), version {version}")
    return 0


def cmd_build_data(args: argparse.Namespace) -> dict:
    from jobs.creative_data import build_creative_data

    summary = build_creative_data(
        args.date,
        vendure_products=args.vendure,
        fashion_products=args.fashion,
        creatives_per_product=args.per_product,
        mean_impressions=args.impressions,
        seed=args.seed,
    )
    return summary.as_dict()


def cmd_query(args: argparse.Namespace) -> int:
    from jobs.creative_views import query

    table = query(args.sql)
    print(table.to_pandas().to_string(max_rows=args.limit, max_colwidth=args.truncate))
    return 0


def cmd_report(args: argparse.Namespace) -> dict | int:
    import importlib.util

    from jobs.creative_report import MATPLOTLIB_MISSING, build_report, plot_report

    if args.png and importlib.util.find_spec("matplotlib") is None:
        print(f"error: {MATPLOTLIB_MISSING}", file=sys.stderr)
        return 2
    report = build_report(run_date=args.date)
    print(report.text(reasoning_chars=args.reasoning_chars))
    path = None
    if args.png:
        path = plot_report(report, args.png)
        print(f"plot written to {path}")
    # What a DAG's report task hands on through XCom.
    return {
        "run_date": args.date.isoformat() if args.date else None,
        "winner_rows": report.winners.num_rows,
        "scored_rows": report.scores.num_rows,
        "png": str(path) if path else None,
    }


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.creative_scoring import main

    return main(([] if args.part == "all" else ["--only", args.part]) + args.options)


def register(add) -> None:
    score = add(
        "score-creatives",
        cmd_score,
        "Score new and changed creatives with Creative4U into creative_judgments and creative_scores.",
    )
    score.add_argument("--date", type=_date, required=True, help="run date (YYYY-MM-DD)")
    score.add_argument("--model", default=None, help="Creative4U checkpoint (default: $MOONPIPE_CREATIVE_MODEL)")
    score.add_argument("--full", action="store_true", help="re-score every group, changed or not")
    score.add_argument(
        "--decoding", choices=["free", "guided"], default=None,
        help="free: parse the model's own output strictly; guided: enforce the format while decoding "
        "(default: the checkpoint's setting)",
    )
    score.add_argument("--device", default=None, help="cuda:N or cpu (default: the task's GPU, else CPU)")

    group = add("creatives", lambda a: a.creatives_parser.print_help() or 2, "Creative4U data, model and reports.")
    group.set_defaults(creatives_parser=group)
    actions = group.add_subparsers(dest="creatives_command", metavar="ACTION")

    init = actions.add_parser("init-model", help="Save an untrained Creative4U checkpoint to start with.")
    init.add_argument("--preset", default="tiny", help="backbone preset (tiny, small, ...) or a local model directory")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument(
        "--decoding", choices=["free", "guided"], default="guided",
        help="default decoding saved in the checkpoint; an untrained model cannot write the format "
        "by itself, so the bootstrap uses guided (default)",
    )
    init.add_argument("--out", default=None, help="directory (default: $MOONPIPE_CREATIVE_MODEL)")
    init.set_defaults(handler=cmd_init_model)

    build = actions.add_parser(
        "build-data", help="Compose creatives from the sample photos, simulate impressions and clicks for a date."
    )
    build.add_argument("--date", type=_date, required=True, help="date of the simulated events (YYYY-MM-DD)")
    build.add_argument("--vendure", type=int, default=12, help="Vendure products (real photos), default 12")
    build.add_argument("--fashion", type=int, default=12, help="Fashion-MNIST products, default 12")
    build.add_argument("--per-product", type=int, default=6, help="creatives per product, default 6")
    build.add_argument("--impressions", type=int, default=1600, help="mean impressions per creative and segment")
    build.add_argument("--seed", type=int, default=7)
    build.set_defaults(handler=cmd_build_data)

    report = actions.add_parser("report", help="Winners per product and segment, score distributions, bias rates.")
    report.add_argument("--date", type=_date, default=None, help="run date (default: each group's latest run)")
    report.add_argument("--png", default=None, help="also plot the score distributions to this PNG (needs matplotlib)")
    report.add_argument("--reasoning-chars", type=int, default=80, help="reasoning shown per winner (80)")
    report.set_defaults(handler=cmd_report)

    sql = actions.add_parser(
        "query", help="SQL over the creative tables and views without Spark (DataFusion over Delta)."
    )
    sql.add_argument("sql", help='e.g. "SELECT * FROM creative_winners"')
    sql.add_argument("--limit", type=int, default=50, help="rows to show (50)")
    sql.add_argument("--truncate", type=int, default=60, help="truncate cells to this many characters (60)")
    sql.set_defaults(handler=cmd_query)

    bench = actions.add_parser("bench", help="Scheduler agreement vs all pairs (N=4..32) and scoring-job pairs/s.")
    bench.add_argument("part", choices=["all", "scheduler", "job"], help="what to measure")
    bench.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options (`all -h` for them)")
    bench.set_defaults(handler=cmd_bench)
