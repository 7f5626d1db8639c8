"""In-job recovery for a synchronous MPI strategy: lose a process, shrink, redo the step, go on.

Mixed into a strategy that has ``comm`` and implements ``use_communicator(comm)``. The unit that is
redone is the optimizer step's window: the batches whose gradients one optimizer step applies (one
batch, or ``accumulate_grad_batches`` of them). It opens at the window's first batch and closes once
its optimizer step is taken, which happens only after every process agreed that the step's
gradients were averaged everywhere (``after_gradient_sync``).

A failure while a window is open, wherever it is noticed (the buffer broadcast before the step, an
on_step ``sync_dist`` log or a metric inside it, the gradient sync, an accumulating micro-step), is
never half-trained: every survivor joins the same agreement, shrinks, and at the window's optimizer
step the survivors drop the window's gradients, re-shard the epoch's rest *from the window's start*
over themselves (``ResumableLoader.reshard_window``) and train the whole window again on batches of
the new shards. So every sample of the epoch is trained exactly once by the survivors, whatever the
position of the failure: the window's samples that the survivors already trained are trained again
and the lost process's are not lost. Micro-steps of an open window after the failure train nothing
(their batches belong to the old sharding). A failure while no window is open (after a step, in
validation, at an epoch end) re-shards what is left of the epoch at once. The re-shard pads the
rest to a multiple of the survivors, as a distributed sampler pads; the padding is counted in the
recovery's record. Every recovery is logged and kept in ``recoveries()``.

A process that hangs, or leaves without MPI noticing, is handled by the watchdog (``ulfm.Watchdog``):
it ends the job for the supervisor. Manual optimization is not redone in the job (its steps are the
module's own): a lost process ends such a job, for the supervisor to restart it from a checkpoint.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, TypeVar

import torch
from lightning.pytorch.loops.optimization.automatic import ClosureResult
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_xd.comm import communicator as comm_layer
from lightning_xd.comm import ulfm
from lightning_xd.fault_tolerance.resumable import ResumableLoader, training_loader

T = TypeVar("T")


class InJobRecovery:
    """Mixin for an ``MPIStrategy`` (listed before it): in-job recovery of its automatic optimization steps."""

    supports_in_job_recovery = True

    def __init__(self, fault_tolerance: str | None = None, collective_timeout: float = 300.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.enable_recovery(fault_tolerance, collective_timeout)

    def enable_recovery(self, fault_tolerance: str | None, collective_timeout: float) -> None:
        """``fault_tolerance``: "ulfm", "none", or None for "ulfm when the job was started with it"."""
        wanted = (fault_tolerance or ("ulfm" if ulfm.available() else "none")) == "ulfm"
        self.ulfm = wanted and ulfm.available() and self.comm.size > 1
        if fault_tolerance == "ulfm" and self.comm.size > 1 and not ulfm.available():
            rank_zero_warn(
                "fault_tolerance='ulfm' is off: the job was not started with `mpirun --with-ft ulfm` "
                "(train.py --nprocs does that); a lost process ends the job"
            )
        self.watchdog = ulfm.Watchdog(collective_timeout) if self.ulfm else None
        self.recovery_events: list[dict[str, Any]] = []
        self._in_step = False  # inside an optimizer step's attempt: a failure is the step's to handle
        self._step_agreed = False  # this attempt already joined its agreement
        if self.ulfm:
            ulfm.enable(self.comm)
            comm_layer.watch_waits(self.watchdog.watching)

    def check_recovery_applies(self, module) -> None:
        """Called at setup: steps a module takes itself (manual optimization) cannot be redone here."""
        if self.ulfm and not module.automatic_optimization:
            self.ulfm = False
            rank_zero_warn(
                "in-job recovery redoes automatic optimization steps only; with manual optimization a lost "
                "process ends the job (--max-restarts restarts it from its last checkpoint)"
            )

    @override
    def setup(self, trainer) -> None:
        self.check_recovery_applies(self.lightning_module)
        super().setup(trainer)

    @override
    def teardown(self) -> None:
        if self.watchdog is not None:
            comm_layer.watch_waits(None)
        super().teardown()

    def recoveries(self) -> list[dict[str, Any]]:
        return self.recovery_events

    def metric_sync_guard(self):
        """A metric's gather is watched like any collective; a process lost there (during validation or
        test, which are not redone on the survivors) ends the job, for the supervisor to restart."""
        return ulfm.detect() if self.ulfm else nullcontext()

    # ---- any operation outside a step: agreed on, retried on the survivors -----------------------
    def run_collective(self, operation: Callable[[], T], what: str = "a collective") -> T:
        if not self.ulfm:
            return operation()
        if self._in_step:  # the step's own handler recovers and redoes the whole step
            with ulfm.detect():
                return operation()
        while True:
            ok, result = True, None
            try:
                with ulfm.detect():
                    result = operation()
            except ulfm.ProcessFailure:
                ok = False
            try:
                ulfm.agree(self.comm, ok)  # succeeded everywhere, or every survivor recovers
                return result
            except ulfm.ProcessFailure:
                self.recover()

    # ---- the training step: the window redone by the survivors on fresh batches ---------------
    @override
    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        if not self.ulfm:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        loader = self._loader()
        step = closure
        if loader is not None and loader.window_stale:  # a failure earlier in this window
            step = self._redo_window(closure, optimizer)
        while True:
            self._in_step, self._step_agreed = True, False
            try:
                with ulfm.detect():
                    result = super().optimizer_step(optimizer, step, model, **kwargs)
                break
            except ulfm.ProcessFailure:
                if not self._step_agreed:  # meet the survivors that got further at their agreement
                    with contextlib.suppress(ulfm.ProcessFailure):
                        ulfm.agree(self.comm, False)
                self._in_step = False
                self.recover()
                step = self._redo_window(closure, optimizer)
            finally:
                self._in_step = False
        if loader is not None:
            loader.end_window()
        return result

    def after_gradient_sync(self) -> None:
        """Called once gradients are averaged: the step is taken only if every process got here."""
        if self.ulfm and self._in_step:
            self._step_agreed = True
            ulfm.agree(self.comm)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        loader = self._loader()
        if self.ulfm and not self._in_step and loader is not None and loader.window_stale:
            # an accumulating micro-step after a failure in its window: its batch belongs to the old
            # sharding; the window's optimizer step trains the whole window again
            return torch.zeros((), device=self.root_device, requires_grad=True)
        return super().training_step(*args, **kwargs)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        loader = self._loader()
        if self.ulfm and loader is not None:
            loader.begin_window()
        super().on_train_batch_start(batch, batch_idx)

    def _redo_window(self, lightning_closure, optimizer) -> Callable[[], Any]:
        """A closure like Lightning's that trains the whole window again on the survivors' new shards."""
        module = self.lightning_module
        trainer = module.trainer
        loader = self._loader()
        batches = []
        window = loader.reshard_window()
        if self.recovery_events:
            self.recovery_events[-1]["padded_samples"] = loader.padding
        for _ in range(window):
            try:
                batches.append(self.batch_to_device(loader.next_batch()))
            except StopIteration:
                break
        batch_idx = trainer.fit_loop.epoch_loop.batch_idx
        normalize = trainer.accumulate_grad_batches

        def redo():
            optimizer.zero_grad()  # the window's gradients so far: their samples are in the new shards
            result = None
            for j, batch in enumerate(batches):
                last = j == len(batches) - 1
                with contextlib.nullcontext() if last else self.block_backward_sync():
                    result = self._train_on(batch, batch_idx, normalize, optimizer)
            lightning_closure._result = result  # what Lightning reads once the step is done
            return None if result is None else result.loss

        return redo

    def _train_on(self, batch: Any, batch_idx: int, normalize: int, optimizer) -> ClosureResult:
        module = self.lightning_module
        previous, module._current_fx_name = module._current_fx_name, "training_step"
        try:
            result = ClosureResult.from_training_step_output(self.training_step(batch, batch_idx), normalize)
        finally:
            module._current_fx_name = previous
        if result.closure_loss is not None:
            self.backward(result.closure_loss, optimizer)
        return result

    # ---- shrinking -------------------------------------------------------------------------
    def recover(self) -> None:
        started = time.perf_counter()
        trainer = self.lightning_module.trainer
        before = self.comm.size
        survivors, lost = ulfm.shrink(self.comm)
        self.use_communicator(survivors)
        self._reshard_after_failure(trainer)
        trainer.fit_loop.epoch_loop.val_loop._combined_loader = None  # next validation: over the survivors
        event = {
            "global_step": trainer.global_step,
            "lost_ranks": lost,
            "world_before": before,
            "world_after": survivors.size,
            "seconds": time.perf_counter() - started,
            "time": time.time(),
            "padded_samples": self._padding_now(),
        }
        self.recovery_events.append(event)
        if self.is_global_zero:
            print(
                f"recovered from the loss of rank(s) {lost} at step {event['global_step']} in "
                f"{event['seconds']:.2f} s; going on with {survivors.size} processes",
                flush=True,
            )
            if trainer.logger is not None:
                trainer.logger.log_metrics({"fault/world_size": survivors.size}, step=trainer.global_step)

    def _reshard_after_failure(self, trainer) -> None:
        """Inside a window the window is redone (re-sharded at its optimizer step); elsewhere in an epoch
        the rest is re-sharded now."""
        loader = self._loader()
        if loader is None or trainer.state.fn != TrainerFn.FITTING or not loader.iterating:
            return
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        if progress.ready > progress.processed:  # a batch fetched, not yet trained: its window is open
            loader.begin_window()
        if not loader.invalidate_window():
            loader.reshard_remaining()

    def _padding_now(self) -> int:
        """Samples the newest re-shard repeats to give every survivor as many (0 until it happens)."""
        loader = self._loader()
        return loader.padding if loader is not None and not loader.window_stale and not self._in_step else 0

    def _loader(self) -> ResumableLoader | None:
        module = self.lightning_module
        return training_loader(module.trainer) if module is not None and module._trainer is not None else None

    def summary_metrics(self) -> dict[str, Any]:
        events = self.recovery_events
        if not events:
            return super().summary_metrics()
        return {
            **super().summary_metrics(),
            "fault/recoveries": len(events),
            "fault/recovery_events": events,
            "fault/recovery_s_mean": sum(e["seconds"] for e in events) / len(events),
        }
