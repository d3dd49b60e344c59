"""Find wrong labels in Fashion-MNIST while a small CNN trains on it.

An ordinary Lightning script with one torchdebug line added to the Trainer. Since the
example corrupts 20% of the labels itself, it can also say how many of them were found.

Run (about a minute on two CPU cores)::

    python examples/fashion_mnist.py
    python examples/fashion_mnist.py --data-dir path/to/fashion-mnist --epochs 8
    python examples/fashion_mnist.py --action drop   # also leave flagged samples out

The Fashion-MNIST idx files are read from ``--data-dir``, else ``$TORCHDEBUG_DATA_DIR``,
else where Debian's ``dataset-fashion-mnist`` package installs them.
"""

from __future__ import annotations

import argparse

import lightning as L
from sklearn.metrics import roc_auc_score

import torchdebug

# The model and the data stand in for your own; neither knows about torchdebug.
from torchdebug.data import NoisyImageDataModule
from torchdebug.models import ImageClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST idx files")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=10000)
    parser.add_argument("--noise-rate", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--root", default="runs/fashion_mnist")
    parser.add_argument(
        "--action",
        choices=["drop", "relabel"],
        default=None,
        help="act on the flagged samples after the warm-up (default: observe only)",
    )
    args = parser.parse_args()

    L.seed_everything(args.seed)
    datamodule = NoisyImageDataModule(
        dataset="fashion-mnist",
        data_dir=args.data_dir,
        num_samples=args.num_samples,
        noise_rate=args.noise_rate,
        seed=args.seed,
        num_workers=args.workers,
    )
    model = ImageClassifier("cnn", image_size=28)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        default_root_dir=args.root,
        callbacks=[torchdebug.TrainingDynamics(action=args.action)],  # the one added line
        log_every_n_steps=10,
    )
    trainer.fit(model, datamodule=datamodule)

    report = torchdebug.load_report(trainer.log_dir)
    top = report.sort_values("mislabel_score", ascending=False).head(10)
    columns = ["sample_id", "given_label", "suggested_label", "aum", "mislabel_score", "flag"]
    print("\nMost likely mislabeled samples:")
    print(top[columns].to_string(index=False))

    # The noise was injected by the data module, so the truth is known: score against it.
    truly_flipped = datamodule.flipped.numpy()[report["sample_id"].to_numpy()]
    flagged = (report["flag"] == "mislabeled").to_numpy()
    hits = int((flagged & truly_flipped).sum())
    precision = hits / max(int(flagged.sum()), 1)
    recall = hits / max(int(truly_flipped.sum()), 1)
    auroc = roc_auc_score(truly_flipped, report["mislabel_score"])
    print(f"\nAUROC of mislabel_score vs injected noise: {auroc:.3f}")
    print(
        f"flag == 'mislabeled': {int(flagged.sum())} flagged, precision {precision:.3f}, "
        f"recall {recall:.3f} ({int(truly_flipped.sum())} labels were flipped)"
    )
    if args.action:
        acted = (report["action"] == args.action).to_numpy()
        right = int((acted & truly_flipped).sum())
        print(f"action={args.action!r}: {int(acted.sum())} samples, {right} truly flipped")
    print(f"validation accuracy (clean labels): {float(trainer.callback_metrics['val_acc']):.3f}")
    print(f"\nExplore the run: tensorboard --logdir {trainer.log_dir}")


if __name__ == "__main__":
    main()
