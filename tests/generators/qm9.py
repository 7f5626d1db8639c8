"""Tiny QM9 in two on-disk formats: the csv + extended-XYZ subset of ../shared/data/qm9_subset,
and PyG's own ``QM9/raw/qm9_v3.pt`` (the pre-processed list of molecule dicts PyG downloads when
RDKit is absent).

Molecules are random small H/C/N/O/F clusters with known geometry, so a test can recompute every
interatomic distance; ``mu`` is the dipole of fixed per-element charges, so it is learnable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SYMBOLS = ["H", "C", "N", "O", "F"]
NUMBERS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
CHARGE = {"H": 0.2, "C": -0.1, "N": -0.3, "O": -0.4, "F": -0.5}
TARGETS = ["mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "u0", "u298", "h298", "g298", "cv"]
COLUMNS = ["", "mol_id", "A", "B", "C", *TARGETS, "u0_atom", "u298_atom", "h298_atom", "g298_atom"]


def molecules(count: int, seed: int = 0) -> list[tuple[list[str], np.ndarray, dict]]:
    """(symbols, positions in Å, properties) of ``count`` random molecules of 3-9 atoms."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        symbols = list(rng.choice(SYMBOLS, rng.integers(3, 10)))
        pos = np.round(rng.normal(scale=1.2, size=(len(symbols), 3)), 4)
        charges = np.array([CHARGE[s] for s in symbols])
        charges -= charges.mean()
        props = {name: float(rng.normal()) for name in COLUMNS[2:]}
        props["mu"] = float(np.linalg.norm(charges @ pos) * 4.8)
        out.append((symbols, pos, props))
    return out


def write_qm9_subset(root: Path, count: int = 12, seed: int = 0) -> Path:
    """Write ``root/qm9_subset/qm9.csv`` and ``qm9_xyz/gdb_N.xyz``; return the subset folder."""
    folder = Path(root) / "qm9_subset"
    (folder / "qm9_xyz").mkdir(parents=True, exist_ok=True)
    rows = [",".join(COLUMNS)]
    for i, (symbols, pos, props) in enumerate(molecules(count, seed)):
        mol_id = f"gdb_{40 * i + 1}"
        rows.append(",".join([str(40 * i), mol_id, *(repr(props[c]) for c in COLUMNS[2:])]))
        atoms = [f"{s}  {x:.8f}  {y:.8f}  {z:.8f}" for s, (x, y, z) in zip(symbols, pos)]
        text = [str(len(symbols)), 'Properties=species:S:1:pos:R:3 pbc="F F F"', *atoms]
        (folder / "qm9_xyz" / f"{mol_id}.xyz").write_text("\n".join(text) + "\n")
    (folder / "qm9.csv").write_text("\n".join(rows) + "\n")
    return folder


def write_pyg_qm9(root: Path, count: int = 12, seed: int = 0) -> Path:
    """Write ``root/QM9/raw/qm9_v3.pt`` as PyG ships it: a list of dicts, 19 targets per molecule."""
    import torch

    folder = Path(root) / "QM9" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    dicts = []
    for i, (symbols, pos, props) in enumerate(molecules(count, seed)):
        z = torch.tensor([NUMBERS[s] for s in symbols])
        y = torch.tensor([[props[t] for t in TARGETS] + [0.0] * 7], dtype=torch.float)
        dicts.append(
            {
                "x": torch.zeros(len(symbols), 11),
                "edge_index": torch.zeros(2, 0, dtype=torch.long),
                "edge_attr": torch.zeros(0, 4),
                "y": y,
                "pos": torch.tensor(pos, dtype=torch.float),
                "z": z,
                "name": f"gdb_{i + 1}",
                "idx": torch.tensor([i]),
            }
        )
    torch.save(dicts, folder / "qm9_v3.pt")
    return folder.parent
