"""Feedback on long work: per-stage timings and row counts in the log.

    with stage("load snapshot", log) as s:
        ...
        s.rows = n          # logged with the timing: "load snapshot: 1,234 rows in 3.2 s"
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

_LOG = logging.getLogger("moonpipe")


def configure_logging(level: int = logging.INFO) -> None:
    """One readable line per event on stderr; idempotent."""
    root = logging.getLogger("moonpipe")
    if not any(getattr(h, "_moonpipe", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._moonpipe = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)


@dataclass
class Stage:
    name: str
    rows: int | None = None
    seconds: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)


@contextmanager
def stage(name: str, log: logging.Logger = _LOG) -> Iterator[Stage]:
    """Time a stage and log its duration and row count (set ``.rows`` inside the block)."""
    record = Stage(name)
    log.info("%s: started", name)
    start = time.perf_counter()
    try:
        yield record
    except BaseException:
        record.seconds = time.perf_counter() - start
        log.error("%s: failed after %.1f s", name, record.seconds)
        raise
    record.seconds = time.perf_counter() - start
    rows = f"{record.rows:,} rows in " if record.rows is not None else ""
    log.info("%s: %s%.1f s", name, rows, record.seconds)

