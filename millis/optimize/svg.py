"""Inline SVG charts for report.html, drawn in plain Python: axes (linear or log), points, lines.

No matplotlib, no fonts or scripts fetched: the page stays one self-contained file. Every string placed
in the SVG goes through `esc`. A chart carries `data-chart` (what it shows) and `data-points` (how many
markers it plotted) so a browser test can tell an empty chart from a drawn one.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass

# colour-blind-friendly (Okabe-Ito), then greys; the chosen variant is always CHOSEN
PALETTE = ("#0072b2", "#e69f00", "#cc79a7", "#56b4e9", "#d55e00", "#6a3d9a", "#b8860b", "#000000",
           "#7f7f7f", "#8c564b")
CHOSEN = "#1a9641"
REJECTED = "#9e9e9e"


def esc(value: object) -> str:
    """Text or attribute value, HTML-escaped (quotes too)."""
    return html.escape(str(value), quote=True)


def num(v: float) -> str:
    """A coordinate: short, no exponent."""
    return f"{v:.1f}"


def tick_text(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


@dataclass(frozen=True)
class Axis:
    """A value range mapped onto pixels [start, end] (end < start for a y axis: SVG y grows downwards)."""

    lo: float
    hi: float
    start: float
    end: float
    log: bool = False

    def at(self, v: float) -> float:
        if self.log:
            lo, hi, v = math.log10(self.lo), math.log10(self.hi), math.log10(max(v, self.lo))
        else:
            lo, hi = self.lo, self.hi
        share = (v - lo) / (hi - lo) if hi > lo else 0.5
        return self.start + share * (self.end - self.start)

    def ticks(self) -> list[float]:
        """Round values inside [lo, hi]: 1-2-5 steps per decade on a log axis (or 5 even steps in log
        space when the range is under a decade and holds fewer than 3 of them)."""
        if self.log:
            out = [m * 10.0 ** k for k in range(math.floor(math.log10(self.lo)), math.ceil(math.log10(self.hi)) + 1)
                   for m in (1, 2, 5)]
            out = [t for t in out if self.lo <= t <= self.hi]
            if len(out) >= 3:
                return out
            a, b = math.log10(self.lo), math.log10(self.hi)
            return [float(f"{10 ** (a + i * (b - a) / 4):.3g}") for i in range(5)]
        span = self.hi - self.lo
        if span <= 0:
            return [self.lo]
        raw = span / 5
        step = min((m * 10.0 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
        first = math.ceil(self.lo / step - 1e-9) * step
        return [round(first + i * step, 12) for i in range(int((self.hi - first) / step + 1e-9) + 1)]


def value_range(values: list[float], log: bool, pad: float = 0.08) -> tuple[float, float]:
    """[lo, hi] around `values` with a margin (a factor on a log axis); a single value gets a band around it."""
    vals = [v for v in values if math.isfinite(v) and (v > 0 or not log)]
    if not vals:
        return (1.0, 10.0) if log else (0.0, 1.0)
    lo, hi = min(vals), max(vals)
    if log:
        if hi / lo < 1.2:  # one value (or near ties): a band of x/1.2 .. x*1.2
            return lo / 1.2, hi * 1.2
        f = (hi / lo) ** pad
        return lo / f, hi * f
    if hi - lo < 1e-12:
        band = abs(hi) * 0.05 or 0.05
        return lo - band, hi + band
    m = (hi - lo) * pad
    return lo - m, hi + m


@dataclass(frozen=True)
class Frame:
    """One chart's canvas: its size, plot area margins, axes and labels."""

    chart: str          # data-chart: "pareto", "cdf-b1xs128"
    title: str
    x_label: str
    y_label: str
    x: Axis
    y: Axis
    width: int
    height: int


def frame(chart: str, title: str, x_label: str, y_label: str, x_range: tuple[float, float],
          y_range: tuple[float, float], x_log: bool = False, y_log: bool = False, width: int = 720,
          height: int = 400, right: int = 30) -> Frame:
    """A frame whose plot area leaves room for tick labels (left, bottom) and `right` px for a legend."""
    left, top, bottom = 64, 30, 48
    x = Axis(x_range[0], x_range[1], left, width - right, x_log)
    y = Axis(y_range[0], y_range[1], height - bottom, top, y_log)
    return Frame(chart, title, x_label, y_label, x, y, width, height)


def axes(f: Frame) -> list[str]:
    """Grid, ticks, tick labels, axis titles."""
    x0, x1, y0, y1 = f.x.start, f.x.end, f.y.start, f.y.end
    out = [f'<rect x="{num(x0)}" y="{num(y1)}" width="{num(x1 - x0)}" height="{num(y0 - y1)}" class="plot"/>']
    for t in f.x.ticks():
        px = f.x.at(t)
        out.append(f'<line x1="{num(px)}" y1="{num(y1)}" x2="{num(px)}" y2="{num(y0)}" class="grid"/>')
        out.append(f'<text x="{num(px)}" y="{num(y0 + 16)}" text-anchor="middle">{esc(tick_text(t))}</text>')
    for t in f.y.ticks():
        py = f.y.at(t)
        out.append(f'<line x1="{num(x0)}" y1="{num(py)}" x2="{num(x1)}" y2="{num(py)}" class="grid"/>')
        out.append(f'<text x="{num(x0 - 6)}" y="{num(py + 4)}" text-anchor="end">{esc(tick_text(t))}</text>')
    out.append(f'<text x="{num((x0 + x1) / 2)}" y="{f.height - 10}" text-anchor="middle" class="label">'
               f'{esc(f.x_label)}</text>')
    out.append(f'<text transform="translate(14 {num((y0 + y1) / 2)}) rotate(-90)" text-anchor="middle" '
               f'class="label">{esc(f.y_label)}</text>')
    out.append(f'<text x="{num(x0)}" y="18" class="title">{esc(f.title)}</text>')
    return out


def marker(px: float, py: float, color: str, tip: str, star: bool = False, name: str = "") -> str:
    """One plotted point (class "point"), a tooltip `tip`; a star for the chosen variant."""
    data = f' data-name="{esc(name)}"' if name else ""
    if star:
        pts = []
        for i in range(10):
            r, a = (9.0 if i % 2 == 0 else 4.0), math.pi / 2 + i * math.pi / 5
            pts.append(f"{num(px + r * math.cos(a))},{num(py - r * math.sin(a))}")
        shape = f'<polygon class="point chosen"{data} points="{" ".join(pts)}" fill="{color}"/>'
    else:
        shape = f'<circle class="point"{data} cx="{num(px)}" cy="{num(py)}" r="4.5" fill="{color}"/>'
    return f"<g>{shape}<title>{esc(tip)}</title></g>"


def polyline(points: list[tuple[float, float]], color: str, width: float = 1.6, dash: str = "") -> str:
    d = f' stroke-dasharray="{dash}"' if dash else ""
    coords = " ".join(f"{num(x)},{num(y)}" for x, y in points)
    return f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="{width}"{d}/>'


def hline(f: Frame, value: float, color: str, text: str) -> list[str]:
    """A dashed horizontal reference line (a budget) with its label at the right end."""
    py = f.y.at(value)
    return [f'<line x1="{num(f.x.start)}" y1="{num(py)}" x2="{num(f.x.end)}" y2="{num(py)}" stroke="{color}" '
            f'stroke-dasharray="6 4" stroke-width="1.2"/>',
            f'<text x="{num(f.x.end - 4)}" y="{num(py - 5)}" text-anchor="end" fill="{color}">{esc(text)}</text>']


def legend(f: Frame, entries: list[tuple[str, str]]) -> list[str]:
    """(label, colour) rows right of the plot area."""
    x, out = f.x.end + 12, []
    for i, (label, color) in enumerate(entries):
        y = f.y.end + 8 + 16 * i
        out.append(f'<rect x="{num(x)}" y="{num(y - 8)}" width="12" height="4" fill="{color}"/>')
        out.append(f'<text x="{num(x + 16)}" y="{num(y - 3)}">{esc(label)}</text>')
    return out


def place_labels(f: Frame, items: list[tuple[float, float, str]]) -> tuple[list[str], int]:
    """A text label beside each point (px, py, text), at the first offset where it overlaps no label placed
    before it and stays inside the plot; one that fits nowhere is left out (its tooltip still names it).
    Returns the <text> elements and how many labels were left out."""
    offsets = ((7, -7, "start"), (7, 14, "start"), (-7, -7, "end"), (-7, 14, "start"), (7, -20, "start"),
               (7, 27, "start"), (-7, -20, "end"), (-7, 27, "end"))
    placed: list[tuple[float, float, float, float]] = []  # x0, y0, x1, y1 of the labels drawn
    out, left_out = [], 0
    for px, py, text in items:
        w = 6.2 * len(text)  # about 11px sans-serif
        for dx, dy, anchor in offsets:
            x0 = px + dx if anchor == "start" else px + dx - w
            box = (x0, py + dy - 10, x0 + w, py + dy + 2)
            inside = f.x.start <= box[0] and box[2] <= f.x.end + 60 and f.y.end <= box[1] and box[3] <= f.y.start
            if inside and not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
                                  for b in placed):
                placed.append(box)
                out.append(f'<text x="{num(px + dx)}" y="{num(py + dy)}" text-anchor="{anchor}">{esc(text)}</text>')
                break
        else:
            left_out += 1
    return out, left_out


def render(f: Frame, body: list[str], points: int) -> str:
    """The <svg> element: frame, then `body`; `points` markers were plotted."""
    return (f'<svg data-chart="{esc(f.chart)}" data-points="{points}" width="{f.width}" height="{f.height}" '
            f'viewBox="0 0 {f.width} {f.height}" role="img" aria-label="{esc(f.title)}">'
            + "".join(axes(f) + body) + "</svg>")
