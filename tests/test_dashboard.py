"""The OpenCV dashboard, read back from its pixels: one curve per rank, noisy curves faint under their
smoothed line, the legend above the plot, the run's events as markers at their steps on every panel
over steps, and each rank's step time split into computing, waiting for data and waiting for peers."""

import math

import numpy as np
import pytest
from dashboard_pixels import has_colour, inside, marker_columns, matches, plot_area, step_x

from lightning_xd.contract import StrategyContract
from lightning_xd.viz import render
from lightning_xd.viz.charts import BLACK, PALETTE, colour, faint
from lightning_xd.viz.dashboard import PANEL, baselines, panel_rect
from lightning_xd.viz.markers import STYLES
from lightning_xd.viz.smoothing import noisy, smoothed, weight_for
from lightning_xd.viz.step_clock import StepClock

STEPS = 30
LOSS, THROUGHPUT, SPLIT_RANK_0, SPLIT_RANK_1, FIRST_TRACKED = range(5)  # panels of _figures(ranks=2)


def _figures(ranks=2, events=()):
    steps = list(range(1, STEPS + 1))
    return {
        "title": "test",
        "events": list(events),
        "ranks": {
            r: {
                "step": steps,
                "loss": [1.0 / (s + r) for s in steps],
                "samples_per_s": [100.0 + 10 * r] * STEPS,
                "compute_ms": [10.0] * STEPS,
                "data_ms": [5.0] * STEPS,
                "peers_ms": [2.0] * STEPS,
            }
            for r in range(ranks)
        },
    }


def _rows(image):
    return (image.shape[0] - 40) // PANEL[1]


def test_one_curve_per_rank():
    image = render(_figures(ranks=3))
    assert image.shape[1] == 2 * PANEL[0] and image.dtype == np.uint8
    loss = inside(image, plot_area(image, LOSS))
    for rank in range(3):
        assert has_colour(loss, colour(rank)), f"no curve for rank {rank}"
    assert not has_colour(loss, colour(3))


def test_legend_sits_above_the_plot_and_covers_no_data():
    figures = _figures()
    for r in (0, 1):  # 8 entries: the legend takes two rows
        data = figures["ranks"][r]
        rising = [s / STEPS for s in data["step"]]  # to the top right corner, where legends used to sit
        data["train/running_rmse"] = rising if r == 0 else [0.05] * STEPS
        for name in ("persistence", "seasonal_naive", "ridge"):
            data[f"train/running_rmse_{name}"] = [0.02 + 0.01 * r] * STEPS
    image = render(figures)
    left, top, width, _ = panel_rect(FIRST_TRACKED)
    area = plot_area(image, FIRST_TRACKED)
    above = image[top : area[1], left : left + width]
    for series in range(8):
        assert has_colour(above, colour(series)), f"legend entry {series} missing above the plot"
    plot = inside(image, area)
    assert not has_colour(plot, BLACK, 20), "text inside the plot area"
    drawn = matches(plot, colour(0)).any(axis=0)
    start = int(0.15 * len(drawn))  # past where the rising curve crosses the flat ones
    assert drawn[start:-2].all(), f"the curve is covered at x {np.flatnonzero(~drawn[start:-2])[:5] + start + area[0]}"


def test_noisy_curve_is_faint_with_its_smoothed_line_over_it():
    figures = _figures()
    figures["ranks"][0]["loss"] = [float(s % 2) for s in range(STEPS)]  # 0, 1, 0, 1 ...: all noise, mean 0.5
    figures["ranks"][1]["loss"] = [0.5 + 0.01 * s for s in range(STEPS)]  # a smooth ramp
    image = render(figures)
    plot = inside(image, plot_area(image, LOSS))
    height, width = plot.shape[:2]
    faint_rows = np.flatnonzero(matches(plot, faint(colour(0)), 6).any(axis=1))
    assert faint_rows.min() < 0.15 * height and faint_rows.max() > 0.85 * height, "the recorded values, faint"
    settled = plot[:, int(0.3 * width) :]  # the smoothed line starts at the first value, then settles
    smooth_rows = np.flatnonzero(matches(settled, colour(0)).any(axis=1))
    assert len(smooth_rows) and smooth_rows.min() > 0.3 * height and smooth_rows.max() < 0.7 * height
    faint_pixels = [matches(plot, faint(colour(rank)), 6).sum() for rank in (0, 1)]
    assert faint_pixels[1] < faint_pixels[0] / 4, "a smooth curve is drawn once, as recorded (edges aside)"


def test_smoothing_is_tensorboards_debiased_moving_average():
    assert smoothed([1.0, 2.0, 3.0], 0.6) == pytest.approx([1.0, 1.625, 1.824 / 0.784])
    assert smoothed([2.0, math.nan, 2.0], 0.9)[::2] == pytest.approx([2.0, 2.0])
    assert math.isnan(smoothed([2.0, math.nan, 2.0], 0.9)[1])
    assert [weight_for(n) for n in (26, 250, 1000)] == pytest.approx([0.6, 0.8, 0.9]), "about n / 50 points averaged"
    assert noisy([float(s % 2) for s in range(50)])
    assert not noisy([0.3 + 1.0 / (s + 1) for s in range(50)]), "a running error is smooth already"


def test_every_panel_over_steps_marks_each_event_at_its_step():
    events = [
        {"step": 12, "kind": "lost", "label": "lost rank 1: 3->2"},
        {"step": 20, "kind": "checkpoint", "label": "checkpoint"},
        {"step": 25, "kind": "restart", "label": "restart 1: 5 steps redone"},
        {"step": 15, "kind": "epoch", "label": "epoch 1"},
    ]
    figures = _figures(events=events)
    for r in (0, 1):
        figures["ranks"][r]["train/running_rmse"] = [0.1] * STEPS
    figures["staleness"] = {"0": 3, "1": 5}
    image = render(figures)
    for panel in (LOSS, THROUGHPUT, SPLIT_RANK_0, SPLIT_RANK_1, FIRST_TRACKED):
        area = plot_area(image, panel)
        for event in events[:3]:
            found = marker_columns(image, panel, event["kind"])
            expected = step_x(area, event["step"], (1, STEPS))
            assert found and all(abs(x - expected) <= 2 for x in found), (panel, event["kind"], found, expected)
    x, y, w, h = panel_rect(FIRST_TRACKED + 1)
    assert not has_colour(image[y : y + h, x : x + w], STYLES["lost"].colour), "the staleness histogram has no steps"


def test_time_split_stacks_computing_waiting_for_data_and_for_peers():
    figures = _figures()
    figures["ranks"][0].update(compute_ms=[10.0] * STEPS, data_ms=[5.0] * STEPS, peers_ms=[60.0] * STEPS)
    figures["ranks"][1].update(compute_ms=[70.0] * STEPS, data_ms=[5.0] * STEPS, peers_ms=[2.0] * STEPS)
    image = render(figures)
    fill = {part: faint(PALETTE[i], 0.55) for i, part in ((0, "computing"), (1, "data"), (4, "peers"))}
    waiting = inside(image, plot_area(image, SPLIT_RANK_0))
    straggler = inside(image, plot_area(image, SPLIT_RANK_1))
    area = {
        part: (matches(waiting, shade, 4).sum(), matches(straggler, shade, 4).sum()) for part, shade in fill.items()
    }
    assert area["peers"][0] > 4 * area["computing"][0], "the fast rank mostly waits for its peer"
    assert area["computing"][1] > 10 * area["peers"][1], "the straggler mostly computes"
    rows = {part: np.flatnonzero(matches(waiting, shade, 4).any(axis=1)).mean() for part, shade in fill.items()}
    assert rows["computing"] > rows["data"] > rows["peers"], "stacked from the bottom: computing, data, peers"


def test_a_series_and_all_its_baselines_share_one_panel():
    keys = {"train/running_rmse", "train/running_rmse_persistence", "train/running_rmse_seasonal_naive"}
    keys |= {"train/running_rmse_ridge", "train/running_mae"}
    assert baselines(keys) == {
        "train/running_mae": {},
        "train/running_rmse": {
            "persistence": "train/running_rmse_persistence",
            "ridge": "train/running_rmse_ridge",
            "seasonal_naive": "train/running_rmse_seasonal_naive",
        },
    }
    figures = _figures()
    for r in (0, 1):
        for key in keys:
            figures["ranks"][r][key] = [0.5 + r + 0.1 * len(key)] * STEPS
    image = render(figures)
    assert _rows(image) == 3  # loss, throughput; 2 time splits; running rmse with its baselines, running mae
    rmse = inside(image, plot_area(image, FIRST_TRACKED + 1))
    for series in range(8):  # rank 0 and its 3 baselines, rank 1 and its 3
        assert has_colour(rmse, colour(series)), f"series {series} missing"


def test_strategy_panels_appear_when_their_figures_exist():
    figures = _figures()
    figures["staleness"] = {"0": 5, "1": 12, "2": 3}
    figures["timeline"] = {0: [("F", 0, 0.0, 0.01), ("B", 0, 0.03, 0.05)], 1: [("F", 0, 0.01, 0.02)]}
    assert _rows(render(figures)) == 3  # loss, throughput; 2 time splits; staleness, timeline


class _Job(StrategyContract):
    """What ``StepClock`` reads of a trainer (``world_size``, ``strategy``) and of its strategy (the
    peer-wait counter, None where it has none)."""

    def __init__(self, world_size: int, waited: float | None):
        self.world_size, self.waited = world_size, waited
        self.strategy = self

    def peer_wait_seconds(self):
        return self.waited


def test_step_clock_splits_a_step_into_data_computing_and_peers(monkeypatch):
    clock_now = [100.0]
    monkeypatch.setattr("lightning_xd.viz.step_clock.time.perf_counter", lambda: clock_now[0])
    job, clock = _Job(2, 0.0), StepClock()
    clock.restart(job)
    clock_now[0] += 0.120  # the loader waits 120 ms for the batch
    clock.step_started(job)
    clock_now[0] += 0.080  # then the step: 30 ms computing, 50 ms blocked in the allreduce
    job.waited += 0.050
    split = clock.step_ended(job, samples=8)
    assert split == pytest.approx({"samples_per_s": 8 / 0.2, "data_ms": 120, "compute_ms": 30, "peers_ms": 50})
    uncounted = _Job(2, None)
    clock.step_started(uncounted)
    clock_now[0] += 0.010
    assert "peers_ms" not in clock.step_ended(uncounted, samples=8), "waits not counted: no such part"
