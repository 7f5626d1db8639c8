"""Callbacks shared by every model and strategy."""
from lightning_xd.callbacks.run_summary import RunSummary
from lightning_xd.callbacks.straggler import StragglerDelay, parse_straggler

__all__ = ["RunSummary", "StragglerDelay", "parse_straggler"]
