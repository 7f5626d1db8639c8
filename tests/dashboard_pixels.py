"""Reading a rendered dashboard back from its pixels: where a panel's plot area is, which colours it
holds, and where an event's marker stands."""

from __future__ import annotations

import numpy as np

from lightning_xd.viz.charts import GREY
from lightning_xd.viz.dashboard import panel_rect
from lightning_xd.viz.markers import STYLES


def matches(region: np.ndarray, bgr, tolerance: int = 10) -> np.ndarray:
    """Boolean mask of the pixels of ``region`` within ``tolerance`` of ``bgr`` on every channel."""
    return np.all(np.abs(region.astype(int) - np.array(bgr)) <= tolerance, axis=-1)


def has_colour(region: np.ndarray, bgr, tolerance: int = 10) -> bool:
    return bool(matches(region, bgr, tolerance).any())


def plot_area(image: np.ndarray, index: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the frame around the plot area of the ``index``-th panel: its grey lines."""
    x, y, w, h = panel_rect(index)
    grey = np.all(image[y : y + h, x : x + w] == GREY, axis=-1)
    columns, rows = np.flatnonzero(grey.sum(axis=0) > 0.4 * h), np.flatnonzero(grey.sum(axis=1) > 0.4 * w)
    assert len(columns) >= 2 and len(rows) >= 2, f"panel {index} has no plot frame"
    return x + columns.min(), y + rows.min(), x + columns.max(), y + rows.max()


def inside(image: np.ndarray, area: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = area
    return image[y0 + 1 : y1, x0 + 1 : x1]


def step_x(area: tuple[int, int, int, int], step: float, steps: tuple[float, float]) -> int:
    """The x pixel of ``step`` on a step axis running from ``steps[0]`` to ``steps[1]``."""
    x0, _, x1, _ = area
    return int(x0 + (step - steps[0]) / (steps[1] - steps[0]) * (x1 - x0))


def marker_columns(image: np.ndarray, index: int, kind: str) -> list[int]:
    """The x pixels where a marker of ``kind`` runs down the plot area of panel ``index``: over 60% of
    its height for a solid line, 30% for a dashed one."""
    area, style = plot_area(image, index), STYLES[kind]
    covered = matches(inside(image, area), style.colour).mean(axis=0)
    return [area[0] + 1 + int(c) for c in np.flatnonzero(covered > (0.3 if style.dash else 0.6))]
