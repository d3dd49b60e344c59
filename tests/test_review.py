"""The review views: read back from real event files, projector files and a real server."""

from __future__ import annotations

import io
import json
import math
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from torchdebug import DynamicsRecorder, TrainingDynamics
from torchdebug.data import inject_label_noise, load_digits, seeded_subset
from torchdebug.models import ImageClassifier
from torchdebug.report import load_report
from torchdebug.review import (
    _CAPTION_PIXELS,
    TILE_PIXELS,
    ConfidenceHistory,
    default_to_image,
    flagged_rows,
    grid_shape,
    render_grid,
)

TOP_K = 6
EPOCHS = 5
NAMES = [f"digit-{k}" for k in range(10)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real training on 400 noisy digits with every review view switched on."""
    warnings.filterwarnings("ignore", message=".*(LeafSpec|num_workers|val_dataloader).*")
    root = tmp_path_factory.mktemp("review")
    images, labels = seeded_subset(*load_digits(), 400, 0)
    noisy, flipped = inject_label_noise(labels, 0.2, 10, 0)
    L.seed_everything(0, verbose=False)
    callback = TrainingDynamics(
        top_k=TOP_K,
        class_names=NAMES,
        noise_mask=flipped,
        review_every_n_epochs=1,
        projector_max_points=300,
    )
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        logger=TensorBoardLogger(root, name="", version="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    loader = DataLoader(TensorDataset(images, noisy), batch_size=32, shuffle=True)
    trainer.fit(ImageClassifier("cnn", image_size=8), loader)
    logdir = Path(trainer.log_dir)
    events = EventAccumulator(str(logdir), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    return {"logdir": logdir, "events": events, "callback": callback, "images": images}


def test_review_tags_are_written_every_epoch(run: dict) -> None:
    tags = run["events"].Tags()
    for tag in ("mislabeled_grid", "hard_grid", "mislabeled_trajectories"):
        assert f"torchdebug/review/{tag}" in tags["images"]
    assert "torchdebug/data_map" in tags["images"]
    for tag in ("mislabeled_table/text_summary", "hard_table/text_summary", "pr_mislabeled"):
        assert f"torchdebug/review/{tag}" in tags["tensors"]
    assert "custom_scalars__config__" in tags["tensors"]
    steps = [e.step for e in run["events"].Images("torchdebug/review/mislabeled_grid")]
    assert steps == list(range(EPOCHS))


def test_grid_has_one_tile_per_top_flagged_sample(run: dict) -> None:
    report = load_report(run["logdir"])
    tiles = len(flagged_rows(report, "mislabeled", TOP_K))
    assert tiles == TOP_K  # 20% of 400 labels are flipped: plenty flagged
    rows, columns = grid_shape(tiles)
    last = run["events"].Images("torchdebug/review/mislabeled_grid")[-1]
    assert (last.width, last.height) == (
        columns * TILE_PIXELS,
        rows * (TILE_PIXELS + _CAPTION_PIXELS),
    )


def test_table_lists_exactly_the_top_k_of_the_report(run: dict) -> None:
    report = load_report(run["logdir"])
    expected = flagged_rows(report, "mislabeled", TOP_K)
    text = _text(run["events"], "torchdebug/review/mislabeled_table/text_summary")
    rows = [line.split("|") for line in text.splitlines()[2:]]
    assert [int(cells[2]) for cells in rows] == expected["sample_id"].tolist()
    # Labels appear by class name.
    assert [cells[3].strip() for cells in rows] == [NAMES[k] for k in expected["given_label"]]


def test_tiles_show_the_samples_inputs(run: dict) -> None:
    report = load_report(run["logdir"])
    first = int(flagged_rows(report, "mislabeled", 1)["sample_id"].iloc[0])
    event = run["events"].Images("torchdebug/review/mislabeled_grid")[-1]
    grid = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
    tile = grid[:TILE_PIXELS, :TILE_PIXELS, 0]
    expected = default_to_image(run["images"][first])[..., 0]
    # Nearest-neighbour upscaling by 14: every 14th pixel is the source pixel.
    step = TILE_PIXELS // expected.shape[0]
    assert np.array_equal(tile[::step, ::step], expected)


def test_pr_curve_and_projector_files(run: dict) -> None:
    logdir = run["logdir"]
    report = load_report(logdir).set_index("sample_id")
    config = (logdir / "projector_config.pbtxt").read_text()
    assert "torchdebug_samples" in config and "sprite" in config
    folder = next(logdir.glob("*/torchdebug_samples"))
    lines = (folder / "metadata.tsv").read_text().splitlines()
    header, rows = lines[0].split("\t"), [line.split("\t") for line in lines[1:]]
    assert header[:4] == ["sample_id", "given", "suggested", "flag"]
    assert len(rows) == 300  # the cap: all flagged first, then a seeded sample
    flagged = set(report.index[report["flag"] != ""])
    assert flagged <= {int(r[0]) for r in rows}
    for row in rows:
        sample = report.loc[int(row[0])]
        assert row[1] == NAMES[sample["given_label"]] and row[2] == NAMES[sample["suggested_label"]]
        assert row[3] == (sample["flag"] or "-")
    assert len((folder / "tensors.tsv").read_text().splitlines()) == 300
    sprite = Image.open(folder / "sprite.png")
    per_row = math.ceil(math.sqrt(300))
    assert sprite.size[0] == sprite.size[1] <= 8192 and sprite.size[0] % per_row == 0


def test_trajectory_values_are_each_epochs_confidence() -> None:
    # A bare recorder: sample 0 is shown once per epoch with known logits.
    recorder = DynamicsRecorder(num_samples=2, num_classes=3)
    history = ConfidenceHistory()
    probs = []
    for epoch, z in enumerate(([2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0], [4.0, 0.0, 1.0])):
        logits = torch.tensor([z, [0.0, 0.0, 1.0]])
        probs.append(torch.softmax(logits[0], 0)[0].item())
        recorder.update(torch.tensor([0, 1]), logits, torch.tensor([0, 2]))
        history.before_epoch_end(recorder.running_confidence)
        recorder.end_epoch()
        history.after_epoch_end(recorder.running_confidence, epoch)
        if epoch == 0:
            history.watch([0], recorder.running_confidence, epoch)
    assert sorted(history.values[0]) == [0, 1, 2, 3]
    assert [history.values[0][e] for e in range(4)] == pytest.approx(probs, abs=1e-5)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((1, 8, 8), (8, 8, 3)), ((3, 5, 4), (5, 4, 3)), ((6, 7, 3), (6, 7, 3)), ((64,), (8, 8, 3))],
)
def test_default_to_image_shapes(shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    image = default_to_image(torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape))
    assert image.shape == expected and image.dtype == np.uint8
    assert image.min() == 0 and image.max() == 255  # stretched to the full range


@pytest.mark.parametrize("shape", [(10,), (5, 4, 8), (2, 3, 4, 5)])
def test_non_images_get_no_image(shape: tuple[int, ...]) -> None:
    assert default_to_image(torch.zeros(shape)) is None


def test_a_real_tensorboard_server_serves_every_view(run: dict) -> None:
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(run["logdir"].parent),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        scalars = _get_json(f"{base}/data/plugin/scalars/tags", wait=120)
        assert "torchdebug/noise_rate_estimate" in scalars["run"]
        images = _get_json(f"{base}/data/plugin/images/tags")
        assert "torchdebug/review/mislabeled_grid" in images["run"]
        texts = _get_json(f"{base}/data/plugin/text/tags")
        assert "torchdebug/review/mislabeled_table/text_summary" in texts["run"]
        projector = _get_json(f"{base}/data/plugin/projector/runs")
        assert "run" in projector
        info = _get_json(f"{base}/data/plugin/projector/info?run=run")
        assert info["embeddings"][0]["tensorName"].startswith("torchdebug_samples")
    finally:
        server.terminate()
        server.wait(timeout=30)


def _text(events: EventAccumulator, tag: str) -> str:
    return events.Tensors(tag)[-1].tensor_proto.string_val[0].decode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str, wait: float = 0.0) -> dict:
    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                data = json.loads(response.read())
            # The server answers before its first load of the logdir finishes.
            if data or time.monotonic() > deadline:
                return data
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(1.0)


def test_a_noise_mask_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    images, labels = seeded_subset(*load_digits(), 50, 0)
    trainer = L.Trainer(
        max_epochs=1,
        logger=TensorBoardLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TrainingDynamics(noise_mask=torch.zeros(49, dtype=torch.bool))],
    )
    with pytest.raises(ValueError, match="noise_mask has 49 entries .* 50 sample ids"):
        trainer.fit(ImageClassifier("cnn", image_size=8), DataLoader(TensorDataset(images, labels)))


def test_review_options_are_validated() -> None:
    with pytest.raises(ValueError, match="top_k"):
        TrainingDynamics(top_k=0)
    with pytest.raises(ValueError, match="review_every_n_epochs"):
        TrainingDynamics(review_every_n_epochs=0)


class AugmentedDigits(torch.utils.data.Dataset):
    """Adds random noise in ``__getitem__``, drawing from torch's global generator."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i] + 0.1 * torch.randn_like(self.images[i]), self.labels[i]


def test_image_lookups_do_not_shift_the_training_random_stream(tmp_path: Path) -> None:
    images, labels = seeded_subset(*load_digits(), 200, 1)
    noisy, _ = inject_label_noise(labels, 0.3, 10, 1)
    weights = []
    for tensorboard in (True, False):
        L.seed_everything(0, verbose=False)
        model = ImageClassifier("cnn", image_size=8)
        trainer = L.Trainer(
            max_epochs=3,
            logger=TensorBoardLogger(tmp_path, name=str(tensorboard)),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[TrainingDynamics(tensorboard=tensorboard, review_every_n_epochs=1)],
        )
        loader = DataLoader(AugmentedDigits(images, noisy), batch_size=32, shuffle=True)
        trainer.fit(model, loader)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    grids = EventAccumulator(str(tmp_path / "True" / "version_0"), size_guidance={"images": 0})
    grids.Reload()
    assert "torchdebug/review/mislabeled_grid" in grids.Tags()["images"]  # lookups happened
    assert torch.equal(weights[0], weights[1])


def test_hard_captions_keep_the_confidence_whatever_the_id_length() -> None:
    from types import SimpleNamespace

    from torchdebug.review import _caption

    row = SimpleNamespace(
        sample_id=1538, flag="ambiguous", confidence=0.472, given_label=3, predicted_label=5
    )
    first = _caption(row, "hard", ["a", "b", "c", "shirt", "e", "coat"])
    assert first == ["#1538  p=0.47  ambiguous", "given: shirt", "predicted: coat"]
    grid = render_grid([np.zeros((8, 8, 3), np.uint8)], [first])
    assert grid.shape == (TILE_PIXELS + _CAPTION_PIXELS, TILE_PIXELS, 3)
