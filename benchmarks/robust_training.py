"""Does acting on the dynamics train a better model on noisy labels? Test accuracy per arm.

Run::

    python benchmarks/robust_training.py            # 3 seeds, all arms (about 35 minutes
                                                    # on 2 CPU cores)
    python benchmarks/robust_training.py --readme   # also rewrite the README's table
    python benchmarks/robust_training.py --seeds 0 --noise symmetric   # a quick look
    python benchmarks/robust_training.py --warmups 1 3 5 10 --noise symmetric none \
        --arms "clean labels" "noisy, no action" drop --seeds 0 1 --name warmup --readme

The last command is how the default warm-up was chosen. Data: a fixed, seeded
3,000-sample subset of the Fashion-MNIST training split (the same subset for every seed),
trained for 40 epochs, long enough for the network to memorise wrong labels; accuracy on
the full, untouched 10,000-image test split. Noise
(``torchdebug.data.inject_label_noise``, drawn per seed): 40% symmetric, 20%
class-conditional (each class's flips go to the class a reference model confuses it with
most; the reference is the same network cross-fitted on the clean labels) and 0%.

Every arm trains the same network (the library's small CNN, Adam with a cosine learning
rate decay, batch 128) for the same epochs from the same seed, with ``TrainingDynamics``
attached (observing only in the first two arms):

- ``clean labels``: the labels before noise (the ceiling);
- ``noisy, no action``: the noisy labels;
- ``drop`` / ``reweight`` / ``relabel``: ``TrainingDynamics(action=...)`` with every other
  option at its default. The training step has the one changed line of ``reweight``
  (``weighted_loss``), which is exactly the plain mean whenever no weights apply.

The gap recovered by an action is ``(acc_action - acc_noisy) / (acc_clean - acc_noisy)``
on the seed means. Results go to ``benchmarks/results/robust_training.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from readme_table import quiet_lightning, update_readme
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from torchdebug import TrainingDynamics, weighted_loss
from torchdebug.callback import DEFAULT_WARMUP_EPOCHS
from torchdebug.data import inject_label_noise, load_fashion_mnist, seeded_subset
from torchdebug.models import ImageClassifier

RESULTS = Path(__file__).parent / "results"
ACTIONS = ("drop", "reweight", "relabel")
ARMS = ("clean labels", "noisy, no action", *ACTIONS)
NOISES = {"symmetric": 0.4, "class_conditional": 0.2, "none": 0.0}
BATCH_SIZE = 128


class Classifier(ImageClassifier):
    """The library's CNN with a cosine learning-rate decay and the reweighting line."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = weighted_loss(F.cross_entropy(self(x), y, reduction="none"), self)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": decay}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise", nargs="+", choices=list(NOISES), default=list(NOISES))
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument(
        "--warmups", type=int, nargs="+", default=None, help="default: the library's"
    )
    parser.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST files")
    parser.add_argument("--name", default="robust_training", help="results file name")
    parser.add_argument("--readme", action="store_true", help="rewrite the README table")
    args = parser.parse_args()
    quiet_lightning()

    images, labels = seeded_subset(*load_fashion_mnist(args.data_dir, "train"), args.samples, 0)
    test = load_fashion_mnist(args.data_dir, "test")
    reference = None
    if "class_conditional" in args.noise:
        reference = _reference_probs(images, labels)

    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        clean = None
        for noise in args.noise:
            rate = NOISES[noise]
            noisy = labels
            if rate > 0:
                noisy, _ = inject_label_noise(labels, rate, 10, seed, noise, reference)
            for arm in args.arms:
                action = None if arm in ARMS[:2] else arm
                for warmup in (args.warmups or [None]) if action else [None]:
                    if arm == "clean labels" or (arm == "noisy, no action" and rate == 0):
                        clean = clean or _fit(images, labels, test, seed, None, None, labels, args)
                        result = clean
                    else:
                        result = _fit(images, noisy, test, seed, action, warmup, labels, args)
                    runs.append({"seed": seed, "noise": noise, "rate": rate, "arm": arm, **result})
                    if action is not None and warmup is not None:
                        runs[-1]["warmup"] = warmup
                    print(_line(runs[-1]), flush=True)
                    payload = _save(runs, args)  # after every run: a long run keeps them

    table = warmup_markdown(payload) if args.warmups else markdown(payload)
    (RESULTS / f"{args.name}.md").write_text(table)
    print(table)
    if args.readme:
        update_readme("robust-warmup" if args.warmups else "robust-training", table)


def _fit(
    images: Tensor,
    labels: Tensor,
    test: tuple[Tensor, Tensor],
    seed: int,
    action: str | None,
    warmup: int | None,
    clean_labels: Tensor,
    args: argparse.Namespace,
) -> dict[str, Any]:
    options: dict[str, Any] = {"action": action}
    if warmup is not None:
        options["warmup_epochs"] = warmup
    dynamics = TrainingDynamics(tensorboard=False, write_report=False, **options)
    L.seed_everything(seed, verbose=False)
    model = Classifier("cnn", image_size=28)
    start = time.perf_counter()
    _fit_quietly(model, images, labels, args.epochs, [dynamics])
    seconds = time.perf_counter() - start

    result: dict[str, Any] = {"accuracy": _accuracy(model, *test), "seconds": seconds}
    if action is not None:
        report = dynamics.report()
        acted = report.loc[report["action"] == action, "sample_id"].to_numpy()
        clean = clean_labels.numpy()
        truth = labels.numpy() != clean
        result["acted"] = int(acted.size)
        result["acted_precision"] = float(truth[acted].mean()) if acted.size else None
        result["flipped_acted_on"] = float(truth[acted].sum() / max(truth.sum(), 1))
        if action == "relabel" and acted.size:
            suggested = report.set_index("sample_id").loc[acted, "suggested_label"]
            result["relabelled_right"] = float((suggested.to_numpy() == clean[acted]).mean())
    return result


def _fit_quietly(
    model: ImageClassifier, images: Tensor, labels: Tensor, epochs: int, callbacks: list
) -> None:
    """Fits with shuffled batches and no logger, checkpoint, progress bar or summary."""
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    loader = DataLoader(TensorDataset(images, labels), batch_size=BATCH_SIZE, shuffle=True)
    trainer.fit(model, loader)


@torch.no_grad()
def _accuracy(model: ImageClassifier, images: Tensor, labels: Tensor) -> float:
    model.eval()
    device = next(model.parameters()).device
    hits = sum(
        int((model(x.to(device)).argmax(1).cpu() == y).sum())
        for x, y in zip(images.split(2000), labels.split(2000), strict=True)
    )
    return 100.0 * hits / len(labels)


def _reference_probs(images: Tensor, labels: Tensor, epochs: int = 5) -> Tensor:
    """Out-of-sample probabilities of the same network on the clean labels (2-fold)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(100))
    probs = torch.zeros(len(labels), 10)
    for held_out in order.chunk(2):
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[held_out] = False
        L.seed_everything(100, verbose=False)
        model = ImageClassifier("cnn", image_size=28)
        _fit_quietly(model, images[keep], labels[keep], epochs, [])
        model.eval()
        with torch.no_grad():
            probs[held_out] = torch.softmax(model(images[held_out].to(model.device)), 1).cpu()
    return probs


def _save(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    payload = {
        "date": date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, {platform.system()}",
        "command": "python benchmarks/robust_training.py",
        "torch": torch.__version__,
        "samples": args.samples,
        "epochs": args.epochs,
        "batch_size": BATCH_SIZE,
        "warmup_epochs": args.warmups or DEFAULT_WARMUP_EPOCHS,
        "seeds": args.seeds,
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
    return payload


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per noise and arm: accuracy mean / std over seeds, seconds, gap recovered."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for noise in dict.fromkeys(run["noise"] for run in runs):
        rows: dict[str, dict[str, float]] = {}
        for arm in ARMS:
            found = [r for r in runs if r["noise"] == noise and r["arm"] == arm]
            if not found:
                continue
            acc = np.array([r["accuracy"] for r in found])
            baseline = {
                r["seed"]: r["seconds"]
                for r in runs
                if r["noise"] == noise and r["arm"] == "noisy, no action"
            }
            ratios = [r["seconds"] / baseline[r["seed"]] for r in found if r["seed"] in baseline]
            rows[arm] = {
                "mean": float(acc.mean()),
                "std": float(acc.std(ddof=1)) if acc.size > 1 else 0.0,
                "seconds": float(np.mean([r["seconds"] for r in found])),
                "time_ratio": float(np.mean(ratios)) if ratios else float("nan"),
                "seeds": int(acc.size),
            }
            precision = [r["acted_precision"] for r in found if r.get("acted_precision")]
            if "acted" in found[0]:
                rows[arm]["acted"] = float(np.mean([r["acted"] for r in found]))
                rows[arm]["acted_precision"] = float(np.mean(precision)) if precision else 0.0
        clean, noisy = rows.get("clean labels"), rows.get("noisy, no action")
        if clean and noisy:
            gap = clean["mean"] - noisy["mean"]
            for arm in ACTIONS:
                if arm in rows:
                    rows[arm]["change"] = rows[arm]["mean"] - noisy["mean"]
                    rows[arm]["recovered"] = rows[arm]["change"] / gap if gap > 0 else None
                    rows[arm]["cost_vs_clean"] = clean["mean"] - rows[arm]["mean"]
        table[noise] = rows
    return table


def markdown(payload: dict[str, Any]) -> str:
    """Test accuracy per noise setting and arm as a Markdown table."""
    summary = summarise(payload["runs"])
    seeds = ", ".join(str(s) for s in payload["seeds"])
    lines = [
        f"Measured {payload['date']} on {payload['machine']}, torch {payload['torch']}: "
        f"`{payload['command']}`. Fashion-MNIST, {payload['samples']:,}-sample training "
        f"subset, {payload['epochs']} epochs, batch {payload['batch_size']}, seeds {seeds}; "
        "test accuracy (%) on the 10,000 test images, mean ± standard deviation over seeds; "
        "in brackets the share of the clean-vs-noisy gap the action recovers (at 0% noise: "
        "the change against clean labels).",
        "",
        *_table(summary, payload["runs"], _accuracy_cell),
        "",
        "Samples acted on at the end (mean over seeds; in brackets the share whose label "
        "really was flipped) and training wall time as a ratio to the `noisy, no action` "
        "run of the same seed, trained in the same process just before (mean over seeds):",
        "",
        *_table(summary, payload["runs"], _cost_cell),
    ]
    return "\n".join(lines) + "\n"


def _table(
    summary: dict[str, dict[str, dict[str, float]]],
    runs: list[dict[str, Any]],
    cell: Callable[[dict[str, float], float], str],
) -> list[str]:
    """Markdown rows: one per noise setting, one ``cell(row, rate)`` per arm."""
    lines = ["| noise | " + " | ".join(ARMS) + " |", "|---|" + "---|" * len(ARMS)]
    for noise, rows in summary.items():
        rate = next(r["rate"] for r in runs if r["noise"] == noise)
        label = "none (0%)" if rate == 0 else f"{noise.replace('_', '-')} {rate:.0%}"
        cells = [cell(rows[arm], rate) if arm in rows else "" for arm in ARMS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _accuracy_cell(row: dict[str, float], rate: float) -> str:
    cell = f"{row['mean']:.2f} ± {row['std']:.2f}"
    if rate > 0 and row.get("recovered") is not None:
        cell += f" ({row['recovered']:+.0%})"
    elif rate == 0 and "cost_vs_clean" in row:
        cell += f" ({0.0 - row['cost_vs_clean']:+.2f} pt)"  # no "-0.00"
    return cell


def _cost_cell(row: dict[str, float], rate: float) -> str:
    if "acted" not in row:
        return f"{row['time_ratio']:.2f}x"
    share = f" ({row['acted_precision']:.0%})" if row["acted"] else ""
    return f"{row['acted']:.0f}{share}, {row['time_ratio']:.2f}x"


def warmup_markdown(payload: dict[str, Any]) -> str:
    """Test accuracy per noise setting: the two baselines, then each action per warm-up
    length (mean over seeds; in brackets the samples acted on at the end)."""
    runs = payload["runs"]
    seeds = ", ".join(str(s) for s in payload["seeds"])
    warmups = sorted({r["warmup"] for r in runs if "warmup" in r})
    actions = [a for a in ACTIONS if any(r["arm"] == a for r in runs)]
    columns = [(arm, None) for arm in ARMS[:2]]
    columns += [(a, w) for a in actions for w in warmups]
    lines = [
        f"Measured {payload['date']} on {payload['machine']}: the data, network and epochs "
        f"of the table above, seeds {seeds}; test accuracy (%), mean over seeds, and in "
        "brackets the samples acted on at the end.",
        "",
        "| noise | " + " | ".join(f"{a}, warm-up {w}" if w else a for a, w in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for noise in dict.fromkeys(r["noise"] for r in runs):
        cells = []
        for arm, warmup in columns:
            found = [
                r
                for r in runs
                if r["noise"] == noise and r["arm"] == arm and r.get("warmup") == warmup
            ]
            cell = f"{np.mean([r['accuracy'] for r in found]):.2f}" if found else ""
            if found and warmup is not None:
                cell += f" ({np.mean([r['acted'] for r in found]):.0f})"
            cells.append(cell)
        lines.append(f"| {noise.replace('_', '-')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _line(run: dict[str, Any]) -> str:
    extra = ""
    if "warmup" in run:
        extra += f" warm-up {run['warmup']}"
    if run.get("acted") is not None:
        extra += f" acted {run['acted']} precision {run['acted_precision']}"
    return (
        f"seed {run['seed']} {run['noise']} {run['rate']:.0%} {run['arm']}: "
        f"{run['accuracy']:.2f}% in {run['seconds']:.0f} s{extra}"
    )


if __name__ == "__main__":
    main()
