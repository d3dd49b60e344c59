"""The per-sample report on disk: written atomically as Parquet, read back with metadata."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "HISTORY_DIRNAME",
    "REPORT_DIRNAME",
    "REPORT_FILENAME",
    "load_history",
    "load_report",
    "report_metadata",
    "write_report",
]

REPORT_DIRNAME = "torchdebug"
REPORT_FILENAME = "samples.parquet"
HISTORY_DIRNAME = "history"
_METADATA_KEY = b"torchdebug"


def write_report(report: pd.DataFrame, path: str | os.PathLike, **metadata: Any) -> Path:
    """Writes the report as Parquet atomically: readers see the old file or the new one.

    The table is written to a temporary file in the same folder, flushed to disk and then
    renamed over ``path``, so a crash at any point leaves the previous report loadable.

    Args:
        report: The per-sample table.
        path: Destination ``.parquet`` file; its folder is created if needed.
        **metadata: JSON-serialisable values stored in the file (epoch, classes, ...).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(report, preserve_index=False)
    schema_meta = dict(table.schema.metadata or {})
    schema_meta[_METADATA_KEY] = json.dumps(metadata, default=str).encode()
    table = table.replace_schema_metadata(schema_meta)

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_report(path: str | os.PathLike) -> pd.DataFrame:
    """Reads a report written by ``TrainingDynamics``.

    Args:
        path: A run's log directory (the one holding ``torchdebug/samples.parquet``), that
            ``torchdebug`` folder, or the Parquet file itself.

    Returns:
        The per-sample table; its ``attrs["torchdebug"]`` holds the stored metadata.

    Raises:
        FileNotFoundError: If no report is found there.

    Example::

        >>> report = load_report("lightning_logs/version_0")  # doctest: +SKIP
        >>> report.sort_values("mislabel_score", ascending=False).head()  # doctest: +SKIP
    """
    file = _resolve(Path(path))
    table = pq.read_table(file)
    report = table.to_pandas()
    report.attrs["torchdebug"] = _decode_metadata(table.schema.metadata)
    return report


def load_history(path: str | os.PathLike) -> pd.DataFrame:
    """Reads the per-epoch history written by ``TrainingDynamics(history=True)``.

    Args:
        path: A run's log directory, its ``torchdebug`` folder, or the ``history`` folder.

    Returns:
        One row per sample and recorded epoch in which it was presented: ``sample_id``,
        ``epoch``, ``presentations`` and that epoch's mean ``loss``, ``confidence``,
        ``margin``, ``correct`` and ``grad_norm``; sorted by epoch then sample id.

    Raises:
        FileNotFoundError: If no history is found there.
    """
    path = Path(path)
    for folder in (path, path / HISTORY_DIRNAME, path / REPORT_DIRNAME / HISTORY_DIRNAME):
        files = sorted(folder.glob("epoch_*.parquet")) if folder.is_dir() else []
        if files:
            tables = [pq.read_table(f).to_pandas() for f in files]
            return pd.concat(tables, ignore_index=True).sort_values(
                ["epoch", "sample_id"], ignore_index=True
            )
    raise FileNotFoundError(
        f"No torchdebug history at {path}: expected {REPORT_DIRNAME}/{HISTORY_DIRNAME}/"
        "epoch_NNNN.parquet files, written by TrainingDynamics(history=True)."
    )


def report_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Returns the metadata stored with a report, without reading its rows."""
    return _decode_metadata(pq.read_schema(_resolve(Path(path))).metadata)


def _resolve(path: Path) -> Path:
    candidates = [path, path / REPORT_FILENAME, path / REPORT_DIRNAME / REPORT_FILENAME]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    named = sorted(
        str(f.parent)
        for folder in (path, path / REPORT_DIRNAME)
        if folder.is_dir()
        for f in folder.glob(f"*/{REPORT_FILENAME}")
    )
    hint = (
        f" Reports of named instances (TrainingDynamics(name=...)) are in: {named}."
        if named
        else ""
    )
    raise FileNotFoundError(
        f"No torchdebug report at {path}: expected a run directory holding "
        f"{REPORT_DIRNAME}/{REPORT_FILENAME}, or that file. A report is written at the end "
        f"of every training epoch by TrainingDynamics.{hint}"
    )


def _decode_metadata(metadata: dict[bytes, bytes] | None) -> dict[str, Any]:
    if not metadata or _METADATA_KEY not in metadata:
        return {}
    return json.loads(metadata[_METADATA_KEY])
