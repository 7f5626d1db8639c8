"""Cora as one graph partitioned over ranks, for unsupervised GraphSAGE embeddings
(``--data cora-graph``; the GCN's ``cora`` serves labelled nodes of the whole graph instead).

Data: the Planetoid raw files ``cora/planetoid_raw/ind.cora.*`` (Yang, Cohen and Salakhutdinov,
ICML 2016; see ../shared/data/SOURCES.md), read as ``datamodules.cora`` reads them: 2,708 papers,
10,556 directed citation edges, 1,433 row-normalised bag-of-words features, 7 classes. Labels are
never trained on: they only score the embeddings with a linear probe on the public split (140
training, 500 validation, 1,000 test nodes).
Reference (probe accuracy on this split, Velickovic et al., Deep Graph Infomax, ICLR 2019):
raw features 47.9%, DeepWalk + features 70.7%, DGI 82.3%; the target here is micro-F1 >= 0.75.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_xd.datamodules.cora import RAW_FILES, CoraDataModule
from lightning_xd.datamodules.partitioned_graph import TEST, TRAIN, UNLABELLED, VAL, PartitionedGraphDataModule
from lightning_xd.launch.registry import DATAMODULES


@DATAMODULES.register("cora-graph")
class CoraGraphDataModule(PartitionedGraphDataModule):
    name = "cora"

    def _planetoid(self):
        return CoraDataModule(str(self.data_dir), self.cache)._planetoid()

    def source_files(self) -> list[Path]:
        self._planetoid()  # checks (or downloads) the raw files: a one-line error names the missing ones
        folder = self.data_dir / "cora" / "planetoid_raw"
        return [folder / name for name in RAW_FILES]

    def load_graph(self) -> dict:
        cora = self._planetoid()[0]
        split = torch.full((cora.num_nodes,), UNLABELLED, dtype=torch.long)
        for code, mask in ((TRAIN, cora.train_mask), (VAL, cora.val_mask), (TEST, cora.test_mask)):
            split[mask] = code
        return {
            "edge_index": cora.edge_index,
            "x": cora.x,
            "y": cora.y,
            "split": split,
            "num_classes": int(cora.y.max()) + 1,
        }
