"""GraphSAGE on a graph partitioned over ranks: METIS parts and halos, the CSR sampler, train.py on
generated PPI-layout files and on a generated graph (one epoch, one process and two MPI processes), the mpi
strategy's sparse table gradients against single-process training on the union of the batches,
and one-line errors for bad PPI files."""

import json
import shutil

import pytest
import torch
from generators.ppi import write_ppi

import train as train_script
from lightning_xd.datamodules.partitioned_graph import (
    expand_rows,
    graph_part,
    metis_membership,
    sample_neighbours,
    sampled_subgraph,
    to_csr,
)
from lightning_xd.datamodules.synthetic_graph import SyntheticGraphDataModule
from lightning_xd.models.graphsage import GraphSAGE

SMALL_GRAPH = ["--data", "synthetic-graph", "--num-nodes", "400", "--num-features", "8", "--num-communities", "4"]


@pytest.fixture(scope="module")
def ppi_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppidata")
    write_ppi(root)
    return root


@pytest.fixture(scope="module")
def small_graph():
    datamodule = SyntheticGraphDataModule(num_nodes=500, num_communities=5, num_features=4)
    return datamodule.load_graph()


def _neighbour_sets(edge_index, num_nodes):
    sets = [set() for _ in range(num_nodes)]
    for a, b in edge_index.t().tolist():
        sets[a].add(b)
    return sets


@pytest.mark.parametrize("parts", [2, 3])
def test_parts_cover_every_node_once_with_their_halo(small_graph, parts):
    num_nodes = small_graph["x"].shape[0]
    rowptr, col = to_csr(small_graph["edge_index"], num_nodes)
    membership = metis_membership(rowptr, col, parts)
    neighbours = _neighbour_sets(small_graph["edge_index"], num_nodes)
    owned_by = torch.zeros(num_nodes, dtype=torch.long)
    for p in range(parts):
        part = graph_part(small_graph, rowptr, col, membership, p)
        owned, halo = part["node_ids"][: part["num_owned"]], part["node_ids"][part["num_owned"] :]
        owned_by[owned] += 1
        expected_halo = set().union(*(neighbours[n] for n in owned.tolist())) - set(owned.tolist())
        assert set(halo.tolist()) == expected_halo
        assert 0.3 * num_nodes / parts < part["num_owned"] < 1.7 * num_nodes / parts  # METIS balances
        local = part["node_ids"]
        for i in range(part["num_owned"]):  # an owned node keeps every neighbour
            row = part["col"][part["rowptr"][i] : part["rowptr"][i + 1]]
            assert set(local[row].tolist()) == neighbours[int(local[i])]
        assert torch.equal(part["x"], small_graph["x"][local])
    assert torch.equal(owned_by, torch.ones(num_nodes, dtype=torch.long))


def test_sampler_draws_real_neighbours_within_fanout(small_graph):
    num_nodes = small_graph["x"].shape[0]
    rowptr, col = to_csr(small_graph["edge_index"], num_nodes)
    neighbours = _neighbour_sets(small_graph["edge_index"], num_nodes)
    nodes = torch.tensor([0, 5, 17, 3, 99])
    owner, picked = sample_neighbours(rowptr, col, nodes, 3, torch.Generator().manual_seed(0))
    assert torch.equal(owner, torch.sort(owner).values)  # grouped in the order of ``nodes``
    for i, node in enumerate(nodes.tolist()):
        mine = picked[owner == i].tolist()
        assert set(mine) <= neighbours[node] and len(mine) == min(3, len(neighbours[node]))
    targets = torch.tensor([1, 2, 3])
    subgraph_nodes, edges, hop_nodes = sampled_subgraph(rowptr, col, targets, [4, 2], torch.Generator().manual_seed(0))
    assert torch.equal(subgraph_nodes[:3], targets) and subgraph_nodes.unique().numel() == subgraph_nodes.numel()
    assert hop_nodes[0] == 3 and sum(hop_nodes) == subgraph_nodes.numel()
    assert (edges[1] < hop_nodes[0] + hop_nodes[1]).all()  # only targets and first-hop nodes receive
    for sender, receiver in edges.t().tolist():
        assert int(subgraph_nodes[sender]) in neighbours[int(subgraph_nodes[receiver])]
    _, entry = expand_rows(rowptr, targets)
    assert entry.numel() == int((rowptr[targets + 1] - rowptr[targets]).sum())


def _metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("data", ["ppi", "synthetic-graph"])
def test_one_epoch_in_process(ppi_dir, tmp_path, data):
    data_args = ["--data", "ppi"] if data == "ppi" else SMALL_GRAPH
    run_dir = tmp_path / "run"
    code = train_script.main(
        [
            "--model",
            "graphsage",
            *data_args,
            "--max-epochs",
            "1",
            "--batch-size",
            "32",
            "--hidden-channels",
            "16",
            "--data-dir",
            str(ppi_dir),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--run-dir",
            str(run_dir),
        ]
    )
    assert code == 0
    metrics = _metrics(run_dir)
    assert 0 <= metrics["test/micro_f1"] <= 1 and metrics["test/peak_rss_mb_rank0"] > 0


def _reference_training(ranks: list[dict]) -> dict:
    """Single-process training where step k sees the union of every rank's k-th batch."""
    model = GraphSAGE(**ranks[0]["hparams"])
    model.load_state_dict(ranks[0]["initial"])  # what the strategy broadcast from rank 0
    model.train()
    optimizers = model.configure_optimizers()
    for step_batches in zip(*(r["batches"] for r in ranks)):
        for optimizer in optimizers:
            optimizer.zero_grad()
        embeddings = [model.embed(b) for b in step_batches]
        negatives = torch.cat([z[b.neg_pairs[1]] for z, b in zip(embeddings, step_batches)])  # every rank's
        loss = sum(model.link_loss(z, b, negatives) for z, b in zip(embeddings, step_batches)) / len(step_batches)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
    return model.state_dict()


def test_two_ranks_equal_single_process_on_union(mpirun, tmp_path):
    steps = 4
    mpirun(
        2,
        "train_graphsage_steps.py",
        *("--out", str(tmp_path / "out"), "--data-dir", str(tmp_path), "--strategy", "mpi", "--steps", str(steps)),
    )
    ranks = [torch.load(tmp_path / "out" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    reference = _reference_training(ranks)
    for result in ranks:
        assert len(result["batches"]) == steps
        assert result["sparse_grad_seen"] == [True] * steps  # averaged, and still sparse
        for name, value in reference.items():
            assert torch.equal(result["state"][name], ranks[0]["state"][name]), f"{name} differs between ranks"
            assert torch.allclose(result["state"][name], value, atol=1e-5), name
    assert not torch.equal(ranks[0]["state"]["table.weight"], ranks[0]["initial"]["table.weight"])
    seeds = [set(b.n_id[b.pos_pairs[0]].tolist()) for r in ranks for b in r["batches"]]
    assert not seeds[0] & seeds[steps]  # each rank trained on pairs of its own part


def _broken_ppi(ppi_dir, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(ppi_dir / "ppi", broken / "ppi")
    return broken


def _run(one_line_error, data_dir, tmp_path):
    return one_line_error(
        "--model", "graphsage", "--data", "ppi", "--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "cache")
    )


def test_missing_ppi_files(one_line_error, tmp_path, ppi_dir):
    assert "train_graph.json" in _run(one_line_error, tmp_path / "empty", tmp_path)
    broken = _broken_ppi(ppi_dir, tmp_path)
    (broken / "ppi" / "valid_labels.npy").unlink()
    err = _run(one_line_error, broken, tmp_path)
    assert "valid_labels.npy" in err and "train_graph.json" not in err


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("train_graph.json", "{not json", "train_graph.json is not node-link graph JSON"),
        (
            "test_graph.json",
            '{"nodes": [{"id": 0}], "links": [{"source": 0, "target": 7}]}',
            "test_graph.json is not node-link graph JSON",
        ),
        ("valid_feats.npy", "not numpy", "valid_feats.npy is not a .npy array"),
    ],
)
def test_malformed_ppi_files(one_line_error, tmp_path, ppi_dir, name, content, expected):
    broken = _broken_ppi(ppi_dir, tmp_path)
    (broken / "ppi" / name).write_text(content)
    assert expected in _run(one_line_error, broken, tmp_path)


def test_labels_of_the_wrong_length(one_line_error, tmp_path, ppi_dir):
    import numpy as np

    broken = _broken_ppi(ppi_dir, tmp_path)
    np.save(broken / "ppi" / "test_labels.npy", np.zeros((3, 5), dtype=np.int64))
    assert "test_labels.npy has 3 rows of labels" in _run(one_line_error, broken, tmp_path)
