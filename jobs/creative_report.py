"""`moonpipe creatives report`: winners per product and segment, score distributions, and the
model's undecided and position-bias rates, read through the SQL views without Spark."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pyarrow as pa

from jobs.creative_views import query
from moonpipe.settings import Settings

MATPLOTLIB_MISSING = (
    "--png needs matplotlib, which is not installed in this environment (it is not in requirements.lock). "
    "Install it (`.venv/bin/pip install matplotlib`) or run the report without --png."
)


@dataclass
class CreativeReport:
    run_date: date | None
    winners: pa.Table  # creative_winners rows
    scores: pa.Table  # the scored rows the distributions are drawn from
    undecided: pa.Table  # creative_undecided_rate rows
    position_bias: pa.Table  # creative_position_bias rows

    def text(self, reasoning_chars: int = 80) -> str:
        scope = f"run {self.run_date}" if self.run_date else "latest run per product and segment"
        lines = [f"Creative4U report ({scope})", ""]
        lines.append(f"Winners: {self.winners.num_rows} of {_groups(self.scores)} product x segment groups selected")
        lines.append(f"{'product':18s} {'segment':13s} {'winner':22s} {'strength':>8s} {'win%':>5s} {'conf':>5s}  reasoning")
        for row in self.winners.to_pylist():
            reasoning = " ".join((row["reasoning"] or "").split())[:reasoning_chars]
            confidence = f"{row['confidence']:.2f}" if row["confidence"] is not None else "  -"
            lines.append(
                f"{row['product_id'][:18]:18s} {row['segment_id'][:13]:13s} {row['winner_creative_id'][:22]:22s} "
                f"{row['strength']:8.4f} {100 * row['win_rate']:5.0f} {confidence:>5s}  {reasoning}"
            )
        lines += ["", "Strength distribution per segment (Bradley-Terry log-strength):"]
        for segment, values in sorted(_by_segment(self.scores).items()):
            values.sort()
            mid = values[len(values) // 2]
            lines.append(
                f"  {segment:13s} n={len(values):4d}  min {values[0]:7.3f}  median {mid:7.3f}  max {values[-1]:7.3f}  "
                f"{_sparkline(values)}"
            )
        lines += ["", "Undecided and position bias per run and model version:"]
        bias = {(r["run_date"], r["model_version"]): r for r in self.position_bias.to_pylist()}
        for row in self.undecided.to_pylist():
            b = bias.get((row["run_date"], row["model_version"]))
            rate = f"{b['position_bias_rate']:.1%} of {b['pairs_both_orders']} pairs" if b else "no pair decided both ways"
            lines.append(
                f"  {row['run_date']} {row['model_version']}: {row['comparisons']} comparisons, "
                f"undecided {row['undecided_rate']:.1%}, mean attempts {row['mean_attempts']:.2f}, position-decided {rate}"
            )
        return "\n".join(lines)


def _groups(scores: pa.Table) -> int:
    return len({(r["product_id"], r["segment_id"]) for r in scores.select(["product_id", "segment_id"]).to_pylist()})


def _by_segment(scores: pa.Table) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for row in scores.select(["segment_id", "strength"]).to_pylist():
        out.setdefault(row["segment_id"], []).append(row["strength"])
    return out


def _sparkline(values: list[float], bins: int = 10) -> str:
    low, high = min(values), max(values)
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - low) / (high - low) * bins)) if high > low else 0] += 1
    marks = " .:-=+*#%@"
    top = max(counts)
    return "[" + "".join(marks[min(9, round(9 * c / top))] for c in counts) + "]"


def build_report(run_date: date | None = None, settings: Settings | None = None) -> CreativeReport:
    settings = settings or Settings.from_env()
    where = f"WHERE run_date = DATE '{run_date.isoformat()}'" if run_date else ""
    if run_date:
        winners = query(f"SELECT * FROM creative_winners {where} ORDER BY product_id, segment_id", settings)
        scores = query(f"SELECT * FROM creative_scores {where}", settings)
        if scores.num_rows == 0:
            raise ValueError(f"no creative scores for run {run_date}: run `moonpipe score-creatives --date {run_date}` first")
    else:
        winners = query("SELECT * FROM creative_winners ORDER BY product_id, segment_id", settings)
        scores = query("SELECT * FROM creative_latest_scores", settings)
    undecided = query(f"SELECT * FROM creative_undecided_rate {where} ORDER BY run_date, model_version", settings)
    bias = query(f"SELECT * FROM creative_position_bias {where} ORDER BY run_date, model_version", settings)
    return CreativeReport(run_date, winners, scores, undecided, bias)


def plot_report(report: CreativeReport, path: str | Path) -> Path:
    """Histograms of strength per segment and win rates of the winners, as one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(MATPLOTLIB_MISSING) from None
    segments = _by_segment(report.scores)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for segment, values in sorted(segments.items()):
        left.hist(values, bins=20, alpha=0.5, label=segment)
    left.set_title("Bradley-Terry strength per segment")
    left.set_xlabel("log-strength")
    left.legend()
    right.hist([r["win_rate"] for r in report.winners.to_pylist()], bins=10, range=(0, 1))
    right.set_title("Win rate of the selected creatives")
    right.set_xlabel("win rate")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target
