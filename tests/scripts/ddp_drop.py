"""Fits the fixed-logits module of test_actions with action="drop" on 2 CPU processes.

Usage: python ddp_drop.py ROOT. Each rank writes the (epoch, sample id) pairs its
training steps saw to ROOT/ids_rank<R>.txt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_actions import FixedModule, Samples  # noqa: E402

from torchdebug import TrainingDynamics  # noqa: E402

if __name__ == "__main__":
    root = Path(sys.argv[1])
    module = FixedModule()
    trainer = L.Trainer(
        max_epochs=4,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        default_root_dir=root,
        callbacks=[TrainingDynamics(action="drop", warmup_epochs=2)],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    L.seed_everything(0, verbose=False)
    trainer.fit(module, DataLoader(Samples(), batch_size=4, shuffle=True))
    pairs = [(s["epoch"], i) for s in module.steps for i in s["ids"]]
    np.savetxt(root / f"ids_rank{trainer.global_rank}.txt", np.array(pairs), fmt="%d")
    # Leave the process group before exiting: a gloo group torn down by interpreter exit
    # sometimes aborts a rank ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
