"""Specification tests for the VQ-VAE (vqvae.py, imported from modules): VectorQuantizer, VQVAEConfig, VQVAE.

Small shapes (16x16 / 32x32 images, a handful of channels) keep the file fast on 2 CPU cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modules import VQVAE, VQVAEConfig, VectorQuantizer  # noqa: E402

TINY = dict(image_size=16, channels=8, num_res_blocks=1, downsample=4, num_embeddings=16,
            embedding_dim=4)


def _np(x):
    """Tensor, variable or array -> NumPy array."""
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _built_vq(k=10, d=3, **kw):
    vq = VectorQuantizer(k, d, **kw)
    vq.build((None, 4, 4, d))
    return vq


def _np_indices(z, codebook):
    flat = z.reshape(-1, z.shape[-1])
    dist = ((flat[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)  # (N, K)
    return dist.argmin(1).reshape(z.shape[:-1])


def _smooth_images(n, size, seed=0):
    """Random smooth blobs in [0, 1], shape (n, size, size, 1) -- learnable, unlike white noise."""
    rng = _rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = np.zeros((n, size, size, 1), np.float32)
    for i in range(n):
        for _ in range(3):
            cx, cy, s, a = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3), rng.uniform(0.3, 1)
            imgs[i, ..., 0] += a * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s**2))
    return np.clip(imgs, 0, 1)


# ----------------------------------------------------------------------------------------------
# VectorQuantizer
# ----------------------------------------------------------------------------------------------
def test_indices_equal_numpy_argmin_and_quantize_returns_codebook_rows():
    vq = _built_vq(k=10, d=3)
    vq.codebook.assign(_rng(1).normal(size=(10, 3)).astype("float32"))
    z = _rng(2).normal(size=(2, 4, 5, 3)).astype("float32")
    codebook = _np(vq.codebook)

    idx = _np(vq.get_code_indices(z))
    assert idx.dtype == np.int32 and idx.shape == (2, 4, 5)
    np.testing.assert_array_equal(idx, _np_indices(z, codebook))

    q = _np(vq.quantize(idx))
    assert q.shape == (2, 4, 5, 3)
    np.testing.assert_array_equal(q, codebook[idx])
    # the forward value of call() is the quantised tensor
    np.testing.assert_allclose(_np(vq(z)), codebook[idx], atol=1e-6)
    assert vq.codebook.shape == (10, 3)


def test_straight_through_gradient_is_identity():
    vq = _built_vq(k=6, d=3)
    z = tf.constant(_rng(3).normal(size=(2, 4, 4, 3)).astype("float32"))
    w = tf.constant(_rng(4).normal(size=(2, 4, 4, 3)).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(z)
        q = vq(z)
        out = tf.reduce_sum(w * q)
    np.testing.assert_allclose(tape.gradient(out, z).numpy(), w.numpy(), atol=1e-6)


def test_loss_is_codebook_plus_beta_commitment_with_stop_gradients():
    beta = 0.3
    vq = _built_vq(k=8, d=2, beta=beta)
    vq.codebook.assign(_rng(5).normal(size=(8, 2)).astype("float32"))
    z_np = _rng(6).normal(size=(3, 4, 4, 2)).astype("float32")
    z = tf.constant(z_np)
    e_np = _np(vq.codebook)[_np_indices(z_np, _np(vq.codebook))]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(z)
        vq(z)
        (loss,) = vq.losses
    codebook_loss = np.mean((z_np - e_np) ** 2)  # mean((sg[z] - e)^2)
    commitment = np.mean((z_np - e_np) ** 2)  # mean((z - sg[e])^2)
    np.testing.assert_allclose(float(loss), codebook_loss + beta * commitment, rtol=1e-5)

    # Only the commitment term reaches the encoder, only the codebook term reaches the codes.
    n = z_np.size
    np.testing.assert_allclose(tape.gradient(loss, z).numpy(), beta * 2 * (z_np - e_np) / n, atol=1e-6)
    idx = _np_indices(z_np, _np(vq.codebook)).reshape(-1)
    expected = np.zeros((8, 2), np.float32)
    np.add.at(expected, idx, 2 * (e_np.reshape(-1, 2) - z_np.reshape(-1, 2)) / n)
    grad_codebook = tf.convert_to_tensor(tape.gradient(loss, vq.codebook.value))
    np.testing.assert_allclose(grad_codebook.numpy(), expected, atol=1e-6)


def test_ema_codebook_changes_only_in_training_and_moves_toward_assigned_outputs():
    decay, beta = 0.9, 0.25
    vq = _built_vq(k=4, d=2, beta=beta, use_ema=True, ema_decay=decay)
    assert not vq.codebook.trainable
    e0 = np.array([[0, 0], [4, 0], [0, 4], [4, 4]], np.float32)
    vq.codebook.assign(e0)
    vq.ema_embed_sum.assign(e0)  # the EMA state starts at the codebook with N_k = 1
    z_np = (e0[_rng(7).integers(0, 3, size=32)] + _rng(8).normal(0.5, 0.3, size=(32, 2))).astype("float32")
    z = z_np.reshape(2, 4, 4, 2)

    vq(z, training=False)
    np.testing.assert_array_equal(_np(vq.codebook), e0)
    (loss,) = vq.losses  # with EMA only the commitment term is a loss
    idx = _np_indices(z, e0).reshape(-1)
    np.testing.assert_allclose(float(loss), beta * np.mean((z_np - e0[idx]) ** 2), rtol=1e-5)

    vq(z, training=True)
    e1 = _np(vq.codebook)
    assert not np.allclose(e1, e0)
    # NumPy EMA with Laplace smoothing (sonnet VectorQuantizerEMA without debiasing)
    onehot = np.eye(4)[idx]
    counts = onehot.sum(0)
    cluster = decay * 1.0 + (1 - decay) * counts
    embed_sum = decay * e0 + (1 - decay) * onehot.T @ z_np
    n = cluster.sum()
    smoothed = (cluster + 1e-5) / (n + 4 * 1e-5) * n
    np.testing.assert_allclose(e1, embed_sum / smoothed[:, None], rtol=1e-4, atol=1e-5)
    for k in range(4):
        if counts[k]:  # used codes move toward the mean of their assigned encoder outputs
            target = z_np[idx == k].mean(0)
            assert np.linalg.norm(e1[k] - target) < np.linalg.norm(e0[k] - target)
        else:  # an unused code stays put (N_k and m_k decay together)
            np.testing.assert_allclose(e1[k], e0[k], atol=1e-4)


@pytest.mark.parametrize("use_ema", [False, True])
def test_dead_code_restart_reinitialises_unused_code_after_n_steps(use_ema):
    vq = _built_vq(k=4, d=2, use_ema=use_ema, restart_after=3, seed=1)
    far = np.array([[0, 0], [1, 0], [0, 1], [50, 50]], np.float32)  # code 3 is never nearest
    vq.codebook.assign(far)
    if use_ema:
        vq.ema_embed_sum.assign(far)
    z = _rng(9).uniform(0, 1, size=(2, 4, 4, 2)).astype("float32")

    for step in range(2):
        vq(z, training=True)
        np.testing.assert_allclose(_np(vq.codebook)[3], [50, 50], rtol=1e-4)
        assert int(_np(vq.unused_steps)[3]) == step + 1
    vq(z, training=False)  # inference does not count
    assert int(_np(vq.unused_steps)[3]) == 2
    vq(z, training=True)  # third unused training step -> restart
    new = _np(vq.codebook)[3]
    dists = np.linalg.norm(z.reshape(-1, 2) - new, axis=1)
    assert dists.min() < 1e-5, "restarted code must be one of the batch's encoder outputs"
    assert int(_np(vq.unused_steps)[3]) == 0
    if use_ema:
        assert float(_np(vq.ema_cluster_size)[3]) == 1.0


def test_restart_off_keeps_dead_code():
    vq = _built_vq(k=4, d=2, restart_after=0)
    vq.codebook.assign(np.array([[0, 0], [1, 0], [0, 1], [50, 50]], np.float32))
    z = _rng(10).uniform(0, 1, size=(2, 4, 4, 2)).astype("float32")
    for _ in range(5):
        vq(z, training=True)
    np.testing.assert_allclose(_np(vq.codebook)[3], [50, 50])


def test_usage_stats_match_numpy_on_known_assignment():
    k = 8
    vq = _built_vq(k=k, d=2)
    idx = np.array([0, 0, 0, 0, 1, 1, 2, 5], np.int32)  # 4 of 8 codes active
    p = np.bincount(idx, minlength=k) / idx.size
    p_nz = p[p > 0]
    perplexity = np.exp(-(p_nz * np.log(p_nz)).sum())
    stats = vq.usage_stats(idx)
    np.testing.assert_allclose(float(stats["perplexity"]), perplexity, rtol=1e-5)
    assert float(stats["active_fraction"]) == 0.5

    # call() on vectors sitting exactly on those codes stores the same numbers as layer state
    codebook = np.stack([np.arange(k), np.zeros(k)], 1).astype("float32") * 3
    vq.codebook.assign(codebook)
    vq(codebook[idx].reshape(1, 2, 4, 2))
    np.testing.assert_allclose(float(_np(vq.batch_perplexity)), perplexity, rtol=1e-5)
    assert float(_np(vq.batch_active_fraction)) == 0.5
    assert float(vq.usage_stats(np.zeros(5, np.int32))["perplexity"]) == pytest.approx(1.0)


def test_vector_quantizer_config_round_trip_and_float32_policy():
    vq = VectorQuantizer(12, 5, beta=0.5, use_ema=True, ema_decay=0.95, restart_after=7, seed=3)
    clone = VectorQuantizer.from_config(vq.get_config())
    for attr in ("num_embeddings", "embedding_dim", "beta", "use_ema", "ema_decay", "restart_after"):
        assert getattr(clone, attr) == getattr(vq, attr)
    assert vq.compute_dtype == "float32"


# ----------------------------------------------------------------------------------------------
# VQVAEConfig / VQVAE
# ----------------------------------------------------------------------------------------------
def test_config_dict_round_trip_and_validation():
    cfg = VQVAEConfig(image_size=64, downsample=8, num_embeddings=32)
    assert VQVAEConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.grid_shape == (8, 8)
    assert VQVAEConfig(image_size=256, downsample=4).grid_shape == (64, 64)
    with pytest.raises(ValueError, match="bogus"):
        VQVAEConfig.from_dict({"bogus": 1, "image_size": 64})
    with pytest.raises(ValueError, match="power of 2"):
        VQVAEConfig(downsample=6)
    with pytest.raises(ValueError, match="bogus"):
        VQVAE(TINY, bogus=3)


def test_vqvae_shapes_names_and_ranges():
    model = VQVAE(VQVAEConfig(**TINY), num_embeddings=8)
    assert model.config.num_embeddings == 8 and model.grid_shape == (4, 4)
    for name in ("encoder", "vector_quantizer", "decoder"):
        assert model.get_layer(name).name == name
    x = _smooth_images(3, 16)
    recon = _np(model(x))
    assert recon.shape == (3, 16, 16, 1) and recon.dtype == np.float32
    assert recon.min() >= 0.0 and recon.max() <= 1.0
    codes = _np(model.encode(x))
    assert codes.shape == (3, 4, 4) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < 8
    # decode(encode(x)) is exactly what call() computes
    np.testing.assert_allclose(_np(model.decode(codes)), recon, atol=1e-6)
    # the encoder/decoder are fully convolutional: downsample 8 on 32x32 gives a 4x4 grid
    assert _np(VQVAE(TINY, image_size=32, downsample=8).encode(_smooth_images(1, 32))).shape == (1, 4, 4)


def test_decoder_output_is_linear_in_training_and_clipped_to_unit_range_otherwise():
    """A sigmoid output stalled training on dim slices with black background (saturated at 0)."""
    model = VQVAE(VQVAEConfig(**TINY), num_embeddings=8)
    x = _smooth_images(2, 16)
    model(x)
    out_layer = model.decoder.layers[-1]
    assert out_layer.get_config()["activation"] == "linear"
    last_conv = model.decoder.layers[-2]
    last_conv.bias.assign(np.full(last_conv.bias.shape, 3.0, "float32"))  # pushes outputs above 1
    raw = _np(model(x, training=True))
    assert raw.max() > 1.0  # unclipped while training, so the gradient reaches every pixel
    for out in (_np(model(x)), _np(model.decode(_np(model.encode(x))))):
        assert out.min() >= 0.0 and out.max() == 1.0


def test_keras_save_load_round_trip(tmp_path):
    model = VQVAE(TINY, restart_after=5)
    x = _smooth_images(4, 16)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(x, epochs=1, batch_size=2, verbose=0)  # non-trivial EMA / restart state
    path = tmp_path / "vqvae.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: classes are registered
    assert isinstance(loaded, VQVAE)
    assert loaded.config == model.config
    np.testing.assert_array_equal(_np(loaded(x)), _np(model(x)))
    np.testing.assert_array_equal(_np(loaded.encode(x)), _np(model.encode(x)))
    np.testing.assert_array_equal(
        _np(loaded.vector_quantizer.codebook), _np(model.vector_quantizer.codebook)
    )
    assert VQVAE.from_config(model.get_config()).config == model.config


@pytest.mark.parametrize("use_ema", [True, False])
def test_fit_reduces_loss_and_reports_usage_metrics(use_ema):
    keras.utils.set_random_seed(0)
    model = VQVAE(TINY, use_ema=use_ema, restart_after=4)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))  # no loss argument needed
    x = _smooth_images(32, 16)
    history = model.fit(x, epochs=15, batch_size=8, verbose=0, validation_data=(x[:8],)).history
    for key in ("loss", "recon_loss", "vq_loss", "perplexity", "active_codes"):
        assert key in history and "val_" + key in history, key
    assert history["loss"][-1] < 0.7 * history["loss"][0]
    assert history["recon_loss"][-1] < history["recon_loss"][0]
    assert all(1.0 <= p <= TINY["num_embeddings"] for p in history["perplexity"])
    assert all(0.0 < a <= 1.0 for a in history["active_codes"])
    # "loss" is recon_weight * recon_loss + vq_loss
    np.testing.assert_allclose(
        history["loss"][-1], history["recon_loss"][-1] + history["vq_loss"][-1], rtol=1e-4
    )
    results = model.evaluate(x[:8], batch_size=8, verbose=0, return_dict=True)
    assert set(results) >= {"loss", "recon_loss", "vq_loss", "perplexity", "active_codes"}


def test_mixed_precision_keeps_quantizer_and_output_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = VQVAE(TINY)
        x = _smooth_images(2, 16)
        assert model.vector_quantizer.compute_dtype == "float32"
        assert model.encoder(x).dtype == "float16"
        assert model(x).dtype == "float32"
        assert model.vector_quantizer.codebook.dtype == "float32"
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        history = model.fit(x, epochs=1, batch_size=2, verbose=0).history
        assert np.isfinite(history["loss"][0])
    finally:
        keras.mixed_precision.set_global_policy("float32")


_MIRRORED_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, sys.argv[1])
    import numpy as np, keras
    from modules import VQVAE, VectorQuantizer
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    # One EMA step on 2 replicas (4 vectors-grids each) equals one step on one device with the
    # same global batch of 8: counts and sums are all-reduced before the update.
    rng = np.random.default_rng(0)
    K, D = 8, 3
    z = rng.normal(size=(8, 4, 4, D)).astype("float32")
    z[:4] += 1.5  # the two halves use the codes differently, so a per-replica update cannot pass
    init = rng.normal(size=(K, D)).astype("float32")

    def make_vq():
        vq = VectorQuantizer(K, D, use_ema=True, ema_decay=0.8)
        vq.build((None, 4, 4, D))
        vq.embeddings.assign(init)
        vq.ema_embed_sum.assign(init)
        return vq

    STATE = ("embeddings", "ema_cluster_size", "ema_embed_sum", "batch_perplexity", "batch_active_fraction")
    single = make_vq()
    single(z, training=True)
    first_half = make_vq()
    first_half(z[:4], training=True)
    with strategy.scope():
        mirrored = make_vq()
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda ctx: z[4 * ctx.replica_id_in_sync_group:4 * (ctx.replica_id_in_sync_group + 1)])
    strategy.run(lambda x: mirrored(x, training=True), args=(per_replica,))
    for name in STATE:
        want = getattr(single, name).numpy()
        assert not np.allclose(getattr(first_half, name).numpy(), want), name  # the halves differ
        values = strategy.experimental_local_results(getattr(mirrored, name).value)
        assert len(values) == 2
        for got in values:
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert not np.allclose(single.embeddings.numpy(), init)  # the step moved the codebook

    with strategy.scope():
        model = VQVAE(image_size=16, channels=8, num_res_blocks=1, num_embeddings=16,
                      embedding_dim=4, use_ema=True, restart_after=2)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x = np.random.default_rng(0).uniform(size=(16, 16, 16, 1)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices(x).batch(8)
    hist = model.fit(ds, epochs=2, verbose=0, validation_data=ds).history
    assert np.isfinite(hist["loss"]).all() and "active_codes" in hist, hist
    print("MIRRORED_OK", strategy.num_replicas_in_sync)
    """
)


def test_ema_step_on_two_replicas_equals_one_device_and_fit_runs_mirrored():
    """Two logical CPU devices must be configured before TF starts, hence the subprocess."""
    proc = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT, str(ROOT)],
        capture_output=True, text=True, timeout=240,
    )
    assert "MIRRORED_OK 2" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_training_ssim_matches_tf_image_ssim_and_has_gradients():
    import tensorflow as tf

    from modules import _mean_ssim

    rng = np.random.default_rng(0)
    x = rng.random((3, 24, 20, 1)).astype("float32")
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1).astype("float32")
    expected = float(tf.reduce_mean(tf.image.ssim(x, y, max_val=1.0, filter_size=11)))
    assert float(_mean_ssim(x, y)) == pytest.approx(expected, abs=1e-5)
    assert float(_mean_ssim(x, x)) == pytest.approx(1.0, abs=1e-6)
    yv = tf.Variable(y)
    with tf.GradientTape() as tape:
        loss = 1.0 - _mean_ssim(tf.constant(x), yv)
    grad = tape.gradient(loss, yv).numpy()
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0


def test_ssim_weight_adds_the_structural_term():
    import keras

    images = np.random.default_rng(1).random((4, 16, 16, 1)).astype("float32")
    losses = {}
    for weight in (0.0, 0.5):
        keras.utils.set_random_seed(0)
        model = VQVAE(VQVAEConfig(image_size=16, channels=4, num_res_blocks=1, num_embeddings=8,
                                  embedding_dim=4, ssim_weight=weight))
        model.compile(optimizer="adam")
        losses[weight] = model.evaluate(images, verbose=0, return_dict=True)
    # Same weights (same seed): the loss differs by exactly 0.5 * (1 - ssim).
    assert losses[0.5]["ssim"] == pytest.approx(losses[0.0]["ssim"], rel=1e-6)
    assert losses[0.5]["loss"] - losses[0.0]["loss"] == pytest.approx(0.5 * (1 - losses[0.0]["ssim"]), rel=1e-4)
