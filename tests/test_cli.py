"""The torchdebug command: the demo on real data and the summary of a finished run."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from torchdebug.cli import main, top_flagged
from torchdebug.report import write_report

# By mislabel_score descending, ties (0.9: ids 5 and 2; 0.3: ids 7 and 4) by id ascending.
EXPORT_ORDER = [9, 2, 5, 4, 7, 3, 1, 0]


@pytest.fixture
def full_report() -> pd.DataFrame:
    """A report with every column, ties in mislabel_score, each flag and missing epochs."""
    return pd.DataFrame(
        {
            "sample_id": [5, 2, 9, 1, 7, 3, 0, 4],
            "given_label": [0, 1, 2, 3, 4, 5, 6, 7],
            "predicted_label": [1, 1, 0, 3, 2, 5, 6, 1],
            "suggested_label": [1, 1, 0, 3, 4, 5, 6, 7],
            "epochs_seen": [4, 4, 4, 4, 3, 4, 4, 4],
            "loss_mean": [2.5, 1.0 / 3.0, 3.25, 0.125, 1.5, 0.75, 0.01, 1.25],
            "confidence": [0.1, 0.2, 0.05, 0.9, 0.3, 0.6, 0.99, 0.35],
            "variability": [0.05, 0.1234567890123456, 0.02, 0.01, 0.3, 0.35, 0.0, 0.25],
            "correctness": [0.0, 0.25, 0.0, 1.0, 0.0, 0.5, 1.0, 0.25],
            "forgetting_events": [4, 1, 4, 0, 3, 2, 0, 1],
            "first_learned_epoch": pd.array([None, 3, None, 0, None, 1, 0, 2], dtype="Int64"),
            "aum": [-2.0, -1.0, -3.0, 2.0, -0.5, 0.25, 4.0, -0.25],
            "grad_norm_mean": [1.5, 0.7, 2.0, 0.1, 1.1, 0.4, 0.05, 0.9],
            "mislabel_score": [0.9, 0.9, 0.95, 0.1, 0.3, 0.2, 0.05, 0.3],
            "flag": ["mislabeled", "mislabeled", "mislabeled", "", "hard", "ambiguous", "", "hard"],
            "nonfinite_events": [0, 0, 1, 0, 0, 0, 0, 2],
        }
    )


@pytest.fixture
def run_dir(tmp_path: Path, full_report: pd.DataFrame) -> Path:
    """A run log dir holding ``torchdebug/samples.parquet`` written from ``full_report``."""
    run = tmp_path / "run"
    write_report(full_report, run / "torchdebug" / "samples.parquet", epoch=3)
    return run


def _in_export_order(report: pd.DataFrame, ids: list[int] = EXPORT_ORDER) -> pd.DataFrame:
    return report.set_index("sample_id").loc[ids].reset_index()


def test_demo_flags_the_injected_noise_on_digits(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "torchdebug", "demo", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    out = result.stdout
    auroc = float(re.search(r"AUROC (\d\.\d+)", out).group(1))
    precision = float(re.search(r"precision (\d\.\d+)", out).group(1))
    recall = float(re.search(r"recall (\d\.\d+)", out).group(1))
    assert auroc >= 0.95 and precision >= 0.8 and recall >= 0.8, out
    assert "1797 training samples, 359 labels flipped" in out
    logdir = re.search(r"tensorboard --logdir (\S+)", out).group(1)
    assert (Path(logdir) / "torchdebug" / "samples.parquet").is_file()

    assert main(["summary", logdir, "--top", "5"]) == 0


def test_summary_orders_by_score_then_id(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    report = pd.DataFrame(
        {
            "sample_id": [5, 2, 9, 1],
            "given_label": [0, 1, 2, 3],
            "suggested_label": [1, 1, 0, 3],
            "mislabel_score": [0.9, 0.9, 0.95, 0.1],
            "confidence": [0.1, 0.2, 0.05, 0.9],
            "aum": [-2.0, -1.0, -3.0, 2.0],
            "forgetting_events": [0, 1, 0, 0],
            "flag": ["mislabeled", "mislabeled", "mislabeled", ""],
        }
    )
    assert top_flagged(report, 3)["sample_id"].tolist() == [9, 2, 5]
    write_report(report, tmp_path / "torchdebug" / "samples.parquet")
    assert main(["summary", str(tmp_path), "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("4 samples; flags:")
    assert [line.split()[0] for line in lines[2:]] == ["9", "2", "5"]
    assert main(["summary", str(tmp_path / "nowhere")]) == 1


def test_console_script_is_installed() -> None:
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "torchdebug"]
    assert script.value == "torchdebug.cli:main"


def test_export_csv_round_trips_in_score_order(
    run_dir: Path, full_report: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out" / "report.csv"
    assert main(["export", str(run_dir), "--format", "csv", "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 8 rows to {out}"

    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["sample_id"] for row in rows] == [str(i) for i in EXPORT_ORDER]
    # Never-learned samples (ids 9, 5, 7) have an empty field, not pandas' "<NA>".
    assert [row["first_learned_epoch"] for row in rows] == ["", "3", "", "2", "", "1", "0", "0"]
    assert "<NA>" not in out.read_text()

    back = pd.read_csv(
        out,
        float_precision="round_trip",
        keep_default_na=False,
        na_values={"first_learned_epoch": [""]},
        dtype={"first_learned_epoch": "Int64"},
    )
    pd.testing.assert_frame_equal(
        back, _in_export_order(full_report), check_dtype=False, check_exact=True
    )


def test_export_parquet_round_trips_in_score_order(
    run_dir: Path, full_report: pd.DataFrame, tmp_path: Path
) -> None:
    out = tmp_path / "report.parquet"
    assert main(["export", str(run_dir), "--format", "parquet", "-o", str(out)]) == 0

    back = pd.read_parquet(out)
    assert back["sample_id"].tolist() == EXPORT_ORDER
    assert back["first_learned_epoch"].dtype == "Int64"
    pd.testing.assert_frame_equal(
        back, _in_export_order(full_report), check_dtype=False, check_exact=True
    )


def test_export_jsonl_writes_nulls_and_ints(
    run_dir: Path, full_report: pd.DataFrame, tmp_path: Path
) -> None:
    out = tmp_path / "report.jsonl"
    assert main(["export", str(run_dir / "torchdebug"), "--format", "jsonl", "-o", str(out)]) == 0

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 8
    assert [r["sample_id"] for r in records] == EXPORT_ORDER
    assert list(records[0]) == list(full_report.columns)
    assert records[0]["first_learned_epoch"] is None  # sample 9 was never learned
    assert records[1]["first_learned_epoch"] == 3 and type(records[1]["first_learned_epoch"]) is int
    int_columns = ["sample_id", "given_label", "forgetting_events", "nonfinite_events"]
    assert all(type(r[c]) is int for r in records for c in int_columns)
    assert records[1]["variability"] == 0.1234567890123456
    back = pd.DataFrame(records).astype({"first_learned_epoch": "Int64"})
    pd.testing.assert_frame_equal(
        back, _in_export_order(full_report), check_dtype=False, check_exact=True
    )


def test_export_jsonl_writes_nan_as_null(full_report: pd.DataFrame, tmp_path: Path) -> None:
    full_report.loc[full_report["sample_id"] == 9, "aum"] = np.nan
    write_report(full_report, tmp_path / "samples.parquet")
    out = tmp_path / "report.jsonl"
    assert main(["export", str(tmp_path), "--format", "jsonl", "-o", str(out)]) == 0

    def reject(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    records = [json.loads(line, parse_constant=reject) for line in out.read_text().splitlines()]
    assert [r["aum"] for r in records] == [None, -1.0, -2.0, -0.25, -0.5, 0.25, 2.0, 4.0]


@pytest.mark.parametrize(
    ("flag", "ids"),
    [("mislabeled", [9, 2, 5]), ("hard", [4, 7]), ("ambiguous", [3]), ("any", [9, 2, 5, 4, 7, 3])],
)
def test_export_flag_keeps_exactly_those_rows(
    run_dir: Path, full_report: pd.DataFrame, tmp_path: Path, flag: str, ids: list[int]
) -> None:
    out = tmp_path / "flagged.parquet"
    argv = ["export", str(run_dir), "--format", "parquet", "-o", str(out), "--flag", flag]
    assert main(argv) == 0

    back = pd.read_parquet(out)
    assert back["sample_id"].tolist() == ids
    expected = _in_export_order(full_report, ids)
    pd.testing.assert_frame_equal(back, expected, check_dtype=False, check_exact=True)


def test_export_defaults_to_samples_file_in_cwd(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    parquet = run_dir / "torchdebug" / "samples.parquet"
    assert main(["export", str(parquet), "--format", "jsonl"]) == 0

    assert capsys.readouterr().out.strip() == "wrote 8 rows to samples.jsonl"
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 8


def test_export_and_plot_fail_on_missing_run_or_unknown_format(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    nowhere = str(tmp_path / "nowhere")
    assert main(["export", nowhere, "--format", "csv", "-o", str(tmp_path / "a.csv")]) == 1
    assert "No torchdebug report at" in capsys.readouterr().err
    assert main(["plot", nowhere, "-o", str(tmp_path / "a.png")]) == 1
    assert "No torchdebug report at" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--format", "xlsx", "-o", str(tmp_path / "a.x")]) == 1
    assert "unknown export format 'xlsx'" in capsys.readouterr().err
    assert not list(tmp_path.glob("a.*"))


def test_plot_writes_a_600_by_500_png(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "map.png"
    assert main(["plot", str(run_dir), "-o", str(out)]) == 0

    assert capsys.readouterr().out.strip() == f"wrote the data map of 8 samples to {out}"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # figures.FIGURE_SIZE is 6x5 inches at FIGURE_DPI 100: 600 wide, 500 high.
    image = imread(out)
    assert image.shape[:2] == (500, 600)
    assert np.ptp(image[..., :3]) > 0  # something was drawn, not a blank canvas
