"""Step-time overhead of ``TrainingDynamics`` on a small CNN.

Run::

    python benchmarks/overhead.py --pairs 5
    python benchmarks/overhead.py --pairs 5 --epochs 1 --data-dir path/to/fashion-mnist

What it measures: the same training (``ImageClassifier("cnn")``, batch 128, on a 10k subset
of Fashion-MNIST when its files are found, else on scikit-learn's 1797 digits) run with and
without ``TrainingDynamics(tensorboard=False)`` in one process. Runs come in pairs, the
order inside a pair alternating (with/without, then without/with, ...), each run a fresh
model from the same seed, so drift of the machine (thermal, caches) hits both sides alike.
One short untimed run first pays the one-off costs (lazy imports, allocator warm-up).

Two times per run:

- step time: the sum over training batches of the time from the first
  ``on_train_batch_start`` to the last ``on_train_batch_end`` hook, i.e. forward,
  backward, optimizer step and every per-batch callback hook, without data loading or
  epoch-end work. The headline figure is the median over pairs of the ratio
  with/without.
- fit time: wall time of the whole ``trainer.fit``, which adds data loading and the
  callback's epoch-end work (scoring every sample and writing the Parquet report).

On a shared machine whose speed drifts during a run, two more figures hold up better: the
ratio of the median per-batch step times, and the hook share, the fraction of the step
time of a "with" run spent inside the callback's own per-batch hooks (measured in that
same run, so a slowdown scales both parts). The hook share leaves out the forward hooks
that catch the logits and the sampler wrapper that records ids (the latter runs during
data loading).

Validation is switched off, as it is the same on both sides. Torch keeps its default
number of threads. Prints a Markdown table and writes ``benchmarks/results/overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from torchdebug import TrainingDynamics
from torchdebug.data import NoisyImageDataModule
from torchdebug.models import ImageClassifier

RESULTS = Path(__file__).resolve().parent / "results" / "overhead.json"


class StepClock:
    """Sums per-batch step time; its two callbacks go first and last in ``callbacks``.

    Lightning calls a hook on the callbacks in list order, so the opener's batch start runs
    before any other callback's and the closer's batch end after all of theirs.
    """

    def __init__(self) -> None:
        self.batch_seconds: list[float] = []
        self._start = 0.0
        self.opener = _Opener(self)
        self.closer = _Closer(self)


class _Opener(Callback):
    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, *args: Any) -> None:
        self.clock._start = time.perf_counter()


class _Closer(Callback):
    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_end(self, *args: Any) -> None:
        self.clock.batch_seconds.append(time.perf_counter() - self.clock._start)


class TimedDynamics(TrainingDynamics):
    """``TrainingDynamics`` that also sums the time spent in its own per-batch hooks."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hook_seconds = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        start = time.perf_counter()
        super().on_train_batch_start(*args)
        self.hook_seconds += time.perf_counter() - start

    def on_train_batch_end(self, *args: Any) -> None:
        start = time.perf_counter()
        super().on_train_batch_end(*args)
        self.hook_seconds += time.perf_counter() - start


def run_once(
    datamodule: NoisyImageDataModule,
    image_size: int,
    epochs: int,
    seed: int,
    with_callback: bool,
    max_steps: int = -1,
) -> dict[str, float]:
    """Trains a fresh model once; returns its step, batch-median, fit and hook times."""
    L.seed_everything(seed, verbose=False)
    model = ImageClassifier("cnn", image_size=image_size)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as root:
        extra = [TimedDynamics(tensorboard=False, write_report=True)] if with_callback else []
        trainer = L.Trainer(
            max_epochs=epochs,
            max_steps=max_steps,
            accelerator="cpu",
            default_root_dir=root,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[clock.opener, *extra, clock.closer],
        )
        names = [type(c).__name__ for c in trainer.callbacks]
        # Lightning may reorder callbacks; the clock is only right if it wraps the others.
        assert names[0] == "_Opener" and names[-1] == "_Closer", names
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        fit_seconds = time.perf_counter() - start
        if with_callback:
            assert (Path(root) / "torchdebug" / "samples.parquet").is_file()
    return {
        "step_s": sum(clock.batch_seconds),
        "batch_median_s": statistics.median(clock.batch_seconds),
        "fit_s": fit_seconds,
        "hook_s": extra[0].hook_seconds if extra else 0.0,
        "batches": len(clock.batch_seconds),
    }


def make_datamodule(data_dir: str | None, seed: int) -> tuple[NoisyImageDataModule, int]:
    """Fashion-MNIST (10k subset) when its files are found, else digits; and the image size."""
    try:
        datamodule = NoisyImageDataModule(
            "fashion-mnist", data_dir=data_dir, num_samples=10000, seed=seed, batch_size=128
        )
        datamodule.setup("fit")
        return datamodule, 28
    except FileNotFoundError as err:
        print(f"Fashion-MNIST not found ({err.__class__.__name__}); using digits instead.")
        datamodule = NoisyImageDataModule("digits", seed=seed, batch_size=128)
        datamodule.setup("fit")
        return datamodule, 8


def main() -> None:
    parser = argparse.ArgumentParser(description="Step-time overhead of TrainingDynamics.")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST idx files")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning vs newer torch

    datamodule, image_size = make_datamodule(args.data_dir, args.seed)
    dataset = datamodule.hparams.dataset
    samples = len(datamodule.train_dataset)
    print(f"{dataset}: {samples} samples, {args.epochs} epoch(s), {args.pairs} pairs")
    run_once(datamodule, image_size, 1, args.seed, with_callback=True, max_steps=10)

    pairs = []
    for index in range(args.pairs):
        order = (True, False) if index % 2 == 0 else (False, True)
        runs = {}
        for with_callback in order:
            runs[with_callback] = run_once(
                datamodule, image_size, args.epochs, args.seed, with_callback
            )
        with_, without = runs[True], runs[False]
        pairs.append(
            {
                "order": "with, without" if order[0] else "without, with",
                "step_s_with": with_["step_s"],
                "step_s_without": without["step_s"],
                "step_ratio": with_["step_s"] / without["step_s"],
                "batch_median_ratio": with_["batch_median_s"] / without["batch_median_s"],
                "hook_s": with_["hook_s"],
                "hook_share": with_["hook_s"] / with_["step_s"],
                "fit_s_with": with_["fit_s"],
                "fit_s_without": without["fit_s"],
                "fit_ratio": with_["fit_s"] / without["fit_s"],
                "batches": with_["batches"],
            }
        )
        print(f"pair {index}: step ratio {pairs[-1]['step_ratio']:.3f}", flush=True)

    result = {
        "step_ratio_median": statistics.median(p["step_ratio"] for p in pairs),
        "fit_ratio_median": statistics.median(p["fit_ratio"] for p in pairs),
        "batch_median_ratio_median": statistics.median(p["batch_median_ratio"] for p in pairs),
        "hook_share_median": statistics.median(p["hook_share"] for p in pairs),
        "hook_ms_per_batch_median": statistics.median(
            1e3 * p["hook_s"] / p["batches"] for p in pairs
        ),
        "pairs": pairs,
        "dataset": dataset,
        "samples": samples,
        "epochs": args.epochs,
        "batch_size": 128,
        "model": "cnn",
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
    }
    print()
    print(markdown(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}")


def markdown(result: dict[str, Any]) -> str:
    """The per-pair table and the medians, as Markdown."""
    lines = [
        "| pair | order | step s with | step s without | step ratio | batch-median ratio "
        "| hook share | fit ratio |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for i, p in enumerate(result["pairs"]):
        lines.append(
            f"| {i} | {p['order']} | {p['step_s_with']:.2f} | {p['step_s_without']:.2f} "
            f"| {p['step_ratio']:.3f} | {p['batch_median_ratio']:.3f} "
            f"| {100 * p['hook_share']:.1f}% | {p['fit_ratio']:.3f} |"
        )
    lines += [
        "",
        f"**Median step-time ratio (with / without): {result['step_ratio_median']:.3f}**",
        f"Median whole-fit ratio (adds epoch-end scoring and report writing): "
        f"{result['fit_ratio_median']:.3f}",
        f"Median ratio of per-batch median step times: {result['batch_median_ratio_median']:.3f}",
        f"Median hook share of the step time: {100 * result['hook_share_median']:.1f}% "
        f"({result['hook_ms_per_batch_median']:.2f} ms per batch)",
        f"{result['dataset']}, {result['samples']} samples, {result['epochs']} epoch(s), "
        f"batch {result['batch_size']}, torch threads {result['torch_threads']} "
        f"(interop {result['torch_interop_threads']}), {result['cpu_count']} CPUs",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
