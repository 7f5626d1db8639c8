"""One dashboard image of a training run, from figures gathered from every rank.

``figures`` = {
    "title": str,
    "ranks": {rank: {"step": [...], "loss": [...], "samples_per_s": [...], "compute_ms": [...],
              "data_ms": [...], "peers_ms": [...] (where counted), <tracked series>: [...]}},
    "events": [{"step", "kind", "label", ...}],     the run's events (``callbacks.run_events``)
    "steps": what the step axis counts: "step", or an async worker's own steps,
    "units": {series name: unit},                   the module's ``dashboard_units``
    "peer_waits_uncounted_by": None | strategy name, where waits for peers count as computing
    "staleness": {staleness: count}, "timeline": {rank: [(op, mb, start, end)]},
}

Panels: the training loss per rank; the wall-clock throughput per rank; per rank, where its steps'
time goes (computing, waiting for data, waiting for peers, stacked: ``step_clock``); one panel per
tracked series, with its baselines (below); then what the strategy adds: the async staleness
histogram, the pipeline timeline. Every panel over steps shares one step axis and draws the run's
events as markers (none under an asynchronous strategy: its workers count their own steps, the events
are in the server's); its noisy curves are faint as recorded with a smoothed line over them
(``time_charts``).

Baselines: a series ``X_<name>`` recorded next to a series ``X`` is X's baseline ``<name>`` and is
drawn in X's panel (``train/running_rmse_persistence`` and ``train/running_rmse_ridge`` beside
``train/running_rmse``); the longest such ``X`` wins.

Units: every axis says its unit: steps, samples/s, ms per step; the loss and tracked series take
theirs from ``units`` (a baseline shares its series' unit) and read "value" where none is given.
"""

from __future__ import annotations

import math

import numpy as np

from lightning_xd.viz.charts import PALETTE, WHITE, bar_chart, text, timeline_chart
from lightning_xd.viz.time_charts import line_chart, stacked_chart, step_range

PANEL = (640, 340)
COLUMNS = 2
BASE_SERIES = ("step", "loss", "samples_per_s", "compute_ms", "data_ms", "peers_ms")
TIME_PARTS = (  # series, label, colour: stacked from the bottom
    ("compute_ms", "computing", PALETTE[0]),
    ("data_ms", "waiting for data", PALETTE[1]),
    ("peers_ms", "waiting for peers", PALETTE[4]),
)


def axis_label(name: str, unit: str | None) -> str:
    return f"{name} ({unit})" if unit else "value"


def baselines(keys: set[str]) -> dict[str, dict[str, str]]:
    """{series: {baseline name: baseline series}} for every series that is no other's baseline."""
    owner = {key: max((b for b in keys if key.startswith(b + "_")), key=len, default=None) for key in keys}
    return {
        key: {other[len(key) + 1 :]: other for other in sorted(keys) if owner[other] == key}
        for key in sorted(keys)
        if owner[key] is None
    }


def _recorded(data: dict, key: str) -> bool:
    """Whether a rank has values of ``key`` (a pipeline's first stages have no loss: NaN throughout)."""
    return any(math.isfinite(v) for v in data.get(key, ()))


def _per_rank(ranks: dict, key: str) -> dict:
    return {f"rank {r}": (data["step"], data[key]) for r, data in sorted(ranks.items()) if _recorded(data, key)}


def _with_baselines(ranks: dict, key: str, names: dict[str, str]) -> dict:
    """Each rank's series, and after it the same rank's baselines."""
    curves = {}
    for r, data in sorted(ranks.items()):
        for name, series in {"": key, **names}.items():
            if _recorded(data, series):
                curves[f"rank {r} {name}".rstrip()] = (data["step"], data[series])
    return curves


def _time_split(ranks: dict, rank: int, uncounted_by: str | None) -> dict:
    data = ranks[rank]
    parts = {}
    for key, label, shade in TIME_PARTS:
        if key == "compute_ms" and uncounted_by:
            label = f"computing, with waits for peers ({uncounted_by} does not count them)"
        if data.get(key):
            parts[label] = ([v if math.isfinite(v) else 0.0 for v in data[key]], shade)
    return parts


def _panels(figures: dict) -> list:
    ranks, events, units = figures.get("ranks", {}), figures.get("events", []), figures.get("units", {})
    steps = figures.get("steps", "step")
    xrange = step_range([(data["step"], ()) for data in ranks.values()], events)
    over_steps = {"events": events, "xrange": xrange}
    panels = [
        lambda img, rect: line_chart(
            img,
            rect,
            _per_rank(ranks, "loss"),
            "training loss per rank",
            steps,
            axis_label("loss", units.get("loss")),
            **over_steps,
        ),
        lambda img, rect: line_chart(
            img,
            rect,
            _per_rank(ranks, "samples_per_s"),
            "throughput per rank, wall clock (from the previous step's end)",
            steps,
            "samples/s",
            **over_steps,
        ),
    ]
    for rank in sorted(r for r, data in ranks.items() if data.get("compute_ms")):
        panels.append(
            lambda img, rect, rank=rank: stacked_chart(
                img,
                rect,
                ranks[rank]["step"],
                _time_split(ranks, rank, figures.get("peer_waits_uncounted_by")),
                f"rank {rank}: where each step's time goes",
                steps,
                "ms per step",
                **over_steps,
            )
        )
    tracked = {k for data in ranks.values() for k in data if k not in BASE_SERIES}
    for key, names in baselines(tracked).items():
        title = key.rsplit("/", 1)[-1] + " per rank" + (f" vs {', '.join(names)}" if names else "")
        panels.append(
            lambda img, rect, key=key, names=names, title=title: line_chart(
                img,
                rect,
                _with_baselines(ranks, key, names),
                title,
                steps,
                axis_label(key.rsplit("/", 1)[-1], units.get(key)),
                **over_steps,
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
                "gradients (count)",
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


def panel_rect(index: int) -> tuple[int, int, int, int]:
    """The rectangle (x, y, width, height) of the ``index``-th panel, row by row."""
    x, y = (index % COLUMNS) * PANEL[0], 40 + (index // COLUMNS) * PANEL[1]
    return (x + 4, y + 4, PANEL[0] - 8, PANEL[1] - 8)


def render(figures: dict) -> np.ndarray:
    """The dashboard as a BGR image (height x width x 3, uint8)."""
    panels = _panels(figures)
    rows = math.ceil(len(panels) / COLUMNS)
    img = np.full((40 + PANEL[1] * rows, PANEL[0] * COLUMNS, 3), WHITE, np.uint8)
    text(img, figures.get("title", "training"), (12, 28), 0.7, (30, 30, 30), 2)
    for i, draw in enumerate(panels):
        draw(img, panel_rect(i))
    return img
