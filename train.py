"""Train the VQ-VAE and the PixelCNN prior on OASIS slices, from a shell.

    python train.py                      # the demo: builds demo data if needed, trains both stages
    python train.py --data /data/oasis --preset oasis --out runs/oasis
    python train.py --out runs/demo --resume          # continue after an interruption
    python train.py --stage prior --out runs/demo     # (re)train only the prior on a trained VQ-VAE

Everything a run produces lands in its run directory (``--out``): ``config.json``, ``vqvae.keras``,
``pixelcnn.keras``, per-epoch checkpoints, ``history_*.csv``, TensorBoard logs, cached codes,
``metrics.json`` and the figures. ``python train.py --help`` explains every flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent
STAGES = ("vqvae", "prior")
JUDGE = "judge"  # the independent judge of samples (judge.py): trained after the prior, on real slices only

# Presets give defaults; any flag given on the command line wins. "oasis" follows the seed
# project's set-up at 256x256 (Adam, batch 8 for the VQ-VAE; Adam at 3e-4, batch 32 and sparse
# categorical cross-entropy for the prior) with a 32x32 code grid (down-sampling 8).
PRESETS = {
    "demo": {
        "image_size": 128, "downsample": 4, "vqvae_epochs": 12, "prior_epochs": 15,
        "vqvae_batch_size": 16, "prior_batch_size": 32, "vqvae_lr": 2e-3, "prior_lr": 3e-3,
        "condition_on_slice": True, "vqvae_config": {"ssim_weight": 0.1},
        "prior_config": {"filters": 32, "num_layers": 5, "positional": True},
    },
    "oasis": {
        "image_size": 256, "downsample": 8, "vqvae_epochs": 100, "prior_epochs": 200,
        "vqvae_batch_size": 8, "prior_batch_size": 32, "vqvae_lr": 1e-3, "prior_lr": 3e-4,
        "condition_on_slice": True, "vqvae_config": {"channels": 64, "num_embeddings": 256, "ssim_weight": 0.1},
        "prior_config": {"filters": 64, "num_layers": 12, "positional": True},
    },
}

# Settings that define the trained models and their data: a --resume may not change them.
FROZEN_KEYS = ("vqvae", "prior", "data")


class TrainError(Exception):
    """A problem the user can fix; reported as one line without a traceback."""


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def _config_flag_help(cls) -> dict[str, str]:
    """Help for each dataclass field, read from the ``Attributes:`` section of its docstring."""
    helps, current = {}, None
    for line in (cls.__doc__ or "").splitlines():
        m = re.match(r"^\s{8}(\w+):\s*(.*)$", line)
        if m:
            current = m.group(1)
            helps[current] = m.group(2).strip()
        elif current and line.startswith(" " * 12) and line.strip():
            helps[current] += " " + line.strip()
        elif not line.strip():
            current = None
    return helps


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, prefix: str, skip: set[str]) -> None:
    """One flag per config field (``--{prefix}{field}``), typed from the field's default."""
    helps = _config_flag_help(cls)
    preset_key = "prior_config" if prefix else "vqvae_config"
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + (prefix + f.name).replace("_", "-")
        by_preset = [f"{name} {values[preset_key][f.name]}" for name, values in PRESETS.items()
                     if f.name in values.get(preset_key, {})]
        text = (helps.get(f.name) or f"{cls.__name__}.{f.name}") + f" (default: {default}" + (
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
    from modules import PriorConfig, VQVAEConfig

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
    g.add_argument("--stage", choices=("all",) + STAGES + (JUDGE,), default="all",
                   help="all: both stages, then the judge; vqvae: only stage 1; prior: only stage 2, on the run's "
                        "trained VQ-VAE; judge: only the judge of samples (a slice-position CNN on the real "
                        "training slices), for an existing run")
    g.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="default settings to start from (see below)")
    g.add_argument("--image-size", type=int, default=None, help="train on square images of this side (resized on load)")
    g.add_argument("--val-fraction", type=float, default=0.2,
                   help="when the data has no validate folder, hold out this fraction of training cases (by case)")
    g.add_argument("--seed", type=int, default=0, help="seed for data order, weights and sampling")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last completed epoch (optimiser state included)")
    g.add_argument("--num-samples", type=int, default=16, help="samples drawn for the figure at the end (0: none)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="epochs for both stages (the two flags below override)")
    g.add_argument("--vqvae-epochs", type=int, default=None, help="epochs of VQ-VAE training")
    g.add_argument("--prior-epochs", type=int, default=None, help="epochs of prior training")
    g.add_argument("--batch-size", type=int, default=None, help="batch size for both stages (the two flags below override)")
    g.add_argument("--vqvae-batch-size", type=int, default=None, help="VQ-VAE batch size")
    g.add_argument("--prior-batch-size", type=int, default=None, help="prior batch size")
    g.add_argument("--vqvae-lr", type=float, default=None,
                   help="Adam learning rate of the VQ-VAE (start of a cosine decay to 5%% of it)")
    g.add_argument("--prior-lr", type=float, default=None,
                   help="Adam learning rate of the prior (start of a cosine decay to 5%% of it)")
    g.add_argument("--distribute", choices=("none", "mirrored", "multiworker"), default="none",
                   help="none: one device; mirrored: tf.distribute.MirroredStrategy over the visible GPUs "
                        "(or the --virtual-cpus devices); multiworker: MultiWorkerMirroredStrategy from TF_CONFIG")
    g.add_argument("--virtual-cpus", type=int, default=0,
                   help="split the CPU into this many logical devices (to try --distribute mirrored without GPUs)")
    g.add_argument("--judge-epochs", type=int, default=None,
                   help="epochs of the judge, the small CNN that learns slice position from real training slices "
                        "and scores samples in predict.py evaluate (default: 10; 0: no judge)")
    g.add_argument("--mixed-precision", action="store_true",
                   help="use Keras' mixed_float16 policy (on a GPU; ignored with a notice on a CPU)")

    g = p.add_argument_group("VQ-VAE (VQVAEConfig)")
    _add_dataclass_flags(g, VQVAEConfig, "", skip={"image_size", "seed"})
    g = p.add_argument_group("prior (PriorConfig; the flags carry a prior- prefix)")
    g.add_argument("--condition-on-slice", action=argparse.BooleanOptionalAction, default=None,
                   help="condition the prior on the slice index parsed from file names, so samples can be "
                        "asked for at a given depth (default: on in both presets)")
    _add_dataclass_flags(g, PriorConfig, "prior-", skip={"grid_shape", "num_conditions"})
    return p


# ----------------------------------------------------------------------------------------------
# Configuration: preset <- saved run (on --resume) <- explicit flags
# ----------------------------------------------------------------------------------------------

def resolve_config(args, parser) -> dict:
    """Build the run's full config dict from preset, saved config (when resuming) and flags."""
    from modules import PriorConfig, VQVAEConfig

    import utils

    out = args.out or REPO / "runs" / args.preset
    saved_path = out / "config.json"
    saved = utils.load_json(saved_path) if saved_path.exists() else None
    if args.resume and saved is None:
        raise TrainError(f"--resume: {saved_path} not found; start a new run without --resume")
    if args.stage in ("prior", JUDGE) and saved is None:
        raise TrainError(f"--stage {args.stage}: {out} holds no trained run (no config.json); "
                         "train the VQ-VAE first with --stage vqvae or --stage all")
    if saved is not None and not args.resume and args.stage not in ("prior", JUDGE):
        raise TrainError(f"{out} already holds a run; pass --resume to continue it, --stage prior to "
                         "retrain its prior, or --out to start a new run elsewhere")

    preset = PRESETS[args.preset]
    data_root = args.data.resolve() if args.data else None
    if saved is not None:
        cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in saved.items()}
    else:
        image_size = args.image_size or preset["image_size"]
        vq = VQVAEConfig(**{"image_size": image_size, "downsample": preset["downsample"], "seed": args.seed,
                            **preset.get("vqvae_config", {})}).to_dict()
        cfg = {
            "preset": args.preset,
            "data": {"root": str(data_root) if data_root else None, "image_size": image_size,
                     "val_fraction": args.val_fraction},
            "vqvae": vq,
            "prior": {**PriorConfig().to_dict(), **preset.get("prior_config", {}),
                      "condition_on_slice": preset["condition_on_slice"]},
            "training": {k: preset[k] for k in ("vqvae_epochs", "prior_epochs", "vqvae_batch_size",
                                                  "prior_batch_size", "vqvae_lr", "prior_lr")},
            "seed": args.seed,
        }

    # Explicit flags: model and data settings, then training settings.
    requested = {"vqvae": {}, "prior": {}, "data": {}}
    for f in dataclasses.fields(VQVAEConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            requested["vqvae"][f.name] = list(value) if isinstance(value, list) else value
    for f in dataclasses.fields(PriorConfig):
        value = getattr(args, "prior_" + f.name, None)
        if value is not None:
            requested["prior"][f.name] = list(value) if isinstance(value, list) else value
    if args.condition_on_slice is not None:
        requested["prior"]["condition_on_slice"] = args.condition_on_slice
    if args.image_size is not None:
        requested["vqvae"]["image_size"] = args.image_size
        requested["data"]["image_size"] = args.image_size
    if data_root is not None:
        requested["data"]["root"] = str(data_root)

    if saved is not None:
        # A resumed run (or a prior retrained on a saved VQ-VAE) must not silently change what was trained.
        frozen = dict(requested)
        if args.stage == "prior" and not args.resume:
            frozen = {"vqvae": requested["vqvae"], "data": requested["data"]}
        clashes = [f"{section}.{key}: saved {cfg[section].get(key)!r}, requested {value!r}"
                   for section, values in frozen.items() for key, value in values.items()
                   if cfg[section].get(key) != value]
        if clashes:
            raise TrainError(f"{saved_path} was made with another config ({'; '.join(clashes)}); "
                             "drop those flags or use a new --out")
    for section, values in requested.items():
        cfg[section].update(values)

    train = cfg["training"]
    for stage in STAGES:
        epochs = getattr(args, f"{stage}_epochs") or args.epochs
        if epochs is not None:
            train[f"{stage}_epochs"] = epochs
        batch = getattr(args, f"{stage}_batch_size") or args.batch_size
        if batch is not None:
            train[f"{stage}_batch_size"] = batch
        lr = getattr(args, f"{stage}_lr")
        if lr is not None:
            train[f"{stage}_lr"] = lr
    train.update(distribute=args.distribute, mixed_precision=bool(args.mixed_precision))
    for key in ("vqvae_epochs", "prior_epochs", "vqvae_batch_size", "prior_batch_size"):
        if train[key] < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1, got {train[key]}")
    if args.num_samples < 0:
        parser.error(f"--num-samples must be 0 or more, got {args.num_samples}")
    if args.judge_epochs is not None and args.judge_epochs < 0:
        parser.error(f"--judge-epochs must be 0 or more, got {args.judge_epochs}")
    if not 0.0 < cfg["data"]["val_fraction"] < 1.0:
        parser.error(f"--val-fraction must be between 0 and 1, got {cfg['data']['val_fraction']}")

    # Validate the model settings now, so a bad flag is one line, not a traceback mid-run.
    try:
        VQVAEConfig.from_dict(cfg["vqvae"])
        prior = {k: v for k, v in cfg["prior"].items() if k != "condition_on_slice"}
        PriorConfig.from_dict({**prior, "grid_shape": prior.get("grid_shape") or (1, 1)})  # grid known later
    except (TypeError, ValueError) as e:
        raise TrainError(f"bad model setting: {e}") from None
    cfg["out"] = str(out.resolve())
    return cfg


# ----------------------------------------------------------------------------------------------
# Checkpoints: atomic, whole-model (weights + optimiser state), one file per completed epoch
# ----------------------------------------------------------------------------------------------

_CKPT = re.compile(r"^epoch_(\d{4,})\.keras$")


def latest_checkpoint(ckpt_dir: Path) -> tuple[int, Path | None]:
    """``(completed epochs, path)`` of the newest complete checkpoint, or ``(0, None)``.

    Only files named ``epoch_NNNN.keras`` count; they appear by ``os.replace`` once fully written,
    so a process killed mid-write leaves a temporary file that is never taken as the latest.
    """
    if not ckpt_dir.is_dir():
        return 0, None
    found = sorted((int(m.group(1)), ckpt_dir / name) for name in os.listdir(ckpt_dir)
                   if (m := _CKPT.match(name)))
    return found[-1] if found else (0, None)


def _atomic_checkpoint_class():
    import keras

    class AtomicCheckpoint(keras.callbacks.Callback):
        """Save the whole model after every epoch to ``epoch_NNNN.keras`` through a temp file.

        The history row of an epoch is written (by ``CSVLogger``, earlier in the callback list) before
        its checkpoint; on resume, rows past the checkpoint are dropped, so no epoch is duplicated or
        missing. A NaN loss stops training (``TerminateOnNaN``) and its epoch is never checkpointed.
        """

        def __init__(self, ckpt_dir: Path, keep: int = 2):
            super().__init__()
            self.ckpt_dir, self.keep = Path(ckpt_dir), keep

        def on_epoch_end(self, epoch, logs=None):
            if logs and any(not np.isfinite(v) for v in logs.values() if isinstance(v, (int, float))):
                return
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.ckpt_dir / f"tmp_{os.getpid()}.keras"
            self.model.save(tmp)
            os.replace(tmp, self.ckpt_dir / f"epoch_{epoch + 1:04d}.keras")
            done = sorted(int(m.group(1)) for n in os.listdir(self.ckpt_dir) if (m := _CKPT.match(n)))
            for old in done[:-self.keep]:
                (self.ckpt_dir / f"epoch_{old:04d}.keras").unlink(missing_ok=True)

    return AtomicCheckpoint


def truncate_history(csv_path: Path, completed_epochs: int) -> None:
    """Keep only the history rows of epochs ``< completed_epochs`` (rewritten atomically)."""
    import utils

    if not csv_path.exists():
        return
    lines = csv_path.read_text().splitlines()
    if not lines:
        return
    kept = [lines[0]] + [ln for ln in lines[1:] if ln and int(float(ln.split(",")[0])) < completed_epochs]
    utils.atomic_write_bytes(csv_path, ("\n".join(kept) + "\n").encode() if completed_epochs else b"")


def fit_stage(stage: str, build_model, data, val_data, epochs: int, run_dir: Path, resume: bool, strategy):
    """Fit one stage with checkpoints, CSV history and TensorBoard; return the trained model.

    Args:
        build_model: ``() -> compiled keras.Model``, called inside the strategy scope for a fresh start.
        data, val_data: ``tf.data`` datasets for ``fit``.
    """
    import keras

    AtomicCheckpoint = _atomic_checkpoint_class()
    ckpt_dir = run_dir / "checkpoints" / stage
    csv_path = run_dir / f"history_{stage}.csv"
    done, ckpt = latest_checkpoint(ckpt_dir) if resume else (0, None)
    if not resume:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        csv_path.unlink(missing_ok=True)
    truncate_history(csv_path, done)
    with strategy.scope():
        if ckpt is not None:
            print(f"[{stage}] resuming from {ckpt} ({done} of {epochs} epochs done)")
            model = keras.models.load_model(ckpt)
        else:
            model = build_model()
    if done >= epochs:
        print(f"[{stage}] all {epochs} epochs already done")
        return model
    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.CSVLogger(str(csv_path), append=True),
        AtomicCheckpoint(ckpt_dir),
        keras.callbacks.TensorBoard(log_dir=str(run_dir / "logs" / stage), write_graph=False),
    ]
    history = model.fit(data, validation_data=val_data, epochs=epochs, initial_epoch=done, callbacks=callbacks,
                        shuffle=False,  # the tf.data pipeline shuffles
                        verbose=1 if sys.stdout.isatty() else 2)
    losses = history.history.get("loss", [])
    if losses and not np.isfinite(losses[-1]):
        last_good, _ = latest_checkpoint(ckpt_dir)
        raise TrainError(f"[{stage}] loss became NaN in epoch {done + len(losses)}; training stopped. The last "
                         f"good checkpoint (epoch {last_good}) is in {ckpt_dir}: lower --{stage}-lr and resume "
                         "with --resume")
    return model


def save_final(model, path: Path) -> None:
    """Save a final ``.keras`` model atomically."""
    tmp = path.with_name(f"tmp_{os.getpid()}_{path.name}")
    model.save(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------

def make_strategy(cfg: dict):
    import tensorflow as tf

    kind = cfg["training"]["distribute"]
    if kind == "none":
        return tf.distribute.get_strategy()
    if kind == "multiworker":
        if not os.environ.get("TF_CONFIG"):
            raise TrainError("--distribute multiworker needs the TF_CONFIG environment variable describing "
                             "the cluster; set it on every worker, or use --distribute mirrored")
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy()
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) < 2:
        raise TrainError("--distribute mirrored found no GPU and a single CPU device; "
                         "pass --virtual-cpus 2 to split the CPU, or run on GPUs")
    return tf.distribute.MirroredStrategy(devices=[d.name for d in cpus])


def load_data(cfg: dict):
    import dataset

    root = cfg["data"]["root"]
    if root is None:
        root = dataset.ensure_demo_dataset()
        cfg["data"]["root"] = str(root)
        cfg["data"]["demo"] = True
    try:
        splits = dataset.read_oasis(root, image_size=cfg["data"]["image_size"],
                                    val_fraction=cfg["data"]["val_fraction"], seed=cfg["seed"])
    except dataset.DatasetError as e:
        raise TrainError(str(e)) from None
    cfg["data"]["num_images"] = {name: len(s) for name, s in splits.items()}
    return splits


def cosine_schedule(lr: float, epochs: int, num_examples: int, batch_size: int):
    """Cosine decay from ``lr`` to 5 % of it over the stage's planned steps.

    The schedule is saved with the optimiser, so a resumed run keeps the plan it started with.
    """
    import keras

    steps = max(1, epochs * math.ceil(num_examples / batch_size))
    return keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps, alpha=0.05)


def train_vqvae(cfg: dict, splits, run_dir: Path, resume: bool, strategy):
    import keras

    import dataset
    from modules import VQVAE, VQVAEConfig

    t = cfg["training"]
    batch = t["vqvae_batch_size"]

    def build():
        model = VQVAE(VQVAEConfig.from_dict(cfg["vqvae"]))
        model.compile(optimizer=keras.optimizers.Adam(
            cosine_schedule(t["vqvae_lr"], t["vqvae_epochs"], len(splits["train"]), batch)))
        return model

    train_ds = dataset.to_dataset(splits["train"], batch, shuffle=True, seed=cfg["seed"])
    val_ds = dataset.to_dataset(splits["validate"], batch, shuffle=False)
    model = fit_stage("vqvae", build, train_ds, val_ds, t["vqvae_epochs"], run_dir, resume, strategy)
    save_final(model, run_dir / "vqvae.keras")
    return model


def encode_splits(vqvae, splits, run_dir: Path, batch_size: int = 64) -> dict[str, dict[str, np.ndarray]]:
    """Encode every split once; cached in ``codes.npz``, keyed by the VQ-VAE file it came from."""
    import hashlib

    import evaluation

    cache = run_dir / "codes.npz"
    model_path = run_dir / "vqvae.keras"
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest() if model_path.exists() else ""
    if cache.exists():
        with np.load(cache) as z:
            if str(z["vqvae_sha256"]) == digest and all(f"{s}_codes" in z for s in splits):
                print(f"[prior] using cached codes in {cache}")
                return {s: {"codes": z[f"{s}_codes"], "slices": z[f"{s}_slices"]} for s in splits}
    out, arrays = {}, {"vqvae_sha256": np.asarray(digest)}
    for name, split in splits.items():
        out[name] = {"codes": evaluation.encode_images(vqvae, split.images, batch_size),
                     "slices": np.asarray(split.slice_indices)}
        arrays[f"{name}_codes"] = out[name]["codes"]
        arrays[f"{name}_slices"] = out[name]["slices"]
        print(f"[prior] encoded {name}: {out[name]['codes'].shape}")
    tmp = cache.with_name(f"tmp_{os.getpid()}_codes.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, cache)
    return out


def prior_inputs(codes: dict, conditioned: bool):
    return (codes["codes"], codes["slices"].astype(np.int32)) if conditioned else codes["codes"]


def train_prior(cfg: dict, codes, run_dir: Path, resume: bool, strategy):
    import keras

    from modules import PixelCNN, PriorConfig

    t = cfg["training"]
    conditioned = cfg["prior"]["condition_on_slice"]
    grid = codes["train"]["codes"].shape[1:]
    cfg["prior"]["grid_shape"] = list(grid)
    cfg["prior"]["num_conditions"] = int(max(c["slices"].max() for c in codes.values())) + 1 if conditioned else 0
    prior_cfg = PriorConfig.from_dict({k: v for k, v in cfg["prior"].items() if k != "condition_on_slice"})
    num_embeddings = cfg["vqvae"]["num_embeddings"]

    def build():
        model = PixelCNN(num_embeddings, prior_cfg)
        schedule = cosine_schedule(t["prior_lr"], t["prior_epochs"], len(codes["train"]["codes"]),
                                   t["prior_batch_size"])
        model.compile(optimizer=keras.optimizers.Adam(schedule),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        return model

    train = (prior_inputs(codes["train"], conditioned), codes["train"]["codes"])
    val = (prior_inputs(codes["validate"], conditioned), codes["validate"]["codes"])
    import tensorflow as tf

    train_ds = (tf.data.Dataset.from_tensor_slices(train).shuffle(len(train[1]), seed=cfg["seed"])
                .batch(t["prior_batch_size"]).prefetch(tf.data.AUTOTUNE))
    val_ds = tf.data.Dataset.from_tensor_slices(val).batch(t["prior_batch_size"])
    model = fit_stage("prior", build, train_ds, val_ds, t["prior_epochs"], run_dir, resume, strategy)
    save_final(model, run_dir / "pixelcnn.keras")
    return model


def set_judge_config(cfg: dict, splits, epochs: int | None) -> None:
    """``cfg["judge"]``: the judge's ``JudgeConfig`` (kept from a saved run; ``--judge-epochs`` wins),
    classifying as many slice positions as the data has."""
    from judge import JudgeConfig

    judge = cfg.setdefault("judge", JudgeConfig(image_size=cfg["data"]["image_size"], seed=cfg["seed"]).to_dict())
    if epochs is not None:
        judge["epochs"] = epochs
    judge["num_slices"] = int(max(np.max(s.slice_indices) for s in splits.values() if len(s))) + 1


def train_judge_stage(cfg: dict, splits, run_dir: Path, resume: bool = False) -> dict:
    """Fit the judge on the real training slices (``judge.train_judge`` takes only real splits: it
    never sees a sample), save ``judge.keras`` and report its slice error on the test split.

    It trains in seconds on one device, so it has no per-epoch checkpoints: ``--resume`` keeps a
    finished ``judge.keras`` and otherwise trains it again from the start.
    """
    import keras

    import judge

    config = judge.JudgeConfig.from_dict(cfg["judge"])
    path = run_dir / "judge.keras"
    if config.epochs == 0:
        print("[judge] --judge-epochs 0: no judge")
        return {}
    if resume and path.exists():
        print(f"[judge] keeping {path}")
        model = keras.models.load_model(path)
    else:
        csv_path = run_dir / "history_judge.csv"
        csv_path.unlink(missing_ok=True)
        print(f"[judge] {config.epochs} epochs on {len(splits['train'])} real training slices, "
              f"{config.num_slices} slice positions")
        model = judge.train_judge(splits["train"], splits["validate"], config, verbose=1 if sys.stdout.isatty() else 2,
                                  callbacks=[keras.callbacks.TerminateOnNaN(), keras.callbacks.CSVLogger(str(csv_path))])
        save_final(model, path)
    _, predicted = judge.judge_outputs(model, splits["test"].images)
    error = np.abs(predicted - splits["test"].slice_indices)
    return {"judge_test_slice_error_median": float(np.median(error)), "judge_test_accuracy": float((error == 0).mean())}


# ----------------------------------------------------------------------------------------------
# Evaluation and figures
# ----------------------------------------------------------------------------------------------

def evaluate_vqvae(vqvae, split, run_dir: Path, num_embeddings: int, batch_size: int = 32) -> dict:
    """Test-split reconstruction SSIM / PSNR and code usage (``evaluation``), and their figures."""
    import evaluation
    import utils

    x = split.float()
    codes, recon = evaluation.reconstruct(vqvae, x, batch_size)  # encoded once; codes reused for usage
    scores = evaluation.reconstruction_metrics(x, recon)
    ssim = scores["ssim"]
    usage = evaluation.code_usage(codes, num_embeddings)
    # Figures: a spread of test slices beside their reconstructions, the code grids, code usage.
    pick = np.linspace(0, len(x) - 1, min(8, len(x))).round().astype(int)
    utils.plot_image_rows(
        [("original", x[pick]), ("reconstruction", recon[pick])], run_dir / "reconstructions.png",
        titles=[[split.names[i].replace(".nii.png", "") for i in pick],
                [f"SSIM {ssim[i]:.3f}" for i in pick]])
    utils.plot_image_rows([("slice", x[pick]), ("codes", codes[pick])], run_dir / "code_grids.png",
                          cmaps=["gray", "nipy_spectral"])
    utils.plot_codebook_usage(usage, run_dir / "codebook_usage.png", title="test-split codes")
    return {"test_ssim": scores["ssim_mean"], "test_psnr": scores["psnr_mean"],
            "codebook_perplexity": usage["perplexity"], "active_codes": usage["active_codes"]}


def evaluate_prior(prior, codes, conditioned: bool, batch_size: int) -> dict:
    """The prior's NLL of the validate and test codes, in bits per code and bits per slice."""
    import evaluation

    out = {}
    for split in ("validate", "test"):
        condition = codes[split]["slices"].astype(np.int32) if conditioned else None
        nll = evaluation.prior_nll(prior, codes[split]["codes"], condition, batch_size)
        name = "val" if split == "validate" else split
        out[f"prior_{name}_nll_bits"] = nll["bits_per_code"]
        out[f"prior_{name}_nll_bits_per_slice"] = nll["bits_per_slice"]
    return out


def draw_samples(vqvae, prior, cfg: dict, codes, run_dir: Path, num: int) -> None:
    import evaluation
    import sampler
    import utils

    condition = None
    if cfg["prior"]["condition_on_slice"]:
        seen = np.unique(codes["train"]["slices"])
        condition = seen[np.linspace(0, len(seen) - 1, num).round().astype(int)]
    t0 = time.time()
    sampled = sampler.sample_codes(prior, num, seed=cfg["seed"], condition=condition)
    images = evaluation.decode_codes(vqvae, sampled)
    titles = [f"slice {c}" for c in condition] if condition is not None else None
    utils.save_image_grid(images, run_dir / "samples.png", titles=titles,
                          suptitle=f"{num} samples from the prior ({time.time() - t0:.1f} s)")


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    if args.virtual_cpus:
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.virtual_cpus)
    try:
        return run(args, parser)
    except TrainError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2


def run(args, parser) -> int:
    import json

    import keras

    import utils

    started = time.time()
    cfg = resolve_config(args, parser)
    run_dir = Path(cfg["out"])
    run_dir.mkdir(parents=True, exist_ok=True)
    utils.set_seed(cfg["seed"])
    if cfg["training"]["mixed_precision"]:
        import tensorflow as tf

        if tf.config.list_logical_devices("GPU"):
            keras.mixed_precision.set_global_policy("mixed_float16")
        else:
            print("train.py: notice: --mixed-precision needs a GPU; training in float32 on the CPU")
    strategy = make_strategy(cfg)
    if cfg["training"]["distribute"] != "none":
        print(f"[distribute] {cfg['training']['distribute']} over {strategy.num_replicas_in_sync} devices")
    splits = load_data(cfg)
    set_judge_config(cfg, splits, args.judge_epochs)
    cfg["versions"] = utils.library_versions()
    print("config:", json.dumps(cfg, indent=2))
    utils.save_json(cfg, run_dir / "config.json")

    num_embeddings = cfg["vqvae"]["num_embeddings"]
    stages = STAGES + (JUDGE,) if args.stage == "all" else (args.stage,)
    timings = {}
    if "vqvae" in stages:
        t0 = time.time()
        vqvae = train_vqvae(cfg, splits, run_dir, args.resume, strategy)
        timings["vqvae_train_s"] = time.time() - t0
    metrics_path = run_dir / "metrics.json"
    metrics = utils.load_json(metrics_path) if metrics_path.exists() else {}
    if "vqvae" in stages or "prior" in stages:
        if not (run_dir / "vqvae.keras").exists():
            raise TrainError(f"{run_dir / 'vqvae.keras'} not found: train the VQ-VAE first (--stage vqvae or all)")
        vqvae = keras.models.load_model(run_dir / "vqvae.keras")
        metrics.update(evaluate_vqvae(vqvae, splits["test"], run_dir, num_embeddings))

    if "prior" in stages:
        codes = encode_splits(vqvae, splits, run_dir)
        t0 = time.time()
        prior = train_prior(cfg, codes, run_dir, args.resume, strategy)
        timings["prior_train_s"] = time.time() - t0
        utils.save_json(cfg, run_dir / "config.json")
        metrics.update(evaluate_prior(prior, codes, cfg["prior"]["condition_on_slice"],
                                      cfg["training"]["prior_batch_size"]))
        if args.num_samples:
            draw_samples(vqvae, prior, cfg, codes, run_dir, args.num_samples)
    if JUDGE in stages:
        t0 = time.time()
        metrics.update(train_judge_stage(cfg, splits, run_dir, resume=args.resume))
        timings["judge_train_s"] = time.time() - t0
    histories = {s: utils.read_history_csv(run_dir / f"history_{s}.csv") for s in STAGES + (JUDGE,)}
    histories = {s: h for s, h in histories.items() if h}
    if histories:
        utils.plot_training_curves(histories, run_dir / "training_curves.png")
    metrics.update({k: round(v, 1) for k, v in timings.items()}, wall_s=round(time.time() - started, 1))
    utils.save_json(metrics, metrics_path)
    print("metrics:", json.dumps(metrics, indent=2))
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
