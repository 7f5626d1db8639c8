"""Files that are either whole or absent: written beside their place, then renamed onto it.

Files and folders made here are never writable by other users (0o644 and 0o755, whatever the
umask): a checkpoint, cache or metrics file is only as trustworthy as the folder it lies in.
``writable_by_others`` says why a found file cannot be trusted.

A rename within one folder replaces the old file in one step, so a reader (the supervisor reading
``progress.json``, a resumed run reading a manifest, another rank reading a cache entry) sees the
old content or the new, never half a file. The temporary name starts with a dot and carries the
writer's process id, so writers on one host never share one and no glob for the final names
(``*.json``, ``*.ckpt``) picks it up. ``durable=True`` also fsyncs the file before the rename and
the folder after it, so the new version survives a crash of the machine, not only of the process.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FILE_MODE, FOLDER_MODE = 0o644, 0o755


def make_folder(path: str | Path) -> Path:
    """``mkdir -p`` whose new folders are 0o755 (a group-writable umask such as 002 does not apply)."""
    path = Path(path)
    missing, above = [], path
    while not above.exists() and above.parent != above:
        missing.append(above)
        above = above.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=FOLDER_MODE)
        except FileExistsError:  # another process made it first
            continue
        os.chmod(folder, FOLDER_MODE)
    return path


def keep_others_from_writing() -> None:
    """Add group and other write to the process's umask, so that what libraries create for us
    (Lightning's logs and run folders) is not writable by other users either."""
    os.umask(os.umask(0) | 0o022)


def writable_by_others(path: str | Path) -> str | None:
    """Why someone other than this user (or root) could have written ``path``, or None.

    The file must belong to this user or root and be writable by its owner only, and so must every
    folder above it, except that a sticky folder (such as /tmp) may be writable by all: there
    nobody can rename or delete what another user made."""
    path = Path(path).absolute()
    me = os.geteuid()
    info = path.stat()
    if info.st_uid not in (me, 0):
        return f"{path} belongs to user id {info.st_uid}"
    for item in [path, *path.parents]:
        info = item.stat()
        sticky_folder = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_folder:
            return f"{item} is writable by {'others' if info.st_mode & stat.S_IWOTH else 'its group'}"
    return None


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read a megabyte at a time."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    make_folder(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
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
