"""Acting on the scores during training: which samples to drop, down-weight or relabel.

:class:`ActionPolicy` holds one decision per sample id and revisits all of them at every
epoch end after the warm-up, from that epoch's report. It is pure bookkeeping over numpy
arrays; the callback applies the decisions (the sampler skips dropped samples, the batch
start substitutes labels, :func:`weighted_loss` applies weights).

The samples acted on are those flagged ``mislabeled``, highest ``mislabel_score`` first,
within two caps: at most ``max_fraction`` of all samples and at most
``max_class_fraction`` of the samples of each given class, so no class can vanish.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd
import torch
from torch import Tensor

__all__ = ["ACTIONS", "Action", "ActionPolicy", "sample_weights", "weighted_loss"]

Action = Literal["drop", "reweight", "relabel"]
ACTIONS: tuple[str, ...] = get_args(Action)
"""The actions ``TrainingDynamics(action=...)`` accepts besides ``None``."""

# What the report's ``action`` column says for a sample acted on; a dry run prefixes
# ``would_``. The TensorBoard scalars count the samples under each, per epoch.
_PAST_TENSE = {"drop": "dropped", "reweight": "reweighted", "relabel": "relabelled"}


class ActionPolicy:
    """Per-sample decisions of one action, revisited every epoch after ``warmup_epochs``.

    Args:
        action: ``"drop"``, ``"reweight"`` or ``"relabel"``.
        warmup_epochs: Epochs recorded before the first decision (at least 1).
        max_fraction: Cap on the fraction of all samples acted on, in (0, 1].
        max_class_fraction: Cap on the fraction of each given class acted on, in (0, 1);
            below 1 so that every class keeps samples.
        dry_run: Decide and record, but leave training unchanged.

    Raises:
        ValueError: For an unknown action or an option out of range.

    Example::

        >>> policy = ActionPolicy("drop", warmup_epochs=1, max_fraction=0.5,
        ...                       max_class_fraction=0.5)
        >>> policy.decide(report, epoch=0, num_samples=len(dataset))
        >>> skip = policy.dropped()  # boolean mask over sample ids, or None
    """

    def __init__(
        self,
        action: Action,
        *,
        warmup_epochs: int,
        max_fraction: float,
        max_class_fraction: float,
        dry_run: bool = False,
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(f"action must be None or one of {list(ACTIONS)}, got {action!r}.")
        if warmup_epochs < 1:
            raise ValueError(
                f"warmup_epochs must be at least 1 (decisions need recorded epochs), got "
                f"{warmup_epochs}."
            )
        if not 0.0 < max_fraction <= 1.0:
            raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}.")
        if not 0.0 < max_class_fraction < 1.0:
            raise ValueError(
                f"max_class_fraction must be in (0, 1) so no class vanishes, got "
                f"{max_class_fraction}."
            )
        self.action = action
        self.warmup_epochs = warmup_epochs
        self.max_fraction = max_fraction
        self.max_class_fraction = max_class_fraction
        self.dry_run = dry_run
        # One entry per sample id, allocated at the first decision.
        self.acted = np.zeros(0, dtype=bool)
        self.weight = np.ones(0, dtype=np.float32)
        self.target = np.full(0, -1, dtype=np.int64)
        self.since = np.full(0, -1, dtype=np.int64)

    @property
    def label(self) -> str:
        """The ``action`` column's value for a sample acted on (``would_...`` in a dry run)."""
        return f"would_{self.action}" if self.dry_run else self.action

    @property
    def counter_name(self) -> str:
        """Name of the TensorBoard scalar counting the samples acted on."""
        name = _PAST_TENSE[self.action]
        return f"dry_run_{name}" if self.dry_run else name

    def due(self, epochs_recorded: int) -> bool:
        """Whether the warm-up is over after ``epochs_recorded`` epochs."""
        return epochs_recorded >= self.warmup_epochs

    def decide(self, report: pd.DataFrame, epoch: int, num_samples: int) -> None:
        """Revisits every decision from the report of ``epoch`` (applied from the next).

        A sample acted on keeps the epoch it was first chosen in ``since``; a sample no
        longer chosen goes back to normal training.
        """
        self._allocate(num_samples)
        chosen = self._choose(report)
        ids = report["sample_id"].to_numpy(dtype=np.int64)
        now = np.zeros(num_samples, dtype=bool)
        now[ids[chosen]] = True
        self.since = np.where(now, np.where(self.acted, self.since, epoch), -1)
        self.acted = now

        self.weight.fill(1.0)
        self.target.fill(-1)
        picked = ids[chosen]
        if self.action == "drop":
            self.weight[picked] = 0.0
        elif self.action == "reweight":
            score = report["mislabel_score"].to_numpy(dtype=np.float64)[chosen]
            self.weight[picked] = np.clip(1.0 - score, 0.0, 1.0)
        else:
            self.target[picked] = report["suggested_label"].to_numpy(dtype=np.int64)[chosen]

    def annotate(self, report: pd.DataFrame) -> pd.DataFrame:
        """Fills the report's ``weight``, ``action`` and ``action_epoch`` columns."""
        if not self.acted.size or report.empty:
            return report
        ids = report["sample_id"].to_numpy(dtype=np.int64)
        acted = self.acted[ids]
        report["weight"] = self.weight[ids].astype(np.float64)
        report["action"] = np.where(acted, self.label, "").astype(object)
        since = self.since[ids]
        report["action_epoch"] = pd.array(np.where(acted, since, 0), dtype="Int64")
        report.loc[~acted, "action_epoch"] = pd.NA
        return report

    def counts(self) -> int:
        """Number of samples acted on now."""
        return int(self.acted.sum())

    def dropped(self) -> np.ndarray | None:
        """Mask of the sample ids the sampler must skip, or ``None`` when none are."""
        if self.action != "drop" or self.dry_run or not self.acted.any():
            return None
        return self.acted

    def batch_weights(self, ids: Tensor) -> Tensor:
        """The weights the loss applies to a batch (all ones before and in a dry run)."""
        if self.action != "reweight" or self.dry_run or not self.acted.size:
            return torch.ones(ids.numel(), dtype=torch.float32)
        return torch.from_numpy(self.weight[_host_ids(ids)])

    def batch_targets(self, ids: Tensor) -> Tensor | None:
        """Labels to train a batch on, ``-1`` where the given label stays; ``None`` if
        no sample of the batch is relabelled."""
        if self.action != "relabel" or self.dry_run or not self.acted.size:
            return None
        target = self.target[_host_ids(ids)]
        return torch.from_numpy(target) if (target >= 0).any() else None

    def state_dict(self) -> dict[str, Any]:
        """Decisions as CPU tensors, for checkpoints and for broadcasting across ranks."""
        return {
            "action": self.action,
            "acted": torch.from_numpy(self.acted.copy()),
            "weight": torch.from_numpy(self.weight.copy()),
            "target": torch.from_numpy(self.target.copy()),
            "since": torch.from_numpy(self.since.copy()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores decisions from :meth:`state_dict`.

        Raises:
            ValueError: If they were made for another action.
        """
        if state["action"] != self.action:
            raise ValueError(
                f"The checkpoint holds decisions of action={state['action']!r} but this "
                f"callback has action={self.action!r}; resume with the same action."
            )
        self.acted = state["acted"].numpy().astype(bool)
        self.weight = state["weight"].numpy().astype(np.float32)
        self.target = state["target"].numpy().astype(np.int64)
        self.since = state["since"].numpy().astype(np.int64)

    def _allocate(self, num_samples: int) -> None:
        if self.acted.size == num_samples:
            return
        if self.acted.size:
            raise ValueError(
                f"Decisions were made for {self.acted.size} samples but the training set "
                f"now has {num_samples}; resume with the same training dataset."
            )
        self.acted = np.zeros(num_samples, dtype=bool)
        self.weight = np.ones(num_samples, dtype=np.float32)
        self.target = np.full(num_samples, -1, dtype=np.int64)
        self.since = np.full(num_samples, -1, dtype=np.int64)

    def _choose(self, report: pd.DataFrame) -> np.ndarray:
        """Row mask: flagged ``mislabeled``, highest score first, within both caps."""
        flagged = (report["flag"] == "mislabeled").to_numpy()
        if not flagged.any():
            return flagged
        score = report["mislabel_score"].to_numpy(dtype=np.float64)
        given = report["given_label"].to_numpy(dtype=np.int64)
        class_size = np.bincount(given)
        class_cap = np.floor(self.max_class_fraction * class_size).astype(np.int64)
        total_cap = int(np.floor(self.max_fraction * len(report)))

        candidates = np.flatnonzero(flagged)
        candidates = candidates[np.argsort(-score[candidates], kind="stable")]
        # Rank of each candidate within its class, in score order.
        classes = given[candidates]
        order = np.argsort(classes, kind="stable")
        start = np.searchsorted(classes[order], classes[order])
        rank_in_class = np.empty_like(order)
        rank_in_class[order] = np.arange(order.size) - start
        within = candidates[rank_in_class < class_cap[classes]][:total_cap]
        chosen = np.zeros(len(report), dtype=bool)
        chosen[within] = True
        return chosen


def sample_weights(module: Any, like: Tensor | None = None) -> Tensor | None:
    """The current training batch's per-sample weights from ``TrainingDynamics``.

    Args:
        module: The LightningModule being trained (``self`` in ``training_step``).
        like: A tensor whose device and dtype the weights take.

    Returns:
        ``[batch]`` weights in [0, 1], or ``None`` when no callback reweights this batch
        (no Trainer, not a training batch, no ``TrainingDynamics(action="reweight")``, a
        dry run).

    Example::

        >>> w = sample_weights(self, like=losses)  # in training_step
        >>> loss = losses.mean() if w is None else (losses * w).sum() / w.sum().clamp_min(1e-8)
    """
    trainer = getattr(module, "_trainer", None)
    if trainer is None or not trainer.training:  # validation steps are never weighted
        return None
    weights = None
    for callback in trainer.callbacks:
        provide = getattr(callback, "_provide_batch_weights", None)
        if provide is not None:
            found = provide()
            if found is not None:
                if weights is not None:
                    raise ValueError(
                        "Two TrainingDynamics callbacks reweight the same batch; keep "
                        "action='reweight' on one of them."
                    )
                weights = found
    if weights is not None and like is not None:
        weights = weights.to(device=like.device, dtype=like.dtype, non_blocking=True)
    return weights


def weighted_loss(losses: Tensor, module: Any) -> Tensor:
    """Mean of per-sample losses, each times its ``TrainingDynamics`` weight.

    The one line to change in ``training_step`` for ``action="reweight"``::

        loss = F.cross_entropy(logits, y)                                        # before
        loss = weighted_loss(F.cross_entropy(logits, y, reduction="none"), self)  # after

    With every weight 1 (before the warm-up ends, in a dry run, without the callback or
    outside a Trainer) the result is exactly ``losses.mean()``.

    Args:
        losses: Per-sample losses ``[batch]`` (``reduction="none"``).
        module: The LightningModule being trained (``self``).

    Raises:
        ValueError: If ``losses`` does not hold one value per sample of the batch.
    """
    weights = sample_weights(module, like=losses)
    if weights is None:
        return losses.mean()
    if losses.dim() != 1 or losses.shape[0] != weights.shape[0]:
        raise ValueError(
            f"weighted_loss needs one loss per sample ({weights.shape[0]} in this batch), got "
            f"shape {list(losses.shape)}; compute the loss with reduction='none'."
        )
    return (losses * weights).mean()


def _host_ids(ids: Tensor) -> np.ndarray:
    return ids.detach().to("cpu", torch.int64).numpy()
