"""train.py: a two-stage run, resume after kill -9, the NaN stop, mirrored training, error messages."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

# A tiny model so that each epoch takes a fraction of a second on 2 cores.
TINY = ["--image-size", "32", "--downsample", "4", "--channels", "8", "--num-res-blocks", "1",
        "--num-embeddings", "16", "--embedding-dim", "4", "--prior-filters", "8", "--prior-num-layers", "2",
        "--batch-size", "4", "--decoder-epochs", "0"]  # the end-to-end test below runs the decoder fine-tune


def run_train(*args, timeout=240):
    """Run train.py in a fresh process (so TensorFlow starts clean); return the CompletedProcess."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)


def history_epochs(path: Path) -> list[int]:
    with path.open(newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def test_two_stage_run_writes_models_metrics_and_figures(oasis_tree, tmp_path, monkeypatch):
    import train
    import utils

    config_writes = []
    save_json = utils.save_json

    def recording_save_json(obj, path):
        if Path(path).name == "config.json":
            config_writes.append(json.loads(json.dumps(obj)))
        return save_json(obj, path)

    monkeypatch.setattr(utils, "save_json", recording_save_json)
    out = tmp_path / "run"
    assert train.main(["--data", oasis_tree, "--out", out, *TINY, "--vqvae-epochs", "2", "--prior-epochs", "2",
                       "--decoder-epochs", "1", "--num-samples", "2"]) == 0
    for name in ("config.json", "vqvae.keras", "pixelcnn.keras", "metrics.json", "codes.npz",
                 "training_curves.png", "reconstructions.png", "code_grids.png", "codebook_usage.png", "samples.png",
                 "vqvae_before_decoder.keras"):
        assert (out / name).is_file(), name
    assert history_epochs(out / "history_vqvae.csv") == [0, 1]
    assert history_epochs(out / "history_prior.csv") == [0, 1]
    assert history_epochs(out / "history_decoder.csv") == [0]  # the demo preset's decoder fine-tune, after the prior
    assert any((out / "logs" / "vqvae").rglob("events.out.tfevents*"))
    config = json.loads((out / "config.json").read_text())
    assert config_writes == [config]  # written once, already complete
    assert config["vqvae"]["num_embeddings"] == 16 and config["vqvae"]["image_size"] == 32
    from modules import PriorConfig

    # The prior section is exactly a PriorConfig: everything the prior needs, nothing beside it.
    assert PriorConfig.from_dict(config["prior"]).to_dict() == config["prior"]
    assert config["prior"]["grid_shape"] == [8, 8]
    assert config["prior"]["num_conditions"] == 4          # slices 0..3, conditioned by default
    assert config["data"]["num_images"] == {"train": 16, "validate": 4, "test": 4}
    assert {"tensorflow", "keras"} <= set(config["versions"])
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_ssim", "test_psnr", "codebook_perplexity", "active_codes", "prior_val_nll_bits",
                "prior_test_nll_bits"):
        assert isinstance(metrics[key], float), key
    assert -1 <= metrics["test_ssim"] <= 1 and 0 < metrics["active_codes"] <= 1
    assert 1 <= metrics["codebook_perplexity"] <= 16
    # An untrained-ish prior over 16 codes costs about log2(16) = 4 bits per code, never more than ~2x.
    assert 0 < metrics["prior_test_nll_bits"] < 8

    import keras

    import modules  # noqa: F401

    vqvae = keras.models.load_model(out / "vqvae.keras")
    prior = keras.models.load_model(out / "pixelcnn.keras")
    assert tuple(vqvae.grid_shape) == (8, 8) and prior.num_embeddings == 16

    assert prior.config == PriorConfig.from_dict(config["prior"])
    # The fine-tune ran with the preset's losses on a frozen encoder, so the prior's codes hold for the
    # final VQ-VAE, whose own config is stage 1's.
    assert {k: config["decoder"][k] for k in train.PRESETS["demo"]["decoder_config"]} == \
        train.PRESETS["demo"]["decoder_config"]
    assert config["decoder"]["epochs"] == 1 and vqvae.config.band_power_weight == 0.0  # stage 1's losses
    before = keras.models.load_model(out / "vqvae_before_decoder.keras")
    assert any(not np.array_equal(a, b) for a, b in zip(before.decoder.get_weights(), vqvae.decoder.get_weights()))
    import dataset
    import evaluation

    test = dataset.load_images(oasis_tree / "keras_png_slices_test", image_size=32)
    np.testing.assert_array_equal(evaluation.encode_images(vqvae, test), evaluation.encode_images(before, test))
    assert "decoder_train_s" in metrics
    # --resume finds every stage done and keeps the fine-tuned decoder; it may not drop the fine-tune
    assert train.main(["--out", out, "--resume", "--num-samples", "0", "--judge-epochs", "0"]) == 0
    for a, b in zip(vqvae.decoder.get_weights(), keras.models.load_model(out / "vqvae.keras").decoder.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(SystemExit):
        train.main(["--out", out, "--resume", "--decoder-epochs", "0"])

    # --stage prior retrains only the prior, reusing the VQ-VAE and the cached codes; the user's switch
    # --no-condition-on-slice becomes num_conditions = 0 in the one config.json this stage writes.
    vq_bytes = (out / "vqvae.keras").read_bytes()
    config_writes.clear()
    assert train.main(["--out", out, "--stage", "prior", "--prior-epochs", "1", "--num-samples", "0",
                       "--no-condition-on-slice"]) == 0
    assert (out / "vqvae.keras").read_bytes() == vq_bytes
    assert history_epochs(out / "history_prior.csv") == [0]
    config = json.loads((out / "config.json").read_text())
    assert config_writes == [config] and config["prior"]["num_conditions"] == 0
    assert keras.models.load_model(out / "pixelcnn.keras").config.num_conditions == 0


def test_oasis_preset_end_to_end_on_oasis_shaped_data(tmp_path):
    """The real user's first command, on data shaped like OASIS: 256x256 PNGs, 32 slices per case.

    Everything comes from ``--preset oasis`` (image size 256, down-sampling 8 to a 32x32 grid, 256
    codes, batch sizes, learning rates, a positional slice-conditioned gated prior, 32 conditions)
    except what keeps the test short on 2 cores: one epoch per stage, 3 cases (1 train, 1 validate,
    1 test), and narrow layers (8 VQ-VAE channels instead of 64; a prior of 8 filters x 2 layers
    instead of 64 x 12). Run as the user runs it, in a fresh process, whose stderr must be empty.
    """
    from conftest import write_tree

    data = write_tree(tmp_path / "oasis", size=256, cases={"train": [1], "validate": [2], "test": [3]}, slices=32)
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--preset", "oasis", "--data", str(data),
                           "--out", str(out), "--epochs", "1", "--channels", "8", "--prior-filters", "8",
                           "--prior-num-layers", "2", "--num-samples", "2"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stderr == ""  # no TensorFlow start-up or library noise
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "oasis" and config["data"]["image_size"] == 256
    assert config["vqvae"]["downsample"] == 8 and config["vqvae"]["num_embeddings"] == 256
    assert config["prior"]["grid_shape"] == [32, 32] and config["prior"]["num_conditions"] == 32
    assert config["prior"]["positional"] and config["prior"]["gated"]
    assert config["training"]["vqvae_batch_size"] == 8 and config["training"]["prior_batch_size"] == 32
    assert config["data"]["num_images"] == {"train": 32, "validate": 32, "test": 32}
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(np.isfinite(metrics[k]) for k in ("test_ssim", "prior_val_nll_bits", "prior_test_nll_bits"))
    for name in ("vqvae.keras", "pixelcnn.keras", "samples.png", "reconstructions.png", "training_curves.png"):
        assert (out / name).is_file(), name


def test_resume_after_kill_continues_without_duplicate_or_missing_epochs(oasis_tree, tmp_path):
    out = tmp_path / "run"
    args = [str(REPO / "train.py"), "--data", str(oasis_tree), "--out", str(out), *TINY, "--stage", "vqvae",
            "--vqvae-epochs", "8"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ckpt_dir = out / "checkpoints" / "vqvae"
    deadline = time.time() + 180
    try:
        while time.time() < deadline and not (ckpt_dir / "epoch_0002.keras").exists():
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.05)
        assert (ckpt_dir / "epoch_0002.keras").exists()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = max(int(p.stem.split("_")[1]) for p in ckpt_dir.glob("epoch_*.keras"))
    assert killed_at < 8
    assert not (out / "vqvae.keras").exists()

    result = run_train("--out", out, "--resume", "--stage", "vqvae", "--vqvae-epochs", "9")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from {ckpt_dir / f'epoch_{killed_at:04d}.keras'}" in result.stdout
    assert history_epochs(out / "history_vqvae.csv") == list(range(9))
    # The optimiser state came back with the weights: Adam counted every step of all 9 epochs
    # (16 training images in batches of 4), not only the steps after the restart.
    import keras

    import modules  # noqa: F401

    assert int(keras.models.load_model(out / "vqvae.keras").optimizer.iterations) == 9 * 4


def _one_line_error(argv) -> tuple[int, list[str]]:
    """Run train.main in-process; return its exit code and its stderr lines."""
    import contextlib
    import io

    import train

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train.main([str(a) for a in argv])
    return code, err.getvalue().strip().splitlines()


def test_files_without_slice_numbers_stop_a_conditioned_run_before_training(oasis_tree, tmp_path):
    train_dir = oasis_tree / "keras_png_slices_train"
    (train_dir / "case_002_slice_1.nii.png").rename(train_dir / "scan_b.png")
    (oasis_tree / "keras_png_slices_test" / "case_006_slice_3.nii.png").rename(
        oasis_tree / "keras_png_slices_test" / "extra.png")
    out = tmp_path / "run"
    code, lines = _one_line_error(["--data", oasis_tree, "--out", out, *TINY, "--epochs", "1", "--num-samples", "0"])
    assert code == 2 and len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("train.py: error: ") and str(train_dir / "scan_b.png") in line
    assert "2 of 24 files" in line and "case_<id>_slice_<k>.nii.png" in line and "--no-condition-on-slice" in line
    assert not out.exists()  # nothing was trained or written


def test_slice_conditions_come_from_the_training_split_only(oasis_tree, tmp_path):
    import train
    from conftest import brain_like
    from PIL import Image

    out = tmp_path / "run"
    test_dir = oasis_tree / "keras_png_slices_test"
    Image.fromarray(brain_like(32, 6, 7), mode="L").save(test_dir / "case_006_slice_7.nii.png")
    code, lines = _one_line_error(["--data", oasis_tree, "--out", out, *TINY, "--epochs", "1", "--num-samples", "0"])
    assert code == 2 and len(lines) == 1, lines
    assert str(test_dir / "case_006_slice_7.nii.png") in lines[0] and "slices 0..3" in lines[0]
    assert "--no-condition-on-slice" in lines[0] and not out.exists()

    import dataset

    import runconfig

    splits = dataset.read_oasis(oasis_tree, image_size=32)
    splits["test"] = splits["test"].subset(splits["test"].slice_indices < 4)
    assert runconfig.slice_conditions(splits) == 4


def test_checkpoint_discovery_ignores_unfinished_files(tmp_path):
    import rundir

    (tmp_path / "epoch_0002.keras").write_bytes(b"done")
    (tmp_path / "tmp_123.keras").write_bytes(b"half")        # a write cut short by a kill
    (tmp_path / "epoch_0003.keras.partial").write_bytes(b"x")
    assert rundir.latest_checkpoint(tmp_path) == (2, tmp_path / "epoch_0002.keras")
    assert rundir.latest_checkpoint(tmp_path / "missing") == (0, None)


def test_truncate_history_drops_epochs_after_the_checkpoint(tmp_path):
    import rundir

    path = tmp_path / "h.csv"
    path.write_text("epoch,loss\n0,1.0\n1,0.9\n2,0.8\n")
    rundir.truncate_history(path, 2)
    assert path.read_text() == "epoch,loss\n0,1.0\n1,0.9\n"


def test_nan_loss_stops_with_a_clear_message(oasis_tree, tmp_path, capsys):
    import train

    out = tmp_path / "run"
    code = train.main(["--data", oasis_tree, "--out", out, *TINY, "--stage", "vqvae", "--vqvae-epochs", "3",
                       "--vqvae-lr", "1e30", "--recon-weight", "1e30"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("train.py: error: [vqvae] loss became NaN") and "--resume" in err[-1]
    assert not (out / "vqvae.keras").exists()
    assert not list((out / "checkpoints" / "vqvae").glob("epoch_*.keras"))  # no NaN model was kept


def test_a_vqvae_that_learned_nothing_stops_after_its_first_epoch_with_one_line(oasis_tree, tmp_path, capsys,
                                                                                  monkeypatch):
    """Adam at 1.0 kills every ReLU of the tiny decoder in the first epoch (every reconstruction the same
    image): the run stops there with one line naming the likely cause, exit 2, and leaves no model,
    checkpoint or history row of the dead epoch."""
    import train

    out = tmp_path / "run"
    monkeypatch.setattr(train, "STALL_GUARD_MIN_STEPS", 4)  # the tiny run's epoch: 16 slices in batches of 4
    code = train.main(["--data", oasis_tree, "--out", out, *TINY, "--stage", "vqvae", "--vqvae-epochs", "3",
                       "--vqvae-lr", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("train.py: error: [vqvae] learned nothing in epoch 1: every reconstruction is the "
                              "same image"), err[-3:]
    assert "dead ReLUs" in err[-1] and "--vqvae-lr" in err[-1]
    assert "--vqvae-warmup-steps 100 --vqvae-clipnorm 1 " in err[-1]  # the cure, named
    assert "(now --vqvae-lr 1 --vqvae-warmup-steps 0 --vqvae-clipnorm 0)" in err[-1]  # and what this run had
    assert not (out / "vqvae.keras").exists()
    assert not list((out / "checkpoints" / "vqvae").glob("epoch_*.keras"))
    assert not (out / "history_vqvae.csv").exists() or history_epochs(out / "history_vqvae.csv") == []


def test_stall_guard_judges_constant_reconstructions_only():
    """The guard's rule on its own: one image for every input, no better than a constant, stops; a model
    whose reconstructions follow their inputs, even barely (a tiny model after a few steps), goes on."""
    import keras

    import train
    from runconfig import TrainError

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (8, 16, 16, 1)).astype(np.float32)

    class Fake(keras.Model):  # encode/decode are all the guard calls
        def __init__(self, mix):
            super().__init__()
            self.mix = mix

        def encode(self, x):
            return x

        def decode(self, codes):
            return self.mix * codes + (1 - self.mix) * 0.2

    for mix, stops in ((0.0, True), (1e-5, True), (0.02, False), (1.0, False)):
        guard = train.stall_guard(images, lr=2e-3, min_steps=2)
        guard.set_model(Fake(mix))
        guard.on_train_begin()
        guard.on_train_batch_end(0)
        assert guard.on_epoch_end(0, {}) is None  # one step proves nothing: not judged yet
        guard.on_train_batch_end(1)
        if stops:
            with pytest.raises(TrainError, match="learned nothing in epoch 2"):
                guard.on_epoch_end(1, {"ssim": 0.1})
        else:
            guard.on_epoch_end(1, {"ssim": 0.1})
        assert guard.on_epoch_end(2, {}) is None  # judged once


def test_vqvae_warmup_schedule_starts_at_zero_and_peaks_at_the_learning_rate():
    import train

    schedule = train.cosine_schedule(2e-3, epochs=8, num_examples=1920, batch_size=16,
                                      warmup_steps=train.VQVAE_WARMUP_STEPS)  # the demo's 960 steps
    lr = [float(schedule(step)) for step in (0, 50, 100, 960)]
    assert lr[0] == 0.0 and lr[1] == pytest.approx(1e-3) and lr[2] == pytest.approx(2e-3)
    assert lr[3] == pytest.approx(0.05 * 2e-3)
    short = train.cosine_schedule(2e-3, epochs=1, num_examples=16, batch_size=4, warmup_steps=100)
    assert float(short(1)) == pytest.approx(2e-3)  # warm-up is at most a quarter of the run (1 of 4 steps)


def test_downsample_8_vqvae_trains(tmp_path):
    """A small --downsample 8 VQ-VAE (the demo's 32 channels, 64x64 images, 8x8 codes) with the opt-in
    warm-up and clipping (--vqvae-warmup-steps 100 --vqvae-clipnorm 1; 100 is cut to a quarter of the 60
    steps) learns within 60 steps: the loss falls and the reconstructions follow their inputs."""
    import keras

    import train
    from modules import VQVAE, VQVAEConfig

    sys.path.insert(0, str(REPO / "tests"))
    from test_modules import _smooth_images

    keras.utils.set_random_seed(0)
    x = _smooth_images(32, 64)
    model = VQVAE(VQVAEConfig(image_size=64, downsample=8, ssim_weight=0.1))
    model.compile(optimizer=train.vqvae_optimizer(2e-3, epochs=15, num_examples=32, batch_size=8,
                                                  warmup_steps=100, clipnorm=1.0))  # the opt-in cure
    guard = train.stall_guard(x, 2e-3)
    recon = model.fit(x, batch_size=8, epochs=15, verbose=0, callbacks=[guard]).history["recon_loss"]
    assert recon[-1] < 0.5 * recon[0], recon
    out = np.asarray(model.decode(model.encode(x)))
    assert out.std(axis=0).mean() > 0.2 * x.std(axis=0).mean()


def test_demo_preset_has_64_codes_and_the_flag_still_sets_the_codebook(tmp_path):
    """The demo VQ-VAE has 64 codes (docs/prior-designs.md#codebook-size); --num-embeddings 128 gives the
    128-code run the docs compare it with, and a run saved with 128 codes resumes with them."""
    import train
    import utils

    parser = train.build_parser()
    cfg, _ = train.resolve_config(parser.parse_args(["--out", str(tmp_path / "demo")]), parser)
    assert cfg["vqvae"]["num_embeddings"] == 64
    cfg, _ = train.resolve_config(parser.parse_args(["--out", str(tmp_path / "k128"), "--num-embeddings", "128"]),
                                  parser)
    assert cfg["vqvae"]["num_embeddings"] == 128
    (tmp_path / "k128").mkdir()
    utils.save_json(cfg, tmp_path / "k128" / "config.json")
    resumed, _ = train.resolve_config(parser.parse_args(["--out", str(tmp_path / "k128"), "--resume"]), parser)
    assert resumed["vqvae"]["num_embeddings"] == 128


def test_default_vqvae_optimizer_is_todays_no_warmup_no_clipping(tmp_path):
    """Warm-up and clipping are opt-in for now: both presets give 0 (off), and vqvae_optimizer then builds
    exactly the optimiser the default demo's weights (and every figure) came from: Adam over a plain
    CosineDecay from the learning rate, no global_clipnorm argument."""
    import keras

    import train

    parser = train.build_parser()
    for preset in ("demo", "oasis"):
        cfg, _ = train.resolve_config(parser.parse_args(["--out", str(tmp_path / preset), "--preset", preset]),
                                      parser)
        t = cfg["training"]
        assert t["vqvae_warmup_steps"] == 0 and t["vqvae_clipnorm"] == 0
    cfg, _ = train.resolve_config(parser.parse_args(["--out", str(tmp_path / "on"), "--vqvae-warmup-steps", "100",
                                                     "--vqvae-clipnorm", "1"]), parser)
    assert cfg["training"]["vqvae_warmup_steps"] == 100 and cfg["training"]["vqvae_clipnorm"] == 1.0

    t = train.PRESETS["demo"]
    built = train.vqvae_optimizer(t["vqvae_lr"], t["vqvae_epochs"], 1920, t["vqvae_batch_size"],
                                  t["vqvae_warmup_steps"], t["vqvae_clipnorm"])
    before = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(2e-3, decay_steps=960, alpha=0.05))
    assert type(built._learning_rate) is keras.optimizers.schedules.CosineDecay
    assert built._learning_rate.get_config() == before._learning_rate.get_config()
    assert built._learning_rate.warmup_steps == 0 and built._learning_rate.initial_learning_rate == 2e-3
    assert built.global_clipnorm is None and built.clipnorm is None and built.clipvalue is None
    same = [keras.saving.serialize_keras_object(o) for o in (built, before)]
    for o in same:
        o["config"].pop("name")  # Keras numbers a second "adam" in one process "adam_1"
    assert same[0] == same[1]
    # Opted in: the warm-up schedule and the clipping.
    on = train.vqvae_optimizer(2e-3, 8, 1920, 16, warmup_steps=100, clipnorm=1.0)
    assert on.global_clipnorm == 1.0 and on._learning_rate.warmup_steps == 100
    assert float(on._learning_rate(0)) == 0.0 and float(on._learning_rate(100)) == pytest.approx(2e-3)


def test_resume_of_a_run_saved_without_warmup_or_clipnorm_keeps_them_off(tmp_path):
    """A config.json written before the two keys existed (the old code's: the same config without them)
    resumes, or retrains its prior, with both off -- the optimiser it was trained with -- and the
    in-memory config is completed with them."""
    import train

    out = tmp_path / "run"
    parser = train.build_parser()
    cfg, _ = train.resolve_config(parser.parse_args(["--out", str(out), "--vqvae-lr", "1e-3"]), parser)
    old = {k: v for k, v in cfg.items() if k != "out"}
    old["training"] = {k: v for k, v in cfg["training"].items() if k not in ("vqvae_warmup_steps", "vqvae_clipnorm")}
    out.mkdir()
    (out / "config.json").write_text(json.dumps(old))
    for argv in (["--resume"], ["--stage", "prior"]):
        cfg, _ = train.resolve_config(parser.parse_args(["--out", str(out), *argv]), parser)
        assert cfg["training"]["vqvae_warmup_steps"] == 0 and cfg["training"]["vqvae_clipnorm"] == 0
        assert cfg["training"]["vqvae_lr"] == 1e-3
    # Opting in on a resume is a training setting like --vqvae-lr: recorded in the run's config.
    cfg, _ = train.resolve_config(parser.parse_args(["--out", str(out), "--resume", "--vqvae-warmup-steps", "100"]),
                                  parser)
    assert cfg["training"]["vqvae_warmup_steps"] == 100 and cfg["training"]["vqvae_clipnorm"] == 0


def test_mirrored_training_on_two_logical_cpus(oasis_tree, tmp_path):
    out = tmp_path / "run"
    result = run_train("--data", oasis_tree, "--out", out, *TINY, "--stage", "vqvae", "--vqvae-epochs", "1",
                       "--distribute", "mirrored", "--virtual-cpus", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mirrored over 2 devices" in result.stdout
    assert history_epochs(out / "history_vqvae.csv") == [0]
    assert (out / "vqvae.keras").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_workers(argv, logs: Path, tag: str, env: dict) -> list[subprocess.Popen]:
    """Two ``train.py --distribute multiworker`` processes on fresh loopback ports; output in ``logs/<tag><i>.out``."""
    ports = [_free_port(), _free_port()]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": [f"localhost:{p}" for p in ports]}, "task": {"type": "worker", "index": index}}
        with open(logs / f"{tag}{index}.out", "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, str(REPO / "train.py"), *map(str, argv), "--distribute", "multiworker"],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                env={**env, "PYTHONUNBUFFERED": "1", "TF_CONFIG": json.dumps(tf_config)}))
    return procs


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_multiworker_run_killed_mid_stage_resumes_from_the_chiefs_checkpoint(oasis_tree, tmp_path):
    """Two ``--distribute multiworker`` workers on loopback ports train both stages together; both are
    killed mid-stage, and restarted with ``--resume`` they continue from the chief's newest checkpoint
    (in --out: the other worker's copies died with its temp dir).

    The resumed workers exit 0; only the chief (worker 0) writes into --out, and the other worker's
    temporary directory is gone afterwards; the run ends with one complete run directory and
    bit-identical models on both workers (the weights digests they print), which are the chief's saved
    files. ``--restart-after 1`` makes dead-code restarts happen every step, so the restart vectors
    must be the same on both workers too.
    """
    out, logs, temp = tmp_path / "run", tmp_path / "logs", tmp_path / "temp"
    logs.mkdir()
    temp.mkdir()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TMPDIR": str(temp)}  # the non-chief's write dir lands here
    argv = ["--data", oasis_tree, "--out", out, *TINY, "--vqvae-epochs", "3", "--prior-epochs", "1",
            "--decoder-epochs", "1", "--judge-epochs", "0", "--num-samples", "0",
            "--restart-after", "1"]
    ckpt_dir = out / "checkpoints" / "vqvae"
    procs = _start_workers(argv, logs, "first", env)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and not (ckpt_dir / "epoch_0001.keras").exists():
            assert all(p.poll() is None for p in procs), "a worker ended before it could be killed: " + \
                (logs / "first0.out").read_text()[-2000:] + (logs / "first1.out").read_text()[-2000:]
            time.sleep(0.02)
        assert (ckpt_dir / "epoch_0001.keras").exists(), (logs / "first0.out").read_text()[-2000:]
    finally:
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
        _stop(procs)
    killed_at = max(int(p.stem.split("_")[1]) for p in ckpt_dir.glob("epoch_*.keras"))
    assert 1 <= killed_at < 3 and not (out / "vqvae.keras").exists()
    left_behind = set(temp.iterdir())  # the killed non-chief's write dir: nothing could remove it

    procs = _start_workers([*argv, "--resume"], logs, "resumed", env)
    try:
        for p in procs:
            p.wait(timeout=240)
    finally:
        _stop(procs)
    chief, other = ((logs / f"resumed{i}.out").read_text() for i in range(2))
    for p, text in zip(procs, (chief, other)):
        assert p.returncode == 0, text[-3000:]
    resumed = f"[vqvae] resuming from {ckpt_dir / f'epoch_{killed_at:04d}.keras'} ({killed_at} of 3 epochs done)"
    assert resumed in chief and resumed in other  # the same checkpoint, the chief's, on both workers
    assert "this worker is the chief" in chief and "worker done" in other

    for name in ("config.json", "vqvae.keras", "pixelcnn.keras", "metrics.json", "history_vqvae.csv",
                 "history_prior.csv", "codes.npz", "reconstructions.png", "training_curves.png"):
        assert (out / name).is_file(), name
    assert history_epochs(out / "history_vqvae.csv") == list(range(3))  # no epoch missing or twice
    assert history_epochs(out / "history_prior.csv") == [0]
    assert history_epochs(out / "history_decoder.csv") == [0]  # the demo preset's decoder fine-tune, on both
    assert set(temp.iterdir()) == left_behind  # the resumed non-chief removed its own write dir
    assert not Path(re.search(r"this worker writes to (\S+) \(removed", other).group(1)).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "oasis", "run", "temp"]
    saved = re.compile(r"\[(vqvae|prior|decoder)\] saved (\S+) \(weights sha256 ([0-9a-f]{16})\)")
    assert len(saved.findall(chief)) == 3 and saved.findall(chief) == saved.findall(other)

    import keras

    import modules  # noqa: F401
    import rundir

    digests = {stage: digest for stage, _, digest in saved.findall(chief)}
    vqvae = keras.models.load_model(out / "vqvae.keras")  # stage 1's model with the fine-tuned decoder
    assert rundir.weights_digest(vqvae) == digests["decoder"]
    assert rundir.weights_digest(keras.models.load_model(out / "vqvae_before_decoder.keras")) == digests["vqvae"]
    assert rundir.weights_digest(keras.models.load_model(out / "pixelcnn.keras")) == digests["prior"]
    # The optimiser state came back with the weights: Adam counted all 3 epochs' steps (16 images, global batch 4).
    assert int(vqvae.optimizer.iterations) == 3 * 4


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--vqvae-epochs must be at least 1, got 0"),
    (["--prior-batch-size", "0"], "--prior-batch-size must be at least 1, got 0"),  # was silently the preset's
    (["--epochs", "3", "--vqvae-epochs", "0"], "--vqvae-epochs must be at least 1, got 0"),
    (["--num-samples", "-1"], "--num-samples must be 0 or more, got -1"),
    (["--val-fraction", "1.5"], "--val-fraction must be between 0 and 1, got 1.5"),
    (["--vqvae-lr", "0"], "--vqvae-lr must be above 0, got 0.0"),  # would finish a run of an untrained model
    (["--vqvae-warmup-steps", "-1"], "--vqvae-warmup-steps must be 0 or more (0: off), got -1"),
    (["--vqvae-clipnorm", "-0.5"], "--vqvae-clipnorm must be 0 or more (0: off), got -0.5"),
    (["--distribute", "ring"], "argument --distribute: invalid choice: 'ring'"),
    (["--decoder-epochs", "-1"], "--decoder-epochs must be 0 (no decoder fine-tune) or more, got -1"),
    (["--decoder-epochs", "0", "--decoder-lr", "0.01"], "--decoder-lr: this run has no decoder fine-tune"),
    (["--decoder-lr", "0"], "--decoder-lr must be above 0, got 0.0"),
    (["--prior-filters", "many"], "argument --prior-filters: invalid int value: 'many'"),
])
def test_bad_flags_exit_2_with_a_message_naming_the_flag(argv, message, tmp_path, capsys):
    import train

    with pytest.raises(SystemExit) as e:  # (a missing --data: a flag let through fails fast, not a demo run)
        train.main(["--data", tmp_path / "nowhere", "--out", tmp_path / "run", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.splitlines()[-1].startswith(f"train.py: error: {message}"), err


@pytest.mark.parametrize("case", ["missing_data", "prior_without_vqvae", "resume_without_run", "incompatible_resume",
                                  "existing_run", "multiworker_without_tf_config", "bad_model_setting"])
def test_errors_are_one_line(case, oasis_tree, tmp_path):
    import train

    out = tmp_path / "run"
    if case == "missing_data":
        argv, expect = ["--data", tmp_path / "nowhere", "--out", out], "nowhere"
    elif case == "prior_without_vqvae":
        argv, expect = ["--out", out, "--stage", "prior"], "train the VQ-VAE first"
    elif case == "resume_without_run":
        argv, expect = ["--out", out, "--resume"], "start a new run without --resume"
    elif case == "multiworker_without_tf_config":
        os.environ.pop("TF_CONFIG", None)
        argv, expect = ["--data", oasis_tree, "--out", out, *TINY, "--distribute", "multiworker"], "TF_CONFIG"
    elif case == "bad_model_setting":
        argv, expect = ["--data", oasis_tree, "--out", out, *TINY, "--prior-kernel-size", "4"], \
            "bad model setting: PriorConfig.kernel_size must be an odd int >= 3, got 4"
    else:
        out.mkdir()
        (out / "config.json").write_text(json.dumps({
            "preset": "demo", "seed": 0, "data": {"root": str(oasis_tree), "image_size": 32, "val_fraction": 0.2},
            "vqvae": {"image_size": 32, "num_embeddings": 16}, "prior": {"num_conditions": 4},
            "training": {"vqvae_epochs": 1, "prior_epochs": 1, "vqvae_batch_size": 4, "prior_batch_size": 4,
                         "vqvae_lr": 1e-3, "prior_lr": 1e-3}}))
        if case == "incompatible_resume":
            argv, expect = ["--out", out, "--resume", "--num-embeddings", "32"], "num_embeddings: saved 16, requested 32"
        else:
            argv, expect = ["--out", out, *TINY], "already holds a run"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train.main([str(a) for a in argv])
    lines = err.getvalue().strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("train.py: error: ") and expect in lines[0], lines


def test_help_explains_every_flag():
    import dataclasses

    import train
    from modules import PriorConfig, VQVAEConfig

    text = train.build_parser().format_help()
    for flag in ("--data", "--out", "--stage", "--epochs", "--vqvae-epochs", "--prior-epochs", "--batch-size",
                 "--image-size", "--seed", "--resume", "--preset", "--distribute", "--mixed-precision",
                 "--num-embeddings", "--embedding-dim", "--downsample", "--prior-gated", "--prior-filters",
                 "--condition-on-slice", "--no-condition-on-slice", "--verbose", "--vqvae-warmup-steps",
                 "--vqvae-clipnorm", "--decoder-epochs", "--decoder-lr", "--spectral-weight", "--gradient-weight",
                 "--code-noise", "--top-run"):
        assert flag in text, flag
    flat = "".join(text.split())  # argparse re-wraps the help
    for guards in ("Guardsagainstdeadrelus", "Guardsagainstlossspikes"):  # what the opt-in flags are for
        assert guards.lower() in flat.lower(), guards
    # Each config field's flag shows the help written beside the field (dataclasses.field metadata).
    for cls, prefix, skip in ((VQVAEConfig, "", {"image_size", "seed", "freeze_encoder"}),
                              (PriorConfig, "prior-", {"grid_shape", "num_conditions", "top_codes", "top_grid_shape"})):
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help metadata"
            assert f"--{prefix}{f.name.replace('_', '-')}" in flat
            assert "".join(f.metadata["help"].split()) in flat, f.name


def test_scripts_start_without_tensorflow_noise():
    """A plain ``python train.py --help`` / ``predict.py --help`` prints usage only: no oneDNN, CUDA or absl lines."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    for script in ("train.py", "predict.py"):
        proc = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True,
                              timeout=120, env=env, cwd=REPO)
        assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr
        assert proc.stderr == "", f"{script}: {proc.stderr}"


def test_plain_prior_drops_the_presets_condition_map_with_a_note(tmp_path, capsys):
    import train

    parser = train.build_parser()
    cfg, _ = train.resolve_config(parser.parse_args(["--out", str(tmp_path / "run"), "--no-prior-gated"]), parser)
    assert cfg["prior"]["gated"] is False and cfg["prior"]["condition_map"] == 0
    assert "condition_map 8 -> 0 (it needs a gated prior)" in capsys.readouterr().out
    cfg, _ = train.resolve_config(parser.parse_args(["--out", str(tmp_path / "run")]), parser)
    assert cfg["prior"]["condition_map"] == 8  # the demo preset's, for its gated prior
    args = parser.parse_args(["--out", str(tmp_path / "run"), "--no-prior-gated", "--prior-condition-map", "4"])
    with pytest.raises(train.TrainError, match="condition_map needs gated=True"):  # asked for: an error
        train.resolve_config(args, parser)


def test_a_judge_that_predicts_one_slice_for_everything_is_reported(oasis_tree, tmp_path, capsys):
    import dataset
    import judge
    import train

    config = judge.JudgeConfig(image_size=32, num_slices=4, filters=4, feature_dim=8)
    model = judge.build_judge(config)
    layer = model.get_layer("slice_logits")
    layer.kernel.assign(np.zeros(layer.kernel.shape, "float32"))
    layer.bias.assign(np.array([0.0, 0.0, 5.0, 0.0], "float32"))  # always slice 2
    model.save(tmp_path / "judge.keras")
    splits = dataset.read_oasis(oasis_tree, image_size=32)
    metrics = train.train_judge_stage({"judge": config.to_dict()}, splits, tmp_path, resume=True)
    err = capsys.readouterr().err
    assert "the judge predicts slice 2 for every test slice: it did not learn" in err
    assert f"python train.py --out {tmp_path} --stage judge" in err
    assert metrics["judge_test_slice_error_median"] == np.median(np.abs(2 - splits["test"].slice_indices))


def test_resumed_run_keeps_its_decoder_fine_tune_choice(oasis_tree, tmp_path, capsys):
    """A run saved without a decoder fine-tune refuses --decoder-epochs on --resume (it would be dropped)."""
    import train
    from modules import PriorConfig, VQVAEConfig

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({
        "preset": "demo", "seed": 0, "data": {"root": str(oasis_tree), "image_size": 32, "val_fraction": 0.2},
        "vqvae": VQVAEConfig(image_size=32, num_embeddings=16).to_dict(),
        "prior": {**PriorConfig(grid_shape=(8, 8)).to_dict(), "num_conditions": 4},
        "training": {"vqvae_epochs": 1, "prior_epochs": 1, "vqvae_batch_size": 4, "prior_batch_size": 4,
                     "vqvae_lr": 1e-3, "prior_lr": 1e-3}}))
    with pytest.raises(SystemExit) as e:
        train.main(["--out", out, "--resume", "--decoder-epochs", "2"])
    assert e.value.code == 2
    assert "this run has no decoder fine-tune" in capsys.readouterr().err.splitlines()[-1]
