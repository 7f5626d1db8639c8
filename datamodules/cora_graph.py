"""Cora as one graph partitioned over ranks, for unsupervised GraphSAGE embeddings
(``--data cora-graph``; the GCN's ``cora`` serves labelled nodes of the whole graph instead).

Data: the Planetoid raw files ``cora/planetoid_raw/ind.cora.*`` (Yang, Cohen and Salakhutdinov,
ICML 2016; see ../shared/data/SOURCES.md), checked and read as ``datamodules.cora`` does: 2,708 papers,
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

    def _cora(self) -> CoraDataModule:
        return CoraDataModule(str(self.data_dir), trust_data_dir=self.trust_data_dir)

    def source_files(self) -> list[Path]:
        self._cora()._check_raw_files()  # downloads missing files; a one-line error names a bad one
        folder = self.data_dir / "cora" / "planetoid_raw"
        return [folder / name for name in RAW_FILES]

    def load_graph(self) -> dict:
        cora = self._cora()._planetoid()
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
