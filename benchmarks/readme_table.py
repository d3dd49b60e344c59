"""Rewrites a generated table in the README between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` markers, so the README shows exactly what a benchmark measured.
Also quiets Lightning's per-fit chatter for the benchmarks that train many models."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def update_readme(name: str, table: str, readme: Path = README) -> None:
    """Replaces the text between the ``name`` markers of ``readme`` with ``table``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = readme.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{readme.name} has no {start} ... {end} markers for the table")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table}{end}{tail}")


def quiet_lightning() -> None:
    """Silences Lightning's per-fit info lines and the warnings a benchmark expects."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|val_dataloader|num_workers).*")
