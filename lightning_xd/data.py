"""Where datasets and their caches live, and how evaluation data is split over ranks.

The data dir has the layout of ``../shared/data`` (see its SOURCES.md). It may be read-only,
so preprocessed files go to a separate cache dir. A cache holds tensors, plain Python values and
numeric numpy arrays only, and is read back with ``safe_loading.load_torch_file``: an entry that
needs anything else was not written by us and is refused. An entry that another user could have
written (``files.writable_by_others``) is not read at all: the data is built in memory instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import Dataset

from lightning_xd.errors import DataError
from lightning_xd.files import atomic_write, make_folder, writable_by_others

if TYPE_CHECKING:
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler


def cache_dir(data_dir: str | Path, cache: str | Path | None = None) -> Path:
    """``cache`` if given, else ``<data_dir>/cache`` when writable, else ``~/.cache/lightning_xd``."""
    if cache:
        path = Path(cache)
    elif os.access(data_dir, os.W_OK):
        path = Path(data_dir) / "cache"
    else:
        path = Path.home() / ".cache" / "lightning_xd"
    return make_folder(path)


def require_files(folder: Path, names: Iterable[str], what: str) -> list[Path]:
    """The paths of ``names`` in ``folder``, or a one-line error listing the missing ones."""
    paths = [folder / n for n in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"{what}: missing {', '.join(missing)} in {folder} (set --data-dir or XD_DATA_DIR "
            "to a folder laid out like ../shared/data)"
        )
    return paths


def eval_sampler(dataset: Dataset, trainer) -> UnrepeatedDistributedSampler | None:
    """Shard validation/test data so that every sample is scored exactly once over all ranks.

    Lightning's own distributed sampler pads the last shard with repeated samples, which would
    count them twice in an epoch metric.
    """
    shards = trainer.distributed_sampler_kwargs if trainer is not None else None
    if not shards or shards.get("num_replicas", 1) <= 1:
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, shuffle=False, **shards)


CACHE_FORMAT = 2  # part of every cache key: entries of the format that pickled objects are never read


def digest(paths: Iterable[Path], **settings) -> str:
    """A short hash of files' contents and of settings: names a cache entry that is never stale."""
    import hashlib

    h = hashlib.sha256(repr(sorted({**settings, "cache_format": CACHE_FORMAT}.items())).encode())
    for path in paths:
        h.update(path.name.encode())
        h.update(path.read_bytes() if path.is_file() else b"<missing>")
    return h.hexdigest()[:16]


def _untrusted(cache_file: Path) -> str | None:
    """Why ``cache_file`` (or, before it exists, the nearest folder above it) may hold another user's bytes."""
    place = cache_file
    while not place.exists() and place.parent != place:
        place = place.parent
    return writable_by_others(place)


def load_or_build(cache_file: Path, build, what: str):
    """The content cached in ``cache_file``, or ``build()`` saved there first (atomically: never half a file).

    Read with the restricted loader: an entry that needs more than tensors, plain values and numeric
    numpy arrays is refused (``UnsafeFileError``, one line); a damaged entry is rebuilt. Where another
    user could write the entry, it is neither read nor written: the content is built in memory."""
    import torch

    from lightning_xd.safe_loading import UnsafeFileError, load_torch_file

    doubt = _untrusted(cache_file)
    if doubt:
        print(
            f"warning: not using the cache {cache_file} ({doubt}); building {what} in memory "
            "(give --cache-dir a folder only you can write)",
            flush=True,
        )
        return build()
    if cache_file.is_file():
        try:
            return load_torch_file(cache_file, f"cache entry of {what}", "delete it: lightning_xd did not write it")
        except UnsafeFileError:
            raise
        except Exception:  # a damaged cache entry is rebuilt, not trusted
            cache_file.unlink(missing_ok=True)
    content = build()
    with atomic_write(cache_file) as tmp:
        torch.save(content, tmp)
    return content


def rank_shard(trainer) -> tuple[int, int]:
    """(rank, number of shards) this process reads: for datamodules that shard data themselves."""
    shards = trainer.distributed_sampler_kwargs if trainer is not None else None
    if not shards:
        return 0, 1
    return shards.get("rank", 0), shards.get("num_replicas", 1)
