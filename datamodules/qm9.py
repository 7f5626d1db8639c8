"""QM9 molecules as graphs for property regression: atoms are nodes, every pair of atoms in a
molecule is an edge whose feature is the interatomic distance (the enn-s2s setting of Gilmer et
al., "Neural Message Passing for Quantum Chemistry", ICML 2017, and of PyG's qm9_nn_conv.py).

Data: ``qm9_subset/qm9.csv`` (MoleculeNet's columns) plus one extended-XYZ file per molecule in
``qm9_subset/qm9_xyz/`` (every 40th QM9 molecule, 3,000 in all; Ramakrishnan et al., Scientific
Data 2014; see ../shared/data/SOURCES.md). When the data dir instead holds PyG's own ``QM9/``
folder (``raw/qm9_v3.pt`` or ``processed/data_v3.pt``), it is read through
``torch_geometric.datasets.QM9``; its energies are in eV where the csv has Hartree.
Node features: one-hot H, C, N, O, F and the atomic number. ``--target`` picks one of the 12
standard targets (``mu`` by default), the split is a fixed seeded 80/10/10, and targets are
standardised with the training part's mean and deviation (the model undoes it, so MAE is in the
target's own units).
Reference: Gilmer et al. reach a ``mu`` MAE of 0.030 D with 110k training molecules; with 2,400
the bar is the MAE of predicting the training mean.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader

from lightning_xd.data import cache_dir, digest, eval_sampler, load_or_build, require_files
from lightning_xd.errors import DataError, UserError
from lightning_xd.launch.registry import DATAMODULES
from lightning_xd.progress import progress
from lightning_xd.safe_loading import load_torch_file

TARGETS = ["mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "u0", "u298", "h298", "g298", "cv"]
ELEMENTS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
ATOMIC_NUMBERS = list(ELEMENTS.values())
PYG_FILES = ["raw/qm9_v3.pt", "processed/data_v3.pt"]


def atom_features(z: torch.Tensor) -> torch.Tensor:
    """One-hot element (H, C, N, O, F) followed by the atomic number."""
    one_hot = (z.unsqueeze(1) == torch.tensor(ATOMIC_NUMBERS)).float()
    return torch.cat([one_hot, z.unsqueeze(1).float()], dim=1)


def molecule_graph(z: torch.Tensor, pos: torch.Tensor, y: torch.Tensor) -> Data:
    """The complete directed graph over a molecule's atoms, each edge carrying its length in Å."""
    n = z.numel()
    source, target = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    not_self = source != target
    edge_index = torch.stack([source[not_self], target[not_self]])
    distance = (pos[edge_index[0]] - pos[edge_index[1]]).norm(dim=1, keepdim=True)
    return Data(x=atom_features(z), z=z, pos=pos, edge_index=edge_index, edge_attr=distance, y=y.view(1, -1))


def read_xyz(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Atomic numbers and positions (Å) of an extended-XYZ file: count, comment, ``symbol x y z`` lines."""
    try:
        lines = path.read_text().splitlines()
        count = int(lines[0])
        atoms = [line.split() for line in lines[2 : 2 + count]]
        if len(atoms) != count or any(len(a) < 4 for a in atoms):
            raise ValueError
        z = torch.tensor([ELEMENTS[a[0]] for a in atoms])
        pos = torch.tensor([[float(v) for v in a[1:4]] for a in atoms])
    except (ValueError, IndexError, KeyError, UnicodeDecodeError):
        raise DataError(
            f"{path} is not an XYZ file of H/C/N/O/F atoms (atom count, comment line, then 'symbol x y z' per atom)"
        ) from None
    return z, pos


def read_targets(csv: Path) -> tuple[list[str], torch.Tensor]:
    """Molecule ids and their 12 standard targets from a MoleculeNet-style qm9.csv."""
    import pandas as pd

    try:
        table = pd.read_csv(csv)
        ids = table["mol_id"].astype(str).tolist()
        values = torch.tensor(table[TARGETS].to_numpy(dtype="float64"), dtype=torch.float)
    except Exception as err:  # pandas raises many kinds: unreadable text, missing or non-numeric columns
        raise DataError(
            f"{csv} is not a QM9 table with columns mol_id, {', '.join(TARGETS)} ({type(err).__name__})"
        ) from None
    if not ids or torch.isnan(values).any():
        raise DataError(f"{csv} has no rows or empty target values; expected one numeric row per molecule")
    return ids, values


@DATAMODULES.register("qm9")
class QM9DataModule(LightningDataModule):
    def __init__(
        self,
        data_dir: str = "./data",
        cache_dir: str | None = None,
        batch_size: int = 32,
        target: str = "mu",
        split_seed: int = 0,
    ):
        super().__init__()
        if target not in TARGETS:
            raise UserError(f"--target {target!r} is not a QM9 target; choose one of {', '.join(TARGETS)}")
        self.data_dir, self.cache, self.batch_size = Path(data_dir), cache_dir, batch_size
        self.target, self.split_seed = target, split_seed
        self.splits: dict[str, list[Data]] | None = None

    @property
    def subset_dir(self) -> Path:
        return self.data_dir / "qm9_subset"

    @property
    def pyg_dir(self) -> Path:
        return self.data_dir / "QM9"

    def _source_files(self) -> list[Path]:
        """The files the graphs are built from: the csv + xyz subset, else PyG's QM9 folder."""
        if (self.subset_dir / "qm9.csv").is_file() or not self.pyg_dir.is_dir():
            csv = require_files(self.subset_dir, ["qm9.csv"], "QM9 subset")[0]
            ids, _ = read_targets(csv)
            return [csv, *require_files(self.subset_dir / "qm9_xyz", [f"{i}.xyz" for i in ids], "QM9 subset")]
        present = [self.pyg_dir / name for name in PYG_FILES if (self.pyg_dir / name).is_file()]
        if not present:
            raise DataError(f"PyG QM9 folder {self.pyg_dir}: expected raw/qm9_v3.pt or processed/data_v3.pt")
        return present

    @staticmethod
    def _check_pyg_file(staged: Path, original: Path) -> None:
        fix = "replace it with the file PyG's QM9 dataset writes"
        try:
            load_torch_file(staged, f"PyG QM9 file (from {original})", fix)
        except UserError:
            raise
        except Exception as err:  # not a torch file at all
            raise DataError(f"PyG QM9 file {original} could not be read ({type(err).__name__}); {fix}") from None

    def _build_from_subset(self, files: list[Path]) -> list[Data]:
        ids, targets = read_targets(files[0])
        return [
            molecule_graph(*read_xyz(path), y)
            for path, y in progress(zip(files[1:], targets), "QM9: building molecule graphs", total=len(ids))
        ]

    def _build_from_pyg(self, files: list[Path]) -> list[Data]:
        """PyG's QM9 reader on copies of the files in a private temporary folder, each first loaded
        restricted: PyG retries a failed restricted load unrestricted, so only files that need no
        retry reach it."""
        from torch_geometric.datasets import QM9

        with tempfile.TemporaryDirectory(prefix="qm9-") as root:
            for path in files:  # staged: PyG writes its processed file beside the raw one
                staged = Path(root) / path.relative_to(self.pyg_dir)
                staged.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, staged)
                self._check_pyg_file(staged, path)
            try:
                with contextlib.redirect_stderr(io.StringIO()):  # PyG announces its processing
                    molecules = list(QM9(root))
            except Exception as err:  # PyG's own loader found something it cannot read
                raise DataError(
                    f"PyG QM9 folder {self.pyg_dir} could not be read ({type(err).__name__}); "
                    "expected PyG's qm9_v3.pt or data_v3.pt"
                ) from None
        # PyG's first 12 columns are the 12 standard targets, in our order
        return [
            molecule_graph(m.z, m.pos, m.y[0, : len(TARGETS)])
            for m in progress(molecules, "QM9: building molecule graphs", total=len(molecules))
        ]

    def _molecules(self) -> list[Data]:
        files = self._source_files()
        build = self._build_from_subset if files[0].suffix == ".csv" else self._build_from_pyg
        cache_file = cache_dir(self.data_dir, self.cache) / "qm9" / f"{digest(files, graph='complete-v1')}.pt"
        # cached as one dict of tensors per molecule: a cache holds no classes (lightning_xd.data)
        tensors = load_or_build(cache_file, lambda: [m.to_dict() for m in build(files)], "QM9 molecule graphs")
        return [Data(**molecule) for molecule in tensors]

    def prepare_data(self) -> None:
        self._molecules()

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        molecules = self._molecules()
        column = TARGETS.index(self.target)
        for m in molecules:  # the one target the model learns, kept beside the full row
            m.target = m.y[:, column]
        order = torch.randperm(len(molecules), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        n_train, n_val = int(0.8 * len(molecules)), int(0.1 * len(molecules))
        parts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
        self.splits = {name: [molecules[i] for i in index] for name, index in parts.items()}
        if min(len(s) for s in self.splits.values()) == 0:
            raise DataError(
                f"QM9 data in {self.data_dir} has {len(molecules)} molecules; the 80/10/10 split needs at least 10"
            )

    def model_kwargs(self) -> dict:
        self.setup()
        train_targets = torch.cat([m.target for m in self.splits["train"]])
        return {
            "num_features": self.splits["train"][0].x.shape[1],
            "target": self.target,
            "target_mean": float(train_targets.mean()),
            "target_std": float(train_targets.std()),
        }

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        batch.batch_size = batch.num_graphs  # samples are molecules (RunSummary counts them), not atoms
        return batch

    def train_dataloader(self) -> DataLoader:
        # PyG's loader collates Data into a Batch; Lightning swaps in its DistributedSampler (a plain
        # torch DataLoader would not collate Data objects: PyG issue 8475)
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True, drop_last=True)

    def _eval_loader(self, split: str) -> DataLoader:
        molecules = self.splits[split]
        return DataLoader(molecules, batch_size=self.batch_size, sampler=eval_sampler(molecules, self.trainer))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
