import os

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import TensorDataset

from common.data import make_loader, training_loader
from common.freezing import trainable_parameters
from common.hardware import total_steps


class ToyModule(pl.LightningModule):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.data.dim, cfg.model.hidden)
        self.head = nn.Linear(cfg.model.hidden, 2)

    def forward(self, x):
        hidden = torch.relu(self.embed(x))  # dropout: training draws from torch's stream, so resume must restore it
        return self.head(nn.functional.dropout(hidden, self.cfg.model.dropout, self.training))

    def model_for_export(self):
        """(network, example input) for logger.log_model: a plain nn.Module, no Lightning or config inside."""
        return nn.Sequential(self.embed, nn.ReLU(), self.head), torch.zeros(2, self.cfg.data.dim)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.global_step == self.cfg.crash_at_step:
            raise RuntimeError("toy crash for the fault tests")

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), on_epoch=True, sync_dist=True)

    def configure_optimizers(self):
        m = self.cfg.model
        if m.optimizer == "adamw":
            opt = torch.optim.AdamW(trainable_parameters(self), lr=m.lr)
        else:
            opt = torch.optim.SGD(trainable_parameters(self), lr=m.lr, momentum=m.momentum)
        if not m.get("decay"):
            return opt
        total = total_steps(self.trainer)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / (total + 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class ToyData(pl.LightningDataModule):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(1234)
        n, dim = cfg.data.n, cfg.data.dim
        y = torch.arange(n) % 2
        x = torch.randn(n, dim, generator=g) + 1.5 * y[:, None].float()
        self.train_set = TensorDataset(x, y)

    def train_dataloader(self):
        d = self.cfg.data
        return training_loader(self, self.train_set, shuffle=d.shuffle)

    def val_dataloader(self):
        return make_loader(self.train_set, self.cfg.data.n)


def score_point(cfg, tracker):
    """A grid point that is a plain function: a deterministic score (and the process that computed it)."""
    if cfg.crash_at_step >= 0:
        raise RuntimeError("toy point crash")
    return {"score": cfg.data.n * cfg.model.lr + cfg.seed, "pid": float(os.getpid())}
