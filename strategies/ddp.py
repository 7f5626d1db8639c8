"""Lightning's own DDPStrategy over gloo (``--strategy ddp``): the baseline the MPI strategies are
measured against. Ranks, hosts and the rendezvous address come from the MPI job."""

from lightning.pytorch.strategies import DDPStrategy

from lightning_xd.comm.communicator import world
from lightning_xd.comm.environment import MPIEnvironment, device_for
from lightning_xd.contract import StrategyContract
from lightning_xd.errors import UserError
from lightning_xd.fault_tolerance.resumable import ResumableTrainingData
from lightning_xd.launch.registry import STRATEGIES


@STRATEGIES.register("ddp")
class LightningDDP(StrategyContract, ResumableTrainingData, DDPStrategy):
    """DDPStrategy on the MPI job's processes, whose training data resumes where a checkpoint left it."""

    def __init__(self) -> None:
        env = MPIEnvironment(world())
        if env.world_size() != env.num_nodes * env.local_size or env.global_rank() != (
            env.node_rank() * env.local_size + env.local_rank()
        ):
            raise UserError(
                "ddp needs the same number of processes on every host, numbered host by host; "
                "give every host the same slots in the hostfile"
            )
        devices = [device_for(i) for i in range(env.local_size)]
        backend = "nccl" if devices[0].type == "cuda" else "gloo"
        super().__init__(parallel_devices=devices, cluster_environment=env, process_group_backend=backend)
        self.num_nodes = env.num_nodes
