"""Scores and flags against hand-computed values and synthetic populations."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from torchdebug.scores import REPORT_COLUMNS, Aggregates, build_report, flag_samples, mislabel_score


def populations(noisy: int = 200, clean: int = 1800, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    aum = np.concatenate(
        [
            rng.normal(3.0, 1.0, clean - 200),  # learned clean samples
            rng.normal(0.3, 0.5, 200),  # hard clean samples
            rng.normal(-2.5, 0.8, noisy),  # mislabeled samples
        ]
    )
    truth = np.r_[np.zeros(clean, bool), np.ones(noisy, bool)]
    return aum, truth


def confidence_of(aum: np.ndarray) -> np.ndarray:
    """A stand-in mean probability of the given label that grows with the margin."""
    return 1.0 / (1.0 + np.exp(-aum))


def test_mislabel_score_finds_the_negative_margin_population() -> None:
    aum, truth = populations()
    score = mislabel_score(aum, confidence_of(aum))
    assert score.min() >= 0 and score.max() <= 1
    assert roc_auc_score(truth, score) == pytest.approx(roc_auc_score(truth, -aum))
    flagged = score > 0.5
    # The hard clean population (margins near zero) stays out.
    assert truth[flagged].mean() > 0.95 and flagged[truth].mean() > 0.9


def test_heavy_noise_with_no_separate_hard_population_is_found() -> None:
    # 40% of labels wrong and partly memorised: the two populations overlap (Ashman D
    # about 1.4), mislabeled margins are positive on average. A three-component fit
    # splits the clean side; the rule falls back to two components.
    rng = np.random.default_rng(2)
    aum = np.r_[rng.normal(1.2, 0.7, 1200), rng.normal(0.2, 0.7, 800)]
    truth = np.r_[np.zeros(1200, bool), np.ones(800, bool)]
    confidence = np.r_[np.full(1200, 0.65), np.full(800, 0.4)]
    flagged = mislabel_score(aum, confidence) > 0.5
    assert 0.3 < flagged.mean() < 0.5  # the estimated noise rate, 40% true
    assert f1(flagged, truth) > 0.7
    assert f1(flagged, truth) > f1(aum < 0, truth) + 0.1  # "another class wins" under-flags


def f1(flagged: np.ndarray, truth: np.ndarray) -> float:
    precision, recall = truth[flagged].mean(), flagged[truth].mean()
    return 2 * precision * recall / (precision + recall)


def test_flagged_count_is_the_mixture_estimate_of_the_noise_rate() -> None:
    for rate in (0.1, 0.3):
        aum, truth = populations(noisy=int(rate * 2000), clean=2000 - int(rate * 2000))
        flagged = mislabel_score(aum, confidence_of(aum)) > 0.5
        assert flagged.mean() == pytest.approx(rate, abs=0.02)


def test_mislabel_score_ranks_exactly_as_the_margin() -> None:
    aum, _ = populations()
    score = mislabel_score(aum, confidence_of(aum))
    order = np.argsort(aum)
    assert np.all(np.diff(score[order]) < 0)  # strictly: no ties, even where saturated


def test_no_mislabeled_population_no_high_scores() -> None:
    rng = np.random.default_rng(1)
    aum = np.abs(rng.normal(3.0, 1.5, 5000)) + 0.1  # every sample prefers its label
    assert (mislabel_score(aum, confidence_of(aum)) < 0.5).all()


def test_a_believed_low_margin_population_is_not_mislabeled() -> None:
    # Clean data: the lowest-margin component is hard samples whose labels the model
    # still gives most of its probability.
    rng = np.random.default_rng(3)
    aum = np.r_[rng.normal(8.0, 2.0, 4000), rng.normal(2.0, 2.0, 6000)]
    confidence = np.r_[np.full(4000, 0.95), np.full(6000, 0.75)]
    assert (mislabel_score(aum, confidence) < 0.5).all()


def test_too_few_samples_score_zero() -> None:
    aum = np.array([1.0, -1.0])
    assert mislabel_score(aum, confidence_of(aum)).max() < 1e-5


def test_flag_rules_and_priority() -> None:
    score = np.array([0.9, 0.9, 0.1, 0.1, 0.1, 0.1] + [0.0] * 20)
    given = np.zeros(26, int)
    suggested = np.array([1, 0, 0, 0, 0, 0] + [0] * 20)
    confidence = np.array([0.1, 0.1, 0.2, 0.4, 0.9, 0.7] + [0.95] * 20)
    variability = np.array([0.4, 0.01, 0.3, 0.3, 0.3, 0.01] + [0.02] * 20)
    first = np.array([-1, -1, -1, 1, 0, 5] + [0] * 20)
    flags = flag_samples(score, given, suggested, confidence, variability, first, 8)
    # 0: mislabeled wins over high variability. 1: no other class suggested -> not
    # mislabeled; never learned with low confidence -> hard. 2: hard beats ambiguous.
    # 3: learned early -> not hard, variable -> ambiguous. 5: learned late but confident.
    assert flags[:6].tolist() == ["mislabeled", "hard", "hard", "ambiguous", "ambiguous", ""]
    assert set(flags[6:]) == {""}


def test_build_report_of_no_data_has_the_columns() -> None:
    report = build_report(Aggregates.empty())
    assert list(report.columns[: len(REPORT_COLUMNS)]) == list(REPORT_COLUMNS)
    assert len(report) == 0
