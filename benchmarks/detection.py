"""How well torchdebug finds injected label errors, side by side with cleanlab.

Run::

    python benchmarks/detection.py            # the full grid (about an hour on 2 cores)
    python benchmarks/detection.py --quick    # a reduced grid, under 10 minutes
    python benchmarks/detection.py --readme   # also rewrite the README's results table
                                              # (with --quick: the README's quick table)

For every setting (dataset x noise kind x noise rate) it trains the same model with the
same epochs and seed:

- once with ``TrainingDynamics``: torchdebug's ``mislabel_score`` and flag, each single
  score of its report, and cleanlab applied to that final model's in-sample
  probabilities (free: no extra training);
- K times for cleanlab's recommended use, K-fold cross-validation: each fold's model
  predicts the held-out fold, giving out-of-sample probabilities for every sample;
  cleanlab's ranking (``get_label_quality_scores``, self-confidence) and flags
  (``find_label_issues``) come from those.

Noise kinds (``torchdebug.data.inject_label_noise``): symmetric (uniform other class);
class-conditional (every flipped label of class j goes to the class a reference model
confuses with j most); instance-dependent (each flipped label goes to the wrong class the
reference model finds most likely for that sample). The reference model is the same
architecture trained on the clean labels with 2-fold cross-fitting (out-of-sample).

Metrics against the known flips: AUROC and average precision of each ranking, precision
at k (k = number of flips), precision / recall / F1 of each method's flags, training wall
time and training sample-epochs. Results go to ``benchmarks/results/detection.json`` and
``benchmarks/results/detection.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from readme_table import quiet_lightning, update_readme
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from torchdebug import TrainingDynamics
from torchdebug.cli import DEMO_SETTINGS
from torchdebug.data import inject_label_noise, load_digits, load_fashion_mnist, seeded_subset
from torchdebug.models import ImageClassifier

RESULTS = Path(__file__).parent / "results"

# Single report scores, with the sign that makes "higher = more likely mislabeled".
SINGLE_SCORES = {
    "confidence": -1,
    "aum": -1,
    "correctness": -1,
    "forgetting_events": 1,
    "loss_mean": 1,
    "grad_norm_mean": 1,
}


@dataclass
class Setting:
    dataset: str
    noise: str
    rate: float
    num_samples: int | None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced grid, < 10 minutes")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fashion-samples", type=int, default=10000)
    parser.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST files")
    parser.add_argument("--readme", action="store_true", help="rewrite the README table")
    args = parser.parse_args()
    quiet_lightning()

    settings = _grid(args)
    results, references = [], {}
    for setting in settings:
        images, labels = _load(setting, args)
        if setting.noise != "symmetric" and setting.dataset not in references:
            references[setting.dataset] = _reference_probs(images, labels, setting, args.seed)
        noisy, flipped = inject_label_noise(
            labels, setting.rate, 10, args.seed, setting.noise, references.get(setting.dataset)
        )
        result = _evaluate(setting, images, noisy, flipped.numpy(), args)
        results.append(result)
        print(_row_summary(result), flush=True)
        payload = _save(results, args)  # after every setting: a long run keeps its results

    table = markdown(payload)
    (RESULTS / f"{_name(args)}.md").write_text(table)
    print(table)
    if args.readme:
        update_readme("detection-quick" if args.quick else "detection", table)


def _save(results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    command = "python benchmarks/detection.py" + (" --quick" if args.quick else "")
    payload = {
        "date": date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, {platform.system()}",
        "command": command,
        "torch": torch.__version__,
        "folds": args.folds,
        "seed": args.seed,
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{_name(args)}.json").write_text(json.dumps(payload, indent=1))
    return payload


def _name(args: argparse.Namespace) -> str:
    return "detection_quick" if args.quick else "detection"


def _grid(args: argparse.Namespace) -> list[Setting]:
    if args.quick:
        return [
            Setting("digits", "symmetric", 0.2, None),
            Setting("digits", "class_conditional", 0.2, None),
            Setting("fashion-mnist", "symmetric", 0.2, 3000),
        ]
    return [
        Setting(dataset, noise, rate, args.fashion_samples if dataset != "digits" else None)
        for dataset in ("digits", "fashion-mnist")
        for noise in ("symmetric", "class_conditional", "instance")
        for rate in (0.2, 0.4)
    ]


def _load(setting: Setting, args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    if setting.dataset == "digits":
        images, labels = load_digits()
    else:
        images, labels = load_fashion_mnist(args.data_dir, "train")
    return seeded_subset(images, labels, setting.num_samples, args.seed)


def _train(
    images: Tensor, labels: Tensor, dataset: str, seed: int, callbacks: list | None = None
) -> tuple[ImageClassifier, float]:
    recipe = DEMO_SETTINGS[dataset]
    L.seed_everything(seed, verbose=False)
    loader = DataLoader(
        TensorDataset(images, labels), batch_size=recipe["batch_size"], shuffle=True
    )
    model = ImageClassifier(recipe["model"], image_size=recipe["image_size"])
    trainer = L.Trainer(
        max_epochs=recipe["epochs"],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks or [],
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    return model, time.perf_counter() - start


@torch.no_grad()
def _predict(model: ImageClassifier, images: Tensor) -> np.ndarray:
    model.eval()
    probs = [torch.softmax(model(batch), dim=1) for batch in images.split(1024)]
    return torch.cat(probs).numpy().astype(np.float64)


def _out_of_sample_probs(
    images: Tensor, labels: Tensor, dataset: str, folds: int, seed: int
) -> tuple[np.ndarray, float, int]:
    """K-fold cross-validated probabilities, the training seconds and sample-epochs."""
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    probs = np.zeros((n, 10))
    seconds, sample_epochs = 0.0, 0
    for held_out in order.chunk(folds):
        keep = torch.ones(n, dtype=torch.bool)
        keep[held_out] = False
        model, fit_seconds = _train(images[keep], labels[keep], dataset, seed)
        probs[held_out.numpy()] = _predict(model, images[held_out])
        seconds += fit_seconds
        sample_epochs += int(keep.sum()) * DEMO_SETTINGS[dataset]["epochs"]
    return probs, seconds, sample_epochs


def _reference_probs(images: Tensor, labels: Tensor, setting: Setting, seed: int) -> Tensor:
    probs, _, _ = _out_of_sample_probs(images, labels, setting.dataset, 2, seed + 100)
    return torch.from_numpy(probs)


def _evaluate(
    setting: Setting, images: Tensor, noisy: Tensor, truth: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    epochs = DEMO_SETTINGS[setting.dataset]["epochs"]
    labels = noisy.numpy()
    methods: dict[str, dict[str, float]] = {}

    dynamics = TrainingDynamics(tensorboard=False, write_report=False)
    model, seconds = _train(images, noisy, setting.dataset, args.seed, [dynamics])
    report = dynamics.report().set_index("sample_id").reindex(range(len(labels)))
    cost = {"seconds": seconds, "sample_epochs": len(labels) * epochs}
    flags = (report["flag"] == "mislabeled").to_numpy()
    methods["torchdebug"] = {**_metrics(truth, report["mislabel_score"], flags), **cost}
    for column, sign in SINGLE_SCORES.items():
        score = sign * report[column].to_numpy(dtype=np.float64)
        methods[f"torchdebug {column}"] = {**_metrics(truth, score), **cost}

    in_sample = _predict(model, images)
    methods["cleanlab in-sample"] = {**_cleanlab(labels, in_sample, truth), **cost}

    oos, cv_seconds, cv_sample_epochs = _out_of_sample_probs(
        images, noisy, setting.dataset, args.folds, args.seed
    )
    cv_cost = {"seconds": cv_seconds, "sample_epochs": cv_sample_epochs}
    methods[f"cleanlab {args.folds}-fold CV"] = {**_cleanlab(labels, oos, truth), **cv_cost}
    return {
        "dataset": setting.dataset,
        "noise": setting.noise,
        "rate": setting.rate,
        "samples": len(labels),
        "flipped": int(truth.sum()),
        "epochs": epochs,
        "methods": methods,
    }


def _cleanlab(labels: np.ndarray, probs: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    quality = get_label_quality_scores(labels, probs)  # lower = more likely an issue
    issues = find_label_issues(labels, probs)
    return _metrics(truth, 1.0 - quality, issues)


def _metrics(truth: np.ndarray, score: Any, flags: np.ndarray | None = None) -> dict[str, float]:
    score = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=-np.inf)
    k = int(truth.sum())
    top = np.argsort(-score, kind="stable")[:k]
    out = {
        "auroc": float(roc_auc_score(truth, score)),
        "ap": float(average_precision_score(truth, score)),
        "p_at_k": float(truth[top].mean()),
    }
    if flags is not None:
        hits = int((flags & truth).sum())
        precision = hits / max(int(flags.sum()), 1)
        recall = hits / max(k, 1)
        f1 = 2 * precision * recall / max(precision + recall, 1e-12)
        out.update(flagged=int(flags.sum()), precision=precision, recall=recall, f1=f1)
    return out


def markdown(payload: dict[str, Any]) -> str:
    """The results as a Markdown table (torchdebug against cleanlab per setting)."""
    lines = [
        f"Measured {payload['date']} on {payload['machine']}, torch {payload['torch']}, "
        f"seed {payload['seed']}: `{payload['command']}`.",
        "",
        "| dataset | noise | rate | method | AUROC | AP | P@k | flag P | flag R | flag F1 "
        "| train sample-epochs | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    shown = ("torchdebug", "cleanlab in-sample")
    for result in payload["results"]:
        cv = next(m for m in result["methods"] if m.endswith("-fold CV"))
        for name in (*shown, cv):
            m = result["methods"][name]
            flags = [f"{m[key]:.3f}" if key in m else "" for key in ("precision", "recall", "f1")]
            lines.append(
                f"| {result['dataset']} | {result['noise']} | {result['rate']:.0%} | {name} "
                f"| {m['auroc']:.4f} | {m['ap']:.3f} | {m['p_at_k']:.3f} | {' | '.join(flags)} "
                f"| {m['sample_epochs']:,} | {m['seconds']:.0f} |"
            )
    lines += [
        "",
        "AUROC of each single score of the report (sign chosen so higher = more suspect):",
        "",
        "| dataset | noise | rate | " + " | ".join(SINGLE_SCORES) + " |",
        "|---|---|---|" + "---|" * len(SINGLE_SCORES),
    ]
    for result in payload["results"]:
        aurocs = [
            f"{result['methods'][f'torchdebug {name}']['auroc']:.4f}" for name in SINGLE_SCORES
        ]
        lines.append(
            f"| {result['dataset']} | {result['noise']} | {result['rate']:.0%} | "
            + " | ".join(aurocs)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _row_summary(result: dict[str, Any]) -> str:
    m = result["methods"]
    cv = next(name for name in m if name.endswith("-fold CV"))
    return (
        f"{result['dataset']} {result['noise']} {result['rate']:.0%}: torchdebug AUROC "
        f"{m['torchdebug']['auroc']:.4f} F1 {m['torchdebug']['f1']:.3f} | {cv} AUROC "
        f"{m[cv]['auroc']:.4f} F1 {m[cv]['f1']:.3f}"
    )


if __name__ == "__main__":
    main()
