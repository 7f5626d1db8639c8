"""One process on one device (``--strategy single``): Lightning's own SingleDeviceStrategy, with a
training loader that can resume mid-epoch."""

from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_xd.comm.environment import device_for
from lightning_xd.contract import StrategyContract
from lightning_xd.fault_tolerance.resumable import ResumableTrainingData
from lightning_xd.launch.registry import STRATEGIES


@STRATEGIES.register("single")
class SingleProcessStrategy(StrategyContract, ResumableTrainingData, SingleDeviceStrategy):
    """SingleDeviceStrategy whose training data resumes where a checkpoint left it."""

    max_processes = 1

    def __init__(self) -> None:
        super().__init__(device=device_for(0))
