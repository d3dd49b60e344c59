"""Trustworthy numbers in awkward setups: several instances, changing datasets, gradient
accumulation, bad logits, other loops, resuming, iterable datasets, id types, an epoch
window and the on-disk history. Every case is a real Lightning Trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_callback import (  # noqa: I001  (shared fixtures of the callback tests)
    NUM_CLASSES,
    FixedModule,
    IndexedInputs,
    LearnedModule,
    expected_loss,
    make_trainer,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from torchdebug import DynamicsRecorder, TrainingDynamics, load_history, load_report
from torchdebug.sampling import as_id_tensor


def by_id(callback: TrainingDynamics) -> pd.DataFrame:
    return callback.report().set_index("sample_id").sort_index()


def test_two_named_instances_keep_apart_state_reports_and_tags(tmp_path: Path) -> None:
    first, second = TrainingDynamics(name="first"), TrainingDynamics(name="second", top_k=2)
    loader = DataLoader(IndexedInputs(12), batch_size=4)
    trainer = make_trainer(tmp_path, [first, second], epochs=2, enable_checkpointing=True)
    trainer.fit(FixedModule(), loader)
    state = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
    keys = [k for k in state["callbacks"] if k.startswith("TrainingDynamics")]
    assert len(keys) == 2 and first.state_key != second.state_key
    run = Path(trainer.log_dir)
    for name in ("first", "second"):
        report = load_report(run / "torchdebug" / name)
        assert report["epochs_seen"].tolist() == [2] * 12
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "torchdebug/first/flags/total" in tags and "torchdebug/second/flags/total" in tags


def test_a_named_report_is_pointed_to_when_looked_for_at_the_run(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, [TrainingDynamics(name="first")], epochs=1)
    trainer.fit(FixedModule(), DataLoader(IndexedInputs(6), batch_size=3))
    with pytest.raises(FileNotFoundError, match=r"named instances.*torchdebug/first"):
        load_report(trainer.log_dir)


def test_float_labels_from_a_tuple_batch_say_where_they_came_from(tmp_path: Path) -> None:
    data = TensorDataset(torch.arange(6), torch.arange(6.0)[:, None], torch.arange(6) % 3)

    class IdFirst(FixedModule):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return F.cross_entropy(self(batch[1]), batch[2])

    dynamics = TrainingDynamics(get_ids=lambda batch: batch[0])
    with pytest.raises(ValueError, match="from the batch's second item.*get_targets="):
        make_trainer(tmp_path, [dynamics], epochs=1).fit(IdFirst(), DataLoader(data, 3))
    fixed = TrainingDynamics(get_ids=lambda b: b[0], get_targets=lambda b: b[2])
    make_trainer(tmp_path / "fixed", [fixed], epochs=1).fit(IdFirst(), DataLoader(data, 3))
    np.testing.assert_allclose(by_id(fixed)["loss_mean"], [expected_loss(i) for i in range(6)])


def test_two_unnamed_instances_are_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="state_key"):
        make_trainer(tmp_path, [TrainingDynamics(), TrainingDynamics()])
    with pytest.raises(ValueError, match="name must be"):
        TrainingDynamics(name="a/b")


class GrowingData(L.LightningDataModule):
    """Its train set gains two samples each time the loader is rebuilt."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 8

    def train_dataloader(self) -> DataLoader:
        self.size += 2
        return DataLoader(IndexedInputs(self.size), batch_size=4)


def test_a_dataset_whose_length_changes_is_an_error_naming_both(tmp_path: Path) -> None:
    dynamics = TrainingDynamics()
    trainer = make_trainer(tmp_path, [dynamics], epochs=3, reload_dataloaders_every_n_epochs=1)
    with pytest.raises(ValueError, match=r"has 12 samples this epoch but had 10"):
        trainer.fit(FixedModule(), datamodule=GrowingData())
    assert dynamics.report()["epochs_seen"].tolist() == [1] * 10  # the first epoch is kept


def test_gradient_accumulation_records_each_samples_own_loss(tmp_path: Path) -> None:
    dynamics = TrainingDynamics()
    trainer = make_trainer(tmp_path, [dynamics], epochs=1, accumulate_grad_batches=3)
    trainer.fit(FixedModule(), DataLoader(IndexedInputs(12), batch_size=2, shuffle=True))
    want = [expected_loss(i) for i in range(12)]  # not divided by the 3 accumulation steps
    np.testing.assert_allclose(by_id(dynamics)["loss_mean"], want, rtol=1e-6)


class SometimesNaN(FixedModule):
    def forward(self, x: Tensor) -> Tensor:
        logits = super().forward(x)
        bad = (x[:, 0] == 3) & (self.current_epoch == 0)
        return torch.where(bad[:, None], torch.full_like(logits, float("nan")), logits)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        losses = F.cross_entropy(self(x), y, reduction="none")
        return losses.nan_to_num(0.0).mean()


def test_nonfinite_logits_are_counted_and_leave_everything_else_alone(tmp_path: Path) -> None:
    dynamics = TrainingDynamics()
    trainer = make_trainer(tmp_path, [dynamics], epochs=2)
    trainer.fit(SometimesNaN(), DataLoader(IndexedInputs(8), batch_size=4, shuffle=True))
    report = by_id(dynamics)
    assert report["nonfinite_events"].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    assert report["epochs_seen"].tolist() == [2, 2, 2, 1, 2, 2, 2, 2]
    np.testing.assert_allclose(report["loss_mean"], [expected_loss(i) for i in range(8)], 1e-6)


class EvaluatingModule(FixedModule):
    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.validation_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(batch[0])


def test_sanity_validation_test_and_predict_loops_leave_the_statistics_alone(
    tmp_path: Path,
) -> None:
    dynamics = TrainingDynamics()
    loader = DataLoader(IndexedInputs(8), batch_size=4)
    trainer = make_trainer(tmp_path, [dynamics], epochs=1)
    module, other = EvaluatingModule(), DataLoader(IndexedInputs(20), batch_size=5)
    trainer.fit(module, loader, val_dataloaders=other)  # with a sanity check, too
    before = dynamics.recorder.state_dict()
    assert len(trainer.predict(module, other)) == 4
    trainer.validate(module, other)
    trainer.test(module, other)
    after = dynamics.recorder.state_dict()
    assert before["epochs_recorded"] == after["epochs_recorded"] == 1
    for name, tensor in before["tensors"].items():
        assert torch.equal(tensor, after["tensors"][name]), name


def test_resume_after_epoch_k_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    loader = DataLoader(IndexedInputs(16), batch_size=4)  # deterministic: no shuffling

    def run(root: Path, epochs: int, ckpt: str | None = None) -> tuple[TrainingDynamics, Any]:
        torch.manual_seed(0)
        dynamics, saver = TrainingDynamics(), ModelCheckpoint(dirpath=root, save_last=True)
        trainer = make_trainer(root, [dynamics, saver], epochs=epochs, enable_checkpointing=True)
        trainer.fit(LearnedModule(), loader, ckpt_path=ckpt)
        return dynamics, saver

    straight, _ = run(tmp_path / "straight", 4)
    _, saver = run(tmp_path / "first", 2)
    resumed, _ = run(tmp_path / "resumed", 4, ckpt=saver.last_model_path)
    pd.testing.assert_frame_equal(resumed.report(), straight.report())
    assert resumed.report()["epochs_seen"].tolist() == [4] * 16


def test_resume_mid_epoch_counts_no_presentation_twice(tmp_path: Path) -> None:
    loader = DataLoader(IndexedInputs(12), batch_size=2)  # 6 steps an epoch
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    first = make_trainer(tmp_path, [TrainingDynamics(), saver], max_steps=3, epochs=2,
                         enable_checkpointing=True)  # fmt: skip
    first.fit(FixedModule(), loader)
    mid_epoch = str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt")  # after 2 of 6 steps

    dynamics = TrainingDynamics(history=True)
    resumed = make_trainer(tmp_path / "resumed", [dynamics], epochs=2)
    resumed.fit(FixedModule(), loader, ckpt_path=mid_epoch)
    # Lightning replays the loader from its start for the 4 remaining steps: samples 0-7.
    history = load_history(resumed.log_dir)
    epoch0 = history[history["epoch"] == 0]
    assert epoch0["sample_id"].tolist() == list(range(8))
    assert epoch0["presentations"].tolist() == [1] * 8  # 0-3 were also seen before the save
    assert by_id(dynamics)["epochs_seen"].tolist() == [2] * 8 + [1] * 4
    assert load_report(resumed.log_dir).attrs["torchdebug"]["partial_epochs"] == [0]


class Stream(IterableDataset):
    """Yields (index, input, label) for every sample, in every worker: replicated."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Any:
        for i in range(self.n):
            yield {"index": i, "x": torch.tensor([float(i)]), "y": i % NUM_CLASSES}


class DictModule(FixedModule):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch["x"]), batch["y"])


def test_iterable_datasets_need_ids_and_replicas_are_caught(tmp_path: Path) -> None:
    class NoIds(IterableDataset):
        def __iter__(self) -> Any:
            return iter([(torch.tensor([float(i)]), i % NUM_CLASSES) for i in range(6)])

    trainer = make_trainer(tmp_path / "no_ids", [TrainingDynamics(num_samples=6)], epochs=1)
    with pytest.raises(TypeError, match="IterableDataset has no indices.*'index' entry"):
        trainer.fit(FixedModule(), DataLoader(NoIds(), batch_size=3))

    dynamics = TrainingDynamics(num_samples=6)
    trainer = make_trainer(tmp_path / "replicated", [dynamics], epochs=1)
    loader = DataLoader(Stream(6), batch_size=3, num_workers=2)
    with pytest.warns(UserWarning, match="6 sample ids came more than once.*get_worker_info"):
        trainer.fit(DictModule(), loader)
    report = by_id(dynamics)
    assert report["epochs_seen"].tolist() == [1] * 6  # each counted once
    np.testing.assert_allclose(report["loss_mean"], [expected_loss(i) for i in range(6)], 1e-6)


@pytest.mark.parametrize(
    "convert",
    [
        lambda ids: ids,
        lambda ids: ids.numpy().astype(np.int32),
        lambda ids: [int(i) for i in ids],
        lambda ids: tuple(np.int64(i) for i in ids),
    ],
    ids=["tensor", "numpy", "ints", "numpy_scalars"],
)
def test_ids_as_tensors_arrays_or_ints_key_the_same_sample(tmp_path: Path, convert: Any) -> None:
    data = TensorDataset(torch.arange(10.0)[:, None], torch.arange(10) % NUM_CLASSES)
    dynamics = TrainingDynamics(get_ids=lambda batch: convert(batch[0][:, 0].long()))
    make_trainer(tmp_path, [dynamics], epochs=1).fit(
        FixedModule(), DataLoader(data, batch_size=4, shuffle=True)
    )
    np.testing.assert_allclose(by_id(dynamics)["loss_mean"], [expected_loss(i) for i in range(10)])
    assert as_id_tensor(np.int16(7)).tolist() == [7]


class Named(IndexedInputs):
    def __getitem__(self, i: int) -> dict[str, Any]:
        x, y = super().__getitem__(i)
        return {"x": x, "y": y, "index": f"img_{i:03d}.png"}


def test_string_ids_are_kept_in_the_report_and_survive_a_resume(tmp_path: Path) -> None:
    loader = DataLoader(Named(10), batch_size=4, shuffle=True)
    dynamics = TrainingDynamics()
    trainer = make_trainer(tmp_path, [dynamics], epochs=1, enable_checkpointing=True)
    trainer.fit(DictModule(), loader)
    report = dynamics.report().set_index("sample_id")
    assert sorted(report.index) == [f"img_{i:03d}.png" for i in range(10)]
    want = [expected_loss(int(name[4:7])) for name in report.index]
    np.testing.assert_allclose(report["loss_mean"], want, rtol=1e-6)
    assert load_report(trainer.log_dir)["sample_id"].map(type).eq(str).all()
    resumed = TrainingDynamics()
    make_trainer(tmp_path / "r", [resumed], epochs=2).fit(
        DictModule(), loader, ckpt_path=trainer.checkpoint_callback.best_model_path
    )
    again = resumed.report().set_index("sample_id")
    assert sorted(again.index) == sorted(report.index) and again["epochs_seen"].eq(2).all()
    with pytest.raises(ValueError, match="11th distinct string id.*num_samples"):
        make_trainer(tmp_path / "few", [TrainingDynamics(num_samples=10)], epochs=1).fit(
            DictModule(), DataLoader(Named(11), batch_size=4)
        )


class Memoriser(L.LightningModule):
    """A wide MLP that memorises 100 two-blob points, 10 of them with a flipped label."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 256), nn.ReLU(), nn.Linear(256, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.02)


def auroc(score: pd.Series, positive: pd.Series) -> float:
    """Probability that a positive outranks a negative (ties count half)."""
    ranks, n1 = score.rank(), int(positive.sum())
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(score) - n1)))


def test_an_epoch_window_keeps_flipped_labels_detectable(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    truth = torch.arange(100) % 2
    x = torch.randn(100, 2, generator=generator) * 0.8 + (truth[:, None] * 2.0 - 1.0)
    labels = truth.clone()
    labels[::10] = 1 - labels[::10]
    loader = DataLoader(TensorDataset(x, labels), batch_size=100)

    def separation(epochs: int | None) -> float:
        """AUROC of -aum for the flipped labels after 500 epochs of memorising."""
        dynamics = TrainingDynamics(epochs=epochs, history=epochs is not None)
        make_trainer(tmp_path / str(epochs), [dynamics], epochs=500).fit(Memoriser(), loader)
        report = by_id(dynamics)
        assert report["epochs_seen"].max() == (epochs or 500)
        return auroc(-report["aum"], pd.Series(report.index % 10 == 0, index=report.index))

    everything, early = separation(None), separation(20)
    assert early > 0.9 and early > everything + 0.05  # measured: 0.933 against 0.843
    history = load_history(tmp_path / "20" / "lightning_logs" / "version_0")
    assert sorted(history["epoch"].unique()) == list(range(20))
    assert len(history) == 20 * 100
    with pytest.raises(ValueError, match="epochs must be"):
        TrainingDynamics(epochs=(3, 3))


def test_a_window_that_starts_later_keeps_the_trainers_epoch_numbers(tmp_path: Path) -> None:
    dynamics = TrainingDynamics(epochs=(3, 10), history=True)
    trainer = make_trainer(tmp_path, [dynamics], epochs=5)
    trainer.fit(LearnedModule(), DataLoader(IndexedInputs(8), batch_size=4))
    assert sorted(load_history(trainer.log_dir)["epoch"].unique()) == [3, 4]
    report = load_report(trainer.log_dir)
    assert report.attrs["torchdebug"]["epoch"] == 4
    assert report["epochs_seen"].tolist() == [2] * 8
    learned = report["first_learned_epoch"].dropna()
    assert len(learned) and learned.between(3, 4).all()
    events = EventAccumulator(str(trainer.log_dir), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("torchdebug/flags/total")] == [3, 4]


def test_history_holds_each_epochs_own_numbers(tmp_path: Path) -> None:
    dynamics = TrainingDynamics(history=True)
    trainer = make_trainer(tmp_path, [dynamics], epochs=2)
    trainer.fit(LearnedModule(), DataLoader(IndexedInputs(8), batch_size=4))
    history = load_history(trainer.log_dir)
    assert list(history.columns) == [
        "sample_id", "epoch", "presentations", "loss", "confidence", "margin", "correct",
        "grad_norm",
    ]  # fmt: skip
    assert history["epoch"].tolist() == [0] * 8 + [1] * 8
    means = history.groupby("sample_id")[["loss", "confidence"]].mean()
    report = by_id(dynamics)
    np.testing.assert_allclose(means["loss"], report["loss_mean"], rtol=1e-6)
    np.testing.assert_allclose(means["confidence"], report["confidence"], rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="history=True"):
        load_history(tmp_path / "nowhere")


class PartlyUnlabelled(IndexedInputs):
    """Samples 0 and 1 carry the ignore index -100 instead of a label."""

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x, y = super().__getitem__(i)
        return x, -100 if i < 2 else y


class IgnoringModule(FixedModule):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y, ignore_index=-100)


def test_ignore_index_rows_are_reported_as_unsupervised(tmp_path: Path) -> None:
    dynamics = TrainingDynamics(ignore_index=-100)
    trainer = make_trainer(tmp_path, [dynamics], epochs=2)
    trainer.fit(IgnoringModule(), DataLoader(PartlyUnlabelled(9), batch_size=3, shuffle=True))
    report = by_id(dynamics)
    assert report.loc[[0, 1], "flag"].tolist() == ["unsupervised"] * 2
    assert report.loc[[0, 1], "epochs_seen"].tolist() == [0, 0]
    assert report.loc[[0, 1], "loss_mean"].isna().all()
    assert report.loc[2:, "epochs_seen"].tolist() == [2] * 7
    np.testing.assert_allclose(report.loc[2:, "loss_mean"], [expected_loss(i) for i in range(2, 9)])
    assert load_report(trainer.log_dir)["flag"].tolist()[:2] == ["unsupervised"] * 2
    # Without ignore_index the same labels are an error naming the sample.
    with pytest.raises(ValueError, match="sample [01] has label -100"):
        make_trainer(tmp_path / "strict", [TrainingDynamics()], epochs=1).fit(
            IgnoringModule(), DataLoader(PartlyUnlabelled(9), batch_size=3)
        )


def test_a_class_never_given_as_a_label_breaks_no_threshold() -> None:
    torch.manual_seed(0)
    recorder = DynamicsRecorder(num_samples=200, num_classes=5)  # classes 3, 4 never given
    labels = torch.arange(200) % 3
    for _ in range(4):
        logits = F.one_hot(labels, 5).float() * 3.0 + 0.3 * torch.randn(200, 5)
        recorder.update(torch.arange(200), logits, labels)
        recorder.end_epoch()
    report = recorder.report()
    assert report["flag"].eq("mislabeled").sum() == 0
    assert report["mislabel_score"].between(0, 1).all()


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU"))],
)  # fmt: skip
def test_a_thousand_classes_keep_the_state_flat_across_epochs(device: str) -> None:
    recorder = DynamicsRecorder(num_samples=20_000, num_classes=1000, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    sizes, allocated = [], []
    for _ in range(3):
        for ids in torch.randperm(20_000, device=device, generator=generator).split(500):
            logits = torch.randn(500, 1000, device=device, generator=generator)
            labels = torch.randint(0, 1000, (500,), device=device, generator=generator)
            recorder.update(ids, logits, labels)
        recorder.end_epoch()
        sizes.append(sum(t.numel() * t.element_size() for t in recorder._state.values()))
        if device == "cuda":
            allocated.append(torch.cuda.memory_allocated())
    assert sizes[0] == sizes[1] == sizes[2]
    assert sizes[0] / 20_000 < 64.1  # no per-class state: the same 64 bytes as 10 classes
    assert len(set(allocated)) <= 1
    assert len(recorder.report()) == 20_000
