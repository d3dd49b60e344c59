"""The Parquet report: atomic writes, loading from a run dir or the file, metadata."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from torchdebug import load_report
from torchdebug.report import report_metadata, write_report


def test_round_trip_keeps_values_dtypes_and_metadata(tmp_path: Path) -> None:
    report = pd.DataFrame(
        {
            "sample_id": [3, 1],
            "first_learned_epoch": pd.array([2, None], dtype="Int64"),
            "flag": ["mislabeled", ""],
        }
    )
    path = write_report(report, tmp_path / "run" / "torchdebug" / "samples.parquet", epoch=4)
    for where in (path, path.parent, tmp_path / "run"):
        loaded = load_report(where)
        pd.testing.assert_frame_equal(loaded, report, check_dtype=False)
        assert loaded["first_learned_epoch"].dtype == "Int64"
        assert loaded.attrs["torchdebug"] == {"epoch": 4}
    assert report_metadata(tmp_path / "run") == {"epoch": 4}


def test_missing_report_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="torchdebug/samples.parquet"):
        load_report(tmp_path)


WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np, pandas as pd
    from torchdebug.report import write_report
    path = sys.argv[1]
    rows = 400_000
    for version in range(1, 10_000):
        frame = pd.DataFrame({"sample_id": np.arange(rows), "version": np.full(rows, version)})
        write_report(frame, path, version=version)
        print(version, flush=True)
    """
)


def test_killing_the_writer_mid_write_leaves_a_whole_report(tmp_path: Path) -> None:
    path = tmp_path / "torchdebug" / "samples.parquet"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "1"  # one complete report exists
    time.sleep(0.35)  # then kill it somewhere inside a later write
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    report = load_report(path)
    assert len(report) == 400_000
    version = report.attrs["torchdebug"]["version"]
    assert version >= 1 and (report["version"] == version).all()
