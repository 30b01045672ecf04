"""The duration histogram of `higgs-tune inspect --plot` as a PNG bar chart (Pillow)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from higgs_tune.errors import DataError

BAR = (52, 101, 164)
INK = (0, 0, 0)


def histogram_png(histogram: Sequence[tuple[float, float, int]], width: int = 640, height: int = 360) -> bytes:
    """A bar chart of a duration histogram ((start_s, end_s, count) bins) as PNG bytes.

    Bars are blue on white; the x axis is labelled with the first and last bin edges in
    seconds, the y axis with the largest count ("n=…").
    """
    if not histogram:
        raise DataError("no clips to plot: the duration histogram is empty.")
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    left, right, top, bottom = 48, width - 16, 24, height - 36
    counts = [c for _, _, c in histogram]
    peak = max(counts) or 1
    slot = (right - left) / len(histogram)
    for i, c in enumerate(counts):
        h = round((bottom - top) * c / peak)
        x0 = left + round(i * slot) + 1
        x1 = max(x0 + 1, left + round((i + 1) * slot) - 1)
        if h:
            draw.rectangle((x0, bottom - h, x1 - 1, bottom - 1), fill=BAR)
    draw.rectangle((left - 2, top, left - 1, bottom + 1), fill=INK)  # y axis
    draw.rectangle((left - 2, bottom, right - 1, bottom + 1), fill=INK)  # x axis
    draw.text((4, top), f"n={peak}", fill=INK, font=font)
    draw.text((left, bottom + 10), f"{histogram[0][0]:g}s", fill=INK, font=font)
    draw.text((right, bottom + 10), f"{histogram[-1][1]:g}s", fill=INK, font=font, anchor="ra")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def write_histogram_png(path: str | Path, histogram: Sequence[tuple[float, float, int]]) -> Path:
    """Write `histogram_png(histogram)` to `path` (parent folders created)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(histogram_png(histogram))
    except OSError as e:
        raise DataError(f"cannot write the plot to {path}: {e.strerror}. Choose a writable path for --plot.") from None
    return path
