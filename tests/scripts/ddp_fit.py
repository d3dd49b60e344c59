"""Fits a fixed-logits module with TrainingDynamics on N CPU processes (gloo).

Usage: python ddp_fit.py DEVICES ROOT. Rank zero prints the report path.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from torchdebug import TrainingDynamics


class IndexedInputs(Dataset):
    def __len__(self) -> int:
        return 10

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


if __name__ == "__main__":
    devices, root = int(sys.argv[1]), sys.argv[2]
    dynamics = TrainingDynamics()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        default_root_dir=root,
        callbacks=[dynamics],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(FixedModule(), DataLoader(IndexedInputs(), batch_size=2, shuffle=True))
    if trainer.is_global_zero:
        print(f"REPORT {dynamics.report_path}")
