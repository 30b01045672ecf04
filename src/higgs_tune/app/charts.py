"""Line charts as inline SVG for the HTML report: no plotting dependency, nothing fetched.

    svg_line_chart("Audio loss", [Series("train", [(1, 6.9), (2, 5.1)])], hlines=[(6.93, "chance")])

Every label is escaped; a y of None (a non-finite value in the log) breaks the line.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


@dataclass
class Series:
    """One line: (x, y) points; y None (a non-finite value in the log) breaks the line."""

    name: str
    points: list[tuple[float, float | None]]
    color: str = PALETTE[0]
    dashed: bool = False
    markers: bool = False  # dots at the points (sparse series such as eval)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return f"{v:.0e}"
    return f"{v:.4g}"


def svg_line_chart(
    title: str,
    series: Sequence[Series],
    *,
    x_label: str = "step",
    y_label: str = "loss",
    hlines: Sequence[tuple[float, str]] = (),
    width: int = 640,
    height: int = 300,
    log_y: bool = False,
) -> str:
    """An inline <svg> line chart. Each series is one <path> (d = "M x,y L x,y ..."), with a legend.

    `hlines`: dashed horizontal reference lines (value, label), e.g. the chance level.
    `log_y`: logarithmic y axis (non-positive values are dropped).
    """
    left, right, top, bottom = 64, 16, 40, 44
    pw, ph = width - left - right, height - top - bottom
    pts = [(x, y) for s in series for x, y in s.points if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="16" class="chart-title">{html.escape(title)}</text>',
    ]
    if not pts:
        parts.append(
            f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle" class="empty">no data</text></svg>'
        )
        return "".join(parts)
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts] + [v for v, _ in hlines if not log_y or v > 0]
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    x_ticks = nice_ticks(min(xs), max(xs), 6)
    if log_y:
        lo, hi = math.floor(fy(min(ys))), math.ceil(fy(max(ys)))
        hi = hi if hi > lo else lo + 1
        y_ticks = [float(e) for e in range(lo, hi + 1)]
    else:
        y_ticks = nice_ticks(min(ys), max(ys), 5)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def sx(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1.0) * pw

    def sy(y: float) -> float:
        return top + ph - (fy(y) - y0) / ((y1 - y0) or 1.0) * ph

    # grid and axes
    parts.append('<g class="grid">')
    for t in y_ticks:
        y = top + ph - (t - y0) / ((y1 - y0) or 1.0) * ph
        label = _fmt(10**t) if log_y else _fmt(t)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    for t in x_ticks:
        x = sx(t)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{_fmt(t)}</text>')
    parts.append("</g>")
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>')
    parts.append(
        f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" '
        f'class="axis-label">{html.escape(x_label)}</text>'
    )
    parts.append(
        f'<text x="14" y="{top + ph / 2}" text-anchor="middle" class="axis-label" '
        f'transform="rotate(-90 14 {top + ph / 2})">{html.escape(y_label)}</text>'
    )
    for value, label in hlines:
        if log_y and value <= 0:
            continue
        y = sy(value)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" class="hline"/>')
        # label at the left end, below the line (the legend sits above the plot's top right)
        parts.append(f'<text x="{left + 4}" y="{y + 12:.1f}" class="hline-label">{html.escape(label)}</text>')

    # one path per series; a missing value starts a new sub-path
    for s in series:
        d, pen_down, dots = [], False, []
        for x, y in s.points:
            if y is None or not math.isfinite(y) or (log_y and y <= 0):
                pen_down = False
                continue
            d.append(f"{'L' if pen_down else 'M'}{sx(x):.1f},{sy(y):.1f}")
            dots.append((sx(x), sy(y)))
            pen_down = True
        if not d:
            continue
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        parts.append(
            f'<path class="series" data-series="{html.escape(s.name)}" d="{" ".join(d)}" fill="none" '
            f'stroke="{s.color}" stroke-width="1.8"{dash}><title>{html.escape(s.name)}</title></path>'
        )
        if s.markers or len(dots) == 1:
            parts.extend(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="2.8" fill="{s.color}"/>' for cx, cy in dots)

    # legend, right-aligned above the plot
    x = left + pw
    for s in reversed(list(series)):
        if not any(y is not None for _, y in s.points):
            continue
        label = html.escape(s.name)
        w = 26 + 7 * len(s.name)
        x -= w
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        parts.append(
            f'<line x1="{x:.1f}" y1="{top - 12}" x2="{x + 18:.1f}" y2="{top - 12}" stroke="{s.color}" '
            f'stroke-width="2.5"{dash}/>'
        )
        parts.append(f'<text x="{x + 22:.1f}" y="{top - 8}" class="legend">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)
