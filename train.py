"""Train the VQ-VAE and the PixelCNN prior on OASIS slices, from a shell.

    python train.py                      # the demo: builds demo data if needed, trains both stages
    python train.py --data /data/oasis --preset oasis --out runs/oasis
    python train.py --out runs/demo --resume          # continue after an interruption
    python train.py --stage prior --out runs/demo     # (re)train only the prior on a trained VQ-VAE
    python train.py --stage decoder --out runs/demo --spectral-weight 0.1 --spectral-log   # sharpen its decoder alone

Everything a run produces lands in its run directory (``--out``): ``config.json``, ``vqvae.keras``,
``pixelcnn.keras``, per-epoch checkpoints, ``history_*.csv``, TensorBoard logs, cached codes,
``metrics.json`` and the figures. ``python train.py --help`` explains every flag.

This file holds the command line, the presets and the stages. Beside it: ``runconfig.py`` merges preset,
saved run and flags; ``rundir.py`` owns the run directory (checkpoints, resume); ``distribute.py`` the
strategy and the workers' roles; ``report.py`` the metrics and figures written at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np

import distribute
import evaluation
import report
import runconfig
import rundir
from runconfig import DECODER, JUDGE, SEGMENTER, STAGES, TrainError
from rundir import RunDirs


# Presets give defaults; any flag given on the command line wins. Why each setting is what it is
# (step counts, batch sizes, attention, condition maps): docs/training.md#presets.
PRESETS = {
    "demo": {
        "image_size": 128, "downsample": 4, "vqvae_epochs": 8, "prior_epochs": 13,
        "vqvae_batch_size": 16, "prior_batch_size": 16, "vqvae_lr": 2e-3, "prior_lr": 2e-3,
        "vqvae_warmup_steps": 0, "vqvae_clipnorm": 0.0,
        "condition_on_slice": True,
        # 64 codes: the prior draws fewer stray codes than with 128 (docs/prior-designs.md#codebook-size)
        "vqvae_config": {"num_embeddings": 64, "ssim_weight": 0.1},
        "prior_config": {"filters": 32, "num_layers": 5, "positional": True, "condition_dropout": 0.1,
                         "condition_map": 8, "previous_slice": True, "previous_dropout": 0.5},
        # the decoder fine-tune after the prior (docs/decoder.md#the-demos-decoder): the band-power loss;
        # --decoder-epochs 0 skips it
        "decoder_config": {"band_power_weight": 0.01},
    },
    "oasis": {
        "image_size": 256, "downsample": 8, "vqvae_epochs": 100, "prior_epochs": 200,
        "vqvae_batch_size": 8, "prior_batch_size": 32, "vqvae_lr": 1e-3, "prior_lr": 3e-4,
        "vqvae_warmup_steps": 0, "vqvae_clipnorm": 0.0,
        "condition_on_slice": True, "vqvae_config": {"channels": 64, "num_embeddings": 256, "ssim_weight": 0.1},
        "prior_config": {"filters": 64, "num_layers": 12, "positional": True, "attention_every": 6,
                         "condition_dropout": 0.1, "condition_map": 8},
    },
}

# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, prefix: str, skip: set[str]) -> None:
    """One flag per config field (``--{prefix}{field}``), typed from the field's default.

    The help text is the field's ``metadata["help"]`` (``dataclasses.field(metadata=...)``), so it is
    written once, beside the field it describes.
    """
    preset_key = "prior_config" if prefix else "vqvae_config"
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + (prefix + f.name).replace("_", "-")
        by_preset = [f"{name} {values[preset_key][f.name]}" for name, values in PRESETS.items()
                     if f.name in values.get(preset_key, {})]
        text = f.metadata.get("help", f"{cls.__name__}.{f.name}") + f" (default: {default}" + (
            f"; presets: {', '.join(by_preset)})" if by_preset else ")")
        dest = prefix.replace("-", "_") + f.name
        if isinstance(default, bool):
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(default, (tuple, list)):
            kind = type(default[0]) if default else int
            parser.add_argument(flag, dest=dest, type=kind, nargs="+", default=None, help=text)
        else:
            kind = type(default) if default is not None else int
            parser.add_argument(flag, dest=dest, type=kind, default=None, metavar=f.name.upper(), help=text)


def build_parser() -> argparse.ArgumentParser:
    from judge import JudgeConfig
    from modules import PriorConfig, VQVAEConfig
    from segmenter import SegmenterConfig

    p = argparse.ArgumentParser(
        prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fit the VQ-VAE (stage 1) and the PixelCNN prior over its codes (stage 2), then "
                    "evaluate both on the test split and draw the figures. With no arguments it runs "
                    "the demo: builds the demo data from the MNI template if needed and trains at 128x128.",
        epilog="Presets (flags given explicitly override them):\n" + "\n".join(
            f"  {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()) for name, values in PRESETS.items()))
    g = p.add_argument_group("data and run")
    g.add_argument("--data", type=Path, default=None,
                   help="OASIS root holding keras_png_slices_train/ (and _validate/, _test/); "
                        "default: the demo set under data/oasis_demo, built on first use")
    g.add_argument("--out", type=Path, default=None,
                   help="run directory for models, logs, metrics and figures (default: runs/<preset>)")
    g.add_argument("--stage", choices=("all",) + STAGES + (DECODER, JUDGE, SEGMENTER), default="all",
                   help="all: both stages (the demo preset then fine-tunes the decoder, see --decoder-epochs), "
                        "then the judge and the segmenter; vqvae: only stage 1; prior: only stage 2, on the run's trained VQ-VAE; decoder: fine-tune the decoder alone of an existing "
                        "run, its encoder and codebook frozen so its codes and prior stay valid (the loss flags "
                        "--spectral-weight, --gradient-weight, --ssim-weight, --adversarial ... then set this stage's "
                        "losses; always from the VQ-VAE as stage 1 left it); judge: only the judge of samples (a slice-position "
                        "CNN on the real training slices), for an existing run; segmenter: only the tissue "
                        "segmenter (a small U-Net on the real training slices and their keras_png_slices_seg_* "
                        "masks), for an existing run")
    g.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="default settings to start from (see below)")
    g.add_argument("--image-size", type=int, default=None, help="train on square images of this side (resized on load)")
    g.add_argument("--val-fraction", type=float, default=0.2,
                   help="when the data has no validate folder, hold out this fraction of training cases (by case)")
    g.add_argument("--seed", type=int, default=0, help="seed for data order, weights and sampling")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last completed epoch (optimiser state included)")
    g.add_argument("--num-samples", type=int, default=16, help="samples drawn for the figure at the end (0: none)")
    g.add_argument("--verbose", action="store_true",
                   help="show TensorFlow's start-up and library logging (hidden by default)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="epochs for both stages (the two flags below override)")
    g.add_argument("--vqvae-epochs", type=int, default=None, help="epochs of VQ-VAE training")
    g.add_argument("--prior-epochs", type=int, default=None, help="epochs of prior training")
    g.add_argument("--batch-size", type=int, default=None, help="batch size for both stages (the two flags below override)")
    g.add_argument("--vqvae-batch-size", type=int, default=None, help="VQ-VAE batch size")
    g.add_argument("--prior-batch-size", type=int, default=None, help="prior batch size")
    g.add_argument("--vqvae-lr", type=float, default=None,
                   help="Adam learning rate of the VQ-VAE (start of a cosine decay to 5%% of it; with "
                        "--vqvae-warmup-steps, its peak after the warm-up)")
    g.add_argument("--vqvae-warmup-steps", type=int, default=None, metavar="N",
                   help="warm the VQ-VAE's learning rate up linearly from 0 over its first N steps (at most a "
                        "quarter of the run), then the cosine decay. Guards against dead ReLUs: Adam's first "
                        "full-size steps can switch off every channel of a deep decoder (seen with --downsample "
                        "8 at the demo's 2e-3), and the VQ-VAE then gives one image for every input for good. "
                        f"0: none (default in both presets, for now; {VQVAE_WARMUP_STEPS} cures that case)")
    g.add_argument("--vqvae-clipnorm", type=float, default=None, metavar="X",
                   help="clip the VQ-VAE's gradients to global norm X. Guards against loss spikes whose "
                        "oversized Adam steps kill the decoder's ReLUs the same way. 0: none (default in both "
                        f"presets, for now; {VQVAE_CLIPNORM:g} with --vqvae-warmup-steps {VQVAE_WARMUP_STEPS} "
                        "cures --downsample 8)")
    g.add_argument("--decoder-epochs", type=int, default=None,
                   help=f"epochs of the decoder fine-tune: --stage decoder, and in --stage all the demo preset's "
                        f"fine-tune after the prior (its losses: the preset's decoder_config); 0 skips that one "
                        f"(default: {runconfig.DECODER_EPOCHS})")
    g.add_argument("--decoder-lr", type=float, default=None,
                   help="Adam learning rate of the decoder fine-tune (start of a cosine decay to 5%% of it; "
                        f"default: {runconfig.DECODER_LR:g})")
    g.add_argument("--prior-lr", type=float, default=None,
                   help="Adam learning rate of the prior (start of a cosine decay to 5%% of it)")
    g.add_argument("--distribute", choices=("none", "mirrored", "multiworker"), default="none",
                   help="none: one device; mirrored: tf.distribute.MirroredStrategy over the visible GPUs "
                        "(or the --virtual-cpus devices); multiworker: MultiWorkerMirroredStrategy from TF_CONFIG")
    g.add_argument("--virtual-cpus", type=int, default=0,
                   help="split the CPU into this many logical devices (to try --distribute mirrored without GPUs)")
    g.add_argument("--judge-epochs", type=int, default=None,
                   help="epochs of the judge, the small CNN that learns slice position from real training slices "
                        f"and scores samples in predict.py evaluate (default: {JudgeConfig.epochs}; 0: no judge)")
    g.add_argument("--segmenter-epochs", type=int, default=None,
                   help="epochs of the segmenter, the small U-Net that learns tissue masks from the real training "
                        "slices (when the data has keras_png_slices_seg_* folders) and reads the anatomy of samples "
                        f"in predict.py evaluate (default: {SegmenterConfig.epochs}; 0: no segmenter)")
    g.add_argument("--mixed-precision", action="store_true",
                   help="use Keras' mixed_float16 policy (on a GPU; ignored with a notice on a CPU)")

    g = p.add_argument_group("VQ-VAE (VQVAEConfig)")
    _add_dataclass_flags(g, VQVAEConfig, "", skip={"image_size", "seed", "freeze_encoder"})
    g = p.add_argument_group("prior (PriorConfig; the flags carry a prior- prefix)")
    g.add_argument("--condition-on-slice", action=argparse.BooleanOptionalAction, default=None,
                   help="condition the prior on the slice index parsed from file names "
                        "(case_<id>_slice_<k>.nii.png), so samples can be asked for at a given depth; sets "
                        "PriorConfig.num_conditions to the training split's slice count (default: on in both "
                        "presets; on --stage prior, what the run was trained with)")
    g.add_argument("--top-run", type=Path, default=None, metavar="RUN",
                   help="two levels (VQ-VAE-2): a trained run on the same data with a coarser code grid (e.g. "
                        "--downsample 8, 16x16 codes) and its own prior becomes this run's top level: it is copied "
                        "into <out>/top, and this run's prior learns to draw its codes given the top level's codes "
                        "of the same slice, which the top prior draws first when sampling. Sets the prior's "
                        "top_codes and top_grid_shape; needs a condition map (--prior-condition-map > 0). On "
                        "--stage prior of a two-level run, the top level it already has is kept")
    _add_dataclass_flags(g, PriorConfig, "prior-", skip={"grid_shape", "num_conditions", "top_codes", "top_grid_shape"})
    return p


def resolve_config(args, parser) -> tuple[dict, bool]:
    """The run's config: the preset, then the saved run (``--resume``, ``--stage prior|judge``), then the
    explicit flags (:func:`runconfig.resolve_config`). Returns ``(cfg, condition_on_slice)``."""
    return runconfig.resolve_config(args, parser, PRESETS)


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------

def load_data(cfg: dict, condition_on_slice: bool):
    """Read the splits (with their tissue masks when the data has ``keras_png_slices_seg_*``); fill
    ``cfg["data"]["num_images"]`` and the prior's ``num_conditions``."""
    import dataset

    root = cfg["data"]["root"]
    if root is None:
        import build_data

        root = build_data.ensure_demo_dataset()
        cfg["data"]["root"] = str(root)
        cfg["data"]["demo"] = True
    try:  # the tissue masks too, when the data has them (for the segmenter; never images to learn from)
        splits = dataset.read_oasis(root, image_size=cfg["data"]["image_size"],
                                    val_fraction=cfg["data"]["val_fraction"], seed=cfg["seed"],
                                    masks=dataset.has_masks(root))
    except dataset.DatasetError as e:
        raise TrainError(str(e)) from None
    cfg["data"]["num_images"] = {name: len(s) for name, s in splits.items()}
    cfg["prior"]["num_conditions"] = runconfig.slice_conditions(splits) if condition_on_slice else 0
    return splits


def fit_stage(stage: str, build_model, data, val_data, epochs: int, dirs: RunDirs, resume: bool, strategy,
              first_epoch_callbacks=()):
    """Fit one stage with checkpoints, CSV history and TensorBoard (``rundir``); return the trained model.

    Args:
        build_model: ``() -> compiled keras.Model``, called inside the strategy scope for a fresh start.
        data, val_data: ``tf.data`` datasets for ``fit``.
        dirs: a resumed stage restarts from the newest checkpoint in ``dirs.out`` (the chief's, the
            same on every worker); this process writes its checkpoints, history and logs in ``dirs.write``.
        first_epoch_callbacks: callbacks that only a stage starting from epoch 0 runs (before the
            history and checkpoint callbacks, so one that raises leaves no row and no checkpoint behind).
    """
    import keras

    done, ckpt = dirs.start_stage(stage, resume)
    with strategy.scope():
        if ckpt is not None:
            print(f"[{stage}] resuming from {ckpt} ({done} of {epochs} epochs done)")
            model = keras.models.load_model(ckpt)
        else:
            model = build_model()
    if done >= epochs:
        print(f"[{stage}] all {epochs} epochs already done")
        return model
    distribute.prepare_fit(model, strategy)
    history = model.fit(data, validation_data=val_data, epochs=epochs, initial_epoch=done,
                        callbacks=[keras.callbacks.TerminateOnNaN(), *(first_epoch_callbacks if done == 0 else ()),
                                   *dirs.callbacks(stage)],
                        shuffle=False,  # the tf.data pipeline shuffles
                        verbose=1 if sys.stdout.isatty() else 2)
    losses = history.history.get("loss", [])
    if losses and not np.isfinite(losses[-1]):
        last_good, _ = rundir.latest_checkpoint(dirs.checkpoint_dir(stage))
        raise TrainError(f"[{stage}] loss became NaN in epoch {done + len(losses)}; training stopped. The last "
                         f"good checkpoint (epoch {last_good}) is in {dirs.checkpoint_dir(stage)}: lower "
                         f"--{stage}-lr and resume with --resume")
    return model


# Two guards of the VQ-VAE's ReLUs (docs/training.md#a-vq-vae-that-learns-nothing), opt-in for now
# (--vqvae-warmup-steps, --vqvae-clipnorm; both presets keep 0 = off, so the default demo's weights,
# and the figures made from them, do not change); these are the values that cure the trap. Warm-up:
# linear from 0 over this many steps (at most a quarter of the run); without it, Adam's first full-size
# steps killed every ReLU of the decoder's second-last up-sampling on the demo with --downsample 8, and
# the VQ-VAE stayed at a black image for good. Clipping: a loss spike (a reconstruction MSE of 2 to 25
# in one epoch of a small --downsample 8 model) otherwise gives Adam a step of about three learning
# rates along the spike's gradient, which killed them as surely.
VQVAE_WARMUP_STEPS = 100
VQVAE_CLIPNORM = 1.0


def cosine_schedule(lr: float, epochs: int, num_examples: int, batch_size: int, warmup_steps: int = 0):
    """Linear warm-up from 0 to ``lr`` over ``min(warmup_steps, planned steps // 4)`` steps, then cosine
    decay to 5 % of ``lr`` over the rest of the stage's planned steps.

    The schedule is saved with the optimiser, so a resumed run keeps the plan it started with.
    """
    import keras

    steps = max(1, epochs * math.ceil(num_examples / batch_size))
    warmup = min(int(warmup_steps), steps // 4)
    if not warmup:
        return keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps, alpha=0.05)
    return keras.optimizers.schedules.CosineDecay(0.0, decay_steps=steps - warmup, alpha=0.05,
                                                  warmup_target=lr, warmup_steps=warmup)


# Optimiser steps a VQ-VAE takes before the stall guard judges it: an untrained --downsample 8 model
# already gives nearly the same image for every input, so a few steps prove nothing either way.
STALL_GUARD_MIN_STEPS = 100


def vqvae_optimizer(lr: float, epochs: int, num_examples: int, batch_size: int, warmup_steps: int = 0,
                    clipnorm: float = 0.0):
    """The VQ-VAE's Adam: :func:`cosine_schedule` with ``warmup_steps`` of warm-up, gradients clipped to a
    global norm of ``clipnorm``. With both 0 (the presets' default) it is exactly the optimiser the
    VQ-VAE always had: a plain ``CosineDecay`` and no ``global_clipnorm`` argument at all."""
    import keras

    schedule = cosine_schedule(lr, epochs, num_examples, batch_size, warmup_steps)
    if clipnorm:
        return keras.optimizers.Adam(schedule, global_clipnorm=clipnorm)
    return keras.optimizers.Adam(schedule)


def stall_guard(images, lr: float, min_steps: int | None = None, warmup_steps: int = 0, clipnorm: float = 0.0):
    """A Keras callback that stops a VQ-VAE which learned nothing in its first epoch (:class:`TrainError`).

    A fresh VQ-VAE outputs a near-black image; one whose decoder's ReLUs all died outputs one image for
    every input and never moves again, and would otherwise finish its epochs, save and report a
    constant image as a result. At the end of the first epoch by which the fit has taken ``min_steps``
    steps (default :data:`STALL_GUARD_MIN_STEPS`: epoch 1 on the demo and on OASIS; later, or never, for
    a tiny run) the guard reconstructs ``images`` (a fixed batch, ``(N, H, W, 1)`` in [0, 1], through
    ``encode``/``decode``: pure look-ups, no codebook update) and raises when both hold:

    * the reconstructions are one image: their spread across the batch (per-pixel standard deviation,
      averaged) is under 0.1 % of the images' own (a decoder whose ReLUs all died gives exactly 0; a
      tiny model after four steps already gives a few per cent);
    * they are no better than a constant image: MSE at least that of the batch's mean image (the best
      any constant output can do).

    "The loss has not moved" is not a test of its own: a dead decoder still moves its loss by sliding
    its one output image toward the mean brightness (a tiny run at --vqvae-lr 0.1: MSE 0.0719 -> 0.0646,
    every reconstruction the same).

    ``lr``, ``warmup_steps`` and ``clipnorm`` are the run's settings, named in the error beside the cure.
    """
    import keras

    images = np.asarray(images, np.float32)
    min_steps = STALL_GUARD_MIN_STEPS if min_steps is None else int(min_steps)
    spread = float(images.std(axis=0).mean())
    constant_mse = float(((images - images.mean(axis=0)) ** 2).mean())

    class StallGuard(keras.callbacks.Callback):
        def _measure(self):
            recon = np.asarray(self.model.decode(self.model.encode(images)), np.float32)
            return float(((images - recon) ** 2).mean()), float(recon.std(axis=0).mean())

        def on_train_begin(self, logs=None):
            self.start_mse, _ = self._measure()
            self.steps, self.judged = 0, False

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1

        def on_epoch_end(self, epoch, logs=None):
            if self.judged or self.steps < min_steps:
                return
            self.judged = True
            mse, recon_spread = self._measure()
            if recon_spread < 1e-3 * spread and mse >= constant_mse:
                self.model.stop_training = True
                raise TrainError(
                    f"[vqvae] learned nothing in epoch {epoch + 1}: every reconstruction is the same image "
                    f"(MSE {mse:.4f}, untrained {self.start_mse:.4f}, a constant image's {constant_mse:.4f}; "
                    f"training SSIM {(logs or {}).get('ssim', float('nan')):.2f}); "
                    f"likely dead ReLUs from Adam's first full-size steps at this depth: start again in a new "
                    f"--out with --vqvae-warmup-steps {VQVAE_WARMUP_STEPS} --vqvae-clipnorm {VQVAE_CLIPNORM:g} "
                    f"and/or a lower --vqvae-lr (now --vqvae-lr {lr:g} --vqvae-warmup-steps {warmup_steps} "
                    f"--vqvae-clipnorm {clipnorm:g})")

    return StallGuard()


def train_vqvae(cfg: dict, splits, dirs: RunDirs, resume: bool, strategy) -> None:
    """Fit stage 1 and save ``vqvae.keras`` (the caller reloads it), keeping a decoder fine-tune that still fits."""
    import dataset
    from modules import VQVAE, VQVAEConfig

    t = cfg["training"]
    batch = t["vqvae_batch_size"]

    def build():
        model = VQVAE(VQVAEConfig.from_dict(cfg["vqvae"]))
        model.compile(optimizer=vqvae_optimizer(t["vqvae_lr"], t["vqvae_epochs"], len(splits["train"]), batch,
                                                t["vqvae_warmup_steps"], t["vqvae_clipnorm"]))
        return model

    train_ds = dataset.to_dataset(splits["train"], batch, shuffle=True, seed=cfg["seed"])
    val_ds = dataset.to_dataset(splits["validate"], batch, shuffle=False)
    # The guard's batch: up to 32 training slices spread over the split (every case, every depth).
    pick = np.unique(np.linspace(0, len(splits["train"]) - 1, min(32, len(splits["train"]))).astype(int))
    probe = np.asarray(splits["train"].images[pick], np.float32)
    probe = (probe / 255.0 if splits["train"].images.dtype == np.uint8 else probe).reshape(len(pick), *probe.shape[1:3], 1)
    model = fit_stage("vqvae", build, train_ds, val_ds, t["vqvae_epochs"], dirs, resume, strategy,
                      first_epoch_callbacks=[stall_guard(probe, t["vqvae_lr"], warmup_steps=t["vqvae_warmup_steps"],
                                                         clipnorm=t["vqvae_clipnorm"])])
    pre_decoder = dirs.out / PRE_DECODER
    if pre_decoder.exists():  # --stage decoder fine-tuned this run's decoder after stage 1
        import keras

        before = keras.models.load_model(pre_decoder)
        unchanged = all(np.array_equal(np.asarray(a), np.asarray(b)) for name in ("encoder", "vector_quantizer")
                        for a, b in zip(getattr(before, name).weights, getattr(model, name).weights)
                        if not a.name.startswith("batch_"))  # per-batch usage reports, not the codebook
        if unchanged:  # stage 1 had nothing left to train: the codes, and so the fine-tuned decoder, hold
            print("[vqvae] kept vqvae.keras: its decoder was fine-tuned by --stage decoder on this VQ-VAE")
            return
        print("[vqvae] notice: stage 1 trained on, so the codes changed and the decoder fine-tune no longer "
              "fits them; vqvae.keras is stage 1's model again (run --stage decoder again to sharpen it)")
        if dirs.is_chief:
            pre_decoder.unlink()
    rundir.save_final(model, dirs.write / "vqvae.keras", "vqvae")


PRE_DECODER = "vqvae_before_decoder.keras"  # the VQ-VAE as stage 1 left it, kept by the first --stage decoder


def train_decoder(cfg: dict, splits, dirs: RunDirs, resume: bool, strategy) -> None:
    """``--stage decoder``: fine-tune the decoder of the run's VQ-VAE with ``cfg["decoder"]``'s losses.

    The encoder and the vector quantiser are frozen (``VQVAEConfig.freeze_encoder``: no gradient steps,
    no EMA updates, no restarts), so every image keeps its codes and the run's prior stays valid. The
    stage always starts from the VQ-VAE as stage 1 left it (``vqvae_before_decoder.keras``, copied from
    ``vqvae.keras`` the first time), so running it again with other settings replaces the last
    fine-tune rather than adding to it. Checkpoints and ``--resume`` as for the other stages; at the end
    ``vqvae.keras`` is that file with the new decoder's weights (its config, as trained in stage 1, kept;
    the caller reloads it).
    """
    import shutil

    import keras

    import dataset
    from modules import VQVAE

    d = cfg["decoder"]
    source = dirs.out / PRE_DECODER
    # a first fine-tune of this stage 1 model starts afresh: checkpoints left beside no vqvae_before_decoder.keras
    # fine-tuned a stage 1 model that has since trained on (train_vqvae dropped that fine-tune)
    resume = resume and source.exists()
    if not source.exists():
        if not (dirs.out / "vqvae.keras").exists():
            raise TrainError(f"{dirs.out / 'vqvae.keras'} not found: train the VQ-VAE first (--stage vqvae or all)")
        if dirs.is_chief:
            shutil.copyfile(dirs.out / "vqvae.keras", dirs.write / PRE_DECODER)
        else:
            source = dirs.out / "vqvae.keras"
    config = runconfig.decoder_vqvae_config(cfg)

    def copy_weights(src, dst):
        for name in ("encoder", "vector_quantizer", "decoder"):
            getattr(dst, name).set_weights(getattr(src, name).get_weights())

    def build():
        model = VQVAE(config)
        copy_weights(keras.models.load_model(source), model)
        model.compile(optimizer=vqvae_optimizer(d["lr"], d["epochs"], len(splits["train"]), d["batch_size"]))
        return model

    train_ds = dataset.to_dataset(splits["train"], d["batch_size"], shuffle=True, seed=cfg["seed"])
    val_ds = dataset.to_dataset(splits["validate"], d["batch_size"], shuffle=False)
    print(f"[{DECODER}] fine-tuning the decoder of {source.name} ({d['epochs']} epochs, lr {d['lr']:g}; "
          f"encoder and codebook frozen): " + ", ".join(f"{k} {d[k]}" for k in runconfig.DECODER_LOSS_KEYS))
    model = fit_stage(DECODER, build, train_ds, val_ds, d["epochs"], dirs, resume, strategy)
    final = keras.models.load_model(source)  # the run's VQ-VAE as it was (config, discriminator), new decoder
    final.decoder.set_weights(model.decoder.get_weights())
    rundir.save_final(final, dirs.write / "vqvae.keras", DECODER)


def train_prior(cfg: dict, codes, dirs: RunDirs, resume: bool, strategy):
    import keras

    import dataset

    from modules import PixelCNN, PriorConfig

    t = cfg["training"]
    prior_cfg = PriorConfig.from_dict(cfg["prior"])
    conditioned = prior_cfg.num_conditions > 0
    grid = tuple(codes["train"]["codes"].shape[1:])
    if grid != prior_cfg.grid_shape:
        raise TrainError(f"the VQ-VAE's codes are {grid} grids but the prior is configured for {prior_cfg.grid_shape}; "
                         "the run's config.json does not match its vqvae.keras: retrain both stages in a new --out")
    num_embeddings = cfg["vqvae"]["num_embeddings"]

    def build():
        model = PixelCNN(num_embeddings, prior_cfg)
        schedule = cosine_schedule(t["prior_lr"], t["prior_epochs"], len(codes["train"]["codes"]),
                                   t["prior_batch_size"])
        model.compile(optimizer=keras.optimizers.Adam(schedule),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        return model

    train_ds = dataset.prior_dataset(codes["train"], conditioned, prior_cfg, num_embeddings, t["prior_batch_size"],
                             shuffle_seed=cfg["seed"])
    val_ds = dataset.prior_dataset(codes["validate"], conditioned, prior_cfg, num_embeddings, t["prior_batch_size"])
    model = fit_stage("prior", build, train_ds, val_ds, t["prior_epochs"], dirs, resume, strategy)
    rundir.save_final(model, dirs.write / "pixelcnn.keras", "prior")
    return model


def attach_top_level(cfg: dict, top_run: Path | None, dirs: RunDirs, resume: bool = False):
    """The top level of a two-level run, in ``<write>/top``: copied there from ``top_run`` (``--top-run``),
    or the one the run already holds (``--stage prior`` / ``--resume`` of a two-level run). Checks that
    its prior knows the same slice positions, since it draws the top codes at the fine prior's.

    Returns:
        the top level as ``trained_run.Run`` (its VQ-VAE encodes the slices, its prior draws top codes).
    """
    import shutil

    from trained_run import PredictError, load_run

    dest = dirs.write / runconfig.TOP_DIR
    source = Path(top_run) if top_run is not None else dirs.out / runconfig.TOP_DIR
    if not source.is_dir():
        raise TrainError(f"{source} not found: this run's prior has two levels (top_codes > 0) but its top level "
                         "is gone; pass --top-run RUN (a trained run with a coarser grid)")
    if source.resolve() != dest.resolve():
        held = dirs.out / runconfig.TOP_DIR / "vqvae.keras"
        if resume and held.exists() and evaluation.file_sha256(held) != evaluation.file_sha256(source / "vqvae.keras"):
            raise TrainError(f"--resume --top-run {source}: this run's prior was trained over another top level "
                             f"({held.parent}); drop --top-run to resume it, or start a new --out")
        dest.mkdir(parents=True, exist_ok=True)
        for name in runconfig.TOP_FILES:
            shutil.copy2(source / name, dest / name)
        print(f"[prior] top level: {source} copied into {dest}")
    try:
        top = load_run(dest)
    except PredictError as e:
        raise TrainError(str(e)) from None
    if top.num_conditions != cfg["prior"]["num_conditions"]:
        raise TrainError(f"the top level {source} knows {top.num_conditions} slice positions, this run "
                         f"{cfg['prior']['num_conditions']}: train both levels on the same data with the same "
                         "--condition-on-slice")
    return top


def set_judge_config(cfg: dict, splits, epochs: int | None) -> None:
    """``cfg["judge"]``: the judge's ``JudgeConfig`` (kept from a saved run; ``--judge-epochs`` wins),
    classifying as many slice positions as the data has."""
    from judge import JudgeConfig

    judge = cfg.setdefault("judge", JudgeConfig(image_size=cfg["data"]["image_size"], seed=cfg["seed"]).to_dict())
    if epochs is not None:
        judge["epochs"] = epochs
    judge["num_slices"] = int(max(np.max(s.slice_indices) for s in splits.values() if len(s))) + 1


def _keep_or_fit(stage: str, path: Path, run_dir: Path, resume: bool, what: str, fit):
    """The small stages (judge, segmenter) train in about a minute and have no per-epoch checkpoints:
    ``--resume`` keeps a finished ``path``; otherwise ``fit(verbose=..., callbacks=...)`` trains the model
    from the start, its history in ``run_dir/history_<stage>.csv``, and it is saved to ``path``."""
    import keras

    if resume and path.exists():
        print(f"[{stage}] keeping {path}")
        return keras.models.load_model(path)
    csv_path = run_dir / f"history_{stage}.csv"
    csv_path.unlink(missing_ok=True)
    print(f"[{stage}] {what}")
    model = fit(verbose=1 if sys.stdout.isatty() else 2,
                callbacks=[keras.callbacks.TerminateOnNaN(), keras.callbacks.CSVLogger(str(csv_path))])
    rundir.save_final(model, path, stage)
    return model


def train_judge_stage(cfg: dict, splits, run_dir: Path, resume: bool = False) -> dict:
    """Fit the judge on the real training slices (``judge.train_judge`` takes only real splits: it
    never sees a sample), save ``judge.keras`` and report its slice error on the test split.

    It trains in seconds on one device, so it has no per-epoch checkpoints: ``--resume`` keeps a
    finished ``judge.keras`` and otherwise trains it again from the start.
    """
    import judge

    config = judge.JudgeConfig.from_dict(cfg["judge"])
    path = run_dir / "judge.keras"
    if config.epochs == 0:
        print("[judge] --judge-epochs 0: no judge")
        return {}
    model = _keep_or_fit(
        "judge", path, run_dir, resume,
        f"{config.epochs} epochs on {len(splits['train'])} real training slices, {config.num_slices} slice positions",
        lambda **fit: judge.train_judge(splits["train"], splits["validate"], config, **fit))
    _, predicted = judge.judge_outputs(model, splits["test"].images)
    if len(predicted) > 1 and len(np.unique(predicted)) == 1:
        print(f"[judge] WARNING: the judge predicts slice {predicted[0]} for every test slice: it did not learn, so "
              "its Frechet distance and slice agreement in predict.py evaluate mean nothing; train it again with "
              f"python train.py --out {run_dir} --stage judge (and more --judge-epochs)", file=sys.stderr)
    error = np.abs(predicted - splits["test"].slice_indices)
    return {"judge_test_slice_error_median": float(np.median(error)), "judge_test_accuracy": float((error == 0).mean())}


def set_segmenter_config(cfg: dict, epochs: int | None) -> None:
    """``cfg["segmenter"]``: the segmenter's ``SegmenterConfig`` (kept from a saved run;
    ``--segmenter-epochs`` wins)."""
    from segmenter import SegmenterConfig

    seg = cfg.setdefault("segmenter", SegmenterConfig(image_size=cfg["data"]["image_size"], seed=cfg["seed"]).to_dict())
    if epochs is not None:
        seg["epochs"] = epochs


def train_segmenter_stage(cfg: dict, splits, run_dir: Path, resume: bool = False) -> dict:
    """Fit the tissue segmenter on the real training slices and masks (``segmenter.train_segmenter``
    takes only real splits: it never sees a sample), save ``segmenter.keras`` and report its Dice
    per tissue on the real test split (``segmenter_test_dice_{csf,grey,white}``).

    Data without masks: a notice, no segmenter. Like the judge it trains in about a minute, so it has
    no per-epoch checkpoints: ``--resume`` keeps a finished ``segmenter.keras``.
    """
    import segmenter
    from anatomy import tissue_dice

    config = segmenter.SegmenterConfig.from_dict(cfg["segmenter"])
    path = run_dir / "segmenter.keras"
    if config.epochs == 0:
        print("[segmenter] --segmenter-epochs 0: no segmenter")
        return {}
    if any(s.masks is None for s in splits.values()):
        print(f"[segmenter] notice: {cfg['data']['root']} has no keras_png_slices_seg_* tissue masks, so no segmenter "
              "(and no anatomy judge in predict.py evaluate)")
        return {}
    model = _keep_or_fit(
        "segmenter", path, run_dir, resume,
        f"{config.epochs} epochs on {len(splits['train'])} real training slices and their masks",
        lambda **fit: segmenter.train_segmenter(splits["train"], splits["validate"], config, **fit))
    test = splits["test"]
    dice = tissue_dice(segmenter.segment(model, test.images), test.masks)
    if min(dice.values()) < 0.5:
        print(f"[segmenter] WARNING: Dice on the real test split is only {min(dice.values()):.2f}: its anatomy figures "
              f"in predict.py evaluate mean little; train it again with python train.py --out {run_dir} "
              "--stage segmenter (and more --segmenter-epochs)", file=sys.stderr)
    return {f"segmenter_test_dice_{k}": round(v, 4) for k, v in dice.items()}


def main(argv=None) -> int:
    import utils

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--verbose", action="store_true")
    utils.quiet_tensorflow(verbose=early.parse_known_args(argv)[0].verbose)  # before TensorFlow starts
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.virtual_cpus:
        distribute.split_cpu(args.virtual_cpus)
    try:
        return run(args, parser)
    except TrainError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2


def run(args, parser) -> int:
    """Train the requested stages, then (on the chief) evaluate, draw the figures and write metrics.

    Every worker of a multi-worker run executes the same training steps (the collectives need them
    all) and saves into its own ``RunDirs.write``; only the chief's land in ``--out``.
    """
    import keras

    import utils

    started = time.time()
    cfg, condition_on_slice = resolve_config(args, parser)
    utils.set_seed(cfg["seed"])
    if cfg["training"]["mixed_precision"]:
        import tensorflow as tf

        if tf.config.list_logical_devices("GPU"):
            keras.mixed_precision.set_global_policy("mixed_float16")
        else:
            print("train.py: notice: --mixed-precision needs a GPU; training in float32 on the CPU")
    try:
        strategy = distribute.make_strategy(cfg["training"]["distribute"])
    except distribute.StrategyError as e:
        raise TrainError(str(e)) from None
    dirs = RunDirs.for_process(Path(cfg["out"]), distribute.is_chief(strategy), distribute.task_name(strategy))
    if cfg["training"]["distribute"] != "none":
        role = "" if cfg["training"]["distribute"] != "multiworker" else (
            ", this worker is the chief" if dirs.is_chief else f", this worker writes to {dirs.write} (removed at the end)")
        print(f"[distribute] {cfg['training']['distribute']} over {strategy.num_replicas_in_sync} devices{role}")
    try:
        return _run_stages(args, cfg, condition_on_slice, strategy, dirs, started)
    finally:
        dirs.close()


def _run_stages(args, cfg: dict, condition_on_slice: bool, strategy, dirs: RunDirs, started: float) -> int:
    import json

    import keras

    import utils

    splits = load_data(cfg, condition_on_slice)  # every check on the data happens before training
    set_judge_config(cfg, splits, args.judge_epochs)
    set_segmenter_config(cfg, args.segmenter_epochs)
    cfg["versions"] = utils.library_versions()
    print("config:", json.dumps(cfg, indent=2))
    distribute.barrier(strategy)  # every worker has read --out before the chief writes into it
    dirs.write_config(cfg)  # complete: grid shape and slice count are known

    num_embeddings = cfg["vqvae"]["num_embeddings"]
    stages = (args.stage,)
    if args.stage == "all":  # the decoder fine-tune after the prior, which its frozen encoder leaves valid
        stages = STAGES + ((DECODER,) if "decoder" in cfg else ()) + (JUDGE, SEGMENTER)
    timings = {}
    if "vqvae" in stages:
        t0 = time.time()
        train_vqvae(cfg, splits, dirs, args.resume, strategy)
        timings["vqvae_train_s"] = time.time() - t0
    metrics_path = dirs.out / "metrics.json"
    metrics = utils.load_json(metrics_path) if dirs.is_chief and metrics_path.exists() else {}

    def load_vqvae():  # reloaded outside the strategy: encoding and evaluation are local to this process
        path = (dirs.write if "vqvae" in stages or DECODER in stages else dirs.out) / "vqvae.keras"
        if not path.exists():
            raise TrainError(f"{path} not found: train the VQ-VAE first (--stage vqvae or all)")
        return path, keras.models.load_model(path)

    vqvae = None
    if "prior" in stages:
        vq_path, vqvae = load_vqvae()
        codes = evaluation.encode_splits(vqvae, splits, dirs.write, model_path=vq_path)
        import dataset

        for name, split in splits.items():  # consecutive pairs, for a prior that sees the previous slice
            codes[name]["previous"] = dataset.previous_slice_index(split)
        top = None
        if cfg["prior"].get("top_codes"):  # two levels: the fine prior learns its codes given the top level's
            top = attach_top_level(cfg, args.top_run, dirs, args.resume)
            top_codes = evaluation.encode_splits(top.vqvae, splits, top.path, model_path=top.path / "vqvae.keras")
            for name in codes:
                codes[name]["top"] = top_codes[name]["codes"]
        t0 = time.time()
        train_prior(cfg, codes, dirs, args.resume, strategy)
        timings["prior_train_s"] = time.time() - t0
    if DECODER in stages:
        t0 = time.time()
        train_decoder(cfg, splits, dirs, args.resume, strategy)
        timings["decoder_train_s"] = time.time() - t0
    if "vqvae" in stages or "prior" in stages or DECODER in stages:
        if vqvae is None or DECODER in stages:  # the prior's stage 1 model holds unless the decoder changed since
            _, vqvae = load_vqvae()
        if dirs.is_chief:
            if DECODER in stages:  # figures of the decoder it replaced (predict.py evaluate measures them again)
                for key in [k for k in metrics if k.startswith("two_sample_reconstructions")]:
                    del metrics[key]
            metrics.update(report.evaluate_vqvae(vqvae, splits, dirs.write, num_embeddings))
    if "prior" in stages and dirs.is_chief:
        prior = keras.models.load_model(dirs.write / "pixelcnn.keras")
        top_prior = None if top is None else top.prior
        metrics.update(report.evaluate_prior(prior, codes, cfg["prior"]["num_conditions"] > 0,
                                             cfg["training"]["prior_batch_size"], top_prior=top_prior))
        if args.num_samples:  # through the run's final decoder
            report.draw_samples(vqvae, prior, cfg, codes, dirs.write, args.num_samples, top_prior=top_prior)
    if not dirs.is_chief:  # the judge trains on one device, so on the chief only
        print(f"worker done; the run directory is the chief's: {dirs.out}")
        return 0
    if JUDGE in stages:
        t0 = time.time()
        metrics.update(train_judge_stage(cfg, splits, dirs.write, resume=args.resume))
        timings["judge_train_s"] = time.time() - t0
    if SEGMENTER in stages:
        t0 = time.time()
        metrics.update(train_segmenter_stage(cfg, splits, dirs.write, resume=args.resume))
        timings["segmenter_train_s"] = time.time() - t0
    report.plot_training_curves(dirs.write, STAGES + (DECODER, JUDGE, SEGMENTER))
    metrics.update({k: round(v, 1) for k, v in timings.items()}, wall_s=round(time.time() - started, 1))
    utils.save_json(metrics, metrics_path)
    print("metrics:", json.dumps(metrics, indent=2))
    print(f"run directory: {dirs.out}")
    return 0


if __name__ == "__main__":
    import utils

    with utils.one_line_warnings():  # "warning: <message>", as every command prints them
        sys.exit(main())
