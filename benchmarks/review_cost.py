"""What the TensorBoard views cost, as a share of the training time, on the demo.

Run::

    python benchmarks/review_cost.py            # the demo: digits, 20 epochs, batch 32
    python benchmarks/review_cost.py --readme   # also rewrite the README's table

The demo's training (``torchdebug demo``: 1,797 digits, 20% of labels flipped, small CNN)
runs once per cadence of the review views, each time with a ``TensorBoardLogger``:
``review_every_n_epochs=None`` (the default, adaptive) and ``1`` (every epoch). A
subclass of ``TrainingDynamics`` times everything the callback writes to TensorBoard on
rank zero: during the epochs (scalars and histograms every epoch; data map, image grids,
tables, trajectories and PR curve at each review) and once after training (the last
epoch's review and the projector). Shares are of the training time of the same run
(the epochs' wall time without the views). Results go to
``benchmarks/results/review_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from readme_table import update_readme
from torch.utils.data import DataLoader, TensorDataset

from torchdebug import TrainingDynamics
from torchdebug import callback as callback_module
from torchdebug.cli import DEMO_SETTINGS
from torchdebug.data import DIGITS_CLASSES, inject_label_noise, load_digits
from torchdebug.models import ImageClassifier

RESULTS = Path(__file__).resolve().parent / "results" / "review_cost.json"


class TimedViews(TrainingDynamics):
    """``TrainingDynamics`` that times its TensorBoard writing, during and after training."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epoch_view_seconds = 0.0  # scalars, histograms and reviews inside epochs
        self.end_seconds = 0.0  # the last review and the projector, after training
        self.epoch_seconds = 0.0
        self.reviews: list[int] = []
        self._started = 0.0
        self._after_training = False

    def on_train_epoch_start(self, *args: Any) -> None:
        super().on_train_epoch_start(*args)
        self._started = time.perf_counter()

    def on_train_epoch_end(self, *args: Any) -> None:
        super().on_train_epoch_end(*args)
        self.epoch_seconds += time.perf_counter() - self._started

    def on_train_end(self, *args: Any) -> None:
        self._after_training = True
        start = time.perf_counter()
        super().on_train_end(*args)
        self.end_seconds += time.perf_counter() - start

    def _review(self, trainer: Any, writer: Any, report: Any, epoch: int) -> None:
        self.reviews.append(epoch)
        start = time.perf_counter()
        super()._review(trainer, writer, report, epoch)
        if not self._after_training:
            self.epoch_view_seconds += time.perf_counter() - start


def run(cadence: int | None, seed: int) -> dict[str, Any]:
    """Trains the demo once; returns the TensorBoard and training seconds."""
    recipe = DEMO_SETTINGS["digits"]
    images, labels = load_digits()
    noisy, flipped = inject_label_noise(labels, 0.2, 10, seed)
    L.seed_everything(seed, verbose=False)
    callback = TimedViews(
        class_names=DIGITS_CLASSES, noise_mask=flipped, review_every_n_epochs=cadence
    )
    scalar_seconds = _time_scalars()
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            max_epochs=recipe["epochs"],
            logger=TensorBoardLogger(root, name="", version=""),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[callback],
        )
        loader = DataLoader(
            TensorDataset(images, noisy), batch_size=recipe["batch_size"], shuffle=True
        )
        trainer.fit(ImageClassifier("cnn", image_size=recipe["image_size"]), loader)
    during = callback.epoch_view_seconds + scalar_seconds[0]
    training = callback.epoch_seconds - during
    return {
        "review_every_n_epochs": cadence,
        "reviewed_epochs": callback.reviews,
        "views_during_epochs_s": during,
        "views_after_training_s": callback.end_seconds,
        "training_s": training,
        "share_during_epochs": during / training,
        "share_with_final_views": (during + callback.end_seconds) / training,
    }


def _time_scalars() -> list[float]:
    """Times the per-epoch scalars and histograms by wrapping the callback's ``log_epoch``."""
    spent = [0.0]
    original = callback_module.log_epoch

    def timed(*args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        original(*args, **kwargs)
        # The data map is drawn inside _review, which is timed already.
        if kwargs.get("scalars", True):
            spent[0] += time.perf_counter() - start

    callback_module.log_epoch = timed
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--readme", action="store_true", help="rewrite the README table")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|num_workers|logging interval).*")

    original = callback_module.log_epoch
    runs = []
    for cadence in (None, 1):
        runs.append(run(cadence, args.seed))
        callback_module.log_epoch = original
        print(json.dumps(runs[-1]), flush=True)
    result = {
        "runs": runs,
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, {platform.system()}",
        "torch": torch.__version__,
        "command": "python benchmarks/review_cost.py",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    print(table)
    if args.readme:
        update_readme("review-cost", table)


def markdown(result: dict[str, Any]) -> str:
    """The runs as a Markdown table."""
    lines = [
        "| review_every_n_epochs | epochs reviewed | views during epochs | share of training "
        "| last review + projector after training | share with them |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        cadence = "None (adaptive, default)" if r["review_every_n_epochs"] is None else "1"
        lines.append(
            f"| {cadence} | {len(r['reviewed_epochs'])} of 20 | {r['views_during_epochs_s']:.2f} s "
            f"| {100 * r['share_during_epochs']:.1f}% | {r['views_after_training_s']:.2f} s "
            f"| {100 * r['share_with_final_views']:.1f}% |"
        )
    lines.append("")
    lines.append(
        f"Training time {result['runs'][0]['training_s']:.1f} s (20 epochs, views excluded); "
        f"{result['machine']}, torch {result['torch']}: `{result['command']}`."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
