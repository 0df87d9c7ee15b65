"""Compose ad creatives from real product photos, factor by factor (PIL only, deterministic).

No reachable registry ships labelled ad creatives, so the pipeline builds its own: each
creative puts a real product photo (Vendure's photos, Fashion-MNIST's images) on a canvas with
the factors the evaluation protocol names, drawn so that a vision model can see them:

    framing       tight (the product fills the frame) | medium | wide (small in the frame)
    background    clean (a flat light colour) | cluttered (many random shapes)
    overlay_text  none | legible (a high-contrast banner) | garbled (jumbled low-contrast glyphs)
    message       sale | new | premium: what the banner says (its words when garbled)
    layout        centered | offset (product to the left, text on the right)
    brightness    normal | dark | bright (washed out)

The same inputs always give the same JPEG bytes (seeded drawing, fixed encoder settings).
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Mapping

from model.creative4u_protocol import FACTORS

CANVAS = 160
MESSAGES = {"sale": "SALE -30%", "new": "NEW SEASON", "premium": "PREMIUM QUALITY"}
_SCALE = {"tight": 0.95, "medium": 0.7, "wide": 0.42}
_CLEAN_COLOURS = ((245, 245, 240), (236, 242, 248), (248, 240, 236), (240, 248, 240))


def _rng(*keys: object) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(":".join(map(str, keys)).encode()).digest()[:8], "big"))


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def compose_creative(photo, factors: Mapping[str, str], seed: str):
    """The creative as a PIL image: ``photo`` (a PIL image) composed with ``factors``."""
    from PIL import Image, ImageDraw, ImageEnhance, ImageOps

    for name, levels in FACTORS.items():
        if factors.get(name) not in levels:
            raise ValueError(f"factor {name}={factors.get(name)!r} is not one of {sorted(levels)}")
    rng = _rng("creative", seed)
    offset = factors["layout"] == "offset"
    canvas = Image.new("RGB", (CANVAS, CANVAS), _CLEAN_COLOURS[rng.randrange(len(_CLEAN_COLOURS))])
    draw = ImageDraw.Draw(canvas)
    if factors["background"] == "cluttered":
        for _ in range(40):
            colour = tuple(rng.randrange(40, 256) for _ in range(3))
            x0, y0 = rng.randrange(CANVAS), rng.randrange(CANVAS)
            x1, y1 = x0 + rng.randrange(8, 50), y0 + rng.randrange(8, 50)
            shape = rng.randrange(3)
            if shape == 0:
                draw.rectangle((x0, y0, x1, y1), fill=colour)
            elif shape == 1:
                draw.ellipse((x0, y0, x1, y1), fill=colour)
            else:
                draw.line((x0, y0, x1, y1), fill=colour, width=rng.randrange(2, 6))
    side = int(CANVAS * _SCALE[factors["framing"]] * (0.8 if offset else 1.0))
    subject = ImageOps.fit(photo.convert("RGB"), (side, side), method=Image.Resampling.BICUBIC)
    x = 4 if offset else (CANVAS - side) // 2
    canvas.paste(subject, (x, (CANVAS - side) // 2))

    text = MESSAGES[factors["message"]]
    if factors["overlay_text"] == "legible":
        font = _font(15)
        if offset:  # words stacked in the right-hand column
            words = text.split()
            top = CANVAS // 2 - 12 * len(words)
            draw.rectangle((x + side + 2, top - 4, CANVAS - 2, top + 24 * len(words)), fill=(20, 20, 20))
            for i, word in enumerate(words):
                draw.text((x + side + 6, top + 24 * i), word, fill=(255, 255, 255), font=font)
        else:
            draw.rectangle((0, CANVAS - 30, CANVAS, CANVAS), fill=(20, 20, 20))
            draw.text((8, CANVAS - 25), text, fill=(255, 255, 255), font=font)
    elif factors["overlay_text"] == "garbled":
        letters = list(text.replace(" ", ""))
        for _ in range(3):
            rng.shuffle(letters)
            for i, letter in enumerate(letters):
                colour = tuple(min(255, 150 + rng.randrange(60)) for _ in range(3))
                position = (rng.randrange(CANVAS - 12), CANVAS - 40 + rng.randrange(30) if not offset else rng.randrange(CANVAS))
                draw.text(position, letter, fill=colour, font=_font(rng.randrange(7, 14)))
    if factors["brightness"] == "dark":
        canvas = ImageEnhance.Brightness(canvas).enhance(0.4)
    elif factors["brightness"] == "bright":
        canvas = ImageEnhance.Brightness(canvas).enhance(1.8)
    return canvas


def encode_jpeg(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90, optimize=False)
    return out.getvalue()


def draw_factor_sets(count: int, seed: str) -> list[dict[str, str]]:
    """``count`` distinct factor combinations, drawn deterministically from ``seed``."""
    total = 1
    for levels in FACTORS.values():
        total *= len(levels)
    if not 1 <= count <= total:
        raise ValueError(f"creatives per product must be between 1 and {total}, got {count}")
    rng = _rng("factors", seed)
    chosen: list[dict[str, str]] = []
    seen: set[tuple] = set()
    while len(chosen) < count:
        factors = {name: rng.choice(sorted(levels)) for name, levels in FACTORS.items()}
        key = tuple(factors.values())
        if key not in seen:
            seen.add(key)
            chosen.append(factors)
    return chosen
