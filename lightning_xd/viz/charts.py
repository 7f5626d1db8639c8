"""Charts drawn with OpenCV on a numpy image: lines, bars and timelines with axes, ticks and legends.

No plotting library: the dashboard must render inside a training process, fast, with what
the project already depends on. Every chart draws into a rectangle (x, y, width, height).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (30, 30, 30), (120, 120, 120), (225, 225, 225)
# distinct colours (BGR) for ranks / series, readable on white
PALETTE = [
    (180, 119, 31),
    (14, 127, 255),
    (44, 160, 44),
    (40, 39, 214),
    (189, 103, 148),
    (75, 86, 140),
    (194, 119, 227),
    (127, 127, 127),
    (34, 189, 188),
    (207, 190, 23),
]
FONT = cv2.FONT_HERSHEY_SIMPLEX


def colour(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step) + 1)]


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-2:
        return f"{value:.1e}"
    return f"{value:.3g}"


def text(img: np.ndarray, s: str, org: tuple[int, int], scale: float = 0.45, color=BLACK, thickness: int = 1) -> None:
    cv2.putText(img, s, (int(org[0]), int(org[1])), FONT, scale, color, thickness, cv2.LINE_AA)


class Axes:
    """A plot area inside ``rect`` with a title, axis labels and linear scales."""

    MARGIN = (62, 44, 16, 42)  # left, top (title, then the y label), right, bottom

    def __init__(
        self,
        img: np.ndarray,
        rect: tuple[int, int, int, int],
        title: str,
        xlabel: str,
        ylabel: str,
        xrange: tuple[float, float],
        yrange: tuple[float, float],
        ticks: str = "xy",
    ):
        self.img, self.ticks = img, ticks  # an axis without numeric ticks labels its own categories
        x, y, w, h = rect
        left, top, right, bottom = self.MARGIN
        self.x0, self.y0, self.x1, self.y1 = x + left, y + top, x + w - right, y + h - bottom
        self.xr = xrange if xrange[1] > xrange[0] else (xrange[0], xrange[0] + 1)
        self.yr = yrange if yrange[1] > yrange[0] else (yrange[0] - 0.5, yrange[0] + 0.5)
        cv2.rectangle(img, (x, y), (x + w - 1, y + h - 1), LIGHT, 1)
        text(img, title, (x + 8, y + 20), 0.55, BLACK, 1)
        self._frame(xlabel, ylabel)

    def px(self, xv: float) -> int:
        return int(self.x0 + (xv - self.xr[0]) / (self.xr[1] - self.xr[0]) * (self.x1 - self.x0))

    def py(self, yv: float) -> int:
        return int(self.y1 - (yv - self.yr[0]) / (self.yr[1] - self.yr[0]) * (self.y1 - self.y0))

    def _frame(self, xlabel: str, ylabel: str) -> None:
        img = self.img
        for tick in nice_ticks(*self.yr) if "y" in self.ticks else []:
            if self.yr[0] <= tick <= self.yr[1]:
                cv2.line(img, (self.x0, self.py(tick)), (self.x1, self.py(tick)), LIGHT, 1)
                text(img, _label(tick), (self.x0 - 58, self.py(tick) + 4), 0.38, GREY)
        for tick in nice_ticks(*self.xr) if "x" in self.ticks else []:
            if self.xr[0] <= tick <= self.xr[1]:
                cv2.line(img, (self.px(tick), self.y1), (self.px(tick), self.y1 + 4), GREY, 1)
                text(img, _label(tick), (self.px(tick) - 10, self.y1 + 16), 0.38, GREY)
        cv2.rectangle(img, (self.x0, self.y0), (self.x1, self.y1), GREY, 1)
        text(img, xlabel, ((self.x0 + self.x1) // 2 - 4 * len(xlabel), self.y1 + 34), 0.42, GREY)
        text(img, ylabel, (self.x0 - 58, self.y0 - 8), 0.42, GREY)

    def legend(self, labels: Sequence[str]) -> None:
        for i, label in enumerate(labels):
            y = self.y0 + 14 + 16 * i
            cv2.line(self.img, (self.x1 - 120, y - 4), (self.x1 - 100, y - 4), colour(i), 3)
            text(self.img, label, (self.x1 - 95, y), 0.4)


def line_chart(
    img, rect, series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str, ylabel: str
) -> None:
    """One line per series (label -> (xs, ys)), each in its own colour, with a legend."""
    xs = [v for x, _ in series.values() for v in x]
    ys = [v for _, y in series.values() for v in y if math.isfinite(v)]
    if not xs or not ys:
        Axes(img, rect, title + " (no data yet)", xlabel, ylabel, (0, 1), (0, 1))
        return
    low, high = min(ys), max(ys)
    pad = 0.05 * (high - low or abs(high) or 1.0)
    axes = Axes(img, rect, title, xlabel, ylabel, (min(xs), max(xs)), (low - pad, high + pad))
    for i, (x, y) in enumerate(series.values()):
        points = np.array([(axes.px(a), axes.py(b)) for a, b in zip(x, y) if math.isfinite(b)], np.int32)
        if len(points) == 1:
            cv2.circle(img, tuple(int(v) for v in points[0]), 3, colour(i), -1)
        elif len(points):
            cv2.polylines(img, [points], False, colour(i), 2, cv2.LINE_AA)
    axes.legend(list(series))


def bar_chart(
    img,
    rect,
    labels: Sequence[str],
    values: Sequence[float],
    title: str,
    xlabel: str,
    ylabel: str,
    colours: Sequence[int] | None = None,
) -> None:
    axes = Axes(
        img, rect, title, xlabel, ylabel, (-0.5, len(values) - 0.5), (0, max(values, default=1) * 1.1 or 1), ticks="y"
    )
    width = max(2, int((axes.x1 - axes.x0) / max(1, len(values)) * 0.7))
    for i, (label, value) in enumerate(zip(labels, values)):
        cx = axes.px(i)
        cv2.rectangle(
            img,
            (cx - width // 2, axes.py(value)),
            (cx + width // 2, axes.py(0)),
            colour(colours[i] if colours else i),
            -1,
        )
        text(img, str(label), (cx - 4 * len(str(label)), axes.y1 + 16), 0.38, GREY)
        text(img, _label(value), (cx - 12, axes.py(value) - 4), 0.38, BLACK)


def timeline_chart(img, rect, lanes: dict[str, list[tuple[str, int, float, float]]], title: str) -> None:
    """Busy intervals per lane (op, micro-batch, start s, end s); the gaps are the bubbles."""
    end = max((e for ops in lanes.values() for *_, e in ops), default=1.0)
    axes = Axes(img, rect, title, "time in the step (ms)", "", (0, end * 1000), (0, len(lanes)), ticks="x")
    lane_height = (axes.y1 - axes.y0) / max(1, len(lanes))
    for lane, (name, ops) in enumerate(lanes.items()):
        top = int(axes.y0 + lane * lane_height + 4)
        bottom = int(axes.y0 + (lane + 1) * lane_height - 4)
        text(img, name, (axes.x0 - 58, (top + bottom) // 2 + 4), 0.4)
        for op, microbatch, start, stop in ops:
            shade = colour(microbatch)
            left, right = axes.px(start * 1000), max(axes.px(start * 1000) + 1, axes.px(stop * 1000))
            cv2.rectangle(img, (left, top), (right, bottom), shade if op == "F" else tuple(c // 2 for c in shade), -1)
            if right - left > 16:
                text(img, f"{op}{microbatch}", (left + 2, (top + bottom) // 2 + 4), 0.35, WHITE)
