"""Tests of the TensorBoard logging: real writers, real event files read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tbparse import SummaryReader
from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from torchdebug.tensorboard import log_epoch

N = 500
MISLABELED = range(0, 50)
HARD = range(50, 70)
AMBIGUOUS = range(70, 110)
# Never learned: most mislabeled samples and a few hard ones.
NEVER_LEARNED = set(range(0, 45)) | set(range(50, 55))
NAN_GRAD_NORM = range(200, 207)
INF_LOSS = 300
COUNT_TAGS = {
    "torchdebug/flags/mislabeled",
    "torchdebug/flags/hard",
    "torchdebug/flags/ambiguous",
    "torchdebug/flags/total",
    "torchdebug/forgetting_events_total",
    "torchdebug/never_learned",
}
HISTOGRAM_TAGS = {
    "torchdebug/confidence",
    "torchdebug/aum",
    "torchdebug/loss",
    "torchdebug/grad_norm",
    "torchdebug/mislabel_score",
}


def make_report(seed: int = 0) -> pd.DataFrame:
    """Build a 500-row report whose flags and learning history are laid out by row."""
    rng = np.random.default_rng(seed)
    ids = np.arange(N, dtype=np.int64)
    flag = np.full(N, "", dtype=object)
    flag[list(MISLABELED)] = "mislabeled"
    flag[list(HARD)] = "hard"
    flag[list(AMBIGUOUS)] = "ambiguous"
    never = np.isin(ids, list(NEVER_LEARNED))
    confidence = np.where(flag == "mislabeled", rng.uniform(0.0, 0.15, N), rng.uniform(0.5, 1, N))
    loss = -np.log(confidence)
    loss[INF_LOSS] = np.inf
    grad_norm = rng.uniform(0.0, np.sqrt(2.0), N)
    grad_norm[list(NAN_GRAD_NORM)] = np.nan
    return pd.DataFrame(
        {
            "sample_id": ids,
            "given_label": ids % 10,
            "predicted_label": (ids * 7) % 10,
            "suggested_label": (ids * 3) % 10,
            "epochs_seen": np.full(N, 5, dtype=np.int64),
            "loss_mean": loss,
            "confidence": confidence,
            "variability": rng.uniform(0.0, 0.4, N),
            "correctness": rng.uniform(0.0, 1.0, N),
            # Never-learned samples carry a large value that must not be summed.
            "forgetting_events": np.where(never, 99, ids % 3),
            "first_learned_epoch": pd.array(np.where(never, None, ids % 4), dtype="Int64"),
            "aum": np.where(flag == "mislabeled", -2.0, 1.5) + rng.normal(0.0, 0.3, N),
            "grad_norm_mean": grad_norm,
            "mislabel_score": 1.0 - confidence,
            "flag": flag.astype(str),
        }
    )


def _forgetting_total() -> int:
    return sum(i % 3 for i in range(N) if i not in NEVER_LEARNED)


def _scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Read scalars back as {tag: {step: value}}."""
    frame = SummaryReader(str(log_dir), pivot=False).scalars
    values: dict[str, dict[int, float]] = {}
    for row in frame.itertuples(index=False):
        values.setdefault(row.tag, {})[int(row.step)] = float(row.value)
    return values


def _images(log_dir: Path, tag: str) -> list:
    accumulator = EventAccumulator(str(log_dir), size_guidance={IMAGES: 0})
    accumulator.Reload()
    if tag not in accumulator.Tags()[IMAGES]:
        return []
    return accumulator.Images(tag)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_counts_at_two_steps(tmp_path: Path) -> None:
    first = make_report()
    second = first.copy()
    second.loc[:9, "flag"] = ""  # ten fewer mislabeled at the second epoch
    writer = SummaryWriter(log_dir=str(tmp_path))
    log_epoch(writer, first, 0, data_map=False)
    log_epoch(writer, second, 1, data_map=False)
    writer.close()

    scalars = _scalars(tmp_path)
    assert set(scalars) == COUNT_TAGS | {"torchdebug/noise_rate_estimate"}
    assert all(set(steps) == {0, 1} for steps in scalars.values())
    assert scalars["torchdebug/flags/mislabeled"] == {0: 50, 1: 40}
    assert scalars["torchdebug/flags/hard"] == {0: 20, 1: 20}
    assert scalars["torchdebug/flags/ambiguous"] == {0: 40, 1: 40}
    assert scalars["torchdebug/flags/total"] == {0: 110, 1: 100}
    noise = scalars["torchdebug/noise_rate_estimate"]
    # TensorBoard stores scalars as float32.
    assert noise[0] == pytest.approx(50 / 500, rel=1e-6)
    assert noise[1] == pytest.approx(40 / 500, rel=1e-6)
    assert scalars["torchdebug/forgetting_events_total"] == {
        0: _forgetting_total(),
        1: _forgetting_total(),
    }
    assert scalars["torchdebug/never_learned"] == {0: 50, 1: 50}


def test_histograms_count_finite_values(tmp_path: Path) -> None:
    report = make_report()
    writer = SummaryWriter(log_dir=str(tmp_path))
    log_epoch(writer, report, 3, data_map=False)
    writer.close()

    frame = SummaryReader(str(tmp_path), pivot=False, extra_columns={"num"}).histograms
    assert set(frame["tag"]) == HISTOGRAM_TAGS
    assert set(frame["step"]) == {3}
    num = dict(zip(frame["tag"], frame["num"], strict=True))
    assert num["torchdebug/confidence"] == N
    assert num["torchdebug/aum"] == N
    assert num["torchdebug/mislabel_score"] == N
    assert num["torchdebug/loss"] == N - 1
    assert num["torchdebug/grad_norm"] == N - len(NAN_GRAD_NORM)
    for row in frame.itertuples(index=False):
        assert row.counts.sum() == row.num


def test_histogram_skipped_without_finite_values(tmp_path: Path) -> None:
    report = make_report()
    report["grad_norm_mean"] = np.nan
    writer = SummaryWriter(log_dir=str(tmp_path))
    log_epoch(writer, report, 0, data_map=False)
    writer.close()

    tags = set(SummaryReader(str(tmp_path), pivot=False).histograms["tag"])
    assert tags == HISTOGRAM_TAGS - {"torchdebug/grad_norm"}


def test_data_map_image(tmp_path: Path) -> None:
    writer = SummaryWriter(log_dir=str(tmp_path))
    log_epoch(writer, make_report(), 0)
    log_epoch(writer, make_report(seed=1), 1)
    writer.close()

    images = _images(tmp_path, "torchdebug/data_map")
    assert [image.step for image in images] == [0, 1]
    for image in images:
        assert (image.width, image.height) == (600, 500)
        assert _png_size(image.encoded_image_string) == (600, 500)
        assert len(image.encoded_image_string) > 10_000


def test_data_map_can_be_turned_off(tmp_path: Path) -> None:
    writer = SummaryWriter(log_dir=str(tmp_path))
    log_epoch(writer, make_report(), 0, data_map=False)
    writer.close()
    assert _images(tmp_path, "torchdebug/data_map") == []


@pytest.mark.parametrize(
    "report",
    [make_report().iloc[:0], pd.DataFrame()],
    ids=["no-rows", "no-columns"],
)
def test_empty_report_writes_zero_counts_only(report: pd.DataFrame, tmp_path: Path) -> None:
    writer = SummaryWriter(log_dir=str(tmp_path))
    log_epoch(writer, report, 0)
    writer.close()

    scalars = _scalars(tmp_path)
    assert scalars == {tag: {0: 0.0} for tag in COUNT_TAGS}
    assert SummaryReader(str(tmp_path), pivot=False).histograms.empty
    assert _images(tmp_path, "torchdebug/data_map") == []


def test_prefix_and_writer_left_open(tmp_path: Path) -> None:
    writer = SummaryWriter(log_dir=str(tmp_path))
    log_epoch(writer, make_report(), 0, prefix="debug/", data_map=False)
    # The logger owns the writer: it must still be open for the logger's own use.
    assert writer.file_writer is not None
    writer.close()

    scalars = _scalars(tmp_path)
    assert scalars["debug/flags/mislabeled"] == {0: 50}
    assert all(tag.startswith("debug/") for tag in scalars)


def test_missing_column_raises(tmp_path: Path) -> None:
    writer = SummaryWriter(log_dir=str(tmp_path))
    with pytest.raises(ValueError, match="first_learned_epoch"):
        log_epoch(writer, make_report().drop(columns="first_learned_epoch"), 0)
    writer.close()


def test_through_lightning_tensorboard_logger(tmp_path: Path) -> None:
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="run")
    log_epoch(logger.experiment, make_report(), 2)
    logger.finalize("success")

    log_dir = Path(logger.log_dir)
    scalars = _scalars(log_dir)
    assert scalars["torchdebug/flags/mislabeled"] == {2: 50}
    assert scalars["torchdebug/never_learned"] == {2: 50}
    images = _images(log_dir, "torchdebug/data_map")
    assert [(image.step, image.width, image.height) for image in images] == [(2, 600, 500)]
