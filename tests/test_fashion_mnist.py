"""Acceptance on real data: Fashion-MNIST, 10,000 samples, 20% symmetric noise, 8 epochs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from torchdebug.cli import main
from torchdebug.data import load_fashion_mnist


def _have_fashion_mnist() -> bool:
    try:
        load_fashion_mnist(split="test")
    except FileNotFoundError:
        return False
    return True


@pytest.mark.skipif(
    not _have_fashion_mnist(),
    reason="Fashion-MNIST idx files missing: apt-get install dataset-fashion-mnist "
    "(.ci/run installs it)",
)
def test_fashion_mnist_flags_meet_the_targets(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    argv = ["demo", "--dataset", "fashion-mnist", "--num-samples", "10000", "--epochs", "8"]
    assert main([*argv, "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    auroc = float(re.search(r"AUROC (\d\.\d+)", out).group(1))
    precision = float(re.search(r"precision (\d\.\d+)", out).group(1))
    recall = float(re.search(r"recall (\d\.\d+)", out).group(1))
    assert "10000 training samples, 2000 labels flipped" in out
    assert auroc >= 0.99, out
    assert precision >= 0.85 and recall >= 0.85, out
