"""The ``torchdebug`` command: a demo on real data; a finished run's summary, export and plot."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["DEMO_SETTINGS", "main", "top_flagged"]

_SUMMARY_COLUMNS = (
    "sample_id",
    "given_label",
    "suggested_label",
    "mislabel_score",
    "confidence",
    "aum",
    "forgetting_events",
    "flag",
)
# The flags of torchdebug.scores.FLAGS, written out so the CLI starts without importing it.
_FLAG_CHOICES = ("mislabeled", "hard", "ambiguous", "any")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``torchdebug`` command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.run(args) or 0)


def top_flagged(report: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """The ``k`` samples most likely mislabeled: by ``mislabel_score`` descending, ties by id."""
    return _by_score(report).head(k)


def _by_score(report: pd.DataFrame) -> pd.DataFrame:
    """The report by ``mislabel_score`` descending, ties by ``sample_id`` ascending."""
    return report.sort_values(["mislabel_score", "sample_id"], ascending=[False, True])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchdebug", description="Debug training data while a model trains."
    )
    commands = parser.add_subparsers(dest="command")

    demo = commands.add_parser(
        "demo", help="train a small model on real data with injected label noise"
    )
    demo.add_argument("--dataset", choices=("digits", "fashion-mnist"), default="digits")
    demo.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST idx files")
    demo.add_argument("--num-samples", type=int, default=None, help="seeded training subset")
    demo.add_argument("--noise-rate", type=float, default=0.2)
    demo.add_argument("--epochs", type=int, default=None)
    demo.add_argument("--batch-size", type=int, default=None)
    demo.add_argument("--workers", type=int, default=0)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--root", default="runs/demo", help="where logs and the report go")
    demo.add_argument("--top", type=int, default=10, help="rows of the flagged table")
    demo.set_defaults(run=_demo)

    summary = commands.add_parser("summary", help="print the top flagged samples of a run")
    summary.add_argument("run_dir", metavar="RUN", help="run log dir or samples.parquet")
    summary.add_argument("--top", type=int, default=20)
    summary.set_defaults(run=_summary)

    export = commands.add_parser("export", help="write a run's report as CSV, Parquet or JSONL")
    export.add_argument("run_dir", metavar="RUN", help="run log dir or samples.parquet")
    export.add_argument("--format", required=True, help="csv, parquet or jsonl")
    export.add_argument("-o", "--output", default=None, help="default: samples.<format>")
    export.add_argument("--flag", choices=_FLAG_CHOICES, default=None, help="keep only these")
    export.set_defaults(run=_export)

    plot = commands.add_parser("plot", help="draw a run's data map to a PNG")
    plot.add_argument("run_dir", metavar="RUN", help="run log dir or samples.parquet")
    plot.add_argument("-o", "--output", default="datamap.png")
    plot.set_defaults(run=_plot)
    return parser


# Defaults per dataset: epochs, batch size, model and image size, chosen so the demo
# finishes in well under three minutes on two CPU cores.
DEMO_SETTINGS = {
    "digits": {"epochs": 20, "batch_size": 32, "model": "cnn", "image_size": 8},
    "fashion-mnist": {"epochs": 8, "batch_size": 128, "model": "cnn", "image_size": 28},
}


def _demo(args: argparse.Namespace) -> int:
    import lightning as L
    from sklearn.metrics import roc_auc_score
    from torch.utils.data import DataLoader, TensorDataset

    from torchdebug import TrainingDynamics
    from torchdebug.data import (
        DIGITS_CLASSES,
        FASHION_MNIST_CLASSES,
        inject_label_noise,
        load_digits,
        load_fashion_mnist,
        seeded_subset,
    )
    from torchdebug.models import ImageClassifier

    # Keep the demo's output to what it shows; Lightning's banners add nothing here.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*val_dataloader.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    settings = DEMO_SETTINGS[args.dataset]
    epochs = args.epochs or settings["epochs"]
    batch_size = args.batch_size or settings["batch_size"]
    L.seed_everything(args.seed, verbose=False)
    if args.dataset == "digits":
        images, labels = load_digits()
    else:
        images, labels = load_fashion_mnist(args.data_dir, "train")
    images, labels = seeded_subset(images, labels, args.num_samples, args.seed)
    noisy, flipped = inject_label_noise(labels, args.noise_rate, 10, args.seed)
    print(
        f"torchdebug demo: {args.dataset}, {len(labels)} training samples, "
        f"{int(flipped.sum())} labels flipped ({args.noise_rate:.0%} symmetric noise), "
        f"{epochs} epochs"
    )

    loader = DataLoader(
        TensorDataset(images, noisy),
        batch_size=batch_size,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    model = ImageClassifier(settings["model"], image_size=settings["image_size"])
    class_names = DIGITS_CLASSES if args.dataset == "digits" else FASHION_MNIST_CLASSES
    # The demo knows which labels it flipped: TensorBoard gets a precision-recall curve.
    dynamics = TrainingDynamics(class_names=class_names, noise_mask=flipped)
    trainer = L.Trainer(
        max_epochs=epochs,
        default_root_dir=args.root,
        callbacks=[dynamics],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=10,
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - start

    report = dynamics.report()
    truth = flipped.numpy()[report["sample_id"].to_numpy()]
    flagged = (report["flag"] == "mislabeled").to_numpy()
    auroc = (
        roc_auc_score(truth, report["mislabel_score"]) if 0 < truth.sum() < len(truth) else np.nan
    )
    precision = truth[flagged].mean() if flagged.any() else np.nan
    recall = flagged[truth].mean() if truth.any() else np.nan

    print(f"\nTop {args.top} samples by mislabel_score (flipped = the demo's injected noise):")
    table = top_flagged(report, args.top).loc[:, list(_SUMMARY_COLUMNS)]
    table.insert(2, "true_label", labels.numpy()[table["sample_id"].to_numpy()])
    table["flipped"] = truth[table.index.to_numpy()]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nflags: {report['flag'].replace('', 'unflagged').value_counts().to_dict()}")
    print(
        f"against the injected flips: AUROC {auroc:.4f}, precision {precision:.3f}, "
        f"recall {recall:.3f} of the 'mislabeled' flag ({int(flagged.sum())} flagged, "
        f"{int(truth.sum())} flipped)"
    )
    print(f"trained in {seconds:.1f} s; report: {dynamics.report_path}")
    print(f"\nOpen the views with:\n  tensorboard --logdir {Path(trainer.log_dir or args.root)}")
    return 0


def _load(run_dir: str) -> pd.DataFrame | None:
    """The run's report, or ``None`` after saying on stderr why there is none."""
    from torchdebug.report import load_report

    try:
        return load_report(run_dir)
    except FileNotFoundError as err:
        print(f"torchdebug: {err}", file=sys.stderr)
        return None


def _summary(args: argparse.Namespace) -> int:
    report = _load(args.run_dir)
    if report is None:
        return 1
    counts = report["flag"].replace("", "unflagged").value_counts().to_dict()
    print(f"{len(report)} samples; flags: {counts}")
    table = top_flagged(report, args.top).loc[:, list(_SUMMARY_COLUMNS)]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


def _export(args: argparse.Namespace) -> int:
    write = _WRITERS.get(args.format)
    if write is None:
        print(
            f"torchdebug: unknown export format {args.format!r}; use one of {sorted(_WRITERS)}",
            file=sys.stderr,
        )
        return 1
    report = _load(args.run_dir)
    if report is None:
        return 1

    report = _by_score(report)
    if args.flag is not None:
        flags = report["flag"].fillna("")
        report = report[flags != ""] if args.flag == "any" else report[flags == args.flag]
    path = Path(args.output or f"samples.{args.format}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write(report, path)
    print(f"wrote {len(report)} row{'s' if len(report) != 1 else ''} to {path}")
    return 0


def _write_csv(report: pd.DataFrame, path: Path) -> None:
    # pandas writes a missing first_learned_epoch as an empty field.
    report.to_csv(path, index=False)


def _write_parquet(report: pd.DataFrame, path: Path) -> None:
    report.to_parquet(path, index=False)


def _write_jsonl(report: pd.DataFrame, path: Path) -> None:
    # Object columns hold Python ints and floats, which json can write; NA and NaN become None.
    records = report.astype(object).where(report.notna(), None).to_dict("records")
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


_WRITERS: dict[str, Callable[[pd.DataFrame, Path], None]] = {
    "csv": _write_csv,
    "parquet": _write_parquet,
    "jsonl": _write_jsonl,
}


def _plot(args: argparse.Namespace) -> int:
    from torchdebug.figures import FIGURE_DPI, data_map_figure

    report = _load(args.run_dir)
    if report is None:
        return 1
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_map_figure(report).savefig(path, dpi=FIGURE_DPI)
    print(f"wrote the data map of {len(report)} samples to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
