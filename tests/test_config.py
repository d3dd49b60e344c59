"""The LightningCLI config runs end to end through ``examples/cli.py`` and writes a report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

import torchdebug

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "examples" / "cli.py"
CONFIG = REPO / "configs" / "fashion_mnist.yaml"
# Digits keeps the test fast and offline-safe; its 8x8 images need the model resized to match.
SMALL_RUN = [
    "--data.dataset",
    "digits",
    "--data.num_samples",
    "300",
    "--model.init_args.image_size",
    "8",
    "--trainer.max_epochs",
    "2",
    "--trainer.enable_progress_bar",
    "false",
]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(CLI), "fit", "--config", str(CONFIG), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_config_names_the_callback(tmp_path: Path) -> None:
    done = _cli("--print_config", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    paths = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert paths in (["torchdebug.TrainingDynamics"], ["torchdebug.callback.TrainingDynamics"])
    assert config["model"]["class_path"] == "torchdebug.models.ImageClassifier"
    assert config["data"]["class_path"] == "torchdebug.data.NoisyImageDataModule"
    assert config["data"]["init_args"]["dataset"] == "fashion-mnist"


def test_config_fit_writes_report(tmp_path: Path) -> None:
    done = _cli(*SMALL_RUN, "--trainer.default_root_dir", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    path = tmp_path / "lightning_logs" / "version_0" / "torchdebug" / "samples.parquet"
    assert path.is_file()
    report = torchdebug.load_report(path)
    assert len(report) == 300
    assert set(torchdebug.REPORT_COLUMNS) <= set(report.columns)
    assert report.attrs["torchdebug"]["epochs_recorded"] == 2
