"""In-job recovery for a synchronous MPI strategy: lose a process, shrink, redo the step, go on.

Mixed into a strategy that has ``comm`` and implements ``use_communicator(comm)``. When a
process dies, the interrupted step is redone by the survivors on a fresh batch from what is
left of the epoch, re-sharded over them (no sample dropped or seen twice); Lightning's own
collectives (logging, checkpoints, metrics) are retried on the survivors. Every recovery is
logged and kept in ``recoveries``.
"""
from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

from lightning.pytorch.loops.optimization.automatic import ClosureResult

from lightning_xd import ulfm
from lightning_xd.resumable import training_loader

T = TypeVar("T")


class InJobRecovery:
    supports_ulfm = True

    def enable_recovery(self, fault_tolerance: str, collective_timeout: float) -> None:
        self.ulfm = (self.supports_ulfm and fault_tolerance == "ulfm" and ulfm.available()
                     and self.comm.size > 1)
        self.watchdog = ulfm.Watchdog(collective_timeout) if self.ulfm else None
        self.recoveries: list[dict[str, Any]] = []
        if self.ulfm:
            ulfm.enable(self.comm)

    # ---- any operation: retried on the survivors ------------------------------------------
    def with_recovery(self, operation: Callable[[], T], what: str = "a collective") -> T:
        while True:
            try:
                with ulfm.detect(self.watchdog, what):
                    result = operation()
                    if self.ulfm:
                        ulfm.agree(self.comm)  # it succeeded everywhere, or everybody recovers
                return result
            except ulfm.ProcessFailure:
                if not self.ulfm:
                    raise
                self.recover()

    # ---- the training step: redone by the survivors on a fresh batch ----------------------
    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        if not getattr(self, "ulfm", False):
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        step = closure
        while True:
            try:
                with ulfm.detect(self.watchdog, "a training step"):
                    return super().optimizer_step(optimizer, step, model, **kwargs)
            except ulfm.ProcessFailure:
                self.recover()
                step = self._redo(closure, optimizer)

    def after_gradient_sync(self) -> None:
        """Called once gradients are averaged: apply the step only if every process got there."""
        if getattr(self, "ulfm", False):
            ulfm.agree(self.comm)

    def _redo(self, lightning_closure, optimizer) -> Callable[[], Any]:
        """A closure like Lightning's, on the next batch of the re-sharded data."""
        module = self.lightning_module
        trainer = module.trainer
        batch = self.batch_to_device(training_loader(trainer).next_batch())
        batch_idx = trainer.fit_loop.epoch_loop.batch_progress.current.processed

        def redo():
            optimizer.zero_grad()
            previous, module._current_fx_name = module._current_fx_name, "training_step"
            try:
                result = ClosureResult.from_training_step_output(module.training_step(batch, batch_idx))
            finally:
                module._current_fx_name = previous
            lightning_closure._result = result  # what Lightning reads once the step is done
            self.backward(result.closure_loss, optimizer)
            return result.loss

        return redo

    # ---- shrinking -------------------------------------------------------------------------
    def recover(self) -> None:
        started = time.perf_counter()
        trainer = self.lightning_module.trainer
        before = self.comm.size
        with ulfm.detect(self.watchdog, "shrinking the communicator"):
            survivors, lost = ulfm.shrink(self.comm)
        self.use_communicator(survivors)
        loader = training_loader(trainer)
        if loader is not None and trainer.training:
            loader.reshard_remaining()
        trainer.fit_loop.epoch_loop.val_loop._combined_loader = None  # next validation: over the survivors
        event = {"global_step": trainer.global_step, "lost_ranks": lost, "world_before": before,
                 "world_after": survivors.size, "seconds": time.perf_counter() - started,
                 "time": time.time()}
        self.recoveries.append(event)
        if self.is_global_zero:
            print(f"recovered from the loss of rank(s) {lost} at step {event['global_step']} in "
                  f"{event['seconds']:.2f} s; going on with {survivors.size} processes", flush=True)
            if trainer.logger is not None:
                trainer.logger.log_metrics({"fault/world_size": survivors.size}, step=trainer.global_step)

    # ---- Lightning's collectives, retried ----------------------------------------------------
    def reduce(self, *args: Any, **kwargs: Any) -> Any:
        return self.with_recovery(lambda: super(InJobRecovery, self).reduce(*args, **kwargs), "reduce")

    def all_gather(self, *args: Any, **kwargs: Any) -> Any:
        return self.with_recovery(lambda: super(InJobRecovery, self).all_gather(*args, **kwargs), "all_gather")

    def all_gather_object(self, obj: Any) -> list:
        return self.with_recovery(lambda: super(InJobRecovery, self).all_gather_object(obj), "all_gather")

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return self.with_recovery(lambda: super(InJobRecovery, self).broadcast(obj, src), "broadcast")

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return self.with_recovery(lambda: super(InJobRecovery, self).reduce_boolean_decision(decision, all),
                                  "a decision")

    def barrier(self, name: Any = None) -> None:
        self.with_recovery(lambda: super(InJobRecovery, self).barrier(name), f"barrier {name or ''}")

    def recovery_metrics(self) -> dict[str, Any]:
        events = getattr(self, "recoveries", [])
        return {"fault/recoveries": len(events), "fault/recovery_events": events,
                "fault/recovery_s_mean": sum(e["seconds"] for e in events) / max(1, len(events))} if events else {}
