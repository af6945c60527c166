"""Detail: the spectral and image-gradient losses, the decoder fine-tune (train.py --stage decoder) and the
radial power spectrum (issue 26)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from conftest import REPO, brain_like

TINY = ["--image-size", "32", "--downsample", "4", "--channels", "8", "--num-res-blocks", "1",
        "--num-embeddings", "16", "--embedding-dim", "4", "--batch-size", "4", "--num-samples", "0"]


def _slices(n: int = 6, size: int = 32) -> np.ndarray:
    return np.stack([brain_like(size, 1 + k % 3, k) for k in range(n)])[..., None].astype("float32") / 255.0


def _blur(images, sigma: float) -> np.ndarray:
    return np.stack([gaussian_filter(im[..., 0], sigma) for im in images])[..., None].astype("float32")


@pytest.mark.parametrize("name", ["spectral", "spectral_focal", "spectral_log", "gradient", "band_power"])
def test_each_loss_is_zero_for_identical_images_and_grows_with_blur(name):
    from modules import band_power_loss, gradient_loss, spectral_loss

    loss = {"spectral": spectral_loss, "spectral_focal": lambda a, b: spectral_loss(a, b, focal=1.0),
            "spectral_log": lambda a, b: spectral_loss(a, b, log=True), "gradient": gradient_loss,
            "band_power": band_power_loss}[name]
    x = _slices()
    assert float(loss(x, x)) == 0.0
    values = [float(loss(x, _blur(x, sigma))) for sigma in (0.5, 1.0, 2.0)]
    assert 0 < values[0] < values[1] < values[2], values


def test_band_power_loss_asks_for_each_bands_power_not_for_each_frequency():
    from modules import band_power_loss, spectral_loss

    # two noise batches of one spectrum: every band's power the same, every frequency's amplitude not
    rng = np.random.default_rng(0)
    a, b = (rng.normal(0.5, 0.05, (32, 64, 64, 1)).astype("float32") for _ in range(2))
    assert float(band_power_loss(a, b)) < 0.1 * float(spectral_loss(a, b, log=True))
    # and it reads the same bands as evaluation's power ratio: a blur's loss is the mean |log ratio|
    import evaluation

    x = _slices(8)
    metrics, _ = evaluation.power_spectrum_ratios(x, {"b": _blur(x, 1.0)})
    expected = np.mean(np.abs(np.log(metrics["power_ratio_b"])))
    assert float(band_power_loss(x, _blur(x, 1.0))) == pytest.approx(expected, rel=1e-2)  # ratios kept to 4 digits


def test_losses_are_float32_with_gradients_under_float16_inputs():
    import tensorflow as tf

    from modules import band_power_loss, gradient_loss, spectral_loss

    x = _slices(2)
    y = tf.Variable(_blur(x, 1.0).astype("float16"))
    with tf.GradientTape() as tape:
        total = (spectral_loss(x.astype("float16"), y, focal=1.0) + spectral_loss(x.astype("float16"), y, log=True)
                 + gradient_loss(x.astype("float16"), y) + band_power_loss(x.astype("float16"), y))
    assert total.dtype == tf.float32
    grad = tape.gradient(total, y)
    assert np.isfinite(grad.numpy()).all() and np.abs(grad.numpy()).max() > 0


def test_config_round_trip_and_old_configs_load_with_the_losses_off():
    from modules import VQVAE, VQVAEConfig

    cfg = VQVAEConfig(image_size=16, channels=4, num_res_blocks=1, num_embeddings=8, embedding_dim=4,
                      spectral_weight=0.3, spectral_focal=1.0, spectral_log=True, gradient_weight=0.2,
                      band_power_weight=0.1)
    assert VQVAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    model = VQVAE(cfg)
    assert VQVAE.from_config(model.get_config()).config == cfg
    old = {k: v for k, v in cfg.to_dict().items()
           if k not in ("spectral_weight", "spectral_focal", "spectral_log", "gradient_weight", "band_power_weight",
                        "freeze_encoder")}
    restored = VQVAEConfig.from_dict(old)
    assert (restored.spectral_weight, restored.spectral_focal, restored.gradient_weight,
            restored.band_power_weight) == (0.0, 0.0, 0.0, 0.0)
    assert not restored.freeze_encoder and not restored.spectral_log
    with pytest.raises(ValueError, match="spectral_weight"):
        VQVAEConfig(spectral_weight=-1.0)
    with pytest.raises(ValueError, match="band_power_weight"):
        VQVAEConfig(band_power_weight=-0.1)


def test_code_noise_swaps_that_share_of_codes_for_codebook_rows_in_training_only():
    import keras

    from modules import VQVAE, VQVAEConfig

    model = VQVAE(image_size=16, channels=4, num_res_blocks=1, num_embeddings=8, embedding_dim=4, code_noise=0.5)
    codes = np.random.default_rng(0).integers(0, 8, (64, 4, 4))
    q = np.asarray(model.vector_quantizer.quantize(codes))
    noisy = np.asarray(model._with_code_noise(keras.ops.convert_to_tensor(q)))
    changed = np.any(noisy != q, axis=-1)
    # half the positions are redrawn; a redraw lands on the same code 1 time in 8
    assert 0.38 < changed.mean() < 0.50, changed.mean()
    book = np.asarray(model.vector_quantizer.codebook)
    distance = np.abs(noisy[..., None, :] - book).sum(-1).min(-1)  # every position holds some codebook row
    np.testing.assert_allclose(distance, 0.0, atol=1e-6)
    x = _slices(4, 16)  # inference never swaps: the model reconstructs as decode(encode(x))
    np.testing.assert_allclose(np.asarray(model(x, training=False)), np.asarray(model.decode(model.encode(x))),
                               atol=1e-6)
    assert VQVAEConfig().code_noise == 0.0
    with pytest.raises(ValueError, match="code_noise"):
        VQVAEConfig(code_noise=1.0)


def test_fit_reports_the_detail_losses_only_when_they_are_on():
    import keras

    from modules import VQVAE

    x = _slices(4, 16)
    for weights, shown in (({}, False), ({"spectral_weight": 0.5, "gradient_weight": 0.5, "band_power_weight": 0.1}, True)):
        keras.utils.set_random_seed(0)
        model = VQVAE(image_size=16, channels=4, num_res_blocks=1, num_embeddings=8, embedding_dim=4, **weights)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        logs = model.fit(x, batch_size=4, epochs=1, verbose=0).history
        assert ("spectral_loss" in logs and "gradient_loss" in logs and "band_power_loss" in logs) == shown, logs.keys()
        assert np.isfinite(logs["loss"]).all()


def test_mixed_float16_fit_with_the_detail_losses():
    import keras

    from modules import VQVAE

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = VQVAE(image_size=16, channels=4, num_res_blocks=1, num_embeddings=8, embedding_dim=4,
                      spectral_weight=0.5, spectral_focal=1.0, gradient_weight=0.5)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        logs = model.fit(_slices(4, 16), batch_size=2, epochs=1, verbose=0).history
        assert np.isfinite(logs["spectral_loss"]).all() and np.isfinite(logs["gradient_loss"]).all()
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _history_epochs(path):
    with path.open(newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def test_decoder_stage_freezes_encoder_codebook_and_codes_changes_the_decoder_and_resumes(oasis_tree, tmp_path):
    import keras

    import dataset
    import train

    out = tmp_path / "run"
    assert train.main(["--data", oasis_tree, "--out", out, *TINY, "--stage", "vqvae", "--vqvae-epochs", "1"]) == 0
    before = keras.models.load_model(out / "vqvae.keras")
    x = dataset.read_oasis(oasis_tree, image_size=32)["test"].float()
    codes = np.asarray(before.encode(x))

    assert train.main(["--data", oasis_tree, "--out", out, "--stage", "decoder", "--decoder-epochs", "1",
                       "--decoder-lr", "0.01", "--spectral-weight", "0.5", "--gradient-weight", "0.5",
                       "--code-noise", "0.2"]) == 0
    after = keras.models.load_model(out / "vqvae.keras")
    for a, b in zip(before.encoder.get_weights(), after.encoder.get_weights()):
        np.testing.assert_array_equal(a, b)
    for var_a, var_b in zip(before.vector_quantizer.weights, after.vector_quantizer.weights):
        if not var_a.name.startswith("batch_"):  # the per-batch usage statistics are reports, not the codebook
            np.testing.assert_array_equal(np.asarray(var_a), np.asarray(var_b), err_msg=var_a.name)
    np.testing.assert_array_equal(codes, np.asarray(after.encode(x)))
    assert any(not np.array_equal(a, b) for a, b in zip(before.decoder.get_weights(), after.decoder.get_weights()))
    assert not after.config.freeze_encoder and after.config.spectral_weight == 0.0  # the run's VQ-VAE, new decoder
    assert (out / "vqvae_before_decoder.keras").is_file()

    config = json.loads((out / "config.json").read_text())
    assert config["decoder"]["spectral_weight"] == 0.5 and config["decoder"]["epochs"] == 1
    assert config["decoder"]["code_noise"] == 0.2 and after.config.code_noise == 0.0
    assert config["vqvae"]["spectral_weight"] == 0.0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["power_ratio_reconstructions"]) == 8 and "decoder_train_s" in metrics

    # resume: one more epoch from the stage's checkpoint, its settings kept
    assert train.main(["--data", oasis_tree, "--out", out, "--stage", "decoder", "--resume",
                       "--decoder-epochs", "2"]) == 0
    assert _history_epochs(out / "history_decoder.csv") == [0, 1]
    assert json.loads((out / "config.json").read_text())["decoder"]["spectral_weight"] == 0.5
    resumed = keras.models.load_model(out / "vqvae.keras")
    np.testing.assert_array_equal(codes, np.asarray(resumed.encode(x)))
    # a resumed stage may not change its losses
    assert train.main(["--data", oasis_tree, "--out", out, "--stage", "decoder", "--resume",
                       "--spectral-weight", "0.1"]) == 2
    # resuming stage 1, which has nothing left to train, keeps the fine-tuned decoder
    assert train.main(["--data", oasis_tree, "--out", out, "--stage", "vqvae", "--resume"]) == 0
    kept = keras.models.load_model(out / "vqvae.keras")
    for a, b in zip(resumed.decoder.get_weights(), kept.decoder.get_weights()):
        np.testing.assert_array_equal(a, b)
    # ... while stage 1 trained on changes the codes: the fine-tune is dropped, stage 1's model saved
    assert train.main(["--data", oasis_tree, "--out", out, "--stage", "vqvae", "--resume", "--vqvae-epochs", "2"]) == 0
    assert not (out / "vqvae_before_decoder.keras").exists()
    retrained = keras.models.load_model(out / "vqvae.keras")
    assert any(not np.array_equal(a, b) for a, b in zip(kept.encoder.get_weights(), retrained.encoder.get_weights()))


_MIRRORED_SCRIPT = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, sys.argv[1])
import numpy as np, keras
from modules import VQVAE
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():  # the decoder stage's model: detail losses on, encoder and codebook frozen
    model = VQVAE(image_size=16, channels=4, num_res_blocks=1, num_embeddings=8, embedding_dim=4,
                  restart_after=1, spectral_weight=0.5, spectral_focal=1.0, gradient_weight=0.5, freeze_encoder=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
frozen = [w.copy() for w in model.encoder.get_weights() + model.vector_quantizer.get_weights()[:3]]
decoder = [w.copy() for w in model.decoder.get_weights()]
x = np.random.default_rng(0).uniform(size=(8, 16, 16, 1)).astype("float32")
hist = model.fit(tf.data.Dataset.from_tensor_slices(x).batch(4), epochs=1, verbose=0).history
assert np.isfinite(hist["spectral_loss"]).all() and np.isfinite(hist["gradient_loss"]).all(), hist
for a, b in zip(frozen, model.encoder.get_weights() + model.vector_quantizer.get_weights()[:3]):
    assert np.array_equal(a, b)
assert any(not np.array_equal(a, b) for a, b in zip(decoder, model.decoder.get_weights()))
print("MIRRORED_OK", strategy.num_replicas_in_sync)
"""


def test_detail_losses_and_frozen_encoder_on_two_replicas():
    """Two logical CPU devices must be configured before TF starts, hence the subprocess."""
    proc = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT, str(REPO)], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert "MIRRORED_OK 2" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_power_spectrum_ratio_is_one_for_identical_sets_and_below_one_at_high_bands_for_blur():
    import evaluation

    x = _slices(8)
    metrics, spectra = evaluation.power_spectrum_ratios(x, {"same": x.copy(), "blurred": _blur(x, 1.0)})
    np.testing.assert_allclose(metrics["power_ratio_same"], 1.0, atol=1e-6)
    blurred = np.array(metrics["power_ratio_blurred"])
    assert blurred[-1] < 0.5 < blurred[0] and blurred[-1] < blurred[len(blurred) // 2]
    assert metrics["power_band_edges"][0] == 0.0 and metrics["power_band_edges"][-1] == 0.5
    assert set(spectra) == {"real", "same", "blurred"}
    with pytest.raises(ValueError, match="no images"):
        evaluation.radial_power_spectrum(np.zeros((0, 32, 32, 1)))
    with pytest.raises(ValueError, match="no images"):
        evaluation.power_spectrum_ratios(x, {"samples": []})


def test_plot_power_spectrum_writes_a_figure(tmp_path):
    import evaluation
    import utils

    x = _slices(4)
    metrics, spectra = evaluation.power_spectrum_ratios(x, {"reconstructions": _blur(x, 1.0)})
    path = utils.plot_power_spectrum(metrics["power_band_edges"], spectra, tmp_path / "power_spectrum.png")
    assert path.is_file() and path.stat().st_size > 0


def test_band_coherence_tells_a_band_drawn_in_place_from_noise_of_the_same_power():
    import evaluation

    x = _slices(8)
    same = evaluation.band_coherence(x, x.copy())
    np.testing.assert_allclose(same["correlation"], 1.0, atol=1e-9)
    np.testing.assert_allclose(same["power"], 1.0, atol=1e-9)
    np.testing.assert_allclose(same["error"], 0.0, atol=1e-9)
    # its power ratio agrees with radial_power_spectrum's (one definition of the bands)
    blurred = _blur(x, 1.0)
    metrics, _ = evaluation.power_spectrum_ratios(x, {"b": blurred})
    np.testing.assert_allclose(evaluation.band_coherence(x, blurred)["power"], metrics["power_ratio_b"], atol=1e-4)
    # noise drawn afresh: the power is there but nothing of the band (error 1 + power); the blur keeps its
    # low bands in place
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 0.05, (32, 64, 64))
    noisy = evaluation.band_coherence(noise, rng.normal(0.0, 0.05, noise.shape))
    assert np.all(np.abs(noisy["correlation"]) < 0.1)
    np.testing.assert_allclose(noisy["error"], 1.0 + noisy["power"], atol=0.2)
    assert evaluation.band_coherence(x, blurred)["correlation"][0] > 0.99
    with pytest.raises(ValueError, match="not paired"):
        evaluation.band_coherence(x, x[:4])
    # the cheapest error at a power: nothing for a band known exactly at its own power, the whole
    # added power for noise; a known band scaled costs less than noise of the same power
    assert evaluation.cheapest_power_error(1.0, 1.0) == pytest.approx(0.0)
    assert evaluation.cheapest_power_error(0.0, 0.8) == pytest.approx(1.8)
    assert evaluation.cheapest_power_error(0.7, 0.8) < 1.8


def test_bench_power_bands_lifting_costs_nothing_where_the_bands_are_known_and_their_power_where_not():
    sys.path.insert(0, str(REPO / "bench"))
    import evaluation
    from bench_power_bands import lift_cost_db

    x = _slices(8)
    assert lift_cost_db(evaluation.band_coherence(x, x.copy() * 0.999 + 0.0005), 0.8) == 0.0
    # a blur keeps every band in place: scaling it back up (a sharpening) gains
    assert lift_cost_db(evaluation.band_coherence(x, _blur(x, 1.0)), 0.8) > 0.0
    # real slices with noise, made ones blurred with noise drawn afresh (the demo's case): lifting the high
    # bands, which hold little but noise, costs, the more the higher the target
    rng = np.random.default_rng(0)
    made = evaluation.band_coherence(x + rng.normal(0.0, 0.02, x.shape), _blur(x, 1.0) + rng.normal(0.0, 0.02, x.shape))
    assert lift_cost_db(made, 0.95) < lift_cost_db(made, 0.8) < 0.0
