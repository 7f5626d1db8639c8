"""Callbacks shared by every model and strategy."""
from lightning_xd.callbacks.run_summary import RunSummary

__all__ = ["RunSummary"]
