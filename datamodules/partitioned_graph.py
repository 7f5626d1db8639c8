"""A graph partitioned over ranks for data-parallel GraphSAGE: METIS parts, a 1-hop halo, and a
small CSR neighbour sampler (PyG's NeighborLoader needs pyg-lib or torch-sparse, absent here).

Preparation (once, cached) splits the graph with METIS (``pymetis``) into one part per rank and
writes one file per part: the part's own nodes, then the halo (their neighbours owned by other
ranks), the subgraph induced by those nodes as CSR, their features, and the labels and probe
split of the owned nodes. A rank loads only its own file, so each holds about 1/P of the graph.
Sampling at the halo's far side sees only neighbours inside the file (a 1-hop halo is exact for
the first hop only): the price of not fetching remote neighbours.

Training batches are positive pairs (an owned seed node and a random neighbour, or the end of a
short random walk), negatives from ``torch_geometric.utils.negative_sampling`` (pairs that are not
edges), and the fixed-fanout 2-hop sample around them, with hop sizes so the encoder computes each
layer only where the next one needs it. An epoch visits every node with a neighbour once as a
seed; every rank runs the same number of batches per epoch (the global seed count over ranks),
cycling through its own seeds as often as needed.
The probe batch is the whole part, scored on its owned labelled nodes.

Subclasses say where the graph comes from (``load_graph``) and register a name.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from torch_geometric.data import Data
from torch_geometric.utils import negative_sampling

from lightning_xd.data import cache_dir, digest, load_or_build, rank_shard
from lightning_xd.errors import UserError

log = logging.getLogger("lightning.pytorch")

# probe split codes of a node: unlabelled, or in the probe's train / validation / test set
UNLABELLED, TRAIN, VAL, TEST = 0, 1, 2, 3


def to_csr(edge_index: Tensor, num_nodes: int) -> tuple[Tensor, Tensor]:
    """Row pointers and column ids of the edges (sender -> receiver) sorted by sender."""
    order = torch.argsort(edge_index[0] * num_nodes + edge_index[1])
    rowptr = torch.zeros(num_nodes + 1, dtype=torch.long)
    rowptr[1:] = torch.cumsum(torch.bincount(edge_index[0], minlength=num_nodes), 0)
    return rowptr, edge_index[1, order].contiguous()


def expand_rows(rowptr: Tensor, nodes: Tensor) -> tuple[Tensor, Tensor]:
    """For each node's CSR row, (position of the node in ``nodes``, index into ``col``) per entry."""
    start, degree = rowptr[nodes], rowptr[nodes + 1] - rowptr[nodes]
    owner = torch.repeat_interleave(torch.arange(nodes.numel()), degree)
    first = torch.cumsum(degree, 0) - degree
    return owner, start[owner] + torch.arange(owner.numel()) - first[owner]


def sample_neighbours(
    rowptr: Tensor, col: Tensor, nodes: Tensor, fanout: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Up to ``fanout`` neighbours of every node (all of them when fewer, or when fanout < 0):
    (position of the node in ``nodes``, neighbour id) per sampled edge, grouped by node in the
    order of ``nodes``. Nodes with more neighbours than ``fanout`` draw them with replacement."""
    degree = rowptr[nodes + 1] - rowptr[nodes]
    if fanout < 0:
        owner, entry = expand_rows(rowptr, nodes)
        return owner, col[entry]
    small = degree <= fanout
    owner_small, entry_small = expand_rows(rowptr, nodes[small])
    owner_small = small.nonzero().view(-1)[owner_small]
    big = (~small).nonzero().view(-1)
    owner_big = big.repeat_interleave(fanout)
    offset = (torch.rand(owner_big.numel(), generator=generator) * degree[owner_big]).long()
    entry_big = rowptr[nodes[owner_big]] + offset
    owner, entry = torch.cat([owner_small, owner_big]), torch.cat([entry_small, entry_big])
    order = torch.argsort(owner, stable=True)  # in the order of ``nodes``
    return owner[order], col[entry[order]]


def random_walk_ends(
    rowptr: Tensor, col: Tensor, start: Tensor, length: int, generator: torch.Generator | None = None
) -> Tensor:
    """The node reached after a uniform number (1..length) of random steps from each start node."""
    steps = torch.randint(1, length + 1, (start.numel(),), generator=generator)
    here = start.clone()
    for step in range(1, length + 1):
        walking = (steps >= step) & (rowptr[here + 1] > rowptr[here])
        owner, neighbour = sample_neighbours(rowptr, col, here[walking], 1, generator)
        here[walking.nonzero().view(-1)[owner]] = neighbour
    return here


def sampled_subgraph(
    rowptr: Tensor, col: Tensor, targets: Tensor, fanouts: list[int], generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, list[int]]:
    """The fixed-fanout multi-hop sample around ``targets``, as PyG's NeighborLoader returns it:
    nodes (``targets`` first, then each hop's new nodes), edges (neighbour -> node, in subgraph
    positions) and the number of nodes each hop added (``targets.numel()`` first)."""
    position = torch.full((rowptr.numel() - 1,), -1, dtype=torch.long)
    nodes, frontier, edges = [targets], targets, []
    position[targets] = torch.arange(targets.numel())
    count = targets.numel()
    for fanout in fanouts:
        owner, neighbour = sample_neighbours(rowptr, col, frontier, fanout, generator)
        new = torch.unique(neighbour[position[neighbour] < 0])
        position[new] = torch.arange(count, count + new.numel())
        count += new.numel()
        edges.append(torch.stack([position[neighbour], position[frontier[owner]]]))
        nodes.append(new)
        frontier = new
    return torch.cat(nodes), torch.cat(edges, dim=1), [n.numel() for n in nodes]


# ---- preparation: METIS parts with their halo ------------------------------------------


def metis_membership(rowptr: Tensor, col: Tensor, parts: int) -> Tensor:
    """The part (0..parts-1) of every node, from METIS on the undirected graph."""
    if parts == 1:
        return torch.zeros(rowptr.numel() - 1, dtype=torch.long)
    import pymetis

    _, membership = pymetis.part_graph(parts, xadj=rowptr.numpy(), adjncy=col.numpy())
    return torch.as_tensor(membership, dtype=torch.long)


def graph_part(graph: dict, rowptr: Tensor, col: Tensor, membership: Tensor, part: int) -> dict:
    """What rank ``part`` holds: owned nodes, then their halo, with the induced subgraph as CSR."""
    owned = (membership == part).nonzero().view(-1)
    _, entry = expand_rows(rowptr, owned)
    neighbours = torch.unique(col[entry])
    halo = neighbours[membership[neighbours] != part]
    nodes = torch.cat([owned, halo])
    local = torch.full((rowptr.numel() - 1,), -1, dtype=torch.long)
    local[nodes] = torch.arange(nodes.numel())
    owner, entry = expand_rows(rowptr, nodes)
    receiver = local[col[entry]]
    kept = receiver >= 0
    local_rowptr = torch.zeros(nodes.numel() + 1, dtype=torch.long)
    local_rowptr[1:] = torch.cumsum(torch.bincount(owner[kept], minlength=nodes.numel()), 0)
    link_nodes = graph.get("link_nodes")
    return {
        "node_ids": nodes,
        "num_owned": owned.numel(),
        "rowptr": local_rowptr,
        "col": receiver[kept],
        "x": graph["x"][nodes],
        "y": graph["y"][owned],
        "split": graph["split"][owned],
        "link_nodes": None if link_nodes is None else link_nodes[nodes],
    }


def partition_summary(graph: dict, rowptr: Tensor, col: Tensor, membership: Tensor, parts: int) -> dict:
    """Facts every rank needs alike: sizes, the edge cut, the global number of training seeds."""
    sender = torch.repeat_interleave(torch.arange(rowptr.numel() - 1), rowptr[1:] - rowptr[:-1])
    seeds = rowptr[1:] > rowptr[:-1]
    if graph.get("link_nodes") is not None:
        seeds &= graph["link_nodes"]
    halo = []
    for part in range(parts):
        owned = membership == part
        neighbour_of_owned = torch.zeros_like(owned)
        neighbour_of_owned[col[owned[sender]]] = True
        halo.append(int((neighbour_of_owned & ~owned).sum()))
    return {
        "num_nodes": rowptr.numel() - 1,
        "num_edges": col.numel() // 2,
        "train_seeds": int(seeds.sum()),
        "edge_cut": int((membership[sender] != membership[col]).sum()) // 2,
        "owned": torch.bincount(membership, minlength=parts).tolist(),
        "halo": halo,
        "num_features": graph["x"].shape[1],
        "label_shape": list(graph["y"].shape[1:]),
        "num_classes": graph["num_classes"],
    }


# ---- per-rank batches -----------------------------------------------------------------


def identity(batch):
    return batch


def seed_nodes(part: dict) -> Tensor:
    """The owned nodes an epoch starts positive pairs from: those with a neighbour (inductive data:
    only nodes of the training graphs)."""
    rowptr, num_owned = part["rowptr"], part["num_owned"]
    seeds = (rowptr[1 : num_owned + 1] > rowptr[:num_owned]).nonzero().view(-1)
    if part["link_nodes"] is not None:
        seeds = seeds[part["link_nodes"][seeds]]
    return seeds


class LinkBatches(IterableDataset):
    """One epoch of training batches of one rank: positive pairs, negatives, their sampled 2-hop subgraph."""

    def __init__(
        self,
        part: dict,
        steps: int,
        batch_size: int,
        fanouts: list[int],
        num_negatives: int,
        walk_length: int,
        seed: int,
    ):
        self.part, self.steps, self.batch_size, self.fanouts = part, steps, batch_size, fanouts
        self.num_negatives, self.walk_length, self.seed, self.epoch = num_negatives, walk_length, seed, 0
        self.sources = seed_nodes(part)
        num_local = part["rowptr"].numel() - 1
        self.candidates = (
            torch.arange(num_local) if part["link_nodes"] is None else part["link_nodes"].nonzero().view(-1)
        )
        self.candidate_position = torch.full((num_local,), -1, dtype=torch.long)
        self.candidate_position[self.candidates] = torch.arange(self.candidates.numel())

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Data]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        if self.sources.numel() == 0:
            raise UserError("a graph part has no edges to train on; use fewer processes or a larger graph")
        repeats = math.ceil(self.steps * self.batch_size / self.sources.numel())
        order = torch.cat([torch.randperm(self.sources.numel(), generator=generator) for _ in range(repeats)])
        for step in range(self.steps):
            seeds = self.sources[order[step * self.batch_size : (step + 1) * self.batch_size]]
            yield self.batch(seeds, generator)

    def positives(self, seeds: Tensor, generator: torch.Generator) -> Tensor:
        rowptr, col = self.part["rowptr"], self.part["col"]
        if self.walk_length > 1:
            return random_walk_ends(rowptr, col, seeds, self.walk_length, generator)
        return sample_neighbours(rowptr, col, seeds, 1, generator)[1]

    def negatives(self, seeds: Tensor) -> tuple[Tensor, Tensor]:
        """(seed, node) pairs that are not edges, among the nodes pairs may be drawn from."""
        rowptr, col = self.part["rowptr"], self.part["col"]
        owner, entry = expand_rows(rowptr, seeds)
        known = torch.stack([owner, self.candidate_position[col[entry]]])
        known = known[:, known[1] >= 0]
        pairs = negative_sampling(
            known,
            num_nodes=(seeds.numel(), self.candidates.numel()),
            num_neg_samples=seeds.numel() * self.num_negatives,
        )
        return seeds[pairs[0]], self.candidates[pairs[1]]

    def batch(self, seeds: Tensor, generator: torch.Generator) -> Data:
        partners = self.positives(seeds, generator)
        negative_seeds, negatives = self.negatives(seeds)
        ends = torch.cat([seeds, partners, negative_seeds, negatives])
        targets, where = torch.unique(ends, return_inverse=True)
        nodes, edge_index, hop_nodes = sampled_subgraph(
            self.part["rowptr"], self.part["col"], targets, self.fanouts, generator
        )
        b, n = seeds.numel(), negatives.numel()
        return Data(
            x=self.part["x"][nodes],
            n_id=self.part["node_ids"][nodes],
            edge_index=edge_index,
            num_nodes=nodes.numel(),
            hop_nodes=hop_nodes,
            pos_pairs=torch.stack([where[:b], where[b : 2 * b]]),
            neg_pairs=torch.stack([where[2 * b : 2 * b + n], where[2 * b + n :]]),
            batch_size=b,
        )


class WholePart(IterableDataset):
    """The probe's one batch per rank: the whole part, scored on its owned labelled nodes."""

    def __init__(self, part: dict):
        self.part = part

    def __iter__(self) -> Iterator[Data]:
        part = self.part
        owned_split = part["split"]
        targets = (owned_split != UNLABELLED).nonzero().view(-1)
        sender = torch.repeat_interleave(
            torch.arange(part["rowptr"].numel() - 1), part["rowptr"][1:] - part["rowptr"][:-1]
        )
        yield Data(
            x=part["x"],
            n_id=part["node_ids"],
            edge_index=torch.stack([part["col"], sender]),
            num_nodes=part["x"].shape[0],
            targets=targets,
            y=part["y"][targets],
            split=owned_split[targets],
            batch_size=targets.numel(),
        )


def parse_fanouts(fanouts: str) -> list[int]:
    try:
        values = [int(f) for f in str(fanouts).split(",")]
    except ValueError:
        raise UserError(f"--fanouts {fanouts!r}: give comma-separated neighbour counts per hop, e.g. 10,10") from None
    return values


class PartitionedGraphDataModule(LightningDataModule, ABC):
    """Base of the GraphSAGE datasets: a subclass provides ``load_graph`` and ``source_files``.

    ``load_graph`` returns a dict: ``edge_index`` (both directions, no self-loops or duplicates),
    ``x`` (float features), ``y`` (class ids, or 0/1 rows for multi-label), ``split`` (probe split
    code per node), ``num_classes``, and optionally ``link_nodes`` (nodes whose edges are trained on).
    """

    name = "graph"  # names the cache folder of the parts

    def __init__(
        self,
        data_dir: str = "./data",
        cache_dir: str | None = None,
        batch_size: int = 64,
        fanouts: str = "10,10",
        num_negatives: int = 5,
        walk_length: int = 3,
        seed: int = 0,
        nprocs: int = 1,
        trust_data_dir: bool | None = None,
    ):
        super().__init__()
        self.trust_data_dir = trust_data_dir  # for subclasses whose raw files are pickles (Cora's)
        self.nprocs = nprocs  # train.py's --nprocs: the number of parts, known before the job starts
        self.data_dir, self.cache, self.batch_size = Path(data_dir), cache_dir, batch_size
        self.fanouts, self.num_negatives, self.walk_length, self.seed = (
            parse_fanouts(fanouts),
            num_negatives,
            walk_length,
            seed,
        )
        self.part: dict | None = None
        self.summary: dict | None = None
        self._cut: tuple | None = None

    @abstractmethod
    def load_graph(self) -> dict:
        """The whole graph as described above; each subclass says where it comes from."""

    def source_files(self) -> list[Path]:
        """The input files (their contents key the cache); may also check that they exist."""
        return []

    def graph_settings(self) -> dict:
        """Options that change the graph itself (they key the cache too)."""
        return {}

    def _world(self) -> tuple[int, int]:
        """(this rank, number of parts): from the Trainer, else the MPI job, else --nprocs."""
        if self.trainer is not None:
            return rank_shard(self.trainer)
        return _job_rank_and_size() or (0, self.nprocs)

    def _part_folder(self, parts: int) -> Path:
        key = digest(self.source_files(), parts=parts, format="parts-v2", **self.graph_settings())
        return cache_dir(self.data_dir, self.cache) / f"{self.name}_parts" / key

    def _partitioning(self, parts: int) -> tuple:
        """(graph, rowptr, col, membership): the graph cut into ``parts``, computed only when a part
        must be built and kept until ``_prepare`` or ``setup`` ends (``self._cut = None``)."""
        if self._cut is None or self._cut[0] != parts:
            graph = self.load_graph()
            rowptr, col = to_csr(graph["edge_index"], graph["x"].shape[0])
            self._cut = (parts, graph, rowptr, col, metis_membership(rowptr, col, parts))
        return self._cut[1:]

    def _load_part(self, folder: Path, parts: int, part: int) -> dict:
        return load_or_build(
            folder / f"part{part}.pt",
            lambda: graph_part(*self._partitioning(parts), part),
            f"graph part {part}",
        )

    def _load_summary(self, folder: Path, parts: int) -> dict:
        return load_or_build(
            folder / "summary.pt",
            lambda: partition_summary(*self._partitioning(parts), parts),
            "partition summary",
        )

    def _prepare(self, parts: int) -> Path:
        """Build the missing part files; returns their folder."""
        folder = self._part_folder(parts)
        for part in range(parts):
            if not (folder / f"part{part}.pt").is_file():
                self._load_part(folder, parts, part)
        if not (folder / "summary.pt").is_file():
            self._load_summary(folder, parts)
        self._cut = None  # the whole graph is not kept once its parts are written
        return folder

    def prepare_data(self) -> None:
        self._prepare(self._world()[1])

    def setup(self, stage: str | None = None) -> None:
        if self.part is not None:
            return
        rank, parts = self._world()
        folder = self._prepare(parts)  # builds nothing when prepare_data ran; here when it did not (tests)
        self.part, self.summary = self._load_part(folder, parts, rank), self._load_summary(folder, parts)
        self._cut = None
        s = self.summary
        log.info(
            f"{self.name}: {s['num_nodes']:,} nodes, {s['num_edges']:,} edges in {parts} METIS part(s); "
            f"edge cut {s['edge_cut']:,}; owned nodes per rank {s['owned']}, halo nodes per rank {s['halo']}"
        )

    def model_kwargs(self) -> dict:
        self.setup()
        return {"num_features": self.summary["num_features"], "num_nodes": self.summary["num_nodes"]}

    def train_dataloader(self) -> DataLoader:
        _, parts = self._world()
        steps = max(1, math.ceil(self.summary["train_seeds"] / (parts * self.batch_size)))
        rank = self._world()[0]
        batches = LinkBatches(
            self.part,
            steps,
            self.batch_size,
            self.fanouts,
            self.num_negatives,
            self.walk_length,
            seed=self.seed * 1_000 + rank,
        )
        return DataLoader(batches, batch_size=None, collate_fn=identity)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(WholePart(self.part), batch_size=None, collate_fn=identity)

    def val_dataloader(self) -> DataLoader:
        return self.test_dataloader()  # the same embeddings; the probe reports its validation score


def _job_rank_and_size() -> tuple[int, int] | None:
    """Rank and size of the MPI job this process runs in, before a Trainer exists; None outside one
    (or where its launcher does not say how many processes it started)."""
    from lightning_xd.comm.environment import rank_from_environment, size_from_environment

    rank, size = rank_from_environment(), size_from_environment()
    return None if rank is None or size is None else (rank, size)
