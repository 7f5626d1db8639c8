"""Files that are either whole or absent: written beside their place, then renamed onto it.

A rename within one folder replaces the old file in one step, so a reader (the supervisor reading
``progress.json``, a resumed run reading a manifest, another rank reading a cache entry) sees the
old content or the new, never half a file. The temporary name starts with a dot and carries the
writer's process id, so writers on one host never share one and no glob for the final names
(``*.json``, ``*.ckpt``) picks it up. ``durable=True`` also fsyncs the file before the rename and
the folder after it, so the new version survives a crash of the machine, not only of the process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def fsync(path: str | Path) -> None:
    """Flush a file's (or a folder's) content from the page cache to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` onto ``final`` so that after a crash one of the two complete versions is there."""
    fsync(tmp)
    os.replace(tmp, final)
    fsync(final.parent)


@contextmanager
def atomic_write(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; renamed onto ``path`` when the block
    ends normally, removed when it raises (``path`` then keeps its old content, if any)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if durable:
            replace_durably(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomically(path: str | Path, content: Any, durable: bool = False) -> Path:
    """``content`` as indented JSON with sorted keys (numbers JSON lacks, such as numpy's or a
    tensor's, as floats), written through ``atomic_write``; returns ``path``."""
    with atomic_write(path, durable) as tmp:
        tmp.write_text(json.dumps(content, indent=2, sort_keys=True, default=float) + "\n")
    return Path(path)
