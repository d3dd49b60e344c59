"""The torchdebug command: the demo on real data and the summary of a finished run."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pandas as pd

from torchdebug.cli import main, top_flagged


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
    from torchdebug.report import write_report

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
