"""evaluation: every metric agrees with a direct NumPy / SciPy / Keras computation on a small case."""

from __future__ import annotations

import math

import numpy as np
import pytest

import evaluation


@pytest.fixture(scope="module")
def small_prior():
    """An untrained conditioned PixelCNN over a 6x5 grid of 7 codes, and codes + slices to score."""
    import keras

    from modules import PixelCNN, PriorConfig

    keras.utils.set_random_seed(0)
    prior = PixelCNN(7, PriorConfig(filters=8, num_layers=2, grid_shape=(6, 5), num_conditions=3))
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 7, (5, 6, 5)).astype(np.int32)
    slices = rng.integers(0, 3, 5).astype(np.int32)
    return prior, codes, slices


def test_code_nll_is_the_priors_cross_entropy_per_position(small_prior):
    import keras

    prior, codes, slices = small_prior
    nll = evaluation.code_nll(prior, codes, slices, batch_size=2)   # chunking must not matter
    assert nll.shape == (5, 6, 5) and nll.dtype == np.float32
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    expected = np.asarray(loss(codes, prior((codes, slices), training=False)))
    np.testing.assert_allclose(nll, expected, rtol=1e-5, atol=1e-6)
    # ... which is -log softmax at the true code, and its mean is what fit/evaluate report as "loss".
    logits = np.asarray(prior((codes, slices))).astype(np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    np.testing.assert_allclose(nll, -np.take_along_axis(log_p, codes[..., None], -1)[..., 0], rtol=1e-5)
    prior.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert prior.evaluate((codes, slices), codes, verbose=0) == pytest.approx(nll.mean(), rel=1e-5)
    # One int condition is broadcast over the grids.
    np.testing.assert_allclose(evaluation.code_nll(prior, codes, 1),
                               evaluation.code_nll(prior, codes, np.ones(5, np.int32)), rtol=1e-6)


def test_prior_nll_bits_per_code_and_per_slice(small_prior):
    prior, codes, slices = small_prior
    nll = evaluation.code_nll(prior, codes, slices).astype(np.float64)
    out = evaluation.prior_nll(prior, codes, slices)
    assert out["bits_per_code"] == pytest.approx(nll.mean() / math.log(2), rel=1e-6)
    assert out["bits_per_slice"] == pytest.approx(nll.sum() / len(codes) / math.log(2), rel=1e-6)
    assert out["bits_per_slice"] == pytest.approx(out["bits_per_code"] * 30, rel=1e-6)
