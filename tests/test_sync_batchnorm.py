"""``sync_batchnorm=True`` over MPI (lightning_xd.parallel.sync_batchnorm): BatchNorm layers normalise with the
statistics of every rank's batch and train exactly as one BatchNorm on the union batch.

In process, ranks are threads talking through a small in-memory communicator (the math, uneven and
empty batches, bf16, apply / revert); one ``mpirun -np 2`` job runs the same layer cases over MPI
and the Lightning fits (with and without sync_batchnorm) against one process on the union batches.
"""

from __future__ import annotations

import importlib.util
import threading

import pytest
import torch
from conftest import REPO, run_mpi
from torch import nn

from lightning_xd.errors import UserError
from lightning_xd.parallel.sync_batchnorm import MPISyncBatchNorm, MPISyncedBatchNorm


def _script_module(name: str):
    """A script of tests/mpi_scripts imported as a module (its job runs only under ``__main__``)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "mpi_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cases = _script_module("sync_batchnorm_cases")  # the layer cases, the model and the references


# ---- ranks as threads ------------------------------------------------------------------------------
class ThreadGroup:
    """What the ranks of one in-memory communicator share: their slots and a barrier."""

    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=30)
        self.slots: list = [None] * size

    def allreduce(self, rank: int, tensor: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        total = self.slots[0].clone()
        for other in self.slots[1:]:
            total += other
        self.barrier.wait()
        return tensor.copy_(total)


class ThreadComm:
    """The part of lightning_xd.comm.communicator.Communicator the layer uses, for one thread; it counts its calls."""

    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank = group, rank
        self.allreduces: list[int] = []  # numel of each allreduce
        self.splits = 0

    @property
    def size(self) -> int:
        return self.group.size

    def allreduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        assert op == "sum"
        self.allreduces.append(tensor.numel())
        return self.group.allreduce(self.rank, tensor)

    def split(self, color: int, key=None) -> ThreadComm:
        self.splits += 1
        return self


def in_threads(size: int, work):
    """``work(rank, comm)`` on ``size`` threads, each with its ThreadComm; results in rank order."""
    group = ThreadGroup(size)
    comms = [ThreadComm(group, r) for r in range(size)]
    results, errors = [None] * size, [None] * size

    def run(rank):
        try:
            results[rank] = work(rank, comms[rank])
        except BaseException as err:  # noqa: BLE001  (re-raised in the test's thread)
            errors[rank] = err
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next(
        (e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)),
        next((e for e in errors if e is not None), None),
    )
    if first is not None:
        raise first
    return results, comms


# ---- comparing with one BatchNorm on the union batch -----------------------------------------------
def tolerances(case: str) -> dict:
    return dict(atol=1e-2, rtol=1e-2) if cases.LAYER_CASES[case][3] == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)


def assert_matches_union(case: str, ranks: list[dict], reference: dict) -> None:
    tol = tolerances(case)
    for step, expected in enumerate(reference["steps"]):
        got = [r["steps"][step] for r in ranks]
        out = torch.cat([g["out"] for g in got])
        assert out.dtype == expected["out"].dtype, f"{case} step {step}: output dtype"
        torch.testing.assert_close(out.float(), expected["out"].float(), **tol, msg=f"{case} step {step}: output")
        input_grad = torch.cat([g["input_grad"] for g in got])
        assert input_grad.dtype == expected["input_grad"].dtype
        torch.testing.assert_close(
            input_grad.float(), expected["input_grad"].float(), **tol, msg=f"{case} step {step}: input gradient"
        )
        for name, value in expected["param_grads"].items():  # local per rank: their sum is the union's
            total = sum(g["param_grads"][name] for g in got)
            assert total.dtype == value.dtype
            torch.testing.assert_close(total, value, **tol, msg=f"{case} step {step}: {name} grad")
    for rank, result in enumerate(ranks):
        assert result["synced_class"] == "MPISyncedBatchNorm"
        assert result["state"].keys() == reference["state"].keys()
        for name, value in reference["state"].items():  # running statistics and num_batches_tracked
            torch.testing.assert_close(
                result["state"][name], value, atol=1e-5, rtol=1e-5, msg=f"{case} rank {rank}: {name}"
            )
        assert result["reverted_is_original"]
        for name, value in result["state"].items():
            assert torch.equal(result["reverted_state"][name], value), f"{case}: revert changed {name}"
    eval_out = torch.cat([r["eval_out"] for r in ranks])
    torch.testing.assert_close(eval_out.float(), reference["eval_out"].float(), **tol, msg=f"{case}: eval output")


@pytest.mark.parametrize("case", list(cases.LAYER_CASES))
def test_layer_in_threads_equals_one_batchnorm_on_union_batch(case):
    ranks, comms = in_threads(
        len(cases.LAYER_CASES[case][2]), lambda rank, comm: cases.run_layer_case(case, rank, lambda: comm)
    )
    assert_matches_union(case, ranks, cases.layer_reference(case))
    channels = cases.plain_layer(case).num_features
    for comm in comms:  # per training step: one allreduce forward, one backward; none in eval mode
        assert comm.allreduces == [2 * channels + 1, 2 * channels] * cases.STEPS
        assert comm.splits == 1


def test_communicator_asked_at_every_forward():
    """After a failure the strategy's communicator is another one: the next forward uses it."""
    first, second = ThreadGroup(2), ThreadGroup(2)

    def work(rank, _):
        comms = [ThreadComm(first, rank), ThreadComm(second, rank)]
        current = [comms[0]]
        layer = MPISyncBatchNorm(lambda: current[0]).apply(nn.BatchNorm1d(3))
        x = torch.randn(4, 3, requires_grad=True)
        layer(x).sum().backward()
        current[0] = comms[1]
        layer(x).sum().backward()
        layer(x)
        return [(c.splits, c.allreduces) for c in comms]

    results, _ = in_threads(2, work)
    for got in results:
        assert got == [(1, [7, 6]), (1, [7, 6, 7])]


def test_bf16_autocast_gives_what_batchnorm_gives():
    """Under CPU bf16 autocast a convolution hands BatchNorm a bf16 tensor; BatchNorm keeps float32
    parameters and statistics and returns bf16. The synced layer does the same, accumulating in float32."""
    torch.manual_seed(0)
    conv, x = nn.Conv2d(2, 3, 3), torch.randn(8, 2, 6, 6)
    plain = nn.BatchNorm2d(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(conv(x))
    reference_mean = plain.running_mean.clone()

    def work(rank, comm):
        layer = MPISyncBatchNorm(lambda: comm).apply(nn.BatchNorm2d(3))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(conv(x[4 * rank : 4 * rank + 4]))
        out.float().sum().backward()
        return out.detach(), layer.running_mean.clone(), layer.weight.grad

    results, _ = in_threads(2, work)
    out = torch.cat([r[0] for r in results])
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=1e-2, rtol=1e-2)
    for _, running_mean, weight_grad in results:
        assert running_mean.dtype == weight_grad.dtype == torch.float32
        torch.testing.assert_close(running_mean, reference_mean, atol=1e-4, rtol=1e-3)


def test_one_rank_and_eval_mode_are_plain_batchnorm():
    """A communicator of one rank, or eval mode: F.batch_norm itself, bit for bit, and no communication."""
    torch.manual_seed(0)
    plain, x = cases.plain_layer("1d-seq-cumulative"), torch.randn(5, 4, 6)
    comm = ThreadComm(ThreadGroup(1), 0)
    layer = MPISyncBatchNorm(lambda: comm).apply(cases.plain_layer("1d-seq-cumulative"))
    for _ in range(2):
        assert torch.equal(layer(x), plain(x))
    layer.eval(), plain.eval()
    assert torch.equal(layer(x), plain(x))
    for name, value in plain.state_dict().items():
        assert torch.equal(layer.state_dict()[name], value), name
    assert comm.allreduces == []

    two = ThreadComm(ThreadGroup(2), 0)  # eval on a real group: would block if it communicated
    evaluating = MPISyncBatchNorm(lambda: two).apply(cases.plain_layer("2d")).eval()
    reference = cases.plain_layer("2d").eval()
    x = torch.randn(5, 3, 4, 4)
    assert torch.equal(evaluating(x), reference(x)) and two.allreduces == [] and two.splits == 0


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4, affine=False), nn.SyncBatchNorm(4))
        self.shared = self.bn  # one module under two names stays one module

    def forward(self, x):
        return self.head(self.shared(self.conv(x)))


def test_apply_keeps_parameters_buffers_and_keys_and_revert_restores_the_modules():
    torch.manual_seed(0)
    net = Net()
    plain_modules = {name: m for name, m in net.named_modules(remove_duplicate=False)}
    tensors = {name: t for name, t in net.state_dict(keep_vars=True).items()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)  # built before apply, as a user may
    seen = []
    net.bn.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    sync = MPISyncBatchNorm(lambda: ThreadComm(ThreadGroup(1), 0))

    synced = sync.apply(net)
    assert synced is net
    assert type(net.bn) is MPISyncedBatchNorm and net.shared is net.bn
    assert [type(m) for m in net.head] == [nn.Flatten, nn.Linear, MPISyncedBatchNorm, MPISyncedBatchNorm]
    assert sync.apply(net) is net and type(net.bn) is MPISyncedBatchNorm  # applying twice changes nothing
    after = net.state_dict(keep_vars=True)
    assert list(after) == list(tensors)
    assert all(after[name] is tensor for name, tensor in tensors.items())  # the same objects

    (net(torch.randn(6, 2, 4, 4)) * torch.randn(6, 4)).sum().backward()
    optimizer.step()  # moves the weights the synced layers use
    assert not torch.equal(net.bn.weight, torch.ones(3))
    assert seen == [(6, 3, 2, 2)]  # the user's hook ran on the synced layer
    net.double()  # replaces the buffers: revert must hand back the current ones
    trained = {name: t.clone() for name, t in net.state_dict().items()}

    reverted = sync.revert(net)
    assert reverted is net
    for name, module in net.named_modules(remove_duplicate=False):
        assert module is plain_modules[name], name  # the user's own modules, of their own classes
    assert type(net.bn) is nn.BatchNorm2d and type(net.head[3]) is nn.SyncBatchNorm
    assert net.state_dict().keys() == trained.keys()
    for name, value in net.state_dict().items():
        assert value.dtype == torch.float64 or value.dtype == torch.int64
        assert torch.equal(value, trained[name]), name
    assert net.head[2].training and any(p is net.bn.weight for p in optimizer.param_groups[0]["params"])
    net.bn(torch.randn(2, 3, 2, 2, dtype=torch.float64))
    assert len(seen) == 2  # and is still on the module given back

    root = nn.BatchNorm1d(2).eval()  # a model that is one BatchNorm: apply returns its replacement
    converted = sync.apply(root)
    assert type(converted) is MPISyncedBatchNorm and not converted.training
    assert sync.revert(converted) is root


def test_one_value_per_channel_over_all_ranks_is_refused_like_batchnorm():
    def work(rank, comm):
        layer = MPISyncBatchNorm(lambda: comm).apply(nn.BatchNorm1d(3))
        layer(torch.randn(1 - rank, 3))

    with pytest.raises(ValueError, match="more than 1 value per channel"):
        in_threads(2, work)


def test_lazy_batchnorm_before_its_first_forward_is_a_user_error():
    model = nn.Sequential()
    model.add_module("norm", nn.LazyBatchNorm1d())
    with pytest.raises(UserError, match="lazy BatchNorm 'norm'"):
        MPISyncBatchNorm(lambda: None).apply(model)


# ---- over MPI: one job of 2 ranks for every case below ----------------------------------------------
@pytest.fixture(scope="module")
def mpi_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync_batchnorm")
    run_mpi(
        2,
        "sync_batchnorm_cases.py",
        *("--out", str(out), "--parts", "layers", "lightning", "lightning-unsynced"),
        cwd=out,
        timeout=240,
    )

    def result(part: str) -> list[dict]:
        ranks = [torch.load(out / f"{part}-rank{r}.pt") for r in range(2)]
        for rank, got in enumerate(ranks):
            assert "error" not in got, f"rank {rank}, {part}:\n{got['error']}"
        return ranks

    return result


def test_layers_on_two_mpi_ranks_equal_one_batchnorm_on_union_batch(mpi_job):
    ranks = mpi_job("layers")
    for case in cases.LAYER_CASES:
        assert_matches_union(case, [r[case] for r in ranks], cases.layer_reference(case))


@pytest.fixture(scope="module")
def union_training():
    return cases.lightning_reference()


def test_lightning_sync_batchnorm_trains_as_one_process_on_union_batches(mpi_job, union_training):
    ranks = mpi_job("lightning")
    for rank, got in enumerate(ranks):
        assert got["layer_sync"] == "MPISyncBatchNorm"
        assert got["classes_in_training"] == ["MPISyncedBatchNorm"] and got["optimizer_holds_weight"]
        assert got["class_after_fit"] == "BatchNorm1d"  # reverted at teardown
        assert got["steps"] == 4 * cases.LIGHTNING_EPOCHS
        assert got["state"].keys() == union_training.keys()
        for name, value in union_training.items():  # parameters and running statistics
            torch.testing.assert_close(got["state"][name], value, atol=1e-5, rtol=1e-5, msg=f"rank {rank}: {name}")


def test_lightning_without_sync_batchnorm_differs_from_union_batches(mpi_job, union_training):
    """The comparison above can fail: each rank's own batch statistics give another model."""
    got = mpi_job("lightning-unsynced")[0]["state"]
    assert got["net.1.running_mean"].shape == union_training["net.1.running_mean"].shape
    for name in ("net.0.weight", "net.1.weight", "net.1.running_mean", "net.1.running_var"):
        assert not torch.allclose(got[name], union_training[name], atol=1e-3), name
