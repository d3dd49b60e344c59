"""Views for a person reviewing the flagged samples in TensorBoard.

Everything here writes under ``<prefix>/review/`` of a ``SummaryWriter``: image grids of
the top flagged samples with their labels, Markdown tables of the same rows, confidence
trajectories, precision-recall curves against a known noise mask, the custom-scalars
layout and the projector. The callback calls :func:`log_review` on rank zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

__all__ = [
    "GRID_COLUMNS",
    "TILE_PIXELS",
    "ConfidenceHistory",
    "default_to_image",
    "flagged_rows",
    "grid_shape",
    "log_custom_scalars",
    "log_projector",
    "log_review",
    "render_grid",
]

GRID_COLUMNS = 4
"""Tiles per row of an image grid."""

TILE_PIXELS = 160
"""Side of one tile's image in a grid, in pixels; its caption adds ``_CAPTION_PIXELS``."""

_FONT_PIXELS = 15
_LINE_PIXELS = 18
_CAPTION_PIXELS = 3 * _LINE_PIXELS + 4
# The table's columns: what a reviewer compares at a glance (the report has the rest).
_TABLE_COLUMNS = (
    "sample_id",
    "given_label",
    "suggested_label",
    "predicted_label",
    "mislabel_score",
    "aum",
    "confidence",
    "variability",
    "forgetting_events",
)
# Dynamics that place a sample in the projector; standardised before use.
_EMBEDDING_COLUMNS = (
    "confidence",
    "variability",
    "correctness",
    "aum",
    "loss_mean",
    "grad_norm_mean",
    "forgetting_events",
)
_PROJECTOR_SPRITE_LIMIT = 8192  # TensorBoard's projector refuses larger sprite images

ToImage = Callable[[Any], "np.ndarray | Tensor | None"]
# Reads (running mean confidence, epochs seen) of a list of sample ids.
Reader = Callable[[list[int]], tuple[np.ndarray, np.ndarray]]


def flagged_rows(report: pd.DataFrame, group: str, k: int) -> pd.DataFrame:
    """The ``k`` rows a reviewer should see first for one group of flags.

    ``group="mislabeled"``: samples flagged mislabeled by ``mislabel_score`` descending.
    ``group="hard"``: samples flagged hard or ambiguous by ``confidence`` ascending. Ties
    go to the smaller ``sample_id``.
    """
    if group == "mislabeled":
        rows = report[report["flag"] == "mislabeled"]
        return rows.sort_values(["mislabel_score", "sample_id"], ascending=[False, True]).head(k)
    rows = report[report["flag"].isin(("hard", "ambiguous"))]
    return rows.sort_values(["confidence", "sample_id"], ascending=[True, True]).head(k)


def grid_shape(tiles: int) -> tuple[int, int]:
    """Rows and columns of a grid of ``tiles`` tiles (at most ``GRID_COLUMNS`` a row)."""
    columns = min(max(tiles, 1), GRID_COLUMNS)
    return math.ceil(max(tiles, 1) / columns), columns


def default_to_image(sample_input: Any) -> np.ndarray | None:
    """Turns one input into an ``H x W x 3`` uint8 image, or ``None`` if it is not one.

    Accepted: tensors or arrays shaped ``[C, H, W]`` or ``[H, W, C]`` with 1 or 3
    channels, ``[H, W]``, or a flat vector of square length (a flattened grey image).
    Values are de-normalised per image by stretching its own min..max to 0..255, which
    undoes any mean/std normalisation up to contrast.
    """
    try:
        x = torch.as_tensor(sample_input).detach().to("cpu", torch.float32)
    except (TypeError, ValueError, RuntimeError):
        return None
    if x.ndim == 1:
        side = math.isqrt(x.numel())
        if side < 2 or side * side != x.numel():
            return None
        x = x.reshape(side, side)
    if x.ndim == 3 and x.shape[0] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.permute(1, 2, 0)
    elif x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3) or min(x.shape[:2]) < 2:
        return None
    x = torch.nan_to_num(x)
    low, high = x.min(), x.max()
    x = (x - low) / (high - low) if high > low else torch.zeros_like(x)
    x = x.expand(-1, -1, 3) if x.shape[-1] == 1 else x
    return (x * 255).round().to(torch.uint8).numpy()


def render_grid(images: Sequence[np.ndarray], captions: Sequence[Sequence[str]]) -> np.ndarray:
    """Tiles images, each with its caption lines beneath it, into one ``H x W x 3`` image.

    Every tile is scaled to ``TILE_PIXELS`` square (nearest neighbour, so small images
    stay crisp); the grid has :func:`grid_shape` rows and columns.
    """
    rows, columns = grid_shape(len(images))
    cell = TILE_PIXELS + _CAPTION_PIXELS
    canvas = Image.new("RGB", (columns * TILE_PIXELS, rows * cell), "white")
    draw = ImageDraw.Draw(canvas)
    font = _caption_font()
    for index, (image, lines) in enumerate(zip(images, captions, strict=True)):
        row, column = divmod(index, columns)
        left, top = column * TILE_PIXELS, row * cell
        tile = Image.fromarray(image).resize((TILE_PIXELS, TILE_PIXELS), Image.NEAREST)
        canvas.paste(tile, (left, top))
        for line_index, line in enumerate(lines[:3]):
            position = (left + 4, top + TILE_PIXELS + 2 + _LINE_PIXELS * line_index)
            draw.text(position, _fit(line, draw, font), fill="black", font=font)
    return np.asarray(canvas)


def _fit(text: str, draw: ImageDraw.ImageDraw, font: Any) -> str:
    """The text cut at its end to fit one tile's width; captions put the key facts first."""
    while text and draw.textlength(text, font=font) > TILE_PIXELS - 8:
        text = text[:-1]
    return text


def _caption_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at a readable size (its bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=_FONT_PIXELS)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


class ConfidenceHistory:
    """Per-epoch confidence of a small watched set of samples, for trajectory plots.

    The recorder keeps only running aggregates; the epoch's mean probability of a sample
    is recovered from the change of its running mean: with ``m`` before and ``m'`` after
    an epoch in which it was seen for the ``n'``-th time, ``p = m + n' (m' - m)``.
    Samples are watched from the epoch they first rank among the flagged, so a
    trajectory starts there; at most ``capacity`` samples are ever watched.
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self.ids: list[int] = []
        self.values: dict[int, dict[int, float]] = {}
        self._before: tuple[np.ndarray, np.ndarray] | None = None

    def watch(self, ids: Sequence[int], read: Reader, epoch: int) -> None:
        """Adds ids to the watched set, while there is room.

        A sample seen in exactly one epoch so far (this one) starts with that epoch's
        value, which is its running mean.
        """
        new = [int(i) for i in dict.fromkeys(ids) if int(i) not in self.values]
        new = new[: max(self.capacity - len(self.ids), 0)]
        if not new:
            return
        mean, seen = read(new)
        for i, sample_id in enumerate(new):
            self.ids.append(sample_id)
            self.values[sample_id] = {epoch: float(mean[i])} if seen[i] == 1 else {}

    def before_epoch_end(self, read: Reader) -> None:
        """Remembers the running mean and count of the watched samples."""
        self._before = read(self.ids) if self.ids else None

    def after_epoch_end(self, read: Reader, epoch: int) -> None:
        """Adds this epoch's confidence of every watched sample seen in it."""
        if self._before is None:
            return
        mean_before, seen_before = self._before
        ids = self.ids[: len(mean_before)]
        mean_after, seen_after = read(ids)
        for i, sample_id in enumerate(ids):
            if seen_after[i] > seen_before[i]:
                p = mean_before[i] + seen_after[i] * (mean_after[i] - mean_before[i])
                self.values[sample_id][epoch] = float(np.clip(p, 0.0, 1.0))
        self._before = None

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "ids": list(self.ids), "values": self.values}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity = int(state["capacity"])
        self.ids = [int(i) for i in state["ids"]]
        self.values = {
            int(sample_id): {int(epoch): float(p) for epoch, p in values.items()}
            for sample_id, values in state["values"].items()
        }


def trajectory_figure(history: ConfidenceHistory, rows: pd.DataFrame, title: str) -> Figure:
    """Confidence per epoch of the given report rows (those with a watched history)."""
    figure = Figure(figsize=(6.0, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.1, 0.12, 0.86, 0.8))  # fixed: a layout pass costs more
    for sample_id in rows["sample_id"].tolist():
        points = sorted(history.values.get(int(sample_id), {}).items())
        if points:
            epochs, values = zip(*points, strict=True)
            axes.plot(epochs, values, marker="o", markersize=3, label=f"#{sample_id}")
    axes.set_xlabel("epoch")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_ylabel("p(given label)")
    axes.set_ylim(0.0, 1.0)
    axes.set_title(title)
    if axes.lines:
        axes.legend(fontsize=6, ncol=2, loc="upper right")
    return figure


def log_custom_scalars(writer: SummaryWriter, prefix: str = "torchdebug") -> None:
    """Groups torchdebug's scalars in TensorBoard's Custom Scalars dashboard."""
    flags = [f"{prefix}/flags/{name}" for name in ("mislabeled", "hard", "ambiguous", "total")]
    writer.add_custom_scalars(
        {
            prefix: {
                "flagged samples": ["Multiline", flags],
                "estimated noise rate": ["Multiline", [f"{prefix}/noise_rate_estimate"]],
                "forgetting": [
                    "Multiline",
                    [f"{prefix}/forgetting_events_total", f"{prefix}/never_learned"],
                ],
            }
        }
    )


def log_review(
    writer: SummaryWriter,
    report: pd.DataFrame,
    step: int,
    *,
    top_k: int = 16,
    get_input: Callable[[int], Any] | None = None,
    to_image: ToImage = default_to_image,
    class_names: Sequence[str] | None = None,
    history: ConfidenceHistory | None = None,
    noise_mask: np.ndarray | None = None,
    prefix: str = "torchdebug",
) -> None:
    """Writes one epoch's review views under ``<prefix>/review/``.

    Tags: ``mislabeled_grid`` and ``hard_grid`` (images, only when ``get_input`` gives
    inputs that ``to_image`` turns into images), ``mislabeled_table`` and ``hard_table``
    (Markdown text, always), ``mislabeled_trajectories`` (figure, when ``history`` has
    values) and ``pr_mislabeled`` (a PR curve of ``mislabel_score``, when ``noise_mask``
    is given). A caption reads ``#id  aum ...`` then ``given: ...`` then ``suggested: ...``
    (for hard/ambiguous samples: the flag and confidence, given and predicted labels).

    Args:
        writer: Open writer (the ``TensorBoardLogger``'s experiment).
        report: The per-sample report.
        step: Step to log at, usually the epoch.
        top_k: Samples per grid, table and trajectory plot.
        get_input: ``get_input(sample_id)`` returning the sample's input.
        to_image: Turns an input into an ``H x W x 3`` uint8 image (or ``None``).
        class_names: Names of the classes, shown instead of indices.
        history: Confidence trajectories of watched samples.
        noise_mask: Boolean per sample id, True where the label is known to be wrong.
        prefix: Tag prefix.
    """
    tag = f"{prefix.rstrip('/')}/review"
    for group in ("mislabeled", "hard"):
        rows = flagged_rows(report, group, top_k)
        writer.add_text(f"{tag}/{group}_table", _markdown_table(rows, group, class_names), step)
        images = _images(rows, get_input, to_image)
        if images is not None and len(rows):
            captions = [_caption(row, group, class_names) for row in rows.itertuples()]
            grid = render_grid(images, captions)
            writer.add_image(f"{tag}/{group}_grid", grid, step, dataformats="HWC")
        if group == "mislabeled" and history is not None and history.values and len(rows):
            figure = trajectory_figure(history, rows, "confidence of the top flagged samples")
            writer.add_figure(f"{tag}/{group}_trajectories", figure, step, close=False)
    if noise_mask is not None and len(report):
        truth = np.asarray(noise_mask, dtype=bool)[report["sample_id"].to_numpy()]
        writer.add_pr_curve(
            f"{tag}/pr_mislabeled", truth, report["mislabel_score"].to_numpy(), step
        )


def log_projector(
    writer: SummaryWriter,
    report: pd.DataFrame,
    step: int,
    *,
    max_points: int = 2000,
    get_input: Callable[[int], Any] | None = None,
    to_image: ToImage = default_to_image,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    prefix: str = "torchdebug",
) -> pd.DataFrame:
    """Writes the samples to TensorBoard's projector; returns the rows it wrote.

    Each point is a sample placed by its standardised dynamics (confidence, variability,
    correctness, aum, loss, gradient norm, forgetting events), with metadata columns
    ``sample_id``, ``given``, ``suggested``, ``flag``, ``mislabel_score``, ``confidence``
    and ``aum``, and a thumbnail when the inputs are images. At most ``max_points``
    samples: every flagged sample first (by ``mislabel_score``, up to half the cap),
    then a seeded uniform sample of the rest. Thumbnails are shrunk so the sprite stays
    within TensorBoard's 8192-pixel limit.
    """
    rows = _projector_rows(report, max_points, seed)
    if rows.empty:
        return rows
    features = rows[list(_EMBEDDING_COLUMNS)].to_numpy(dtype=np.float64, na_value=0.0)
    spread = features.std(axis=0)
    features = (features - features.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    metadata = [
        [
            str(int(r.sample_id)),
            _label(r.given_label, class_names),
            _label(r.suggested_label, class_names),
            r.flag or "-",
            f"{r.mislabel_score:.4f}",
            f"{r.confidence:.4f}",
            f"{r.aum:.4f}",
        ]
        for r in rows.itertuples()
    ]
    header = ["sample_id", "given", "suggested", "flag", "mislabel_score", "confidence", "aum"]
    images = _images(rows, get_input, to_image)
    thumbnails = _thumbnails(images, len(rows)) if images is not None else None
    writer.add_embedding(
        torch.from_numpy(features.astype(np.float32)),
        metadata=metadata,
        label_img=thumbnails,
        global_step=step,
        tag=f"{prefix.rstrip('/')}_samples",
        metadata_header=header,
    )
    return rows


def _projector_rows(report: pd.DataFrame, max_points: int, seed: int) -> pd.DataFrame:
    flagged = report[report["flag"] != ""].sort_values(
        ["mislabel_score", "sample_id"], ascending=[False, True]
    )
    flagged = flagged.head(max_points // 2)
    rest = report.drop(flagged.index)
    room = max(max_points - len(flagged), 0)
    if len(rest) > room:
        rest = rest.sample(n=room, random_state=seed)
    return pd.concat([flagged, rest]).sort_values("sample_id")


def _thumbnails(images: list[np.ndarray], count: int) -> Tensor:
    per_row = math.ceil(math.sqrt(count))
    side = min(max(image.shape[0] for image in images), _PROJECTOR_SPRITE_LIMIT // per_row)
    if all(image.shape == images[0].shape for image in images):
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
        return torch.nn.functional.interpolate(batch, size=(side, side), mode="bilinear")
    tiles = [
        np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR)) for image in images
    ]
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255.0


def _images(
    rows: pd.DataFrame, get_input: Callable[[int], Any] | None, to_image: ToImage
) -> list[np.ndarray] | None:
    """Images of the rows' inputs, or None when any input is not an image."""
    if get_input is None:
        return None
    images = []
    for sample_id in rows["sample_id"].tolist():
        image = to_image(get_input(int(sample_id)))
        if image is None:
            return None
        images.append(np.asarray(image, dtype=np.uint8))
    return images


def _label(value: Any, class_names: Sequence[str] | None) -> str:
    index = int(value)
    if class_names is not None and 0 <= index < len(class_names):
        return str(class_names[index])
    return str(index)


def _caption(row: Any, group: str, class_names: Sequence[str] | None) -> list[str]:
    given = _label(row.given_label, class_names)
    # The score saturates at the top; the margin still tells the samples apart.
    if group == "mislabeled":
        return [
            f"#{row.sample_id}  aum {row.aum:.2f}",
            f"given: {given}",
            f"suggested: {_label(row.suggested_label, class_names)}",
        ]
    return [
        f"#{row.sample_id}  p={row.confidence:.2f}  {row.flag}",
        f"given: {given}",
        f"predicted: {_label(row.predicted_label, class_names)}",
    ]


def _markdown_table(rows: pd.DataFrame, group: str, class_names: Sequence[str] | None) -> str:
    title = "mislabeled" if group == "mislabeled" else "hard or ambiguous"
    if rows.empty:
        return f"No sample flagged {title}."
    columns = [c for c in _TABLE_COLUMNS if c in rows.columns] + ["flag"]
    lines = ["| rank | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for rank, row in enumerate(rows[columns].itertuples(index=False), start=1):
        cells = [_cell(name, value, class_names) for name, value in zip(columns, row, strict=True)]
        lines.append(f"| {rank} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(name: str, value: Any, class_names: Sequence[str] | None) -> str:
    if value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if name.endswith("_label"):
        return _label(value, class_names)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
