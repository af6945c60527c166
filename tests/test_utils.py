"""utils: the metrics are the library definitions; the pairwise SSIM matrix agrees with them."""

import numpy as np
import pytest

import utils


def test_ssim_and_psnr_are_tf_image_definitions():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    a = rng.random((3, 24, 24, 1)).astype("float32")
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1).astype("float32")
    np.testing.assert_allclose(utils.ssim(a, b), tf.image.ssim(a, b, max_val=1.0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(utils.psnr(a, b), tf.image.psnr(a, b, max_val=1.0).numpy(), rtol=1e-6)
    assert utils.ssim(a, a) == pytest.approx(1.0)


def test_ssim_matrix_equals_pairwise_ssim():
    rng = np.random.default_rng(1)
    a = rng.random((3, 20, 18, 1)).astype("float32")
    b = np.concatenate([a[:1] * 0.8 + 0.1, rng.random((4, 20, 18, 1)).astype("float32")])
    direct = np.array([[utils.ssim(x[None], y[None])[0] for y in b] for x in a])
    np.testing.assert_allclose(utils.ssim_matrix(a, b, chunk=2), direct, rtol=1e-4, atol=1e-5)


def test_code_usage_perplexity_and_active_fraction():
    usage = utils.code_usage(np.array([0, 0, 1, 1]), num_embeddings=4)
    assert usage["perplexity"] == pytest.approx(2.0)
    assert usage["active_codes"] == 0.5
    assert list(usage["counts"]) == [2, 2, 0, 0]
