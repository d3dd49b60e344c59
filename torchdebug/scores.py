"""Per-sample scores and flags, computed from the recorder's running aggregates.

Every function here is pure: numpy arrays in, numpy arrays (or a DataFrame) out. The
formulas are those of the report columns, documented in :func:`build_report`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "FLAGS",
    "REPORT_COLUMNS",
    "Aggregates",
    "build_report",
    "flag_samples",
    "mislabel_score",
]

REPORT_COLUMNS: tuple[str, ...] = (
    "sample_id",
    "given_label",
    "predicted_label",
    "suggested_label",
    "epochs_seen",
    "loss_mean",
    "confidence",
    "variability",
    "correctness",
    "forgetting_events",
    "first_learned_epoch",
    "aum",
    "grad_norm_mean",
    "mislabel_score",
    "flag",
    "weight",
    "action",
    "action_epoch",
)
FLAGS: tuple[str, ...] = ("mislabeled", "hard", "ambiguous")
UNSUPERVISED_FLAG = "unsupervised"  # only ever presented with the ignore index: no scores
UNSUPERVISED_LABEL = -2  # how the recorder stores such a sample's label

# A sample flagged hard gives its label less than this probability on average.
HARD_CONFIDENCE = 0.5
# Variability above which a sample is ambiguous, unless the data put the fence higher.
AMBIGUOUS_MIN_VARIABILITY = 0.2
# The mixture model is fitted on at most this many samples (it is 1-D; more adds nothing).
_MIXTURE_FIT_SAMPLES = 200_000
# Learned clean, hard clean and mislabeled samples (see mislabel_score).
_MIXTURE_COMPONENTS = 3
# Ashman's D above which two Gaussian components count as separate populations.
_MIN_SEPARATION = 2.0


@dataclass
class Aggregates:
    """Host copies of the recorder's running aggregates, one array entry per sample id.

    Attributes:
        epochs_recorded: Number of completed epochs.
        num_classes: Number of classes of the logits (0 before the first batch).
        arrays: Field name to ``[num_samples]`` array (see ``torchdebug.recorder``).
    """

    epochs_recorded: int
    num_classes: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def empty(cls, epochs_recorded: int = 0) -> Aggregates:
        """Aggregates of a recorder that has seen no batch."""
        return cls(epochs_recorded=epochs_recorded, num_classes=0, arrays={})


def build_report(agg: Aggregates) -> pd.DataFrame:
    """Builds the per-sample report: one row per sample seen in at least one epoch.

    With ``E`` the epochs in which sample ``i`` was seen (``n = |E|``), ``p_e`` the
    probability of its given label ``y`` in epoch ``e``, ``z_e`` its logits and ``c_e``
    whether the arg-max was ``y``. A sample presented several times in one epoch
    contributes the mean over those presentations to each of these, and counts as right
    in that epoch (for forgetting and first-learned) when ``c_e >= 0.5``:

    - ``sample_id``: the dataset index (or the id the batch carried).
    - ``given_label``: ``y``, the label at the last presentation.
    - ``predicted_label``: arg-max of the logits at the last presentation.
    - ``suggested_label``: for a sample in the estimated mislabeled population
      (``mislabel_score > 0.5``), the class that most often had the largest non-given
      logit (a streaming Boyer-Moore majority vote over epochs: exact whenever one class
      wins more than half of them); else ``y``.
    - ``epochs_seen``: ``n``.
    - ``loss_mean``: mean over ``E`` of the cross-entropy ``-log p_e``.
    - ``confidence``: ``mean_e p_e``, in [0, 1].
    - ``variability``: population standard deviation of ``p_e`` over ``E``, in [0, 0.5].
    - ``correctness``: ``mean_e c_e``, the fraction of epochs predicted right, in [0, 1].
    - ``forgetting_events``: number of epochs ``e`` with ``c_e = 0`` right after a seen
      epoch with ``c = 1``. A never-learned sample gets ``epochs_recorded``, more than any
      learned sample can have (at most half the epochs).
    - ``first_learned_epoch``: first epoch (0-based) with ``c_e = 1``; empty (``<NA>``) if
      never.
    - ``aum``: area under the margin, ``mean_e (z_e[y] - max_{k != y} z_e[k])``; negative
      when another class usually wins.
    - ``grad_norm_mean``: mean over ``E`` of ``||softmax(z_e) - onehot(y)||_2``, the norm
      of the loss gradient with respect to the logits, in [0, sqrt(2)] (or the mean of the
      norms passed to ``update``).
    - ``mislabel_score``: in [0, 1], higher = more likely mislabeled; see
      :func:`mislabel_score`.
    - ``flag``: ``"mislabeled"``, ``"hard"``, ``"ambiguous"`` or ``""``; see
      :func:`flag_samples`.
    - ``weight``: the weight the sample's loss carries under ``TrainingDynamics(action=...)``:
      0 when dropped, ``1 - mislabel_score`` when reweighted, else 1.
    - ``action``: ``"drop"``, ``"reweight"`` or ``"relabel"`` for a sample acted on
      (``"would_drop"`` etc. in a dry run), else ``""``. A relabelled sample trains on its
      ``suggested_label``; ``given_label`` stays the label of the data.
    - ``action_epoch``: the epoch whose end first chose the current action (it applies from
      the next epoch); empty (``<NA>``) when none.

    Args:
        agg: Aggregates from :meth:`torchdebug.DynamicsRecorder.aggregates`.

    Returns:
        The report, sorted by ``sample_id``, with exactly :data:`REPORT_COLUMNS` and a
        trailing ``nonfinite_events`` column (presentations skipped for NaN/inf logits).
    """
    if not agg.arrays:
        return _empty_report()
    a = agg.arrays
    seen_mask = a["epochs_seen"] > 0
    ids = np.flatnonzero(seen_mask)
    n = a["epochs_seen"][ids].astype(np.float64)

    confidence = a["conf_mean"][ids].astype(np.float64)
    variability = np.sqrt(np.clip(a["conf_m2"][ids] / n, 0.0, None))
    aum = a["margin_sum"][ids] / n
    correctness = a["correct_sum"][ids] / n
    first_learned = a["first_learned"][ids].astype(np.int64)
    never_learned = first_learned < 0
    forgetting = np.where(never_learned, agg.epochs_recorded, a["forgetting"][ids])
    given = a["label"][ids].astype(np.int64)
    voted = a["vote_class"][ids].astype(np.int64)
    score = mislabel_score(aum, confidence)
    suggested = np.where((score > 0.5) & (voted >= 0), voted, given)
    flags = flag_samples(
        score, given, suggested, confidence, variability, first_learned, agg.epochs_recorded
    )
    report = pd.DataFrame(
        {
            "sample_id": ids.astype(np.int64),
            "given_label": given,
            "predicted_label": a["prediction"][ids].astype(np.int64),
            "suggested_label": suggested,
            "epochs_seen": n.astype(np.int64),
            "loss_mean": a["loss_sum"][ids] / n,
            "confidence": confidence,
            "variability": variability,
            "correctness": correctness,
            "forgetting_events": forgetting.astype(np.int64),
            "first_learned_epoch": pd.array(
                np.where(never_learned, 0, first_learned), dtype="Int64"
            ),
            "aum": aum.astype(np.float64),
            "grad_norm_mean": a["grad_sum"][ids] / n,
            "mislabel_score": score,
            "flag": flags,
            "weight": np.ones(ids.size),
            "action": np.full(ids.size, "", dtype=object),
            "action_epoch": pd.array([pd.NA] * ids.size, dtype="Int64"),
            "nonfinite_events": a["nonfinite"][ids].astype(np.int64),
        }
    )
    report.loc[never_learned, "first_learned_epoch"] = pd.NA
    for name in ("loss_mean", "correctness", "grad_norm_mean"):
        report[name] = report[name].astype(np.float64)
    unsupervised = np.flatnonzero((a["epochs_seen"] == 0) & (a["label"] == UNSUPERVISED_LABEL))
    if unsupervised.size:
        report = _with_unsupervised(report, unsupervised)
    return report


def _with_unsupervised(report: pd.DataFrame, ids: np.ndarray) -> pd.DataFrame:
    """Appends rows for samples only ever presented with the ignore index: no statistics,
    ``given_label`` -1 and the flag ``"unsupervised"``."""
    rows = pd.DataFrame({"sample_id": ids.astype(np.int64)})
    for name in ("given_label", "predicted_label", "suggested_label"):
        rows[name] = np.full(ids.size, -1, dtype=np.int64)
    rows["epochs_seen"] = np.zeros(ids.size, dtype=np.int64)
    rows["forgetting_events"] = np.zeros(ids.size, dtype=np.int64)
    rows["nonfinite_events"] = np.zeros(ids.size, dtype=np.int64)
    rows["flag"], rows["action"], rows["weight"] = UNSUPERVISED_FLAG, "", 1.0
    rows = rows.reindex(columns=report.columns)
    merged = pd.concat([report, rows.astype(report.dtypes.to_dict())], ignore_index=True)
    return merged.sort_values("sample_id", ignore_index=True)


def mislabel_score(aum: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """Score in [0, 1] that a sample's given label is wrong; higher = more likely.

    The evidence is the area under the margin (``aum``): the given class of a mislabeled
    sample keeps losing to the class the sample really belongs to, so its margin stays low,
    while a clean sample's margin grows as it is learned. Training margins form up to three
    populations: learned clean samples (large margins), hard clean samples (margins near
    zero) and mislabeled samples (the lowest margins). A Gaussian mixture over ``aum``
    finds them without being told the noise rate:

    1. Fit three components. Keep them if the lowest-margin component is well separated
       from its neighbour (Ashman's ``D >= 2``, where
       ``D = sqrt(2) |m1 - m2| / sqrt(s1^2 + s2^2)``); otherwise the data do not show a
       separate hard population (heavy or systematic noise blurs it into the others, or a
       wide tail component was fitted), and two components are fitted instead.
    2. The lowest-margin component's weight ``w`` estimates the noise rate: the
       ``n = round(w N)`` samples of lowest ``aum`` are the mislabeled population.
    3. Guard: if those ``n`` samples give their given label a mean probability
       (``confidence``) of 0.5 or more, the model on the whole believes their labels, the
       component is hard clean samples, not mislabeled ones, and ``n = 0``.

    The score is that component's posterior probability, made non-decreasing in ``-aum``,
    with ties broken by ``-aum`` (weight ``1e-6``), then rescaled piecewise-linearly so
    that exactly the ``n`` samples of the mislabeled population score above 0.5. It
    therefore ranks samples exactly as ``-aum`` does.

    Args:
        aum: Mean margin per sample.
        confidence: Mean probability of the given label per sample.

    Returns:
        Scores in [0, 1]; a score above 0.5 means the sample is in the estimated
        mislabeled population.

    Example::

        >>> rng = np.random.default_rng(0)
        >>> aum = np.concatenate([rng.normal(3, 1, 900), rng.normal(-2, 0.7, 100)])
        >>> confidence = np.r_[np.full(900, 0.9), np.full(100, 0.1)]
        >>> score = mislabel_score(aum, confidence)
        >>> bool(score[900:].mean() > 0.9 > score[:900].mean())
        True
    """
    evidence = -np.asarray(aum, dtype=np.float64)
    confidence = np.asarray(confidence, dtype=np.float64)
    posterior, weight = _mislabeled_component(evidence)
    order = np.argsort(evidence, kind="stable")  # most clean first
    ranks = np.empty(evidence.size, dtype=np.float64)
    ranks[order] = np.arange(evidence.size) / max(evidence.size - 1, 1)
    base = (1 - 1e-6) * posterior + 1e-6 * ranks  # strictly increasing in the evidence

    count = int(round(weight * evidence.size))
    members = order[evidence.size - count :]
    if count and confidence[members].mean() >= HARD_CONFIDENCE:
        count, members = 0, members[:0]
    if count == 0:
        return 0.5 * (1 - 1e-6) * base
    if count == evidence.size:
        return 0.5 + 0.5 * base
    inside = base[members].min()
    outside = base[order[evidence.size - count - 1]]
    cut = 0.5 * (inside + outside)
    return np.where(
        base > cut,
        0.5 + 0.5 * (base - cut) / max(1.0 - cut, 1e-12),
        0.5 * base / max(cut, 1e-12),
    )


def flag_samples(
    score: np.ndarray,
    given: np.ndarray,
    suggested: np.ndarray,
    confidence: np.ndarray,
    variability: np.ndarray,
    first_learned: np.ndarray,
    epochs_recorded: int,
) -> np.ndarray:
    """Assigns each sample at most one flag, in priority order.

    - ``mislabeled``: ``score > 0.5`` (the sample is in the estimated mislabeled
      population, see :func:`mislabel_score`) and the suggested label differs from the
      given one.
    - ``hard``: not mislabeled, ``confidence < 0.5``, and learned late or never: no epoch
      predicted right, or the first right epoch in the second half of the epochs recorded.
    - ``ambiguous``: neither of the above and ``variability`` above the outlier fence
      ``max(0.2, Q3 + 1.5 IQR)`` of all samples' variability (from the data, floored so a
      run where every sample is stable flags none).

    Args:
        score: ``mislabel_score`` per sample.
        given: Given label per sample.
        suggested: Suggested label per sample.
        confidence: Mean probability of the given label per sample.
        variability: Its standard deviation over epochs per sample.
        first_learned: First epoch predicted right per sample, ``-1`` if never.
        epochs_recorded: Number of epochs recorded so far.

    Returns:
        An object array of flag strings (``""`` for no flag).
    """
    flags = np.full(score.shape, "", dtype=object)
    mislabeled = (score > 0.5) & (suggested != given)
    late = (first_learned < 0) | (first_learned >= epochs_recorded / 2)
    hard = ~mislabeled & (confidence < HARD_CONFIDENCE) & late
    q1, q3 = np.percentile(variability, [25, 75]) if variability.size else (0.0, 0.0)
    fence = max(AMBIGUOUS_MIN_VARIABILITY, q3 + 1.5 * (q3 - q1))
    ambiguous = ~mislabeled & ~hard & (variability > fence)
    flags[ambiguous] = "ambiguous"
    flags[hard] = "hard"
    flags[mislabeled] = "mislabeled"
    return flags


def _mislabeled_component(evidence: np.ndarray, seed: int = 0) -> tuple[np.ndarray, float]:
    """Posterior and weight of the highest-evidence component of a 1-D Gaussian mixture.

    Three components when the highest-evidence one is well separated from its neighbour
    (Ashman's D >= 2), else two. The posterior is made non-decreasing in the evidence.
    """
    if evidence.size < 3 * _MIXTURE_COMPONENTS or np.ptp(evidence) == 0:
        return np.zeros_like(evidence), 0.0
    fit_on = evidence
    if evidence.size > _MIXTURE_FIT_SAMPLES:
        rng = np.random.default_rng(seed)
        fit_on = rng.choice(evidence, _MIXTURE_FIT_SAMPLES, replace=False)
    gmm = _fit_mixture(fit_on, _MIXTURE_COMPONENTS, seed)
    if _separation(gmm) < _MIN_SEPARATION:
        gmm = _fit_mixture(fit_on, 2, seed)
    noisy = int(np.argmax(gmm.means_.ravel()))
    posterior = gmm.predict_proba(evidence.reshape(-1, 1))[:, noisy]

    # Two Gaussians of unequal variance can swap order again far out in a tail; the score
    # must rank exactly as the evidence does.
    order = np.argsort(evidence, kind="stable")
    out = np.empty_like(posterior)
    out[order] = np.maximum.accumulate(posterior[order])
    return out, float(gmm.weights_[noisy])


def _fit_mixture(values: np.ndarray, components: int, seed: int) -> Any:
    from sklearn.mixture import GaussianMixture

    return GaussianMixture(n_components=components, random_state=seed).fit(values[:, None])


def _separation(gmm: Any) -> float:
    """Ashman's D between the highest-mean component and the next one down."""
    means = gmm.means_.ravel()
    sds = np.sqrt(gmm.covariances_.ravel())
    top, second = np.argsort(means)[::-1][:2]
    return float(np.sqrt(2) * abs(means[top] - means[second]) / np.hypot(sds[top], sds[second]))


def _empty_report() -> pd.DataFrame:
    floats = {"loss_mean", "confidence", "variability", "correctness", "aum"}
    floats |= {"grad_norm_mean", "mislabel_score", "weight"}
    dtypes = {name: np.float64 if name in floats else np.int64 for name in REPORT_COLUMNS}
    dtypes.update(first_learned_epoch="Int64", flag=object, action=object, action_epoch="Int64")
    dtypes.update(nonfinite_events=np.int64)
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in dtypes.items()})
