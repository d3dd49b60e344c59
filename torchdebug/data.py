"""Real datasets and controlled label noise for the demo, examples and benchmarks.

Everything here works offline: scikit-learn ships the digits data, and Fashion-MNIST is read
from the four idx files of the official release (Debian packages them as
``dataset-fashion-mnist``).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "DIGITS_CLASSES",
    "FASHION_MNIST_CLASSES",
    "NoisyImageDataModule",
    "confusable_classes",
    "inject_label_noise",
    "load_digits",
    "load_fashion_mnist",
    "seeded_subset",
]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGITS_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))

_DATA_DIR_ENV = "TORCHDEBUG_DATA_DIR"
_DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
# Type codes of the idx format (third byte of the magic number).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def load_digits(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Load scikit-learn's handwritten digits (1797 8x8 images, bundled, no download).

    Args:
        dtype: Floating dtype of the returned images.

    Returns:
        ``(images, labels)``: images ``[1797, 1, 8, 8]`` scaled to [0, 1], labels int64 ``[1797]``
        with values 0..9.

    Example:
        >>> images, labels = load_digits()
        >>> images.shape, labels.shape
        (torch.Size([1797, 1, 8, 8]), torch.Size([1797]))
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    # sklearn stores pixel intensities as 0..16.
    images = torch.as_tensor(bunch.images, dtype=dtype).unsqueeze(1) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images, labels


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    split: Literal["train", "test"] = "train",
) -> tuple[Tensor, Tensor]:
    """Load Fashion-MNIST from the idx files of the official release.

    Each file may be gzipped (``train-images-idx3-ubyte.gz``) or plain
    (``train-images-idx3-ubyte``); the test split uses the ``t10k-`` prefix.

    Args:
        data_dir: Folder holding the idx files. ``None`` means the ``TORCHDEBUG_DATA_DIR``
            environment variable, or Debian's ``/usr/share/datasets/fashion-mnist`` when unset.
        split: ``"train"`` (60000 samples) or ``"test"`` (10000 samples).

    Returns:
        ``(images, labels)``: images float32 ``[N, 1, 28, 28]`` in [0, 1], labels int64 ``[N]``.

    Raises:
        FileNotFoundError: If the images or labels file of the split is missing.
        ValueError: If ``split`` is unknown, or a file is corrupt (bad magic number, wrong size,
            images and labels disagree on the sample count).

    Example:
        >>> images, labels = load_fashion_mnist(split="test")
        >>> images.shape
        torch.Size([10000, 1, 28, 28])
    """
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder, origin = _resolve_data_dir(data_dir)
    prefix = _SPLIT_PREFIX[split]
    images_path = _find_idx_file(folder, f"{prefix}-images-idx3-ubyte", origin)
    labels_path = _find_idx_file(folder, f"{prefix}-labels-idx1-ubyte", origin)

    raw_images = _read_idx(images_path, ndim=3)
    raw_labels = _read_idx(labels_path, ndim=1)
    if raw_images.shape[0] != raw_labels.shape[0]:
        raise ValueError(
            f"{images_path} holds {raw_images.shape[0]} images but {labels_path} holds "
            f"{raw_labels.shape[0]} labels"
        )
    images = torch.from_numpy(raw_images.astype(np.float32)).unsqueeze(1).div_(255.0)
    labels = torch.from_numpy(raw_labels.astype(np.int64))
    return images, labels


def seeded_subset(
    images: Tensor, labels: Tensor, size: int | None, seed: int
) -> tuple[Tensor, Tensor]:
    """Draw a reproducible random subset without replacement.

    Args:
        images: Samples, first dimension is the sample axis.
        labels: Labels ``[N]`` aligned with ``images``.
        size: Number of samples to keep; ``None`` or ``>= N`` keeps all of them (unshuffled).
        seed: Seed of the draw; the same seed gives the same subset.

    Returns:
        ``(images_subset, labels_subset)``.

    Raises:
        ValueError: If ``images`` and ``labels`` differ in length or ``size`` is negative.

    Example:
        >>> x, y = load_digits()
        >>> xs, ys = seeded_subset(x, y, size=500, seed=0)
        >>> len(ys)
        500
    """
    n = labels.shape[0]
    if images.shape[0] != n:
        raise ValueError(f"images has {images.shape[0]} samples but labels has {n}")
    if size is None or size >= n:
        return images, labels
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(n, generator=generator)[:size]
    return images[index.to(images.device)], labels[index.to(labels.device)]


def inject_label_noise(
    labels: Tensor,
    rate: float,
    num_classes: int,
    seed: int,
    kind: Literal["symmetric", "class_conditional", "instance"] = "symmetric",
    reference_probs: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Corrupt a known fraction of labels, for measuring how well noise is detected.

    Exactly ``round(rate * N)`` samples are chosen at random and every chosen label is replaced
    by a different class, so ``flipped`` is the exact ground truth of which labels are wrong.

    Args:
        labels: Integer class labels ``[N]`` in ``[0, num_classes)``.
        rate: Fraction of labels to corrupt, in ``[0, 1)``.
        num_classes: Number of classes (at least 2).
        seed: Seed of the draw; the same seed gives the same corruption.
        kind: Noise model. ``"symmetric"`` moves each chosen label to a uniformly random other
            class. ``"class_conditional"`` moves every chosen label of class ``j`` to one fixed
            class, the one a reference model confuses with ``j`` most (highest mean
            predicted probability among the other classes over the samples of class ``j``).
            ``"instance"`` moves each chosen label to the class the reference model finds
            most likely for that very sample among the wrong ones.
        reference_probs: ``[N, num_classes]`` predicted probabilities of a reference model
            (ideally out-of-sample, trained on clean labels); needed by the two kinds that
            follow a model's confusions.

    Returns:
        ``(noisy_labels, flipped)``: a new int64 label tensor and a bool mask ``[N]`` that is
        ``True`` where the label was changed.

    Raises:
        ValueError: If ``rate`` is outside ``[0, 1)``, ``num_classes < 2``, a label is out of
            range, ``labels`` is not 1-D, or ``kind`` is unknown.

    Example:
        >>> noisy, flipped = inject_label_noise(torch.arange(10) % 3, 0.2, 3, seed=0)
        >>> int(flipped.sum())
        2
    """
    if kind not in _NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; expected one of {sorted(_NOISE_KINDS)}")
    if not 0.0 <= rate < 1.0:  # also rejects NaN
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    clean = labels.detach().to("cpu", torch.int64)
    if clean.numel() and (clean.min() < 0 or clean.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{clean.min()}, {clean.max()}]"
        )

    generator = torch.Generator().manual_seed(seed)
    n_flip = round(rate * clean.numel())
    chosen = torch.randperm(clean.numel(), generator=generator)[:n_flip]
    noisy = clean.clone()
    if kind == "symmetric":
        noisy[chosen] = _symmetric_targets(clean[chosen], num_classes, generator)
    else:
        if reference_probs is None or tuple(reference_probs.shape) != (len(clean), num_classes):
            raise ValueError(
                f"kind={kind!r} needs reference_probs of shape [{len(clean)}, {num_classes}]"
            )
        probs = reference_probs.detach().to("cpu", torch.float64)
        if kind == "class_conditional":
            noisy[chosen] = confusable_classes(clean, probs)[clean[chosen]]
        else:
            noisy[chosen] = _most_likely_other(probs[chosen], clean[chosen])
    flipped = torch.zeros(clean.numel(), dtype=torch.bool)
    flipped[chosen] = True
    return noisy.to(labels.device), flipped.to(labels.device)


def _symmetric_targets(old: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
    """Move each label to a uniformly random other class."""
    # A non-zero offset modulo num_classes hits every other class with equal probability.
    offset = torch.randint(1, num_classes, old.shape, generator=generator)
    return (old + offset) % num_classes


_NOISE_KINDS = ("symmetric", "class_conditional", "instance")


def confusable_classes(labels: Tensor, probs: Tensor) -> Tensor:
    """For each class ``j``, the other class a model confuses with ``j`` most.

    Args:
        labels: ``[N]`` clean labels.
        probs: ``[N, C]`` predicted probabilities.

    Returns:
        ``[C]`` int64 tensor; entry ``j`` is ``argmax_{k != j}`` of the mean of ``probs``
        over the samples of class ``j`` (``j + 1 mod C`` for a class with no sample).
    """
    num_classes = probs.shape[1]
    target = torch.arange(num_classes)
    for j in range(num_classes):
        member = labels == j
        if member.any():
            mean = probs[member].mean(dim=0)
            mean[j] = float("-inf")
            target[j] = int(mean.argmax())
        else:
            target[j] = (j + 1) % num_classes
    return target


def _most_likely_other(probs: Tensor, labels: Tensor) -> Tensor:
    """The most probable class other than each sample's own label."""
    return probs.scatter(1, labels[:, None], float("-inf")).argmax(dim=1)


def _resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> tuple[Path, str]:
    """Return the folder to search and a note on where it came from (for error messages)."""
    if data_dir is not None:
        return Path(data_dir), "data_dir argument"
    env = os.environ.get(_DATA_DIR_ENV)
    if env:
        return Path(env), f"${_DATA_DIR_ENV}"
    return _DEBIAN_FASHION_MNIST_DIR, "default location"


def _find_idx_file(folder: Path, name: str, origin: str) -> Path:
    """Return ``folder/name`` or ``folder/name.gz``, whichever exists."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}[.gz] not found in {folder} ({origin}). Install it with "
        f"`apt-get install dataset-fashion-mnist` (files land in {_DEBIAN_FASHION_MNIST_DIR}), or "
        f"pass --data-dir / data_dir (or set ${_DATA_DIR_ENV}) pointing at the folder holding "
        "the four idx files: train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each optionally .gz)."
    )


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an idx file (optionally gzipped) into an array, checking header and size."""
    raw = path.read_bytes()
    # Trust the gzip magic bytes rather than the suffix, so a renamed file still loads.
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: corrupt gzip stream ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number {raw[:4].hex()})")
    if raw[3] != ndim:
        raise ValueError(f"{path}: expected {ndim} dimensions, header says {raw[3]}")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path}: truncated header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[raw[2]]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_len != expected:
        raise ValueError(
            f"{path}: wrong size, header {dims} needs {expected} data bytes, "
            f"file has {len(raw) - header_len}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)


class NoisyImageDataModule(L.LightningDataModule):
    """A train set with a known fraction of wrong labels, for the example and the CLI config.

    ``setup()`` draws a seeded subset of the train split and replaces the labels of exactly
    ``round(noise_rate * N)`` samples with a different class (see :func:`inject_label_noise`).
    The ground truth stays available, indexed by dataset index: ``flipped`` marks the
    corrupted samples and ``clean_labels`` holds the original labels.

    Args:
        dataset: ``"digits"`` (scikit-learn's 1797 8x8 images, no validation set) or
            ``"fashion-mnist"`` (28x28 images, validated on the official test split).
        data_dir: Folder holding the Fashion-MNIST idx files; see :func:`load_fashion_mnist`.
        num_samples: Size of the train subset; ``None`` keeps the whole train split.
        noise_rate: Fraction of train labels to corrupt, in ``[0, 1)``.
        seed: Seed of the subset and of the noise.
        batch_size: Batch size of both loaders.
        num_workers: DataLoader worker processes.
        val_size: Number of test-split samples (clean labels) used for validation.

    Raises:
        ValueError: If ``dataset`` is unknown.

    Example:
        >>> dm = NoisyImageDataModule("digits", num_samples=100, noise_rate=0.1)
        >>> dm.setup("fit")
        >>> int(dm.flipped.sum())
        10
    """

    def __init__(
        self,
        dataset: Literal["digits", "fashion-mnist"] = "digits",
        data_dir: str | None = None,
        num_samples: int | None = None,
        noise_rate: float = 0.2,
        seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int = 2000,
    ) -> None:
        super().__init__()
        if dataset not in ("digits", "fashion-mnist"):
            raise ValueError(f"dataset must be 'digits' or 'fashion-mnist', got {dataset!r}")
        self.save_hyperparameters()
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.flipped: Tensor | None = None
        self.clean_labels: Tensor | None = None

    def setup(self, stage: str) -> None:
        """Loads the data and injects the noise; later calls keep the first draw."""
        if self.train_dataset is not None:
            return
        hp = self.hparams
        if hp.dataset == "digits":
            images, labels = load_digits()
        else:
            images, labels = load_fashion_mnist(hp.data_dir, "train")
            test_images, test_labels = load_fashion_mnist(hp.data_dir, "test")
            self.val_dataset = TensorDataset(test_images[: hp.val_size], test_labels[: hp.val_size])
        images, labels = seeded_subset(images, labels, hp.num_samples, hp.seed)
        noisy, flipped = inject_label_noise(labels, hp.noise_rate, 10, hp.seed)
        self.clean_labels, self.flipped = labels, flipped
        self.train_dataset = TensorDataset(images, noisy)

    def train_dataloader(self) -> DataLoader:
        """Shuffled loader over ``(image, noisy_label)`` pairs."""
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Loader over the clean validation samples; no loader for digits."""
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, shuffle=False)

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("NoisyImageDataModule.setup() must run before its loaders.")
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
