"""Train from a YAML config with LightningCLI; any model and data module by ``class_path``.

Run::

    python examples/cli.py fit --config configs/fashion_mnist.yaml
    python examples/cli.py fit --config configs/fashion_mnist.yaml --trainer.max_epochs 2
    python examples/cli.py fit --config configs/fashion_mnist.yaml --print_config

torchdebug appears only in the config, as one entry of ``trainer.callbacks``.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI


def main() -> None:
    # Subclass mode lets the config name the model and data module classes by class_path.
    LightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
    )


if __name__ == "__main__":
    main()
