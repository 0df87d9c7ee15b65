"""One training rank, as torchrun or the deepspeed launcher start it (see training/launch.py)."""

from __future__ import annotations

import argparse
import faulthandler
import json
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one rank of a moonpipe training run")
    parser.add_argument("--kind", required=True)
    parser.add_argument("--config", required=True, help="the run's config.json")
    parser.add_argument("--home", default=None, help="MOONPIPE_HOME of the launching process")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    # `kill -USR1 <pid>` writes every thread's stack to the log: where a stuck rank waits (the
    # launcher asks for it before stopping a run past its timeout).
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    from moonpipe.progress import configure_logging
    from moonpipe.settings import Settings
    from training.launch import _resolve, load_config, run_dir_for, trainer

    configure_logging()
    settings = Settings.from_env(home=args.home)
    config = load_config(args.kind, args.config)
    run_dir = run_dir_for(args.kind, config.run.run_name, settings)
    summary = _resolve(trainer(args.kind).run)(config, settings, run_dir)
    print(json.dumps({"rank_summary": summary.get("steps")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
