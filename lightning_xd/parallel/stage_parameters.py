"""Which parameters a process of a pipeline holds, and how one plain checkpoint holds every stage's.

A model cut into P stages (``partition`` of its blocks by parameter count) keeps, on each process,
only its own stage's parameters (and any outside the blocks); the other stages' stay on the meta
device, without storage. Parameters recorded on the meta device while the model was built
(``DeferredInit``) are materialised by replaying their initialisation, so they start from exactly
the values the unsplit model would. A checkpoint gathers every stage's part (from the first replica
of each stage) into one plain state dict of the whole model; loading takes back the part a process
holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_xd.comm.communicator import Communicator
from lightning_xd.errors import UserError
from lightning_xd.parallel.deferred_init import DeferredInit
from lightning_xd.parallel.pipeline import partition


def keep_own_stage(
    model: nn.Module, stage_count: int, stage: int, deferred: DeferredInit
) -> tuple[list[nn.Module], list[str]]:
    """Materialise what stage ``stage`` runs; the other stages' parameters stay on (or move to) meta.
    Returns the stage's blocks and the state-dict keys of their parameters and buffers."""
    blocks = list(model.pipeline_blocks())
    parts = partition([sum(p.numel() for p in b.parameters()) for b in blocks], stage_count)
    own = [blocks[i] for i in parts[stage]]
    # by tensor, not by module name: a model may build its blocks afresh around its own layers (MPNN)
    own_ids = {id(p) for m in own for p in m.parameters()}
    others = {
        id(p): p for i, b in enumerate(blocks) if i not in parts[stage] for p in b.parameters() if id(p) not in own_ids
    }
    modules = [model, *blocks]
    everything = {id(p): p for m in modules for p in m.parameters()}
    names = {id(p): name for name, p in model.named_parameters()}
    replacements = deferred.materialise([p for key, p in everything.items() if key not in others], names)
    for key, p in others.items():
        replacements[key] = DeferredInit.on_meta_only(p)
    replace_parameters(modules, replacements)
    deferred.forget()
    own_tensors = {id(t) for m in own for t in [*m.parameters(), *m.buffers()]}
    return own, [k for k, t in model.state_dict(keep_vars=True).items() if id(t) in own_tensors]


def replace_parameters(modules: list[nn.Module], replacements: dict[int, nn.Parameter]) -> None:
    """Put each new parameter wherever the one it replaces was registered (tied weights stay tied)."""
    seen: set[int] = set()
    for root in modules:
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            for name, p in list(module.named_parameters(recurse=False)):
                if id(p) in replacements:
                    setattr(module, name, replacements[id(p)])  # through __setattr__: RNNs update their weight lists


def gather_state_dict(comm: Communicator, module: nn.Module, own_keys: list[str], first_replica: bool) -> dict:
    """The whole model's state dict on every process: each stage's part from its first replica."""
    state = module.state_dict()
    own = {k: v.detach().cpu() for k, v in state.items() if k in own_keys} if first_replica else {}
    every_stage = {k for part in comm.allgather_object(own_keys) for k in part}
    merged = {k: v for k, v in state.items() if k not in every_stage}
    for part in comm.allgather_object(own):
        merged.update(part)
    return merged


def gather_optimizer_states(comm: Communicator, optimizer, first_replica: bool, stage_count: int) -> dict[str, Any]:
    """Every stage's optimizer state (from its first replica), in stage order."""
    parts = comm.allgather_object(optimizer.state_dict() if first_replica else None)
    return {"pipeline_stages": [parts[s] for s in range(stage_count)]}


def load_own_state(module: nn.Module, state: Mapping[str, Any], own_keys: list[str]) -> None:
    """Load the part of a whole-model state dict that this process holds."""
    missing = [k for k in own_keys if k not in state]
    if missing:
        raise UserError(
            f"checkpoint lacks this stage's parameters ({', '.join(missing[:3])} ...); it was not written by this model"
        )
    held = {k for k, t in module.state_dict(keep_vars=True).items() if not t.is_meta}
    module.load_state_dict({k: v for k, v in state.items() if k in held}, strict=False)
