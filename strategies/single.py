"""One process on one device (``--strategy single``): Lightning's own SingleDeviceStrategy, with a
training loader that can resume mid-epoch."""
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_xd.environment import device_for
from lightning_xd.registry import STRATEGIES
from lightning_xd.resumable import ResumableTrainingData


class SingleProcessStrategy(ResumableTrainingData, SingleDeviceStrategy):
    """SingleDeviceStrategy whose training data resumes where a checkpoint left it."""


@STRATEGIES.register("single", max_nprocs=1)
def single_device() -> SingleProcessStrategy:
    return SingleProcessStrategy(device=device_for(0))
