"""1D CNN on HAPT windows: windowing, the split by person, rotations, per-person evaluation, errors."""

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from generators.hapt import GAP, SEGMENT, write_hapt

from lightning_xd.datamodules import har
from lightning_xd.datamodules.har import HARDataModule, random_rotation
from lightning_xd.models.cnn1d import CNN1D, own_batch_statistics

TRAIN_USERS, TEST_USERS, VAL_USER = (1, 3, 5, 6, 7, 8), (2, 4, 9, 10), 8
WINDOWS_PER_SEGMENT = (SEGMENT - 128) // 64 + 1


@pytest.fixture(scope="module")
def hapt(tmp_path_factory):
    root = tmp_path_factory.mktemp("hapt_data")
    write_hapt(root)
    return root


def _datamodule(root, tmp_path, **options):
    dm = HARDataModule(str(root), str(tmp_path / "cache"), **options)
    dm.prepare_data()
    dm.setup()
    return dm


def _users(dataset) -> set:
    return set(dataset.users.tolist())


def test_no_test_user_in_training_or_validation(hapt, tmp_path):
    dm = _datamodule(hapt, tmp_path, val_user=VAL_USER)
    assert _users(dm.train_set) == set(TRAIN_USERS) - {VAL_USER}
    assert _users(dm.val_set) == {VAL_USER}
    assert _users(dm.test_set) == set(TEST_USERS)
    assert _users(dm.test_set).isdisjoint(_users(dm.train_set) | _users(dm.val_set))
    other = _datamodule(hapt, tmp_path, val_user=3)
    assert _users(other.val_set) == {3} and 3 not in _users(other.train_set)
    final = _datamodule(hapt, tmp_path)  # the default: settings chosen, the final fit on every training user
    assert _users(final.train_set) == set(TRAIN_USERS) and final.val_set is None and final.val_dataloader() == []


def test_windows_lie_inside_basic_activity_segments(hapt, tmp_path):
    dm = _datamodule(hapt, tmp_path)
    windows, labels, users = dm.data["windows"], dm.data["labels"], dm.data["users"]
    assert windows.shape[1:] == (6, 128) and windows.dtype == torch.float32
    # every user: each of the six activities once, transitions (7) and the absent experiment skipped
    assert len(labels) == 10 * 6 * WINDOWS_PER_SEGMENT
    assert torch.equal(torch.bincount(labels), torch.full((6,), 10 * WINDOWS_PER_SEGMENT))
    assert torch.equal(torch.bincount(users, minlength=11)[1:], torch.full((10,), 6 * WINDOWS_PER_SEGMENT))
    # the first window of user 1 is samples GAP .. GAP+127 of its files, acc then gyro, 50% overlap after
    acc = np.loadtxt(hapt / "hapt_har" / "RawData" / "acc_exp01_user01.txt", dtype=np.float32)
    gyro = np.loadtxt(hapt / "hapt_har" / "RawData" / "gyro_exp01_user01.txt", dtype=np.float32)
    signal = torch.from_numpy(np.concatenate([acc, gyro], axis=1).T)
    first = torch.nonzero(users == 1)[0].item()
    assert labels[first] == 0
    assert torch.equal(windows[first], signal[:, GAP : GAP + 128])
    assert torch.equal(windows[first + 1], signal[:, GAP + 64 : GAP + 192])
    assert dm.model_kwargs() == {"in_channels": 6, "num_classes": 6}


def test_windowing_is_cached(hapt, tmp_path, monkeypatch):
    _datamodule(hapt, tmp_path)
    monkeypatch.setattr(har, "read_signal", lambda path: pytest.fail("windowed again"))
    assert len(_datamodule(hapt, tmp_path).test_set) == 4 * 6 * WINDOWS_PER_SEGMENT


def test_rotation_turns_both_sensors_alike(hapt, tmp_path):
    rotation = random_rotation(45.0)
    assert torch.allclose(rotation @ rotation.T, torch.eye(3), atol=1e-5)
    assert torch.det(rotation).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.rad2deg(torch.arccos((torch.trace(rotation) - 1) / 2)).item() <= 45.0 + 1e-3
    dm = _datamodule(hapt, tmp_path, max_rotation_deg=180.0, val_user=VAL_USER)
    window, _ = dm.train_set[0]
    original = dm.train_set.windows[0]
    assert not torch.allclose(window, original)
    acc, gyro = window.split(3)
    acc0, gyro0 = original.split(3)
    assert torch.allclose(acc.norm(dim=0), acc0.norm(dim=0), atol=1e-5)  # lengths kept
    assert torch.allclose((acc * gyro).sum(0), (acc0 * gyro0).sum(0), atol=1e-5)  # one rotation for both
    assert torch.equal(dm.val_set[0][0], dm.val_set.windows[0]) and torch.equal(
        dm.test_set[0][0], dm.test_set.windows[0]
    )


def test_lying_windows_roll_about_the_body_axis_and_others_do_not(hapt, tmp_path):
    dm = _datamodule(hapt, tmp_path, max_rotation_deg=0.0, lying_roll_deg=180.0, val_user=VAL_USER)
    lying = har.ACTIVITIES.index("lying")
    rolled = 0
    for index in range(len(dm.train_set)):
        window, label = dm.train_set[index]
        original = dm.train_set.windows[index]
        if label != lying:
            assert torch.equal(window, original)
            continue
        for turned, before in zip(window.split(3), original.split(3)):
            assert torch.equal(turned[0], before[0])  # x, the body's long axis, is the axis of the roll
            assert torch.allclose(turned[1:].norm(dim=0), before[1:].norm(dim=0), atol=1e-5)
        rolled += not torch.allclose(window, original)
    assert rolled > 0
    assert torch.equal(dm.test_set[0][0], dm.test_set.windows[0])


def test_each_evaluation_batch_is_one_persons_share(hapt, tmp_path):
    dm = _datamodule(hapt, tmp_path, val_user=VAL_USER)
    users = dm.test_set.users
    whole = dm.test_dataloader()  # one process: each person's windows in one batch
    assert [set(users[b].tolist()) for b in whole.sampler] == [{u} for u in TEST_USERS]
    for (windows, labels), batch in zip(whole, whole.sampler):
        assert torch.equal(windows, dm.test_set.windows[batch]) and torch.equal(labels, dm.test_set.labels[batch])
    scored = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"rank": rank, "num_replicas": 2})
        batches = list(dm.test_dataloader().sampler)
        assert len(batches) == len(TEST_USERS)  # ranks run equally many steps
        assert all(len(set(users[b].tolist())) == 1 for b in batches)
        scored += [i for b in batches for i in b]
    assert sorted(scored) == list(range(len(users)))  # every window once over both ranks
    assert [len(b) for b in dm.val_dataloader().sampler] == [WINDOWS_PER_SEGMENT * 6 // 2]  # rank 1: half of user 8


def test_evaluation_normalises_each_batch_by_its_own_statistics():
    torch.manual_seed(0)
    model = CNN1D(6, 6)
    model(torch.randn(16, 6, 128) * 3 + 1)  # training mode: running statistics of "training people"
    model.eval()
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    person = torch.randn(8, 6, 128)
    with torch.no_grad():
        plain = model(person)
        with own_batch_statistics(model):
            adapted = model(person)
            louder = model(2.5 * person)  # a person whose signals are 2.5 times larger
        assert not torch.allclose(model(2.5 * person), plain, atol=1e-3)
    assert torch.allclose(adapted, louder, atol=1e-4)  # calibrated away without labels
    assert not torch.allclose(adapted, plain, atol=1e-3)
    assert all(torch.equal(v, kept[k]) for k, v in model.state_dict().items())  # running statistics untouched
    assert not model.training and all(not m.training for m in model.modules())


def test_members_are_separate_cnns_whose_probabilities_are_averaged():
    torch.manual_seed(0)
    windows = torch.randn(4, 6, 128)
    single = CNN1D(6, 6, members=1).eval()
    with torch.no_grad():
        assert torch.equal(single(windows), single.member_logits(windows)[:, 0])  # one member: a plain CNN
    model = CNN1D(6, 6, members=3).eval()
    with torch.no_grad():
        logits = model.member_logits(windows)
        assert logits.shape == (4, 3, 6) and not torch.allclose(logits[:, 0], logits[:, 1])
        assert torch.allclose(model(windows).exp(), logits.softmax(-1).mean(1), atol=1e-6)
    model.train()
    model.member_logits(windows)[:, 1].sum().backward()  # one member's output moves only its own weights
    for conv in [m for m in model.modules() if isinstance(m, torch.nn.Conv1d)]:
        per_member = conv.weight.grad.view(3, -1).abs().sum(1)  # output channels are grouped by member
        assert per_member[1] > 0 and per_member[0] == 0 and per_member[2] == 0


def _broken_copy(hapt, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(hapt, broken)
    return broken, broken / "hapt_har" / "RawData"


def _har_error(one_line_error, data_dir, tmp_path, *flags):
    return one_line_error("--model", "cnn1d", "--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "c"), *flags)


def test_missing_files(one_line_error, hapt, tmp_path):
    assert "missing labels.txt" in _har_error(one_line_error, tmp_path / "empty", tmp_path)
    data, raw = _broken_copy(hapt, tmp_path)
    (raw / "gyro_exp04_user04.txt").unlink()
    assert "missing gyro_exp04_user04.txt" in _har_error(one_line_error, data, tmp_path)
    for signal in raw.glob("*_exp*"):
        signal.unlink()
    assert "no acc_expXX_userYY.txt" in _har_error(one_line_error, data, tmp_path)


def test_malformed_files_are_named(one_line_error, hapt, tmp_path):
    data, raw = _broken_copy(hapt, tmp_path)
    with open(raw / "acc_exp02_user02.txt", "a") as f:
        f.write("0.1 oops 0.3\n")
    err = _har_error(one_line_error, data, tmp_path)
    assert "acc_exp02_user02.txt" in err and "not a HAPT raw signal" in err
    shutil.copy(hapt / "hapt_har" / "RawData" / "acc_exp02_user02.txt", raw)
    (raw / "labels.txt").write_text("1 1 5 250\n")
    assert "not HAPT's labels.txt" in _har_error(one_line_error, data, tmp_path)
    (raw / "labels.txt").write_text(f"1 1 5 1 {10**6}\n")
    assert "outside the recording" in _har_error(one_line_error, data, tmp_path)


def test_bad_user_settings(one_line_error, hapt, tmp_path):
    assert "share user(s) [4]" in _har_error(
        one_line_error, hapt, tmp_path, "--train-users", "1,3,4", "--val-user", "1"
    )
    assert "--val-user 2 must be one of" in _har_error(one_line_error, hapt, tmp_path, "--val-user", "2")
    assert "user ids separated by commas" in _har_error(one_line_error, hapt, tmp_path, "--test-users", "two")
    assert "no windows of user(s) 11" in _har_error(one_line_error, hapt, tmp_path, "--test-users", "2,11")
    assert "--members 0: a model needs at least one member" in _har_error(
        one_line_error, hapt, tmp_path, "--members", "0"
    )


def test_a_training_step_takes_32_windows_over_all_processes_unless_batch_size_is_given(hapt, tmp_path):
    dm = _datamodule(hapt, tmp_path)
    assert dm.train_dataloader().batch_size == 32  # one process
    dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"rank": 1, "num_replicas": 2})
    assert dm.train_dataloader().batch_size == 16  # two processes share the step's 32 windows
    explicit = _datamodule(hapt, tmp_path, batch_size=8)
    explicit.trainer = SimpleNamespace(distributed_sampler_kwargs={"rank": 0, "num_replicas": 2})
    assert explicit.train_dataloader().batch_size == 8  # --batch-size is per process, as for every dataset
