"""Step-time overhead of ``TrainingDynamics`` on a small CNN.

Run::

    python benchmarks/overhead.py --pairs 5 --readme
    python benchmarks/overhead.py --pairs 5 --epochs 1 --data-dir path/to/fashion-mnist

What it measures: the same training (``ImageClassifier("cnn")``, batch 128, on a 10k subset
of Fashion-MNIST when its files are found, else on scikit-learn's 1797 digits) run without
the callback and with it under each recording option, in one process:

- ``logits``: ``TrainingDynamics(tensorboard=False, write_report=False)``, recording only,
  with the default ``grad_norm="logits"``;
- ``last_layer``, ``full``: the same with ``grad_norm="last_layer"`` / ``"full"``, the exact
  per-sample gradient norm over the final layer / every supported layer;
- ``vmap``: the anchor, ``logits`` recording plus the naive way to get per-sample gradient
  norms over all parameters: ``torch.func.vmap`` of ``torch.func.grad`` on every batch (a
  second forward and backward, vectorised over the samples);
- ``report``: ``TrainingDynamics(tensorboard=False)``, plus the Parquet report each epoch;
- ``default``: ``TrainingDynamics()`` as a user adds it, with the report and the TensorBoard
  views (both sides of this pair log to a ``TensorBoardLogger``).

Runs come in rounds: in each round every option is paired with its own run without the
callback, the order inside a pair alternating from round to round, each run a fresh model
from the same seed, so drift of the machine (thermal, caches) hits both sides alike. One
short untimed run first pays the one-off costs (lazy imports, allocator warm-up).

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
that catch the logits and layer inputs, the gradient hooks of ``grad_norm="full"``, the
sampler wrapper that records ids (it runs during data loading) and, for ``vmap``, the
anchor's own work.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` of each run, for the run with the
callback and the one without. On the CPU, the peak resident set size (``VmHWM``, reset
after the data is loaded) of a fresh process per option that trains 30 steps, and of one
more without the callback: the allocator hands large blocks back between steps, so a sample
at batch end would miss a step's own peak. The table gives the peak and its excess over
the process without the callback (single processes: about +-30 MiB of noise).

Validation is switched off, as it is the same on both sides. Torch keeps its default
number of threads. Prints a Markdown table and writes ``benchmarks/results/overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from readme_table import update_readme
from torch.func import functional_call, grad, vmap

from torchdebug import TrainingDynamics
from torchdebug.data import NoisyImageDataModule
from torchdebug.models import ImageClassifier

RESULTS = Path(__file__).resolve().parent / "results" / "overhead.json"

_RECORD = {"tensorboard": False, "write_report": False}
# Option -> TrainingDynamics arguments, whether the Trainer has a TensorBoardLogger, and
# whether the torch.func anchor runs too.
OPTIONS: dict[str, tuple[dict[str, Any], bool, bool]] = {
    "logits": (_RECORD, False, False),
    "last_layer": ({**_RECORD, "grad_norm": "last_layer"}, False, False),
    "full": ({**_RECORD, "grad_norm": "full"}, False, False),
    "vmap": (_RECORD, False, True),
    "report": ({"tensorboard": False}, False, False),
    "default": ({}, True, False),
}
PEAK_STEPS = 30


class StepClock:
    """Sums per-batch step time and samples peak memory; goes first and last in ``callbacks``.

    Lightning calls a hook on the callbacks in list order, so the opener's batch start runs
    before any other callback's and the closer's batch end after all of theirs.
    """

    def __init__(self) -> None:
        self.batch_seconds: list[float] = []
        self.peak_rss = 0
        self._start = 0.0
        self.opener = _Opener(self)
        self.closer = _Closer(self)

    def sample_memory(self) -> None:
        self.peak_rss = max(self.peak_rss, resident_bytes())


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
        self.clock.sample_memory()

    def on_train_epoch_end(self, *args: Any) -> None:
        self.clock.sample_memory()  # after the callback's epoch-end scoring and writing


class TimedDynamics(TrainingDynamics):
    """``TrainingDynamics`` that also sums the time spent in its own per-batch hooks
    (batch start and end, and after backward, where ``grad_norm="full"`` does its work)."""

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

    def on_after_backward(self, *args: Any) -> None:
        start = time.perf_counter()
        super().on_after_backward(*args)
        self.hook_seconds += time.perf_counter() - start


class VmapGradNorms(Callback):
    """The anchor: per-sample gradients of every parameter with ``torch.func`` (its own
    forward and backward, vectorised over the batch), reduced to their norms."""

    def __init__(self) -> None:
        self.norms: torch.Tensor | None = None

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        x, y = batch
        net = pl_module.model
        params = {n: p.detach() for n, p in net.named_parameters()}
        buffers = dict(net.named_buffers())

        def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> Any:
            logits = functional_call(net, (p, buffers), (xi.unsqueeze(0),))
            return F.cross_entropy(logits, yi.unsqueeze(0))

        net.eval()  # batch norm on its running statistics: vmap cannot update them
        try:
            grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
        finally:
            net.train()
        self.norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in grads.values()))


def resident_bytes() -> int:
    """Current resident set size of this process, in bytes (0 where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def run_once(
    datamodule: NoisyImageDataModule,
    image_size: int,
    epochs: int,
    seed: int,
    option: str,
    with_callback: bool,
    max_steps: int = -1,
) -> dict[str, float]:
    """Trains a fresh model once; returns its step, batch-median, fit and hook times and
    its peak memory. ``option`` picks the callback arguments and whether a logger is on."""
    L.seed_everything(seed, verbose=False)
    model = ImageClassifier("cnn", image_size=image_size)
    clock = StepClock()
    kwargs, with_logger, anchor = OPTIONS[option]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as root:
        extra: list[Callback] = [TimedDynamics(**kwargs)] if with_callback else []
        if with_callback and anchor:
            extra.append(VmapGradNorms())
        trainer = L.Trainer(
            max_epochs=epochs,
            max_steps=max_steps,
            default_root_dir=root,
            logger=TensorBoardLogger(root, name="", version="") if with_logger else False,
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
        if with_callback and kwargs.get("write_report", True):
            assert (Path(root) / "torchdebug" / "samples.parquet").is_file()
    return {
        "step_s": sum(clock.batch_seconds),
        "batch_median_s": statistics.median(clock.batch_seconds),
        "fit_s": fit_seconds,
        "hook_s": extra[0].hook_seconds if extra else 0.0,  # type: ignore[attr-defined]
        "batches": len(clock.batch_seconds),
        "peak_bytes": torch.cuda.max_memory_allocated() if cuda else clock.peak_rss,
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


def measure_pair(
    datamodule: NoisyImageDataModule,
    image_size: int,
    args: argparse.Namespace,
    option: str,
    callback_first: bool,
) -> dict[str, Any]:
    """One run with the callback under ``option`` and one without, in the given order."""
    runs = {}
    for with_callback in (callback_first, not callback_first):
        runs[with_callback] = run_once(
            datamodule, image_size, args.epochs, args.seed, option, with_callback
        )
    with_, without = runs[True], runs[False]
    return {
        "option": option,
        "order": "with, without" if callback_first else "without, with",
        "step_s_with": with_["step_s"],
        "step_s_without": without["step_s"],
        "step_ratio": with_["step_s"] / without["step_s"],
        "batch_median_ratio": with_["batch_median_s"] / without["batch_median_s"],
        "hook_s": with_["hook_s"],
        "hook_share": with_["hook_s"] / with_["step_s"],
        "fit_s_with": with_["fit_s"],
        "fit_s_without": without["fit_s"],
        "fit_ratio": with_["fit_s"] / without["fit_s"],
        "peak_bytes_with": with_["peak_bytes"],
        "peak_bytes_without": without["peak_bytes"],
        "batches": with_["batches"],
    }


def summarise(pairs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over the pairs of one option."""

    def median(key: str) -> float:
        return statistics.median(p[key] for p in pairs)

    return {
        "step_ratio_median": median("step_ratio"),
        "fit_ratio_median": median("fit_ratio"),
        "batch_median_ratio_median": median("batch_median_ratio"),
        "hook_share_median": median("hook_share"),
        "hook_ms_per_batch_median": statistics.median(
            1e3 * p["hook_s"] / p["batches"] for p in pairs
        ),
        "peak_bytes_with_max": max(p["peak_bytes_with"] for p in pairs),
        "peak_bytes_without_max": max(p["peak_bytes_without"] for p in pairs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Step-time overhead of TrainingDynamics.")
    parser.add_argument("--pairs", type=int, default=5, help="rounds (pairs per option)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS))
    parser.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST idx files")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--readme", action="store_true", help="rewrite the README table")
    parser.add_argument("--peak-of", choices=[*OPTIONS, "none"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning vs newer torch

    datamodule, image_size = make_datamodule(args.data_dir, args.seed)
    if args.peak_of:  # a fresh process measuring one option's peak resident set size
        option = args.peak_of if args.peak_of != "none" else "logits"
        reset_peak_resident()  # the data loading's peak is the same for every option
        run_once(
            datamodule,
            image_size,
            1,
            args.seed,
            option,
            args.peak_of != "none",
            max_steps=PEAK_STEPS,
        )
        print(json.dumps({"peak_bytes": peak_resident()}))
        return
    dataset = datamodule.hparams.dataset
    samples = len(datamodule.train_dataset)
    print(f"{dataset}: {samples} samples, {args.epochs} epoch(s), {args.pairs} rounds")
    for option in args.options:
        run_once(datamodule, image_size, 1, args.seed, option, True, max_steps=10)

    pairs: list[dict[str, Any]] = []
    for index in range(args.pairs):
        for position, option in enumerate(args.options):
            callback_first = (index + position) % 2 == 0
            pairs.append(measure_pair(datamodule, image_size, args, option, callback_first))
            print(f"round {index} {option}: step ratio {pairs[-1]['step_ratio']:.3f}", flush=True)

    summaries = {o: summarise([p for p in pairs if p["option"] == o]) for o in args.options}
    if not torch.cuda.is_available():
        alone = fresh_process_peak("none", args)
        for option, summary in summaries.items():
            summary["peak_bytes_with_max"] = fresh_process_peak(option, args)
            summary["peak_bytes_without_max"] = alone
    result = {
        "options": {
            option: {
                "callback": f"TrainingDynamics({_kwargs_text(OPTIONS[option][0])})"
                + (" + torch.func.vmap per-sample gradients" if OPTIONS[option][2] else ""),
                "tensorboard_logger": OPTIONS[option][1],
                **summaries[option],
            }
            for option in args.options
        },
        "pairs": pairs,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "peak_memory": "torch.cuda.max_memory_allocated, the largest over the pairs"
        if torch.cuda.is_available()
        else f"peak resident set size of a fresh process training {PEAK_STEPS} steps",
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
        "command": "python benchmarks/overhead.py --pairs " + str(args.pairs),
    }
    table = markdown(result)
    print()
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    if args.readme:
        update_readme("overhead", table + "\n")


def reset_peak_resident() -> None:
    """Restarts this process's peak resident set size from its current size (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_resident() -> int:
    """Peak resident set size since the last reset, in bytes (``VmHWM``; Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fresh_process_peak(option: str, args: argparse.Namespace) -> int:
    """Peak resident set size of a new Python process that trains ``option`` briefly."""
    command = [sys.executable, __file__, "--peak-of", option, "--seed", str(args.seed)]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"])


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in kwargs.items())


def markdown(result: dict[str, Any]) -> str:
    """One row per recording option (medians over its pairs), as Markdown."""
    lines = [
        "| option | callback | step ratio | batch-median ratio | hook share | fit ratio "
        "| peak memory | over no callback |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for option, s in result["options"].items():
        logger = " + TensorBoardLogger" if s["tensorboard_logger"] else ""
        lines.append(
            f"| {option} | `{s['callback']}`{logger} | {s['step_ratio_median']:.3f} "
            f"| {s['batch_median_ratio_median']:.3f} | {100 * s['hook_share_median']:.1f}% "
            f"({s['hook_ms_per_batch_median']:.2f} ms) | {s['fit_ratio_median']:.3f} "
            f"| {s['peak_bytes_with_max'] / 2**20:.0f} MiB "
            f"| {(s['peak_bytes_with_max'] - s['peak_bytes_without_max']) / 2**20:+.0f} MiB |"
        )
    lines += [
        "",
        f"Medians over {len(result['pairs']) // max(len(result['options']), 1)} pairs per "
        f"option; peak memory is the {result['peak_memory']} ({result['device']}). "
        f"{result['dataset']}, {result['samples']} samples, "
        f"{result['epochs']} epoch(s), batch {result['batch_size']}, torch threads "
        f"{result['torch_threads']} (interop {result['torch_interop_threads']}), "
        f"{result['cpu_count']} CPUs: `{result['command']}`.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
