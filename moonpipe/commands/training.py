"""`moonpipe training-data export`, `moonpipe train moon`, `moonpipe evaluate`, `moonpipe promote`."""

from __future__ import annotations

import argparse
import json


def _print(payload: object) -> None:
    print(json.dumps(payload, indent=2, default=str))


def cmd_training_data(args: argparse.Namespace) -> dict:
    from jobs.training_data import export_training_sets

    summary = export_training_sets(
        args.date, fashion_mnist=not args.no_fashion_mnist, fashion_train_limit=args.fashion_train_limit,
        fashion_test_limit=args.fashion_test_limit, validation_fraction=args.validation_fraction,
        simulate=not args.no_simulate, sessions_per_product=args.sessions_per_product,
        click_noise=args.click_noise, seed=args.seed,
    )
    return summary.as_dict()


KINDS = {"moon": "moon3", "moon3": "moon3", "creative": "creative4u", "creative4u": "creative4u"}


def cmd_train(args: argparse.Namespace) -> dict:
    from training.launch import load_config, train
    from training.run_config import to_dict

    kind = KINDS[args.model]
    config = to_dict(load_config(kind, args.config))
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: use key=value, e.g. --set run.max_steps=200")
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        try:
            target[leaf] = json.loads(value)
        except json.JSONDecodeError:
            target[leaf] = value
    config = load_config(kind, config)
    return train(kind, config, nproc=args.nproc, hostfile=args.hostfile)


def cmd_evaluate(args: argparse.Namespace) -> dict:
    from training.evaluate import evaluate

    options = {"gallery_limit": args.gallery_limit, "query_limit": args.query_limit, "threads": args.threads,
               "reasoning": None if args.reasoning is None else args.reasoning == "on"}
    if KINDS.get(args.kind, args.kind) == "creative4u":
        options = {"limit": args.query_limit, "decoding": args.decoding, "heldout_fraction": args.heldout_fraction}
    report = evaluate(KINDS.get(args.kind, args.kind), args.candidate,
                      baseline=None if args.baseline == "none" else args.baseline, record=not args.no_record,
                      **{k: v for k, v in options.items() if v is not None})
    summary = {k: report[k] for k in ("candidate_version", "baseline_version", "report_uri", "plots")}
    summary["candidate"] = report["candidate"]["metrics"]
    summary["baseline"] = report["baseline"]["metrics"] if report.get("baseline") else None
    summary["reference"] = report.get("reference")
    return summary


def cmd_promote(args: argparse.Namespace) -> dict | int:
    import sys

    from training.promote import PromotionRefused, promote

    try:
        decision = promote(KINDS.get(args.kind, args.kind), args.version, metric=args.metric, margin=args.margin)
    except PromotionRefused as refused:
        print(f"promotion refused: {refused}", file=sys.stderr)
        return 2
    if decision["promoted"] or decision.get("reason") == "already production" or args.allow_refusal:
        return decision
    _print(decision)
    return 3


def register(add) -> None:
    data = add("training-data", lambda a: a.td_parser.print_help() or 2, "Training sets for the models.")
    data.set_defaults(td_parser=data)
    actions = data.add_subparsers(dest="training_data_command", metavar="ACTION")
    export = actions.add_parser("export", help="Export MOON3.0 training sets from the lake (simulating search logs).")
    export.set_defaults(handler=cmd_training_data)
    export.add_argument("--date", required=True, help="run date (YYYY-MM-DD)")
    export.add_argument("--no-fashion-mnist", action="store_true", help="catalog products only")
    export.add_argument("--fashion-train-limit", type=int, default=None, help="cap the 60k train images taken")
    export.add_argument("--fashion-test-limit", type=int, default=None, help="cap the 10k test images taken")
    export.add_argument("--validation-fraction", type=float, default=0.05)
    export.add_argument("--no-simulate", action="store_true", help="use logged interactions only")
    export.add_argument("--sessions-per-product", type=int, default=1)
    export.add_argument("--click-noise", type=float, default=0.1, help="share of clicks on a non-matching product")
    export.add_argument("--seed", type=int, default=0)

    train = add("train", cmd_train, "Train a model with DeepSpeed (one process, --nproc ranks, or a --hostfile).")
    train.add_argument("model", choices=sorted(KINDS), help="moon: MOON3.0; creative: Creative4U")
    train.add_argument("--config", default=None, help="JSON config file (default: the trainer's defaults)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value, e.g. --set run.max_steps=200 --set use_fire=false")
    train.add_argument("--nproc", type=int, default=1, help="ranks on this machine (torchrun; gloo on CPU)")
    train.add_argument("--hostfile", default=None, help="multi-node: a DeepSpeed hostfile (`host slots=N` lines)")

    evaluate = add("evaluate", cmd_evaluate, "Evaluate a candidate checkpoint against production; report + registry.")
    evaluate.add_argument("--kind", default="moon3", help="model kind: moon3 (default) or creative4u")
    evaluate.add_argument("--candidate", required=True, help="candidate checkpoint directory")
    evaluate.add_argument("--baseline", default="production", help="'production' (default), a directory, or 'none'")
    evaluate.add_argument("--gallery-limit", type=int, default=None, help="training products in the kNN gallery (10000)")
    evaluate.add_argument("--query-limit", type=int, default=None, help="held-out products (moon3) or pairs (creative4u) evaluated (all)")
    evaluate.add_argument("--threads", type=int, default=None)
    evaluate.add_argument("--reasoning", choices=("on", "off"), default=None,
                          help="moon3: embed after the model's generated reasoning, or not, for candidate and baseline "
                               "alike (default: each model's own setting, as the embed job runs it)")
    evaluate.add_argument("--decoding", choices=("free", "guided"), default=None,
                          help="creative4u: free (the model's own format) or guided decoding (default: the model's config)")
    evaluate.add_argument("--heldout-fraction", type=float, default=None,
                          help="creative4u: share of products held out, as in training (0.2)")
    evaluate.add_argument("--no-record", action="store_true", help="do not write the model_registry row")

    promote = add("promote", cmd_promote, "Promote a candidate if it beats production by the margin (exit 3 if not, 2 if it cannot decide).")
    promote.add_argument("--kind", default="moon3")
    promote.add_argument("--version", default=None, help="model version (default: the newest candidate)")
    promote.add_argument("--metric", default=None, help="gate metric (moon3: knn_accuracy)")
    promote.add_argument("--margin", type=float, default=0.005, help="absolute improvement required (0.005)")
    promote.add_argument("--allow-refusal", action="store_true",
                         help="exit 0 when the gate refuses (schedulers: a refusal is an outcome, not a failure)")
