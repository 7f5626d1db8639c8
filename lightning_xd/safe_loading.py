"""Reading files that other people can write, without running code from them.

Pickle, the format behind ``torch.save`` and several raw datasets, rebuilds objects by calling
whatever the file names: a crafted checkpoint, cache or dataset file could run any command in
every rank that opens it. Two restricted readers close that door:

- ``load_torch_file`` is ``torch.load(weights_only=True)``, torch's restricted unpickler. It
  builds tensors, plain Python values (numbers, strings, lists, tuples, dicts) and the globals
  allow-listed with ``torch.serialization.add_safe_globals`` (PyG lists its ``Data`` classes
  there). We add numeric numpy arrays, which checkpoints hold (numpy's RNG state) and caches of
  tables hold. A file that names anything else is refused with ``UnsafeFileError`` naming the
  file and the global; nothing of it is built or run.
- ``load_plain_pickle`` reads raw formats that are plain pickles (Planetoid's ``ind.cora.*``,
  CIFAR-10's python batches) with a ``pickle.Unpickler`` whose ``find_class`` hands out only the
  classes and functions the format is made of, named by the caller; any other name is refused
  the same way.
"""

from __future__ import annotations

import pickle
import re
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lightning_xd.errors import UserError


class UnsafeFileError(UserError):
    """A file names a class or function that a restricted reader does not build."""


def numeric_numpy_globals() -> list:
    """What rebuilding a numpy array of numbers takes: the array class, its reconstructor and the
    numeric dtype classes. Arrays of Python objects are refused (their items would be pickles)."""
    from numpy._core.multiarray import _reconstruct

    dtype_classes = [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"]
    return [_reconstruct, np.ndarray, np.dtype, *dtype_classes]


def _refused_global(err: Exception) -> str | None:
    """The global torch's restricted unpickler refused, from its message; None when it refused no
    global (bytes that are no pickle, an opcode it does not know: a damaged file, reported as such)."""
    found = re.search(r"GLOBAL (\S+?)[,.]?(\s|$)", str(err))
    return found.group(1) if found else None


def refusal(what: str, path: Path, name: str, fix: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"{what} {path} was refused: it needs {name}, which a safe load does not build (loading it could "
        f"run code from the file); {fix}"
    )


def load_torch_file(path: str | Path, what: str, fix: str, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` restricted to tensors, plain values, numeric numpy arrays and allow-listed globals.

    ``UnsafeFileError`` (a one-line refusal: ``what``, the file, the global it names, ``fix``) for a
    file that needs anything else; other failures (a truncated or foreign file) raise as torch raises
    them, for the caller to report. ``mmap=True`` maps the tensors instead of reading them: a cheap
    check of a large checkpoint's structure."""
    import torch

    path = Path(path)
    try:
        with torch.serialization.safe_globals(numeric_numpy_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        name = _refused_global(err)
        if name is None:
            raise
        raise refusal(what, path, name, fix) from None


class _AllowListUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the ``(module, name)`` pairs it is given (Python 2 names are
    mapped to Python 3 first, as the default unpickler does)."""

    def __init__(self, file, allowed: set[tuple[str, str]], describe, encoding: str):
        super().__init__(file, encoding=encoding)
        self.allowed, self.describe = allowed, describe

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in NAME_MAPPING:
            module, name = NAME_MAPPING[(module, name)]
        module = IMPORT_MAPPING.get(module, module)
        if (module, name) not in self.allowed:
            raise self.describe(f"{module}.{name}")
        return super().find_class(module, name)


def load_plain_pickle(
    path: str | Path, allowed: Iterable[tuple[str, str]], what: str, fix: str, encoding: str = "latin1"
) -> Any:
    """A plain pickle read with only the ``allowed`` ``(module, name)`` globals resolvable; ``encoding``
    decodes Python 2 strings (``"latin1"`` for numpy arrays, ``"bytes"`` to keep them bytes).

    ``UnsafeFileError`` for a file that names anything else; other failures (not a pickle, a
    truncated one) raise as pickle raises them, for the caller to report."""
    path = Path(path)
    with open(path, "rb") as f:
        return _AllowListUnpickler(f, set(allowed), lambda name: refusal(what, path, name, fix), encoding).load()
