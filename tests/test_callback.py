"""TrainingDynamics in a real Lightning Trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from torchdebug import REPORT_COLUMNS, DynamicsRecorder, SampleError, TrainingDynamics, load_report
from torchdebug.report import report_metadata

NUM_CLASSES = 3


def fixed_logits(x: Tensor) -> Tensor:
    """Logits that are a known function of the input value (the sample's own index)."""
    v = x[:, :1]
    return torch.cat([0.01 * v, 0.02 * (v % 5), torch.zeros_like(v)], dim=1)


def expected_loss(i: int) -> float:
    z = fixed_logits(torch.tensor([[float(i)]]))
    return float(F.cross_entropy(z, torch.tensor([i % NUM_CLASSES])))


class IndexedInputs(Dataset):
    """Sample i is (tensor([i]), i % 3): its input encodes its own index."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return torch.tensor([float(i)]), i % NUM_CLASSES


class FixedModule(L.LightningModule):
    """An ordinary module: training_step returns only the loss; logits come from self(x)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return fixed_logits(x) + 0.0 * self.w

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_trainer(root: Path, callbacks: list[Callback], epochs: int = 2, **kw: Any) -> L.Trainer:
    options = dict(
        max_epochs=epochs,
        accelerator="cpu",
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    options.update(kw)
    return L.Trainer(callbacks=callbacks, **options)


def test_ids_line_up_with_samples_under_shuffle_and_workers(tmp_path: Path) -> None:
    n = 97
    loader = DataLoader(IndexedInputs(n), batch_size=8, shuffle=True, num_workers=2)
    dynamics = TrainingDynamics()
    make_trainer(tmp_path, [dynamics], epochs=3).fit(FixedModule(), loader)

    report = dynamics.report()
    assert report["sample_id"].tolist() == list(range(n))
    assert report["epochs_seen"].tolist() == [3] * n
    assert report["given_label"].tolist() == [i % NUM_CLASSES for i in range(n)]
    expected = np.array([expected_loss(i) for i in range(n)])
    np.testing.assert_allclose(report["loss_mean"], expected, rtol=1e-5)


def test_report_has_the_contract_columns_and_is_written_each_epoch(tmp_path: Path) -> None:
    loader = DataLoader(IndexedInputs(30), batch_size=8, shuffle=True)
    dynamics = TrainingDynamics()
    trainer = make_trainer(tmp_path, [dynamics], epochs=2)
    trainer.fit(FixedModule(), loader)

    path = Path(trainer.log_dir) / "torchdebug" / "samples.parquet"
    assert dynamics.report_path == path and path.is_file()
    on_disk = load_report(trainer.log_dir)
    assert list(on_disk.columns[: len(REPORT_COLUMNS)]) == list(REPORT_COLUMNS)
    pd.testing.assert_frame_equal(on_disk, dynamics.report(), check_dtype=False)
    assert report_metadata(path)["epochs_recorded"] == 2
    pd.testing.assert_frame_equal(load_report(path), on_disk)


def test_drop_last_samples_are_not_seen(tmp_path: Path) -> None:
    loader = DataLoader(IndexedInputs(10), batch_size=4, shuffle=False, drop_last=True)
    dynamics = TrainingDynamics()
    make_trainer(tmp_path, [dynamics], epochs=2).fit(FixedModule(), loader)
    report = dynamics.report()
    assert report["sample_id"].tolist() == list(range(8))
    assert report["epochs_seen"].tolist() == [2] * 8


class CountingInputs(IndexedInputs):
    """Input = (index, how many times it was drawn before): logits change per presentation."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.draws: list[int] = []

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        count = self.draws.count(i)
        self.draws.append(i)
        return torch.tensor([float(i), float(count)]), i % NUM_CLASSES


class PresentationModule(FixedModule):
    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([0.3 * x[:, 1:2], torch.zeros_like(x)], dim=1) + 0.0 * self.w


def test_sampler_with_replacement_averages_repeats_within_an_epoch(tmp_path: Path) -> None:
    n, epochs = 12, 3
    data = CountingInputs(n)
    sampler = RandomSampler(data, replacement=True, num_samples=n)
    loader = DataLoader(data, batch_size=4, sampler=sampler)
    # No TensorBoard views: their image lookups would add to the dataset's log of draws.
    dynamics = TrainingDynamics(tensorboard=False)
    make_trainer(tmp_path, [dynamics], epochs=epochs).fit(PresentationModule(), loader)

    # Hand computation from the log of draws: epoch e holds draws [e*n, (e+1)*n).
    per_sample: dict[int, list[float]] = {}
    seen_counts: dict[int, int] = {}
    for e in range(epochs):
        epoch_draws = data.draws[e * n : (e + 1) * n]
        probs: dict[int, list[float]] = {}
        for pos, i in enumerate(epoch_draws):
            count = data.draws[: e * n + pos].count(i)
            z = torch.tensor([[0.3 * count, 0.0, 0.0]])
            probs.setdefault(i, []).append(float(torch.softmax(z, 1)[0, i % NUM_CLASSES]))
        for i, values in probs.items():
            per_sample.setdefault(i, []).append(float(np.mean(values)))
            seen_counts[i] = seen_counts.get(i, 0) + 1
    assert any(len(set(data.draws[e * n : (e + 1) * n])) < n for e in range(epochs))

    report = dynamics.report().set_index("sample_id")
    assert sorted(report.index) == sorted(per_sample)
    for i, values in per_sample.items():
        assert report.loc[i, "epochs_seen"] == seen_counts[i]
        assert report.loc[i, "confidence"] == pytest.approx(np.mean(values), rel=1e-5)
        assert report.loc[i, "variability"] == pytest.approx(np.std(values), abs=1e-6)


class ExplicitModule(FixedModule):
    """Returns a dict with the logits and the ids the batch carries."""

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"])
        return {"loss": loss, "logits": logits, "index": batch["index"]}


class DictInputs(IndexedInputs):
    """Dict samples whose ids are shifted, so that the dataset position is not the id."""

    def __getitem__(self, i: int) -> dict[str, Any]:
        x, y = super().__getitem__(i)
        return {"image": x, "label": y, "index": self.n - 1 - i}


class SpyBatches(Callback):
    """Keeps what each training step produced, to replay it into a bare recorder."""

    def __init__(self) -> None:
        self.epochs: list[list[tuple[Tensor, Tensor, Tensor]]] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.append([])

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        self.epochs[-1].append((batch["index"], outputs["logits"].detach(), batch["label"]))


def test_explicit_outputs_match_a_bare_recorder(tmp_path: Path) -> None:
    n = 40
    loader = DataLoader(DictInputs(n), batch_size=6, shuffle=True)
    dynamics, spy = TrainingDynamics(), SpyBatches()
    make_trainer(tmp_path, [dynamics, spy], epochs=3).fit(ExplicitModule(), loader)

    bare = DynamicsRecorder(num_samples=n)
    for epoch in spy.epochs:
        for ids, logits, targets in epoch:
            bare.update(ids, logits, targets)
        bare.end_epoch()
    pd.testing.assert_frame_equal(dynamics.report(), bare.report())
    # ids came from the batch: sample at position i carries id n-1-i.
    report = dynamics.report().set_index("sample_id")
    assert report.loc[n - 1, "given_label"] == 0 and report.loc[0, "given_label"] == (n - 1) % 3


class TwoPartModule(FixedModule):
    """Calls a backbone and a head itself; its own forward is never used."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Identity()
        self.head = nn.Linear(1, NUM_CLASSES)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        features = self.backbone(batch["features"][:, :1])
        return F.cross_entropy(self.head(features), batch["target"])


class FeatureInputs(IndexedInputs):
    def __getitem__(self, i: int) -> dict[str, Any]:
        x, y = super().__getitem__(i)
        return {"features": x.repeat(2), "target": y}


def test_user_getters_and_named_logits_module(tmp_path: Path) -> None:
    n = 20
    loader = DataLoader(FeatureInputs(n), batch_size=5, shuffle=True)
    dynamics = TrainingDynamics(
        logits_module="head",
        get_ids=lambda batch: (batch["features"][:, 0]).long(),
        get_targets=lambda batch: (batch["target"] + 1) % NUM_CLASSES,
    )
    make_trainer(tmp_path, [dynamics], epochs=1).fit(TwoPartModule(), loader)
    report = dynamics.report()
    assert report["sample_id"].tolist() == list(range(n))
    assert report["given_label"].tolist() == [(i + 1) % NUM_CLASSES for i in range(n)]

    # Automatic capture finds the head among the children too, with dict-key targets.
    auto = TrainingDynamics()
    make_trainer(tmp_path / "auto", [auto], epochs=1).fit(TwoPartModule(), loader)
    assert auto.report()["given_label"].tolist() == [i % NUM_CLASSES for i in range(n)]


class BadLabels(IndexedInputs):
    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x, y = super().__getitem__(i)
        return x, 7 if i == 13 else y


def test_label_out_of_range_raises_naming_the_sample(tmp_path: Path) -> None:
    loader = DataLoader(BadLabels(20), batch_size=4, shuffle=True)

    class Tolerant(FixedModule):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return self(batch[0]).sum()  # a loss that does not index by label

    with pytest.raises(SampleError, match=r"sample 13 has label 7, outside \[0, 3\)"):
        make_trainer(tmp_path, [TrainingDynamics()], epochs=1).fit(Tolerant(), loader)


class FailsInEpoch(FixedModule):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.current_epoch == 1 and batch_idx == 2:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_crash_mid_epoch_leaves_the_last_report_readable(tmp_path: Path) -> None:
    loader = DataLoader(IndexedInputs(30), batch_size=4, shuffle=True)
    dynamics = TrainingDynamics()
    trainer = make_trainer(tmp_path, [dynamics], epochs=3)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(FailsInEpoch(), loader)
    report = load_report(trainer.log_dir)
    assert report["epochs_seen"].tolist() == [1] * 30
    assert report.attrs["torchdebug"]["epochs_recorded"] == 1
    leftovers = [p.name for p in (Path(trainer.log_dir) / "torchdebug").iterdir()]
    assert leftovers == ["samples.parquet"]


class SkipsBatches(FixedModule):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        x, y = batch
        if batch_idx == 1:
            self(x)  # a forward pass whose batch is then skipped
            return None
        return F.cross_entropy(self(x), y)


def test_skipped_batches_and_validation_record_nothing(tmp_path: Path) -> None:
    train = DataLoader(IndexedInputs(12), batch_size=4, shuffle=False)
    val = DataLoader(IndexedInputs(30), batch_size=10)

    class WithValidation(SkipsBatches):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self(batch[0])

    dynamics = TrainingDynamics()
    make_trainer(tmp_path, [dynamics], epochs=2).fit(WithValidation(), train, val)
    report = dynamics.report()
    assert report["sample_id"].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert report["epochs_seen"].tolist() == [2] * 8


def test_tensorboard_views_are_in_the_trainers_event_files(tmp_path: Path) -> None:
    loader = DataLoader(IndexedInputs(60), batch_size=8, shuffle=True)
    trainer = make_trainer(tmp_path, [TrainingDynamics(review_every_n_epochs=1)], epochs=2)
    trainer.fit(FixedModule(), loader)

    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert {"torchdebug/flags/mislabeled", "torchdebug/flags/hard"} <= set(tags["scalars"])
    counts = [e.value for e in events.Scalars("torchdebug/flags/total")]
    assert len(counts) == 2
    for name in ("confidence", "aum", "loss", "grad_norm"):
        assert f"torchdebug/{name}" in tags["histograms"]
    assert [e.step for e in events.Images("torchdebug/data_map")] == [0, 1]
    report = load_report(trainer.log_dir)
    assert counts[-1] == (report["flag"] != "").sum()


def test_adaptive_review_cadence_keeps_to_its_budget(tmp_path: Path) -> None:
    # Tiny epochs: 3% of their time never pays for a review; the last epoch still gets one.
    loader = DataLoader(IndexedInputs(60), batch_size=8, shuffle=True)
    trainer = make_trainer(tmp_path, [TrainingDynamics()], epochs=3)
    trainer.fit(FixedModule(), loader)
    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("torchdebug/data_map")] == [2]

    # The schedule itself: 3% of each epoch's seconds buys review time.
    dynamics = TrainingDynamics()
    dynamics._review_seconds = 0.3
    dynamics._epoch_seconds = 2.0  # 0.06 s of budget an epoch: a review every 5 epochs
    due = [dynamics._review_due(epoch) for epoch in range(5)]
    assert due == [False, False, False, False, True]
    dynamics._epoch_seconds = 20.0  # 0.6 s an epoch: every epoch
    assert dynamics._review_due(5)


def test_checkpoint_state_restores_the_report(tmp_path: Path) -> None:
    loader = DataLoader(IndexedInputs(25), batch_size=5, shuffle=True)
    dynamics = TrainingDynamics()
    trainer = make_trainer(tmp_path, [dynamics], epochs=2, enable_checkpointing=True)
    trainer.fit(FixedModule(), loader)
    checkpoint = torch.load(
        trainer.checkpoint_callback.best_model_path, weights_only=False, map_location="cpu"
    )
    assert checkpoint["callbacks"][dynamics.state_key]["epochs_recorded"] == 2
    # A fresh callback gets its state from the checkpoint and continues from it.
    restored = TrainingDynamics()
    resumed = make_trainer(tmp_path / "resumed", [restored], epochs=3)
    resumed.fit(FixedModule(), loader, ckpt_path=trainer.checkpoint_callback.best_model_path)
    assert restored.report()["epochs_seen"].tolist() == [3] * 25
    assert TrainingDynamics(name="a").state_key != TrainingDynamics(name="b").state_key


def test_bad_options_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        TrainingDynamics(num_samples=0)
    with pytest.raises(ValueError, match="logits_module"):
        TrainingDynamics(logits_module=" ")


class LearnedModule(L.LightningModule):
    """A small linear classifier; under bf16 autocast its logits come out in bf16."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, NUM_CLASSES)
        self.seen: list[tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x / 100.0)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        self.seen.append((x[:, 0].long(), logits.detach()))
        return F.cross_entropy(logits, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_bf16_mixed_precision_statistics_are_float32(tmp_path: Path) -> None:
    loader = DataLoader(IndexedInputs(16), batch_size=16, shuffle=False)
    dynamics, module = TrainingDynamics(), LearnedModule()
    make_trainer(tmp_path, [dynamics], epochs=1, precision="bf16-mixed").fit(module, loader)

    ((ids, logits),) = module.seen
    assert logits.dtype == torch.bfloat16
    z = logits.float()
    y = ids % NUM_CLASSES
    given = z.gather(1, y[:, None])[:, 0]
    other = z.scatter(1, y[:, None], float("-inf")).max(dim=1).values
    report = dynamics.report().set_index("sample_id")
    assert dynamics.recorder._state["epoch_loss"].dtype == torch.float32
    np.testing.assert_array_equal(report.loc[ids.numpy(), "aum"], (given - other).numpy())
    expected_loss = F.cross_entropy(z, y, reduction="none")
    np.testing.assert_allclose(report.loc[ids.numpy(), "loss_mean"], expected_loss, rtol=1e-6)


class TupleModule(FixedModule):
    """forward returns (logits, embedding) from two heads: the logits are ambiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, NUM_CLASSES)
        self.proj = nn.Linear(1, 16)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(x), self.proj(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        logits, _ = self(batch[0])
        return F.cross_entropy(logits, batch[1])


def test_ambiguous_logits_are_an_error_not_a_guess(tmp_path: Path) -> None:
    loader = DataLoader(IndexedInputs(12), batch_size=4)
    with pytest.raises(ValueError, match=r"'head' \[4, 3\], 'proj' \[4, 16\].*logits_module"):
        make_trainer(tmp_path, [TrainingDynamics()], epochs=1).fit(TupleModule(), loader)
    named = TrainingDynamics(logits_module="head")
    make_trainer(tmp_path / "named", [named], epochs=1).fit(TupleModule(), loader)
    assert named.report()["predicted_label"].max() < NUM_CLASSES
