"""Tiny PPI in PyG's raw layout: ``{train,valid,test}_graph.json`` (networkx node-link JSON),
``_feats.npy``, ``_labels.npy``, ``_graph_id.npy``; a few small graphs per split.

Each protein's labels are a noisy copy of its graph community, which its features also show,
so a probe on learnt embeddings can do better than chance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

NUM_FEATURES, NUM_LABELS = 8, 5
GRAPHS = {"train": [1, 2, 3], "valid": [4], "test": [5]}


def _graph(rng: np.random.Generator, nodes: int, offset: int) -> tuple[list, np.ndarray]:
    community = rng.integers(0, NUM_LABELS, nodes)
    links = []
    for node in range(nodes):
        same = np.flatnonzero(community == community[node])
        for other in rng.choice(same, 3):
            if other != node:
                links.append({"source": offset + node, "target": offset + int(other)})
    return links, community


def write_ppi(root: Path, nodes_per_graph: int = 40, seed: int = 0) -> Path:
    """Write the twelve files into ``root/ppi`` and return that folder."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "ppi"
    folder.mkdir(parents=True, exist_ok=True)
    for split, graph_ids in GRAPHS.items():
        links, communities = [], []
        for i, _graph_id in enumerate(graph_ids):
            graph_links, community = _graph(rng, nodes_per_graph, i * nodes_per_graph)
            links += graph_links
            communities.append(community)
        community = np.concatenate(communities)
        count = community.size
        nodes = [{"id": i, "test": split == "test", "val": split == "valid"} for i in range(count)]
        graph = {"directed": False, "multigraph": False, "graph": {}, "nodes": nodes, "links": links}
        (folder / f"{split}_graph.json").write_text(json.dumps(graph))
        labels = np.eye(NUM_LABELS, dtype=np.int64)[community]
        labels |= (rng.random(labels.shape) < 0.1).astype(np.int64)
        feats = rng.normal(size=(count, NUM_FEATURES)).astype(np.float32)
        feats[np.arange(count), community] += 2.0
        np.save(folder / f"{split}_feats.npy", feats)
        np.save(folder / f"{split}_labels.npy", labels)
        np.save(folder / f"{split}_graph_id.npy", np.repeat(graph_ids, nodes_per_graph))
    return folder
