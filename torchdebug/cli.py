"""The ``torchdebug`` command: a demo on real data, and a summary of a finished run."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Sequence
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
    ordered = report.sort_values(["mislabel_score", "sample_id"], ascending=[False, True])
    return ordered.head(k)


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
    from torchdebug.data import inject_label_noise, load_digits, load_fashion_mnist, seeded_subset
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
    dynamics = TrainingDynamics()
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


def _summary(args: argparse.Namespace) -> int:
    from torchdebug.report import load_report

    try:
        report = load_report(args.run_dir)
    except FileNotFoundError as err:
        print(f"torchdebug: {err}", file=sys.stderr)
        return 1
    counts = report["flag"].replace("", "unflagged").value_counts().to_dict()
    print(f"{len(report)} samples; flags: {counts}")
    table = top_flagged(report, args.top).loc[:, list(_SUMMARY_COLUMNS)]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
