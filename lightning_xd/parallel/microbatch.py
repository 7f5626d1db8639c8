"""Split a batch into micro-batches for pipeline schedules, whatever the batch is made of."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_xd.errors import UserError


def _bounds(n: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, n))  # a batch smaller than ``parts`` (the last one, say) gets fewer
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(edges, edges[1:]))


def _length(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, (list, tuple)):
        return _length(batch[0])
    if isinstance(batch, dict):
        return _length(next(iter(batch.values())))
    raise TypeError


def split_batch(batch: Any, parts: int) -> list:
    """Tensors and (nested) tuples, lists and dicts of them are cut along dimension 0;
    PyG batches of graphs are cut into groups of whole graphs. Never more parts than samples."""
    if parts == 1:
        return [batch]
    if hasattr(batch, "to_data_list") and hasattr(batch, "num_graphs"):  # torch_geometric Batch
        from torch_geometric.data import Batch

        return [
            Batch.from_data_list(batch.index_select(list(range(a, b)))) for a, b in _bounds(batch.num_graphs, parts)
        ]
    try:
        bounds = _bounds(_length(batch), parts)
    except TypeError:
        raise UserError(
            f"cannot split a batch of type {type(batch).__name__} into micro-batches; give the model "
            "a split_microbatches(batch, parts) method"
        ) from None
    return [_slice(batch, a, b) for a, b in bounds]


def _slice(batch: Any, a: int, b: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[a:b]
    if isinstance(batch, tuple):
        return tuple(_slice(x, a, b) for x in batch)
    if isinstance(batch, list):
        return [_slice(x, a, b) for x in batch]
    if isinstance(batch, dict):
        return {k: _slice(v, a, b) for k, v in batch.items()}
    return batch


def microbatch_size(batch: Any) -> int:
    try:
        return batch.num_graphs if hasattr(batch, "num_graphs") else _length(batch)
    except TypeError:
        return 1


def sample_shares(microbatches: list) -> list[float]:
    """Each micro-batch's share of the batch's samples (graphs, for batches of graphs).

    A micro-batch's mean loss weighted by its share makes the sum over micro-batches the batch's mean
    loss, whatever their sizes: cuts of 10 samples into 2/3/3/2 or a last batch with fewer micro-batches
    than asked. Micro-batches of a kind we cannot count weigh the same.
    """
    sizes = [microbatch_size(mb) for mb in microbatches]
    total = sum(sizes)
    return [size / total for size in sizes] if total > 0 else [1.0 / len(microbatches)] * len(microbatches)
