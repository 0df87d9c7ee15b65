"""Which comparisons to run for a group of N creatives, and how to turn judgments into scores.

Scheduler. Judging all N(N-1) ordered pairs costs O(N²) model calls. A sorting algorithm needs
about N·log2 N pairs; each pair is judged in both orders (A/B and B/A) so that a position bias
cancels, which gives at most 2·N·log2 N comparisons:

1. a bottom-up merge sort, run in lock-step: every merge of a level asks for its next pair at
   the same time, so one model batch serves all merges (and all groups of a partition);
2. a refinement round with what the budget leaves: neighbours in the sorted order that were
   never compared directly are compared, since those are the likeliest mistakes.

The schedule is a generator: it yields a list of pairs to judge and receives, for each pair, the
preference for its first creative (a probability, or None when undecided). Many groups are driven
side by side by ``drive`` (the scoring job) or one by one by ``rank_group`` (tests, benchmarks).

Scores. ``aggregate`` fits Bradley–Terry strengths (Hunter's MM algorithm) to the pair
preferences, each the mean over both orders of the model's probability that the creative is
better: a model that always answers "A" gives 0.5 to both, a tie, instead of a false winner. A
weak prior (``prior`` virtual wins and losses against a reference of strength 1) keeps strengths
finite when a creative won or lost everything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Item = Hashable
Pair = tuple[Item, Item]
Schedule = Generator[list[Pair], Mapping[Pair, "float | None"], list[Item]]


def comparison_budget(n: int) -> int:
    """The most ordered comparisons a group of ``n`` may use: 2·n·log2 n (0 for n < 2)."""
    return 0 if n < 2 else int(2 * n * math.log2(n))


def _first_wins(preference: float | None) -> bool:
    # Undecided or exactly even keeps the incoming order: merge sort stays stable on ties.
    return preference is None or preference >= 0.5


def sort_schedule(items: Sequence[Item], refine: bool = True) -> Schedule:
    """Yield rounds of unordered pairs to judge; receive {pair: P(first is better) or None};
    return the items best first."""
    if len(set(items)) != len(items):
        raise ValueError("creatives to rank must be distinct")
    runs: list[list[Item]] = [[item] for item in items]
    compared: set[frozenset] = set()
    preferences: dict[Pair, float] = {}
    while len(runs) > 1:
        merges = [(runs[i], runs[i + 1]) for i in range(0, len(runs) - 1, 2)]
        outputs: list[list[Item]] = [[] for _ in merges]
        cursors = [[0, 0] for _ in merges]
        active = list(range(len(merges)))
        while active:
            requests = [(merges[m][0][cursors[m][0]], merges[m][1][cursors[m][1]]) for m in active]
            outcomes = yield requests
            compared.update(frozenset(pair) for pair in requests)
            preferences.update({pair: outcomes[pair] for pair in requests if outcomes.get(pair) is not None})
            still = []
            for m, pair in zip(active, requests):
                left, right = merges[m]
                side = 0 if _first_wins(outcomes.get(pair)) else 1
                outputs[m].append(pair[side])
                cursors[m][side] += 1
                if cursors[m][0] == len(left):
                    outputs[m].extend(right[cursors[m][1] :])
                elif cursors[m][1] == len(right):
                    outputs[m].extend(left[cursors[m][0] :])
                else:
                    still.append(m)
            active = still
        runs = outputs + ([runs[-1]] if len(runs) % 2 else [])
    order = runs[0] if runs else []
    if refine:
        order = yield from _refine(order, compared, preferences)
    return order


def _refine(order: list[Item], compared: set[frozenset], preferences: dict[Pair, float]) -> Schedule:
    """Spend the budget the sort left on the likeliest mistakes: rank what is known, compare the
    closest neighbours never compared directly, and repeat."""
    room = comparison_budget(len(order)) // 2 - len(compared)
    distance = 1
    while room > 0 and distance < len(order):
        position = {item: i for i, item in enumerate(order)}
        order = consistent_order(order, preferences, bradley_terry(order, preferences), position.get)
        fresh = [
            (order[i], order[i + distance])
            for i in range(len(order) - distance)
            if frozenset((order[i], order[i + distance])) not in compared
        ][:room]
        if not fresh:
            distance += 1
            continue
        outcomes = yield fresh
        compared.update(frozenset(pair) for pair in fresh)
        preferences.update({pair: outcomes[pair] for pair in fresh if outcomes.get(pair) is not None})
        room -= len(fresh)
    position = {item: i for i, item in enumerate(order)}
    return consistent_order(order, preferences, bradley_terry(order, preferences), position.get)


def consistent_order(
    items: Sequence[Item], preferences: Mapping[Pair, float], strengths: Mapping[Item, float], tie_break: Callable[[Item], Any]
) -> list[Item]:
    """Best first, respecting every direct comparison where they agree with each other.

    Bradley–Terry alone can put x above y although y beat x directly (strengths flow through
    different opponents in a sparse design). So: repeatedly take, among the creatives no remaining
    one beat directly, the strongest; within a cycle of contradicting verdicts (a noisy judge),
    the strongest remaining. With a consistent judge this is exactly the true order, since a
    sort compares every pair of neighbours."""
    beaten_by: dict[Item, set[Item]] = {item: set() for item in items}
    for (x, y), p in preferences.items():
        if p > 0.5:
            beaten_by[y].add(x)
        elif p < 0.5:
            beaten_by[x].add(y)
    remaining, order = set(items), []
    while remaining:
        free = [item for item in remaining if not beaten_by[item] & remaining]
        best = min(free or remaining, key=lambda item: (-round(strengths[item], 9), tie_break(item)))
        order.append(best)
        remaining.remove(best)
    return order


@dataclass
class GroupRun:
    """One group's schedule being driven: its pending pairs and every preference received."""

    key: Hashable
    schedule: Schedule
    pending: list[Pair]
    preferences: dict[Pair, float | None]
    order: list[Item] | None = None

    @classmethod
    def start(cls, key: Hashable, items: Sequence[Item], refine: bool = True) -> "GroupRun":
        run = cls(key, sort_schedule(items, refine), [], {})
        run._advance(None)
        return run

    def _advance(self, outcomes: Mapping[Pair, float | None] | None) -> None:
        try:
            self.pending = self.schedule.send(outcomes) if outcomes is not None else next(self.schedule)
        except StopIteration as finished:
            self.pending, self.order = [], finished.value

    def receive(self, outcomes: Mapping[Pair, float | None]) -> None:
        self.preferences.update({pair: outcomes.get(pair) for pair in self.pending})
        self._advance(outcomes)


def drive(
    groups: Iterable[tuple[Hashable, Sequence[Item]]],
    judge: Callable[[list[tuple[Hashable, Pair]]], Mapping[tuple[Hashable, Pair], float | None]],
    refine: bool = True,
) -> list[GroupRun]:
    """Run every group's schedule in lock-step: each round, all pending pairs of all groups go to
    ``judge`` together (one model batch), which returns P(first better) per (group key, pair)."""
    runs = [GroupRun.start(key, items, refine) for key, items in groups]
    while True:
        requests = [(run.key, pair) for run in runs for pair in run.pending]
        if not requests:
            return runs
        outcomes = judge(requests)
        for run in runs:
            if run.pending:
                run.receive({pair: outcomes.get((run.key, pair)) for pair in run.pending})


def rank_group(items: Sequence[Item], prefer: Callable[[Item, Item], float | None], refine: bool = True) -> GroupRun:
    """One group, judged by ``prefer(x, y)`` = P(x better than y) or None."""
    [run] = drive([("group", items)], lambda reqs: {(k, p): prefer(*p) for k, p in reqs}, refine)
    return run


# -- aggregation -------------------------------------------------------------------------------


def pair_preference(prob_first_shown_first: float | None, prob_first_shown_second: float | None) -> float | None:
    """P(x better than y) from the two orders: ``prob_first_shown_first`` = P(A) when x was A,
    ``prob_first_shown_second`` = P(A) when y was A. Undecided orders are left out; None if both are."""
    values = []
    if prob_first_shown_first is not None:
        values.append(prob_first_shown_first)
    if prob_first_shown_second is not None:
        values.append(1.0 - prob_first_shown_second)
    return sum(values) / len(values) if values else None


def bradley_terry(
    items: Sequence[Item], preferences: Mapping[Pair, float], prior: float = 0.5, iterations: int = 1000
) -> dict[Item, float]:
    """Log-strengths (mean 0) from soft pair outcomes {(x, y): P(x beats y)} by Hunter's MM
    algorithm, with ``prior`` virtual wins and losses of each item against a reference of strength 1."""
    index = {item: i for i, item in enumerate(items)}
    n = len(items)
    wins = [prior] * n
    games: list[dict[int, float]] = [{} for _ in range(n)]
    for (x, y), p in preferences.items():
        i, j = index[x], index[y]
        wins[i] += p
        wins[j] += 1.0 - p
        games[i][j] = games[i].get(j, 0.0) + 1.0
        games[j][i] = games[j].get(i, 0.0) + 1.0
    gamma = [1.0] * n
    for _ in range(iterations):
        updated = []
        for i in range(n):
            denominator = 2 * prior / (gamma[i] + 1.0) + sum(g / (gamma[i] + gamma[j]) for j, g in games[i].items())
            updated.append(wins[i] / denominator)
        change = max(abs(math.log(a) - math.log(b)) for a, b in zip(updated, gamma)) if n else 0.0
        gamma = updated
        if change < 1e-10:
            break
    logs = [math.log(g) for g in gamma]
    mean = sum(logs) / n if n else 0.0
    return {item: logs[index[item]] - mean for item in items}


@dataclass(frozen=True)
class JudgedComparison:
    """One ordered comparison as the scores need it."""

    creative_a: Item
    creative_b: Item
    answer: str | None  # "A", "B" or None (undecided)
    prob_a: float | None  # P(A) among {A, B}; None when undecided


@dataclass(frozen=True)
class CreativeScore:
    creative_id: Item
    strength: float
    win_rate: float
    comparisons: int
    undecided: int
    rank: int
    is_selected: bool


def aggregate(items: Sequence[Item], judgments: Iterable[JudgedComparison], prior: float = 0.5) -> list[CreativeScore]:
    """Scores of a group, best first: Bradley–Terry strength over the order-averaged pair
    preferences, win rate over decided comparisons, rank from ``consistent_order`` (ties broken by
    win rate, then id). The rank-1 creative is selected only when it beat every creative it was
    compared with (or is alone): an all-undecided or all-tied group selects nothing rather than guess."""
    items = list(items)
    by_order: dict[Pair, list[float]] = {}  # P(A) of each decided judgment, per ordered pair
    comparisons = {item: 0 for item in items}
    undecided = {item: 0 for item in items}
    wins = {item: 0 for item in items}
    for j in judgments:
        for item in (j.creative_a, j.creative_b):
            if item not in comparisons:
                raise ValueError(f"judgment names creative {item!r}, which is not in the group {items}")
            comparisons[item] += 1
        if j.answer is None:
            undecided[j.creative_a] += 1
            undecided[j.creative_b] += 1
            by_order.setdefault((j.creative_a, j.creative_b), [])
            continue
        wins[j.creative_a if j.answer == "A" else j.creative_b] += 1
        by_order.setdefault((j.creative_a, j.creative_b), []).append(
            j.prob_a if j.prob_a is not None else float(j.answer == "A")
        )
    mean = {pair: sum(v) / len(v) for pair, v in by_order.items() if v}
    preferences: dict[Pair, float] = {}
    for x, y in {tuple(sorted((a, b), key=str)) for a, b in by_order}:
        p = pair_preference(mean.get((x, y)), mean.get((y, x)))
        if p is not None:
            preferences[(x, y)] = p
    strengths = bradley_terry(items, preferences, prior)
    win_rate = {
        item: wins[item] / (comparisons[item] - undecided[item]) if comparisons[item] > undecided[item] else 0.0
        for item in items
    }
    ordered = consistent_order(items, preferences, strengths, lambda item: (-win_rate[item], str(item)))
    best = ordered[0] if ordered else None
    beats: dict[Item, int] = {item: 0 for item in items}
    losses: dict[Item, int] = {item: 0 for item in items}
    for (x, y), p in preferences.items():
        if p != 0.5:
            winner, loser = (x, y) if p > 0.5 else (y, x)
            beats[winner] += 1
            losses[loser] += 1
    # Selected: alone, or rank 1 having beaten every creative it met and at least one.
    clear = len(ordered) == 1 or (best is not None and beats[best] > 0 and losses[best] == 0)
    return [
        CreativeScore(item, strengths[item], win_rate[item], comparisons[item], undecided[item], rank, rank == 1 and clear)
        for rank, item in enumerate(ordered, start=1)
    ]
