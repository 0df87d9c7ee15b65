"""`moonpipe index build | search | list | use`: the FAISS index of the search teams (docs/index.md)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable


def _filters(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--filter {pair!r}: use KEY=VALUE, e.g. --filter color=red")
        out[key.strip()] = value.strip()
    return out


def cmd_build(args: argparse.Namespace) -> dict:
    from jobs.build_index import build_index

    options = {"memory_budget": args.memory_budget, "latency_target_ms": args.latency_target_ms,
               "recall_target": args.recall_target, "queries": args.queries, "retain": args.retain,
               "allow_below_target": args.allow_below_target}
    if args.index:
        options["force_index"] = args.index
    if args.shards:
        options["shards"] = args.shards
    # A dict is the job's run summary: the CLI prints it, Airflow's local mode gets it back.
    return build_index(model_version=args.model_version, **options).as_dict()


def cmd_search(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moonpipe.vector_index.search import IndexSearcher

    if bool(args.product_id) == bool(args.title or args.image):
        print("search by --product-id ID, or by a new product with --title and/or --image (not both)", file=sys.stderr)
        return 2
    try:
        filters = _filters(args.filter)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    searcher = IndexSearcher(version=args.version)
    if args.product_id:
        hits = searcher.by_product_id(args.product_id, args.k, filters=filters)
    else:
        image = Path(args.image).read_bytes() if args.image else None
        hits = searcher.by_product(args.title, image, model_dir=args.model, description=args.description,
                                   category_path=args.category, k=args.k, filters=filters)
    if args.json:
        print(json.dumps([h.as_dict() for h in hits], indent=2))
        return 0
    print(f"index {searcher.loaded.version} (model {searcher.model_version}, {searcher.manifest['index_type']})")
    for hit in hits:
        attrs = ", ".join(f"{k}={v}" for k, v in hit.attributes.items())
        print(f"{hit.rank:3d}  {hit.score:8.4f}  {hit.product_id:24s} {(hit.title or '-')[:60]:60s} {attrs[:60]}")
    if not hits:
        print("no results" + (" match the filters" if filters else ""))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from moonpipe import delta
    from moonpipe.settings import Settings
    from moonpipe.vector_index.store import IndexStore

    settings = Settings.from_env()
    store = IndexStore(settings.index_uri)
    current, on_disk = store.current(), set(store.versions())
    uri = settings.table_uri("index_versions")
    rows = delta.read_arrow(uri).to_pylist() if delta.exists(uri) else []
    print(f"{'':2s}{'index version':44s} {'status':9s} {'type':32s} {'vectors':>9s} {'recall@10':>9s} {'p50 ms':>7s}  model")
    for row in sorted(rows, key=lambda r: r["index_version"])[-args.limit:]:
        mark = "*" if row["index_version"] == current else ("" if row["index_version"] in on_disk else " ")
        recall = f"{row['recall_at_10']:.4f}" if row["recall_at_10"] is not None else "-"
        p50 = f"{row['latency_p50_ms']:.3f}" if row["latency_p50_ms"] is not None else "-"
        print(f"{mark:2s}{row['index_version']:44s} {row['status']:9s} {row['index_type'][:32]:32s} "
              f"{row['vector_count']:9,d} {recall:>9s} {p50:>7s}  {row['model_version']}")
    print(f"CURRENT: {current or '(none)'}  ({settings.index_uri})")
    return 0


def cmd_use(args: argparse.Namespace) -> int:
    from moonpipe.settings import Settings
    from moonpipe.vector_index.store import IndexStore

    store = IndexStore(Settings.from_env().index_uri)
    store.set_current(args.version)  # verifies the version's files first
    print(f"CURRENT -> {args.version}")
    return 0


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    group = add("index", lambda a: a.index_parser.print_help() or 2, "The FAISS vector index: build, search, list, use.")
    group.set_defaults(index_parser=group)
    actions = group.add_subparsers(dest="index_command", metavar="ACTION")

    build = actions.add_parser("build", help="Build, measure and publish the index of one model version.")
    build.set_defaults(handler=cmd_build)
    build.add_argument("--model-version", default=None, help="default: $MOONPIPE_MOON3_MODEL's version")
    build.add_argument("--memory-budget", default="2G", help="index memory when serving, e.g. 2G, 512M (2G)")
    build.add_argument("--latency-target-ms", type=float, default=1.0, help="single-query target (1.0)")
    build.add_argument("--recall-target", type=float, default=0.95, help="recall@10 to tune for (0.95)")
    build.add_argument("--queries", type=int, default=1000, help="held-out queries for tuning and measuring (1000)")
    build.add_argument("--index", default=None, help="a FAISS factory string instead of the rule's choice")
    build.add_argument("--retain", type=int, default=3, help="versions kept on storage (3)")
    build.add_argument("--shards", type=int, default=None, help="build on N Spark tasks and merge (large tables)")
    build.add_argument("--allow-below-target", action="store_true", help="publish even if recall misses the target")

    search = actions.add_parser("search", help="Similar products: by --product-id, or a new product by --title/--image.")
    search.set_defaults(handler=cmd_search)
    search.add_argument("--product-id", help="a product in the index")
    search.add_argument("--title", help="a new product's title (embedded now with MOON3.0)")
    search.add_argument("--image", help="the new product's image file")
    search.add_argument("--description", default=None)
    search.add_argument("--category", default=None, help="category path, e.g. 'Fashion > Dresses'")
    search.add_argument("--model", default=None, help="MOON3.0 checkpoint (default: $MOONPIPE_MOON3_MODEL)")
    search.add_argument("--k", type=int, default=10)
    search.add_argument("--filter", action="append", metavar="KEY=VALUE", help="generated attribute to match (repeatable)")
    search.add_argument("--version", default=None, help="index version (default: CURRENT)")
    search.add_argument("--json", action="store_true", help="print JSON")

    listing = actions.add_parser("list", help="Index builds (from index_versions); * marks CURRENT.")
    listing.set_defaults(handler=cmd_list)
    listing.add_argument("--limit", type=int, default=20)

    use = actions.add_parser("use", help="Point CURRENT at an earlier version (verified first): a rollback.")
    use.set_defaults(handler=cmd_use)
    use.add_argument("version")
