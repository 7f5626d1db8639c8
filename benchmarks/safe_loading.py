"""What reading files safely costs: restricted against unrestricted checkpoint loads, the launcher's
check of the checkpoint it will resume, and Cora read afresh from checked raw files against PyG's
warm processed cache (what lightning_xd did before).

    python benchmarks/safe_loading.py [--sizes-mb 10 100] [--repeats 15] [--quick]

Checkpoints are laid out as train.py's: a model's float32 weights in tensors of 1M elements, Adam's
two moments for each, Lightning's loop state (nested dicts of counters), and every process's RNG
state (torch's tensor, numpy's array, Python's tuple of 625 ints). Per size and repetition, on a
file just written (so in the page cache for every reader alike):
- ``unrestricted``: ``torch.load(weights_only=False)``, what a plain ``torch.load`` of old did;
- ``restricted``: ``load_checkpoint_file`` (``weights_only=True`` with numeric numpy arrays);
- ``launcher_check``: ``refuse_unsafe``, the launching process's check (tensors memory-mapped).
Cora: ``CoraDataModule.setup()`` on the data dir (hashes, a restricted read of every pickle, PyG's
Planetoid in a fresh temporary folder) against ``Planetoid(root)`` over a folder whose processed
file PyG already wrote. Medians of the repetitions, and their ratios.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__":  # the repository first: benchmarks/strategies.py must not shadow the strategies package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import common  # noqa: E402

CHUNK = 1 << 20  # elements per weight tensor


def lightning_like_checkpoint(megabytes: float) -> dict:
    """A checkpoint with train.py's structure whose weights take ``megabytes`` (float32)."""
    import numpy as np
    import torch

    elements = max(1, int(megabytes * (1 << 20) / 4))
    sizes = [CHUNK] * (elements // CHUNK) + ([elements % CHUNK] if elements % CHUNK else [])
    weights = {f"layer{i}.weight": torch.randn(n) for i, n in enumerate(sizes)}
    moments = {
        i: {"step": torch.tensor(100.0), "exp_avg": w.clone(), "exp_avg_sq": w.clone()}
        for i, w in enumerate(weights.values())
    }
    counters = {"total": {"ready": 100, "completed": 100}, "current": {"ready": 4, "completed": 4}}
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    return {
        "epoch": 3,
        "global_step": 100,
        "state_dict": weights,
        "optimizer_states": [{"state": moments, "param_groups": [{"lr": 1e-3, "params": list(moments)}]}],
        "loops": {
            f"loop{i}": {"state_dict": {}, "epoch_progress": counters, "batch_progress": counters} for i in range(8)
        },
        "callbacks": {"FaultTolerantCheckpoint": {"rng": [rng, rng]}},
        "hyper_parameters": {"lr": 1e-3, "hidden_channels": 64, "name": "cnn"},
    }


def alternating_seconds(actions: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each action per repetition; the order rotates between repetitions, so drifting
    machine load favours none of them."""
    names, times = list(actions), {name: [] for name in actions}
    for repetition in range(repeats):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            actions[name]()
            times[name].append(time.perf_counter() - start)
    return times


def measure_checkpoints(sizes_mb: list[float], repeats: int, folder: Path) -> dict:
    import torch

    from lightning_xd.fault_tolerance.checkpoints import load_checkpoint_file, refuse_unsafe

    results = {}
    for size in sizes_mb:
        path = folder / f"checkpoint-{size}MB.ckpt"
        torch.save(lightning_like_checkpoint(size), path)
        readers = {
            "unrestricted": lambda: torch.load(path, map_location="cpu", weights_only=False),  # noqa: B023
            "restricted": lambda: load_checkpoint_file(path),  # noqa: B023
            "launcher_check": lambda: refuse_unsafe(path),  # noqa: B023
        }
        for reader in readers.values():
            reader()  # warm: the file in the page cache, torch's code paths loaded
        times = alternating_seconds(readers, repeats)
        results[f"{size:g}MB"] = {
            "file_mb": path.stat().st_size / 1e6,
            "seconds": {name: common.stats(values) for name, values in times.items()},
            "restricted_over_unrestricted": common.ratio_stats(times["restricted"], times["unrestricted"]),
            "launcher_check_over_unrestricted": common.ratio_stats(times["launcher_check"], times["unrestricted"]),
        }
        path.unlink()
    return results


def measure_cora(data_dir: Path, repeats: int, folder: Path) -> dict:
    """Cora as read now against PyG's warm processed cache (the earlier way)."""
    import torch_geometric.transforms as T
    from torch_geometric.datasets import Planetoid

    from lightning_xd.datamodules.cora import RAW_FILES, CoraDataModule

    raw = data_dir / "cora" / "planetoid_raw"
    warm = folder / "warm"
    (warm / "Cora" / "raw").mkdir(parents=True)
    for name in RAW_FILES:
        shutil.copyfile(raw / name, warm / "Cora" / "raw" / name)
    Planetoid(str(warm), "Cora")  # PyG writes its processed file: the cache the earlier code kept

    def now():
        CoraDataModule(str(data_dir)).setup()

    def before():
        Planetoid(str(warm), "Cora", transform=T.NormalizeFeatures())[0]

    now(), before()
    times = alternating_seconds({"checked_afresh": now, "pyg_warm_cache": before}, repeats)
    return {
        "seconds": {name: common.stats(values) for name, values in times.items()},
        "checked_afresh_over_pyg_warm_cache": common.ratio_stats(times["checked_afresh"], times["pyg_warm_cache"]),
    }


def plot(results: dict, path: Path) -> Path:
    """Milliseconds per read: one panel per checkpoint size, one for Cora."""
    from benchmarks import plots

    checkpoints = results["checkpoints"].items()
    panels = [(f"checkpoint, {size} of weights", figures["seconds"]) for size, figures in checkpoints]
    panels.append(("Cora: checked afresh vs PyG warm cache", results["cora"]["seconds"]))
    image = plots.canvas(len(panels), 1)
    for column, (title, seconds) in enumerate(panels):
        in_ms = [{k: v * 1e3 if k != "n" else v for k, v in s.items()} for s in seconds.values()]
        plots.range_bars(image, plots.panel(column, 0), list(seconds), in_ms, title, "ms")
    return plots.save(image, path, common.machine_line(results["machine"]))


def parse_args(argv=None) -> argparse.Namespace:
    p = common.parser(__doc__.splitlines()[0], nprocs=1, repeats=15)
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[10.0, 100.0], help="checkpoint weights, MB")
    args = common.parse(p, argv)
    if any(size <= 0 for size in args.sizes_mb):
        raise common.BenchmarkError(f"--sizes-mb {' '.join(f'{s:g}' for s in args.sizes_mb)}: give sizes above 0")
    if args.quick:
        args.sizes_mb = [1.0]
    return args


def run(args: argparse.Namespace) -> dict:
    from lightning_xd.data import require_files
    from lightning_xd.datamodules.cora import RAW_FILES

    require_files(Path(args.data_dir) / "cora" / "planetoid_raw", RAW_FILES, "Cora raw files")  # before measuring
    with tempfile.TemporaryDirectory(prefix="safe-loading-") as tmp:
        results = {
            "machine": common.machine(),
            "repeats": args.repeats,
            "quick": args.quick,
            "checkpoints": measure_checkpoints(args.sizes_mb, args.repeats, Path(tmp)),
            "cora": measure_cora(Path(args.data_dir), args.repeats, Path(tmp)),
        }
    name = common.result_name("safe_loading", args.quick)
    path = common.write_results(args.results_dir, name, results)
    plot(results, Path(args.results_dir) / f"{name}.png")
    for size, figures in results["checkpoints"].items():
        s = figures["seconds"]
        print(
            f"checkpoint {size}: unrestricted {s['unrestricted']['median'] * 1e3:.1f} ms, restricted "
            f"{s['restricted']['median'] * 1e3:.1f} ms (x{figures['restricted_over_unrestricted']['median']:.2f}), "
            f"launcher check {s['launcher_check']['median'] * 1e3:.1f} ms"
        )
    cora = results["cora"]["seconds"]
    print(
        f"Cora: checked afresh {cora['checked_afresh']['median'] * 1e3:.0f} ms, PyG warm cache "
        f"{cora['pyg_warm_cache']['median'] * 1e3:.0f} ms; results in {path}"
    )
    return results


def main() -> None:
    from lightning_xd.errors import UserError

    try:
        run(parse_args())
    except (common.BenchmarkError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
