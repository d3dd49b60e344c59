"""Write the per-sample report's summary to TensorBoard once per epoch."""

from __future__ import annotations

import numpy as np
import pandas as pd
from torch.utils.tensorboard import SummaryWriter

from torchdebug.figures import data_map_figure
from torchdebug.scores import FLAGS

__all__ = ["HISTOGRAM_COLUMNS", "log_actions", "log_epoch"]


HISTOGRAM_COLUMNS: dict[str, str] = {
    "confidence": "confidence",
    "aum": "aum",
    "loss": "loss_mean",
    "grad_norm": "grad_norm_mean",
    "mislabel_score": "mislabel_score",
}
"""Histogram tag suffix mapped to the report column it is drawn from."""


_COUNT_NAMES = (
    *(f"flags/{flag}" for flag in FLAGS),
    "flags/total",
    "forgetting_events_total",
    "never_learned",
)
_NEEDED_COLUMNS = ("flag", "forgetting_events", "first_learned_epoch", *HISTOGRAM_COLUMNS.values())


def log_epoch(
    writer: SummaryWriter,
    report: pd.DataFrame,
    step: int,
    *,
    prefix: str = "torchdebug",
    data_map: bool = True,
    scalars: bool = True,
) -> None:
    """Write flag counts, histograms and the data map of one epoch's report.

    Scalars, all under ``prefix``: ``flags/mislabeled``, ``flags/hard``,
    ``flags/ambiguous``, ``flags/total`` (samples with any flag), ``noise_rate_estimate``
    (fraction of samples flagged mislabeled), ``forgetting_events_total`` (summed only
    over samples that were learned at least once, since a never-learned sample's value
    is not a count of forgettings) and ``never_learned``. Histograms ``confidence``,
    ``aum``, ``loss``, ``grad_norm`` and ``mislabel_score`` use the finite values of
    their column and are skipped when there is none. The image ``data_map`` is the
    figure of :func:`torchdebug.figures.data_map_figure`.

    An empty report writes only the counts, all zero: no noise rate (it is undefined),
    no histograms and no data map. The writer is neither flushed nor closed, because
    its owner (for example Lightning's ``TensorBoardLogger``) manages it.

    Args:
        writer: Open writer, such as ``TensorBoardLogger(...).experiment``.
        report: Per-sample report, one row per sample.
        step: Global step to record the values at, usually the epoch.
        prefix: Tag prefix of everything written.
        data_map: Whether to render and write the data map, the slowest part.
        scalars: Whether to write the scalars and histograms (``False`` with ``data_map``
            writes only the figure).

    Raises:
        ValueError: If a column of the report is missing (the data map checks its own).

    Example:
        >>> writer = trainer.logger.experiment
        >>> log_epoch(writer, report, step=trainer.current_epoch)
    """
    prefix = prefix.rstrip("/")
    if scalars:
        _log_scalars(writer, report, step, prefix)
    if data_map and not report.empty:
        writer.add_figure(f"{prefix}/data_map", data_map_figure(report), step, close=True)


def log_actions(
    writer: SummaryWriter,
    report: pd.DataFrame,
    step: int,
    counter: str,
    *,
    noise_mask: np.ndarray | None = None,
    prefix: str = "torchdebug",
) -> None:
    """Write how many samples an action holds now (``actions/<counter>``, e.g.
    ``actions/dropped``), and with a known ``noise_mask`` the fraction of them whose label
    is really wrong (``actions/precision``).

    Args:
        writer: Open writer.
        report: Per-sample report with its ``action`` column filled.
        step: Global step, usually the epoch.
        counter: Scalar name: ``dropped``, ``reweighted``, ``relabelled`` (``dry_run_...``
            in a dry run).
        noise_mask: Boolean per sample id, True where the label is known to be wrong.
        prefix: Tag prefix.
    """
    prefix = prefix.rstrip("/")
    acted = (report["action"] != "").to_numpy() if not report.empty else np.zeros(0, bool)
    writer.add_scalar(f"{prefix}/actions/{counter}", int(acted.sum()), step)
    if noise_mask is not None and acted.any():
        ids = report["sample_id"].to_numpy()[acted]
        writer.add_scalar(f"{prefix}/actions/precision", float(noise_mask[ids].mean()), step)


def _log_scalars(writer: SummaryWriter, report: pd.DataFrame, step: int, prefix: str) -> None:
    for name, value in _counts(report).items():
        writer.add_scalar(f"{prefix}/{name}", value, step)
    if report.empty:
        return

    noise_rate = float((_flags(report) == "mislabeled").sum()) / len(report)
    writer.add_scalar(f"{prefix}/noise_rate_estimate", noise_rate, step)
    for name, column in HISTOGRAM_COLUMNS.items():
        values = pd.to_numeric(report[column], errors="coerce").to_numpy(
            dtype=np.float64, na_value=np.nan
        )
        # Non-finite values would break the bucketing, and NaN means "not measured".
        values = values[np.isfinite(values)]
        if values.size:
            writer.add_histogram(f"{prefix}/{name}", values, step)


def _counts(report: pd.DataFrame) -> dict[str, int]:
    """Count the flags, forgetting events and never-learned samples of a report."""
    # A report with no rows may also lack columns (nothing recorded yet), so it is not
    # looked into.
    if report.empty:
        return dict.fromkeys(_COUNT_NAMES, 0)
    missing = [c for c in _NEEDED_COLUMNS if c not in report.columns]
    if missing:
        raise ValueError(f"report is missing columns: {missing}")

    flags = _flags(report)
    counts = {f"flags/{flag}": int((flags == flag).sum()) for flag in FLAGS}
    counts["flags/total"] = int((flags != "").sum())
    learned = report["first_learned_epoch"].notna()
    counts["forgetting_events_total"] = int(report.loc[learned, "forgetting_events"].sum())
    counts["never_learned"] = int((~learned).sum())
    return counts


def _flags(report: pd.DataFrame) -> pd.Series:
    """Return the flag column with missing values read as "no flag"."""
    return report["flag"].fillna("").astype(str)
