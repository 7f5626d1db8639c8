"""Rich progress bars for long preparation steps (decoding images, windowing signals), shown by
the first process only: the other ranks of a job wait at a barrier meanwhile."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from lightning_xd.comm.environment import is_first_process

T = TypeVar("T")


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over ``items`` with a Rich progress bar (on the first process only)."""
    if not is_first_process():
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        yield from bar.track(items, total=total, description=description)
