"""PNG plots for evaluation reports, drawn with Pillow (no plotting library in the locked set).

``grouped_bars``: one group per metric, one bar per model (candidate vs production), values in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))


def grouped_bars(path: str | Path, title: str, series: dict[str, dict[str, float]], metrics: list[str]) -> Path:
    """Bars of ``series[model][metric]`` for each metric (missing values are skipped, not drawn as 0)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    group_width, bar_gap, left, top, height = 40 + 26 * len(series), 4, 60, 50, 300
    width = left + group_width * len(metrics) + 240
    image = Image.new("RGB", (width, top + height + 110), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 15), title, fill="black", font=font)
    bottom = top + height
    for tick in range(0, 11, 2):
        y = bottom - tick / 10 * height
        draw.line([(left - 5, y), (width - 230, y)], fill=(225, 225, 225))
        draw.text((left - 35, y - 6), f"{tick / 10:.1f}", fill="black", font=font)
    draw.line([(left, top), (left, bottom)], fill="black")
    draw.line([(left, bottom), (width - 230, bottom)], fill="black")
    for g, metric in enumerate(metrics):
        x0 = left + 10 + g * group_width
        for s, (name, values) in enumerate(series.items()):
            value = values.get(metric)
            if value is None:
                continue
            x = x0 + s * (22 + bar_gap)
            y = bottom - max(0.0, min(1.0, value)) * height
            draw.rectangle([x, y, x + 22, bottom], fill=COLOURS[s % len(COLOURS)])
            draw.text((x - 2, y - 12), f"{value:.2f}", fill="black", font=font)
        label_image = Image.new("RGBA", (110, 12), (255, 255, 255, 0))
        ImageDraw.Draw(label_image).text((0, 0), metric, fill="black", font=font)
        rotated = label_image.rotate(45, expand=True)
        image.paste(rotated, (int(x0 - 40), bottom + 5), rotated)
    for s, name in enumerate(series):
        y = top + s * 18
        draw.rectangle([width - 220, y, width - 208, y + 12], fill=COLOURS[s % len(COLOURS)])
        draw.text((width - 202, y), name[:34], fill="black", font=font)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target, format="PNG")
    return target
