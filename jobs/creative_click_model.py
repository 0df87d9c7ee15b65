"""The documented click model behind the simulated creative data: the known truth that
CreativePair labels, the scorer's accuracy and the trainer's rewards are measured against.

A user of segment s shown creative c clicks with probability

    CTR(c, s) = sigmoid( BASE_LOGIT + Σ_f BASE_EFFECTS[f][c.f] + Σ_f SEGMENT_EFFECTS[s][f][c.f]
                         + MATCH_BONUS · [c's legible overlay message answers one of s's queries] )

with BASE_LOGIT = logit(3%). Every term is a factor the evaluation protocol names (framing,
background, overlay text, message, layout, brightness), so a model that follows the protocol
can in principle recover every preference. Segments differ: premium shoppers punish clutter and
sales banners, bargain hunters click legible sale offers and mind clutter less, trend seekers like
bright, new-season creatives. docs/creatives.md lists the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from model.creative4u_protocol import FACTORS, message_matches

MODEL_NAME = "creative-click-model-v1"
BASE_CTR = 0.03
BASE_LOGIT = math.log(BASE_CTR / (1 - BASE_CTR))
MATCH_BONUS = 0.9

BASE_EFFECTS: dict[str, dict[str, float]] = {
    "framing": {"tight": 0.25, "medium": 0.0, "wide": -0.45},
    "background": {"clean": 0.3, "cluttered": -0.4},
    "overlay_text": {"none": 0.0, "legible": 0.15, "garbled": -0.7},
    "message": {"sale": 0.0, "new": 0.0, "premium": 0.0},
    "layout": {"centered": 0.1, "offset": -0.1},
    "brightness": {"normal": 0.2, "dark": -0.6, "bright": -0.25},
}


@dataclass(frozen=True)
class Segment:
    """A user segment: its interests (frequent searches, most frequent first) and its tastes."""

    segment_id: str
    name: str
    interest_queries: tuple[str, ...]
    description: str
    effects: Mapping[str, Mapping[str, float]]


SEGMENTS: tuple[Segment, ...] = (
    Segment(
        "seg-bargain",
        "Bargain hunters",
        ("sale sneakers", "cheap laptop", "discount furniture", "best deal bag", "clearance t-shirt"),
        "Price-driven shoppers who search for sales and deals.",
        {"background": {"cluttered": 0.25}, "overlay_text": {"legible": 0.2}},
    ),
    Segment(
        "seg-trend",
        "Trend seekers",
        ("new season dress", "trending sneakers", "latest camera", "new arrivals"),
        "Shoppers who follow what is new and bright.",
        {"brightness": {"bright": 0.45}, "layout": {"offset": 0.2}},
    ),
    Segment(
        "seg-premium",
        "Premium minimalists",
        ("premium leather bag", "designer lamp", "luxury watch", "quality furniture"),
        "Quality-first shoppers who dislike busy images.",
        {"background": {"clean": 0.3, "cluttered": -0.35}, "overlay_text": {"legible": -0.25}, "framing": {"tight": 0.2}},
    ),
    Segment(
        "seg-casual",
        "Casual browsers",
        ("shoes", "laptop", "plant", "t-shirt", "bag"),
        "Broad searches, no strong taste beyond the base preferences.",
        {},
    ),
)


def segment(segment_id: str) -> Segment:
    for candidate in SEGMENTS:
        if candidate.segment_id == segment_id:
            return candidate
    raise KeyError(f"no simulated segment {segment_id!r}; known: {[s.segment_id for s in SEGMENTS]}")


def factor_effects(factors: Mapping[str, str], seg: Segment) -> dict[str, float]:
    """Each factor's contribution to the click logit of a creative for a segment."""
    effects = {}
    for name, levels in FACTORS.items():
        level = factors.get(name)
        if level not in levels:
            raise ValueError(f"creative factor {name}={level!r} is not one of {sorted(levels)}")
        effects[name] = BASE_EFFECTS[name][level] + seg.effects.get(name, {}).get(level, 0.0)
    if message_matches(factors, seg.interest_queries):
        effects["message"] += MATCH_BONUS
    return effects


def click_probability(factors: Mapping[str, str], seg: Segment) -> float:
    logit = BASE_LOGIT + sum(factor_effects(factors, seg).values())
    return 1.0 / (1.0 + math.exp(-logit))


def effect_gap(factors_a: Mapping[str, str], factors_b: Mapping[str, str], seg: Segment) -> dict[str, float]:
    """Per factor, logit(A) - logit(B): what the target reasoning names as decisive."""
    a, b = factor_effects(factors_a, seg), factor_effects(factors_b, seg)
    return {name: a[name] - b[name] for name in a}


def true_order(creatives: Sequence[tuple[str, Mapping[str, str]]], seg: Segment) -> list[str]:
    """Creative ids by true CTR for the segment, best first (ties by id)."""
    return [cid for cid, _ in sorted(creatives, key=lambda c: (-click_probability(c[1], seg), c[0]))]
