"""evaluation: every metric agrees with a direct NumPy / SciPy / Keras computation on a small case."""

from __future__ import annotations

import math
import warnings

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
    # A conditioned prior needs its conditions (unless it has a learned "no condition" slot).
    if not getattr(prior, "has_null_condition", False):
        with pytest.raises(ValueError, match="pass the slice positions"):
            evaluation.code_nll(prior, codes)
    # One int condition is broadcast over the grids.
    np.testing.assert_allclose(evaluation.code_nll(prior, codes, 1),
                               evaluation.code_nll(prior, codes, np.ones(5, np.int32)), rtol=1e-6)
    # An unconditioned prior is called on the codes alone.
    from modules import PixelCNN, PriorConfig

    plain = PixelCNN(7, PriorConfig(filters=8, num_layers=2, grid_shape=(6, 5)))
    np.testing.assert_allclose(evaluation.code_nll(plain, codes, batch_size=3),
                               np.asarray(loss(codes, plain(codes, training=False))), rtol=1e-5, atol=1e-6)


def test_prior_nll_bits_per_code_and_per_slice(small_prior):
    prior, codes, slices = small_prior
    nll = evaluation.code_nll(prior, codes, slices).astype(np.float64)
    out = evaluation.prior_nll(prior, codes, slices)
    assert out["bits_per_code"] == pytest.approx(nll.mean() / math.log(2), rel=1e-6)
    assert out["bits_per_slice"] == pytest.approx(nll.sum() / len(codes) / math.log(2), rel=1e-6)
    assert out["bits_per_slice"] == pytest.approx(out["bits_per_code"] * 30, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Image similarity: the library definitions; the all-pairs matrix agrees with them
# ----------------------------------------------------------------------------------------------

def test_ssim_and_psnr_are_tf_image_definitions():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    a = rng.random((3, 24, 24, 1)).astype("float32")
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1).astype("float32")
    np.testing.assert_allclose(evaluation.ssim(a, b), tf.image.ssim(a, b, max_val=1.0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(evaluation.psnr(a, b), tf.image.psnr(a, b, max_val=1.0).numpy(), rtol=1e-6)
    assert evaluation.ssim(a, a) == pytest.approx(1.0)
    scores = evaluation.reconstruction_metrics(a, b)
    assert scores["ssim_mean"] == pytest.approx(evaluation.ssim(a, b).mean())
    assert scores["psnr_mean"] == pytest.approx(evaluation.psnr(a, b).mean())


def test_ssim_matrix_equals_pairwise_ssim_also_for_uint8_references():
    rng = np.random.default_rng(1)
    a = rng.random((3, 20, 18, 1)).astype("float32")
    b = np.concatenate([a[:1] * 0.8 + 0.1, rng.random((4, 20, 18, 1)).astype("float32")])
    direct = np.array([[evaluation.ssim(x[None], y[None])[0] for y in b] for x in a])
    np.testing.assert_allclose(evaluation.ssim_matrix(a, b, chunk=2), direct, rtol=1e-4, atol=1e-5)
    b8 = np.round(b * 255).astype(np.uint8)
    direct8 = np.array([[evaluation.ssim(x[None], y[None] / 255.0)[0] for y in b8] for x in a])
    np.testing.assert_allclose(evaluation.ssim_matrix(a, b8, chunk=3), direct8, rtol=1e-4, atol=1e-5)


def test_nearest_by_ssim_matches_brute_force():
    rng = np.random.default_rng(0)
    refs = rng.random((7, 16, 16, 1)).astype(np.float32)
    samples = np.concatenate([refs[[4]] * 0.9 + 0.05, rng.random((2, 16, 16, 1)).astype(np.float32)])
    best, index = evaluation.nearest_by_ssim(samples, refs, chunk=3)
    full = np.array([[evaluation.ssim(s[None], r[None])[0] for r in refs] for s in samples])
    np.testing.assert_allclose(best, full.max(axis=1), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(index, full.argmax(axis=1))
    assert index[0] == 4


def test_mean_pairwise_ms_ssim_matches_explicit_pairs():
    import tensorflow as tf

    rng = np.random.default_rng(1)
    images = rng.random((4, 48, 48, 1)).astype(np.float32)
    images[1] = images[0]                      # one identical pair: MS-SSIM 1
    # 48 px: scales of 48, 24 and 12 px fit the 11 px window, so three scales, weights renormalised.
    w = np.array([0.0448, 0.2856, 0.3001]) / (0.0448 + 0.2856 + 0.3001)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    direct = [float(tf.image.ssim_multiscale(images[i][None], images[j][None], 1.0, power_factors=w.tolist())[0])
              for i, j in pairs]
    assert math.isclose(evaluation.mean_pairwise_ms_ssim(images), float(np.mean(direct)), rel_tol=1e-5)
    assert max(direct) == pytest.approx(1.0)
    # Past max_pairs, a seeded subset of the pairs is averaged.
    subset = evaluation.mean_pairwise_ms_ssim(images, max_pairs=3, seed=0)
    chosen = np.random.default_rng(0).choice(len(pairs), size=3, replace=False)
    assert subset == pytest.approx(float(np.mean([direct[k] for k in chosen])), rel=1e-5)
    with pytest.raises(ValueError, match="at least two"):
        evaluation.mean_pairwise_ms_ssim(images[:1])


def test_code_usage_perplexity_and_active_fraction():
    usage = evaluation.code_usage(np.array([0, 0, 1, 1]), num_embeddings=4)
    assert usage["perplexity"] == pytest.approx(2.0)
    assert usage["active_codes"] == 0.5
    assert list(usage["counts"]) == [2, 2, 0, 0]


def test_encode_decode_in_chunks_equal_one_pass():
    from modules import VQVAE, VQVAEConfig

    vqvae = VQVAE(VQVAEConfig(image_size=16, channels=4, num_embeddings=8, embedding_dim=2, num_res_blocks=1))
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 1)).astype(np.uint8)
    x = images / np.float32(255)
    codes, recon = evaluation.reconstruct(vqvae, images, batch_size=2)   # uint8 in: read as pixel / 255
    np.testing.assert_array_equal(codes, np.asarray(vqvae.encode(x)))
    np.testing.assert_allclose(recon, np.asarray(vqvae.decode(codes)), atol=1e-6)
    np.testing.assert_allclose(evaluation.decode_codes(vqvae, codes, 3), recon, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# New generation metrics: interior realism, sharpness, Frechet distance, precision / recall
# ----------------------------------------------------------------------------------------------

def test_center_crop_is_the_central_half():
    x = np.arange(2 * 8 * 6).reshape(2, 8, 6, 1)
    np.testing.assert_array_equal(evaluation.center_crop(x), x[:, 2:6, 1:4])   # 8 -> 4 rows, 6 -> 3 columns


def _head(size: int = 48, ring: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic axial slice: bright scalp ring, dark skull band, textured brain; and the brain disc."""
    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2
    r = np.hypot(yy, xx) / (size / 2)
    brain = r < 0.7
    img = np.where(brain, 0.5 + 0.3 * np.sin(xx / 1.5) * np.cos(yy / 2.0), 0.0)
    if ring:
        img = np.where((r >= 0.8) & (r < 0.9), 0.9, img)     # scalp; 0.7..0.8 stays dark: skull
        img = np.where((r >= 0.7) & (r < 0.8), 0.03, img)
    return img[..., None].astype(np.float32), brain


def test_brain_interior_mask_is_inside_the_head_away_from_its_outline():
    from scipy import ndimage

    for ring in (True, False):
        img, brain = _head(ring=ring)
        img[5, 40] = 1.0                                       # a speck outside the head is ignored
        mask = evaluation.brain_interior_mask(img, margin=3)
        head = ndimage.binary_fill_holes(img[..., 0] > 0.1)
        head[5, 40] = False
        # Every masked pixel is more than 3 px inside the head, and every pixel that is is masked.
        inside = ndimage.distance_transform_edt(np.pad(head, 1))[1:-1, 1:-1] > 3
        np.testing.assert_array_equal(mask, inside)
        assert mask[24, 24] and not mask[5, 40]
        if ring:  # the scalp ring itself is never inside the mask
            assert not (mask & (img[..., 0] > 0.85)).any()
    assert not evaluation.brain_interior_mask(np.zeros((16, 16, 1))).any()


def _numpy_sobel(im: np.ndarray) -> np.ndarray:
    """sqrt((Gx^2 + Gy^2) / 2) with Sobel kernels / 4, symmetric padding (scipy's "reflect")."""
    p = np.pad(im, 1, mode="symmetric")
    gy = (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:] - p[2:, :-2] - 2 * p[2:, 1:-1] - p[2:, 2:]) / 4
    gx = (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2] - p[:-2, 2:] - 2 * p[1:-1, 2:] - p[2:, 2:]) / 4
    return np.sqrt((gx ** 2 + gy ** 2) / 2)


def test_sharpness_is_the_mean_sobel_magnitude_inside_the_mask():
    from scipy import ndimage

    img, _ = _head()
    blurred = ndimage.gaussian_filter(img, (1.5, 1.5, 0))
    images = np.stack([img, blurred, np.zeros_like(img)])
    got = evaluation.sharpness(images, margin=3)
    for k in range(2):
        mask = evaluation.brain_interior_mask(images[k], margin=3)
        assert got[k] == pytest.approx(_numpy_sobel(images[k, ..., 0].astype(np.float64))[mask].mean(), rel=1e-6)
    assert got[1] < 0.6 * got[0]          # blur shows
    assert np.isnan(got[2])               # nothing to measure in an empty image


def test_frechet_distance_equals_the_closed_form():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 5))
    b = rng.normal(size=(30, 5)) @ rng.normal(size=(5, 5)) * 0.7 + 0.4
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = linalg.sqrtm(s_a).real
    # Tr((S_a S_b)^(1/2)) = Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), the symmetric form.
    cross = np.trace(linalg.sqrtm(root_a @ s_b @ root_a).real)
    direct = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross
    assert evaluation.frechet_distance(a, b) == pytest.approx(direct, rel=1e-6)
    assert evaluation.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # Same covariance, shifted mean: the distance is the squared shift.
    assert evaluation.frechet_distance(a, a + 2.0) == pytest.approx(5 * 4.0, rel=1e-9)
    # Fewer points than dimensions (singular covariances) stays finite and symmetric.
    c, d = rng.normal(size=(6, 10)), rng.normal(size=(7, 10))
    assert evaluation.frechet_distance(c, d) == pytest.approx(evaluation.frechet_distance(d, c), rel=1e-6)


def test_precision_recall_equal_explicit_knn_balls():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(12, 3))
    fake = np.concatenate([real[:5] + 0.05, rng.normal(size=(4, 3)) + 4.0])   # 5 near real, 4 far away
    k = 3

    def radius(points, i):
        d = sorted(np.linalg.norm(points[i] - points[j]) for j in range(len(points)) if j != i)
        return d[k - 1]

    precision = np.mean([any(np.linalg.norm(f - real[j]) <= radius(real, j) for j in range(len(real))) for f in fake])
    recall = np.mean([any(np.linalg.norm(r - fake[j]) <= radius(fake, j) for j in range(len(fake))) for r in real])
    p, r = evaluation.precision_recall(real, fake, k=k)
    assert (p, r) == (pytest.approx(precision), pytest.approx(recall))
    assert p <= 5 / 9 and 0 < r < 1
    assert evaluation.precision_recall(real, real, k=k) == (1.0, 1.0)
    with pytest.raises(ValueError, match="more than k"):
        evaluation.precision_recall(real, fake[:3], k=3)


# ----------------------------------------------------------------------------------------------
# The judge: trained on real slices only, reloadable
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_splits(tmp_path_factory):
    """The 32x32 conftest tree read as dataset Splits (16 train, 4 validate, 4 test slices)."""
    import dataset
    from conftest import write_tree

    return dataset.read_oasis(write_tree(tmp_path_factory.mktemp("judge") / "oasis"), image_size=32)


def test_judge_trains_only_on_the_real_slices_it_is_given(real_splits, monkeypatch):
    import keras

    import judge

    seen = {}
    original_fit = keras.Model.fit

    def recording_fit(self, x=None, y=None, validation_data=None, **kwargs):
        # Everything fit will iterate: training batches, and the validation batches it scores.
        seen["train"] = [(np.asarray(a), np.asarray(b)) for a, b in x]
        seen["validate"] = [(np.asarray(a), np.asarray(b)) for a, b in validation_data]
        return original_fit(self, x, y, validation_data=validation_data, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", recording_fit)
    train, val = real_splits["train"], real_splits["validate"]
    config = judge.JudgeConfig(image_size=32, num_slices=4, filters=4, feature_dim=8, epochs=1, batch_size=5)
    judge.train_judge(train, val, config)
    for name, split in (("train", train), ("validate", val)):
        images = np.concatenate([a for a, _ in seen[name]])
        labels = np.concatenate([b for _, b in seen[name]])
        # Exactly the split's real slices (as pixel / 255) with their parsed slice positions, nothing else.
        order = np.lexsort((labels, images.reshape(len(images), -1).sum(1)))
        expected = split.float()
        ref = np.lexsort((split.slice_indices, expected.reshape(len(expected), -1).sum(1)))
        np.testing.assert_array_equal(images[order], expected[ref])
        np.testing.assert_array_equal(labels[order], split.slice_indices[ref])
    # Anything but a dataset Split (e.g. an array of generated images) is refused.
    with pytest.raises(TypeError, match="only on real slices"):
        judge.train_judge(train.float(), None, config)


def test_judge_keras_round_trip_and_outputs(real_splits, tmp_path):
    import keras

    import judge

    config = judge.JudgeConfig(image_size=32, num_slices=4, filters=4, feature_dim=8, epochs=2, batch_size=8)
    model = judge.train_judge(real_splits["train"], None, config)
    x = real_splits["test"].float()
    model.save(tmp_path / "judge.keras")
    loaded = keras.models.load_model(tmp_path / "judge.keras")          # stock layers: no custom objects
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-6)
    feats, slices = judge.judge_outputs(loaded, real_splits["test"].images, batch_size=3)   # uint8 in
    assert feats.shape == (4, 8) and slices.shape == (4,)
    np.testing.assert_array_equal(slices, np.argmax(np.asarray(model(x)), -1))
    penultimate = keras.Model(model.input, model.get_layer("features").output)
    np.testing.assert_allclose(feats, np.asarray(penultimate(x)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="num_slices"):
        judge.train_judge(real_splits["train"], None, judge.JudgeConfig(image_size=32, num_slices=2, epochs=1))
