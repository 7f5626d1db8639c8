"""A folder of checkpoints that are either complete and verified, or ignored.

Writing: the checkpoint goes to a temporary file, is fsynced and renamed; then a manifest
(``<name>.json``: sha256, size, step, epoch, world size ...) is written the same way. The
manifest is the commit: a checkpoint without one (a write that was killed) is never loaded, and
one whose bytes do not match its manifest is skipped with a one-line warning.

A manifest also records which run wrote the checkpoint (``run``: model, dataset and strategy
names, also kept inside the checkpoint in its callback's state); a run resumes only a checkpoint
of its own kind (``check_same_run``). Checkpoints written before that record existed resume as before.

The manifest guards against torn writes, not against someone who writes both files: every load
(``load_checkpoint_file``) is restricted to tensors, plain values and numeric numpy arrays, so a
crafted checkpoint is refused with one line before any of it runs. Train.py checks the one it
will resume in the launching process, before a rank starts (``refuse_unsafe``).
"""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from torch import Tensor

from lightning_xd.errors import UserError
from lightning_xd.files import FILE_MODE, file_digest, make_folder, replace_durably, write_json_atomically
from lightning_xd.safe_loading import load_torch_file

MANIFEST_VERSION = 1
RESUME_PATH_FIX = "resume it with that --model, --data and --strategy, or give --resume another checkpoint or never"
AUTO_RESUME_FIX = (
    "--resume auto takes the newest checkpoint of --run-dir: give another --run-dir, or --resume never "
    "to start afresh (its checkpoints are moved aside)"
)
UNSAFE_CHECKPOINT_FIX = (
    "give --resume another checkpoint or never; a checkpoint of your own that holds your classes "
    "(in its hyper-parameters, say) loads once your script allow-lists them with "
    "torch.serialization.add_safe_globals"
)


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """A checkpoint's content, restricted to tensors and plain values (``safe_loading``)."""
    return load_torch_file(path, "checkpoint", UNSAFE_CHECKPOINT_FIX, map_location, mmap)


def refuse_unsafe(path: Path) -> Any:
    """Load ``path`` restricted (tensors memory-mapped, so even a large one is cheap to check): the
    content, or a one-line ``UserError`` when it is refused or is no checkpoint at all."""
    try:
        return load_checkpoint_file(path, mmap=zipfile.is_zipfile(path))
    except UserError:
        raise
    except Exception as err:
        raise UserError(
            f"--resume {path} is not a readable checkpoint ({type(err).__name__}); give a .ckpt written by train.py"
        ) from None


class CheckpointStore:
    """The checkpoints of one run: ``<name>.ckpt`` + ``<name>.json`` pairs in one folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def temporary_path(self, name: str) -> Path:
        """Where ``name`` is written before it is committed (a dot file: never mistaken for one)."""
        make_folder(self.folder)
        return self.folder / f".{name}.ckpt.tmp"

    def commit(self, name: str, info: dict[str, Any]) -> Path:
        """Move the written temporary file into place, then write its manifest (the commit)."""
        tmp, final = self.temporary_path(name), self.folder / f"{name}.ckpt"
        tmp.chmod(FILE_MODE)
        replace_durably(tmp, final)
        manifest = {
            "version": MANIFEST_VERSION,
            "file": final.name,
            "sha256": file_digest(final),
            "bytes": final.stat().st_size,
            "created": time.time(),
            **info,
        }
        write_json_atomically(self.folder / f"{name}.json", manifest, durable=True)
        return final

    def manifests(self, warn: bool = True) -> list[dict[str, Any]]:
        """Committed checkpoints, newest (highest step, then latest) first."""
        found = []
        for path in self.folder.glob("*.json") if self.folder.is_dir() else []:
            try:
                manifest = json.loads(path.read_text())
                manifest["manifest_path"] = str(path)
                found.append(manifest)
            except (OSError, ValueError):
                if warn:
                    print(f"warning: skipping checkpoint manifest {path}: unreadable", flush=True)
        return sorted(found, key=lambda m: (m.get("global_step", -1), m.get("created", 0)), reverse=True)

    def verify(self, manifest: dict[str, Any]) -> str | None:
        """None when the checkpoint matches its manifest, else why it does not."""
        path = self.folder / manifest.get("file", "")
        if not path.is_file():
            return "file missing"
        if path.stat().st_size != manifest.get("bytes"):
            return f"{path.stat().st_size} bytes, manifest says {manifest.get('bytes')} (truncated?)"
        if file_digest(path) != manifest.get("sha256"):
            return "checksum mismatch (corrupt)"
        return None

    def newest_verified(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint whose bytes match its manifest; broken ones are skipped with a warning."""
        for manifest in self.manifests():
            problem = self.verify(manifest)
            if problem is None:
                return self.folder / manifest["file"], manifest
            print(f"warning: skipping checkpoint {manifest.get('file')}: {problem}", flush=True)
        return None

    def prune(self, keep_last: int) -> None:
        """Keep the ``keep_last`` newest committed checkpoints; drop older ones and stale temporaries."""
        for manifest in self.manifests()[keep_last:]:
            (self.folder / manifest["file"]).unlink(missing_ok=True)
            Path(manifest["manifest_path"]).unlink(missing_ok=True)
        for tmp in self.folder.glob(".*.tmp"):
            if time.time() - tmp.stat().st_mtime > 60:  # a temporary left by a killed writer
                tmp.unlink(missing_ok=True)

    def archive(self) -> Path | None:
        """Move the folder aside (a finished run's checkpoints, before a fresh start)."""
        if not self.folder.is_dir() or not any(self.folder.iterdir()):
            return None
        target = self.folder.with_name(f"{self.folder.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.folder.rename(target)
        return target


def check_readable(path: Path) -> dict[str, Any]:
    """``--resume PATH``: the manifest beside it must match; without one, it must at least load."""
    if not path.is_file():
        raise UserError(f"--resume {path}: no such checkpoint file")
    manifest_path = path.with_suffix(".json")
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError:
            raise UserError(f"--resume {path}: its manifest {manifest_path.name} is not valid JSON") from None
        problem = CheckpointStore(path.parent).verify(manifest)
        if problem:
            raise UserError(f"--resume {path}: {problem}; pick another checkpoint or --resume auto")
        refuse_unsafe(path)
        return manifest
    content = refuse_unsafe(path)
    if not isinstance(content, dict) or "state_dict" not in content:
        raise UserError(f"--resume {path} is not a Lightning checkpoint (no state_dict)")
    run = recorded_run(content)
    return {"global_step": content.get("global_step", 0), **({"run": run} if run else {})}


def read_manifest(checkpoint: Path) -> dict[str, Any] | None:
    """The manifest beside ``checkpoint``, unverified; None when there is none or it is unreadable."""
    try:
        manifest = json.loads(checkpoint.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def recorded_run(content: dict) -> dict[str, str] | None:
    """The run a loaded checkpoint says wrote it (kept in its checkpoint callback's state), if any."""
    for state in (content.get("callbacks") or {}).values():
        info = state.get("manifest_info") if isinstance(state, dict) else None
        if isinstance(info, dict) and isinstance(info.get("run"), dict):
            return info["run"]
    return None


def check_same_run(
    path: Path, saved: dict[str, str] | None, run: dict[str, str] | None, fix: str = RESUME_PATH_FIX
) -> None:
    """One-line error when the checkpoint at ``path`` was saved by another model, dataset or strategy
    than ``run``. Nothing is known (and nothing said) of checkpoints that predate the record."""
    if not saved or not run or all(saved.get(key) == run[key] for key in run):
        return
    raise UserError(
        f"checkpoint {path} was saved by model {saved.get('model', '?')} on {saved.get('data', '?')} "
        f"with strategy {saved.get('strategy', '?')}; this run is {run['model']} on {run['data']} with "
        f"strategy {run['strategy']}; {fix}"
    )


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that writes through a CheckpointStore: temporary file, fsync, rename,
    manifest; then keeps the last ``keep_last``. Wrap it in ``BackgroundCheckpointIO`` to
    write from a snapshot in the background instead of stalling training."""

    def __init__(self, keep_last: int = 3):
        super().__init__()
        self.keep_last = keep_last
        self.before_commit = None  # a fault injector's hook: runs between writing and committing

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any | None = None) -> None:
        path = Path(path)
        store, name = CheckpointStore(path.parent), path.name.removesuffix(".ckpt")
        super().save_checkpoint(checkpoint, store.temporary_path(name))
        if self.before_commit is not None:
            self.before_commit(checkpoint.get("global_step", 0))
        info = {"global_step": checkpoint.get("global_step", 0), "epoch": checkpoint.get("epoch", 0)}
        for state in checkpoint.get("callbacks", {}).values():
            if isinstance(state, dict) and "manifest_info" in state:
                info = {**state["manifest_info"], **info}
        store.commit(name, info)
        store.prune(self.keep_last)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        """Always restricted (``load_checkpoint_file``), whatever ``weights_only`` asks."""
        return load_checkpoint_file(path, map_location if map_location is not None else "cpu")

    def remove_checkpoint(self, path) -> None:
        path = Path(path)
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)


def snapshot(content: Any) -> Any:
    """A point-in-time copy of a checkpoint: every tensor cloned, every dict, list and tuple rebuilt,
    other values shared (they are immutable or rebuilt by Lightning at each save). Four times
    cheaper than Lightning's generic ``apply_to_collection`` on a checkpoint's ~900 small entries."""
    if isinstance(content, Tensor):
        return content.detach().clone()
    if isinstance(content, dict):
        copied = ((key, snapshot(value)) for key, value in content.items())
        return dict(copied) if type(content) is dict else type(content)(copied)
    if isinstance(content, list):
        return [snapshot(value) for value in content]
    if type(content) is tuple:
        return tuple(snapshot(value) for value in content)
    return content


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """Lightning's ``AsyncCheckpointIO`` (one writer thread; a failed write is raised at the next save
    and at teardown) with ``snapshot`` as the copy taken in the training thread, the only part of a
    save that stalls training."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any | None = None) -> None:
        self._ensure_setup()
        copy = snapshot(checkpoint)

        def write() -> None:
            try:
                self.checkpoint_io.save_checkpoint(copy, path, storage_options)
            except BaseException as err:  # noqa: BLE001 (kept for the training thread to raise)
                self._error = err

        self._executor.submit(write)
        if self._error:
            raise self._error
