"""DynamicsRecorder against hand-computed values on a scripted 4-sample, 4-epoch sequence."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from torchdebug import REPORT_COLUMNS, DynamicsRecorder, SampleError
from torchdebug.recorder import presentation_stats

# Three classes; labels of samples 0..3.
LABELS = [0, 1, 2, 0]
# SCRIPT[epoch] = list of batches; a batch = list of (sample id, logits).
# Sample 0: always right. Sample 1: right, right, wrong, right (one forgetting event).
# Sample 2: never right (predicts class 0 or 1). Sample 3: wrong, then right; unseen in
# epoch 2; seen twice in epoch 1 (once right, once wrong: mean of both, majority = right).
SCRIPT = [
    [[(0, [2.0, 0.0, 0.0]), (1, [0.0, 1.0, 0.0])], [(2, [1.0, 0.0, 0.0]), (3, [0.0, 1.0, 0.0])]],
    [[(3, [3.0, 0.0, 0.0]), (0, [3.0, 1.0, 0.0])], [(1, [0.0, 2.0, 1.0]), (2, [0.0, 2.0, 0.0])]],
    [[(1, [0.0, 0.0, 1.0]), (0, [4.0, 0.0, 0.0]), (2, [2.0, 0.0, 1.0])]],
    [[(0, [5.0, 0.0, 0.0]), (1, [0.0, 3.0, 0.0])], [(2, [0.0, 1.0, 0.0]), (3, [2.0, 0.0, 1.0])]],
]
# Epoch 1 shows sample 3 a second time, in its own batch.
SCRIPT[1].append([(3, [0.0, 0.5, 0.0])])


def run_script(recorder: DynamicsRecorder) -> DynamicsRecorder:
    for epoch in SCRIPT:
        for batch in epoch:
            ids = torch.tensor([i for i, _ in batch])
            logits = torch.tensor([z for _, z in batch])
            recorder.update(ids, logits, torch.tensor([LABELS[i] for i, _ in batch]))
        recorder.end_epoch()
    return recorder


def softmax(z: list[float]) -> np.ndarray:
    e = np.exp(np.asarray(z) - max(z))
    return e / e.sum()


def test_presentation_stats_match_formulas() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    targets = torch.tensor([0, 2])
    stats = presentation_stats(logits, targets)
    for row in range(2):
        p = softmax(logits[row].tolist())
        y = int(targets[row])
        onehot = np.eye(3)[y]
        assert stats["loss"][row].item() == pytest.approx(-math.log(p[y]), rel=1e-6)
        assert stats["prob"][row].item() == pytest.approx(p[y], rel=1e-6)
        assert stats["grad"][row].item() == pytest.approx(np.linalg.norm(p - onehot), rel=1e-5)
    assert stats["margin"].tolist() == pytest.approx([1.5, -2.0])
    assert stats["other"].tolist() == [1, 1]
    assert stats["correct"].tolist() == [True, False]


def test_grad_norm_is_the_gradient_of_cross_entropy() -> None:
    logits = torch.randn(5, 4, requires_grad=True)
    targets = torch.tensor([0, 3, 1, 1, 2])
    torch.nn.functional.cross_entropy(logits, targets, reduction="sum").backward()
    expected = logits.grad.norm(dim=1)
    assert torch.allclose(presentation_stats(logits, targets)["grad"], expected, atol=1e-6)


def test_every_column_matches_hand_computed_values() -> None:
    recorder = run_script(DynamicsRecorder(num_samples=4))
    report = recorder.report().set_index("sample_id")

    assert list(report.reset_index().columns[: len(REPORT_COLUMNS)]) == list(REPORT_COLUMNS)
    assert report["given_label"].tolist() == LABELS
    assert report["epochs_seen"].tolist() == [4, 4, 4, 3]
    # Sample 1: right in epochs 0, 1, 3 and wrong in 2. Sample 3: wrong, half right (its
    # two presentations in epoch 1), right.
    assert report["correctness"].tolist() == pytest.approx([1.0, 0.75, 0.0, 0.5])
    assert report["forgetting_events"].tolist() == [0, 1, 4, 0]  # never learned -> 4 epochs
    assert report["first_learned_epoch"].tolist()[:2] == [0, 0]
    assert report["first_learned_epoch"].isna().tolist() == [False, False, True, False]
    assert report.loc[3, "first_learned_epoch"] == 1
    assert report["predicted_label"].tolist() == [0, 1, 1, 0]

    # Confidence, variability, loss, AUM and gradient norm from the formulas.
    for sid in range(4):
        per_epoch = []
        for epoch in SCRIPT:
            shown = [z for batch in epoch for i, z in batch if i == sid]
            if shown:
                per_epoch.append(shown)
        y = LABELS[sid]
        probs = [np.mean([softmax(z)[y] for z in shown]) for shown in per_epoch]
        losses = [np.mean([-np.log(softmax(z)[y]) for z in shown]) for shown in per_epoch]
        margins = [
            np.mean([z[y] - max(v for k, v in enumerate(z) if k != y) for z in shown])
            for shown in per_epoch
        ]
        grads = [
            np.mean([np.linalg.norm(softmax(z) - np.eye(3)[y]) for z in shown])
            for shown in per_epoch
        ]
        row = report.loc[sid]
        assert row["confidence"] == pytest.approx(np.mean(probs), rel=1e-5)
        assert row["variability"] == pytest.approx(np.std(probs), rel=1e-4, abs=1e-6)
        assert row["loss_mean"] == pytest.approx(np.mean(losses), rel=1e-5)
        assert row["aum"] == pytest.approx(np.mean(margins), rel=1e-5)
        assert row["grad_norm_mean"] == pytest.approx(np.mean(grads), rel=1e-5)

    # Sample 2 is never right; its strongest other class is 0 in 3 of 4 epochs. Four
    # samples are too few for the mixture, so none is flagged and none gets a suggestion.
    assert recorder.aggregates().arrays["vote_class"][2] == 0
    assert (report["suggested_label"] == report["given_label"]).all()
    assert report["mislabel_score"].between(0, 1).all()
    assert set(report["flag"]) <= {"mislabeled", "hard", "ambiguous", ""}


def test_sample_seen_twice_contributes_its_mean() -> None:
    rec = DynamicsRecorder(num_samples=2, num_classes=2)
    rec.update(
        torch.tensor([0, 0, 1]),
        torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]]),
        torch.tensor([0, 0, 1]),
    )
    rec.end_epoch()
    row = rec.report().set_index("sample_id").loc[0]
    expected = (softmax([2.0, 0.0])[0] + 0.5) / 2
    assert row["confidence"] == pytest.approx(expected, rel=1e-6)
    assert row["epochs_seen"] == 1
    assert row["variability"] == 0.0


def test_unseen_samples_are_not_counted_and_not_reported() -> None:
    rec = DynamicsRecorder(num_samples=5, num_classes=2)
    rec.update(torch.tensor([1, 3]), torch.randn(2, 2), torch.tensor([0, 1]))
    rec.end_epoch()
    rec.update(torch.tensor([3]), torch.randn(1, 2), torch.tensor([1]))
    rec.end_epoch()
    report = rec.report()
    assert report["sample_id"].tolist() == [1, 3]
    assert report["epochs_seen"].tolist() == [1, 2]


def test_label_out_of_range_names_the_sample_and_keeps_the_rest() -> None:
    rec = DynamicsRecorder(num_samples=10, num_classes=3)
    rec.update(torch.tensor([0, 1]), torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(SampleError, match=r"sample 7 has label 5, outside \[0, 3\)"):
        rec.update(torch.tensor([2, 7]), torch.zeros(2, 3), torch.tensor([1, 5]))
    rec.end_epoch()
    assert rec.report()["sample_id"].tolist() == [0, 1]


def test_id_out_of_range_is_an_error_naming_the_id() -> None:
    rec = DynamicsRecorder(num_samples=4, num_classes=2)
    with pytest.raises(SampleError, match="sample id 9 is outside"):
        rec.update(torch.tensor([9]), torch.zeros(1, 2), torch.tensor([0]))


def test_nonfinite_logits_are_counted_and_leave_others_untouched() -> None:
    rec = DynamicsRecorder(num_samples=3, num_classes=2)
    logits = torch.tensor([[1.0, 0.0], [float("nan"), 0.0], [0.0, 2.0]])
    rec.update(torch.arange(3), logits, torch.tensor([0, 0, 1]))
    rec.end_epoch()
    report = rec.report().set_index("sample_id")
    assert 1 not in report.index
    assert report.loc[0, "confidence"] == pytest.approx(softmax([1.0, 0.0])[0], rel=1e-6)
    assert rec.aggregates().arrays["nonfinite"].tolist() == [0, 1, 0]


def test_bad_shapes_and_soft_targets_are_refused() -> None:
    rec = DynamicsRecorder(num_samples=4)
    with pytest.raises(ValueError, match="Soft or multi-label"):
        rec.update(torch.arange(2), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="same number of rows"):
        rec.update(torch.arange(3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, classes\]"):
        rec.update(torch.arange(2), torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))


def test_bf16_logits_are_scored_in_float32() -> None:
    logits = torch.tensor([[1.0, 1.0 + 2**-6]])
    rec = DynamicsRecorder(num_samples=1)
    rec.update(torch.tensor([0]), logits.to(torch.bfloat16), torch.tensor([1]))
    rec.end_epoch()
    expected = float(logits.to(torch.bfloat16).float()[0, 1] - 1.0)
    assert rec.report()["aum"].iloc[0] == pytest.approx(expected, abs=1e-7)
    assert rec._state["epoch_loss"].dtype == torch.float32


def test_state_dict_round_trip_continues_identically() -> None:
    full = run_script(DynamicsRecorder(num_samples=4))
    partial = DynamicsRecorder(num_samples=4)
    for batch in SCRIPT[0]:
        ids = torch.tensor([i for i, _ in batch])
        partial.update(
            ids, torch.tensor([z for _, z in batch]), torch.tensor([LABELS[i] for i, _ in batch])
        )
    partial.end_epoch()
    resumed = DynamicsRecorder(num_samples=4)
    resumed.load_state_dict(partial.state_dict())
    for epoch in SCRIPT[1:]:
        for batch in epoch:
            ids = torch.tensor([i for i, _ in batch])
            resumed.update(
                ids,
                torch.tensor([z for _, z in batch]),
                torch.tensor([LABELS[i] for i, _ in batch]),
            )
        resumed.end_epoch()
    pd.testing.assert_frame_equal(resumed.report(), full.report())
    with pytest.raises(ValueError, match="tracked 4 samples"):
        DynamicsRecorder(num_samples=5).load_state_dict(full.state_dict())


@pytest.mark.parametrize("times", [32_768, 65_537])
def test_a_wrapped_presentation_counter_is_an_error_not_a_wrong_number(times: int) -> None:
    rec = DynamicsRecorder(num_samples=3, num_classes=3)
    rec.update(torch.tensor([0, 1, 2]), torch.zeros(3, 3), torch.tensor([0, 1, 2]))
    rec.end_epoch()
    logits = torch.tensor([[3.0, 0.0, 0.0]]).expand(times, 3)
    rec.update(torch.zeros(times, dtype=torch.long), logits, torch.zeros(times, dtype=torch.long))
    rec.update(torch.tensor([1]), torch.zeros(1, 3), torch.tensor([1]))
    with pytest.raises(SampleError, match="sample 0 was presented more than 32767 times"):
        rec.end_epoch()
    report = rec.report()  # the first epoch is intact, the bad one was dropped
    assert report["epochs_seen"].tolist() == [1, 1, 1]
    assert report["confidence"].tolist() == pytest.approx([1 / 3] * 3)
    rec.update(torch.tensor([0]), torch.zeros(1, 3), torch.tensor([0]))
    rec.end_epoch()  # and recording goes on
    assert rec.report()["epochs_seen"].tolist() == [2, 1, 1]


def test_state_bytes_per_sample_is_small() -> None:
    assert DynamicsRecorder(num_samples=10).state_bytes_per_sample <= 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_update_never_synchronises_on_cuda() -> None:
    rec = DynamicsRecorder(num_samples=1000, num_classes=10, device="cuda")
    ids = torch.randperm(1000, device="cuda")[:64]
    logits = torch.randn(64, 10, device="cuda")
    targets = torch.randint(0, 10, (64,), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            rec.update(ids, logits, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rec.end_epoch()
    assert len(rec.report()) == 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bad_label_on_cuda_is_reported_at_epoch_end() -> None:
    rec = DynamicsRecorder(num_samples=10, num_classes=3, device="cuda")
    ids = torch.tensor([1, 4], device="cuda")
    rec.update(ids, torch.zeros(2, 3, device="cuda"), torch.tensor([0, 9], device="cuda"))
    with pytest.raises(SampleError, match="sample 4 has label 9"):
        rec.end_epoch()
    assert rec.report()["sample_id"].tolist() == [1]
