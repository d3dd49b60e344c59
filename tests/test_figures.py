"""Tests of the data map figure, on synthetic per-sample reports."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.image import imread

from torchdebug.figures import data_map_figure

X_LABEL = "variability (std of p(given label))"
Y_LABEL = "confidence (mean p(given label))"


def make_report(seed: int = 0) -> pd.DataFrame:
    """Build a 500-row report: easy, hard, ambiguous and mislabeled clusters, shuffled."""
    rng = np.random.default_rng(seed)
    # flag, rows, then (low, high) of confidence, variability, correctness and aum.
    clusters = [
        ("", 340, (0.8, 0.99), (0.0, 0.1), (0.85, 1.0), (1.0, 5.0)),
        ("hard", 20, (0.2, 0.45), (0.02, 0.12), (0.1, 0.4), (-1.0, 0.5)),
        ("ambiguous", 40, (0.4, 0.6), (0.25, 0.35), (0.4, 0.7), (-0.5, 0.5)),
        ("", 50, (0.4, 0.6), (0.25, 0.35), (0.4, 0.7), (-0.5, 0.5)),
        ("mislabeled", 50, (0.01, 0.15), (0.01, 0.1), (0.0, 0.1), (-5.0, -1.0)),
    ]
    columns = ("confidence", "variability", "correctness", "aum")
    parts = [
        pd.DataFrame({c: rng.uniform(*r, n) for c, r in zip(columns, ranges, strict=True)}).assign(
            flag=flag
        )
        for flag, n, *ranges in clusters
    ]
    df = pd.concat(parts).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    n = len(df)
    first_learned = pd.Series(rng.integers(0, 4, n), dtype="Int64")
    first_learned[df["flag"] == "mislabeled"] = pd.NA
    return pd.DataFrame(
        {
            "sample_id": np.arange(n, dtype=np.int64),
            "given_label": rng.integers(0, 10, n),
            "predicted_label": rng.integers(0, 10, n),
            "suggested_label": rng.integers(0, 10, n),
            "epochs_seen": np.full(n, 8, dtype=np.int64),
            "loss_mean": -np.log(df["confidence"]),
            "confidence": df["confidence"],
            "variability": df["variability"],
            "correctness": df["correctness"],
            "forgetting_events": rng.integers(0, 3, n),
            "first_learned_epoch": first_learned,
            "aum": df["aum"],
            "grad_norm_mean": rng.uniform(0.0, np.sqrt(2.0), n),
            "mislabel_score": 1.0 - df["confidence"],
            "flag": df["flag"],
        }
    )


def _collections(fig: Figure) -> list[PathCollection]:
    return [c for c in fig.axes[0].collections if isinstance(c, PathCollection)]


def _plotted_points(fig: Figure) -> int:
    return sum(len(c.get_offsets()) for c in _collections(fig))


def _by_label(fig: Figure) -> dict[str, np.ndarray]:
    return {c.get_label(): np.asarray(c.get_offsets()) for c in _collections(fig)}


def _rows(df: pd.DataFrame) -> set[tuple[float, float]]:
    return set(zip(df["variability"].tolist(), df["confidence"].tolist(), strict=True))


def test_axes_labels_limits_and_size() -> None:
    fig = data_map_figure(make_report(), title="epoch 3")
    main, colorbar = fig.axes
    assert main.get_xlabel() == X_LABEL
    assert main.get_ylabel() == Y_LABEL
    assert main.get_title() == "epoch 3"
    x0, x1 = main.get_xlim()
    assert x0 < 0.0 and 0.5 < x1 <= 0.55
    assert main.get_ylim() == (0.0, 1.0)
    assert colorbar.get_ylabel() == "correctness"
    assert tuple(fig.get_size_inches() * fig.dpi) == (600.0, 500.0)


def test_default_title_counts_samples() -> None:
    assert data_map_figure(make_report()).axes[0].get_title() == "data map (500 samples)"


def test_every_sample_plotted_under_budget() -> None:
    report = make_report()
    fig = data_map_figure(report)
    assert _plotted_points(fig) == len(report)
    background = [c for c in _collections(fig) if c.get_label().startswith("_")]
    assert len(background) == 1
    unflagged = report[report["flag"] == ""]
    np.testing.assert_allclose(background[0].get_array(), unflagged["correctness"])


def test_legend_counts_each_flag() -> None:
    fig = data_map_figure(make_report())
    labels = {t.get_text() for t in fig.axes[0].get_legend().get_texts()}
    assert labels == {"mislabeled (50)", "hard (20)", "ambiguous (40)"}
    groups = _by_label(fig)
    assert len(groups["mislabeled (50)"]) == 50
    mislabeled = next(c for c in _collections(fig) if c.get_label() == "mislabeled (50)")
    assert tuple(mislabeled.get_edgecolor()[0][:3]) == (1.0, 0.0, 0.0)


@pytest.mark.parametrize("max_points", [300, 200, 111, 110, 50, 0])
def test_subsample_keeps_every_flagged_point(max_points: int) -> None:
    report = make_report()
    flagged = report[report["flag"] != ""]
    n_flagged = len(flagged)
    n_unflagged = len(report) - n_flagged
    fig = data_map_figure(report, max_points=max_points)
    expected = n_flagged + min(n_unflagged, max(max_points - n_flagged, 0))
    assert _plotted_points(fig) == expected
    notes = [t.get_text() for t in fig.axes[0].texts]
    if expected < len(report):
        assert notes == [f"showing {expected - n_flagged} of {n_unflagged} unflagged samples"]
    else:
        assert notes == []
    drawn = _by_label(fig)
    for flag in ("mislabeled", "hard", "ambiguous"):
        rows = flagged[flagged["flag"] == flag]
        offsets = drawn[f"{flag} ({len(rows)})"]
        assert set(map(tuple, offsets.tolist())) == _rows(rows)


def test_subsample_is_seeded() -> None:
    report = make_report()
    first = _by_label(data_map_figure(report, max_points=200, seed=1))
    again = _by_label(data_map_figure(report, max_points=200, seed=1))
    other = _by_label(data_map_figure(report, max_points=200, seed=2))
    background = next(k for k in first if k.startswith("_"))
    np.testing.assert_array_equal(first[background], again[background])
    assert not np.array_equal(first[background], other[background])


@pytest.mark.parametrize(
    "report",
    [make_report().iloc[:0], pd.DataFrame()],
    ids=["no-rows", "no-columns"],
)
def test_empty_report(report: pd.DataFrame, tmp_path: Path) -> None:
    fig = data_map_figure(report)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["no samples recorded yet"]
    assert _plotted_points(fig) == 0
    assert ax.get_ylim() == (0.0, 1.0)
    assert ax.get_xlabel() == X_LABEL
    fig.savefig(tmp_path / "empty.png")


def test_unknown_flag_is_drawn_and_never_subsampled() -> None:
    report = make_report()
    report.loc[report.index[:3], "flag"] = "duplicate"
    fig = data_map_figure(report, max_points=0)
    assert len(_by_label(fig)["duplicate (3)"]) == 3


def test_missing_flag_reads_as_unflagged() -> None:
    report = make_report()
    report["flag"] = report["flag"].replace("", None)
    fig = data_map_figure(report)
    assert _plotted_points(fig) == len(report)


def test_invalid_input_raises() -> None:
    with pytest.raises(ValueError, match="variability"):
        data_map_figure(make_report().drop(columns="variability"))
    with pytest.raises(ValueError, match="max_points"):
        data_map_figure(make_report(), max_points=-1)


def test_saved_png_is_valid_and_not_blank(tmp_path: Path) -> None:
    path = tmp_path / "data_map.png"
    data_map_figure(make_report()).savefig(path)
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(raw[16:20], "big") == 600
    assert int.from_bytes(raw[20:24], "big") == 500
    pixels = imread(path)
    assert pixels.shape[:2] == (500, 600)
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 100
    # Red crosses of the mislabeled samples made it to the image.
    red = (pixels[..., 0] > 0.9) & (pixels[..., 1] < 0.2) & (pixels[..., 2] < 0.2)
    assert red.sum() > 50


def test_figures_can_be_drawn_from_threads() -> None:
    report = make_report()

    def render(seed: int) -> tuple[int, int]:
        fig = data_map_figure(report, max_points=200, seed=seed)
        fig.canvas.draw()
        return fig.canvas.get_width_height()

    with ThreadPoolExecutor(max_workers=4) as pool:
        sizes = list(pool.map(render, range(4)))
    assert sizes == [(600, 500)] * 4
