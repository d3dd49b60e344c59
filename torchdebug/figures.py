"""Matplotlib figures drawn from the per-sample report.

Figures are built with matplotlib's object API on an explicit Agg canvas, never through
``pyplot``, so they can be made from any thread (for example inside a training loop) and
need no display.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

__all__ = ["FIGURE_DPI", "FIGURE_SIZE", "data_map_figure"]

FIGURE_SIZE: tuple[float, float] = (6.0, 5.0)
"""Size of the data map in inches; at ``FIGURE_DPI`` it renders to 600x500 pixels."""

FIGURE_DPI: int = 100
"""Resolution of the data map in dots per inch."""

_X_LABEL = "variability (std of p(given label))"
_Y_LABEL = "confidence (mean p(given label))"
_CMAP = "viridis"
# Variability is a std of a probability, so it never exceeds 0.5; the margin keeps
# points on the boundary visible.
_X_LIMITS = (-0.01, 0.51)
_Y_LIMITS = (0.0, 1.0)
_REQUIRED_COLUMNS = ("variability", "confidence", "correctness", "flag")

# Drawing order matters: later styles end up on top, and mislabeled is the one users
# most need to see.
_FLAG_STYLES: dict[str, dict[str, object]] = {
    "ambiguous": {"marker": "D", "color": "tab:purple", "edgecolors": "black", "s": 22},
    "hard": {"marker": "^", "color": "tab:orange", "edgecolors": "black", "s": 26},
    "mislabeled": {"marker": "x", "color": "red", "s": 28},
}
_UNKNOWN_FLAG_STYLE: dict[str, object] = {
    "marker": "*",
    "color": "tab:gray",
    "edgecolors": "black",
    "s": 30,
}


def data_map_figure(
    report: pd.DataFrame,
    *,
    title: str | None = None,
    max_points: int = 20000,
    seed: int = 0,
) -> Figure:
    """Draw the dataset-cartography data map of a per-sample report.

    Each sample is a point at (variability, confidence), coloured by correctness.
    Flagged samples are drawn on top with one marker per flag (mislabeled: red x,
    hard: triangle, ambiguous: diamond), and the legend gives the count of each flag.

    When the report has more than ``max_points`` rows, only a seeded random subsample of
    the unflagged samples is drawn, but every flagged sample is always drawn. The number
    of points drawn is therefore ``n_flagged + min(n_unflagged, max(max_points - n_flagged,
    0))``; it can exceed ``max_points`` only when the flagged samples alone do.

    Args:
        report: Per-sample report with at least the columns ``variability``,
            ``confidence``, ``correctness`` and ``flag``. It may be empty, with or
            without columns.
        title: Axes title. Defaults to ``"data map (N samples)"``.
        max_points: Budget of points to draw, so huge datasets stay fast to render.
        seed: Seed of the subsample of unflagged samples, so a run draws the same points
            every epoch.

    Returns:
        A 6x5 inch figure at 100 dpi (600x500 pixels) on an Agg canvas. An empty report
        gives the empty axes with the text "no samples recorded yet".

    Raises:
        ValueError: If a non-empty report lacks a required column or ``max_points`` is negative.

    Example:
        >>> fig = data_map_figure(report, title="epoch 3")
        >>> fig.savefig("data_map.png")
    """
    missing = [c for c in _REQUIRED_COLUMNS if c not in report.columns]
    # A report with no rows may also lack columns (nothing recorded yet); that is the
    # "empty" case, not an error.
    if missing and not report.empty:
        raise ValueError(f"report is missing columns: {missing}")
    if max_points < 0:
        raise ValueError(f"max_points must be >= 0, got {max_points}")

    # Fixed axes positions, not a layout engine: the layout pass would double the time
    # to render, and the figure is drawn during training.
    fig = Figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.12, 0.1, 0.7, 0.82))
    ax.set_xlabel(_X_LABEL)
    ax.set_ylabel(_Y_LABEL)
    ax.set_title(title if title is not None else f"data map ({len(report)} samples)")
    norm = Normalize(vmin=0.0, vmax=1.0)
    # The colorbar comes from a standalone mappable so the layout is the same with or
    # without points, which keeps TensorBoard's image slider steady across epochs.
    colorbar_axes = fig.add_axes((0.85, 0.1, 0.03, 0.82))
    fig.colorbar(ScalarMappable(norm=norm, cmap=_CMAP), cax=colorbar_axes, label="correctness")

    if report.empty:
        ax.text(
            0.5,
            0.5,
            "no samples recorded yet",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="gray",
        )
    else:
        _draw_points(ax, report, norm=norm, max_points=max_points, seed=seed)

    # Limits are set last because scatter autoscales the view.
    ax.set_xlim(*_X_LIMITS)
    ax.set_ylim(*_Y_LIMITS)
    return fig


def _draw_points(
    ax: Axes, report: pd.DataFrame, *, norm: Normalize, max_points: int, seed: int
) -> None:
    """Scatter the unflagged background, then each flag group on top of it."""
    # Missing values read as "no flag", the same as "".
    flags = report["flag"].fillna("").astype(str)
    flagged = flags != ""
    background = report.loc[~flagged]
    budget = max(max_points - int(flagged.sum()), 0)
    if len(background) > budget:
        rng = np.random.default_rng(seed)
        # Sorted so the drawing order stays the report's order.
        keep = np.sort(rng.choice(len(background), size=budget, replace=False))
        background = background.iloc[keep]
        ax.text(
            0.99,
            0.01,
            f"showing {budget} of {int((~flagged).sum())} unflagged samples",
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=7,
            color="gray",
        )
    if len(background):
        ax.scatter(
            background["variability"],
            background["confidence"],
            c=background["correctness"],
            cmap=_CMAP,
            norm=norm,
            s=8,
            alpha=0.6,
            linewidths=0,
        )

    known = [f for f in _FLAG_STYLES if (flags == f).any()]
    unknown = sorted(set(flags[flagged]) - set(_FLAG_STYLES))
    for flag in unknown + known:
        group = report.loc[flags == flag]
        style = _FLAG_STYLES.get(flag, _UNKNOWN_FLAG_STYLE)
        ax.scatter(
            group["variability"],
            group["confidence"],
            label=f"{flag} ({len(group)})",
            linewidths=0.8,
            zorder=3,
            **style,
        )
    if known or unknown:
        # Reversed so mislabeled, drawn last, is listed first. Upper right stays empty on
        # a data map (a high mean probability bounds its std), so nothing is hidden.
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles[::-1], labels[::-1], loc="upper right", fontsize=8, framealpha=0.8)
