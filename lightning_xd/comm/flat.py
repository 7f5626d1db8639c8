"""Many tensors as one flat buffer: one message or one allreduce instead of one per tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class FlatLayout:
    """Where each of a fixed list of tensors lives inside one flat buffer."""

    def __init__(self, tensors: Sequence[Tensor]):
        self.shapes = [t.shape for t in tensors]
        self.offsets = [0]
        for t in tensors:
            self.offsets.append(self.offsets[-1] + t.numel())
        self.dtype = tensors[0].dtype if tensors else torch.float32
        self.device = tensors[0].device if tensors else torch.device("cpu")

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    def empty(self) -> Tensor:
        return torch.empty(self.numel, dtype=self.dtype, device=self.device)

    def slices(self, flat: Tensor) -> list[Tensor]:
        """Views of ``flat`` shaped like the tensors of the layout."""
        return [flat[a:b].view(shape) for a, b, shape in zip(self.offsets, self.offsets[1:], self.shapes)]

    @torch.no_grad()
    def pack(self, tensors: Sequence[Tensor | None], out: Tensor | None = None) -> Tensor:
        """Copy ``tensors`` into one flat buffer; a missing tensor (None) counts as zeros."""
        flat = self.empty() if out is None else out
        for view, t in zip(self.slices(flat), tensors):
            if t is None:
                view.zero_()
            else:
                view.copy_(t)
        return flat

    @torch.no_grad()
    def unpack(self, flat: Tensor, tensors: Sequence[Tensor]) -> None:
        """Copy the flat buffer's contents back into ``tensors``, in place."""
        for view, t in zip(self.slices(flat), tensors):
            t.copy_(view)
