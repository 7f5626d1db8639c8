"""One dashboard image of a training run, from figures gathered from every rank.

``figures`` = {"title": str, "ranks": {rank: {"step": [...], "loss": [...], "samples_per_s": [...],
<any other series>: [...]}}, "staleness": {staleness: count}, "timeline": {rank: [(op, mb, start, end)]}}.
Panels: loss per rank, samples/s per rank, then whatever the run has: other per-rank series
(a stream's running RMSE next to persistence), the async staleness histogram, the pipeline timeline.
"""

from __future__ import annotations

import math

import numpy as np

from lightning_xd.viz.charts import WHITE, bar_chart, line_chart, text, timeline_chart

PANEL = (640, 340)
BASE_SERIES = ("step", "loss", "samples_per_s")
BASELINE = "_persistence"  # a series "x_persistence" is drawn in the panel of "x"


def _per_rank(ranks: dict, key: str, smooth: int = 1) -> dict:
    return {
        f"rank {r}": (data["step"], _trailing_mean(data[key], smooth))
        for r, data in sorted(ranks.items())
        if data.get(key)
    }


def _with_baseline(ranks: dict, key: str, has_baseline: bool) -> dict:
    """Each rank's series, and next to it the same rank's baseline (a stream's persistence forecast)."""
    series = _per_rank(ranks, key)
    if not has_baseline:
        return series
    baseline = _per_rank(ranks, key + BASELINE)
    return {
        label: values
        for name in series
        for label, values in ((name, series[name]), (f"{name} persistence", baseline.get(name)))
        if values is not None
    }


def _trailing_mean(values: list, window: int) -> list:
    """Mean of the last ``window`` values at each point: per-step throughput is too noisy to read."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _panels(figures: dict) -> list:
    ranks = figures.get("ranks", {})
    panels = [
        lambda img, rect: line_chart(img, rect, _per_rank(ranks, "loss"), "training loss per rank", "step", "loss"),
        lambda img, rect: line_chart(
            img,
            rect,
            _per_rank(ranks, "samples_per_s", smooth=10),
            "throughput per rank (mean of the last 10 steps)",
            "step",
            "samples/s",
        ),
    ]
    extra = sorted({k for data in ranks.values() for k in data if k not in BASE_SERIES})
    for key in extra:
        if key.endswith(BASELINE) and key[: -len(BASELINE)] in extra:
            continue  # drawn with the series it is the baseline of
        paired = key + BASELINE in extra
        title = key + (" vs persistence" if paired else "") + " per rank"
        panels.append(
            lambda img, rect, key=key, paired=paired, title=title: line_chart(
                img, rect, _with_baseline(ranks, key, paired), title, "step", key.rsplit("/", 1)[-1]
            )
        )
    if figures.get("staleness"):
        hist = {int(k): v for k, v in figures["staleness"].items()}
        labels = list(range(max(hist) + 1))
        panels.append(
            lambda img, rect: bar_chart(
                img,
                rect,
                labels,
                [hist.get(s, 0) for s in labels],
                "staleness of applied gradients",
                "staleness (updates)",
                "gradients",
            )
        )
    if figures.get("timeline"):
        lanes = {f"rank {r}": ops for r, ops in sorted(figures["timeline"].items())}
        panels.append(
            lambda img, rect: timeline_chart(
                img, rect, lanes, "pipeline: one step (F/B = forward/backward, gaps = bubbles)"
            )
        )
    return panels


def render(figures: dict) -> np.ndarray:
    """The dashboard as a BGR image (height x width x 3, uint8)."""
    panels = _panels(figures)
    columns = 2
    rows = math.ceil(len(panels) / columns)
    width, height = PANEL[0] * columns, 40 + PANEL[1] * rows
    img = np.full((height, width, 3), WHITE, np.uint8)
    text(img, figures.get("title", "training"), (12, 28), 0.7, (30, 30, 30), 2)
    for i, draw in enumerate(panels):
        x, y = (i % columns) * PANEL[0], 40 + (i // columns) * PANEL[1]
        draw(img, (x + 4, y + 4, PANEL[0] - 8, PANEL[1] - 8))
    return img
