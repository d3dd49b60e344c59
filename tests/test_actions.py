"""TrainingDynamics(action=...): drop, reweight and relabel in a real Lightning Trainer.

The module's logits are a fixed function of each sample's id (plus a small learnable
bias), so which samples are flagged is known: every fifth sample carries a label the
logits contradict, and only those are flagged ``mislabeled``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, WeightedRandomSampler

from torchdebug import TrainingDynamics, load_report, weighted_loss
from torchdebug.actions import ActionPolicy

N = 60
NUM_CLASSES = 3
NOISY = list(range(0, N, 5))  # 12 of 60 samples: their logits point at another class
CLEAN = [i for i in range(N) if i % 5]


def given_label(i: int) -> int:
    return i % NUM_CLASSES


def true_label(i: int) -> int:
    return (i + 1) % NUM_CLASSES if i % 5 == 0 else i % NUM_CLASSES


def fixed_logits(ids: Tensor) -> Tensor:
    ids = ids.long()
    truth = torch.where(ids % 5 == 0, (ids + 1) % NUM_CLASSES, ids % NUM_CLASSES)
    spread = 0.02 * (ids % 7).float()
    return F.one_hot(truth, NUM_CLASSES).float() * (4.0 + spread[:, None])


class Samples(Dataset):
    """Sample i is (tensor([i]), i % 3); remembers every index it was asked for."""

    def __init__(self, as_dict: bool = False) -> None:
        self.as_dict = as_dict
        self.fetched: list[int] = []

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> Any:
        self.fetched.append(int(i))
        x = torch.tensor([float(i)])
        if self.as_dict:
            return {"x": x, "y": given_label(i), "index": i}
        return x, given_label(i)


class FixedModule(L.LightningModule):
    """Fixed logits plus a learnable bias; records what each training_step saw."""

    def __init__(self, reweight: bool = False) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(NUM_CLASSES))
        self.reweight = reweight
        self.steps: list[dict[str, Any]] = []

    def forward(self, x: Tensor) -> Tensor:
        return fixed_logits(x[:, 0]) + self.bias

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
        logits = self(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        loss = weighted_loss(losses, self) if self.reweight else losses.mean()
        self.steps.append(
            {
                "epoch": self.current_epoch,
                "ids": x[:, 0].long().tolist(),
                "y": y.tolist(),
                "losses": losses.detach().clone(),
                "loss": loss.detach().clone(),
            }
        )
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(
    root: Path,
    dynamics: TrainingDynamics,
    *,
    epochs: int = 5,
    module: FixedModule | None = None,
    loader: DataLoader | None = None,
    callbacks: list[Callback] = (),
    ckpt_path: str | None = None,
    **options: Any,
) -> tuple[FixedModule, Samples]:
    module = module or FixedModule()
    if loader is None:
        loader = DataLoader(Samples(), batch_size=8, shuffle=True)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(callbacks),
        callbacks=[dynamics, *callbacks],
        log_every_n_steps=1,
        **options,
    )
    L.seed_everything(0, verbose=False)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module, loader.dataset


def ids_by_epoch(module: FixedModule) -> dict[int, set[int]]:
    seen: dict[int, set[int]] = {}
    for step in module.steps:
        seen.setdefault(step["epoch"], set()).update(step["ids"])
    return seen


def test_drop_removes_flagged_samples_from_every_later_batch(tmp_path: Path) -> None:
    dynamics = TrainingDynamics(action="drop", warmup_epochs=2)
    module, _ = fit(tmp_path, dynamics, epochs=5)

    report = dynamics.report()
    assert report.loc[report["action"] == "drop", "sample_id"].tolist() == NOISY
    dropped = report.set_index("sample_id").loc[NOISY]
    assert (dropped["action_epoch"] == 1).all()  # decided at the end of epoch 1
    assert (dropped["weight"] == 0).all()
    assert (report.set_index("sample_id").loc[CLEAN, "weight"] == 1).all()
    seen = ids_by_epoch(module)
    assert seen[0] == seen[1] == set(range(N))
    for epoch in (2, 3, 4):
        assert seen[epoch] == set(CLEAN)  # the ids training_step and the callback saw
    # The recorder saw the dropped samples in the two warm-up epochs only.
    assert dropped["epochs_seen"].tolist() == [2] * len(NOISY)
    on_disk = load_report(dynamics.report_path)
    assert on_disk.loc[on_disk["action"] == "drop", "sample_id"].tolist() == NOISY

    events = EventAccumulator(str(dynamics.report_path.parent.parent), {"scalars": 0})
    events.Reload()
    counts = [int(e.value) for e in events.Scalars("torchdebug/actions/dropped")]
    assert counts == [0, 12, 12, 12, 12]  # one per epoch; the first decision ends epoch 1


def test_drop_works_with_a_weighted_sampler_and_a_dataloader_reload(tmp_path: Path) -> None:
    samples = Samples()
    weights = torch.linspace(1.0, 2.0, N)
    sampler = WeightedRandomSampler(weights, num_samples=N, replacement=True)
    loader = DataLoader(samples, batch_size=6, sampler=sampler, num_workers=2)
    dynamics = TrainingDynamics(action="drop", warmup_epochs=2)
    module, _ = fit(tmp_path, dynamics, loader=loader, reload_dataloaders_every_n_epochs=1)

    acted = dynamics.report().query("action == 'drop'").set_index("sample_id")
    # Drawn with replacement, a sample may first show up (and be flagged) late.
    assert set(acted.index) <= set(NOISY) and len(acted) >= 10
    seen = ids_by_epoch(module)
    for sample_id, since in acted["action_epoch"].items():
        assert all(sample_id not in seen[epoch] for epoch in range(since + 1, 5))
    assert sum(len(seen[epoch] & set(NOISY)) for epoch in (3, 4)) <= 2
    # Every batch still trains: no epoch lost steps to dropping.
    steps = pd.Series([s["epoch"] for s in module.steps]).value_counts().sort_index()
    assert steps.tolist() == [10] * 5


def test_resume_keeps_the_decisions(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = TrainingDynamics(action="drop", warmup_epochs=2)
    fit(tmp_path / "a", first, epochs=3, callbacks=[checkpoint])

    resumed = TrainingDynamics(action="drop", warmup_epochs=2)
    module = FixedModule()
    fit(
        tmp_path / "b",
        resumed,
        epochs=5,
        module=module,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt2")],
        ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
    )
    seen = ids_by_epoch(module)
    assert sorted(seen) == [3, 4]
    assert seen[3] == seen[4] == set(CLEAN)
    report = resumed.report().set_index("sample_id")
    assert (report.loc[NOISY, "action_epoch"] == 1).all()  # first decided before resuming
    assert (report.loc[NOISY, "epochs_seen"] == 2).all()


def test_reweighted_losses_reach_the_loss_and_equal_the_mean_before(tmp_path: Path) -> None:
    dynamics = TrainingDynamics(action="reweight", warmup_epochs=2)
    module = FixedModule(reweight=True)
    loader = DataLoader(Samples(as_dict=True), batch_size=8, shuffle=True)
    fit(tmp_path, dynamics, module=module, loader=loader)

    report = dynamics.report().set_index("sample_id")
    weight = report["weight"]
    assert (report.loc[NOISY, "action"] == "reweight").all()
    np.testing.assert_allclose(weight[NOISY], 1 - report.loc[NOISY, "mislabel_score"])
    assert (weight[NOISY] < 0.5).all() and (weight[CLEAN] == 1).all()
    for step in module.steps:
        if step["epoch"] < 2:  # all weights 1: exactly the unweighted mean
            assert torch.equal(step["loss"], step["losses"].mean())
        else:
            w = torch.tensor(weight[step["ids"]].to_numpy(), dtype=torch.float32)
            torch.testing.assert_close(step["loss"], (step["losses"] * w).mean())
            if set(step["ids"]) & set(NOISY):
                assert step["loss"] < step["losses"].mean()


def test_reweight_warns_when_training_step_ignores_the_weights(tmp_path: Path) -> None:
    loader = DataLoader(Samples(as_dict=True), batch_size=8)
    dynamics = TrainingDynamics(action="reweight", warmup_epochs=1)
    with pytest.warns(UserWarning, match="weighted_loss"):
        fit(tmp_path, dynamics, loader=loader, epochs=2)


def test_relabel_trains_on_the_suggested_label_and_reports_the_given_one(
    tmp_path: Path,
) -> None:
    dynamics = TrainingDynamics(action="relabel", warmup_epochs=2)
    module, _ = fit(tmp_path, dynamics)

    for step in module.steps:
        expected = [true_label(i) if step["epoch"] >= 2 else given_label(i) for i in step["ids"]]
        assert step["y"] == expected
    report = dynamics.report().set_index("sample_id")
    assert report.loc[NOISY, "given_label"].tolist() == [given_label(i) for i in NOISY]
    assert report.loc[NOISY, "suggested_label"].tolist() == [true_label(i) for i in NOISY]
    assert (report.loc[NOISY, "action"] == "relabel").all()
    assert (report.loc[CLEAN, "action"] == "").all()
    # The recorder kept measuring against the given label: still flagged.
    assert (report.loc[NOISY, "flag"] == "mislabeled").all()


def test_dry_run_changes_nothing_in_training(tmp_path: Path) -> None:
    plain, _ = fit(tmp_path / "plain", TrainingDynamics())
    dry = TrainingDynamics(action="drop", warmup_epochs=2, dry_run=True)
    rehearsed, _ = fit(tmp_path / "dry", dry)

    assert torch.equal(plain.bias, rehearsed.bias)
    assert [s["ids"] for s in plain.steps] == [s["ids"] for s in rehearsed.steps]
    report = dry.report()
    assert report.loc[report["action"] == "would_drop", "sample_id"].tolist() == NOISY
    assert (report["weight"][report["action"] == "would_drop"] == 0).all()
    events = EventAccumulator(str(dry.report_path.parent.parent), {"scalars": 0})
    events.Reload()
    assert events.Scalars("torchdebug/actions/dry_run_dropped")[-1].value == len(NOISY)


def test_relabel_dry_run_keeps_the_given_labels(tmp_path: Path) -> None:
    dynamics = TrainingDynamics(action="relabel", warmup_epochs=1, dry_run=True)
    module, _ = fit(tmp_path, dynamics, epochs=3)
    assert all(step["y"] == [given_label(i) for i in step["ids"]] for step in module.steps)
    assert (dynamics.report().set_index("sample_id").loc[NOISY, "action"] == "would_relabel").all()


def test_drop_refuses_ids_that_are_not_dataset_indices(tmp_path: Path) -> None:
    loader = DataLoader(Samples(as_dict=True), batch_size=8, shuffle=True)
    dynamics = TrainingDynamics(
        action="drop", warmup_epochs=1, get_ids=lambda batch: (batch["index"] + 1) % N
    )
    with pytest.raises(RuntimeError, match="dataset indices"):
        fit(tmp_path, dynamics, loader=loader, epochs=3)
    assert load_report(dynamics.report_path)["epochs_seen"].max() >= 1  # kept what it had


class Stream(IterableDataset):
    def __iter__(self) -> Any:
        for i in range(N):
            yield {"x": torch.tensor([float(i)]), "y": given_label(i), "index": i}


def test_drop_refuses_a_loader_whose_sampler_it_cannot_control(tmp_path: Path) -> None:
    dynamics = TrainingDynamics(action="drop", warmup_epochs=1)
    with pytest.raises(TypeError, match="IterableDataset has no indices"):
        fit(tmp_path, dynamics, loader=DataLoader(Stream(), batch_size=8), epochs=2)
    # Observing the same stream works: its batches carry their ids.
    observer = TrainingDynamics(num_samples=N)
    fit(tmp_path / "observe", observer, loader=DataLoader(Stream(), batch_size=8), epochs=1)
    assert len(observer.report()) == N


def make_report(given: list[int], score: list[float]) -> pd.DataFrame:
    score_array = np.asarray(score)
    return pd.DataFrame(
        {
            "sample_id": np.arange(len(given)),
            "given_label": given,
            "suggested_label": [(g + 1) % 3 for g in given],
            "mislabel_score": score_array,
            "flag": np.where(score_array > 0.5, "mislabeled", ""),
        }
    )


def test_the_per_class_and_overall_caps_keep_the_highest_scores() -> None:
    # Class 0: 10 samples, 8 flagged; class 1: 10 samples, 3 flagged; class 2: 4, none.
    given = [0] * 10 + [1] * 10 + [2] * 4
    score = [0.9, 0.6, 0.8, 0.7, 0.95, 0.55, 0.65, 0.85, 0.1, 0.2]
    score += [0.99, 0.98, 0.97] + [0.1] * 7 + [0.1] * 4
    policy = ActionPolicy("drop", warmup_epochs=1, max_fraction=1.0, max_class_fraction=0.5)
    policy.decide(make_report(given, score), epoch=0, num_samples=len(given))
    assert np.flatnonzero(policy.acted).tolist() == [0, 2, 3, 4, 7, 10, 11, 12]  # 5 + 3
    for cls in range(3):
        members = np.asarray(given) == cls
        assert policy.acted[members].sum() <= 0.5 * members.sum()

    overall = ActionPolicy("drop", warmup_epochs=1, max_fraction=0.2, max_class_fraction=0.5)
    overall.decide(make_report(given, score), epoch=0, num_samples=len(given))
    assert np.flatnonzero(overall.acted).tolist() == [4, 10, 11, 12]  # floor(0.2 * 24)


def test_the_per_class_cap_holds_in_training(tmp_path: Path) -> None:
    dynamics = TrainingDynamics(action="drop", warmup_epochs=1, max_class_fraction=0.1)
    module, _ = fit(tmp_path, dynamics, epochs=3)
    report = dynamics.report()
    acted = report[report["action"] == "drop"]
    # 20 samples per given class: at most 2 each, though 4 per class are flagged.
    assert acted.groupby("given_label").size().tolist() == [2, 2, 2]
    flagged = report[report["flag"] == "mislabeled"]
    for label, rows in flagged.groupby("given_label"):
        top = rows.nlargest(2, "mislabel_score")["sample_id"]
        assert set(top) == set(acted.loc[acted["given_label"] == label, "sample_id"])
    assert not set(acted["sample_id"]) & ids_by_epoch(module)[2]


def test_decisions_are_revisited_and_remember_when_they_began() -> None:
    given = [0, 1, 2] * 10
    policy = ActionPolicy("reweight", warmup_epochs=1, max_fraction=0.5, max_class_fraction=0.5)
    first = [0.9 if i in (0, 1, 2) else 0.1 for i in range(30)]
    policy.decide(make_report(given, first), epoch=1, num_samples=30)
    later = [0.8 if i in (1, 2, 3) else 0.1 for i in range(30)]
    policy.decide(make_report(given, later), epoch=2, num_samples=30)
    assert np.flatnonzero(policy.acted).tolist() == [1, 2, 3]
    assert policy.since[[0, 1, 2, 3]].tolist() == [-1, 1, 1, 2]
    np.testing.assert_allclose(policy.weight[[0, 1, 3]], [1.0, 0.2, 0.2], rtol=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"action": "delete"}, "action must be None or one of"),
        ({"action": "drop", "warmup_epochs": 0}, "warmup_epochs"),
        ({"action": "drop", "max_fraction": 0.0}, "max_fraction"),
        ({"action": "drop", "max_class_fraction": 1.0}, "no class vanishes"),
    ],
)
def test_bad_action_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainingDynamics(**options)


def test_two_ddp_processes_never_train_on_a_dropped_sample(tmp_path: Path) -> None:
    script = Path(__file__).parent / "scripts" / "ddp_drop.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = load_report(next(tmp_path.rglob("samples.parquet")))
    assert report.loc[report["action"] == "drop", "sample_id"].tolist() == NOISY
    for rank in (0, 1):
        seen = np.loadtxt(tmp_path / f"ids_rank{rank}.txt", dtype=np.int64, ndmin=2)
        early, late = seen[seen[:, 0] < 2, 1], seen[seen[:, 0] >= 2, 1]
        assert set(NOISY) & set(early.tolist())  # each rank trained on some before
        assert not set(NOISY) & set(late.tolist())
        assert len(set(late.tolist())) > 15  # and kept training on its clean share
