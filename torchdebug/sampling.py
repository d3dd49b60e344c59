"""How sample ids reach the recorder without changing the user's batches.

The DataLoader draws every batch's dataset indices in the main process, from its batch
sampler, and (with ``in_order=True``, the default) hands the batches back in the order it
drew them, however many workers prefetch. :class:`RecordingBatchSampler` sits around the
batch sampler and queues each batch's indices as they are drawn, in one :class:`IdQueue`
per callback; a callback takes the oldest entry for each batch it sees. The batches
themselves are untouched, except that with ``TrainingDynamics(action="drop")`` the
wrapper leaves the dropped samples out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

__all__ = ["IdQueue", "RecordingBatchSampler", "as_id_tensor", "record_indices"]


class IdQueue:
    """One consumer's view of the batches a :class:`RecordingBatchSampler` drew, oldest
    first: each batch's indices and which of them are padding repeats.

    Args:
        dropped: Returns a boolean mask over sample ids of those to leave out, or ``None``
            when none are; asked once per pass, so decisions made between epochs apply to
            the next one.
    """

    def __init__(self, dropped: Callable[[], np.ndarray | None] | None = None) -> None:
        self.dropped = dropped
        self.pending: deque[tuple[list[int], list[bool]]] = deque()

    def take(self) -> tuple[list[int], list[bool]] | None:
        """The oldest batch's indices and padding marks, removed from the queue."""
        return self.pending.popleft() if self.pending else None

    def peek(self) -> list[int] | None:
        """The oldest batch's indices, left in the queue."""
        return self.pending[0][0] if self.pending else None


class RecordingBatchSampler:
    """Wraps a batch sampler and queues the indices of every batch it yields, once for
    each :class:`IdQueue` attached (one per callback).

    Attribute access falls through to the wrapped sampler, so ``set_epoch`` and friends
    keep working.

    Dropping keeps the number of batches (every DDP rank must take the same number of
    steps): each batch loses the samples any queue's ``dropped`` names, and a batch that
    would be left empty takes the last kept sample of the pass instead (or the first kept
    sample id, at the start of a pass).

    A ``DistributedSampler`` without ``drop_last`` pads every rank to the same length by
    repeating samples from the start of the shuffled order; the wrapper marks those
    repeats (from each index's position in the pass), so that a sample counts once per
    epoch however the padding fell.

    Args:
        batch_sampler: The DataLoader's batch sampler.
    """

    def __init__(self, batch_sampler: Any) -> None:
        self.batch_sampler = batch_sampler
        self.queues: list[IdQueue] = []

    def __iter__(self) -> Iterator[list[int]]:
        # A new pass over the data abandons whatever the previous pass left undelivered.
        for queue in self.queues:
            queue.pending.clear()
        mask = self._dropped_mask()
        first_padding = _first_padding_position(getattr(self.batch_sampler, "sampler", None))
        position = 0
        last_kept: int | None = None
        for indices in self.batch_sampler:
            padded = [position + j >= first_padding for j in range(len(indices))]
            position += len(indices)
            if mask is not None:
                drawn = np.asarray(indices, dtype=np.int64)
                keep = ~mask[drawn]
                kept = drawn[keep]
                if kept.size < drawn.size:
                    padded = [p for p, k in zip(padded, keep.tolist(), strict=True) if k]
                    if kept.size == 0:
                        fallback = last_kept
                        if fallback is None:
                            fallback = int(np.flatnonzero(~mask)[0])
                        kept, padded = np.array([fallback]), [False]
                    indices = kept.tolist()
                last_kept = int(kept[-1])
            for queue in self.queues:
                queue.pending.append((list(indices), padded))
            yield indices

    def _dropped_mask(self) -> np.ndarray | None:
        masks = [q.dropped() for q in self.queues if q.dropped is not None]
        masks = [m for m in masks if m is not None]
        return np.logical_or.reduce(masks) if masks else None

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __getattr__(self, name: str) -> Any:
        if name == "batch_sampler":  # not yet set, during unpickling
            raise AttributeError(name)
        return getattr(self.batch_sampler, name)


def _first_padding_position(sampler: Any) -> float:
    """Local position from which a ``DistributedSampler``'s indices are padding repeats.

    Rank ``r`` of ``R`` takes the positions ``r, r + R, r + 2R, ...`` of a list padded from
    ``n`` to ``ceil(n / R) * R`` entries, so its ``j``-th index is padding when
    ``r + j * R >= n``. Lightning's wrapper around a user's sampler is a subclass.
    """
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return float("inf")
    n = len(sampler.dataset)  # type: ignore[arg-type]
    rank, replicas = sampler.rank, sampler.num_replicas
    return max(0, -(-(n - rank) // replicas))  # the smallest j with rank + j * R >= n


def record_indices(loader: Any, queue: IdQueue) -> RecordingBatchSampler:
    """Makes ``loader`` put the dataset indices of each batch it draws into ``queue``
    (idempotent; several queues can share one loader).

    Args:
        loader: The train DataLoader (as Lightning prepared it).
        queue: Where the indices go; its ``dropped`` leaves samples out.

    Returns:
        The recording batch sampler now inside ``loader``.

    Raises:
        TypeError: If the loader cannot report indices (not a DataLoader, an iterable
            dataset, no automatic batching, or out-of-order delivery).
    """
    fix = "Put an 'index' entry in each batch, or pass get_ids= to TrainingDynamics."
    if not isinstance(loader, DataLoader):
        raise TypeError(f"The train loader is a {type(loader).__name__}, not a DataLoader. {fix}")
    if isinstance(loader.dataset, IterableDataset):
        raise TypeError(f"An IterableDataset has no indices to record. {fix}")
    if loader.batch_sampler is None:
        raise TypeError(f"A DataLoader with batch_size=None has no batch sampler. {fix}")
    if loader.num_workers > 0 and not getattr(loader, "in_order", True):
        raise TypeError(f"DataLoader(in_order=False) returns batches out of order. {fix}")
    recorder = loader.batch_sampler
    if not isinstance(recorder, RecordingBatchSampler):
        recorder = RecordingBatchSampler(loader.batch_sampler)
        # DataLoader forbids re-assigning batch_sampler after construction; the wrapper
        # yields exactly what the original does, so the loader's behaviour is unchanged.
        object.__setattr__(loader, "batch_sampler", recorder)
    if queue not in recorder.queues:
        recorder.queues.append(queue)
    return recorder


def as_id_tensor(ids: Any) -> Tensor:
    """Turns ids given as a tensor, numpy array, sequence or int into a 1-D int64 tensor.

    Raises:
        TypeError: If the ids are not integers.
    """
    if isinstance(ids, Tensor):
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"Sample ids must be integers, got a {ids.dtype} tensor.")
        return ids.reshape(-1).long()
    if isinstance(ids, np.ndarray):
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"Sample ids must be integers, got a {ids.dtype} array.")
        return torch.from_numpy(ids.astype(np.int64)).reshape(-1)
    if isinstance(ids, (int, np.integer)):
        return torch.tensor([int(ids)], dtype=torch.long)
    if isinstance(ids, Sequence) and not isinstance(ids, (str, bytes, Mapping)):
        return torch.tensor([int(i) for i in ids], dtype=torch.long)
    raise TypeError(f"Sample ids must be integers, got {type(ids).__name__}.")
