"""Per-sample scores and flags, computed from the recorder's running aggregates.

Every function here is pure: numpy arrays in, numpy arrays (or a DataFrame) out. The
formulas are those of the report columns, documented in :func:`build_report`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
)
FLAGS: tuple[str, ...] = ("mislabeled", "hard", "ambiguous")

# A sample flagged hard gives its label less than this probability on average.
HARD_CONFIDENCE = 0.5
# Variability above which a sample is ambiguous, unless the data put the fence higher.
AMBIGUOUS_MIN_VARIABILITY = 0.2
# The mixture model is fitted on at most this many samples (it is 1-D; more adds nothing).
_MIXTURE_FIT_SAMPLES = 200_000
# Learned clean, hard clean and mislabeled samples (see mislabel_score).
_MIXTURE_COMPONENTS = 3


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
    - ``suggested_label``: ``y`` if ``aum > 0`` (the model prefers the given label on
      average), else the class that most often had the largest non-given logit (a
      streaming Boyer-Moore majority vote over epochs: exact whenever one class wins more
      than half of them).
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
    suggested = np.where((aum > 0) | (voted < 0), given, voted)

    score = mislabel_score(aum)
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
            "nonfinite_events": a["nonfinite"][ids].astype(np.int64),
        }
    )
    report.loc[never_learned, "first_learned_epoch"] = pd.NA
    for name in ("loss_mean", "correctness", "grad_norm_mean"):
        report[name] = report[name].astype(np.float64)
    return report


def mislabel_score(aum: np.ndarray) -> np.ndarray:
    """Probability-like score that a sample's given label is wrong; higher = more likely.

    The evidence is the area under the margin (``aum``): the given class of a mislabeled
    sample keeps losing to the class the sample really belongs to, so its margin stays
    negative, while a clean sample's margin grows as it is learned. Training margins form
    three populations: learned clean samples (large positive margins), hard clean samples
    (margins near zero) and mislabeled samples (negative margins). A three-component
    Gaussian mixture over ``aum`` finds them without being told the noise rate, and the
    score is the posterior probability of the lowest-mean component, made non-increasing
    in ``aum`` so that it ranks samples exactly as ``-aum`` does (ties at the saturated
    ends are broken by ``aum`` with a weight of ``1e-6``). When that component's mean
    margin is not negative the data show no mislabeled population and every score is
    below 0.5.

    Args:
        aum: Mean margin per sample.

    Returns:
        Scores in [0, 1]; a score of at least 0.5 means the mislabeled population is the
        most likely one for that sample.

    Example::

        >>> rng = np.random.default_rng(0)
        >>> aum = np.concatenate([rng.normal(3, 1, 900), rng.normal(-2, 0.7, 100)])
        >>> score = mislabel_score(aum)
        >>> bool(score[900:].mean() > 0.9 > score[:900].mean())
        True
    """
    evidence = -np.asarray(aum, dtype=np.float64)
    posterior, noisy_mean = _mixture_posterior(evidence)
    if noisy_mean <= 0:
        # The lowest component still prefers the given label: no mislabeled population.
        posterior = np.minimum(posterior, 0.49)
    order = np.argsort(evidence, kind="stable")
    ranks = np.empty(evidence.size, dtype=np.float64)
    ranks[order] = np.arange(evidence.size) / max(evidence.size - 1, 1)
    return np.clip((1 - 1e-6) * posterior + 1e-6 * ranks, 0.0, 1.0)


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

    - ``mislabeled``: ``score >= 0.5`` (the mislabeled population is the most likely one
      for the sample, see :func:`mislabel_score`) and the suggested label differs from the
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
    mislabeled = (score >= 0.5) & (suggested != given)
    late = (first_learned < 0) | (first_learned >= epochs_recorded / 2)
    hard = ~mislabeled & (confidence < HARD_CONFIDENCE) & late
    q1, q3 = np.percentile(variability, [25, 75]) if variability.size else (0.0, 0.0)
    fence = max(AMBIGUOUS_MIN_VARIABILITY, q3 + 1.5 * (q3 - q1))
    ambiguous = ~mislabeled & ~hard & (variability > fence)
    flags[ambiguous] = "ambiguous"
    flags[hard] = "hard"
    flags[mislabeled] = "mislabeled"
    return flags


def _mixture_posterior(evidence: np.ndarray, seed: int = 0) -> tuple[np.ndarray, float]:
    """Posterior of the highest-mean component of a 3-component 1-D Gaussian mixture.

    Returns the posterior per sample, non-decreasing in the evidence, and that component's
    mean evidence.
    """
    from sklearn.mixture import GaussianMixture

    if evidence.size < 3 * _MIXTURE_COMPONENTS or np.ptp(evidence) == 0:
        return np.zeros_like(evidence), 0.0
    fit_on = evidence
    if evidence.size > _MIXTURE_FIT_SAMPLES:
        rng = np.random.default_rng(seed)
        fit_on = rng.choice(evidence, _MIXTURE_FIT_SAMPLES, replace=False)
    gmm = GaussianMixture(n_components=_MIXTURE_COMPONENTS, random_state=seed)
    gmm.fit(fit_on.reshape(-1, 1))
    noisy = int(np.argmax(gmm.means_.ravel()))
    posterior = gmm.predict_proba(evidence.reshape(-1, 1))[:, noisy]

    # Two Gaussians of unequal variance can swap order again far out in a tail; the score
    # must rank exactly as the evidence does.
    order = np.argsort(evidence, kind="stable")
    out = np.empty_like(posterior)
    out[order] = np.maximum.accumulate(posterior[order])
    return out, float(gmm.means_.ravel()[noisy])


def _empty_report() -> pd.DataFrame:
    floats = {"loss_mean", "confidence", "variability", "correctness", "aum"}
    floats |= {"grad_norm_mean", "mislabel_score"}
    dtypes = {name: np.float64 if name in floats else np.int64 for name in REPORT_COLUMNS}
    dtypes.update(first_learned_epoch="Int64", flag=object, nonfinite_events=np.int64)
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in dtypes.items()})
