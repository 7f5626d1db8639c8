"""Gradient buckets where ranks differ: gradients finished in different orders, parameters used on
one rank only or on none, parameters unfrozen mid-training. Every case ends with the same
parameters on both ranks, equal to one process trained on the union of their batches."""

import pytest
import torch
from gradient_cases import CASES, union_reference

TRAINED = ["order", "partly-used", "unfrozen"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """One 2-rank job runs every case; {case: [rank 0 result, rank 1 result]}."""
    from conftest import run_mpi

    out = tmp_path_factory.mktemp("gradient-cases")
    run_mpi(2, "train_gradient_cases.py", "--out", str(out), "--cases", *CASES, cwd=out, timeout=240)
    return {case: [torch.load(out / f"{case}-rank{r}.pt") for r in range(2)] for case in CASES}


@pytest.mark.parametrize("case", TRAINED)
def test_ranks_agree_and_equal_one_process_on_the_union(ranks, case):
    reference = union_reference(case)
    for rank, result in enumerate(ranks[case]):
        assert "error" not in result, result.get("error")
        for name, value in reference.items():
            assert torch.allclose(result["state"][name], value, atol=1e-6), f"rank {rank}: {name}"


def test_a_parameter_no_rank_used_keeps_its_value_under_weight_decay(ranks):
    initial = CASES["partly-used"][0]()
    for result in ranks["partly-used"]:
        assert torch.equal(result["state"]["never.weight"], initial.never.weight.detach())


def test_without_find_unused_parameters_every_rank_names_the_unused_ones(ranks):
    errors = [result.get("error", "") for result in ranks["partly-used-refused"]]
    assert errors[0] == errors[1], errors
    assert "only_odd.weight (on 1 of 2 processes)" in errors[0] and "never.weight (on 2 of 2" in errors[0]
    assert "find_unused_parameters=True" in errors[0] and "\n" not in errors[0]


def test_default_buckets_cut_a_small_model_into_several():
    from lightning_xd.parallel.gradient_buckets import bucket_limits

    mb = 2**20
    first, later = bucket_limits(int(0.9 * mb), None)  # the CIFAR CNN
    assert later < 0.9 * mb / 3 and first <= later
    first, later = bucket_limits(400 * mb, None)  # a large model: DDP's 1 MB first bucket, 25 MB after
    assert (first, later) == (mb, 25 * mb)
    assert bucket_limits(10 * mb, 4.0) == (4 * mb, 4 * mb)  # an explicit size is the size
