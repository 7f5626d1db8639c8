"""The run's events drawn on a step axis as labelled vertical markers, one look per kind.

A lost process is a solid red line, a supervisor restart a thick dashed black one, a checkpoint
save a thin dashed dark grey one, an epoch boundary a dotted light grey one; each kind present gets
a legend entry.
Lines go under the curves, labels over them: written from bottom to top beside their line, from the
top of the plot, on a white halo. Labels are placed by importance (lost process, restart,
checkpoint, epoch, then by step). A lost process's or a restart's label that would overlap one
already placed moves down beside its line; any other such label is left out (its line stays), so
close checkpoints or many short epochs keep every line and label every few, in one row. A kind
too dense to draw at all is left out (``shown``).

Events are ``{"step": int, "kind": str, "label": str, ...}`` (``lightning_xd.callbacks.run_events``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import cv2

from lightning_xd.viz.charts import Axes, Colour, LegendEntry, vertical_text, vertical_text_size


@dataclass(frozen=True)
class MarkerStyle:
    name: str  # in the legend
    colour: Colour
    thickness: int
    dash: int  # pixels drawn, then as many left out; 0: a solid line
    label_moves_down: bool  # rather than be left out where another label stands


STYLES = {
    "lost": MarkerStyle("lost process", (0, 0, 200), 2, 0, True),
    "restart": MarkerStyle("restart", (25, 25, 25), 2, 8, True),
    "checkpoint": MarkerStyle("checkpoint", (95, 95, 95), 1, 5, False),
    "epoch": MarkerStyle("epoch", (175, 175, 175), 1, 2, False),
}
IMPORTANCE = list(STYLES)
MIN_SPACING = 8  # pixels between markers of a kind, on average, below which that kind is not drawn


def _style(event: dict) -> MarkerStyle:
    return STYLES.get(event["kind"], STYLES["epoch"])


def _importance(event: dict) -> int:
    """0 for the most important kind; unknown kinds last."""
    return IMPORTANCE.index(event["kind"]) if event["kind"] in STYLES else len(IMPORTANCE)


def _x(axes: Axes, event: dict) -> int | None:
    """The x pixel of the event's marker: inside the plot area (one at the first or last step just
    inside the frame), None beyond it."""
    x = axes.px(event["step"])
    return min(max(x, axes.x0 + 1), axes.x1 - 1) if axes.x0 <= x <= axes.x1 else None


def shown(events: Sequence[dict], width: int) -> list[dict]:
    """The events drawn on a plot ``width`` pixels wide: all but those of a kind whose markers would
    stand closer than ``MIN_SPACING`` apart on average (an epoch every step of full-batch training, a
    checkpoint at each): so many lines would hide the curves. Lost processes and restarts always are."""
    counts = Counter(event["kind"] for event in events)
    return [e for e in events if _style(e).label_moves_down or counts[e["kind"]] * MIN_SPACING <= width]


def legend_entries(events: Sequence[dict]) -> list[LegendEntry]:
    kinds = {event["kind"] for event in events}
    return [(style.name, style.colour) for kind, style in STYLES.items() if kind in kinds]


def draw_lines(axes: Axes, events: Sequence[dict]) -> None:
    """Each event's line at its step, across the plot area (drawn before the curves: under them)."""
    for event in sorted(events, key=_importance, reverse=True):  # the most important drawn last, on top
        style, x = _style(event), _x(axes, event)
        if x is None:
            continue
        top, bottom = axes.y0 + 1, axes.y1 - 1
        period = 2 * style.dash if style.dash else bottom - top + 1
        for start in range(top, bottom + 1, period):
            end = min(bottom, start + (style.dash or period) - 1)
            cv2.line(axes.img, (x, start), (x, end), style.colour, style.thickness)


def draw_labels(axes: Axes, events: Sequence[dict]) -> None:
    """Each event's label beside its line, where there is room (drawn after the curves: over them)."""
    placed: list[tuple[int, int, int, int]] = []  # left, right, top, bottom of the labels drawn
    for event in sorted(events, key=lambda e: (_importance(e), e["step"])):
        x = _x(axes, event)
        if x is None:
            continue
        style, (width, height) = _style(event), vertical_text_size(event["label"])
        left = x + 3 if x + 3 + width < axes.x1 else x - 3 - width
        top = _free_top(placed, left, left + width, height, axes.y0 + 3, axes.y1 - 3, style.label_moves_down)
        if top is None:
            continue
        vertical_text(axes.img, event["label"], left, top, style.colour)
        placed.append((left, left + width, top, top + height))


def _free_top(placed: list, left: int, right: int, height: int, first: int, last: int, moves_down: bool) -> int | None:
    """The first top, from ``first`` down (or ``first`` only, unless ``moves_down``), at which a box
    [left, right] of ``height`` overlaps no placed box and ends above ``last``; None if there is none."""
    beside = sorted((t, b) for l_, r, t, b in placed if l_ < right and left < r)
    top = first
    for t, b in beside:
        if top + height < t:
            break
        if not moves_down:
            return None
        top = max(top, b + 4)
    return top if top + height <= last else None
