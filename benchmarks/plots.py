"""The benchmarks' figures: medians with min-max whiskers, on the dashboard's OpenCV axes.

No plotting dependency: ``lightning_xd.viz.charts`` already draws axes, ticks and legends with
OpenCV. A figure is a white canvas with panels and a footer naming the machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from lightning_xd.viz.charts import GREY, WHITE, Axes, colour, text

PANEL_W, PANEL_H, FOOTER_H = 560, 360, 22


def canvas(columns: int, rows: int) -> np.ndarray:
    return np.full((rows * PANEL_H + FOOTER_H, columns * PANEL_W, 3), WHITE, np.uint8)


def panel(column: int, row: int) -> tuple[int, int, int, int]:
    return (column * PANEL_W + 4, row * PANEL_H + 4, PANEL_W - 8, PANEL_H - 8)


def save(image: np.ndarray, path: Path, footer: str) -> Path:
    text(image, footer, (8, image.shape[0] - 7), 0.4, GREY)
    cv2.imwrite(str(path), image)
    return path


def _axes(
    img, rect, title: str, xlabel: str, unit: str, xrange, yrange, categories: bool = False, legend: Sequence[str] = ()
) -> Axes:
    """The dashboard's axes, the unit in the title (its y label would overlap the title), the ``legend``
    names in the series' colours; bar charts get their category names instead of numeric x ticks."""
    entries = [(label, colour(i)) for i, label in enumerate(legend)]
    axes = Axes(img, rect, f"{title} [{unit}]" if unit else title, xlabel, "", xrange, yrange, legend=entries)
    if categories:
        cv2.rectangle(img, (axes.x0 - 30, axes.y1 + 1), (axes.x1 + 10, axes.y1 + 22), WHITE, -1)
    return axes


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _whisker(img, x: int, low: int, high: int, shade) -> None:
    cv2.line(img, (x, low), (x, high), shade, 1)
    cv2.line(img, (x - 4, low), (x + 4, low), shade, 1)
    cv2.line(img, (x - 4, high), (x + 4, high), shade, 1)


def range_lines(
    img,
    rect,
    series: dict[str, tuple[Sequence[float], Sequence[dict]]],
    title: str,
    xlabel: str,
    ylabel: str,
    plain: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> None:
    """One line through the medians per series (label -> (xs, stats)), min-max whiskers at each point;
    ``plain`` series (a theory, a limit) are lines without whiskers."""
    plain = plain or {}
    xs = [x for xs_, _ in [*series.values(), *plain.values()] for x in xs_]
    ys = _finite(
        [s[k] for _, stats in series.values() for s in stats for k in ("min", "max")]
        + [y for _, values in plain.values() for y in values]
    )
    if not xs or not ys:
        _axes(img, rect, title + " (no data)", xlabel, ylabel, (0, 1), (0, 1))
        return
    low, high = min(0.0, min(ys)), max(ys) * 1.08 or 1.0
    axes = _axes(img, rect, title, xlabel, ylabel, (min(xs), max(xs)), (low, high), legend=[*series, *plain])
    lines = [(x, [s["median"] for s in stats], stats) for x, stats in series.values()]
    lines += [(x, list(values), None) for x, values in plain.values()]
    for i, (x, medians, stats) in enumerate(lines):
        points = [(axes.px(a), axes.py(b)) for a, b in zip(x, medians) if b is not None and math.isfinite(b)]
        if len(points) > 1:
            cv2.polylines(img, [np.array(points, np.int32)], False, colour(i), 2, cv2.LINE_AA)
        for a, s in zip(x, stats or []):
            if math.isfinite(s["median"]):
                cv2.circle(img, (axes.px(a), axes.py(s["median"])), 3, colour(i), -1)
                _whisker(img, axes.px(a), axes.py(s["min"]), axes.py(s["max"]), colour(i))


def range_bars(img, rect, labels: Sequence[str], stats: Sequence[dict | None], title: str, ylabel: str) -> None:
    """A bar at each median with a min-max whisker; None draws no bar (not applicable)."""
    top = max(_finite([s["max"] for s in stats if s]), default=1.0) * 1.15 or 1.0
    axes = _axes(img, rect, title, "", ylabel, (-0.5, len(labels) - 0.5), (0, top), categories=True)
    width = max(4, int((axes.x1 - axes.x0) / max(1, len(labels)) * 0.6))
    for i, (label, s) in enumerate(zip(labels, stats)):
        x = axes.px(i)
        text(img, label, (x - 4 * len(label), axes.y1 + 16), 0.4, GREY)
        if not s or not math.isfinite(s["median"]):
            text(img, "n/a", (x - 10, axes.y1 - 6), 0.4, GREY)
            continue
        cv2.rectangle(img, (x - width // 2, axes.py(s["median"])), (x + width // 2, axes.py(0)), colour(i), -1)
        _whisker(img, x, axes.py(s["min"]), axes.py(s["max"]), (30, 30, 30))
        text(img, f"{s['median']:.3g}", (x - 14, axes.py(s["max"]) - 6), 0.38)


def stacked_bars(
    img, rect, labels: Sequence[str], parts: dict[str, Sequence[float | None]], title: str, ylabel: str
) -> None:
    """One bar per label, stacked from ``parts`` (name -> value per label); None counts as not measured."""
    totals = [sum(_finite(values)) for values in zip(*parts.values())]
    axes = _axes(
        img,
        rect,
        title,
        "",
        ylabel,
        (-0.5, len(labels) - 0.5),
        (0, max(totals, default=1.0) * 1.15 or 1.0),
        categories=True,
        legend=list(parts),
    )
    width = max(4, int((axes.x1 - axes.x0) / max(1, len(labels)) * 0.6))
    for i, label in enumerate(labels):
        x, bottom = axes.px(i), 0.0
        text(img, label, (x - 4 * len(label), axes.y1 + 16), 0.4, GREY)
        for j, values in enumerate(parts.values()):
            value = values[i]
            if value is None or not math.isfinite(value) or value <= 0:
                continue
            cv2.rectangle(
                img, (x - width // 2, axes.py(bottom + value)), (x + width // 2, axes.py(bottom)), colour(j), -1
            )
            bottom += value
