"""BatchNorm over the global batch of every rank of an MPI communicator (``Trainer(sync_batchnorm=True)``).

Lightning's own plugin turns BatchNorm layers into ``torch.nn.SyncBatchNorm``, which needs a
torch.distributed process group (and, on this torch, a GPU). :class:`MPISyncBatchNorm` is the same
switch over our :class:`~lightning_xd.comm.communicator.Communicator`: ``apply(model)`` replaces every
``_BatchNorm`` (BatchNorm1d/2d/3d, torch's SyncBatchNorm, subclasses) by a layer that, in training,
normalises with the statistics of the union of all ranks' batches, exactly as one BatchNorm on
that union batch would; ``revert(model)`` puts the original modules back.

Forward, per channel c, with rank r holding n_r values x of the channel (batch x spatial positions):
one allreduce of one flat tensor ``[S1 (C), S2 (C), n (1)]`` gives the global count n = sum_r n_r,
S1 = sum x and S2 = sum x^2. Each rank computes its own mean m_r and biased variance v_r with
torch's stable ``var_mean`` and contributes n_r m_r and n_r (v_r + m_r^2) in float64, so the
global variance S2/n - mean^2 loses no precision to cancellation. Then

    mean = S1 / n,   var = S2 / n - mean^2,   invstd = 1 / sqrt(var + eps)
    y = (x - mean) * invstd * weight + bias
    running_mean <- (1 - f) running_mean + f mean
    running_var  <- (1 - f) running_var  + f var * n / (n - 1)     (unbiased over the global count)

where f is ``momentum``, or 1 / num_batches_tracked when momentum is None (a cumulative average),
and num_batches_tracked counts training batches, as in ``nn.BatchNorm``. A rank with an empty batch
contributes zeros and still takes part in both allreduces.

Backward. Write xh = (x - mean) * invstd and g = dL/dy, where L is the sum of every rank's loss
(the loss whose gradient data parallelism averages). mean and invstd depend on every rank's x, so

    dL/dx_i  = weight * invstd * (g_i - sum_g / n - xh_i * sum_gxh / n)
    dL/dweight = sum over this rank of g * xh,    dL/dbias = sum over this rank of g

with sum_g = sum of g and sum_gxh = sum of g * xh over ALL ranks: one allreduce of one flat tensor
``[sum_g (C), sum_gxh (C)]``. The weight and bias gradients stay local: the strategy averages
parameter gradients over the ranks like any other (torch's SyncBatchNorm does the same).

Precision: half-precision inputs (bf16 / fp16, e.g. from a convolution under bf16 autocast) are
normalised and differentiated in float32 and returned in their own dtype, the parameters' gradients
in the parameters' dtype. That is what ``F.batch_norm`` does on CPU: autocast leaves batch_norm
alone (a bf16 input gives a bf16 output, float32 weights and running statistics stay float32) and
the kernel accumulates in float32.

Communication. The statistics travel on a duplicate of the communicator (``split``), made once
each time the callable returns a new communicator (after a failure, the survivors'): collectives
are matched by the order they are issued on a communicator, and the gradient buckets' allreduces,
started from autograd hooks during backward, may interleave differently with these on ranks whose
graphs differ (an unused parameter on one rank); on their own communicator they cannot be
mismatched. In eval mode, and on a communicator of one rank, the layer is a plain BatchNorm
(``F.batch_norm``) and does not communicate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning.pytorch.plugins import LayerSync
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from lightning_xd.comm.communicator import Communicator
from lightning_xd.errors import UserError


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # float32 for half precision, float64 stays


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """A per-channel vector shaped to broadcast against ``x`` of shape (N, C, *)."""
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


class _GlobalBatchNorm(torch.autograd.Function):
    """Batch normalisation with the statistics of every rank's batch (formulas: module docstring)."""

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
        factor: float,
        comm: Communicator,
    ) -> Tensor:
        with torch.autocast(input.device.type, enabled=False):
            acc = _accumulation_dtype(input.dtype)
            channels = input.shape[1]
            dims = [0, *range(2, input.dim())]
            x = input.to(acc)
            local_count = input.numel() // channels if channels else 0
            if local_count > 0:
                var, mean = torch.var_mean(x, dim=dims, correction=0)
                mean64, var64 = mean.to("cpu", torch.float64), var.to("cpu", torch.float64)
                sums = torch.cat(
                    [
                        local_count * mean64,
                        local_count * (var64 + mean64 * mean64),
                        torch.tensor([float(local_count)], dtype=torch.float64),
                    ]
                )
            else:  # an empty batch still takes part in the collective
                sums = torch.zeros(2 * channels + 1, dtype=torch.float64)
            comm.allreduce(sums)
            count = float(sums[-1])
            if count <= 1:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got {count:.0f} over "
                    f"all {comm.size} ranks (input size {tuple(input.shape)} on this one)"
                )
            mean64 = sums[:channels] / count
            var64 = (sums[channels : 2 * channels] / count - mean64 * mean64).clamp_(min=0)
            invstd64 = (var64 + eps).rsqrt()
            if running_mean is not None:
                running_mean.mul_(1 - factor).add_((factor * mean64).to(running_mean))
            if running_var is not None:
                running_var.mul_(1 - factor).add_((factor * var64 * count / (count - 1)).to(running_var))
            mean, invstd = mean64.to(input.device, acc), invstd64.to(input.device, acc)
            scale = invstd if weight is None else invstd * weight.to(acc)
            out = (x - _per_channel(mean, x)) * _per_channel(scale, x)
            if bias is not None:
                out = out + _per_channel(bias.to(acc), x)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.count, ctx.comm = count, comm
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.to(input.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        input, weight, mean, invstd = ctx.saved_tensors
        acc = mean.dtype
        dims = [0, *range(2, input.dim())]
        g = grad_output.to(acc)
        xh = (input.to(acc) - _per_channel(mean, g)) * _per_channel(invstd, g)
        sum_g, sum_gxh = g.sum(dim=dims), (g * xh).sum(dim=dims)
        grad_weight = sum_gxh.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_g.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        grad_input = None
        if ctx.needs_input_grad[0]:
            totals = ctx.comm.allreduce(torch.cat([sum_g, sum_gxh]))
            channels = mean.numel()
            mean_g, mean_gxh = totals[:channels] / ctx.count, totals[channels:] / ctx.count
            scale = invstd if weight is None else invstd * weight.to(acc)
            grad_input = ((g - _per_channel(mean_g, g) - xh * _per_channel(mean_gxh, g)) * _per_channel(scale, g)).to(
                input.dtype
            )
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


class MPISyncedBatchNorm(_BatchNorm):
    """A BatchNorm layer whose training statistics cover every rank of a communicator.

    It holds the very parameters, buffers and hooks of the BatchNorm it replaces (same objects, same
    state_dict keys), and that module itself, to give back on :meth:`plain`."""

    def __init__(self, plain: _BatchNorm, channel: Callable[[], Communicator]):
        nn.Module.__init__(self)
        self.num_features, self.eps, self.momentum = plain.num_features, plain.eps, plain.momentum
        self.affine, self.track_running_stats = plain.affine, plain.track_running_stats
        self.training = plain.training
        self._parameters.update(plain._parameters)  # the same objects: optimizers built earlier still see them
        self._buffers.update(plain._buffers)
        self._non_persistent_buffers_set.update(plain._non_persistent_buffers_set)
        for name, value in vars(plain).items():
            if name.startswith("_") and "hook" in name:  # the user's hooks, shared: a handle still removes them
                self.__dict__[name] = value
        # kept out of the module tree (and out of state_dict): the module revert() hands back
        self.__dict__["_plain"] = plain
        self.__dict__["_channel"] = channel

    def _check_input_dim(self, input: Tensor) -> None:
        self._plain._check_input_dim(input)  # BatchNorm1d / 2d / 3d each accept their own shapes

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        comm = self._channel()
        if comm.size == 1:
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        tracked = self.track_running_stats
        return _GlobalBatchNorm.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            self.eps,
            factor,
            comm,
        )

    def plain(self) -> _BatchNorm:
        """The original BatchNorm module, holding this layer's current parameters, buffers and mode."""
        plain = self._plain
        plain._parameters.update(self._parameters)
        plain._buffers.update(self._buffers)  # .to(device) / .double() replace buffers after apply()
        plain.training = self.training
        return plain


def _children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every child under every name (``named_children`` skips a module's second name)."""
    return [(name, child) for name, child in module._modules.items() if child is not None]


def _replaces(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm) and not isinstance(module, MPISyncedBatchNorm)


class MPISyncBatchNorm(LayerSync):
    """Lightning's ``sync_batchnorm`` over MPI: BatchNorm statistics of the global batch.

    ``communicator`` returns the communicator of the ranks whose batches form the global batch; it is
    called at every training forward, so a strategy that shrinks its communicator after a failure is
    followed."""

    def __init__(self, communicator: Callable[[], Communicator]):
        self._communicator = communicator
        self._source: Communicator | None = None
        self._channel: Communicator | None = None

    def channel(self) -> Communicator:
        """A duplicate of the current communicator, for the statistics alone (see the module docstring)."""
        comm = self._communicator()
        if comm is not self._source:
            self._channel = comm.split(0) if comm.size > 1 else comm  # collective: every rank is in forward
            self._source = comm
        return self._channel

    def apply(self, model: nn.Module) -> nn.Module:
        """Replace every BatchNorm of ``model`` (itself included) by an :class:`MPISyncedBatchNorm`."""
        return self._convert(model, "", {})

    def _convert(self, module: nn.Module, name: str, done: dict[int, nn.Module]) -> nn.Module:
        if id(module) in done:  # a module registered twice stays one module
            return done[id(module)]
        converted = module
        if _replaces(module):
            if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
                raise UserError(
                    f"sync_batchnorm cannot convert the lazy BatchNorm {name or 'model'!r} before its "
                    "first forward: give it num_features (nn.BatchNorm*d) or run one batch through it "
                    "first"
                )
            converted = MPISyncedBatchNorm(module, self.channel)
        done[id(module)] = converted
        for child_name, child in _children(module):
            converted.add_module(child_name, self._convert(child, f"{name}.{child_name}".lstrip("."), done))
        return converted

    def revert(self, model: nn.Module) -> nn.Module:
        """Give back the original BatchNorm modules, with the parameters, buffers and mode they have now."""
        return self._revert(model, {})

    def _revert(self, module: nn.Module, done: dict[int, nn.Module]) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        reverted = module.plain() if isinstance(module, MPISyncedBatchNorm) else module
        done[id(module)] = reverted
        for child_name, child in _children(module):
            reverted.add_module(child_name, self._revert(child, done))
        return reverted
