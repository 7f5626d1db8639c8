"""Tiny Cora in Planetoid's raw format (``ind.cora.{x,tx,allx,y,ty,ally,graph,test.index}``).

Planetoid fixes validation to the 500 nodes after the labelled training nodes, so even the tiny
graph has 20 + 500 training-graph nodes and 60 test nodes. Features carry the class, so a GCN
learns it within a few epochs.
"""

from __future__ import annotations

import pickle
from collections import defaultdict
from pathlib import Path

import numpy as np
import scipy.sparse as sp

NUM_CLASSES, NUM_FEATURES = 3, 16
NUM_LABELLED, NUM_ALL, NUM_TEST = 20, 520, 60


def _features(labels: np.ndarray, rng: np.random.Generator) -> sp.csr_matrix:
    x = (rng.random((len(labels), NUM_FEATURES)) < 0.1).astype(np.float32)
    x[np.arange(len(labels)), labels] = 1.0  # the class is visible in the features
    return sp.csr_matrix(x)


def _one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(NUM_CLASSES, dtype=np.int32)[labels]


def write_planetoid_cora(root: Path, seed: int = 0) -> Path:
    """Write the eight raw files into ``root/cora/planetoid_raw`` and return that folder."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cora" / "planetoid_raw"
    folder.mkdir(parents=True, exist_ok=True)
    all_labels = rng.integers(0, NUM_CLASSES, NUM_ALL)
    test_labels = rng.integers(0, NUM_CLASSES, NUM_TEST)
    test_ids = rng.permutation(np.arange(NUM_ALL, NUM_ALL + NUM_TEST))  # unsorted, as in the original
    labels_by_id = np.concatenate([all_labels, np.empty(NUM_TEST, dtype=int)])
    labels_by_id[test_ids] = test_labels
    graph = defaultdict(list)
    for node in range(NUM_ALL + NUM_TEST):  # edges mostly within a class
        same = np.flatnonzero(labels_by_id == labels_by_id[node])
        for other in rng.choice(same, 3):
            if other != node:
                graph[node].append(int(other))
                graph[int(other)].append(node)
    files = {
        "x": _features(all_labels[:NUM_LABELLED], rng),
        "y": _one_hot(all_labels[:NUM_LABELLED]),
        "allx": _features(all_labels, rng),
        "ally": _one_hot(all_labels),
        "tx": _features(test_labels, rng),
        "ty": _one_hot(test_labels),
        "graph": graph,
    }
    for name, content in files.items():
        with open(folder / f"ind.cora.{name}", "wb") as f:
            pickle.dump(content, f, protocol=2)
    (folder / "ind.cora.test.index").write_text("\n".join(str(i) for i in test_ids) + "\n")
    return folder
