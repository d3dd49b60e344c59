"""The framework-free core: per-sample training dynamics kept in device tensors.

``DynamicsRecorder`` holds two groups of tensors indexed by sample id. The *epoch*
accumulators collect every presentation of the running epoch with scatter-adds; at
``end_epoch()`` they are folded into the *running aggregates* from which every score is
computed. All per-batch work is a handful of vector operations on the logits' device:
no host synchronisation, no boolean-mask indexing and no Python loop over samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from torchdebug.scores import UNSUPERVISED_LABEL, Aggregates, build_report

__all__ = ["DynamicsRecorder", "SampleError", "presentation_stats"]

log = logging.getLogger(__name__)

ReduceFn = Callable[[Tensor, str], Tensor]

# Epoch accumulators: name -> (dtype, fill value, reduction across ranks).
_EPOCH_FIELDS: dict[str, tuple[torch.dtype, float, str]] = {
    "count": (torch.int16, 0, "sum"),
    "loss": (torch.float32, 0.0, "sum"),
    "prob": (torch.float32, 0.0, "sum"),
    "margin": (torch.float32, 0.0, "sum"),
    "grad": (torch.float32, 0.0, "sum"),
    "correct": (torch.int16, 0, "sum"),
    "other": (torch.int16, -1, "max"),
    # Non-finite presentations this epoch, one byte; _check_counters catches a wrap-around.
    "nonfinite": (torch.uint8, 0, "sum"),
}
# Running aggregates over epochs: name -> (dtype, fill value).
_AGGREGATE_FIELDS: dict[str, tuple[torch.dtype, float]] = {
    "epochs_seen": (torch.int16, 0),
    "loss_sum": (torch.float32, 0.0),
    "conf_mean": (torch.float32, 0.0),
    "conf_m2": (torch.float32, 0.0),
    "correct_sum": (torch.float32, 0.0),
    "margin_sum": (torch.float32, 0.0),
    "grad_sum": (torch.float32, 0.0),
    "forgetting": (torch.int16, 0),
    "first_learned": (torch.int16, -1),
    "last_correct": (torch.int8, -1),
    "vote_class": (torch.int16, -1),
    "vote_count": (torch.int16, 0),
    "label": (torch.int16, -1),
    "prediction": (torch.int16, -1),
    "nonfinite": (torch.int16, 0),
}
# Bookkeeping of bad input, reduced across ranks with the epoch accumulators.
_NO_ID = -(2**62)  # "no bad row yet"
# One-element counters, reduced across ranks with the epoch accumulators: name ->
# (reduction, fill value). Bookkeeping of bad input, and the rows recorded this epoch
# (to catch a per-sample counter that wrapped around).
_COUNTERS: dict[str, tuple[str, int]] = {
    "bad_count": ("sum", 0),
    "bad_id": ("max", _NO_ID),
    "bad_label": ("max", 0),
    "rows": ("sum", 0),
    "nonfinite_rows": ("sum", 0),
}
_ALL_FIELDS = {**{f"epoch_{k}": v[:2] for k, v in _EPOCH_FIELDS.items()}, **_AGGREGATE_FIELDS}
_MAX_CLASSES = torch.iinfo(torch.int16).max
_MEANS = ("loss", "prob", "margin", "correct", "grad")


class SampleError(ValueError):
    """Raised for bad per-sample input (an id or label out of range); names the sample."""


def presentation_stats(logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Per-row statistics of one presentation, computed in float32.

    For logits ``z`` and given label ``y`` of each row:

    - ``loss = -log softmax(z)[y]`` (cross-entropy),
    - ``prob = softmax(z)[y]``,
    - ``margin = z[y] - max_{k != y} z[k]`` and ``other`` the arg-max of that maximum,
    - ``prediction = argmax_k z[k]``, ``correct = prediction == y``,
    - ``grad = ||softmax(z) - onehot(y)||_2``, the exact norm of the cross-entropy
      gradient with respect to the logits.

    Args:
        logits: ``[batch, classes]`` logits of any floating dtype.
        targets: ``[batch]`` integer labels, all in ``[0, classes)``.

    Returns:
        A dict of ``[batch]`` tensors keyed as above.

    Example::

        >>> stats = presentation_stats(torch.tensor([[2.0, 0.0]]), torch.tensor([1]))
        >>> round(stats["margin"].item(), 3)
        -2.0
    """
    z = logits.detach().float()
    y = targets.long().unsqueeze(1)
    log_p = torch.log_softmax(z, dim=1)
    p = log_p.exp()
    prob = p.gather(1, y).squeeze(1)
    others = z.scatter(1, y, float("-inf"))
    other_logit, other = others.max(dim=1)
    prediction = z.argmax(dim=1)
    grad_sq = (p * p).sum(dim=1) - 2.0 * prob + 1.0
    return {
        "loss": -log_p.gather(1, y).squeeze(1),
        "prob": prob,
        "margin": z.gather(1, y).squeeze(1) - other_logit,
        "other": other,
        "prediction": prediction,
        "correct": prediction == y.squeeze(1),
        "grad": grad_sq.clamp_min(0.0).sqrt(),
    }


class DynamicsRecorder:
    """Records per-sample training dynamics in preallocated tensors on the training device.

    Use it in any training loop: call :meth:`update` with the sample ids, logits and labels
    of each training batch, :meth:`end_epoch` after each epoch, and :meth:`report` for the
    per-sample table. The column formulas are documented in :func:`torchdebug.scores.build_report`.

    A sample presented several times in one epoch contributes the mean of those
    presentations to that epoch; a sample not presented in an epoch is not counted for it.

    Bad input never corrupts recorded numbers: rows with an id outside ``[0, num_samples)``,
    a label outside ``[0, num_classes)`` or non-finite logits are routed to a spare slot.
    Out-of-range ids and labels raise :class:`SampleError` naming the sample: at once when
    the tensors are on the CPU, otherwise at the next :meth:`end_epoch` (checking earlier on
    an accelerator would stall every step). Non-finite rows are counted per sample.

    Args:
        num_samples: Number of training samples; ids are integers in ``[0, num_samples)``.
        num_classes: Number of classes; inferred from the first logits when ``None``.
        device: Device of the state; the first logits' device when ``None``.
        ignore_index: A label meaning "no label" (as in ``F.cross_entropy``): such rows are
            not recorded and not an error; a sample only ever presented with it is
            reported with the flag ``"unsupervised"``.

    Example::

        >>> rec = DynamicsRecorder(num_samples=4)
        >>> rec.update(torch.tensor([0, 1]), torch.randn(2, 3), torch.tensor([2, 0]))
        >>> rec.end_epoch()
        >>> rec.report()["epochs_seen"].tolist()
        [1, 1]
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int | None = None,
        device: torch.device | str | None = None,
        ignore_index: int | None = None,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}.")
        if num_classes is not None and not 2 <= num_classes <= _MAX_CLASSES:
            raise ValueError(f"num_classes must be in [2, {_MAX_CLASSES}], got {num_classes}.")
        self.num_samples = int(num_samples)
        self.num_classes = num_classes
        self.device = torch.device(device) if device is not None else None
        self.ignore_index = ignore_index
        self.epochs_recorded = 0
        self.last_epoch_repeats = 0
        self._state: dict[str, Tensor] = {}
        if num_classes is not None and device is not None:
            self._allocate(self.device)

    @property
    def state_bytes_per_sample(self) -> float:
        """Bytes of device state per tracked sample (epoch accumulators and aggregates)."""
        size = sum(_ALL_FIELDS[k][0].itemsize for k in _ALL_FIELDS)
        return float(size)

    def update(
        self,
        ids: Tensor,
        logits: Tensor,
        targets: Tensor,
        loss: Tensor | None = None,
        grad_norm: Tensor | None = None,
        keep: Tensor | None = None,
    ) -> None:
        """Adds one training batch to the running epoch.

        Args:
            ids: ``[batch]`` integer sample ids in ``[0, num_samples)``.
            logits: ``[batch, classes]`` logits from the training forward pass.
            targets: ``[batch]`` integer labels in ``[0, classes)``.
            loss: Optional ``[batch]`` per-sample losses replacing the cross-entropy.
            grad_norm: Optional ``[batch]`` per-sample gradient norms replacing the norm of
                the cross-entropy gradient with respect to the logits.
            keep: Optional ``[batch]`` booleans; rows where it is False are not recorded
                (e.g. the padding repeats of a ``DistributedSampler``).

        Raises:
            ValueError: If shapes disagree or the logits are not ``[batch, classes]``.
            SampleError: (CPU tensors) if an id or a label is out of range.
        """
        self._check_shapes(ids, logits, targets)
        if not self._state:
            self._infer_and_allocate(logits)
        ids = ids.to(self.device, non_blocking=True).long()
        targets = targets.to(self.device, non_blocking=True).long()
        logits = logits.to(self.device, non_blocking=True)

        valid_id = (ids >= 0) & (ids < self.num_samples)
        valid_label = (targets >= 0) & (targets < self.num_classes)
        finite = torch.isfinite(logits).all(dim=1)
        ignored = targets == self.ignore_index if self.ignore_index is not None else None
        bad_input = ~(valid_id & (valid_label if ignored is None else valid_label | ignored))
        self._note_bad_input(ids, targets, bad_input)

        # Rows that must not touch real samples go to the spare slot at index num_samples.
        spare = torch.full_like(ids, self.num_samples)
        if keep is not None:
            valid_id = valid_id & keep.to(self.device, non_blocking=True)
        if ignored is not None:
            self._mark_unsupervised(torch.where(valid_id & ignored, ids, spare))
            valid_label = valid_label & ~ignored
        slot = torch.where(valid_id & valid_label & finite, ids, spare)
        safe_targets = targets.clamp(0, self.num_classes - 1)
        stats = presentation_stats(torch.nan_to_num(logits.float()), safe_targets)
        if loss is not None:
            stats["loss"] = loss.detach().float().to(self.device).reshape(-1)
        if grad_norm is not None:
            stats["grad"] = grad_norm.detach().float().to(self.device).reshape(-1)

        s = self._state
        one = torch.ones_like(ids, dtype=torch.int16)
        s["epoch_count"].index_add_(0, slot, one)
        for name in ("loss", "prob", "margin", "grad"):
            s[f"epoch_{name}"].index_add_(0, slot, stats[name])
        s["epoch_correct"].index_add_(0, slot, stats["correct"].to(torch.int16))
        s["epoch_other"].index_copy_(0, slot, stats["other"].to(torch.int16))
        s["prediction"].index_copy_(0, slot, stats["prediction"].to(torch.int16))
        s["label"].index_copy_(0, slot, safe_targets.to(torch.int16))

        nonfinite_slot = torch.where(valid_id & ~finite, ids, spare)
        s["epoch_nonfinite"].index_add_(0, nonfinite_slot, one.to(torch.uint8))
        s["rows"].add_((slot < self.num_samples).sum())
        s["nonfinite_rows"].add_((nonfinite_slot < self.num_samples).sum())

    def _mark_unsupervised(self, slot: Tensor) -> None:
        """A sample never given a real label gets the label ``UNSUPERVISED_LABEL``."""
        label = self._state["label"]
        current = label.gather(0, slot)
        marker = torch.where(current < 0, UNSUPERVISED_LABEL, current).to(label.dtype)
        label.index_copy_(0, slot, marker)

    def end_epoch(
        self,
        reduce_fn: ReduceFn | None = None,
        on_epoch: Callable[[pd.DataFrame], None] | None = None,
    ) -> None:
        """Folds the running epoch into the aggregates and starts a new epoch.

        Afterwards :attr:`last_epoch_repeats` holds the number of samples presented more
        than once in the epoch (over all ranks).

        Args:
            reduce_fn: For distributed training, ``reduce_fn(tensor, op)`` with ``op`` in
                ``{"sum", "max"}`` returning the tensor reduced over all ranks. Every rank
                must call ``end_epoch`` with the same ``reduce_fn``.
            on_epoch: Given the epoch's own per-sample table (see :meth:`_epoch_table`),
                e.g. to stream a history to disk, before it is folded in.

        Raises:
            SampleError: If an id or label was out of range during the epoch (the epoch's
                valid rows are still folded in first, so nothing recorded is lost).
        """
        self.last_epoch_repeats = 0
        if not self._state:
            self.epochs_recorded += 1
            return
        s = self._state
        if reduce_fn is not None:
            self._reduce_last_seen(reduce_fn)
            for name, (_, _, op) in _EPOCH_FIELDS.items():
                s[f"epoch_{name}"].copy_(reduce_fn(s[f"epoch_{name}"], op))
            for name, (op, _) in _COUNTERS.items():
                s[name].copy_(reduce_fn(s[name], op))
        self._check_counters()
        self.last_epoch_repeats = int((s["epoch_count"][: self.num_samples] > 1).sum())
        if on_epoch is not None:
            on_epoch(self._epoch_table())
        self._fold_epoch()
        self.epochs_recorded += 1
        self._raise_bad_input()

    def report(self) -> pd.DataFrame:
        """Returns the per-sample table: one row per sample seen in at least one epoch.

        Only completed epochs count; call :meth:`end_epoch` first.
        """
        return build_report(self.aggregates())

    def aggregates(self) -> Aggregates:
        """Copies the running aggregates to host memory (numpy arrays over real samples)."""
        if not self._state:
            return Aggregates.empty(self.epochs_recorded)
        n = self.num_samples
        arrays = {k: self._state[k][:n].cpu().numpy() for k in _AGGREGATE_FIELDS}
        return Aggregates(
            epochs_recorded=self.epochs_recorded,
            num_classes=int(self.num_classes or 0),
            arrays=arrays,
        )

    def running_confidence(self, ids: list[int]) -> tuple[Any, Any]:
        """Running mean confidence and epochs seen of a few samples, as numpy arrays."""
        if not self._state or not ids:
            return torch.zeros(len(ids)).numpy(), torch.zeros(len(ids)).numpy()
        index = torch.as_tensor(ids, dtype=torch.long, device=self._state["conf_mean"].device)
        conf = self._state["conf_mean"][index].cpu().double().numpy()
        seen = self._state["epochs_seen"][index].cpu().double().numpy()
        return conf, seen

    def state_dict(self) -> dict[str, Any]:
        """Returns the full state (tensors on the CPU), for checkpoints."""
        return {
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "epochs_recorded": self.epochs_recorded,
            "tensors": {k: v.detach().cpu().clone() for k, v in self._state.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a state from :meth:`state_dict`, on this recorder's device.

        Raises:
            ValueError: If the state was recorded for a different number of samples.
        """
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"The checkpoint's recorder tracked {state['num_samples']} samples but this "
                f"dataset has {self.num_samples}; resume with the same training dataset."
            )
        self.num_classes = state["num_classes"]
        self.epochs_recorded = int(state["epochs_recorded"])
        tensors = state["tensors"]
        if not tensors:
            self._state = {}
            return
        device = self.device or torch.device("cpu")
        self.device = device
        self._state = {k: v.to(device).clone() for k, v in tensors.items()}
        self._add_counters(device)  # the row counters are absent from older checkpoints

    def _check_shapes(self, ids: Tensor, logits: Tensor, targets: Tensor) -> None:
        if logits.dim() != 2:
            raise ValueError(
                f"Expected logits of shape [batch, classes], got {tuple(logits.shape)}. "
                "Flatten extra dimensions or pass the classifier's output."
            )
        if targets.dim() != 1 or targets.is_floating_point():
            raise ValueError(
                f"Expected integer class labels of shape [batch], got {targets.dtype} "
                f"{tuple(targets.shape)}. Soft or multi-label targets are not supported yet."
            )
        rows = logits.shape[0]
        if ids.shape != (rows,) or targets.shape[0] != rows:
            raise ValueError(
                f"ids {tuple(ids.shape)}, logits {tuple(logits.shape)} and targets "
                f"{tuple(targets.shape)} must have the same number of rows."
            )
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise ValueError(
                f"Logits have {logits.shape[1]} classes but the recorder was set up for "
                f"{self.num_classes}."
            )

    def _infer_and_allocate(self, logits: Tensor) -> None:
        if self.num_classes is None:
            self.num_classes = int(logits.shape[1])
            if not 2 <= self.num_classes <= _MAX_CLASSES:
                raise ValueError(f"Logits must have 2 to {_MAX_CLASSES} classes.")
        self._allocate(self.device or logits.device)

    def _allocate(self, device: torch.device) -> None:
        self.device = device
        size = self.num_samples + 1  # the last slot absorbs rows that must not count
        self._state = {
            name: torch.full((size,), fill, dtype=dtype, device=device)
            for name, (dtype, fill) in _ALL_FIELDS.items()
        }
        self._add_counters(device)
        log.debug("allocated %d samples x %d classes on %s", size, self.num_classes, device)

    def _add_counters(self, device: torch.device) -> None:
        for name, (_, fill) in _COUNTERS.items():
            if name not in self._state:
                self._state[name] = torch.full((1,), fill, dtype=torch.int64, device=device)

    def _note_bad_input(self, ids: Tensor, targets: Tensor, bad: Tensor) -> None:
        if ids.device.type == "cpu":
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise self._sample_error(int(ids[row]), int(targets[row]))
            return
        # On an accelerator, remember the first bad row without synchronising.
        s = self._state
        s["bad_count"].add_(bad.sum())
        key = torch.where(bad, ids, torch.full_like(ids, _NO_ID))
        row = key.argmax().unsqueeze(0)
        first = (s["bad_id"] == _NO_ID) & bad.any()
        s["bad_id"].copy_(torch.where(first, ids.gather(0, row), s["bad_id"]))
        s["bad_label"].copy_(torch.where(first, targets.gather(0, row), s["bad_label"]))

    def _raise_bad_input(self) -> None:
        s = self._state
        if int(s["bad_count"]) == 0:
            return
        count = int(s["bad_count"])
        error = self._sample_error(int(s["bad_id"]), int(s["bad_label"]), count)
        s["bad_count"].zero_()
        s["bad_id"].fill_(_NO_ID)
        raise error

    def _sample_error(self, sample_id: int, label: int, count: int = 1) -> SampleError:
        if not 0 <= sample_id < self.num_samples:
            what = (
                f"sample id {sample_id} is outside [0, {self.num_samples}): the recorder was "
                f"built for {self.num_samples} samples. Pass num_samples covering every id, or "
                "map ids to a contiguous range"
            )
        else:
            what = (
                f"sample {sample_id} has label {label}, outside [0, {self.num_classes}) for "
                f"logits with {self.num_classes} classes. Fix that sample's label, or give the "
                "model enough output classes"
            )
        more = f" ({count} bad rows in all; they were not recorded)" if count > 1 else ""
        return SampleError(f"{what}{more}.")

    def _epoch_table(self) -> pd.DataFrame:
        """The running epoch's per-sample means, for the samples presented in it:
        ``sample_id, epoch, presentations, loss, confidence, margin, correct, grad_norm``."""
        n = self.num_samples
        host = {k: self._state[f"epoch_{k}"][:n].cpu() for k in _EPOCH_FIELDS}
        count = host["count"].float()
        seen = torch.nonzero(count > 0).reshape(-1)
        mean = {k: (host[k].float()[seen] / count[seen]).numpy() for k in _MEANS}
        return pd.DataFrame(
            {
                "sample_id": seen.numpy(),
                "epoch": self.epochs_recorded,
                "presentations": host["count"][seen].numpy(),
                "loss": mean["loss"],
                "confidence": mean["prob"],
                "margin": mean["margin"],
                "correct": mean["correct"],
                "grad_norm": mean["grad"],
            }
        )

    def _reduce_last_seen(self, reduce_fn: ReduceFn) -> None:
        """Shares the label and prediction of samples seen this epoch with every rank."""
        s = self._state
        seen_here = s["epoch_count"] > 0
        for name in ("label", "prediction"):
            mine = torch.where(seen_here, s[name], torch.full_like(s[name], -1))
            everyone = reduce_fn(mine, "max")
            s[name].copy_(torch.where(everyone >= 0, everyone, s[name]))
        if self.ignore_index is not None:  # a sample unsupervised on one rank is for all
            marked = reduce_fn((s["label"] == UNSUPERVISED_LABEL).to(torch.int16), "max") > 0
            s["label"].copy_(torch.where(marked & (s["label"] < 0), UNSUPERVISED_LABEL, s["label"]))

    def _fold_epoch(self) -> None:
        s = self._state
        count = s["epoch_count"].float()
        seen = count > 0
        safe = count.clamp_min(1.0)
        prob = s["epoch_prob"] / safe
        correct_frac = s["epoch_correct"] / safe
        # A sample seen several times in an epoch is right for that epoch by majority.
        correct_now = (correct_frac >= 0.5).to(torch.int8)

        n_before = s["epochs_seen"].float()
        n_after = n_before + 1.0
        delta = prob - s["conf_mean"]
        new_mean = s["conf_mean"] + delta / n_after
        new_m2 = s["conf_m2"] + delta * (prob - new_mean)
        s["conf_mean"].copy_(torch.where(seen, new_mean, s["conf_mean"]))
        s["conf_m2"].copy_(torch.where(seen, new_m2, s["conf_m2"]))
        for name in ("loss", "margin", "grad"):
            s[f"{name}_sum"].add_(torch.where(seen, s[f"epoch_{name}"] / safe, 0.0))
        s["correct_sum"].add_(torch.where(seen, correct_frac, 0.0))
        s["nonfinite"].add_(s["epoch_nonfinite"].to(torch.int16))

        forgotten = seen & (s["last_correct"] == 1) & (correct_now == 0)
        s["forgetting"].add_(forgotten.to(torch.int16))
        learned_now = seen & (correct_now == 1) & (s["first_learned"] < 0)
        epoch = torch.tensor(self.epochs_recorded, dtype=torch.int16, device=count.device)
        s["first_learned"].copy_(torch.where(learned_now, epoch, s["first_learned"]))
        s["last_correct"].copy_(torch.where(seen, correct_now, s["last_correct"]))
        self._vote(seen, s["epoch_other"])
        s["epochs_seen"].add_(seen.to(torch.int16))

        self.discard_epoch()

    def discard_epoch(self) -> None:
        """Forgets the running epoch's presentations (the aggregates stay as they are)."""
        for name, (_, fill, _) in _EPOCH_FIELDS.items():
            if f"epoch_{name}" in self._state:
                self._state[f"epoch_{name}"].fill_(fill)
        for name in ("rows", "nonfinite_rows"):
            if name in self._state:
                self._state[name].zero_()

    def _check_counters(self) -> None:
        """The per-epoch counters are small integers (2 bytes of presentations, 1 byte of
        non-finite ones, per sample): if one wrapped around, the epoch's numbers for that
        sample are wrong, so the epoch is dropped with an error naming it."""
        s, n = self._state, self.num_samples
        count = s["epoch_count"][:n]
        counted = torch.stack([count.sum(dtype=torch.int64), s["epoch_nonfinite"][:n].sum()])
        if torch.equal(counted, torch.cat([s["rows"], s["nonfinite_rows"]])):
            return
        # A wrapped count is negative, or smaller than the probabilities summed over it.
        suspects = (count <= 0) & (s["epoch_prob"][:n] > 0) | (s["epoch_prob"][:n] > count + 1)
        found = torch.nonzero(suspects).reshape(-1)[:1].tolist()
        who = f"sample {found[0]}" if found else "a sample"
        self.discard_epoch()
        raise SampleError(
            f"{who} was presented more than {torch.iinfo(torch.int16).max} times (or had "
            "non-finite logits more than 255 times) in one epoch, beyond the recorder's "
            "per-epoch counters; this epoch was dropped, earlier ones are kept. Shorten the "
            "epoch (e.g. a smaller num_samples for a WeightedRandomSampler) so that no "
            "sample comes that often in one epoch."
        )

    @property
    def epoch_in_progress(self) -> bool:
        """Whether the running epoch has recorded any presentation yet."""
        return bool(self._state) and bool(self._state["epoch_count"].any())

    def _vote(self, seen: Tensor, candidate: Tensor) -> None:
        """Boyer-Moore majority vote over epochs of the strongest other class."""
        s = self._state
        vote_class, vote_count = s["vote_class"], s["vote_count"]
        same = candidate == vote_class
        empty = vote_count == 0
        new_class = torch.where(seen & empty, candidate, vote_class)
        step = torch.where(same | empty, 1, -1).to(torch.int16)
        new_count = vote_count + step
        vote_class.copy_(new_class)
        vote_count.copy_(torch.where(seen, new_count, vote_count))
