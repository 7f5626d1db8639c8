"""The OpenCV dashboard: rendered from recorded figures, one curve per rank."""

import numpy as np

from lightning_xd.viz import render
from lightning_xd.viz.charts import colour
from lightning_xd.viz.dashboard import PANEL


def _figures(ranks=2, steps=30):
    return {
        "title": "test",
        "ranks": {
            r: {
                "step": list(range(1, steps + 1)),
                "loss": [1.0 / (s + r) for s in range(1, steps + 1)],
                "samples_per_s": [100.0 + 10 * r] * steps,
            }
            for r in range(ranks)
        },
    }


def _has_colour(region: np.ndarray, bgr) -> bool:
    return bool(np.any(np.all(np.abs(region.astype(int) - np.array(bgr)) <= 10, axis=-1)))


def test_dashboard_has_the_expected_size_and_one_curve_per_rank():
    image = render(_figures(ranks=3))
    assert image.shape == (40 + PANEL[1], 2 * PANEL[0], 3) and image.dtype == np.uint8
    assert image.std() > 10, "blank image"
    loss_panel = image[40 + 40 : 40 + PANEL[1] - 50, 70 : PANEL[0] - 140]  # plot area, legend excluded
    for rank in range(3):
        assert _has_colour(loss_panel, colour(rank)), f"no curve for rank {rank}"
    assert not _has_colour(loss_panel, colour(3))


def test_strategy_panels_appear_when_their_figures_exist():
    figures = _figures()
    figures["staleness"] = {"0": 5, "1": 12, "2": 3}
    figures["timeline"] = {0: [("F", 0, 0.0, 0.01), ("B", 0, 0.03, 0.05)], 1: [("F", 0, 0.01, 0.02)]}
    figures["ranks"][0]["train/running_rmse"] = [0.5] * 30
    image = render(figures)
    assert image.shape[0] == 40 + 3 * PANEL[1]  # loss, throughput, running rmse, staleness, timeline


def test_a_series_and_its_persistence_baseline_share_one_panel():
    figures = _figures()
    for r in (0, 1):
        figures["ranks"][r]["train/running_rmse"] = [0.5 + r] * 30
        figures["ranks"][r]["train/running_rmse_persistence"] = [0.8 + r] * 30
    image = render(figures)
    assert image.shape[0] == 40 + 2 * PANEL[1]  # loss, throughput; running rmse with its baseline
    panel = image[40 + PANEL[1] + 40 : 40 + 2 * PANEL[1] - 50, 70 : PANEL[0] - 140]
    for series in range(4):  # rank 0, rank 0 persistence, rank 1, rank 1 persistence
        assert _has_colour(panel, colour(series)), f"series {series} missing"
