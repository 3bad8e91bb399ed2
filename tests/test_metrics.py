import numpy as np
import pytest

from pipeline.metrics import auprc, auroc


def test_auroc_known_values():
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auroc([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4]) == 0.75
    assert auroc([0, 1], [0.5, 0.5]) == 0.5  # ties count half


def test_auprc_known_values():
    assert auprc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    # Ranking 1, 0, 1: precision 1 at recall .5, 2/3 at recall 1.
    assert auprc([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_auroc_random_scores_near_half():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 20_000)
    assert abs(auroc(labels, rng.normal(size=20_000)) - 0.5) < 0.02
    assert np.isnan(auroc([0, 0], [1, 2]))
