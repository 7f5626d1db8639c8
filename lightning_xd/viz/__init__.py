"""Training dashboards drawn with OpenCV: per-rank curves, staleness, pipeline timelines."""

from lightning_xd.viz.callback import TrainingDashboard
from lightning_xd.viz.dashboard import render

__all__ = ["TrainingDashboard", "render"]
