"""Fits a fixed-logits module with TrainingDynamics on N CPU processes (gloo).

Usage: python ddp_fit.py DEVICES ROOT [SETUP]. Rank zero prints the report path, the
checkpoint path and, per epoch, how many times each sample was recorded (all ranks).

SETUP is one of:

- ``default``: Lightning injects its DistributedSampler (10 samples: with 3 ranks it pads
  with repeats of two samples);
- ``user_sampler``: the loader has the user's own sampler, which Lightning wraps;
- ``drop_last``: the user's DistributedSampler with ``drop_last=True``;
- ``silent_rank``: rank 1's callback records no batch at all (it must still join the
  epoch-end reduction, or every rank hangs);
- ``grad_full``: a small MLP (learning rate 0) with ``TrainingDynamics(grad_norm="full")``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SubsetRandomSampler

from torchdebug import TrainingDynamics

N = 10


class IndexedInputs(Dataset):
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return torch.tensor([float(i)]), i % 3


class FixedModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        v = x[:, :1]
        return torch.cat([0.01 * v, 0.02 * (v % 5), torch.zeros_like(v)], dim=1) + 0 * self.w

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Mlp(L.LightningModule):
    """Per-sample gradient norms over its parameters are the same on any number of ranks
    while its weights stay fixed (learning rate 0)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x / 10.0)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class PresentationCounts(Callback):
    """Before TrainingDynamics folds an epoch: every sample's recorded presentations that
    epoch, summed over ranks, printed by rank zero."""

    def __init__(self, dynamics: TrainingDynamics) -> None:
        self.dynamics = dynamics

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        recorder = self.dynamics.recorder
        counts = torch.zeros(N, dtype=torch.int64)
        if recorder is not None:
            counts += recorder._state["epoch_count"][:N].long().cpu()
        if dist.is_initialized():
            dist.all_reduce(counts)
        if trainer.is_global_zero:
            print(f"COUNTS {counts.tolist()}", flush=True)


class SilentDynamics(TrainingDynamics):
    def on_train_batch_end(self, *args: Any) -> None:
        pass


def loader(setup: str, devices: int, rank: int) -> DataLoader:
    data = IndexedInputs()
    if setup == "user_sampler":
        generator = torch.Generator().manual_seed(0)
        return DataLoader(data, batch_size=2, sampler=SubsetRandomSampler(range(N), generator))
    if setup == "drop_last":
        sampler = DistributedSampler(data, num_replicas=devices, rank=rank, drop_last=True)
        return DataLoader(data, batch_size=2, sampler=sampler)
    return DataLoader(data, batch_size=2, shuffle=True)


if __name__ == "__main__":
    devices, root = int(sys.argv[1]), sys.argv[2]
    setup = sys.argv[3] if len(sys.argv) > 3 else "default"
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    silent = setup == "silent_rank" and rank == 1
    if silent:
        dynamics: TrainingDynamics = SilentDynamics()
    else:
        dynamics = TrainingDynamics(grad_norm="full" if setup == "grad_full" else "logits")
    checkpoint = ModelCheckpoint(dirpath=f"{root}/checkpoints", save_last=True)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        default_root_dir=root,
        callbacks=[PresentationCounts(dynamics), dynamics, checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=setup != "drop_last",
    )
    module = Mlp() if setup == "grad_full" else FixedModule()
    trainer.fit(module, loader(setup, devices, rank))
    if trainer.is_global_zero:
        print(f"REPORT {dynamics.report_path}")
        print(f"CHECKPOINT {checkpoint.last_model_path}")
    # Leave the process group before exiting: a gloo group torn down by interpreter exit
    # sometimes aborts a rank ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
