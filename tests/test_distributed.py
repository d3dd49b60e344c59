"""TrainingDynamics under real DDP: 3 CPU processes with gloo, against one process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from torchdebug import load_report

SCRIPT = Path(__file__).parent / "scripts" / "ddp_fit.py"


def fit(devices: int, root: Path) -> Path:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(devices), str(root)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(re.search(r"REPORT (\S+)", result.stdout).group(1))


def test_three_ranks_report_equals_one_process(tmp_path: Path) -> None:
    # 10 samples on 3 ranks: DistributedSampler pads with two repeated samples.
    single = load_report(fit(1, tmp_path / "single"))
    ddp = load_report(fit(3, tmp_path / "ddp"))
    assert ddp["sample_id"].tolist() == list(range(10))
    assert ddp["epochs_seen"].tolist() == [2] * 10
    np.testing.assert_allclose(ddp["loss_mean"], single["loss_mean"], rtol=1e-6)
    np.testing.assert_allclose(ddp["confidence"], single["confidence"], rtol=1e-6)
    assert ddp["given_label"].tolist() == [i % 3 for i in range(10)]
    # The TensorBoard views are written once, by rank zero, into one event file.
    logdir = report_dir(tmp_path / "ddp")
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(logdir), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    table = "torchdebug/review/mislabeled_table/text_summary"
    assert [e.step for e in events.Tensors(table)] == [1]  # tiny epochs: the last one
    assert [e.step for e in events.Scalars("torchdebug/flags/total")] == [0, 1]


def report_dir(root: Path) -> Path:
    return next(root.rglob("samples.parquet")).parent.parent
