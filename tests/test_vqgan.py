"""Specification tests for the VQ-VAE's adversarial option (VQGAN: ``VQVAEConfig.adversarial``).

Tiny 16x16 images and few steps keep each test to seconds on 2 CPU cores. With ``adversarial=False``
(the default) the VQ-VAE trains exactly as before: tests/test_modules.py checks that, unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modules import VQVAE, VQVAEConfig, adaptive_weight  # noqa: E402

# No EMA and no restarts: a training forward pass then has no side effect on the weights, so a
# direct computation on the same batch sees the same model as the training step.
TINY = dict(image_size=16, channels=8, num_res_blocks=1, downsample=4, num_embeddings=16, embedding_dim=4,
            use_ema=False, restart_after=0, adversarial=True, disc_filters=8, disc_layers=2)
ADV_KEYS = ("disc_loss", "adv_loss", "adv_weight")


def _images(n=4, size=16, seed=0):
    return np.random.default_rng(seed).random((n, size, size, 1)).astype("float32")


def _weights(model):
    return [np.array(v.numpy()) for v in model.weights]


def test_discriminator_trains_and_its_losses_are_logged_only_after_disc_start():
    keras.utils.set_random_seed(0)
    model = VQVAE(TINY, disc_start=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x = _images()
    initial = _weights(model.discriminator)
    for step in range(4):
        logs = model.train_on_batch(x, return_dict=True)
        same = [np.array_equal(a, b) for a, b in zip(initial, _weights(model.discriminator))]
        if step < 2:  # steps 0 and 1: reconstruction only
            assert all(same), step
            assert all(logs[k] == 0.0 for k in ADV_KEYS), logs
            assert logs["loss"] == pytest.approx(logs["recon_loss"] + logs["vq_loss"], rel=1e-5)
        else:
            # every kernel moves (the last bias need not: the hinge's pulls on it cancel while |D| < 1)
            kernels = [s for s, v in zip(same, model.discriminator.weights) if "kernel" in v.path]
            assert len(kernels) == 3 and not any(kernels), step
            assert logs["disc_loss"] > 0 and logs["adv_weight"] > 0 and logs["adv_loss"] != 0, logs
            assert logs["loss"] == pytest.approx(
                logs["recon_loss"] + logs["vq_loss"] + logs["adv_weight"] * logs["adv_loss"], rel=1e-4)
    assert int(model.disc_optimizer.iterations) == int(model.optimizer.iterations) == 4
    # fit's epoch logs carry the trackers; validation trains no discriminator, so it has none of them
    history = model.fit(x, epochs=1, batch_size=2, verbose=0, validation_data=(x,)).history
    assert all(k in history and "val_" + k not in history for k in ADV_KEYS)
    assert history["disc_loss"][0] > 0


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_decoders_last_layer():
    keras.utils.set_random_seed(1)
    model = VQVAE(TINY, disc_start=0, disc_weight=0.5, recon_weight=2.0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x = _images(seed=1)
    kernel = model.decoder.get_layer("up1").kernel  # the last layer: 16x16 -> 4x4 grid, two up-steps
    with tf.GradientTape(persistent=True) as tape:
        x_hat = model(x, training=True)
        recon = 2.0 * tf.reduce_mean((x - x_hat) ** 2) + tf.add_n(model.losses)
        adv = -tf.reduce_mean(model.discriminator(x_hat))
    g_recon, g_adv = tape.gradient(recon, kernel), tape.gradient(adv, kernel)
    expected = 0.5 * np.linalg.norm(g_recon.numpy()) / (np.linalg.norm(g_adv.numpy()) + 1e-4)
    assert 0 < expected < 1e4  # not at a clip bound, so the ratio itself is tested
    logs = model.train_on_batch(x, return_dict=True)
    assert logs["adv_weight"] == pytest.approx(expected, rel=1e-4)
    assert logs["adv_loss"] == pytest.approx(float(adv), rel=1e-5)
    # the clip to [0, 1e4] and the guard against a float16 overflow
    assert float(adaptive_weight(tf.ones(4), tf.zeros(4))) == 1e4
    assert float(adaptive_weight(tf.constant([np.inf]), tf.ones(1))) == 0.0


def test_keras_round_trip_with_the_discriminator_and_a_file_from_before_the_option(tmp_path):
    keras.utils.set_random_seed(2)
    model = VQVAE(TINY, disc_start=1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x = _images(seed=2)
    model.fit(x, epochs=2, batch_size=2, verbose=0)
    path = tmp_path / "vqvae.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.config == model.config
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    np.testing.assert_array_equal(loaded.encode(x).numpy(), model.encode(x).numpy())
    for a, b in zip(_weights(loaded.discriminator), _weights(model.discriminator)):
        np.testing.assert_array_equal(a, b)
    assert int(loaded.disc_optimizer.iterations) == int(model.disc_optimizer.iterations) == 4
    assert int(loaded.optimizer.iterations) == 4

    # A vqvae.keras written before these fields existed (its config has none of them) still loads,
    # as a plain VQ-VAE.
    plain = VQVAE({k: v for k, v in TINY.items() if not k.startswith(("adversarial", "disc_"))})
    old = tmp_path / "old.keras"
    plain.save(old)
    legacy = tmp_path / "legacy.keras"
    with zipfile.ZipFile(old) as src, zipfile.ZipFile(legacy, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "config.json":
                cfg = json.loads(data)
                new = [k for k in cfg["config"] if k == "adversarial" or k.startswith("disc_")]
                assert len(new) == 6
                for k in new:
                    del cfg["config"][k]
                data = json.dumps(cfg).encode()
            dst.writestr(item, data)
    restored = keras.models.load_model(legacy)
    assert restored.config.adversarial is False and restored.discriminator is None
    np.testing.assert_array_equal(restored(x).numpy(), plain(x).numpy())


def test_mixed_float16_step_has_finite_losses_and_float32_logits():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = VQVAE(TINY, disc_start=0)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        assert isinstance(model.disc_optimizer, keras.optimizers.LossScaleOptimizer)
        x = _images()
        assert model.discriminator(x).dtype == "float32"
        assert model.discriminator.get_layer("down0").compute_dtype == "float16"
        before = _weights(model.discriminator)
        logs = model.train_on_batch(x, return_dict=True)
        assert all(np.isfinite(v) for v in logs.values()), logs
        assert logs["disc_loss"] > 0 and logs["adv_weight"] > 0
        assert not np.array_equal(before[0], _weights(model.discriminator)[0])
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_resume_continues_the_discriminator_and_its_optimiser(oasis_tree, tmp_path):
    """train.py's per-epoch checkpoints carry the discriminator: --resume continues it."""
    import train

    from conftest import TINY_RUN_FLAGS

    out = tmp_path / "run"
    assert train.main(["--data", oasis_tree, "--out", out, *TINY_RUN_FLAGS, "--stage", "vqvae",
                       "--adversarial", "--disc-start", "2", "--disc-layers", "2", "--disc-filters", "8"]) == 0
    ckpt = keras.models.load_model(out / "checkpoints" / "vqvae" / "epoch_0001.keras")
    assert int(ckpt.disc_optimizer.iterations) == 4  # 16 training slices in batches of 4
    assert train.main(["--out", out, "--resume", "--stage", "vqvae", "--vqvae-epochs", "2"]) == 0
    final = keras.models.load_model(out / "vqvae.keras")
    assert final.config.adversarial and final.config.disc_start == 2
    # Adam counted all 8 steps and the discriminator went on from the checkpoint's weights
    assert int(final.disc_optimizer.iterations) == int(final.optimizer.iterations) == 8
    moved = [np.abs(a - b).max() for a, b in zip(_weights(final.discriminator), _weights(ckpt.discriminator))]
    fresh = VQVAE(final.config)
    from_fresh = [np.abs(a - b).max() for a, b in zip(_weights(final.discriminator), _weights(fresh.discriminator))]
    assert max(moved) < 0.5 * max(from_fresh)  # four more small steps from the checkpoint, not a new start
    header = (out / "history_vqvae.csv").read_text().splitlines()[0].split(",")
    assert {"disc_loss", "adv_weight"} <= set(header)


_MIRRORED_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, sys.argv[1])
    import numpy as np, keras
    from modules import VQVAE
    cfg = dict(image_size=16, channels=8, num_res_blocks=1, downsample=4, num_embeddings=16, embedding_dim=4,
               use_ema=True, restart_after=0, adversarial=True, disc_filters=8, disc_layers=2, disc_start=0)
    x = np.random.default_rng(0).random((8, 16, 16, 1)).astype("float32")
    single = VQVAE(cfg)
    single.compile(optimizer=keras.optimizers.Adam(1e-3))
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = VQVAE(cfg)
        mirrored.compile(optimizer=keras.optimizers.Adam(1e-3))
    mirrored.set_weights(single.get_weights())
    want = single.train_on_batch(x, return_dict=True)
    got = mirrored.fit(tf.data.Dataset.from_tensor_slices(x).batch(8), epochs=1, verbose=0).history
    # The adaptive weight comes from global-batch gradients: 2 replicas give the 1-device value.
    for k in ("adv_weight", "disc_loss", "adv_loss"):
        assert abs(got[k][0] - want[k]) <= 1e-4 * abs(want[k]), (k, got[k][0], want[k])
    print("MIRRORED_OK")
    """
)


def test_mirrored_two_replicas_give_the_one_device_step():
    proc = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT, str(ROOT)], capture_output=True, text=True,
                          timeout=240)
    assert "MIRRORED_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_config_fields_have_defaults_help_and_validation():
    cfg = VQVAEConfig()
    assert cfg.adversarial is False  # off unless asked for
    import dataclasses

    for f in dataclasses.fields(VQVAEConfig):
        if f.name == "adversarial" or f.name.startswith("disc_"):
            assert f.metadata.get("help"), f.name
    for bad in (dict(disc_start=-1), dict(disc_weight=-0.1), dict(disc_layers=0), dict(disc_lr=0.0)):
        with pytest.raises(ValueError):
            VQVAEConfig(**bad)
    assert VQVAE(VQVAEConfig(image_size=16, channels=4)).discriminator is None
