"""Parameters built on the meta device and materialised later, only where needed, with the values they
would have had.

While ``DeferredInit.recording()`` is active, a module that registers a parameter whose tensor a factory
function (``torch.empty``, ``torch.zeros``, ``torch.randn`` ...) has just made gets a parameter of the same
shape on the meta device instead: no storage. (It answers ``is_meta`` with False, so that code which
skips meta tensors, as some of torch's initialisers do, runs as in a normal build and is recorded or
refused, never silently skipped.) Everything then done to it in place (``nn.init.uniform_``,
``fill_``, ``copy_`` from another tensor ..., on the whole of it or on a view) is recorded in order, with
the state of the random generator each random operation draws from. A random operation is also run once
on a scratch tensor of the same shape, strides, dtype and device, so that the generator advances exactly
as in a normal build and every later tensor gets the same values as it would have. ``materialise(params)``
re-runs the recorded operations of those parameters only, on real tensors, each random one from its
recorded generator state (the generators are restored afterwards).

So the most parameter memory ever allocated while building is one parameter at a time (the tensor a
factory made, until the module registers it), and after ``materialise`` what was materialised.

Left real (correct, only not deferred): a parameter whose tensor was computed (``torch.randn(n) * 0.02``),
loaded, or made outside the recording. Refused with one line: reading a deferred parameter's values while
building (``.item()``, or ``nn.init.trunc_normal_``'s rejection sampling: the meta device has no values),
drawing random numbers into another tensor on the meta device (``nn.init.orthogonal_``), and
materialising a parameter initialised from values computed on the meta device.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_xd.errors import UserError

_HOW_TO_BUILD_WHOLE = "pass deferred_init=False to the hybrid strategy (--deferred-init false) to build the model whole"


@dataclass(eq=False)
class _Op:
    """One recorded call: an aten operator, its arguments (recorded tensors as ``_View``), and the
    generator it draws from with that generator's state just before (random operators only)."""

    seq: int
    func: Any
    args: tuple
    kwargs: dict
    rng: tuple[torch.Generator, Tensor] | None = None


@dataclass(eq=False)
class _Record:
    """How to make one storage again: the factory call that made it, then what was written into it."""

    factory: _Op
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: torch.device
    ops: list[_Op] = field(default_factory=list)
    why_not: str = ""  # set when something done to it cannot be replayed
    deferred: bool = False


@dataclass(eq=False)
class _View:
    """A tensor argument that is (a view of) a recorded storage, by its geometry within that storage."""

    record: _Record
    size: tuple
    stride: tuple
    offset: int


class _CannotReplay(Exception):
    pass


class _DeferredParameter(nn.Parameter):
    """A parameter on the meta device, while the model is being built, that says it is not on it."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__self__", None) is Tensor.is_meta:  # the property's getter
            return False
        with torch._C.DisableTorchFunctionSubclass():  # as nn.Parameter: results are plain tensors
            return func(*args, **(kwargs or {}))


def _on_meta(t: Tensor) -> bool:
    return t.device.type == "meta"  # not ``is_meta``, which a deferred parameter denies


def _storage(t: Tensor):
    try:
        return t.untyped_storage()  # the same Python object for every view of one storage
    except (RuntimeError, NotImplementedError):  # sparse and other layouts without one storage
        return None


def default_generator(device: torch.device | None) -> torch.Generator | None:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return None


def _written(func, args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors an operator writes into (``Tensor(a!)`` in its schema: in-place and ``out=``)."""
    written = []
    for i, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(argument.name)
        written += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, Tensor)]
    return written


class DeferredInit:
    """Records how parameters are built (see the module's docstring); materialises the ones asked for."""

    def __init__(self):
        self._records: dict[int, _Record] = {}  # id(storage) -> how to make it again
        self._deferred: dict[int, tuple[nn.Parameter, _Record]] = {}  # id(meta parameter) -> it, its record
        self._seq = itertools.count()

    def is_deferred(self, param: nn.Parameter) -> bool:
        return id(param) in self._deferred

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        hook = nn.modules.module.register_module_parameter_registration_hook(self._on_register)
        try:
            with _Recorder(self):
                yield
        except (RuntimeError, NotImplementedError) as err:
            if "meta" not in str(err):
                raise
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"building the model on the meta device failed ({first_line}): it reads a "
                f"parameter's values while being built; {_HOW_TO_BUILD_WHOLE}"
            ) from None
        finally:
            hook.remove()

    # ---- while building ------------------------------------------------------------------------------
    def _record_of(self, t: Tensor) -> _Record | None:
        storage = _storage(t)
        return self._records.get(id(storage)) if storage is not None else None

    def _keep_until_freed(self, t: Tensor, record: _Record) -> None:
        """Remember how ``t``'s storage was made for as long as that storage lives."""
        storage = _storage(t)
        if storage is not None:
            self._records[id(storage)] = record
            weakref.finalize(storage, self._records.pop, id(storage), None)

    def _freeze(self, value: Any) -> Any:
        """An argument as it will be replayed: recorded tensors by their geometry, other tensors copied."""
        if isinstance(value, Tensor):
            record = self._record_of(value)
            if record is not None:
                return _View(record, tuple(value.shape), tuple(value.stride()), value.storage_offset())
            if _on_meta(value):
                raise _CannotReplay("it is computed from values that exist only on the meta device")
            return value.detach().clone()
        if isinstance(value, (list, tuple)):
            return type(value)(self._freeze(v) for v in value)
        if isinstance(value, dict):
            return {k: self._freeze(v) for k, v in value.items()}
        return value

    def _rng(self, func, kwargs: dict, device: torch.device) -> tuple[torch.Generator, Tensor] | None:
        generator = kwargs.get("generator") or default_generator(device)
        return (generator, generator.get_state()) if generator is not None else None

    def on_factory(self, func, args: tuple, kwargs: dict) -> Any:
        random = torch.Tag.nondeterministic_seeded in func.tags
        rng = self._rng(func, kwargs, kwargs.get("device")) if random else None
        out = func(*args, **kwargs)
        if isinstance(out, Tensor) and not _on_meta(out) and out.layout == torch.strided:
            op = _Op(next(self._seq), func, args, dict(kwargs), rng)
            if random and rng is None:
                return out  # a generator we cannot save and restore: leave it real
            record = _Record(op, tuple(out.shape), tuple(out.stride()), out.dtype, out.device)
            self._keep_until_freed(out, record)
        return out

    def on_write(self, func, args: tuple, kwargs: dict, written: list[Tensor]) -> Any:
        random = torch.Tag.nondeterministic_seeded in func.tags
        targets = [(t, self._record_of(t)) for t in written]
        if random and any(r is None and _on_meta(t) for t, r in targets):
            # on the meta device it would draw nothing, and every later tensor would get other values
            raise UserError(
                f"cannot build the model on the meta device: {func} draws random numbers into a "
                f"tensor there that is not a parameter (an initialiser such as nn.init.orthogonal_); "
                f"{_HOW_TO_BUILD_WHOLE}"
            )
        recorded = [(t, r) for t, r in targets if r is not None]
        if recorded:
            device = recorded[0][1].device if _on_meta(recorded[0][0]) else recorded[0][0].device
            rng = self._rng(func, kwargs, device) if random else None
            try:
                if random and rng is None:
                    raise _CannotReplay(f"{func} draws from a generator that cannot be saved")
                op = _Op(next(self._seq), func, self._freeze(args), self._freeze(kwargs), rng)
            except _CannotReplay as err:
                for _, record in recorded:
                    record.why_not = record.why_not or f"{func}: {err}"
            else:
                for _, record in recorded:
                    record.ops.append(op)
        out = func(*args, **kwargs)
        meta_targets = [(t, r) for t, r in recorded if _on_meta(t)]
        if random and meta_targets:
            # nothing was drawn on the meta device: draw what a real tensor would have drawn, into a scratch one
            scratch = {
                id(t): torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=r.device) for t, r in meta_targets
            }
            swap = lambda v: scratch.get(id(v), v) if isinstance(v, Tensor) else v  # noqa: E731
            func(*[swap(a) for a in args], **{k: swap(v) for k, v in kwargs.items()})
        return out

    def _on_register(self, module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        """A module registers a parameter: swap it for one on the meta device if we can make it again."""
        if param is None or type(param) is not nn.Parameter or _on_meta(param):
            return None  # None, lazy or custom parameters, ours again (a tied weight), or already on meta
        record = self._record_of(param)
        if (
            record is None
            or record.deferred
            or record.why_not
            or param.storage_offset() != 0
            or tuple(param.shape) != record.shape
            or tuple(param.stride()) != record.stride
            or param.dtype != record.dtype
        ):
            return None
        deferred = _DeferredParameter(
            torch.empty_strided(record.shape, record.stride, dtype=record.dtype, device="meta"),
            requires_grad=param.requires_grad,
        )
        record.deferred = True
        self._records[id(deferred.untyped_storage())] = record  # kept alive by the parameter, held below
        self._deferred[id(deferred)] = (deferred, record)
        return deferred

    # ---- afterwards -------------------------------------------------------------------------------------
    def materialise(
        self, params: Iterable[nn.Parameter], names: dict[int, str] | None = None
    ) -> dict[int, nn.Parameter]:
        """Real parameters for the deferred ones among ``params``, by ``id`` of the meta parameter they replace."""
        wanted = [self._deferred[id(p)] for p in params if id(p) in self._deferred]
        needed: dict[int, _Record] = {}
        stack = [record for _, record in wanted]
        while stack:  # a parameter initialised from another one needs that one too
            record = stack.pop()
            if id(record) in needed:
                continue
            needed[id(record)] = record
            for op in record.ops:
                stack += [v.record for v in tree_flatten((op.args, op.kwargs))[0] if isinstance(v, _View)]
        for param, record in wanted:
            if record.why_not:
                name = (names or {}).get(id(param), f"of shape {tuple(param.shape)}")
                raise UserError(
                    f"parameter {name} cannot be made again from what was recorded while building it "
                    f"on the meta device ({record.why_not}); {_HOW_TO_BUILD_WHOLE}"
                )
        ops = sorted({id(op): op for r in needed.values() for op in (r.factory, *r.ops)}.values(), key=lambda o: o.seq)
        factories = {id(r.factory): r for r in needed.values()}
        generators = {id(op.rng[0]): op.rng[0] for op in ops if op.rng is not None}
        saved = {key: g.get_state() for key, g in generators.items()}
        real: dict[int, Tensor] = {}

        def thaw(value: Any) -> Any:
            if isinstance(value, _View):
                return real[id(value.record)].as_strided(value.size, value.stride, value.offset)
            if isinstance(value, (list, tuple)):
                return type(value)(thaw(v) for v in value)
            if isinstance(value, dict):
                return {k: thaw(v) for k, v in value.items()}
            return value

        try:
            with torch.no_grad():
                for op in ops:
                    if op.rng is not None:
                        op.rng[0].set_state(op.rng[1])
                    out = op.func(*thaw(op.args), **thaw(op.kwargs))
                    if id(op) in factories:
                        real[id(factories[id(op)])] = out
        finally:
            for key, generator in generators.items():
                generator.set_state(saved[key])
        return {
            id(param): nn.Parameter(real[id(record)], requires_grad=param.requires_grad) for param, record in wanted
        }

    def forget(self) -> None:
        """Drop what was recorded (generator states, copied arguments). Deferred parameters not materialised
        must be replaced (``on_meta_only``) before the model is used: they deny being on the meta device."""
        for record in {id(r): r for r in self._records.values()}.values():
            record.ops.clear()  # an operation refers to its record: free them now, not at the next collection
        self._records.clear()
        self._deferred.clear()

    @staticmethod
    def on_meta_only(param: nn.Parameter) -> nn.Parameter:
        """A plain parameter on the meta device in place of ``param`` (deferred or not): no values, no gradient."""
        return nn.Parameter(
            torch.empty_strided(param.shape, param.stride(), dtype=param.dtype, device="meta"), requires_grad=False
        )


class _Recorder(TorchDispatchMode):
    """Sends every aten call made while building to the ``DeferredInit`` that records it."""

    def __init__(self, owner: DeferredInit):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        written = _written(func, args, kwargs)
        if written:
            return self.owner.on_write(func, args, kwargs, written)
        if not any(isinstance(t, Tensor) for t in tree_flatten((args, kwargs))[0]):
            return self.owner.on_factory(func, args, kwargs)
        return func(*args, **kwargs)
