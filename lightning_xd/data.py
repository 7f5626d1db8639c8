"""Where datasets and their caches live, and how evaluation data is split over ranks.

The data dir has the layout of ``../shared/data`` (see its SOURCES.md). It may be read-only,
so preprocessed files go to a separate cache dir.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import Dataset

from lightning_xd.errors import DataError
from lightning_xd.files import atomic_write

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
    path.mkdir(parents=True, exist_ok=True)
    return path


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


def digest(paths: Iterable[Path], **settings) -> str:
    """A short hash of files' contents and of settings: names a cache entry that is never stale."""
    import hashlib

    h = hashlib.sha256(repr(sorted(settings.items())).encode())
    for path in paths:
        h.update(path.name.encode())
        h.update(path.read_bytes() if path.is_file() else b"<missing>")
    return h.hexdigest()[:16]


def download_missing(folder: Path, names: Iterable[str], base_url: str, what: str, timeout: float = 20) -> None:
    """Fetch the files of ``names`` missing from ``folder`` from ``base_url``; a one-line error if that fails.

    ``XD_DOWNLOAD=0`` turns downloads off (machines without internet fail at once instead of
    waiting for a timeout).
    """
    import urllib.request

    missing = [n for n in names if not (folder / n).is_file()]
    if not missing:
        return
    hint = f"{what}: put {', '.join(missing)} in {folder}"
    if os.environ.get("XD_DOWNLOAD", "1") == "0":
        raise DataError(f"{hint} (downloads are off: XD_DOWNLOAD=0)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        raise DataError(f"{hint} (the folder is not writable, so they cannot be downloaded)") from None
    for name in missing:
        try:
            with atomic_write(folder / name) as tmp, urllib.request.urlopen(f"{base_url}/{name}", timeout=timeout) as r:
                tmp.write_bytes(r.read())
        except Exception as err:  # no network, 404, timeout ... (the partial file is gone)
            raise DataError(f"{hint} (download from {base_url} failed: {type(err).__name__})") from None


def load_or_build(cache_file: Path, build, what: str):
    """``torch.load(cache_file)``, or ``build()`` saved there first (atomically: never half a file)."""
    import torch

    if cache_file.is_file():
        try:
            return torch.load(cache_file, weights_only=False)
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
