"""Cora citation graph, Planetoid public split: 2,708 papers, 1,433 bag-of-words features, 7 classes,
140 training, 500 validation and 1,000 test nodes.

Data: the Planetoid raw files ``cora/planetoid_raw/ind.cora.*`` of the data dir (Yang, Cohen and
Salakhutdinov, ICML 2016; see ../shared/data/SOURCES.md), read by PyG's ``Planetoid`` into a
cache folder, so the data dir may be read-only. Missing files are downloaded from the Planetoid
repository when the network allows (``XD_DOWNLOAD=0`` turns that off).
Reference: a two-layer GCN reaches 81.5% test accuracy (Kipf & Welling, ICLR 2017).

A batch is the whole graph plus ``node_index``, the labelled nodes it is scored on. Lightning's
distributed sampler splits the training nodes over ranks; validation and test nodes are split
so each is scored exactly once.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lightning_xd.data import cache_dir, digest, download_missing, eval_sampler
from lightning_xd.errors import DataError
from lightning_xd.launch.registry import DATAMODULES

RAW_FILES = [f"ind.cora.{s}" for s in ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")]
PUBLIC_URL = "https://github.com/kimiyoung/planetoid/raw/master/data"


class WholeGraphWith:
    """Collate a list of node ids into the full graph carrying them as ``node_index``."""

    def __init__(self, graph):
        self.graph = graph

    def __call__(self, node_ids: list) -> object:
        batch = copy.copy(self.graph)
        batch.node_index = torch.as_tensor(node_ids, dtype=torch.long)
        batch.batch_size = len(node_ids)  # samples = scored nodes, not the graph's 2,708
        return batch


@DATAMODULES.register("cora")
class CoraDataModule(LightningDataModule):
    def __init__(self, data_dir: str = "./data", cache_dir: str | None = None, batch_size: int = 140):
        super().__init__()
        self.data_dir, self.cache, self.batch_size = Path(data_dir), cache_dir, batch_size
        self.graph = None

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "cora" / "planetoid_raw"

    def _planetoid(self):
        import torch_geometric.transforms as T
        from torch_geometric.datasets import Planetoid

        download_missing(self.raw_dir, RAW_FILES, PUBLIC_URL, "Cora raw files")
        raw = [self.raw_dir / name for name in RAW_FILES]
        root = cache_dir(self.data_dir, self.cache) / "planetoid" / digest(raw)
        staged = root / "Cora" / "raw"
        staged.mkdir(parents=True, exist_ok=True)
        for path in raw:
            if not (staged / path.name).is_file():
                shutil.copyfile(path, staged / path.name)
        try:
            # row-normalised bag-of-words features, as in Kipf & Welling and PyG's examples/gcn.py
            return Planetoid(str(root), "Cora", transform=T.NormalizeFeatures())
        except Exception as err:  # a file that is not what Planetoid expects
            shutil.rmtree(root, ignore_errors=True)
            reason = str(err).splitlines()[0] if str(err) else "unreadable content"
            raise DataError(
                f"Cora raw files in {self.raw_dir} could not be read ({type(err).__name__}: "
                f"{reason[:120]}); replace them with the Planetoid originals"
            ) from None

    def prepare_data(self) -> None:
        self._planetoid()

    def setup(self, stage: str | None = None) -> None:
        if self.graph is None:
            graph = self._planetoid()[0]
            # 98.7% of the bag-of-words entries are zero: a sparse matrix makes the first layer and
            # its dropout ten times cheaper than the dense one, with the same result
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                graph.x = graph.x.to_sparse_csr()
            self.graph = graph

    def model_kwargs(self) -> dict:
        self.setup()
        return {"num_features": self.graph.x.shape[1], "num_classes": int(self.graph.y.max()) + 1}

    def _nodes(self, mask: torch.Tensor) -> list:
        return mask.nonzero().view(-1).tolist()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self._nodes(self.graph.train_mask),
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=WholeGraphWith(self.graph),
        )

    def _eval_loader(self, mask: torch.Tensor) -> DataLoader:
        nodes = self._nodes(mask)
        return DataLoader(
            nodes,
            batch_size=len(nodes),
            sampler=eval_sampler(nodes, self.trainer),
            collate_fn=WholeGraphWith(self.graph),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.graph.val_mask)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.graph.test_mask)
