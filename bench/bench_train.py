"""Training throughput of both stages, in images per second, at 128x128 and 256x256.

    python bench/bench_train.py                       # both presets' models, on this machine
    python bench/bench_train.py --sizes 256 --steps 50 --mixed-precision both   # on a GPU
    python bench/bench_train.py --prior-ab            # the prior's fit, variants side by side
    python bench/bench_train.py --prior-runs runs/demo runs/grid16   # saved runs' priors side by side

``--prior-ab`` times the demo preset's prior training step (steps/s and code grids/s) in variants of
what the field offers to speed it up -- XLA (``compile(jit_compile=True)``), the batch size --
against the set-up ``train.py`` uses, interleaved in one process (round-robin, median of the rounds)
so that load from other processes hits every variant alike; ratios are to the first row. It also
times the input pipeline alone (``train.py``'s, and one that gathers whole shuffled batches from
cached code arrays), to show whether the pipeline could be the bottleneck.

``--prior-runs`` times the training step of each run's prior (rebuilt from its ``config.json``: grid,
codebook, layers, attention, conditioning) on random code grids of its own grid shape at its own batch
size, interleaved the same way, and prints each run's seconds per step and per epoch of the demo's
1,920 training slices beside the first run's: what one prior design costs against another.

For each image size the VQ-VAE and the prior are built with the settings the matching preset uses
(128: demo, 256: oasis), fed OASIS-sized synthetic data (smooth random slices; the prior gets random
code grids of the VQ-VAE's grid shape), and timed over ``--steps`` training steps after
``--warmup`` steps that absorb graph tracing. Throughput does not depend on what the pixels are.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

SIZE_PRESET = {128: "demo", 256: "oasis"}


def synthetic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random 'slices' in [0, 1]: low-frequency noise, as compressible as real anatomy."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    coarse = rng.random((n, size // 16, size // 16, 1)).astype(np.float32)
    return tf.image.resize(coarse, (size, size), method="bicubic").numpy().clip(0, 1)


def time_fit(model, dataset, steps: int, warmup: int) -> float:
    """Seconds per training step, measured after ``warmup`` steps."""
    model.fit(dataset, epochs=1, steps_per_epoch=warmup, verbose=0, shuffle=False)
    start = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
    return (time.perf_counter() - start) / steps


def bench_size(size: int, args, mixed: bool) -> list[tuple[str, float]]:
    import keras
    import tensorflow as tf

    import train
    from modules import VQVAE, PixelCNN, PriorConfig, VQVAEConfig

    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    preset = train.PRESETS[SIZE_PRESET[size]]
    vq_cfg = VQVAEConfig(**{"image_size": size, "downsample": preset["downsample"], **preset.get("vqvae_config", {})})
    batch = args.batch_size or preset["vqvae_batch_size"]
    images = synthetic_images(max(64, 4 * batch), size)
    ds = tf.data.Dataset.from_tensor_slices(images).repeat().batch(batch, drop_remainder=True).prefetch(2)
    vqvae = VQVAE(vq_cfg)
    vqvae.compile(optimizer=keras.optimizers.Adam(preset["vqvae_lr"]))
    vq_step = time_fit(vqvae, ds, args.steps, args.warmup)

    h, w = vq_cfg.grid_shape
    prior_batch = args.batch_size or preset["prior_batch_size"]
    prior_cfg = PriorConfig(**{**preset.get("prior_config", {}), "grid_shape": (h, w), "num_conditions": 32})
    rng = np.random.default_rng(1)
    codes = rng.integers(0, vq_cfg.num_embeddings, (max(64, 4 * prior_batch), h, w)).astype(np.int32)
    slices = rng.integers(0, 32, len(codes)).astype(np.int32)
    pds = (tf.data.Dataset.from_tensor_slices(((codes, slices), codes)).repeat()
           .batch(prior_batch, drop_remainder=True).prefetch(2))
    prior = PixelCNN(vq_cfg.num_embeddings, prior_cfg)
    prior.compile(optimizer=keras.optimizers.Adam(preset["prior_lr"]),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    prior_step = time_fit(prior, pds, args.steps, args.warmup)
    keras.mixed_precision.set_global_policy("float32")
    tag = f"{size}x{size}" + (" mixed_float16" if mixed else "")
    return [(f"vqvae  {tag} ({SIZE_PRESET[size]} preset, batch {batch}, {vq_cfg.channels} ch)", batch / vq_step),
            (f"prior  {tag} ({h}x{w} codes, batch {prior_batch}, {prior_cfg.filters} filters x "
             f"{prior_cfg.num_layers} layers)", prior_batch / prior_step)]


def prior_fit_variants(args) -> None:
    """Print the demo prior's fit speed under each variant, interleaved, with ratios to train.py's set-up."""
    import keras
    import tensorflow as tf

    import train
    from modules import PixelCNN, PriorConfig, VQVAEConfig

    preset = train.PRESETS["demo"]
    vq_cfg = VQVAEConfig(**{"image_size": preset["image_size"], "downsample": preset["downsample"],
                            **preset.get("vqvae_config", {})})
    h, w = vq_cfg.grid_shape
    prior_cfg = PriorConfig(**{**preset.get("prior_config", {}), "grid_shape": (h, w), "num_conditions": 32})
    rng = np.random.default_rng(1)
    n = 1920  # the demo set's 60 training cases x 32 slices
    codes = rng.integers(0, vq_cfg.num_embeddings, (n, h, w)).astype(np.int32)
    slices = rng.integers(0, 32, n).astype(np.int32)
    base_batch, base_lr = preset["prior_batch_size"], preset["prior_lr"]

    def pipeline(batch, kind):
        """``train.py``'s pipeline ("slices"), or the whole epoch as one shuffled tensor ("cached")."""
        if kind == "slices":
            ds = tf.data.Dataset.from_tensor_slices(((codes, slices), codes)).shuffle(n, seed=0).batch(batch)
            return ds.repeat().prefetch(tf.data.AUTOTUNE)
        c, s = tf.constant(codes), tf.constant(slices)

        def epoch(_):
            order = tf.random.shuffle(tf.range(n), seed=0)[: n - n % batch]
            return tf.data.Dataset.from_tensor_slices(tf.reshape(order, (-1, batch)))

        gather = lambda idx: ((tf.gather(c, idx), tf.gather(s, idx)), tf.gather(c, idx))  # noqa: E731
        return (tf.data.Dataset.range(1).repeat().flat_map(epoch).map(gather, num_parallel_calls=tf.data.AUTOTUNE)
                .prefetch(tf.data.AUTOTUNE))

    variants = [  # (name, batch, lr, jit_compile)
        (f"train.py: batch {base_batch}, lr {base_lr:g}, no XLA (Keras 'auto' is off on CPU)", base_batch, base_lr,
         "auto"),
        ("+ jit_compile=True (XLA)", base_batch, base_lr, True),
        (f"batch {2 * base_batch}, lr x sqrt(2)", 2 * base_batch, base_lr * 2 ** 0.5, "auto"),
        (f"batch {base_batch // 2}, lr / sqrt(2)", base_batch // 2, base_lr / 2 ** 0.5, "auto"),
    ]
    # Steps are timed with train_on_batch: one traced step function per model, called round-robin.
    # (Repeated short fit() calls would time re-tracing; the pipeline is timed on its own below.)
    models, iterators = [], []
    for name, batch, lr, jit in variants:
        keras.utils.set_random_seed(0)
        model = PixelCNN(vq_cfg.num_embeddings, prior_cfg)
        model.compile(optimizer=keras.optimizers.Adam(lr), jit_compile=jit,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        it = iter(pipeline(batch, "slices"))
        for _ in range(args.warmup):  # traces (and XLA-compiles)
            x, y = next(it)
            model.train_on_batch(x, y)
        models.append(model)
        iterators.append(it)
    times = [[] for _ in variants]
    for _ in range(args.rounds):
        for i, (model, it) in enumerate(zip(models, iterators)):
            start = time.perf_counter()
            for _ in range(args.steps):
                x, y = next(it)
                model.train_on_batch(x, y)
            times[i].append((time.perf_counter() - start) / args.steps)
    step_s = [float(np.median(t)) for t in times]
    width = max(len(v[0]) for v in variants)
    print(f"prior fit, demo preset ({prior_cfg.filters} filters x {prior_cfg.num_layers} layers, {h}x{w} codes, "
          f"conditioned, positional); median of {args.rounds} interleaved rounds of {args.steps} steps")
    print(f"{'variant':<{width}}  {'steps/s':>8}  {'grids/s':>8}  {'grids/s vs row 1':>16}")
    for (name, batch, *_), s in zip(variants, step_s):
        print(f"{name:<{width}}  {1 / s:8.2f}  {batch / s:8.1f}  {batch / s / (base_batch / step_s[0]):15.2f}x")
    for kind in ("slices", "cached"):
        it = iter(pipeline(base_batch, kind))
        next(it)
        start = time.perf_counter()
        for _ in range(200):
            next(it)
        print(f"input pipeline alone ({kind}): {200 / (time.perf_counter() - start):.0f} batches/s "
              f"(the model takes {1 / step_s[0]:.2f} steps/s)")


def prior_run_steps(args) -> None:
    """Print the training step time of each saved run's prior, interleaved, with ratios to the first run's."""
    import keras

    import utils
    from modules import PixelCNN, PriorConfig
    from pixelcnn import pack_inputs

    n = 1920  # the demo set's training slices, for seconds per epoch
    entries = []
    for run in args.prior_runs:
        path = run / "config.json"
        if not path.exists():
            raise SystemExit(f"bench_train.py: --prior-runs: {path} not found; give train.py run directories")
        cfg = utils.load_json(path)
        prior_cfg = PriorConfig.from_dict(cfg["prior"])
        k, batch = cfg["vqvae"]["num_embeddings"], cfg["training"]["prior_batch_size"]
        keras.utils.set_random_seed(0)
        model = PixelCNN(k, prior_cfg)
        model.compile(optimizer=keras.optimizers.Adam(cfg["training"]["prior_lr"]),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        rng = np.random.default_rng(0)
        codes = rng.integers(0, k, (batch, *prior_cfg.grid_shape)).astype(np.int32)
        cond = rng.integers(0, prior_cfg.num_conditions, batch).astype(np.int32) if prior_cfg.num_conditions else None
        previous = rng.integers(0, k, codes.shape).astype(np.int32) if prior_cfg.previous_slice else None
        top = None  # the fine prior of a two-level run takes top codes (its top level's own prior is not timed)
        if prior_cfg.top_codes:
            top = rng.integers(0, prior_cfg.top_codes, (batch, *prior_cfg.top_grid_shape)).astype(np.int32)
        x = pack_inputs(codes, cond, previous, top)
        for _ in range(args.warmup):
            model.train_on_batch(x, codes)
        entries.append((run, prior_cfg, k, batch, model, x, codes))
    times = [[] for _ in entries]
    for _ in range(args.rounds):
        for i, (*_, model, x, codes) in enumerate(entries):
            start = time.perf_counter()
            for _ in range(args.steps):
                model.train_on_batch(x, codes)
            times[i].append((time.perf_counter() - start) / args.steps)
    step_s = [float(np.median(t)) for t in times]
    print(f"prior training step, median of {args.rounds} interleaved rounds of {args.steps} steps")
    for (run, pc, k, batch, *_), s in zip(entries, step_s):
        epoch = s * math.ceil(n / batch)
        print(f"{str(run)}: {pc.grid_shape[0]}x{pc.grid_shape[1]} grid, {k} codes, {pc.filters} filters x "
              f"{pc.num_layers} layers, attention every {pc.attention_every or '-'}, batch {batch}: "
              f"{s * 1000:.0f} ms / step ({s / step_s[0]:.2f}x the first), {epoch:.0f} s / epoch of {n} slices")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256], choices=sorted(SIZE_PRESET),
                   help="image sides to measure; 128 uses the demo preset's models, 256 the oasis preset's")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per stage (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, for tracing (default: 3)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size for both stages (default: the preset's)")
    p.add_argument("--mixed-precision", choices=("off", "on", "both"), default="off",
                   help="Keras mixed_float16 policy: off, on, or both side by side (meant for GPUs)")
    p.add_argument("--prior-ab", action="store_true",
                   help="instead: the demo prior's fit in speed-up variants side by side (see above)")
    p.add_argument("--prior-runs", type=Path, nargs="+", default=None, metavar="RUN",
                   help="instead: the training step of each saved run's prior side by side (see above)")
    p.add_argument("--rounds", type=int, default=5,
                   help="--prior-ab / --prior-runs: interleaved timing rounds (default: 5)")
    args = p.parse_args(argv)
    import utils

    utils.quiet_tensorflow()
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        p.error("--steps, --warmup and --rounds must be at least 1")
    if args.prior_ab:
        prior_fit_variants(args)
        return 0
    if args.prior_runs:
        prior_run_steps(args)
        return 0
    import tensorflow as tf

    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    print(f"device: {devices[0].name} ({'GPU' if 'GPU' in devices[0].name else f'CPU, {os.cpu_count()} cores'})")
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.mixed_precision]
    rows = []
    for size in args.sizes:
        for mixed in modes:
            rows += bench_size(size, args, mixed)
    width = max(len(name) for name, _ in rows)
    for name, rate in rows:
        print(f"{name:<{width}}  {rate:8.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
