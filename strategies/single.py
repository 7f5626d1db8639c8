"""One process on one device (``--strategy single``): Lightning's own SingleDeviceStrategy."""
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_xd.environment import device_for
from lightning_xd.registry import STRATEGIES


@STRATEGIES.register("single", max_nprocs=1)
def single_device() -> SingleDeviceStrategy:
    return SingleDeviceStrategy(device=device_for(0))
