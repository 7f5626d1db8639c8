"""QM9 molecule graphs (generated csv + xyz, and PyG's own QM9 folder) and the MPNN on them:
graph contents, the dense edge-network layer against PyG's NNConv, the pipeline stages, train.py
for one epoch with one process and with two MPI processes, and one-line errors for bad files."""

import json
import shutil

import pytest
import torch
from generators.qm9 import molecules, write_pyg_qm9, write_qm9_subset
from torch_geometric.loader import DataLoader

import train as train_script
from lightning_xd.datamodules.qm9 import TARGETS, QM9DataModule
from lightning_xd.models.mpnn import MPNN, EdgeConditionedConv, GaussianDistances

COUNT = 20


@pytest.fixture(scope="module")
def qm9_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("qm9data")
    write_qm9_subset(root, COUNT)
    return root


def _molecules_by_size(datamodule):
    return sorted(
        (m for split in datamodule.splits.values() for m in split), key=lambda m: (m.num_nodes, float(m.y[0, 0]))
    )


def test_graphs_are_complete_with_distances(qm9_dir, tmp_path):
    datamodule = QM9DataModule(str(qm9_dir), str(tmp_path / "cache"), target="alpha")
    datamodule.prepare_data()
    datamodule.setup()
    assert [len(s) for s in datamodule.splits.values()] == [16, 2, 2]
    written = molecules(COUNT)
    for graph in _molecules_by_size(datamodule):
        symbols, pos, _ = min(written, key=lambda m: abs(m[2]["alpha"] - float(graph.target)))
        n = len(symbols)
        assert graph.num_nodes == n and graph.edge_index.shape == (2, n * (n - 1))
        assert graph.x.shape == (n, 6) and torch.equal(graph.x[:, 5], graph.z.float())
        assert torch.equal(graph.x[:, :5].sum(1), torch.ones(n))  # one element each
        sender, receiver = graph.edge_index
        assert not (sender == receiver).any() and len(set(zip(sender.tolist(), receiver.tolist()))) == n * (n - 1)
        expected = torch.tensor(pos, dtype=torch.float)
        distance = (expected[sender] - expected[receiver]).norm(dim=1)
        assert torch.allclose(graph.edge_attr.view(-1), distance, atol=1e-5)
    kwargs = datamodule.model_kwargs()
    train_alpha = torch.cat([m.target for m in datamodule.splits["train"]])
    assert kwargs["target_mean"] == pytest.approx(float(train_alpha.mean()), rel=1e-5)


def test_pyg_qm9_folder_gives_the_same_graphs(qm9_dir, tmp_path):
    """PyG's QM9 layout (raw/qm9_v3.pt, read by torch_geometric.datasets.QM9 without RDKit)."""
    pyg_root = tmp_path / "pyg"
    write_pyg_qm9(pyg_root, COUNT)
    from_pyg = QM9DataModule(str(pyg_root), str(tmp_path / "cache"))
    from_csv = QM9DataModule(str(qm9_dir), str(tmp_path / "cache"))
    for dm in (from_pyg, from_csv):
        dm.prepare_data()
        dm.setup()
    for a, b in zip(_molecules_by_size(from_pyg), _molecules_by_size(from_csv)):
        assert torch.equal(a.z, b.z) and torch.allclose(a.edge_attr, b.edge_attr, atol=1e-5)
        assert torch.allclose(a.y, b.y, atol=1e-5)


def test_dense_layer_equals_pyg_nnconv(qm9_dir, tmp_path):
    from torch import nn
    from torch_geometric.nn import NNConv

    datamodule = QM9DataModule(str(qm9_dir), str(tmp_path / "cache"))
    datamodule.setup()
    batch = next(iter(DataLoader(datamodule.splits["train"], batch_size=8)))
    torch.manual_seed(0)
    distances = GaussianDistances(20, 6.0)
    ours = EdgeConditionedConv(16, 20, edge_hidden=12)
    theirs = NNConv(16, 16, nn.Sequential(ours.edge_hidden, ours.edge_weight), aggr="mean")
    with torch.no_grad():
        theirs.lin.weight.copy_(ours.root.weight)
        theirs.bias.copy_(ours.root.bias)
    h = torch.randn(batch.num_nodes, 16)
    edges = distances(batch.edge_attr)
    expected = theirs(h, batch.edge_index, edges)
    assert torch.allclose(ours(h, batch.edge_index, edges, batch.batch, batch.num_graphs), expected, atol=1e-5)


@pytest.mark.parametrize("readout", ["set2set", "dipole"])
def test_pipeline_blocks_are_the_model(qm9_dir, tmp_path, readout):
    datamodule = QM9DataModule(str(qm9_dir), str(tmp_path / "cache"))
    datamodule.setup()
    batch = next(iter(DataLoader(datamodule.splits["train"], batch_size=8)))
    model = MPNN(**datamodule.model_kwargs(), steps=4, readout=readout, edge_hidden=8, hidden_channels=16)
    stages = model.pipeline_blocks()
    assert len(stages) == 4
    stage_params = {id(p) for stage in stages for p in stage.parameters()}
    assert stage_params == {id(p) for p in model.parameters()}  # every weight in exactly one stage
    assert sum(sum(p.numel() for p in s.parameters()) for s in stages) == sum(p.numel() for p in model.parameters())
    h = model.pipeline_input(batch)
    for stage in stages:
        h = stage(h, batch)
    assert h.shape == (batch.num_graphs,) and torch.equal(h, model(batch))


def _metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def test_one_epoch_in_process(qm9_dir, tmp_path):
    run_dir = tmp_path / "run"
    code = train_script.main(
        [
            "--model",
            "mpnn",
            "--max-epochs",
            "1",
            "--batch-size",
            "4",
            "--hidden-channels",
            "16",
            "--data-dir",
            str(qm9_dir),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--run-dir",
            str(run_dir),
        ]
    )
    assert code == 0
    metrics = _metrics(run_dir)
    assert metrics["world_size"] == 1 and metrics["global_step"] == 4  # 16 training molecules
    assert metrics["test/mae"] > 0 and metrics["test/mae_mean_predictor"] > 0


def _broken_copy(qm9_dir, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(qm9_dir / "qm9_subset", broken / "qm9_subset")
    return broken


def _run(one_line_error, data_dir, tmp_path, *extra):
    return one_line_error(
        "--model", "mpnn", "--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "cache"), *extra
    )


def test_missing_files(one_line_error, tmp_path, qm9_dir):
    err = _run(one_line_error, tmp_path / "empty", tmp_path)
    assert "qm9.csv" in err and "qm9_subset" in err
    broken = _broken_copy(qm9_dir, tmp_path)
    (broken / "qm9_subset" / "qm9_xyz" / "gdb_41.xyz").unlink()
    assert "gdb_41.xyz" in _run(one_line_error, broken, tmp_path)


@pytest.mark.parametrize(
    "content, expected",
    [
        ("3\ncomment\nC 0 0 0\nH 1 0 0\n", "gdb_41.xyz is not an XYZ file"),  # fewer atoms than stated
        ("2\ncomment\nC 0 0 0\nXx 1 0 0\n", "gdb_41.xyz is not an XYZ file"),  # unknown element
        ("two\ncomment\nC 0 0 0\nH 1 0 0\n", "gdb_41.xyz is not an XYZ file"),  # no atom count
    ],
)
def test_malformed_xyz(one_line_error, tmp_path, qm9_dir, content, expected):
    broken = _broken_copy(qm9_dir, tmp_path)
    (broken / "qm9_subset" / "qm9_xyz" / "gdb_41.xyz").write_text(content)
    assert expected in _run(one_line_error, broken, tmp_path)


def test_malformed_csv(one_line_error, tmp_path, qm9_dir):
    broken = _broken_copy(qm9_dir, tmp_path)
    csv = broken / "qm9_subset" / "qm9.csv"
    csv.write_text(csv.read_text().replace(",mu,", ",dipole,"))
    err = _run(one_line_error, broken, tmp_path)
    assert "qm9.csv is not a QM9 table" in err and "mu" in err


def test_unknown_target(one_line_error, qm9_dir, tmp_path):
    err = _run(one_line_error, qm9_dir, tmp_path, "--target", "energy")
    assert "'energy' is not a QM9 target" in err and all(t in err for t in TARGETS)
