"""TrainingDynamics under real DDP: CPU processes with gloo, against one process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from torchdebug import load_report

SCRIPT = Path(__file__).parent / "scripts" / "ddp_fit.py"


def fit(devices: int, root: Path, setup: str = "default") -> dict[str, object]:
    """Runs the script; returns the report path, checkpoint path and per-epoch counts."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(devices), str(root), setup],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    return {
        "report": Path(re.search(r"REPORT (\S+)", out).group(1)),
        "checkpoint": Path(re.search(r"CHECKPOINT (\S+)", out).group(1)),
        "counts": [eval(c) for c in re.findall(r"COUNTS (\[.*\])", out)],  # noqa: S307
    }


def expected_loss(i: int) -> float:
    logits = torch.tensor([0.01 * i, 0.02 * (i % 5), 0.0])
    return float(torch.nn.functional.cross_entropy(logits[None], torch.tensor([i % 3])))


def test_three_ranks_count_padding_once_and_report_equals_one_process(tmp_path: Path) -> None:
    # 10 samples on 3 ranks: DistributedSampler pads with two repeated samples.
    single = fit(1, tmp_path / "single")
    ddp = fit(3, tmp_path / "ddp")
    assert ddp["counts"] == [[1] * 10, [1] * 10]  # each sample exactly once per epoch
    report, alone = load_report(ddp["report"]), load_report(single["report"])
    assert report["sample_id"].tolist() == list(range(10))
    assert report["epochs_seen"].tolist() == [2] * 10
    np.testing.assert_allclose(report["loss_mean"], alone["loss_mean"], rtol=1e-6)
    np.testing.assert_allclose(report["confidence"], alone["confidence"], rtol=1e-6)
    assert report["given_label"].tolist() == [i % 3 for i in range(10)]
    # Rank zero's checkpoint holds the global state, not its own third of it.
    state = torch.load(ddp["checkpoint"], weights_only=False)["callbacks"]
    (dynamics,) = [v for k, v in state.items() if k.startswith("TrainingDynamics")]
    assert dynamics["tensors"]["epochs_seen"][:10].tolist() == [2] * 10
    # The TensorBoard views are written once, by rank zero, into one event file.
    logdir = ddp["report"].parent.parent
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(logdir), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    table = "torchdebug/review/mislabeled_table/text_summary"
    assert [e.step for e in events.Tensors(table)] == [1]  # tiny epochs: the last one
    assert [e.step for e in events.Scalars("torchdebug/flags/total")] == [0, 1]


def test_a_users_sampler_wrapped_by_lightning_keeps_the_ids_right(tmp_path: Path) -> None:
    ddp = fit(2, tmp_path, "user_sampler")
    assert ddp["counts"] == [[1] * 10, [1] * 10]
    report = load_report(ddp["report"])
    want = [expected_loss(i) for i in report["sample_id"]]
    np.testing.assert_allclose(report["loss_mean"], want, rtol=1e-6)


def test_drop_last_tail_is_not_seen_rather_than_zero(tmp_path: Path) -> None:
    ddp = fit(3, tmp_path, "drop_last")
    # 3 ranks x 3 samples: one sample a (shuffled) epoch is left out, never counted as 0.
    assert [sum(c) for c in ddp["counts"]] == [9, 9]
    assert all(max(c) == 1 for c in ddp["counts"])
    report = load_report(ddp["report"])
    seen = np.array(ddp["counts"]).sum(axis=0)
    by_id = report.set_index("sample_id")
    for i in range(10):
        if seen[i] == 0:
            assert i not in by_id.index
        else:
            assert by_id.loc[i, "epochs_seen"] == seen[i]
            assert np.isclose(by_id.loc[i, "loss_mean"], expected_loss(i), rtol=1e-6)


def test_a_rank_that_recorded_nothing_joins_the_reduction(tmp_path: Path) -> None:
    ddp = fit(2, tmp_path, "silent_rank")  # would hang (timeout) if rank 1 skipped it
    counts = ddp["counts"]
    assert [sum(c) for c in counts] == [5, 5]  # rank zero's half of each epoch
    report = load_report(ddp["report"])
    assert sorted(report["sample_id"]) == [i for i in range(10) if sum(c[i] for c in counts)]


def test_full_gradient_norms_under_ddp_equal_one_process(tmp_path: Path) -> None:
    single = load_report(fit(1, tmp_path / "single", "grad_full")["report"])
    ddp = load_report(fit(2, tmp_path / "ddp", "grad_full")["report"])
    assert ddp.attrs["torchdebug"]["grad_norm"] == "full"
    assert (ddp["grad_norm_mean"] > 0).all()
    np.testing.assert_allclose(ddp["grad_norm_mean"], single["grad_norm_mean"], rtol=1e-5)
