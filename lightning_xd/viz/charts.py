"""Charts drawn with OpenCV on a numpy image: axes with ticks, labels and a legend, bars and timelines.

No plotting library: the dashboard must render inside a training process, fast, with what
the project already depends on. Every chart draws into a rectangle (x, y, width, height). The
legend is a strip between the title and the plot area, laid out in as many rows as its entries
need, so it never covers data; curves drawn through ``Axes.plot`` are clipped to the plot area.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

Colour = tuple[int, int, int]  # BGR
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
LEGEND_ROW = 16  # pixels per row of the legend strip


def colour(i: int) -> Colour:
    return PALETTE[i % len(PALETTE)]


def faint(shade: Colour, strength: float = 0.35) -> Colour:
    """``shade`` mixed with white: ``strength`` 1 is the colour itself, 0 is white."""
    return tuple(int(round(255 - strength * (255 - c))) for c in shade)


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


def text_width(s: str, scale: float = 0.45, thickness: int = 1) -> int:
    return cv2.getTextSize(s.replace("°", "o"), FONT, scale, thickness)[0][0]


def text(img: np.ndarray, s: str, org: tuple[int, int], scale: float = 0.45, color=BLACK, thickness: int = 1) -> None:
    """``s`` with its baseline starting at ``org``. OpenCV's fonts are ASCII only: a degree sign (°C)
    is drawn as a small circle."""
    x, y = int(org[0]), int(org[1])
    height = cv2.getTextSize("C", FONT, scale, thickness)[0][1]
    for i, part in enumerate(s.split("°")):
        if i:
            radius = max(2, height // 5)
            cv2.circle(img, (x + radius + 1, y - height + radius), radius, color, 1, cv2.LINE_AA)
            x += 2 * radius + 3
        cv2.putText(img, part, (x, y), FONT, scale, color, thickness, cv2.LINE_AA)
        x += text_width(part, scale, thickness)


def vertical_text(img: np.ndarray, s: str, left: int, top: int, color: Colour, scale: float = 0.38) -> None:
    """``s`` turned a quarter left (read from bottom to top) in the box whose top left corner is
    (``left``, ``top``; see ``vertical_text_size``), on a white halo so it reads over curves."""
    (width, height), baseline = cv2.getTextSize(s, FONT, scale, 1)
    ink = np.zeros((height + baseline + 4, width + 4), np.uint8)
    cv2.putText(ink, s, (2, height + 2), FONT, scale, 255, 1, cv2.LINE_AA)
    halo = cv2.dilate(ink, np.ones((3, 3), np.uint8))
    ink, halo = np.rot90(ink), np.rot90(halo)
    rows = slice(max(0, top), min(img.shape[0], top + ink.shape[0]))
    cols = slice(max(0, left), min(img.shape[1], left + ink.shape[1]))
    cut = (slice(rows.start - top, rows.stop - top), slice(cols.start - left, cols.stop - left))
    region = img[rows, cols].astype(np.float32)
    veil = (halo[cut] > 0)[..., None] * 0.75
    region = region * (1 - veil) + np.array(WHITE, np.float32) * veil
    alpha = (ink[cut].astype(np.float32) / 255)[..., None]
    img[rows, cols] = (region * (1 - alpha) + np.array(color, np.float32) * alpha).astype(np.uint8)


def vertical_text_size(s: str, scale: float = 0.38) -> tuple[int, int]:
    """(width, height) in pixels of ``vertical_text(s)``."""
    (width, height), baseline = cv2.getTextSize(s, FONT, scale, 1)
    return height + baseline + 4, width + 4


LegendEntry = tuple[str, Colour]


def _legend_rows(entries: Sequence[LegendEntry], left: int, right: int) -> list[list[tuple[int, str, Colour]]]:
    """Entries laid out left to right, a new row when the next one would pass ``right``."""
    rows: list[list[tuple[int, str, Colour]]] = []
    x = right  # forces a first row
    for label, shade in entries:
        width = 20 + text_width(label, 0.4) + 14
        if x + width > right and (not rows or rows[-1]):
            rows.append([])
            x = left
        rows[-1].append((x, label, shade))
        x += width
    return rows


class Axes:
    """A plot area inside ``rect``: the title, the legend strip, the y axis's label above the plot, the
    x axis's label under it, ticks and linear scales."""

    MARGIN = (62, 16, 42)  # left, right, bottom; the top holds the title, the legend and the y label

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
        legend: Sequence[LegendEntry] = (),
    ):
        self.img, self.ticks = img, ticks  # an axis without numeric ticks labels its own categories
        x, y, w, h = rect
        left, right, bottom = self.MARGIN
        rows = _legend_rows(legend, x + 8, x + w - 8)
        top = 28 + LEGEND_ROW * len(rows) + 18
        self.x0, self.y0, self.x1, self.y1 = x + left, y + top, x + w - right, y + h - bottom
        self.xr = xrange if xrange[1] > xrange[0] else (xrange[0], xrange[0] + 1)
        self.yr = yrange if yrange[1] > yrange[0] else (yrange[0] - 0.5, yrange[0] + 0.5)
        cv2.rectangle(img, (x, y), (x + w - 1, y + h - 1), LIGHT, 1)
        text(img, title, (x + 8, y + 20), 0.55, BLACK, 1)
        self._legend(rows, y + 28)
        self._frame(xlabel, ylabel)

    @classmethod
    def plot_width(cls, rect: tuple[int, int, int, int]) -> int:
        """The width in pixels of the plot area that axes in ``rect`` have."""
        return rect[2] - cls.MARGIN[0] - cls.MARGIN[1]

    def px(self, xv: float) -> int:
        return int(self.x0 + (xv - self.xr[0]) / (self.xr[1] - self.xr[0]) * (self.x1 - self.x0))

    def py(self, yv: float) -> int:
        raw = self.y1 - (yv - self.yr[0]) / (self.yr[1] - self.yr[0]) * (self.y1 - self.y0)
        return int(min(max(raw, self.y0 - 10_000), self.y1 + 10_000))  # far outliers stay drawable (clipped)

    def _legend(self, rows: list[list[tuple[int, str, Colour]]], top: int) -> None:
        for r, row in enumerate(rows):
            baseline = top + LEGEND_ROW * r + 12
            for x, label, shade in row:
                cv2.line(self.img, (x, baseline - 4), (x + 16, baseline - 4), shade, 3)
                text(self.img, label, (x + 20, baseline), 0.4)

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
        text(img, xlabel, ((self.x0 + self.x1) // 2 - text_width(xlabel, 0.42) // 2, self.y1 + 34), 0.42, GREY)
        text(img, ylabel, (self.x0 - 58, self.y0 - 8), 0.42, GREY)

    # ---- drawing inside the plot area, clipped to it ----------------------------------------------
    def _inside(self) -> np.ndarray:
        return self.img[self.y0 + 1 : self.y1, self.x0 + 1 : self.x1]

    def _points(self, xs: Sequence[float], ys: Sequence[float]) -> list[tuple[int, int]]:
        return [(self.px(a) - self.x0 - 1, self.py(b) - self.y0 - 1) for a, b in zip(xs, ys)]

    def plot(self, xs: Sequence[float], ys: Sequence[float], shade: Colour, thickness: int = 2) -> None:
        """A line through the points, broken where a value is not finite."""
        run: list[tuple[float, float]] = []
        for point in [*zip(xs, ys), (math.nan, math.nan)]:
            if math.isfinite(point[1]):
                run.append(point)
                continue
            points = np.array(self._points(*zip(*run)), np.int32) if run else None
            if points is not None and len(points) == 1:
                cv2.circle(self._inside(), tuple(int(v) for v in points[0]), thickness + 1, shade, -1)
            elif points is not None:
                cv2.polylines(self._inside(), [points], False, shade, thickness, cv2.LINE_AA)
            run = []

    def fill_between(self, xs: Sequence[float], lower: Sequence[float], upper: Sequence[float], shade: Colour) -> None:
        """The area between two curves over the same x values (finite values only)."""
        if len(xs) < 2:
            return
        outline = self._points(xs, upper) + self._points(xs[::-1], lower[::-1])
        cv2.fillPoly(self._inside(), [np.array(outline, np.int32)], shade, cv2.LINE_AA)


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
