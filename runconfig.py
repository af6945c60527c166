"""The run's configuration: the preset, a saved run's ``config.json`` and the flags, merged and checked.

``train.py`` keeps the presets and the command line; :func:`resolve_config` turns them into the one
config dict a run prints and saves (sections ``data``, ``vqvae`` -- a ``VQVAEConfig``, ``prior`` -- a
``PriorConfig``, ``training``, ``seed``), refusing flags that would change what a saved run trained.
:func:`slice_conditions` fills in the one value only the data knows. Nothing runs on import.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent
STAGES = ("vqvae", "prior")
JUDGE = "judge"  # the independent judge of samples (judge.py): trained after the prior, on real slices only
SEGMENTER = "segmenter"  # the tissue segmenter (segmenter.py): trained last, on real slices and masks only
DECODER = "decoder"  # fine-tunes the decoder of a trained run (encoder and codebook frozen); part of "all" when
# the preset has a "decoder_config" (the demo's) and --decoder-epochs is not 0

# The VQ-VAE settings that only steer training (the losses and the discriminator): --stage decoder takes
# them as its own, in the run's "decoder" section, while the encoder and codebook stay as trained.
DECODER_LOSS_KEYS = ("recon_weight", "ssim_weight", "spectral_weight", "spectral_focal", "spectral_log", "gradient_weight",
                     "band_power_weight", "code_noise", "adversarial", "disc_start", "disc_weight", "disc_filters", "disc_layers", "disc_lr")
DECODER_EPOCHS = 4  # --decoder-epochs default: half the demo's VQ-VAE epochs (docs/training.md#fine-tune-the-decoder)
DECODER_LR = 1e-3  # --decoder-lr default: half the demo's VQ-VAE rate, a fine-tune's

# Settings that define the trained models and their data: a --resume may not change them.
FROZEN_KEYS = ("vqvae", "prior", "data")

# Training settings added after runs were saved without them, with the value that gives a saved run its
# old behaviour (the VQ-VAE's opt-in warm-up and gradient clipping: 0 = off).
TRAINING_DEFAULTS = {"vqvae_warmup_steps": 0, "vqvae_clipnorm": 0.0}


class TrainError(Exception):
    """A problem the user can fix; reported as one line without a traceback."""


def resolve_config(args, parser, presets: dict) -> tuple[dict, bool]:
    """Build the run's config dict from the preset (one of ``presets``), saved config (when resuming) and flags.

    Returns ``(cfg, condition_on_slice)``. Everything but ``cfg["prior"]["num_conditions"]`` is final
    here (the prior's ``grid_shape`` follows from the VQ-VAE config); the number of slice positions
    is only known once the data is read, and :func:`slice_conditions` fills it in when
    ``condition_on_slice`` is true (0 otherwise).
    """
    from modules import PriorConfig, VQVAEConfig

    import utils

    out = args.out or REPO / "runs" / args.preset
    saved_path = out / "config.json"
    saved = utils.load_json(saved_path) if saved_path.exists() else None
    if args.resume and saved is None:
        raise TrainError(f"--resume: {saved_path} not found; start a new run without --resume")
    if args.stage in ("prior", JUDGE, SEGMENTER, DECODER) and saved is None:
        raise TrainError(f"--stage {args.stage}: {out} holds no trained run (no config.json); "
                         "train the VQ-VAE first with --stage vqvae or --stage all")
    if saved is not None and not args.resume and args.stage not in ("prior", JUDGE, SEGMENTER, DECODER):
        raise TrainError(f"{out} already holds a run; pass --resume to continue it, --stage prior to "
                         "retrain its prior, or --out to start a new run elsewhere")

    preset = presets[args.preset]
    data_root = args.data.resolve() if args.data else None
    if saved is not None:
        cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in saved.items()}
        # Runs written before PriorConfig carried everything kept the switch beside it.
        legacy = cfg["prior"].pop("condition_on_slice", None)
        saved_conditioned = bool(legacy if legacy is not None else cfg["prior"].get("num_conditions"))
    else:
        image_size = args.image_size or preset["image_size"]
        vq = VQVAEConfig(**{"image_size": image_size, "downsample": preset["downsample"], "seed": args.seed,
                            **preset.get("vqvae_config", {})}).to_dict()
        cfg = {
            "preset": args.preset,
            "data": {"root": str(data_root) if data_root else None, "image_size": image_size,
                     "val_fraction": args.val_fraction},
            "vqvae": vq,
            "prior": {**PriorConfig().to_dict(), **preset.get("prior_config", {})},
            "training": {k: preset[k] for k in ("vqvae_epochs", "prior_epochs", "vqvae_batch_size",
                                                  "prior_batch_size", "vqvae_lr", "prior_lr",
                                                  "vqvae_warmup_steps", "vqvae_clipnorm")},
            "seed": args.seed,
        }
        saved_conditioned = preset["condition_on_slice"]

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
    if args.image_size is not None:
        requested["vqvae"]["image_size"] = args.image_size
        requested["data"]["image_size"] = args.image_size
    if data_root is not None:
        requested["data"]["root"] = str(data_root)
    condition_on_slice = saved_conditioned if args.condition_on_slice is None else args.condition_on_slice
    decoder_requested = {}
    if args.stage == DECODER:  # the loss flags are the decoder stage's, not a change of the trained VQ-VAE
        decoder_requested = {k: requested["vqvae"].pop(k) for k in DECODER_LOSS_KEYS if k in requested["vqvae"]}

    if saved is not None:
        # A resumed run (or a prior retrained on a saved VQ-VAE) must not silently change what was trained.
        frozen = dict(requested)
        if args.stage == "prior" and not args.resume:
            frozen = {"vqvae": requested["vqvae"], "data": requested["data"]}
        if args.stage == DECODER and args.resume and "decoder" in cfg:
            frozen["decoder"] = decoder_requested
        clashes = [f"{section}.{key}: saved {cfg[section].get(key)!r}, requested {value!r}"
                   for section, values in frozen.items() for key, value in values.items()
                   if cfg[section].get(key) != value]
        if "prior" in frozen and condition_on_slice != saved_conditioned:
            clashes.append(f"condition_on_slice: saved {saved_conditioned}, requested {condition_on_slice}")
        if clashes:
            raise TrainError(f"{saved_path} was made with another config ({'; '.join(clashes)}); "
                             "drop those flags or use a new --out")
    for section, values in requested.items():
        cfg[section].update(values)
    if not cfg["prior"]["gated"] and cfg["prior"].get("condition_map") and "condition_map" not in requested["prior"]:
        # the preset's (or saved run's) condition map is for the gated stack that --no-prior-gated replaces
        print(f"note: --no-prior-gated: the plain prior has no slice condition map, so condition_map "
              f"{cfg['prior']['condition_map']} -> 0 (it needs a gated prior)")
        cfg["prior"]["condition_map"] = 0
    if cfg["prior"].get("previous_slice") and not cfg["prior"].get("condition_map") and not (
            requested["prior"].get("previous_slice")):
        # the preset's previous-slice condition enters through the condition map that this prior has not
        print("note: condition_map 0: the previous slice enters the prior through its condition map, so "
              "previous_slice -> off (predict.py subject needs it)")
        cfg["prior"]["previous_slice"], cfg["prior"]["previous_dropout"] = False, 0.0

    if args.stage == DECODER:
        cfg["decoder"] = decoder_config(cfg, args, decoder_requested, parser)
    elif args.stage == "all":
        all_stage_decoder(cfg, args, preset, parser, new_run=saved is None)
    train = cfg["training"]
    for key, off in TRAINING_DEFAULTS.items():  # a run saved before the key existed trained without it
        train.setdefault(key, off)
    for stage in STAGES:
        # The stage's own flag wins over the shared one, even when it is 0 (then rejected below).
        epochs = getattr(args, f"{stage}_epochs")
        epochs = args.epochs if epochs is None else epochs
        if epochs is not None:
            train[f"{stage}_epochs"] = epochs
        batch = getattr(args, f"{stage}_batch_size")
        batch = args.batch_size if batch is None else batch
        if batch is not None:
            train[f"{stage}_batch_size"] = batch
        lr = getattr(args, f"{stage}_lr")
        if lr is not None:
            train[f"{stage}_lr"] = lr
    for key in TRAINING_DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            train[key] = value
    train.update(distribute=args.distribute, mixed_precision=bool(args.mixed_precision))
    for key in ("vqvae_epochs", "prior_epochs", "vqvae_batch_size", "prior_batch_size"):
        if train[key] < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1, got {train[key]}")
    for stage in STAGES:
        if not train[f"{stage}_lr"] > 0:  # Adam at 0 (or below) would finish a run of an untrained model
            parser.error(f"--{stage}-lr must be above 0, got {train[f'{stage}_lr']}")
    for key in TRAINING_DEFAULTS:
        if not train[key] >= 0:  # 0 is off
            parser.error(f"--{key.replace('_', '-')} must be 0 or more (0: off), got {train[key]}")
    if args.num_samples < 0:
        parser.error(f"--num-samples must be 0 or more, got {args.num_samples}")
    if args.judge_epochs is not None and args.judge_epochs < 0:
        parser.error(f"--judge-epochs must be 0 or more, got {args.judge_epochs}")
    if args.segmenter_epochs is not None and args.segmenter_epochs < 0:
        parser.error(f"--segmenter-epochs must be 0 or more, got {args.segmenter_epochs}")
    if not 0.0 < cfg["data"]["val_fraction"] < 1.0:
        parser.error(f"--val-fraction must be between 0 and 1, got {cfg['data']['val_fraction']}")

    # Validate the model settings now, so a bad flag is one line, not a traceback mid-run. The code
    # grid follows from the VQ-VAE; the number of slice positions waits for the data.
    try:
        vq = VQVAEConfig.from_dict(cfg["vqvae"])
        if "decoder" in cfg and args.stage in (DECODER, "all"):
            decoder_vqvae_config(cfg)
        cfg["prior"]["grid_shape"] = list(vq.grid_shape)
        cfg["prior"]["num_conditions"] = 0
        if getattr(args, "top_run", None) is not None:
            top = top_level_config(args.top_run, cfg, args.stage, out)
            cfg["prior"].update(top_codes=top["vqvae"]["num_embeddings"], top_grid_shape=top["prior"]["grid_shape"])
        PriorConfig.from_dict(cfg["prior"])
    except (TypeError, ValueError) as e:
        raise TrainError(f"bad model setting: {e}") from None
    cfg["out"] = str(out.resolve())
    return cfg, bool(condition_on_slice)


TOP_DIR = "top"  # a two-level run's top level: a complete run directory inside the run (train.py --top-run)
TOP_FILES = ("config.json", "vqvae.keras", "pixelcnn.keras")


def top_level_config(top_run: Path, cfg: dict, stage: str, out: Path) -> dict:
    """The config of ``--top-run``, checked to be a trained run on this run's data with a coarser grid.

    Raises:
        TrainError: a missing file, this run itself, a run on other data (the default demo's root when
            ``--data`` is not given) or image size, a grid that is not coarser or does not divide this
            run's, or a stage without a prior to train (``--stage vqvae``, ...).
    """
    import build_data
    import utils

    top_run = Path(top_run)
    if stage in ("vqvae", DECODER, JUDGE, SEGMENTER):
        raise TrainError(f"--top-run gives the prior a top level: use it with --stage all or --stage prior, "
                         f"not --stage {stage}")
    missing = [name for name in TOP_FILES if not (top_run / name).exists()]
    if missing:
        raise TrainError(f"--top-run {top_run}: {', '.join(missing)} not found; train the top level first, e.g. "
                         f"python train.py --out {top_run} --downsample 8 --num-embeddings 512 --channels 48 "
                         "--vqvae-warmup-steps 100 --vqvae-clipnorm 1")
    top = utils.load_json(top_run / "config.json")
    if Path(out).resolve() == top_run.resolve():
        raise TrainError(f"--top-run {top_run} is this run itself; give the coarser run's directory")
    if top["data"]["image_size"] != cfg["data"]["image_size"]:
        raise TrainError(f"--top-run {top_run} was trained at {top['data']['image_size']} px, this run at "
                         f"{cfg['data']['image_size']}: train both levels at one image size")
    ours = Path(cfg["data"]["root"] or build_data.DEFAULT_DEMO_ROOT).resolve()  # the demo when --data is not given
    if Path(top["data"]["root"]).resolve() != ours:
        raise TrainError(f"--top-run {top_run} was trained on {top['data']['root']}, this run on {ours}: train "
                         "both levels on the same data")
    fine, coarse = cfg["prior"]["grid_shape"], top["prior"]["grid_shape"]
    if any(f % c or f <= c for f, c in zip(fine, coarse)) or fine[0] // coarse[0] != fine[1] // coarse[1]:
        raise TrainError(f"--top-run {top_run} has {coarse[0]}x{coarse[1]} codes, this run {fine[0]}x{fine[1]}: the "
                         "top level needs a coarser grid that divides this one (e.g. --downsample 8 against 4)")
    return top


def decoder_config(cfg: dict, args, requested: dict, parser) -> dict:
    """The run's ``"decoder"`` section for ``--stage decoder``: what the decoder is fine-tuned with.

    ``epochs``, ``lr`` (start of a cosine decay), ``batch_size`` and the training-only VQ-VAE settings of
    :data:`DECODER_LOSS_KEYS`. A resumed stage keeps its saved section (``--decoder-epochs`` may extend
    it); a new one starts from the VQ-VAE's own loss settings, ``DECODER_EPOCHS``, ``DECODER_LR`` and the
    VQ-VAE's batch size; the flags given win.
    """
    saved = cfg.get("decoder") if args.resume else None
    if saved is None:
        dec = {"epochs": DECODER_EPOCHS, "lr": DECODER_LR,
               "batch_size": cfg["training"]["vqvae_batch_size"],
               **{k: cfg["vqvae"][k] for k in DECODER_LOSS_KEYS if k in cfg["vqvae"]}}
        from modules import VQVAEConfig

        defaults = VQVAEConfig()  # a run saved before a loss existed trained without it
        dec.update({k: getattr(defaults, k) for k in DECODER_LOSS_KEYS if k not in dec})
    else:
        dec = dict(saved)
    dec.update(requested)
    if args.decoder_epochs is not None:
        dec["epochs"] = args.decoder_epochs
    if args.decoder_lr is not None:
        dec["lr"] = args.decoder_lr
    batch = args.vqvae_batch_size if args.vqvae_batch_size is not None else args.batch_size
    if batch is not None and saved is None:
        dec["batch_size"] = batch
    if dec["epochs"] < 1:
        parser.error(f"--decoder-epochs must be at least 1, got {dec['epochs']}")
    if not dec["lr"] > 0:
        parser.error(f"--decoder-lr must be above 0, got {dec['lr']}")
    return dec


def all_stage_decoder(cfg: dict, args, preset: dict, parser, new_run: bool) -> None:
    """The decoder fine-tune of ``--stage all``: sets or drops ``cfg["decoder"]``.

    A new run fine-tunes its decoder after the prior when the preset has a ``"decoder_config"`` (the
    demo's: the band-power loss, chosen in docs/decoder.md), with those losses over the
    VQ-VAE's, ``DECODER_EPOCHS`` and ``DECODER_LR``; ``--decoder-epochs 0`` skips it (stage 1's decoder
    is then the run's), ``--decoder-epochs N`` / ``--decoder-lr`` set it, and in ``--stage all`` the
    loss flags stay stage 1's. A resumed run keeps its saved section (``--decoder-epochs`` may extend it).
    """
    if args.decoder_epochs is not None and args.decoder_epochs < 0:
        parser.error(f"--decoder-epochs must be 0 (no decoder fine-tune) or more, got {args.decoder_epochs}")
    if not new_run:
        if "decoder" not in cfg and (args.decoder_epochs or args.decoder_lr is not None):
            parser.error("--decoder-epochs/--decoder-lr: this run has no decoder fine-tune; finish it, then run "
                         "python train.py --stage decoder --out RUN")
        if "decoder" in cfg and args.decoder_epochs == 0:
            parser.error("--decoder-epochs 0: this run fine-tunes its decoder (config.json's decoder section); "
                         "a resumed run keeps its stages, so drop the flag or use a new --out")
        if "decoder" in cfg:
            cfg["decoder"] = decoder_config(cfg, args, {}, parser)
        return
    if args.decoder_epochs == 0 or ("decoder_config" not in preset and args.decoder_epochs is None):
        if args.decoder_lr is not None:
            parser.error("--decoder-lr: this run has no decoder fine-tune (--decoder-epochs 0, or a preset without "
                         "one): give --decoder-epochs N, or drop --decoder-lr")
        cfg.pop("decoder", None)
        return
    cfg["decoder"] = decoder_config(cfg, args, dict(preset.get("decoder_config", {})), parser)


def decoder_vqvae_config(cfg: dict):
    """The ``VQVAEConfig`` the decoder stage trains: the run's VQ-VAE with the ``"decoder"`` section's
    losses, encoder and codebook frozen."""
    from modules import VQVAEConfig

    dec = cfg["decoder"]
    return VQVAEConfig.from_dict({**cfg["vqvae"], **{k: dec[k] for k in DECODER_LOSS_KEYS}, "freeze_encoder": True})


def slice_conditions(splits) -> int:
    """Number of slice positions a slice-conditioned prior learns: the training split's ``max + 1``.

    The slice index comes from each file name (``case_<id>_slice_<k>``). A file whose name has none
    would reach the condition embedding as ``-1`` (silently the last slot), and a validate/test
    slice past the training range has no embedding at all, so both stop the run here, before any
    training, with one line naming a file.

    Args:
        splits: ``{"train", "validate", "test"}`` -> ``dataset.Split``.
    Raises:
        TrainError: a file without a slice number, or a validate/test slice outside ``[0, n)``.
    """
    def where(name, split, i):
        folder = split.report.folder if split.report is not None else name
        return str(Path(folder) / split.names[i])

    unnamed = [(name, split, i) for name, split in splits.items()
               for i in np.flatnonzero(np.asarray(split.slice_indices) < 0)]
    if unnamed:
        total = sum(len(s) for s in splits.values())
        raise TrainError(
            f"{where(*unnamed[0])}: no slice number in the file name ({len(unnamed)} of {total} files have "
            "none); conditioning the prior on slice position needs names like case_<id>_slice_<k>.nii.png: "
            "rename the files, or pass --no-condition-on-slice")
    train = np.asarray(splits["train"].slice_indices)
    if not len(train):
        raise TrainError("the training split is empty; nothing to train on")
    n = int(train.max()) + 1
    for name in ("validate", "test"):
        split = splits[name]
        beyond = np.flatnonzero(np.asarray(split.slice_indices) >= n)
        if len(beyond):
            i = beyond[0]
            raise TrainError(
                f"{where(name, split, i)}: slice {split.slice_indices[i]} is outside the training split's "
                f"slices 0..{n - 1} ({len(beyond)} {name} files are); a slice-conditioned prior only knows "
                "positions it was trained on: add those slices to training, or pass --no-condition-on-slice")
    return n
