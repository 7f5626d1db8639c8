"""Nothing we read can run code: a checkpoint, a cache entry, a graph partition or a raw dataset
pickle whose unpickling would create a marker file is refused with one line, and the marker does
not exist afterwards; downloads are kept only when their sha256 is the pinned one; what we write
is not writable by other users, and a cache that others could have written is not read."""

from __future__ import annotations

import functools
import http.server
import json
import os
import pickle
import shutil
import threading
from pathlib import Path

import pytest
import torch
from conftest import ready_datamodule

from lightning_xd.data import load_or_build
from lightning_xd.errors import DataError
from lightning_xd.fault_tolerance.checkpoints import CheckpointStore, load_checkpoint_file
from lightning_xd.files import atomic_write, file_digest, make_folder, writable_by_others
from lightning_xd.safe_loading import UnsafeFileError, load_plain_pickle

SHARED_CORA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cora" / "planetoid_raw"


class CreatesMarker:
    """Unpickled without restriction, this runs ``touch MARKER``: what a crafted file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_torch_file(path: Path, marker: Path, **content) -> Path:
    """A ``torch.save`` file (zip format) that holds the payload beside ordinary content."""
    torch.save({"state_dict": {"w": torch.ones(2)}, **content, "payload": CreatesMarker(marker)}, path)
    return path


def crafted_plain_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps(CreatesMarker(marker), protocol=2))
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "code-ran"


def test_the_payload_runs_when_unpickled_without_restriction(tmp_path, marker):
    """The refusals below mean something: an ordinary load of these files does run the payload."""
    torch.load(crafted_torch_file(tmp_path / "a.ckpt", marker), weights_only=False)
    assert marker.exists()
    marker.unlink()
    pickle.loads(crafted_plain_pickle(tmp_path / "b", marker).read_bytes())
    assert marker.exists()


def one_line(err: Exception) -> str:
    text = str(err)
    assert len(text.splitlines()) == 1, text
    return text


# ---- checkpoints -------------------------------------------------------------------------------
def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, marker):
    path = crafted_torch_file(tmp_path / "step.ckpt", marker)
    with pytest.raises(UnsafeFileError) as err:
        load_checkpoint_file(path)
    assert "posix.system" in one_line(err.value) and str(path) in str(err.value)
    assert not marker.exists()


def test_our_own_checkpoint_content_loads(tmp_path):
    """What train.py's checkpoints hold (tensors, plain values, numpy's RNG state) passes."""
    import random

    import numpy as np

    content = {
        "state_dict": {"w": torch.ones(3)},
        "rng": [{"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}],
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 1}}}},
    }
    torch.save(content, tmp_path / "ok.ckpt")
    loaded = load_checkpoint_file(tmp_path / "ok.ckpt")
    assert np.array_equal(loaded["rng"][0]["numpy"][1], content["rng"][0]["numpy"][1])


def crafted_run_checkpoint(run_dir: Path, marker: Path) -> Path:
    """A crafted checkpoint committed in ``run_dir`` with a manifest that matches its bytes (someone
    who can write one file can write both)."""
    store = CheckpointStore(run_dir / "checkpoints")
    crafted_torch_file(store.temporary_path("step-000000004"), marker, global_step=4, epoch=0)
    store.commit("step-000000004", {"global_step": 4, "epoch": 0})
    return store.folder / "step-000000004.ckpt"


@pytest.mark.parametrize("resume", ["path", "auto"])
def test_resuming_a_crafted_checkpoint_is_one_line_before_the_job_starts(
    one_line_error, no_ranks, tiny_data, tmp_path, marker, resume
):
    path = crafted_run_checkpoint(tmp_path / "run", marker)
    err = one_line_error(
        *("--model", "gcn", "--strategy", "mpi", "--nprocs", "2"),
        *("--data-dir", str(tiny_data), "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run")),
        *("--resume", str(path) if resume == "path" else "auto"),
    )
    assert "was refused" in err and "posix.system" in err and "step-000000004.ckpt" in err
    assert not marker.exists()


# ---- caches and partitions ---------------------------------------------------------------------
@pytest.mark.parametrize("format", ["torch.save", "plain pickle"])
def test_a_crafted_cache_entry_is_refused_and_runs_nothing(tmp_path, marker, format):
    entry = tmp_path / "cache" / "ecg5000" / "0123456789abcdef.pt"
    make_folder(entry.parent)
    if format == "torch.save":
        crafted_torch_file(entry, marker)
    else:
        crafted_plain_pickle(entry, marker)
    built = []
    with pytest.raises(UnsafeFileError) as err:
        load_or_build(entry, lambda: built.append(1), "ECG5000 beats")
    assert str(entry) in one_line(err.value)
    assert not marker.exists() and not built


def test_cache_entries_of_every_kind_we_write_load_back(tmp_path):
    import numpy as np

    content = {"x": torch.arange(4), "table": np.linspace(0, 1, 5), "labels": np.arange(3), "n": 3, "name": "a"}
    entry = tmp_path / "cache" / "entry.pt"
    assert load_or_build(entry, lambda: content, "test data") is content  # built and written
    loaded = load_or_build(entry, lambda: pytest.fail("rebuilt a sound entry"), "test data")
    assert np.array_equal(loaded["table"], content["table"]) and loaded["name"] == "a"


def test_a_crafted_partition_is_refused_in_setup_and_by_train_py(one_line_error, tiny_data, tmp_path, marker):
    from lightning_xd.datamodules.cora_graph import CoraGraphDataModule

    ready = ready_datamodule(CoraGraphDataModule, tiny_data, tmp_path, nprocs=1)
    part = ready._part_folder(1) / "part0.pt"
    crafted_torch_file(part, marker)
    with pytest.raises(UnsafeFileError) as err:
        ready_datamodule(CoraGraphDataModule, tiny_data, tmp_path, nprocs=1)
    assert "graph part 0" in one_line(err.value) and str(part) in str(err.value)
    err = one_line_error(
        *("--model", "graphsage", "--data", "cora-graph", "--fast-dev-run"),
        *("--data-dir", str(tiny_data), "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run")),
    )
    assert "was refused" in err and "part0.pt" in err
    assert not marker.exists()


def test_a_cache_that_others_can_write_is_neither_read_nor_written(tmp_path, marker, capsys):
    shared = tmp_path / "shared-cache"
    make_folder(shared)
    shared.chmod(0o777)  # anyone may write here (not sticky)
    entry = shared / "entry.pt"
    crafted_torch_file(entry, marker)
    content = load_or_build(entry, lambda: {"built": torch.ones(1)}, "test data")
    assert content["built"].item() == 1 and not marker.exists()
    assert "not using the cache" in capsys.readouterr().out
    fresh = shared / "fresh.pt"
    load_or_build(fresh, lambda: {"built": torch.ones(1)}, "test data")
    assert not fresh.exists()


def test_who_could_have_written_a_file(tmp_path):
    mine = tmp_path / "mine"
    mine.write_text("x")
    mine.chmod(0o644)
    assert writable_by_others(mine) is None
    mine.chmod(0o664)
    assert "writable by its group" in writable_by_others(mine)
    mine.chmod(0o644)
    if os.geteuid() == 0:  # as in CI: root can give a file to another user
        os.chown(mine, 12345, -1)
        assert "belongs to user id 12345" in writable_by_others(mine)
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    open_folder.chmod(0o1777)  # sticky, as /tmp: others cannot replace what is ours
    (open_folder / "f").write_text("x")
    (open_folder / "f").chmod(0o644)
    assert writable_by_others(open_folder / "f") is None


def test_what_we_write_is_not_writable_by_others_under_a_loose_umask(tmp_path):
    old = os.umask(0o000)
    try:
        folder = make_folder(tmp_path / "a" / "b")
        with atomic_write(folder / "f.json") as tmp:
            tmp.write_text("{}")
        store = CheckpointStore(tmp_path / "run" / "checkpoints")
        store.temporary_path("step").write_bytes(b"x")
        store.commit("step", {"global_step": 1})
    finally:
        os.umask(old)
    for path in (tmp_path / "a", folder, tmp_path / "run" / "checkpoints"):
        assert path.stat().st_mode & 0o777 == 0o755, path
    for path in (folder / "f.json", store.folder / "step.ckpt", store.folder / "step.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path


# ---- raw pickles: Planetoid and CIFAR-10 --------------------------------------------------------
def copy_cora(tiny_data: Path, root: Path) -> Path:
    folder = root / "cora" / "planetoid_raw"
    shutil.copytree(tiny_data / "cora" / "planetoid_raw", folder)
    return folder


def test_a_crafted_planetoid_file_is_refused_even_in_a_trusted_folder(one_line_error, tiny_data, tmp_path, marker):
    folder = copy_cora(tiny_data, tmp_path / "data")
    crafted_plain_pickle(folder / "ind.cora.graph", marker)
    err = one_line_error(
        *("--model", "gcn", "--fast-dev-run", "--trust-data-dir"),
        *("--data-dir", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "c"), "--run-dir", str(tmp_path / "r")),
    )
    assert "ind.cora.graph was refused" in err and "posix.system" in err
    assert not marker.exists()


def test_planetoid_files_other_than_the_release_need_trust(one_line_error, tiny_data, tmp_path, monkeypatch):
    monkeypatch.delenv("XD_TRUST_DATA_DIR")
    copy_cora(tiny_data, tmp_path / "data")
    err = one_line_error(
        *("--model", "gcn", "--fast-dev-run"),
        *("--data-dir", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "c"), "--run-dir", str(tmp_path / "r")),
    )
    assert "differ from the published release" in err and "--trust-data-dir" in err


@pytest.mark.skipif(not SHARED_CORA.is_dir(), reason="needs ../shared/data")
def test_the_real_planetoid_files_are_the_pinned_release_and_read_restricted():
    from lightning_xd.datamodules.cora import PLANETOID_GLOBALS, RELEASE, check_planetoid_files

    assert {name: file_digest(SHARED_CORA / name) for name in RELEASE} == RELEASE
    check_planetoid_files(SHARED_CORA, trusted=False)  # hashes match, every pickle reads restricted
    graph = load_plain_pickle(SHARED_CORA / "ind.cora.graph", PLANETOID_GLOBALS, "Planetoid file", "")
    assert len(graph) == 2708


def test_a_crafted_cifar10_batch_is_refused(tmp_path, marker):
    from generators.cifar10 import write_cifar10_batches

    from lightning_xd.datamodules.cifar10 import CIFAR10DataModule

    write_cifar10_batches(tmp_path / "data")
    crafted_plain_pickle(tmp_path / "data" / "cifar-10-batches-py" / "data_batch_2", marker)
    with pytest.raises(UnsafeFileError) as err:
        ready_datamodule(CIFAR10DataModule, tmp_path / "data", tmp_path, val_size=10)
    assert "data_batch_2 was refused" in one_line(err.value)
    assert not marker.exists()


def test_generated_cifar10_batches_need_trust(tmp_path, monkeypatch):
    from generators.cifar10 import write_cifar10_batches

    from lightning_xd.datamodules.cifar10 import CIFAR10DataModule

    monkeypatch.delenv("XD_TRUST_DATA_DIR")
    write_cifar10_batches(tmp_path / "data")
    with pytest.raises(DataError, match="differ from the published release"):
        ready_datamodule(CIFAR10DataModule, tmp_path / "data", tmp_path, val_size=10)
    trusted = ready_datamodule(CIFAR10DataModule, tmp_path / "data", tmp_path, val_size=10, trust_data_dir=True)
    assert len(trusted.test_set) > 0


def test_a_crafted_pyg_qm9_file_never_reaches_pyg(tmp_path, marker):
    """PyG retries a refused restricted load without restriction: our restricted load comes first."""
    from generators.qm9 import write_pyg_qm9

    from lightning_xd.datamodules.qm9 import QM9DataModule

    write_pyg_qm9(tmp_path / "pyg", 12)
    crafted_torch_file(tmp_path / "pyg" / "QM9" / "raw" / "qm9_v3.pt", marker)
    with pytest.raises(UnsafeFileError) as err:
        ready_datamodule(QM9DataModule, tmp_path / "pyg", tmp_path)
    assert "qm9_v3.pt" in one_line(err.value) and "posix.system" in str(err.value)
    assert not marker.exists()


# ---- downloads ----------------------------------------------------------------------------------
@pytest.fixture
def file_server(tmp_path, monkeypatch):
    """An HTTP server on loopback serving ``tmp_path/served``; yields (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("XD_DOWNLOAD", "1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_download_is_kept_only_when_its_hash_is_the_pinned_one(file_server, tmp_path):
    from lightning_xd.downloads import download_verified

    served, url = file_server
    (served / "good.bin").write_bytes(b"the release")
    (served / "bad.bin").write_bytes(b"something else")
    pins = {"good.bin": file_digest(served / "good.bin"), "bad.bin": file_digest(served / "good.bin")}
    target = tmp_path / "downloaded"
    with pytest.raises(DataError) as err:
        download_verified(target, pins, url, "test files")
    assert "bad.bin" in one_line(err.value) and "not the pinned" in str(err.value)
    assert (target / "good.bin").read_bytes() == b"the release"
    assert not (target / "bad.bin").exists() and not list(target.glob(".*tmp"))
    with pytest.raises(DataError, match="failed: HTTPError"):
        download_verified(target, {"missing.bin": "0" * 64}, url, "test files")
    assert not (target / "missing.bin").exists()


def test_cora_is_downloaded_checked_and_trained_on(file_server, tmp_path, tiny_data, monkeypatch):
    """A data dir without Cora: the datamodule fetches the files from the (local) Planetoid URL, keeps
    them only when they match its pins, and trains; a server sending other bytes is refused."""
    from lightning_xd.datamodules import cora

    served, url = file_server
    for path in (tiny_data / "cora" / "planetoid_raw").iterdir():
        shutil.copy(path, served / path.name)
    monkeypatch.setattr(cora, "PUBLIC_URL", url)
    monkeypatch.setattr(cora, "RELEASE", {name: file_digest(served / name) for name in cora.RAW_FILES})
    monkeypatch.delenv("XD_TRUST_DATA_DIR")  # the pins are these files': no trust needed
    datamodule = ready_datamodule(cora.CoraDataModule, tmp_path / "data", tmp_path)
    assert datamodule.graph.num_nodes == 580
    (served / "ind.cora.ty").write_bytes(b"tampered")
    (tmp_path / "data" / "cora" / "planetoid_raw" / "ind.cora.ty").unlink()
    with pytest.raises(DataError, match="ind.cora.ty was not kept|not the pinned"):
        ready_datamodule(cora.CoraDataModule, tmp_path / "data", tmp_path)
    assert not (tmp_path / "data" / "cora" / "planetoid_raw" / "ind.cora.ty").exists()


def test_manifest_matching_does_not_make_a_checkpoint_loadable(tmp_path, marker):
    """The sha256 manifest guards against torn writes, not against whoever writes both files."""
    path = crafted_run_checkpoint(tmp_path / "run", marker)
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert CheckpointStore(path.parent).verify(manifest) is None  # the manifest vouches for it
    with pytest.raises(UnsafeFileError):
        load_checkpoint_file(path)
    assert not marker.exists()
