"""What the stages of a pipeline must agree on about a step's gradients, each holding its own share.

Under a GradScaler each process's scaler checks only its own gradients: a stage that stepped while
another skipped would leave the model inconsistent and the stages' scales apart, so an overflow on
any process makes every process skip (``agree_on_overflow``). Clipping by norm must use the norm
of the whole model's gradient: the stages' shares of it, summed over the pipeline
(``clip_by_global_norm``; replicas hold the same averaged gradients, so each stage counts once).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_xd.comm.communicator import Communicator


def agree_on_overflow(comm: Communicator, params: list[nn.Parameter]) -> None:
    """If any process has an inf/nan gradient, make this process's scaler see one too (an inf written
    into one of its gradients: the step is skipped anyway)."""
    grads = [p.grad for p in params if p.grad is not None]
    values = [g.coalesce().values() if g.is_sparse else g for g in grads]
    here = any(not bool(torch.isfinite(v).all()) for v in values)
    anywhere = bool(comm.allreduce(torch.tensor([int(here)], dtype=torch.int32), "max")[0])
    if anywhere and not here and values:
        values[0].fill_(float("inf"))


def clip_by_global_norm(pipe: Communicator, params: list[nn.Parameter], clip_val: float) -> None:
    """Clip ``params``' gradients by the norm over every stage of the pipeline ``pipe``."""
    params = [p for p in params if p.grad is not None]
    local = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    squared = pipe.allreduce(local.detach().double().pow(2).cpu().reshape(1), "sum")
    total = squared.sqrt().to(local.device, local.dtype).reshape(())
    torch.nn.utils.clip_grads_with_norm_(params, clip_val, total)
