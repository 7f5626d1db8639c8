"""Where one GraphSAGE training step's time goes on a large generated graph (example 7's model).

One process does what rank 0 of an ``--nprocs N`` job does (METIS part 0 of N, with its halo),
without the job: the communication is left out (the gathered negatives are the rank's own), so
what remains is each phase of the rank's own work, timed one after the other on the same batches:

- ``positives``: the seed's partner, the end of a short random walk;
- ``negatives``: ``torch_geometric.utils.negative_sampling`` among the part's nodes;
- ``subgraph``: the fixed-fanout 2-hop sample around every pair's ends;
- ``assembly``: the rest of building the batch (unique ends, feature rows, the ``Data``);
- ``forward`` (embeddings and the link loss), ``backward``;
- ``optimizer_dense`` (Adam on the SAGE weights), ``optimizer_table`` (SparseAdam on the node table).

Each phase's figure is the median over the timed steps (after ``--warmup`` untimed ones) of its
milliseconds in a step, with min and max; ``step_ms`` is their sum, ``seeds_per_s`` the batch's
seeds over it and ``sample_nodes`` the nodes of a batch's 2-hop sample. The graph and its parts
are built once and cached (``--cache-dir``).

    python benchmarks/graph_profile.py --num-nodes 1000000 --nprocs 2
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import BenchmarkError, machine, parse, parser, result_name, stats, write_results  # noqa: E402

PHASES = (
    "positives",
    "negatives",
    "subgraph",
    "assembly",
    "forward",
    "backward",
    "optimizer_dense",
    "optimizer_table",
)


class PhaseClock:
    """Milliseconds per phase of the step being timed."""

    def __init__(self):
        self.step: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.step[name] += 1000 * (time.perf_counter() - started)

    def timed(self, name: str, function):
        """``function`` with its calls counted into phase ``name``."""

        def call(*args, **kwargs):
            with self.phase(name):
                return function(*args, **kwargs)

        return call


def build(args):
    from lightning_xd.datamodules import partitioned_graph
    from lightning_xd.datamodules.synthetic_graph import SyntheticGraphDataModule
    from lightning_xd.models.graphsage import GraphSAGE

    datamodule = SyntheticGraphDataModule(
        data_dir=args.data_dir, cache_dir=args.cache_dir, nprocs=args.nprocs, num_nodes=args.num_nodes
    )
    datamodule.setup()
    model = GraphSAGE(**datamodule.model_kwargs())
    return partitioned_graph, datamodule, model


def profile(args) -> dict:
    torch.manual_seed(0)
    partitioned_graph, datamodule, model = build(args)
    batches = datamodule.train_dataloader().dataset
    clock = PhaseClock()
    # the batch's phases, counted where the datamodule calls them; the rest of batch() is assembly
    batches.positives = clock.timed("positives", batches.positives)
    batches.negatives = clock.timed("negatives", batches.negatives)
    sample = partitioned_graph.sampled_subgraph
    partitioned_graph.sampled_subgraph = clock.timed("subgraph", sample)
    optimizers = model.configure_optimizers()
    model.train()
    per_step: dict[str, list[float]] = defaultdict(list)
    seeds, sample_nodes = [], []
    batch_iterator = iter(batches)
    try:
        for step in range(args.warmup + args.steps):
            clock.step.clear()
            started = time.perf_counter()
            batch = next(batch_iterator)
            built = 1000 * (time.perf_counter() - started)
            clock.step["assembly"] += built - sum(clock.step[p] for p in ("positives", "negatives", "subgraph"))
            for optimizer in optimizers:
                optimizer.zero_grad()
            with clock.phase("forward"):
                z = model.embed(batch)
                loss = model.link_loss(z, batch, z[batch.neg_pairs[1]])
            with clock.phase("backward"):
                loss.backward()
            with clock.phase("optimizer_dense"):
                optimizers[0].step()
            with clock.phase("optimizer_table"):
                for optimizer in optimizers[1:]:
                    optimizer.step()
            if step >= args.warmup:
                for name in PHASES:
                    per_step[name].append(clock.step[name])
                per_step["step"].append(sum(clock.step[name] for name in PHASES))
                seeds.append(batch.batch_size)
                sample_nodes.append(batch.num_nodes)
    finally:
        partitioned_graph.sampled_subgraph = sample
    summary = datamodule.summary
    return {
        "phases_ms": {name: stats(per_step[name]) for name in PHASES},
        "step_ms": stats(per_step["step"]),
        "seeds_per_s": stats(1000 * s / ms for s, ms in zip(seeds, per_step["step"])),
        "sample_nodes": stats(sample_nodes),
        "graph": {
            "num_nodes": summary["num_nodes"],
            "num_edges": summary["num_edges"],
            "parts": args.nprocs,
            "owned_rank0": summary["owned"][0],
            "halo_rank0": summary["halo"][0],
        },
    }


def parse_args(argv):
    p = parser("Where a GraphSAGE step's time goes on a generated graph (rank 0's share, no job).", nprocs=2)
    p.add_argument("--num-nodes", type=int, default=1_000_000, help="nodes of the generated graph")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    args = parse(p, argv)
    if args.quick:
        args.num_nodes, args.steps, args.warmup = min(args.num_nodes, 20_000), 5, 1
    if args.num_nodes < 100 or args.steps < 1 or args.warmup < 0:
        raise BenchmarkError("--num-nodes must be at least 100, --steps at least 1, --warmup at least 0")
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except BenchmarkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = {"machine": machine(), "settings": vars(args), **profile(args)}
    path = write_results(
        args.results_dir, result_name(f"graph_profile-{args.num_nodes}-{args.nprocs}ranks", args.quick), result
    )
    for name in PHASES:
        print(f"{name:>16}: {result['phases_ms'][name]['median']:9.1f} ms")
    step, seeds, nodes = (result[key]["median"] for key in ("step_ms", "seeds_per_s", "sample_nodes"))
    print(f"{'step':>16}: {step:9.1f} ms, {seeds:.0f} seeds/s, {nodes:.0f} nodes sampled a batch -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
