"""Human activity recognition from a waist-worn smartphone: UCI-HAR-style windows of the HAPT raw signals.

Data: ``hapt_har/RawData/{acc,gyro}_expXX_userYY.txt`` (50 Hz, acceleration in g with gravity,
angular velocity in rad/s) and ``labels.txt`` (experiment, user, activity, first and last sample)
of UCI HAPT (Reyes-Ortiz et al., Neurocomputing 2016), the raw recordings behind UCI HAR; the copy
in ../shared/data holds users 1-10 (see its SOURCES.md). Windows of 128 samples (2.56 s) with 50%
overlap are cut inside the labelled segments of the six basic activities (walking, upstairs,
downstairs, sitting, standing, lying); each has 6 channels: acc x, y, z and gyro x, y, z.
Windowing is done once and cached, keyed by a hash of the files and the window settings.
Reference: 1D CNNs on UCI HAR's raw windows reach ~90-91% test accuracy (all 30 users).

Split by person, as UCI HAR: training users 1, 3, 5, 6, 7, 8 and test users 2, 4, 9, 10 (the
official test subjects in this subset). One training user (``val_user``) is held out for
validation, so every setting is chosen without the test users; ``--val-user 0`` (the default)
holds none out: the final fit on every training user, with the settings chosen that way. The
defaults (rotation 45 degrees, 50 epochs) won leave-one-training-user-out validation over the six
training users against 90 and 180 degrees, 64 channels, 30 epochs and batches of 16 (the command
and the defaults' per-user scores are in examples/06_realtime_cnn1d_har/README.md). Phones sit at
different angles on different people: training windows are turned by a random 3D rotation (acc
and gyro by the same one) of up to ``max_rotation_deg`` degrees. A person lies on the back, a side
or the front, which turns a waist phone about the body's long axis (its x axis): lying windows are
first rolled about that axis by up to ``lying_roll_deg`` degrees, so that every way of lying is seen.
Each validation/test batch holds one person's windows (on each rank, that rank's share of them),
so a model can normalise a batch by its own statistics: calibrate to the person without labels.
Unless ``batch_size`` (per process) is given, a training step takes 32 windows across all
processes (16 each on 2): the settings were validated with 32 windows per step, and 32 per process
on 2 processes (64 a step, half the steps) scored lower on the held-out training users.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_xd.data import cache_dir, digest, load_or_build, rank_shard, require_files
from lightning_xd.errors import DataError, UserError
from lightning_xd.launch.registry import DATAMODULES
from lightning_xd.progress import progress

STEP_WINDOWS = 32  # windows per training step over all processes, unless --batch-size sets them per process
ACTIVITIES = ("walking", "walking_upstairs", "walking_downstairs", "sitting", "standing", "lying")
BODY_AXIS = torch.tensor([1.0, 0.0, 0.0])  # the phone's x axis points along the spine when worn at the waist
RECORDING = re.compile(r"acc_exp(\d+)_user(\d+)\.txt")


def random_rotation(max_degrees: float, axis: torch.Tensor | None = None) -> torch.Tensor:
    """A 3x3 rotation by an angle uniform in [-max_degrees, max_degrees] about ``axis`` (default: uniformly random)."""
    if axis is None:
        axis = torch.randn(3)
    axis = axis / axis.norm()
    angle = math.radians(max_degrees) * (2 * torch.rand(()) - 1)
    cross = torch.tensor([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return torch.eye(3) + torch.sin(angle) * cross + (1 - torch.cos(angle)) * cross @ cross  # Rodrigues


class Windows(Dataset):
    """(6, 128) windows with activity ids and users; training ones may be randomly rotated on access.

    Every window may be turned by up to ``max_rotation_deg`` about a random axis (where the phone
    sits on the waist); windows of ``roll_label`` (lying) are first rolled by up to ``max_roll_deg``
    about the phone's x axis, the body's long axis: lying on the back, a side or the front.
    """

    def __init__(
        self,
        windows: torch.Tensor,
        labels: torch.Tensor,
        users: torch.Tensor,
        max_rotation_deg: float = 0.0,
        roll_label: int | None = None,
        max_roll_deg: float = 0.0,
    ):
        self.windows, self.labels, self.users = windows, labels, users
        self.max_rotation_deg, self.roll_label, self.max_roll_deg = max_rotation_deg, roll_label, max_roll_deg

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int | list[int]):
        window, label = self.windows[index], self.labels[index]  # a list of indices: an unrotated batch
        rotation = None
        if self.max_roll_deg > 0 and label == self.roll_label:
            rotation = random_rotation(self.max_roll_deg, axis=BODY_AXIS)
        if self.max_rotation_deg > 0:
            placement = random_rotation(self.max_rotation_deg)
            rotation = placement if rotation is None else placement @ rotation
        if rotation is not None:  # one for both sensors: they sit in one phone
            window = torch.cat([rotation @ xyz for xyz in window.split(3)])
        return window, label


class PersonBatches(DistributedSampler):
    """Evaluation batches of one person each: this rank's share (every ``num_replicas``-th) of their windows.

    Every rank gets one batch per person, so all ranks run equally many steps and each window is
    scored once. A DistributedSampler, so that Lightning keeps it instead of injecting its own;
    used with ``batch_size=None``: each item it yields is a list of indices, read in one go.
    """

    def __init__(self, users: torch.Tensor, num_replicas: int = 1, rank: int = 0):
        super().__init__(users, num_replicas=num_replicas, rank=rank, shuffle=False)
        shares = [torch.nonzero(users == person).flatten()[rank::num_replicas].tolist() for person in users.unique()]
        self.batches = [share for share in shares if share]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def read_signal(path: Path) -> np.ndarray:
    """(T, 3) float32 samples of a raw signal file, or a one-line error naming the file."""
    import pandas as pd

    try:
        values = pd.read_csv(path, sep=" ", header=None, dtype=np.float64).to_numpy()
        if values.ndim != 2 or values.shape[1] != 3 or not np.isfinite(values).all():
            raise ValueError(f"{values.shape[1] if values.ndim == 2 else '?'} columns or non-finite values")
    except Exception as err:  # empty, non-numeric or ragged rows
        raise DataError(
            f"{path} is not a HAPT raw signal (expected 3 space-separated numbers per row): "
            f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:100]}"
        ) from None
    return values.astype(np.float32)


def read_labels(path: Path) -> np.ndarray:
    """(rows, 5) int64: experiment, user, activity, first sample, last sample (1-based, inclusive)."""
    import pandas as pd

    try:
        rows = pd.read_csv(path, sep=r"\s+", header=None, dtype=np.int64).to_numpy()
        if rows.ndim != 2 or rows.shape[1] != 5:
            raise ValueError(f"{rows.shape[1] if rows.ndim == 2 else '?'} columns")
    except Exception as err:
        raise DataError(
            f"{path} is not HAPT's labels.txt (expected 5 integers per row: experiment, user, "
            f"activity, first sample, last sample): {type(err).__name__}: "
            f"{(str(err).splitlines() or [''])[0][:100]}"
        ) from None
    return rows


def cut_windows(signal: np.ndarray, segments: np.ndarray, window: int, step: int, where: str):
    """Windows that lie wholly inside one labelled segment; ``segments`` rows are (activity, first, last)."""
    windows, labels = [], []
    for activity, first, last in segments:
        if not 1 <= first <= last <= len(signal):
            raise DataError(f"{where}: segment {first}-{last} is outside the recording's {len(signal)} samples")
        for start in range(first - 1, last - window + 1, step):
            windows.append(signal[start : start + window].T)
            labels.append(activity - 1)
    return windows, labels


def parse_users(text: str | int, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(u) for u in str(text).split(","))
    except ValueError:
        raise UserError(f"{flag} {text!r} must be user ids separated by commas, like 1,3,5") from None


@DATAMODULES.register("har")
class HARDataModule(LightningDataModule):
    def __init__(
        self,
        data_dir: str = "./data",
        cache_dir: str | None = None,
        batch_size: int | None = None,
        window: int = 128,
        step: int = 64,
        train_users: str = "1,3,5,6,7,8",
        test_users: str = "2,4,9,10",
        val_user: int = 0,
        max_rotation_deg: float = 45.0,
        lying_roll_deg: float = 180.0,
    ):
        super().__init__()
        self.data_dir, self.cache, self.batch_size = Path(data_dir), cache_dir, batch_size
        self.window, self.step = window, step
        self.max_rotation_deg, self.lying_roll_deg = max_rotation_deg, lying_roll_deg
        self.train_users = parse_users(train_users, "--train-users")
        self.test_users = parse_users(test_users, "--test-users")
        self.val_user = val_user
        if set(self.train_users) & set(self.test_users):
            raise UserError(
                f"--train-users and --test-users share user(s) {sorted(set(self.train_users) & set(self.test_users))}"
            )
        if val_user != 0 and (val_user not in self.train_users or len(self.train_users) < 2):
            raise UserError(
                f"--val-user {val_user} must be one of several --train-users {train_users} (or 0: hold no user out)"
            )
        self.data: dict | None = None
        self.train_set = self.val_set = self.test_set = None

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "hapt_har" / "RawData"

    def recordings(self) -> dict[int, tuple[int, Path, Path]]:
        """experiment -> (user, acc file, gyro file) for every recording in RawData."""
        found = {}
        for acc in sorted(self.raw_dir.glob("acc_exp*_user*.txt")):
            experiment, user = map(int, RECORDING.fullmatch(acc.name).groups())
            gyro_name = acc.name.replace("acc_", "gyro_", 1)
            require_files(self.raw_dir, [gyro_name], f"HAPT gyroscope signal of {acc.name}")
            found[experiment] = (user, acc, self.raw_dir / gyro_name)
        if not found:
            raise DataError(
                f"HAPT: no acc_expXX_userYY.txt in {self.raw_dir} (set --data-dir or XD_DATA_DIR "
                "to a folder laid out like ../shared/data)"
            )
        return found

    def _windowed(self) -> dict:
        (labels_file,) = require_files(self.raw_dir, ["labels.txt"], "HAPT activity labels")
        recordings = self.recordings()
        files = [labels_file] + [path for _, acc, gyro in recordings.values() for path in (acc, gyro)]
        key = digest(files, window=self.window, step=self.step)
        cache_file = cache_dir(self.data_dir, self.cache) / "har" / f"windows-{key}.pt"
        return load_or_build(cache_file, lambda: self._cut(labels_file, recordings), "HAPT windows")

    def _cut(self, labels_file: Path, recordings: dict) -> dict:
        rows = read_labels(labels_file)
        windows, labels, users = [], [], []
        for experiment, (user, acc, gyro) in progress(recordings.items(), "windowing HAPT", len(recordings)):
            signal = np.concatenate([read_signal(acc), read_signal(gyro)], axis=1)
            segments = rows[(rows[:, 0] == experiment) & (rows[:, 2] <= len(ACTIVITIES))][:, [2, 3, 4]]
            cut, activities = cut_windows(signal, segments, self.window, self.step, f"{labels_file} for {acc.name}")
            windows += cut
            labels += activities
            users += [user] * len(cut)
        if not windows:
            raise DataError(
                f"{labels_file}: no segment of activities 1-6 is long enough for a {self.window}-sample "
                "window in the recordings present"
            )
        return {
            "windows": torch.from_numpy(np.stack(windows)),
            "labels": torch.tensor(labels),
            "users": torch.tensor(users),
        }

    def prepare_data(self) -> None:
        users = set(self._windowed()["users"].tolist())
        absent = sorted(set(self.train_users + self.test_users) - users)
        if absent:  # said once here, before the ranks start, rather than by every rank in setup
            raise DataError(f"HAPT: no windows of user(s) {', '.join(map(str, absent))} in {self.raw_dir}")

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        self.data = self._windowed()
        fit_users = [u for u in self.train_users if u != self.val_user]
        self.train_set = self._subset(fit_users, augment=True)
        self.val_set = self._subset([self.val_user]) if self.val_user else None
        self.test_set = self._subset(self.test_users)

    def _subset(self, users, augment: bool = False) -> Windows:
        chosen = torch.isin(self.data["users"], torch.tensor(users))
        if not chosen.any():
            raise DataError(f"HAPT: no windows of user(s) {', '.join(map(str, users))} in {self.raw_dir}")
        turns = (
            dict(
                max_rotation_deg=self.max_rotation_deg,
                roll_label=ACTIVITIES.index("lying"),
                max_roll_deg=self.lying_roll_deg,
            )
            if augment
            else {}
        )
        return Windows(self.data["windows"][chosen], self.data["labels"][chosen], self.data["users"][chosen], **turns)

    def model_kwargs(self) -> dict:
        self.setup()
        return {"in_channels": self.data["windows"].shape[1], "num_classes": len(ACTIVITIES)}

    def train_batch_size(self) -> int:
        """Windows per process in a training step: ``batch_size``, else a share of STEP_WINDOWS."""
        if self.batch_size is not None:  # an explicit --batch-size is used as given, 0 included
            return self.batch_size
        _, num_shards = rank_shard(self.trainer)
        return max(1, STEP_WINDOWS // num_shards)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.train_batch_size(), shuffle=True)

    def _eval_loader(self, dataset: Windows) -> DataLoader:
        rank, num_shards = rank_shard(self.trainer)
        return DataLoader(dataset, batch_size=None, sampler=PersonBatches(dataset.users, num_shards, rank))

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader(self.val_set) if self.val_set is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)
