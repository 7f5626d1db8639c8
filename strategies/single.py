"""One process on one device (``--strategy single``): Lightning's own SingleDeviceStrategy, with a
training loader that can resume mid-epoch."""

from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_xd.comm.environment import device_for
from lightning_xd.fault_tolerance.resumable import ResumableTrainingData
from lightning_xd.launch.registry import STRATEGIES


class SingleProcessStrategy(ResumableTrainingData, SingleDeviceStrategy):
    """SingleDeviceStrategy whose training data resumes where a checkpoint left it."""


@STRATEGIES.register("single", max_nprocs=1)
def single_device() -> SingleProcessStrategy:
    return SingleProcessStrategy(device=device_for(0))
