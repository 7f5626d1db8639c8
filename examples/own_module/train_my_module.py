import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

import lightning_xd  # noqa: F401  (registers "mpi", "async" and "hybrid" with Lightning)


class MyRegression(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)

    def training_step(self, batch):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss, sync_dist=True)  # averaged over every process
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    seed_everything(0)  # the same data and initial weights on every process
    data = TensorDataset(torch.randn(256, 8), torch.randn(256, 1))
    trainer = Trainer(strategy="mpi", accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False)
    trainer.fit(MyRegression(), DataLoader(data, batch_size=16, shuffle=True))
    loss = float(trainer.callback_metrics["train_loss"])
    print(f"rank {trainer.global_rank} of {trainer.world_size}: {trainer.global_step} steps, loss {loss:.4f}")
