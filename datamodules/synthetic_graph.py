"""A generated power-law graph with community labels, for GraphSAGE at scale
(``--data synthetic-graph --num-nodes 1000000``).

Nothing is read: a Chung-Lu style graph is drawn from a seed. Node weights follow a power law
(exponent ``2.5``, as citation and web graphs), so a few hubs have thousands of links; each edge
picks its first end by weight and its second end by weight too, inside the first end's community
with probability ``homophily``, else anywhere. Features are the community's centre plus noise, so
neither features nor links alone give the label. The probe uses 1% of the nodes each for
training, validation and test.
Reference: none (the graph is ours); this dataset measures epochs/s and memory per rank.
"""

from __future__ import annotations

import torch

from lightning_xd.datamodules.partitioned_graph import TEST, TRAIN, UNLABELLED, VAL, PartitionedGraphDataModule
from lightning_xd.launch.registry import DATAMODULES
from lightning_xd.progress import progress


def power_law_weights(num_nodes: int, exponent: float, generator: torch.Generator) -> torch.Tensor:
    """Expected degrees ~ Pareto(exponent - 1): P(weight > w) ~ w^-(exponent - 1), at least 1."""
    u = torch.rand(num_nodes, generator=generator, dtype=torch.float64)
    return (1.0 - u) ** (-1.0 / (exponent - 1.0))


def draw_by_weight(cdf: torch.Tensor, low: torch.Tensor, high: torch.Tensor, generator) -> torch.Tensor:
    """Indices drawn with probability ~ weight, each from its own range [low, high) of the cumulative weights."""
    r = low + torch.rand(low.numel(), generator=generator, dtype=torch.float64) * (high - low)
    return torch.searchsorted(cdf, r, right=True).clamp(max=cdf.numel() - 1)


def unique_edges(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Edges without repeats, sorted by sender."""
    key = torch.unique(edge_index[0] * num_nodes + edge_index[1])
    return torch.stack([key // num_nodes, key % num_nodes])


def community_graph(
    num_nodes: int,
    num_communities: int,
    avg_degree: float,
    homophily: float,
    exponent: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Community of every node and undirected edges (both directions, no self-loops, no duplicates)."""
    community = torch.randint(0, num_communities, (num_nodes,), generator=generator)
    by_community = torch.argsort(community, stable=True)  # nodes of one community are contiguous here
    weight = power_law_weights(num_nodes, exponent, generator)[by_community]
    cdf = torch.cumsum(weight, 0)
    bounds = torch.cat([torch.zeros(1, dtype=torch.float64), cdf])
    first_of = torch.cumsum(torch.bincount(community, minlength=num_communities), 0)
    community_end = bounds[first_of]
    community_start = bounds[first_of - torch.bincount(community, minlength=num_communities)]
    edges = []
    num_edges = int(num_nodes * avg_degree / 2)
    chunk = 1_000_000
    for start in progress(range(0, num_edges, chunk), "synthetic graph: drawing edges", total=-(-num_edges // chunk)):
        n = min(chunk, num_edges - start)
        u = draw_by_weight(
            cdf, torch.zeros(n, dtype=torch.float64), torch.full((n,), float(cdf[-1]), dtype=torch.float64), generator
        )
        c = community[by_community[u]]
        inside = torch.rand(n, generator=generator) < homophily
        low = torch.where(inside, community_start[c], 0.0)
        high = torch.where(inside, community_end[c], float(cdf[-1]))
        v = draw_by_weight(cdf, low, high, generator)
        edges.append(torch.stack([by_community[u], by_community[v]]))
    edge_index = torch.cat(edges, dim=1)
    edge_index = edge_index[:, edge_index[0] != edge_index[1]]
    both = torch.cat([edge_index, edge_index.flip(0)], dim=1)
    return community, unique_edges(both, num_nodes)


@DATAMODULES.register("synthetic-graph")
class SyntheticGraphDataModule(PartitionedGraphDataModule):
    name = "synthetic"

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
        num_nodes: int = 100_000,
        num_communities: int = 20,
        avg_degree: float = 10.0,
        homophily: float = 0.7,
        num_features: int = 32,
        feature_noise: float = 2.0,
        graph_seed: int = 0,
    ):
        super().__init__(data_dir, cache_dir, batch_size, fanouts, num_negatives, walk_length, seed, nprocs)
        self.settings = {
            "num_nodes": num_nodes,
            "num_communities": num_communities,
            "avg_degree": avg_degree,
            "homophily": homophily,
            "num_features": num_features,
            "feature_noise": feature_noise,
            "graph_seed": graph_seed,
        }

    def graph_settings(self) -> dict:
        return self.settings

    def load_graph(self) -> dict:
        s = self.settings
        generator = torch.Generator().manual_seed(s["graph_seed"])
        community, edge_index = community_graph(
            s["num_nodes"], s["num_communities"], s["avg_degree"], s["homophily"], 2.5, generator
        )
        centres = torch.randn(s["num_communities"], s["num_features"], generator=generator)
        x = centres[community] + s["feature_noise"] * torch.randn(
            s["num_nodes"], s["num_features"], generator=generator
        )
        split = torch.full((s["num_nodes"],), UNLABELLED, dtype=torch.long)
        probe = torch.randperm(s["num_nodes"], generator=generator)
        share = max(1, s["num_nodes"] // 100)
        for i, code in enumerate((TRAIN, VAL, TEST)):
            split[probe[i * share : (i + 1) * share]] = code
        return {"edge_index": edge_index, "x": x, "y": community, "split": split, "num_classes": s["num_communities"]}
