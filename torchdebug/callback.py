"""``TrainingDynamics``: the Lightning callback over :class:`~torchdebug.DynamicsRecorder`."""

from __future__ import annotations

import functools
import logging
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import IterableDataset

from torchdebug.actions import Action, ActionPolicy
from torchdebug.grad_norms import GradNormMode, LayerTaps, ce_logits_grad, check_mode
from torchdebug.recorder import DynamicsRecorder
from torchdebug.report import HISTORY_DIRNAME, REPORT_DIRNAME, REPORT_FILENAME, write_report
from torchdebug.review import (
    ConfidenceHistory,
    ToImage,
    default_to_image,
    flagged_rows,
    log_custom_scalars,
    log_projector,
    log_review,
)
from torchdebug.sampling import IdQueue, as_id_tensor, record_indices
from torchdebug.scores import Aggregates, build_report
from torchdebug.tensorboard import log_actions, log_epoch

__all__ = ["TARGET_KEYS", "TrainingDynamics"]

log = logging.getLogger(__name__)

TARGET_KEYS: tuple[str, ...] = ("label", "labels", "target", "targets", "y")
"""Keys of a dict batch that hold the labels, tried in this order."""

_ID_KEYS = ("index", "indices", "idx")
_INPUT_KEYS = ("image", "images", "input", "inputs", "x", "pixel_values")
# Share of training time the adaptive review cadence may spend on figures and grids, and
# the cost assumed for a review before one has been timed (seconds).
_REVIEW_BUDGET = 0.03
_FIRST_REVIEW_SECONDS = 0.3
_HALF = (torch.float16, torch.bfloat16)
# Epochs recorded before an action starts (chosen on benchmarks/robust_training.py).
DEFAULT_WARMUP_EPOCHS = 5


class TrainingDynamics(Callback):
    """Records per-sample training dynamics, scores every sample and flags suspect labels.

    Add it to an existing ``Trainer`` and change nothing else::

        trainer = L.Trainer(max_epochs=8, callbacks=[TrainingDynamics()])
        trainer.fit(model, train_loader)
        report = trainer.callbacks[0].report()

    For each training batch it needs logits, labels and sample ids:

    - logits: ``outputs["logits"]`` when ``training_step`` returns a dict with them; else
      the output of the module's forward call during the step, caught by a forward hook
      on the LightningModule and its direct children (or on ``logits_module``);
    - labels: ``get_targets(batch)``; else ``outputs["targets"]``/``["target"]``; else the
      second item of a tuple batch or a ``label``/``labels``/``target``/``targets``/``y``
      key of a dict batch;
    - ids: ``get_ids(batch)``; else ``outputs["index"]``; else an ``index`` key of a dict
      batch; else the dataset indices the train DataLoader's sampler drew for the batch,
      recorded without touching the batch (map-style datasets, any ``num_workers``).

    At every epoch end it folds the epoch (reduced across ranks under DDP), and on rank
    zero writes ``<log dir>/torchdebug/samples.parquet`` and logs TensorBoard views under
    ``torchdebug/`` through the Trainer's ``TensorBoardLogger``. The statistics come from
    the training forward pass (the augmented view), as in the data-map and AUM papers.

    Args:
        logits_module: Dotted name of the submodule whose output is the logits (e.g.
            ``"model"`` or ``"model.head"``); ``None`` finds them automatically.
        get_ids: ``get_ids(batch) -> ids`` returning integer sample ids.
        get_targets: ``get_targets(batch) -> labels`` returning integer class labels.
        num_samples: Number of distinct ids; defaults to the train dataset's length.
        tensorboard: Log the TensorBoard views when a ``TensorBoardLogger`` is attached.
        write_report: Write the Parquet report at every epoch end.
        name: Distinguishes two instances in one Trainer: it keys the checkpoint state, and
            a named instance writes ``torchdebug/<name>/samples.parquet`` and TensorBoard
            tags under ``torchdebug/<name>/``.
        top_k: Samples shown per image grid, table and trajectory plot.
        class_names: Class names shown instead of label indices.
        get_input: ``get_input(sample_id)`` returning a sample's input, for the image
            grids and projector thumbnails; defaults to the train dataset's item (its
            first element, or an ``image``/``input``/``x`` key) when ids are dataset
            indices (no ``get_ids``).
        to_image: Turns an input into an ``H x W x 3`` uint8 image or ``None``; the default
            handles image tensors and flattened square images, stretching each to 0..255.
        review_every_n_epochs: Cadence of the review views (grids, tables, trajectories,
            data map, PR curve); ``None`` adapts it so they take about 3% of the training
            time. The last epoch is always reviewed. Scalars and histograms are logged
            every epoch.
        projector_every_n_epochs: Cadence of the projector; ``None`` writes it once, at the
            end of training.
        projector_max_points: Cap on the samples in the projector.
        noise_mask: Boolean per sample id, True where the label is known to be wrong (a
            benchmark or a demo); adds a precision-recall curve of ``mislabel_score`` and
            the precision of the action's choices.
        action: ``None`` (observe only), ``"drop"``, ``"reweight"`` or ``"relabel"``: what
            to do, from the epoch after the warm-up on, with the samples flagged
            ``mislabeled`` (highest score first, within the caps). Decisions are revisited
            at every epoch end and kept in the callback's checkpoint state.

            - ``"drop"``: the train sampler leaves them out; the module and DataLoader stay
              as they are. Needs sample ids that are dataset indices (no ``get_ids``).
            - ``"reweight"``: each gets weight ``1 - mislabel_score``; apply the weights
              with one line in ``training_step``:
              ``loss = weighted_loss(F.cross_entropy(logits, y, reduction="none"), self)``.
            - ``"relabel"``: each trains on its ``suggested_label``, substituted in the
              batch's label tensor before ``training_step``; the report keeps the given
              label.
        warmup_epochs: Epochs recorded before the first decision.
        max_fraction: Cap on the fraction of all samples acted on.
        max_class_fraction: Cap on the fraction of each given class acted on (below 1, so
            no class vanishes).
        dry_run: Decide, report (``action`` reads ``"would_drop"`` etc.) and log, but leave
            training unchanged.
        grad_norm: What ``grad_norm_mean`` measures: the norm of each sample's
            cross-entropy gradient with respect to ``"logits"`` (default, free),
            ``"last_layer"`` (the weight and bias of the ``nn.Linear`` that produces the
            logits, exact, from its input features) or ``"full"`` (every trainable
            parameter of supported layers, exact, from the training step's own backward
            pass; see :func:`torchdebug.per_sample_grad_norms`). ``"full"`` runs in eager
            mode only and scales each row by its logits gradient, so it is exact for any
            reduction, gradient accumulation, loss scaling and per-sample loss weights.
        grad_norm_strict: With ``grad_norm="full"``, raise at the start of training when
            a trainable parameter cannot be covered, instead of leaving it out (the covered
            fraction is in the report metadata).
        epochs: Record only these training epochs: ``N`` for the first ``N``, or
            ``(start, stop)`` for ``start <= epoch < stop``; ``None`` records all. Late in
            training the network memorises flipped labels and every sample's probability
            saturates; scores from the early epochs keep them apart. Outside the window
            the report and any action keep the last recorded epoch's decisions.
        history: Also write each recorded epoch's own per-sample numbers to
            ``torchdebug/history/epoch_NNNN.parquet`` (atomically, from the host; nothing
            stays on the device); read them back with :func:`torchdebug.load_history`.
        ignore_index: The label that means "no label" in your loss (``F.cross_entropy``'s
            ``ignore_index``): rows with it are not recorded and are not an error; a sample
            only ever presented with it gets a report row flagged ``"unsupervised"``.

    Raises:
        ValueError: At construction, for a bad option.

    .. note:: Only the first train DataLoader is tracked; soft, mixed or multi-label
       targets are refused with an error.
    """

    def __init__(
        self,
        *,
        logits_module: str | None = None,
        get_ids: Callable[[Any], Any] | None = None,
        get_targets: Callable[[Any], Any] | None = None,
        num_samples: int | None = None,
        tensorboard: bool = True,
        write_report: bool = True,
        name: str = "",
        top_k: int = 16,
        class_names: Sequence[str] | None = None,
        get_input: Callable[[int], Any] | None = None,
        to_image: ToImage | None = None,
        review_every_n_epochs: int | None = None,
        projector_every_n_epochs: int | None = None,
        projector_max_points: int = 2000,
        noise_mask: Sequence[bool] | Tensor | None = None,
        action: Action | None = None,
        warmup_epochs: int = DEFAULT_WARMUP_EPOCHS,
        max_fraction: float = 0.5,
        max_class_fraction: float = 0.5,
        dry_run: bool = False,
        grad_norm: GradNormMode = "logits",
        grad_norm_strict: bool = False,
        epochs: int | tuple[int, int] | None = None,
        history: bool = False,
        ignore_index: int | None = None,
    ) -> None:
        check_mode(grad_norm)
        self.epochs = _epoch_window(epochs)
        self.history_on_disk = history
        self.ignore_index = ignore_index
        if num_samples is not None and num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}.")
        for option, value in (
            ("top_k", top_k),
            ("review_every_n_epochs", review_every_n_epochs),
            ("projector_every_n_epochs", projector_every_n_epochs),
            ("projector_max_points", projector_max_points),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{option} must be at least 1, got {value}.")
        if name and not re.fullmatch(r"[\w.-]+", name):
            raise ValueError(f"name must be letters, digits, '_', '-' or '.', got {name!r}.")
        if logits_module is not None and not logits_module.strip():
            raise ValueError("logits_module must name a submodule, e.g. 'model.head'.")
        self.logits_module = logits_module
        self.get_ids = get_ids
        self.get_targets = get_targets
        self.num_samples = num_samples
        self.tensorboard = tensorboard
        self.write_report = write_report
        self.name = name
        self.recorder: DynamicsRecorder | None = None
        self.report_path: Path | None = None
        self._pending_state: dict[str, Any] | None = None
        self._capture = _LogitsCapture()
        self._ids_queue = IdQueue(self._dropped)
        self._sampler: IdQueue | None = None  # the queue, once a loader feeds it
        self._sampler_error: Exception | None = None
        self._fit_loop: Any = None
        self._log_dir: Path | None = None
        self.top_k = top_k
        self.class_names = list(class_names) if class_names is not None else None
        self.get_input = get_input
        self.to_image = to_image or default_to_image
        self.review_every_n_epochs = review_every_n_epochs
        self.projector_every_n_epochs = projector_every_n_epochs
        self.projector_max_points = projector_max_points
        self.noise_mask = None
        if noise_mask is not None:
            self.noise_mask = torch.as_tensor(noise_mask, dtype=torch.bool).cpu().numpy()
        self.history = ConfidenceHistory(capacity=max(256, 8 * top_k))
        self._next_review = 0
        self._review_credit = 0.0
        self._review_seconds = _FIRST_REVIEW_SECONDS
        self._reviewed_epoch = -1
        self._projected_epoch = -1
        self._epoch_started = 0.0
        self._epoch_seconds = 0.0
        self._layout_written = False
        self._last_report: pd.DataFrame | None = None
        self._last_report_epoch = -1
        self.policy: ActionPolicy | None = None
        if action is not None:
            self.policy = ActionPolicy(
                action,
                warmup_epochs=warmup_epochs,
                max_fraction=max_fraction,
                max_class_fraction=max_class_fraction,
                dry_run=dry_run,
            )
        self._batch_weights: Tensor | None = None
        self._given_targets: Tensor | None = None
        self._weights_taken = False
        self.grad_norm = grad_norm
        self.grad_norm_strict = grad_norm_strict
        self._taps: LayerTaps | None = None
        self.partial_epochs: list[int] = []  # epochs resumed mid-way, so not fully seen
        self._string_ids: dict[str, int] = {}  # string sample id -> its row, if any
        self._capacity = 0  # rows the string ids may take (the number of samples)
        self._grad_trouble: Tensor | None = None  # rows whose loss was not cross-entropy's

    @property
    def _prefix(self) -> str:
        """Where this instance's TensorBoard tags live."""
        return f"{REPORT_DIRNAME}/{self.name}" if self.name else REPORT_DIRNAME

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def report(self) -> pd.DataFrame:
        """The per-sample report over the completed epochs (columns in the README)."""
        if self.recorder is None:
            return build_report(Aggregates.empty())
        return self._with_string_ids(self._annotated(self.recorder.report()))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.grad_norm != "logits":
            _refuse_compiled(pl_module, self.grad_norm)
            self._taps = LayerTaps(pl_module, self.grad_norm, strict=self.grad_norm_strict)
            self._taps.attach()
        watch = self._taps.watch if self._taps is not None else None
        self._capture.attach(pl_module, self.logits_module, watch=watch)
        dropping = self.policy is not None and self.policy.action == "drop"
        if self.get_ids is None or dropping:  # dropping needs the sampler, whatever the ids
            self._hook_dataloader_setup(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._capture.detach()
        if self._taps is not None:
            self._taps.detach()
        if self._fit_loop is not None:
            self._fit_loop.__dict__.pop("_load_combined_loader_states", None)
            self._fit_loop = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Trainer.log_dir is a collective under DDP: every rank asks, here, once.
        self._log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self._capacity = self.num_samples or _train_dataset_size(trainer) or 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started = time.perf_counter()
        recorder = self.recorder
        if recorder is not None and self.num_samples is None:
            size = _train_dataset_size(trainer)
            if size is not None and size != recorder.num_samples:
                raise ValueError(
                    f"The training set has {size} samples this epoch but had "
                    f"{recorder.num_samples} when torchdebug started recording: sample ids "
                    "would no longer mean the same samples. Keep the training set's length "
                    "fixed (reload_dataloaders_every_n_epochs may rebuild it), or pass "
                    "TrainingDynamics(num_samples=...) covering every id with stable ids "
                    "(get_ids=)."
                )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._capture.arm()
        if self._taps is not None:
            self._taps.arm()
        self._given_targets = None  # a skipped batch must not leave its labels behind
        if self.policy is not None:
            self._apply_actions(trainer, batch)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        explicit = outputs.get("logits") if isinstance(outputs, Mapping) else None
        captured = self._capture.disarm(needed=not isinstance(explicit, Tensor))
        # The sampler's queue advances for every batch, recorded or not, to stay aligned.
        taken = self._sampler.take() if self._sampler is not None else None
        sampled_ids, padded = taken if taken is not None else (None, None)
        if _skipped(pl_module, outputs) or not self._in_window(trainer):
            return

        logits = explicit if isinstance(explicit, Tensor) else captured
        if logits is None:
            raise _no_logits_error(self.logits_module)
        given, self._given_targets = self._given_targets, None
        targets = given if given is not None else self._targets(outputs, batch)
        ids = self._ids(outputs, batch, sampled_ids, rows=logits.shape[0])
        if self.policy is not None and self.policy.dropped() is not None:
            self._check_dropped(ids, sampled_ids)
        recorder = self._ensure_recorder(trainer, logits)
        grad_norm = self._parameter_grad_norms(logits, targets) if self._taps else None
        # Padding repeats of a DistributedSampler count once: where the sampler's ids are.
        keep = None
        if padded is not None and any(padded) and sampled_ids is not None:
            if torch.equal(ids.cpu(), torch.tensor(sampled_ids)):
                keep = ~torch.tensor(padded)
        recorder.update(ids, logits, targets, grad_norm=grad_norm, keep=keep)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._taps is not None:
            self._taps.finish_backward()  # the norms now, so the activations can go

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._in_window(trainer):
            return  # every rank skips the same epochs
        distributed = trainer.world_size > 1 and dist.is_initialized()
        if distributed:
            self._join_ranks(trainer)
        if self.recorder is None:
            return
        self._epoch_seconds = time.perf_counter() - self._epoch_started
        self._warn_grad_trouble()
        reduce_fn = _all_reduce if distributed else None
        # Trajectories serve only the TensorBoard views, which rank zero writes.
        tracks = self.tensorboard and trainer.is_global_zero
        read = self.recorder.running_confidence
        if tracks:
            self.history.before_epoch_end(read)
        folded = False
        write_history = self.history_on_disk and trainer.is_global_zero
        try:
            on_epoch = functools.partial(self._write_history, trainer) if write_history else None
            self.recorder.end_epoch(reduce_fn, on_epoch)
            folded = True
            self._warn_repeats(trainer)
            if tracks:
                self.history.after_epoch_end(read, self._last_epoch())
        finally:
            if trainer.is_global_zero:
                self._publish(trainer, decide=folded)
        policy = self.policy
        if policy is not None and policy.due(self.recorder.epochs_recorded):
            if trainer.world_size > 1:  # every rank applies rank zero's decisions
                state = policy.state_dict() if trainer.is_global_zero else None
                state = trainer.strategy.broadcast(state, src=0)
                if not trainer.is_global_zero:
                    policy.load_state_dict(state)
            self._warn_if_weights_unused()

    def _last_epoch(self) -> int:
        """The Trainer's number of the last recorded epoch (recorded epochs start at the
        window's start)."""
        recorded = self.recorder.epochs_recorded if self.recorder is not None else 0
        return recorded - 1 + self.epochs[0]

    def _in_window(self, trainer: pl.Trainer) -> bool:
        start, stop = self.epochs
        return start <= trainer.current_epoch < stop

    def _report_dir(self, trainer: pl.Trainer) -> Path:
        log_dir = self._log_dir or Path(trainer.default_root_dir)
        return log_dir / REPORT_DIRNAME / self.name

    def _write_history(self, trainer: pl.Trainer, table: pd.DataFrame) -> None:
        epoch = self._last_epoch() + 1  # called before the epoch is folded in
        path = self._report_dir(trainer) / HISTORY_DIRNAME / f"epoch_{epoch:04d}.parquet"
        write_report(table.assign(epoch=epoch), path, epoch=epoch)

    def _warn_repeats(self, trainer: pl.Trainer) -> None:
        """An IterableDataset that every worker (or rank) reads whole shows each sample
        several times an epoch; a repeat is averaged, so it counts once, but say so."""
        repeats = self.recorder.last_epoch_repeats if self.recorder is not None else 0
        if repeats and isinstance(_train_dataset(trainer), IterableDataset):
            rank_zero_warn(
                f"{repeats} sample ids came more than once in one epoch from an "
                "IterableDataset: is it replicated across DataLoader workers or ranks? Each "
                "repeat was averaged into one presentation. Shard the stream with "
                "torch.utils.data.get_worker_info() (and the rank) so each sample comes "
                "once per epoch."
            )

    def _join_ranks(self, trainer: pl.Trainer) -> None:
        """Every rank takes part in the epoch-end reduction, even one that recorded nothing
        yet: the ranks agree on the number of classes (one small collective), and a rank
        without a recorder makes an empty one. If no rank recorded anything, none reduces."""
        mine = self.recorder.num_classes if self.recorder is not None else None
        device = trainer.strategy.root_device
        shared = torch.tensor([mine or 0, len(self._string_ids)], device=device)
        agreed, strings = (int(v) for v in _all_reduce(shared, "max"))
        if strings:  # every rank raises: each numbered its strings in its own order
            raise ValueError(
                "String sample ids are not supported under DDP: every rank would map them "
                "to rows in its own order. Use integer ids (e.g. dataset indices)."
            )
        if agreed and self.recorder is None:
            self.recorder = self._new_recorder(trainer, agreed, device)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The last epoch always gets the review views and the projector.
        if not trainer.is_global_zero or self.recorder is None or not self.tensorboard:
            return
        writer = _tensorboard_writer(trainer)
        epoch = self._last_epoch()
        if writer is None or self.recorder.epochs_recorded == 0:
            return
        report = self._last_report
        if report is None or self._last_report_epoch != epoch:
            report = self._annotated(self.recorder.report())  # e.g. stopped before publishing
        if self._reviewed_epoch != epoch:
            self._review(trainer, writer, report, epoch)
        if self._projected_epoch != epoch:
            self._project(trainer, writer, report, epoch)

    def state_dict(self) -> dict[str, Any]:
        if self.recorder is None:
            state = dict(self._pending_state or {})
        else:
            state = {**self.recorder.state_dict(), "review_history": self.history.state_dict()}
        if self.policy is not None and self.policy.acted.size:
            state["actions"] = self.policy.state_dict()
        if self.partial_epochs:
            state["partial_epochs"] = list(self.partial_epochs)
        if self._string_ids:
            state["string_ids"] = list(self._string_ids)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        state = dict(state_dict)
        if "review_history" in state:
            self.history.load_state_dict(state.pop("review_history"))
        self.partial_epochs = list(state.pop("partial_epochs", []))
        self._string_ids = {k: i for i, k in enumerate(state.pop("string_ids", []))}
        actions = state.pop("actions", None)
        if actions is not None and self.policy is not None:
            self.policy.load_state_dict(actions)
        self._pending_state = state
        self.recorder = None

    def _publish(self, trainer: pl.Trainer, decide: bool) -> None:
        assert self.recorder is not None
        report = self.recorder.report()
        epoch = self._last_epoch()
        policy = self.policy
        if decide and policy is not None and policy.due(self.recorder.epochs_recorded):
            policy.decide(report, epoch, self.recorder.num_samples)
        report = self._annotated(report)
        if self.write_report:
            self.report_path = write_report(
                self._with_string_ids(report),
                self._report_dir(trainer) / REPORT_FILENAME,
                epoch=epoch,
                epochs_recorded=self.recorder.epochs_recorded,
                num_samples=self.recorder.num_samples,
                num_classes=self.recorder.num_classes,
                **self._grad_norm_metadata(),
                epochs_window=list(self.epochs) if self.epochs != _ALL_EPOCHS else None,
                partial_epochs=self.partial_epochs,
                statistics_from="training forward pass",
            )
        writer = _tensorboard_writer(trainer) if self.tensorboard else None
        if writer is not None:
            # Kept for the end of training, which reviews the last epoch without rescoring.
            self._last_report, self._last_report_epoch = report, epoch
            self.history.watch(
                flagged_rows(report, "mislabeled", 2 * self.top_k)["sample_id"].tolist()
                + flagged_rows(report, "hard", self.top_k)["sample_id"].tolist(),
                self.recorder.running_confidence,
                epoch,
            )
            log_epoch(writer, report, step=epoch, data_map=False, prefix=self._prefix)
            if policy is not None:
                log_actions(
                    writer,
                    report,
                    epoch,
                    policy.counter_name,
                    noise_mask=self.noise_mask,
                    prefix=self._prefix,
                )
            if self._review_due(epoch):
                self._review(trainer, writer, report, epoch)
            every = self.projector_every_n_epochs
            if every is not None and (epoch + 1) % every == 0:
                self._project(trainer, writer, report, epoch)
        flagged = report["flag"].value_counts().to_dict()
        log.info("torchdebug epoch %d: %s", epoch, flagged)

    def _review(self, trainer: pl.Trainer, writer: Any, report: pd.DataFrame, epoch: int) -> None:
        """Writes the review views and the data map; schedules the next review."""
        started = time.perf_counter()
        if not self._layout_written:
            log_custom_scalars(writer, prefix=self._prefix)
            self._layout_written = True
        log_epoch(writer, report, step=epoch, data_map=True, scalars=False, prefix=self._prefix)
        log_review(
            writer,
            report,
            epoch,
            top_k=self.top_k,
            history=self.history,
            noise_mask=self.noise_mask,
            prefix=self._prefix,
            **self._sample_display(trainer),
        )
        self._reviewed_epoch = epoch
        self._review_seconds = time.perf_counter() - started
        self._review_credit -= self._review_seconds
        if self.review_every_n_epochs is not None:
            self._next_review = epoch + self.review_every_n_epochs

    def _review_due(self, epoch: int) -> bool:
        """Fixed cadence, or adaptive: review once the budget earned by training (a share
        of each epoch's time) pays for a review as long as the last one took."""
        if self.review_every_n_epochs is not None:
            return epoch >= self._next_review
        self._review_credit += _REVIEW_BUDGET * self._epoch_seconds
        return self._review_credit >= self._review_seconds

    def _project(self, trainer: pl.Trainer, writer: Any, report: pd.DataFrame, epoch: int) -> None:
        log_projector(
            writer,
            report,
            epoch,
            max_points=self.projector_max_points,
            prefix=self._prefix,
            **self._sample_display(trainer),
        )
        self._projected_epoch = epoch

    def _annotated(self, report: pd.DataFrame) -> pd.DataFrame:
        """The recorder's report with the action columns, and epochs numbered as the
        Trainer numbers them."""
        if self.epochs[0]:
            report = report.assign(
                first_learned_epoch=report["first_learned_epoch"] + self.epochs[0]
            )
        return self.policy.annotate(report) if self.policy is not None else report

    def _with_string_ids(self, report: pd.DataFrame) -> pd.DataFrame:
        """The report as users see it: string sample ids where the batches gave strings
        (inside, and in the TensorBoard views, a sample is its row number)."""
        if not self._string_ids:
            return report
        names = np.array(list(self._string_ids), dtype=object)
        return report.assign(sample_id=names[report["sample_id"].to_numpy()])

    def _as_ids(self, values: Any) -> Tensor:
        """Integer ids as they are; string ids mapped to rows in order of first sight."""
        if isinstance(values, np.ndarray) and values.dtype.kind in "US":
            values = values.tolist()
        if not (isinstance(values, (list, tuple)) and values and isinstance(values[0], str)):
            return as_id_tensor(values)
        rows = self._string_ids
        for value in values:
            if value not in rows:
                if len(rows) >= self._capacity:
                    raise ValueError(
                        f"Sample id {value!r} is the {len(rows) + 1}th distinct string id, but "
                        f"the training set has {self._capacity} samples. Pass "
                        "TrainingDynamics(num_samples=...) covering every distinct id."
                    )
                rows[value] = len(rows)
        return torch.tensor([rows[v] for v in values], dtype=torch.long)

    def _apply_actions(self, trainer: pl.Trainer, batch: Any) -> None:
        """Before ``training_step``: the batch's weights, and its relabelled targets."""
        policy = self.policy
        assert policy is not None
        if policy.action == "drop":
            if self._sampler is None and not policy.dry_run:
                reason = self._sampler_error or "no train DataLoader sampler was found."
                raise TypeError(
                    "action='drop' removes samples through the train DataLoader's sampler, "
                    f"which torchdebug cannot control here: {reason} Use action='reweight' "
                    "(one changed line in training_step) or a map-style dataset."
                )
            return
        sampled = self._sampler.peek() if self._sampler is not None else None
        try:
            ids = self._ids(None, batch, sampled, rows=None)
        except (RuntimeError, TypeError) as err:
            raise TypeError(
                f"action={policy.action!r} needs each batch's sample ids before training_step"
                f" (from get_ids, an 'index' key of the batch or the sampler): {err}"
            ) from err
        if policy.action == "reweight":
            self._batch_weights = policy.batch_weights(ids)
            return
        substitute = policy.batch_targets(ids)
        if substitute is None:
            return
        targets = self._targets(None, batch)
        given = targets.clone()
        substitute = substitute.to(targets.device)
        targets.copy_(torch.where(substitute < 0, targets, substitute))
        if not torch.equal(self._targets(None, batch), targets):
            raise TypeError(
                "action='relabel' substitutes labels in the batch's label tensor, but the "
                "labels torchdebug reads are a copy (get_targets returned a new tensor, or "
                "the batch holds no tensor of labels). Return the batch's own label tensor "
                "from get_targets, or use action='reweight'."
            )
        self._given_targets = given

    def _provide_batch_weights(self) -> Tensor | None:
        """The current batch's weights, for ``torchdebug.weighted_loss``."""
        if self.policy is None or self.policy.action != "reweight" or self.policy.dry_run:
            return None
        self._weights_taken = True
        return self._batch_weights

    def _warn_if_weights_unused(self) -> None:
        policy = self.policy
        if policy is None or policy.action != "reweight" or policy.dry_run:
            return
        if not self._weights_taken and policy.counts():
            rank_zero_warn(
                "TrainingDynamics(action='reweight') chose weights, but training_step did "
                "not ask for them, so they do not reach the loss. Use loss = "
                "torchdebug.weighted_loss(F.cross_entropy(logits, y, reduction='none'), self)."
            )
        self._weights_taken = False

    def _check_dropped(self, ids: Tensor, sampled: list[int] | None) -> None:
        """A dropped sample in a batch means the ids are not the sampler's indices."""
        dropped = self.policy.dropped() if self.policy is not None else None
        if dropped is None:
            return
        host = ids.detach().cpu().numpy()
        inside = (host >= 0) & (host < dropped.size)
        hit = host[inside][dropped[host[inside]]]
        if hit.size:
            raise RuntimeError(
                f"Sample id {int(hit[0])} was dropped but is in a training batch: the batch "
                "ids are not the dataset indices the sampler draws (sampler drew "
                f"{'nothing' if sampled is None else sampled[:4]}...). action='drop' needs "
                "ids that are dataset indices; drop get_ids/'index', or use "
                "action='reweight'."
            )

    def _parameter_grad_norms(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Per-row norms of the cross-entropy gradient over the chosen parameters.

        ``last_layer`` needs no backward: the final layer's per-sample gradient is the
        outer product of the cross-entropy logits gradient ``d = softmax(z) - onehot(y)``
        and its input. ``full`` takes the norms of the training loss's own per-row
        gradients and divides each row by its scale ``c = <G, d> / ||d||^2``, where ``G`` is
        that row's gradient with respect to the logits: this undoes the loss reduction,
        gradient accumulation, a loss scaler and per-sample weights alike."""
        taps = self._taps
        assert taps is not None
        safe = targets.to(logits.device).long().clamp(0, logits.shape[1] - 1)
        d = ce_logits_grad(logits, safe)
        if taps.mode == "last_layer":
            return taps.last_layer_sq(logits, d).sqrt()
        taps.finish_backward()  # if no on_after_backward ran (e.g. a custom loop)
        grad = taps.output_grad(logits)
        if taps.raw_sq is None or grad is None:
            raise ValueError(
                "grad_norm='full' caught no gradient for the logits of this step: the "
                "logits must be the output of a module called in training_step, and the "
                "step's backward must run on a loss of them. Use grad_norm='last_layer'."
            )
        # cos^2 below 1 - 1e-4 (float32) or 1 - 2e-2 (half-precision gradients) is trouble.
        tolerance = 2e-2 if grad.dtype in _HALF else 1e-4
        grad = grad.float()
        dd, gd, gg = d.square().sum(1), (grad * d).sum(1), grad.square().sum(1)
        scale = gd / dd.clamp_min(torch.finfo(torch.float32).tiny)
        norms = torch.where(scale != 0, taps.raw_sq.sqrt() / scale.abs(), 0.0)
        # Rows whose gradient is not parallel to cross-entropy's, or that got none.
        trouble = ((gd.square() < (1 - tolerance) * gg * dd) & (gg > 0)) | ((gg == 0) & (dd > 0))
        count = trouble.sum()
        self._grad_trouble = count if self._grad_trouble is None else self._grad_trouble + count
        return norms

    def _warn_grad_trouble(self) -> None:
        if self._grad_trouble is None:
            return
        count, self._grad_trouble = int(self._grad_trouble), None
        if count:
            rank_zero_warn(
                f"grad_norm='full': in {count} rows this epoch the training loss's gradient at "
                "the logits was not a multiple of the cross-entropy gradient of the given "
                "label (label smoothing, another loss, extra terms on the logits, or a "
                "weight of zero), so their norms are approximate (zero where no gradient "
                "came). Use grad_norm='last_layer', which needs no backward, for exact "
                "cross-entropy norms."
            )

    def _grad_norm_metadata(self) -> dict[str, Any]:
        full = self._taps if self._taps is not None and self._taps.mode == "full" else None
        return {
            "grad_norm": self.grad_norm,
            "grad_norm_coverage": full.coverage if full is not None else None,
            "grad_norm_excluded": dict(full.excluded) if full is not None else {},
        }

    def _sample_display(self, trainer: pl.Trainer) -> dict[str, Any]:
        """How the views show a sample: its input, as an image, and class names."""
        return {
            "get_input": self._input_getter(trainer),
            "to_image": self.to_image,
            "class_names": self.class_names,
        }

    def _input_getter(self, trainer: pl.Trainer) -> Callable[[int], Any] | None:
        """The user's ``get_input``, else a lookup in the train dataset by index."""
        if self.get_input is not None:
            return self.get_input
        if self.get_ids is not None or self._string_ids:
            return None  # ids are the user's, not dataset indices
        dataset = _train_dataset(trainer)
        if dataset is None or isinstance(dataset, IterableDataset):
            return None  # no item to look up by index (Dataset.__getitem__ only raises)
        if not hasattr(dataset, "__getitem__"):
            return None
        return functools.partial(_lookup_input, dataset)

    def _ensure_recorder(self, trainer: pl.Trainer, logits: Tensor) -> DynamicsRecorder:
        if self.recorder is None:
            self.recorder = self._new_recorder(trainer, logits.shape[1], logits.device)
        return self.recorder

    def _new_recorder(
        self, trainer: pl.Trainer, num_classes: int, device: torch.device
    ) -> DynamicsRecorder:
        """A recorder for the train set, holding the checkpoint's state on a resume."""
        num_samples = self.num_samples or _train_dataset_size(trainer)
        if num_samples is None:
            raise ValueError(
                "torchdebug cannot tell how many samples the training set has. Pass "
                "TrainingDynamics(num_samples=...) covering every sample id."
            )
        if self.noise_mask is not None and len(self.noise_mask) != num_samples:
            raise ValueError(
                f"noise_mask has {len(self.noise_mask)} entries but the training set has "
                f"{num_samples} sample ids; pass one boolean per sample id."
            )
        recorder = DynamicsRecorder(
            num_samples, num_classes, device=device, ignore_index=self.ignore_index
        )
        if self._pending_state is not None:
            recorder.load_state_dict(self._pending_state)
            self._pending_state = None
            if recorder.epoch_in_progress:
                # A mid-epoch checkpoint: Lightning restarts the loader and runs the epoch's
                # remaining steps, replaying its first batches. Their earlier presentations
                # are dropped so none counts twice; the epoch is marked partial.
                recorder.discard_epoch()
                self.partial_epochs.append(recorder.epochs_recorded)
        return recorder

    def _targets(self, outputs: Any, batch: Any) -> Tensor:
        if self.get_targets is not None:
            return torch.as_tensor(self.get_targets(batch))
        if isinstance(outputs, Mapping):
            for key in ("targets", "target"):
                if isinstance(outputs.get(key), Tensor):
                    return outputs[key]
        found, where = _targets_from_batch(batch)
        if found is not None and (found.is_floating_point() or found.dim() != 1):
            raise ValueError(
                f"torchdebug took the labels from {where} and found a {found.dtype} tensor "
                f"of shape {tuple(found.shape)}, not integer class labels of shape [batch]. "
                "If the labels are elsewhere in the batch, pass get_targets=lambda batch: ... "
                "to TrainingDynamics; soft, mixed and multi-label targets are not supported "
                "yet."
            )
        if found is None:
            raise ValueError(
                "torchdebug could not find the labels in the batch: expected a tuple "
                f"(inputs, labels, ...) or a dict with one of the keys {list(TARGET_KEYS)}. "
                "Return {'loss': loss, 'targets': y} from training_step or pass "
                "get_targets=lambda batch: ... to TrainingDynamics."
            )
        return found

    def _ids(self, outputs: Any, batch: Any, sampled: list[int] | None, rows: int | None) -> Tensor:
        if self.get_ids is not None:
            return self._as_ids(self.get_ids(batch))
        for source in (outputs, batch):
            if isinstance(source, Mapping):
                for key in _ID_KEYS:
                    if key in source:
                        return self._as_ids(source[key])
        if sampled is not None:
            if rows is not None and len(sampled) != rows:
                raise RuntimeError(
                    f"The sampler drew {len(sampled)} indices for a batch of {rows} rows; a "
                    "collate_fn that adds or drops rows breaks id capture. Put an 'index' "
                    "entry in each batch or pass get_ids= to TrainingDynamics."
                )
            return torch.tensor(sampled, dtype=torch.long)
        if self._sampler_error is not None:
            raise TypeError(
                f"torchdebug cannot tell which samples are in the batch: {self._sampler_error}"
            ) from self._sampler_error
        raise RuntimeError(
            "torchdebug received a training batch that the train DataLoader's sampler did "
            "not draw. Put an 'index' entry in each batch or pass get_ids= to "
            "TrainingDynamics."
        )

    def _hook_dataloader_setup(self, trainer: pl.Trainer) -> None:
        """Wraps the train loader's batch sampler each time Lightning builds the loader.

        The wrapper must be in place before the first iterator is created (workers start
        prefetching at once), which happens inside the fit loop's data setup, before any
        callback hook. The fit loop restores loader state right before creating it, so the
        wrapper is installed from there.
        """
        fit_loop = trainer.fit_loop
        original = getattr(type(fit_loop), "_load_combined_loader_states", None)
        previous = fit_loop.__dict__.get("_load_combined_loader_states")  # another instance
        if original is None:
            raise RuntimeError(
                f"This Lightning version ({pl.__version__}) has no hook torchdebug can use to "
                "record sample ids. Put an 'index' entry in each batch or pass get_ids=."
            )

        def install_then_restore() -> None:
            self._install_sampler(fit_loop._combined_loader)
            if previous is not None:
                previous()
            else:
                original(fit_loop)

        fit_loop._load_combined_loader_states = install_then_restore
        self._fit_loop = fit_loop

    def _install_sampler(self, combined_loader: Any) -> None:
        loaders = list(getattr(combined_loader, "flattened", []) or [])
        if not loaders:
            return
        if len(loaders) > 1:
            rank_zero_warn("torchdebug tracks only the first of several train dataloaders.")
        try:
            record_indices(loaders[0], self._ids_queue)
            self._sampler, self._sampler_error = self._ids_queue, None
        except TypeError as err:
            self._sampler, self._sampler_error = None, err

    def _dropped(self) -> np.ndarray | None:
        return self.policy.dropped() if self.policy is not None else None


class _LogitsCapture:
    """Forward hooks that keep the classifier output produced during a train step.

    The module's own output wins. Otherwise the direct children's ``[batch, k]`` outputs
    (``k >= 2``) are candidates; when children of different widths produce them, which one
    holds the logits cannot be told, and an error asks for ``logits_module``.
    """

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._armed = False
        self._root: Tensor | None = None
        self._children: dict[str, Tensor] = {}
        self._watch: Callable[[Tensor], None] | None = None

    def attach(
        self,
        pl_module: nn.Module,
        name: str | None,
        watch: Callable[[Tensor], None] | None = None,
    ) -> None:
        """Hooks the module (or ``name``); ``watch`` is told of every candidate kept."""
        self.detach()
        self._watch = watch
        if name is not None:
            module = pl_module.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._keep_root))
            return
        self._handles.append(pl_module.register_forward_hook(self._keep_root))
        for child_name, child in pl_module.named_children():
            hook = functools.partial(self._keep_child, child_name)
            self._handles.append(child.register_forward_hook(hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def arm(self) -> None:
        self._armed, self._root, self._children = True, None, {}

    def disarm(self, needed: bool = True) -> Tensor | None:
        """Stops capturing; returns the logits of the step (``None`` if none or not needed)."""
        self._armed = False
        root, children = self._root, self._children
        self._root, self._children = None, {}
        if root is not None or not needed:
            return root
        widths = {tensor.shape[1] for tensor in children.values()}
        if len(widths) > 1:
            found = ", ".join(f"{name!r} {list(t.shape)}" for name, t in children.items())
            raise ValueError(
                "torchdebug cannot tell which output holds the logits: the module's forward "
                f"returned no single tensor, and several submodules gave [batch, k] outputs "
                f"({found}). Name the classifier with TrainingDynamics(logits_module=...) or "
                "return {'loss': loss, 'logits': logits} from training_step."
            )
        return next(reversed(children.values()), None)

    def _keep_root(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._armed and _looks_like_logits(output):
            self._root = output
            if self._watch is not None:
                self._watch(output)

    def _keep_child(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        if self._armed and _looks_like_logits(output) and output.shape[1] >= 2:
            self._children[name] = output
            if self._watch is not None:
                self._watch(output)


_ALL_EPOCHS = (0, 2**62)


def _epoch_window(epochs: int | tuple[int, int] | None) -> tuple[int, int]:
    if epochs is None:
        return _ALL_EPOCHS
    start, stop = (0, epochs) if isinstance(epochs, int) else tuple(epochs)
    if not 0 <= start < stop:
        raise ValueError(
            f"epochs must be N >= 1 (the first N epochs) or (start, stop) with "
            f"0 <= start < stop, got {epochs!r}."
        )
    return int(start), int(stop)


def _refuse_compiled(pl_module: nn.Module, mode: str) -> None:
    """Parameter-gradient modes hook layers in eager mode; compiled code skips the hooks."""
    compiled = [n for n, m in pl_module.named_modules() if type(m).__name__ == "OptimizedModule"]
    if compiled or getattr(pl_module, "_compiler_ctx", None):
        where = f" (compiled: {', '.join(compiled)})" if compiled else ""
        raise ValueError(
            f"grad_norm={mode!r} reads layer activations through eager-mode hooks, which "
            f"torch.compile does not run{where}. Train without torch.compile for these "
            "norms, or use grad_norm='logits', which works compiled."
        )


def _skipped(pl_module: pl.LightningModule, outputs: Any) -> bool:
    """Whether ``training_step`` returned ``None``, which skips the batch's update."""
    if not pl_module.automatic_optimization:
        return False  # a manual step returns nothing and still trains
    return outputs is None or (isinstance(outputs, Mapping) and outputs.get("loss") is None)


def _looks_like_logits(output: Any) -> bool:
    return isinstance(output, Tensor) and output.dim() == 2 and output.is_floating_point()


def _no_logits_error(logits_module: str | None) -> ValueError:
    where = f"submodule {logits_module!r}" if logits_module else "module or its children"
    return ValueError(
        f"torchdebug saw no [batch, classes] logits from the {where} during training_step. "
        "Return {'loss': loss, 'logits': logits} from training_step, or name the classifier "
        "with TrainingDynamics(logits_module='...')."
    )


def _targets_from_batch(batch: Any) -> tuple[Tensor | None, str]:
    """The labels of a batch by convention, and where they were found."""
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if key in batch:
                return torch.as_tensor(batch[key]), f"the batch's {key!r} key"
        return None, ""
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
        return torch.as_tensor(batch[1]), "the batch's second item"
    return None, ""


def _train_dataset(trainer: pl.Trainer) -> Any:
    loader = trainer.train_dataloader
    loaders = getattr(loader, "flattened", None) or [loader]
    return getattr(loaders[0], "dataset", None)


def _train_dataset_size(trainer: pl.Trainer) -> int | None:
    try:
        return len(_train_dataset(trainer))
    except TypeError:
        return None


def _lookup_input(dataset: Any, sample_id: int) -> Any:
    """A dataset item's input, leaving the random generators as they were: a random
    augmentation in ``__getitem__`` must not shift the training's random stream."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            return _input_of(dataset[sample_id])
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _input_of(item: Any) -> Any:
    """The input part of a dataset item: first of a tuple, or a known key of a dict."""
    if isinstance(item, Mapping):
        return next((item[key] for key in _INPUT_KEYS if key in item), None)
    if isinstance(item, (tuple, list)):
        return item[0] if item else None
    return item


def _tensorboard_writer(trainer: pl.Trainer) -> Any:
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _all_reduce(tensor: Tensor, op: str) -> Tensor:
    # Backends lack small integer types; int64 and float32 travel everywhere.
    wide = tensor.to(torch.int64) if not tensor.is_floating_point() else tensor.clone()
    reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    dist.all_reduce(wide, op=reduce_op)
    return wide.to(tensor.dtype)
