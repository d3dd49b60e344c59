"""Tests for torchdebug.models.ImageClassifier, including a real Lightning fit on digits."""

from __future__ import annotations

from typing import Any

import lightning
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from torchdebug.data import load_digits
from torchdebug.models import ImageClassifier


class _EpochLoss(lightning.Callback):
    """Collect the mean training loss of every epoch."""

    def __init__(self) -> None:
        self.epoch_means: list[float] = []
        self._batch: list[float] = []

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._batch.append(float(loss))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.epoch_means.append(sum(self._batch) / len(self._batch))
        self._batch = []


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("size", [8, 28])
def test_logits_shape(model: str, size: int) -> None:
    net = ImageClassifier(model, image_size=size)
    assert isinstance(net.model, torch.nn.Sequential)
    assert net(torch.rand(4, 1, size, size)).shape == (4, 10)


def test_hparams_and_channels() -> None:
    net = ImageClassifier("cnn", num_classes=5, in_channels=3, image_size=12, lr=0.01)
    assert net.hparams.model == "cnn"
    assert net.hparams.lr == 0.01
    assert net(torch.rand(2, 3, 12, 12)).shape == (2, 5)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="model"):
        ImageClassifier("resnet")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_size"):
        ImageClassifier("cnn", image_size=3)


# Calling the step without a Trainer makes self.log() warn; that is expected here.
@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_training_step_returns_only_scalar_loss() -> None:
    net = ImageClassifier("mlp", image_size=8)
    out = net.training_step((torch.rand(6, 1, 8, 8), torch.arange(6)), 0)
    assert isinstance(out, torch.Tensor) and out.ndim == 0


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_fit_on_digits_lowers_loss(model: str) -> None:
    torch.manual_seed(0)
    images, labels = load_digits()
    train = DataLoader(TensorDataset(images, labels), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(images[:256], labels[:256]), batch_size=128)
    recorder = _EpochLoss()
    trainer = lightning.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(ImageClassifier(model, image_size=8), train, val)
    assert len(recorder.epoch_means) == 2
    assert recorder.epoch_means[1] < recorder.epoch_means[0]
    metrics = trainer.callback_metrics
    assert {"train_loss", "val_loss", "val_acc"} <= set(metrics)
    assert 0.0 <= float(metrics["val_acc"]) <= 1.0
