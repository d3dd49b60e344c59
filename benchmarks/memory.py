"""Recorder state per tracked sample, and the cost of scoring at scale.

Run::

    python benchmarks/memory.py                    # 1M and 10M samples on the CPU
    python benchmarks/memory.py --sizes 1000000 --device cuda

For each size it builds a ``DynamicsRecorder`` (10 classes), feeds one epoch of synthetic
batches covering every sample, and measures: the bytes of recorder state on the device
per tracked sample (every tensor it holds, divided by the number of samples), the time of
``end_epoch()`` (folding the epoch into the aggregates) and of ``report()`` (copying to
host, scoring and building the per-sample table), and the peak resident memory of the
process. No training is involved. Writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from torchdebug import DynamicsRecorder

RESULTS = Path(__file__).parent / "results"


def measure(num_samples: int, device: str, batch_size: int, num_classes: int) -> dict:
    """Builds a recorder of ``num_samples``, feeds one epoch and times the epoch end."""
    recorder = DynamicsRecorder(num_samples, num_classes, device=device)
    state_bytes = sum(t.numel() * t.element_size() for t in recorder._state.values())
    generator = torch.Generator(device=device).manual_seed(0)

    start = time.perf_counter()
    for ids in torch.randperm(num_samples, device=device, generator=generator).split(batch_size):
        logits = torch.randn(len(ids), num_classes, device=device, generator=generator)
        targets = torch.randint(0, num_classes, (len(ids),), device=device, generator=generator)
        recorder.update(ids, logits, targets)
    _sync(device)
    update_seconds = time.perf_counter() - start

    start = time.perf_counter()
    recorder.end_epoch()
    _sync(device)
    end_epoch_seconds = time.perf_counter() - start

    start = time.perf_counter()
    report = recorder.report()
    report_seconds = time.perf_counter() - start
    assert len(report) == num_samples
    return {
        "samples": num_samples,
        "device": device,
        "classes": num_classes,
        "state_bytes": state_bytes,
        "state_bytes_per_sample": state_bytes / num_samples,
        "declared_bytes_per_sample": recorder.state_bytes_per_sample,
        # Whatever does not grow with the samples: the spare row that absorbs bad input
        # and the bad-input counters.
        "fixed_bytes": state_bytes - recorder.state_bytes_per_sample * num_samples,
        "update_seconds_per_epoch": update_seconds,
        "end_epoch_seconds": end_epoch_seconds,
        "report_seconds": report_seconds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=65536)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()

    rows = [measure(n, args.device, args.batch_size, args.classes) for n in args.sizes]
    print("| samples | bytes/sample | update s/epoch | end_epoch s | report s | peak RSS GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['samples']:,} | {r['state_bytes_per_sample']:.1f} | "
            f"{r['update_seconds_per_epoch']:.2f} | {r['end_epoch_seconds']:.2f} | "
            f"{r['report_seconds']:.2f} | {r['peak_rss_gib']:.2f} |"
        )
    if len(rows) > 1:
        # Bytes per extra tracked sample, from the two largest sizes.
        a, b = rows[-2], rows[-1]
        slope = (b["state_bytes"] - a["state_bytes"]) / (b["samples"] - a["samples"])
        print(f"marginal state per tracked sample: {slope:.3f} bytes")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
