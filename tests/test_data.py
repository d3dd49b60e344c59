"""Tests for torchdebug.data: dataset loaders, the idx parser, subsets and label noise."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from torchdebug.data import (
    DIGITS_CLASSES,
    FASHION_MNIST_CLASSES,
    NoisyImageDataModule,
    confusable_classes,
    inject_label_noise,
    load_digits,
    load_fashion_mnist,
    seeded_subset,
)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def _idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the idx format (magic 0x0000_08_ndim, big-endian dims)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _write_split(
    folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool
) -> tuple[Path, Path]:
    paths = []
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        data = _idx_bytes(array)
        path = folder / f"{prefix}-{kind}-ubyte{'.gz' if gz else ''}"
        path.write_bytes(gzip.compress(data) if gz else data)
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture
def tiny_arrays() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 6, 4), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255  # pin both ends of the scale
    labels = np.array([3, 0, 9, 1, 3], dtype=np.uint8)
    return images, labels


def test_load_digits_shapes_range_labels() -> None:
    images, labels = load_digits()
    assert images.shape == (1797, 1, 8, 8)
    assert images.dtype == torch.float32
    assert labels.shape == (1797,)
    assert labels.dtype == torch.int64
    assert images.min().item() == 0.0
    assert images.max().item() == 1.0
    assert sorted(labels.unique().tolist()) == list(range(10))
    assert len(DIGITS_CLASSES) == 10


def test_load_digits_dtype() -> None:
    images, _ = load_digits(dtype=torch.float64)
    assert images.dtype == torch.float64


def test_load_fashion_mnist_real_files() -> None:
    if not any(DEBIAN_DIR.glob("*-ubyte*")):
        pytest.skip(f"Fashion-MNIST not in {DEBIAN_DIR}; apt-get install dataset-fashion-mnist")
    train_x, train_y = load_fashion_mnist(DEBIAN_DIR, split="train")
    test_x, test_y = load_fashion_mnist(DEBIAN_DIR, split="test")
    assert train_x.shape == (60000, 1, 28, 28)
    assert test_x.shape == (10000, 1, 28, 28)
    assert train_x.dtype == torch.float32
    assert train_y.dtype == torch.int64
    assert 0.0 <= train_x.min().item() and train_x.max().item() <= 1.0
    assert train_x.max().item() == 1.0
    assert torch.bincount(train_y, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(test_y, minlength=10).tolist() == [1000] * 10
    assert len(FASHION_MNIST_CLASSES) == 10


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
@pytest.mark.parametrize(("split", "prefix"), [("train", "train"), ("test", "t10k")])
def test_synthetic_idx_roundtrip(
    tmp_path: Path,
    tiny_arrays: tuple[np.ndarray, np.ndarray],
    gz: bool,
    split: str,
    prefix: str,
) -> None:
    images, labels = tiny_arrays
    _write_split(tmp_path, prefix, images, labels, gz=gz)
    got_x, got_y = load_fashion_mnist(tmp_path, split=split)
    assert got_x.shape == (5, 1, 6, 4)
    assert got_x.dtype == torch.float32
    assert got_y.dtype == torch.int64
    assert torch.equal((got_x * 255).round().to(torch.uint8).squeeze(1), torch.from_numpy(images))
    assert torch.equal(got_y, torch.from_numpy(labels).long())


def test_env_var_data_dir(
    tmp_path: Path, tiny_arrays: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_split(tmp_path, "train", *tiny_arrays, gz=False)
    monkeypatch.setenv("TORCHDEBUG_DATA_DIR", str(tmp_path))
    _, labels = load_fashion_mnist()
    assert labels.tolist() == tiny_arrays[1].tolist()


def test_bad_magic_raises_value_error_naming_file(
    tmp_path: Path, tiny_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    images_path, _ = _write_split(tmp_path, "train", *tiny_arrays, gz=False)
    data = bytearray(images_path.read_bytes())
    data[2] = 0x42  # unknown type code
    images_path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte") as info:
        load_fashion_mnist(tmp_path)
    assert "magic" in str(info.value)


def test_truncated_file_raises_value_error_naming_file(
    tmp_path: Path, tiny_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    _, labels_path = _write_split(tmp_path, "train", *tiny_arrays, gz=True)
    labels_path.write_bytes(gzip.compress(gzip.decompress(labels_path.read_bytes())[:-1]))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz"):
        load_fashion_mnist(tmp_path)


def test_count_mismatch_raises_value_error(
    tmp_path: Path, tiny_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = tiny_arrays
    _write_split(tmp_path, "train", images, labels[:4], gz=False)
    with pytest.raises(ValueError, match="5 images but"):
        load_fashion_mnist(tmp_path)


def test_missing_dir_raises_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(missing)
    message = str(info.value)
    assert "dataset-fashion-mnist" in message
    assert str(missing) in message
    assert "data_dir" in message


def test_unknown_split_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist(tmp_path, split="valid")  # type: ignore[arg-type]


def test_seeded_subset() -> None:
    images = torch.arange(100).float().view(100, 1, 1, 1)
    labels = torch.arange(100)
    x1, y1 = seeded_subset(images, labels, size=30, seed=1)
    x2, y2 = seeded_subset(images, labels, size=30, seed=1)
    x3, y3 = seeded_subset(images, labels, size=30, seed=2)
    assert y1.shape == (30,) and x1.shape == (30, 1, 1, 1)
    assert len(set(y1.tolist())) == 30  # without replacement
    assert torch.equal(x1.flatten().long(), y1)  # pairs stay aligned
    assert torch.equal(y1, y2) and torch.equal(x1, x2)
    assert not torch.equal(y1, y3)
    for size in (None, 100, 500):
        xa, ya = seeded_subset(images, labels, size=size, seed=0)
        assert torch.equal(ya, labels) and torch.equal(xa, images)
    with pytest.raises(ValueError):
        seeded_subset(images, labels[:50], size=10, seed=0)


@pytest.mark.parametrize(("n", "rate"), [(1000, 0.2), (997, 0.35), (10, 0.25), (50, 0.0)])
def test_noise_exact_count_and_only_flipped_change(n: int, rate: float) -> None:
    labels = torch.arange(n) % 7
    noisy, flipped = inject_label_noise(labels, rate, num_classes=7, seed=0)
    assert flipped.dtype == torch.bool and flipped.shape == (n,)
    assert noisy.dtype == torch.int64 and noisy.shape == (n,)
    assert int(flipped.sum()) == round(rate * n)
    assert bool((noisy[flipped] != labels[flipped]).all())
    assert torch.equal(noisy[~flipped], labels[~flipped])
    assert int(noisy.min()) >= 0 and int(noisy.max()) < 7
    assert torch.equal(labels, torch.arange(n) % 7)  # input not modified


def test_noise_seeding() -> None:
    labels = torch.arange(2000) % 10
    a = inject_label_noise(labels, 0.3, num_classes=10, seed=5)
    b = inject_label_noise(labels, 0.3, num_classes=10, seed=5)
    c = inject_label_noise(labels, 0.3, num_classes=10, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert not torch.equal(a[0], c[0])


def test_symmetric_noise_is_uniform_over_other_classes() -> None:
    num_classes = 10
    labels = torch.arange(50_000) % num_classes
    noisy, flipped = inject_label_noise(labels, 0.5, num_classes=num_classes, seed=0)
    old, new = labels[flipped], noisy[flipped]
    # Chi-square of the new-label counts against uniform over the 9 other classes, per class.
    # 8 degrees of freedom: 40 is far in the tail (p ~ 1e-5), so only a real bias trips it.
    for c in range(num_classes):
        counts = torch.bincount(new[old == c], minlength=num_classes).double()
        assert counts[c] == 0
        others = torch.cat([counts[:c], counts[c + 1 :]])
        expected = others.sum() / (num_classes - 1)
        chi2 = float(((others - expected) ** 2 / expected).sum())
        assert chi2 < 40, (c, others.tolist())


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, math.nan])
def test_noise_rejects_bad_rate(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        inject_label_noise(torch.zeros(10, dtype=torch.long), rate, num_classes=3, seed=0)


def test_noise_rejects_bad_kind_and_labels() -> None:
    labels = torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown noise kind 'pairwise'"):
        inject_label_noise(labels, 0.1, 3, 0, kind="pairwise")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labels"):
        inject_label_noise(labels + 5, 0.1, num_classes=3, seed=0)
    with pytest.raises(ValueError, match="num_classes"):
        inject_label_noise(labels, 0.1, num_classes=1, seed=0)


def test_noisy_image_datamodule_digits() -> None:
    dm = NoisyImageDataModule("digits", num_samples=500, noise_rate=0.2, seed=3, batch_size=64)
    dm.setup("fit")
    assert dm.train_dataset is not None and dm.flipped is not None and dm.clean_labels is not None
    assert len(dm.train_dataset) == 500
    assert dm.flipped.shape == dm.clean_labels.shape == (500,)
    assert int(dm.flipped.sum()) == 100  # round(0.2 * 500), exactly
    noisy = dm.train_dataset.tensors[1]
    assert torch.equal(dm.flipped, noisy != dm.clean_labels)
    x, y = dm.train_dataset[7]
    assert x.shape == (1, 8, 8) and int(y) == int(noisy[7])
    assert sum(len(b[1]) for b in dm.train_dataloader()) == 500
    assert dm.val_dataloader() == []  # digits has no held-out split

    dm.setup("validate")  # a second setup keeps the first draw
    assert torch.equal(dm.train_dataset.tensors[1], noisy)
    same = NoisyImageDataModule("digits", num_samples=500, noise_rate=0.2, seed=3)
    same.setup("fit")
    assert torch.equal(same.flipped, dm.flipped)


def test_noisy_image_datamodule_fashion_mnist_validates_on_clean_test_split(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(1)
    train_y = np.arange(40, dtype=np.uint8) % 10
    test_y = np.arange(8, dtype=np.uint8) % 10
    _write_split(tmp_path, "train", rng.integers(0, 256, (40, 28, 28)), train_y, gz=True)
    _write_split(tmp_path, "t10k", rng.integers(0, 256, (8, 28, 28)), test_y, gz=False)
    dm = NoisyImageDataModule(
        "fashion-mnist", data_dir=str(tmp_path), num_samples=30, noise_rate=0.1, val_size=5
    )
    dm.setup("fit")
    assert dm.train_dataset is not None and dm.flipped is not None
    assert len(dm.train_dataset) == 30 and int(dm.flipped.sum()) == 3
    (val_x, val_y) = next(iter(dm.val_dataloader()))
    assert val_x.shape == (5, 1, 28, 28)
    assert val_y.tolist() == test_y[:5].tolist()


def test_class_conditional_noise_follows_the_reference_confusions() -> None:
    labels = torch.arange(300) % 3
    # The reference model confuses class 0 with 2, 1 with 0 and 2 with 1.
    probs = torch.full((300, 3), 0.1)
    probs[labels == 0, 2] = 0.3
    probs[labels == 1, 0] = 0.3
    probs[labels == 2, 1] = 0.3
    probs[torch.arange(300), labels] = 0.6
    assert confusable_classes(labels, probs).tolist() == [2, 0, 1]
    noisy, flipped = inject_label_noise(labels, 0.4, 3, 0, "class_conditional", probs)
    assert int(flipped.sum()) == 120
    assert noisy[flipped].tolist() == [[2, 0, 1][y] for y in labels[flipped].tolist()]
    assert torch.equal(noisy[~flipped], labels[~flipped])


def test_instance_noise_moves_each_label_to_its_most_likely_wrong_class() -> None:
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    probs = torch.softmax(torch.randn(10, 3, generator=torch.Generator().manual_seed(3)), 1)
    noisy, flipped = inject_label_noise(labels, 0.5, 3, 1, "instance", probs)
    for i in torch.nonzero(flipped).flatten().tolist():
        others = [k for k in range(3) if k != labels[i]]
        assert noisy[i] == max(others, key=lambda k: probs[i, k])
    with pytest.raises(ValueError, match="needs reference_probs"):
        inject_label_noise(labels, 0.5, 3, 1, "instance")
