"""Protein-protein interaction graphs (PPI) for unsupervised GraphSAGE: 24 tissue graphs, 50
features and 121 binary labels per protein, split by graph (20 train, 2 validation, 2 test).

Data: PyG's PPI raw layout in ``ppi/`` (or ``ppi/raw/``) of the data dir, as in ``ppi.zip`` of
Hamilton et al. (http://snap.stanford.edu/graphsage/): ``{train,valid,test}_graph.json``
(networkx node-link JSON), ``_feats.npy``, ``_labels.npy`` and ``_graph_id.npy``. PPI is not in
../shared/data (SOURCES.md says why); the loader is tested on generated files of that layout.
The three splits become one graph of disjoint components; the link loss trains on the training
graphs only, and the probe embeds the unseen validation and test graphs inductively.
Reference: micro-F1 0.465 (GraphSAGE-mean) to 0.502 (GraphSAGE-LSTM), unsupervised, Hamilton et
al., NeurIPS 2017, Table 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lightning_xd.data import require_files
from lightning_xd.datamodules.partitioned_graph import TEST, TRAIN, VAL, PartitionedGraphDataModule
from lightning_xd.errors import DataError
from lightning_xd.launch.registry import DATAMODULES

SPLITS = {"train": TRAIN, "valid": VAL, "test": TEST}
PARTS = ["graph.json", "feats.npy", "labels.npy", "graph_id.npy"]


def read_links(path: Path) -> tuple[int, torch.Tensor]:
    """Number of nodes and (sender, receiver) pairs of a networkx node-link JSON file."""
    try:
        graph = json.loads(path.read_text())
        position = {node["id"]: i for i, node in enumerate(graph["nodes"])}
        links = [(position[link["source"]], position[link["target"]]) for link in graph["links"]]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise DataError(
            f"{path} is not node-link graph JSON (keys 'nodes' with 'id', 'links' with 'source' and 'target')"
        ) from None
    return len(position), torch.tensor(links, dtype=torch.long).view(-1, 2).t()


def read_array(path: Path, rows: int, what: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError):
        raise DataError(f"{path} is not a .npy array of {what}") from None
    if array.shape[0] != rows:
        raise DataError(f"{path} has {array.shape[0]} rows of {what}; its graph JSON has {rows} nodes")
    return array


@DATAMODULES.register("ppi")
class PPIDataModule(PartitionedGraphDataModule):
    name = "ppi"

    @property
    def raw_dir(self) -> Path:
        folder = self.data_dir / "ppi"
        return folder / "raw" if (folder / "raw").is_dir() else folder

    def source_files(self) -> list[Path]:
        names = [f"{split}_{part}" for split in SPLITS for part in PARTS]
        return require_files(self.raw_dir, names, "PPI (PyG's raw layout)")

    def load_graph(self) -> dict:
        edges, features, labels, splits, offset = [], [], [], [], 0
        for split, code in SPLITS.items():
            count, links = read_links(self.raw_dir / f"{split}_graph.json")
            features.append(read_array(self.raw_dir / f"{split}_feats.npy", count, "features"))
            labels.append(read_array(self.raw_dir / f"{split}_labels.npy", count, "labels"))
            read_array(self.raw_dir / f"{split}_graph_id.npy", count, "graph ids")
            edges.append(links + offset)
            splits.append(torch.full((count,), code, dtype=torch.long))
            offset += count
        edge_index = torch.cat(edges, dim=1)
        edge_index = edge_index[:, edge_index[0] != edge_index[1]]  # PPI has self-loops; SAGEConv adds the root itself
        both = torch.cat([edge_index, edge_index.flip(0)], dim=1)
        key = torch.unique(both[0] * offset + both[1])
        split = torch.cat(splits)
        try:
            x, y = (
                torch.as_tensor(np.concatenate(features), dtype=torch.float),
                torch.as_tensor(np.concatenate(labels), dtype=torch.long),
            )
        except ValueError:
            raise DataError(f"PPI feature or label arrays in {self.raw_dir} differ in width between splits") from None
        return {
            "edge_index": torch.stack([key // offset, key % offset]),
            "x": x,
            "y": y,
            "split": split,
            "num_classes": y.shape[1],
            "link_nodes": split == TRAIN,
        }
