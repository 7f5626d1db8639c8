"""Callbacks shared by every model and strategy."""

from lightning_xd.callbacks.run_events import RunEvents
from lightning_xd.callbacks.run_summary import RunSummary
from lightning_xd.callbacks.straggler import StragglerDelay, parse_straggler
from lightning_xd.fault_tolerance.fault_injection import FaultInjector, parse_fault
from lightning_xd.fault_tolerance.fault_tolerant_checkpoint import FaultTolerantCheckpoint
from lightning_xd.fault_tolerance.progress_marker import ProgressMarker, read_progress

__all__ = [
    "FaultInjector",
    "FaultTolerantCheckpoint",
    "ProgressMarker",
    "RunEvents",
    "RunSummary",
    "StragglerDelay",
    "parse_fault",
    "parse_straggler",
    "read_progress",
]
