"""Cora citation graph, Planetoid public split: 2,708 papers, 1,433 bag-of-words features, 7 classes,
140 training, 500 validation and 1,000 test nodes.

Data: the Planetoid raw files ``cora/planetoid_raw/ind.cora.*`` of the data dir (Yang, Cohen and
Salakhutdinov, ICML 2016; see ../shared/data/SOURCES.md), read by PyG's ``Planetoid`` in a private
temporary folder (under a second, so the data dir may be read-only). Missing files are downloaded from
the Planetoid repository when the network allows (``XD_DOWNLOAD=0`` turns that off) and kept only
when their sha256 is the release's. The raw files are pickles, so they are opened only when their
hashes are the release's (``--trust-data-dir`` accepts others) and after a restricted read
(``safe_loading.load_plain_pickle``) found nothing in them but arrays, sparse matrices and lists:
PyG's own unrestricted read of the same bytes then calls nothing else.
Reference: a two-layer GCN reaches 81.5% test accuracy (Kipf & Welling, ICLR 2017).

A batch is the whole graph plus ``node_index``, the labelled nodes it is scored on. Lightning's
distributed sampler splits the training nodes over ranks; validation and test nodes are split
so each is scored exactly once.
"""

from __future__ import annotations

import contextlib
import copy
import io
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lightning_xd.data import eval_sampler
from lightning_xd.downloads import check_known_release, download_verified
from lightning_xd.errors import DataError, UserError
from lightning_xd.launch.registry import DATAMODULES
from lightning_xd.safe_loading import load_plain_pickle

PUBLIC_URL = "https://github.com/kimiyoung/planetoid/raw/master/data"
# sha256 of the files at kimiyoung/planetoid af6abf46 (the ones PyG downloads; ../shared/data/SOURCES.md)
RELEASE = {
    "ind.cora.x": "23cfa55d91c6f624233f5eb7b6e3f141f1bd2b2ae39608a63cf5d084bb27baab",
    "ind.cora.tx": "b9afbaa4a400df991f6f02ef677e1e44da55ffc04801fd02f9e673987829226a",
    "ind.cora.allx": "9419ba2f26f5c35243db64aba110e0f35a04851609e0dc5433450676ca6b8543",
    "ind.cora.y": "94465c14eb53e04ca262198dcbb2521ee8af60fb3f3d546cd6ca24a511b0e7d1",
    "ind.cora.ty": "41f5ac76596a1699cc33f53084a2419e92961c42bb75f36fc38e616d348532ad",
    "ind.cora.ally": "2b998f5cc7fedc86e7f97ca2498f47a1ffc1462c29e2d578b23bf3f62b6e7d71",
    "ind.cora.graph": "58f13302f39dde8852dad6fe6d15b89b077b6d7f837626bce671ef80344b383d",
    "ind.cora.test.index": "297ce89af2b51a6a194181c7dbe1796c6a1cf9cd9349a88383b1b1e227867875",
}
RAW_FILES = list(RELEASE)
# what Planetoid's pickles are made of: numpy arrays, scipy CSR matrices (under their old and new
# module names), the adjacency lists' defaultdict(list), and bytes as Python 3 writes them in
# protocol 2 (_codecs.encode, which torch's restricted unpickler allows too)
PLANETOID_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("scipy.sparse.csr", "csr_matrix"),
    ("scipy.sparse._csr", "csr_matrix"),
    ("collections", "defaultdict"),
    ("builtins", "list"),
    ("_codecs", "encode"),
}


def check_planetoid_files(folder: Path, trusted: bool) -> None:
    """The release's hashes (unless ``trusted``), then a restricted read of every pickle in ``folder``."""
    check_known_release(folder, RELEASE, "Cora raw files", trusted)
    fix = "replace it with the Planetoid original"
    for name in RAW_FILES:
        if name.endswith("test.index"):  # text, not a pickle
            continue
        try:
            load_plain_pickle(folder / name, PLANETOID_GLOBALS, "Planetoid file", fix)
        except UserError:
            raise
        except Exception as err:  # not a pickle, truncated ...
            raise DataError(f"Cora raw file {folder / name} could not be read ({type(err).__name__}); {fix}") from None


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
    def __init__(
        self,
        data_dir: str = "./data",
        cache_dir: str | None = None,
        batch_size: int = 140,
        trust_data_dir: bool | None = None,
    ):
        super().__init__()
        del cache_dir  # Cora is read afresh each time (a second): nothing of it is cached
        self.data_dir, self.batch_size, self.trust_data_dir = Path(data_dir), batch_size, trust_data_dir
        self.graph = None

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "cora" / "planetoid_raw"

    def _check_raw_files(self) -> None:
        download_verified(self.raw_dir, RELEASE, PUBLIC_URL, "Cora raw files")
        check_planetoid_files(self.raw_dir, self.trust_data_dir)

    def _planetoid(self):
        """PyG's Planetoid dataset read from checked copies of the raw files in a private temporary
        folder (PyG's processed file is written and read there too, so nobody else can swap it)."""
        import torch_geometric.transforms as T
        from torch_geometric.datasets import Planetoid

        download_verified(self.raw_dir, RELEASE, PUBLIC_URL, "Cora raw files")
        with tempfile.TemporaryDirectory(prefix="cora-") as root:
            staged = Path(root) / "Cora" / "raw"
            staged.mkdir(parents=True)
            for name in RAW_FILES:
                shutil.copyfile(self.raw_dir / name, staged / name)
            check_planetoid_files(staged, self.trust_data_dir)  # the bytes PyG reads are the checked ones
            try:
                # row-normalised bag-of-words features, as in Kipf & Welling and PyG's examples/gcn.py
                with contextlib.redirect_stderr(io.StringIO()):  # PyG announces each processing
                    return Planetoid(root, "Cora", transform=T.NormalizeFeatures())[0]
            except Exception as err:  # content that is not what Planetoid expects
                reason = str(err).splitlines()[0] if str(err) else "unreadable content"
                raise DataError(
                    f"Cora raw files in {self.raw_dir} could not be read ({type(err).__name__}: "
                    f"{reason[:120]}); replace them with the Planetoid originals"
                ) from None

    def prepare_data(self) -> None:
        self._check_raw_files()

    def setup(self, stage: str | None = None) -> None:
        if self.graph is None:
            graph = self._planetoid()
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
