"""Line charts as inline SVG, drawn here so the report needs no JavaScript library and no network."""

from __future__ import annotations

import math
from html import escape

PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f", "#64748b"]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, v = [], first
    while v <= hi + step * 1e-9:
        if v >= lo - step * 1e-9:
            ticks.append(round(v, 12))
        v += step
    return ticks


def tick_labels(ticks: list[float]) -> list[str]:
    """Labels with just enough decimals to tell neighbouring ticks apart."""
    if len(ticks) < 2:
        return [fmt(t) for t in ticks]
    step = abs(ticks[1] - ticks[0])
    big = max(abs(t) for t in ticks)
    if big >= 1e5 or step < 1e-4:
        return [f"{t:.3g}" if t else "0" for t in ticks]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if round(step * 10**decimals, 6) % 1:  # e.g. a step of 0.25
        decimals += 1
    return [f"{t:.{decimals}f}" for t in ticks]


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return f"{v:.2g}"
    return f"{v:.4g}"


def _y_range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):  # a flat line: give it some room
        pad = abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.06
    return lo - pad, hi + pad


def line_chart(
    series: dict[str, list[tuple[float, float | None]]],
    title: str,
    points: dict[str, list[tuple[float, float]]] | None = None,
    width: int = 390,
    height: int = 200,
) -> str:
    """An SVG chart of named series of (x, y) pairs; y None or NaN breaks the line. `points` are
    drawn as large markers (e.g. evaluations). Every point has a hover tooltip (SVG <title>)."""
    points = points or {}
    names = list(series) + [n for n in points if n not in series]
    ml, mr, mt, mb = 52, 12, 26, 34
    pw, ph = width - ml - mr, height - mt - mb
    height += 14 * len(names)  # the legend goes under the plot, one row per series
    finite = [(x, y) for s in (*series.values(), *points.values()) for x, y in s if y is not None and math.isfinite(y)]
    out = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
        f'<title>{escape(title)}</title>',
        f'<text x="{ml}" y="16" class="ct">{escape(title)}</text>',
    ]
    if not finite:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="empty">no data yet</text></svg>')
        return "".join(out)
    xs = [x for x, _ in finite]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = _y_range([y for _, y in finite])

    def sx(x):
        return ml + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return mt + (1 - (y - y0) / (y1 - y0)) * ph

    yticks = nice_ticks(y0, y1, 5)
    for t, label in zip(yticks, tick_labels(yticks)):
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="grid"/>')
        out.append(f'<text x="{ml - 5}" y="{sy(t) + 4:.1f}" text-anchor="end" class="tick">{label}</text>')
    for t in nice_ticks(x0, x1, 6):
        if float(t).is_integer():  # steps are whole numbers
            out.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{mt + ph}" y2="{mt + ph + 4}" class="axis"/>')
            out.append(f'<text x="{sx(t):.1f}" y="{mt + ph + 16}" text-anchor="middle" class="tick">{int(t)}</text>')
    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" class="frame"/>')
    out.append(f'<text x="{ml + pw}" y="{mt + ph + 28}" text-anchor="end" class="tick">step</text>')
    color = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    for name, data in series.items():
        segments, seg = [], []
        for x, y in data:
            if y is None or not math.isfinite(y):
                segments.append(seg)
                seg = []
            else:
                seg.append((x, y))
        segments.append(seg)
        for seg in segments:
            if len(seg) > 1:
                d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in seg)
                out.append(f'<polyline points="{d}" fill="none" stroke="{color[name]}" stroke-width="1.6"/>')
        dots = [(x, y) for s in segments for x, y in s]
        if len(dots) <= 120:
            for x, y in dots:
                out.append(
                    f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.2" fill="{color[name]}">'
                    f"<title>{escape(name)} @ step {fmt(x)}: {fmt(y)}</title></circle>"
                )
    for name, data in points.items():
        for x, y in data:
            if y is not None and math.isfinite(y):
                out.append(
                    f'<rect x="{sx(x) - 5:.1f}" y="{sy(y) - 5:.1f}" width="10" height="10" fill="{color[name]}" stroke="#fff">'
                    f"<title>{escape(name)} @ step {fmt(x)}: {fmt(y)}</title></rect>"
                )
    lx = ml
    for i, name in enumerate(names):  # legend under the plot
        y = mt + ph + 34 + 14 * i
        out.append(f'<rect x="{lx}" y="{y - 8}" width="9" height="9" fill="{color[name]}"/>')
        out.append(f'<text x="{lx + 13}" y="{y}" class="legend">{escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)
