"""Charts over training steps, each with the run's events as markers (``markers``).

``line_chart``: per-step values are noisy, so each noisy curve is drawn faint as recorded with its
TensorBoard-smoothed line over it (``smoothing``), in the same colour; a smooth one (a running error)
is drawn as recorded. ``stacked_chart``: parts of a
whole per step (a step's time: computing, waiting for data, waiting for peers), each part smoothed
and stacked as a filled band, the recorded total faint over them.

The y range ignores outliers, as TensorBoard's "ignore outliers in chart scaling" does: it covers
the 1st to 99th percentile of a noisy curve's values (and all of a smooth one), so one slow step (a
checkpoint save, the first step's warm-up) or one loss spike does not flatten everything else; what
lies beyond is clipped at the frame. Panels of one dashboard share one step axis (``xrange``),
so a marker stands at the same x on every panel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lightning_xd.viz import markers
from lightning_xd.viz.charts import GREY, Axes, Colour, colour, faint
from lightning_xd.viz.smoothing import noisy, smoothed, weight_for

Curve = tuple[Sequence[float], Sequence[float]]  # (steps, values)


def value_range(noisy_values: Sequence[float], smooth_values: Sequence[float] = ()) -> tuple[float, float]:
    """[low, high] over the 1st-99th percentile of the values of noisy curves and all the values of
    smooth ones (which have no outliers), padded by 5%. Smoothed lines are averages of the noisy
    values, so they stay inside but where an outlier pulls them (the first steps after a warm-up)."""
    noisy_values = [v for v in noisy_values if math.isfinite(v)]
    smooth_values = [v for v in smooth_values if math.isfinite(v)]
    if not noisy_values and not smooth_values:
        return (0.0, 1.0)
    low, high = np.percentile(noisy_values, [1, 99]) if noisy_values else (math.inf, -math.inf)
    low, high = min([low, *smooth_values]), max([high, *smooth_values])
    pad = 0.05 * (high - low or abs(high) or 1.0)
    return float(low - pad), float(high + pad)


def step_range(curves: Sequence[Curve], events: Sequence[dict] = ()) -> tuple[float, float]:
    """The steps of every curve and event: one axis for every panel of a dashboard."""
    steps = [s for xs, _ in curves for s in xs] + [e["step"] for e in events]
    return (min(steps), max(steps)) if steps else (0.0, 1.0)


def line_chart(
    img,
    rect,
    series: dict[str, Curve],
    title: str,
    xlabel: str,
    ylabel: str,
    events: Sequence[dict] = (),
    xrange: tuple[float, float] | None = None,
) -> None:
    """One curve per series (label -> (steps, values)), each in its own colour: a noisy one faint as
    recorded with its smoothed line over it, a smooth one as recorded."""
    events = markers.shown(events, Axes.plot_width(rect))
    smooth = {
        label: smoothed(list(values), weight_for(len(values))) if noisy(values) else None
        for label, (_, values) in series.items()
    }
    recorded = [v for _, values in series.values() for v in values]
    legend = [(label, colour(i)) for i, label in enumerate(series)] + markers.legend_entries(events)
    if not any(math.isfinite(v) for v in recorded):
        Axes(img, rect, title + " (no data yet)", xlabel, ylabel, xrange or (0, 1), (0, 1), legend=legend)
        return
    yrange = value_range(
        [v for label, (_, values) in series.items() if smooth[label] for v in values],
        [v for label, (_, values) in series.items() if not smooth[label] for v in values],
    )
    xrange = xrange or step_range(list(series.values()), events)
    axes = Axes(img, rect, title, xlabel, ylabel, xrange, yrange, legend=legend)
    markers.draw_lines(axes, events)
    for i, (label, (steps, values)) in enumerate(series.items()):
        if smooth[label] is not None:
            axes.plot(steps, values, faint(colour(i)), 1)
    for i, (label, (steps, values)) in enumerate(series.items()):
        axes.plot(steps, smooth[label] or values, colour(i), 2)
    markers.draw_labels(axes, events)


def stacked_chart(
    img,
    rect,
    steps: Sequence[float],
    parts: dict[str, tuple[Sequence[float], Colour]],
    title: str,
    xlabel: str,
    ylabel: str,
    events: Sequence[dict] = (),
    xrange: tuple[float, float] | None = None,
) -> None:
    """``parts`` (label -> (values per step, colour)) smoothed and stacked from 0 in the order given,
    each band filled in a light shade of its colour; the recorded total per step faint over them."""
    events = markers.shown(events, Axes.plot_width(rect))
    total = [sum(values) for values in zip(*(v for v, _ in parts.values()))]
    legend = [*((label, shade) for label, (_, shade) in parts.items()), ("total, each step", faint(GREY, 0.6))]
    legend += markers.legend_entries(events)
    if not total:
        Axes(img, rect, title + " (no data yet)", xlabel, ylabel, xrange or (0, 1), (0, 1), legend=legend)
        return
    bands, bottom = [], [0.0] * len(total)
    for values, shade in parts.values():
        top = [b + v for b, v in zip(bottom, smoothed(list(values), weight_for(len(values))))]
        bands.append((bottom, top, shade))
        bottom = top
    yrange = (0.0, value_range(total)[1])  # bands stack from 0
    axes = Axes(img, rect, title, xlabel, ylabel, xrange or step_range([(steps, total)], events), yrange, legend=legend)
    for lower, upper, shade in bands:
        axes.fill_between(steps, lower, upper, faint(shade, 0.55))
    markers.draw_lines(axes, events)  # over the bands, which would hide them, under the lines
    for _, upper, shade in bands:
        axes.plot(steps, upper, shade, 1)
    axes.plot(steps, total, faint(GREY, 0.6), 1)
    markers.draw_labels(axes, events)
