"""The first steps of a VQ-VAE on real slices: does it learn, or do its ReLUs die?

    python bench/bench_vqvae_start.py --downsample 8 --lr 2e-3 --no-warmup --clipnorm 0   # train.py's default optimiser: the trap
    python bench/bench_vqvae_start.py --downsample 8 --lr 2e-3                            # the opt-in cure (--vqvae-warmup-steps 100 --vqvae-clipnorm 1)
    python bench/bench_vqvae_start.py --downsample 8 --lr 1e-3 --no-warmup --clipnorm 0

Fits the demo preset's VQ-VAE (``--downsample``, ``--channels``, ``--num-embeddings`` override it) on
the first ``--images`` training slices for ``--steps`` steps of batch ``--batch-size`` and prints the
training reconstruction MSE and SSIM (Keras' running means over the steps so far) every ``--every``
steps, then, on 32 slices: the reconstructions' MSE and SSIM, their spread across the slices (0: one
image for every input) and, for every encoder and decoder layer, the fraction of channels that are
never positive (dead ReLUs). The optimiser is ``train.py``'s opt-in cure (``--vqvae-warmup-steps
100 --vqvae-clipnorm 1``: linear warm-up over ``train.VQVAE_WARMUP_STEPS``, gradients clipped to
``train.VQVAE_CLIPNORM``) at a constant peak rate; ``--no-warmup`` and ``--clipnorm 0`` take each guard
away (both: train.py's default optimiser, which both presets keep for now). The MSE of a black image and of the slices'
mean image are printed first, for scale.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    import train

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=None, help="OASIS root (default: the demo set, built if needed)")
    p.add_argument("--downsample", type=int, default=8)
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("--num-embeddings", type=int, default=None)
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate (default: the demo's)")
    p.add_argument("--no-warmup", action="store_true", help="full learning rate from the first step")
    p.add_argument("--clipnorm", type=float, default=train.VQVAE_CLIPNORM, help="global gradient norm clip (0: none)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=120, help="training steps (the demo's epoch is 120)")
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--images", type=int, default=960)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import utils

    utils.quiet_tensorflow()
    import keras
    import numpy as np

    import build_data
    import dataset
    from modules import VQVAE, VQVAEConfig, _mean_ssim

    keras.utils.set_random_seed(args.seed)
    root = args.data or build_data.ensure_demo_dataset()
    split = dataset.read_oasis(root, image_size=128, seed=args.seed)["train"]
    x = split.float()[:args.images]
    preset = train.PRESETS["demo"]
    overrides = {k: v for k, v in (("channels", args.channels), ("num_embeddings", args.num_embeddings)) if v}
    model = VQVAE(VQVAEConfig(image_size=128, downsample=args.downsample, seed=args.seed,
                              **{**preset["vqvae_config"], **overrides}))
    lr = args.lr if args.no_warmup else keras.optimizers.schedules.CosineDecay(
        0.0, 10 ** 9, alpha=1.0, warmup_target=args.lr, warmup_steps=train.VQVAE_WARMUP_STEPS)  # then constant
    model.compile(optimizer=keras.optimizers.Adam(lr, global_clipnorm=args.clipnorm or None))
    print(f"images {len(x)}, MSE of a black image {float((x ** 2).mean()):.4f}, of their mean image "
          f"{float(((x - x.mean(0)) ** 2).mean()):.4f}")

    class Log(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if (batch + 1) % args.every == 0 or batch < 3:
                print(f"step {batch + 1:4d}  recon MSE {logs['recon_loss']:.4f}  SSIM {logs['ssim']:.3f}  "
                      f"active codes {logs['active_codes']:.2f}", flush=True)

    started = time.time()
    data = dataset.to_dataset(x, args.batch_size, shuffle=True, seed=args.seed, repeat=True)
    model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0, callbacks=[Log()])
    probe = x[:: max(1, len(x) // 32)][:32]
    recon = np.asarray(model.decode(model.encode(probe)))
    print(f"fit {time.time() - started:.0f} s; on 32 slices: MSE {float(((probe - recon) ** 2).mean()):.4f}, SSIM "
          f"{float(_mean_ssim(probe, recon)):.3f}, spread {float(recon.std(0).mean()):.4f} "
          f"(the slices' {float(probe.std(0).mean()):.4f})")
    for part, inputs in (("encoder", probe), ("decoder", model.vector_quantizer.quantize(model.encode(probe)))):
        net = getattr(model, part)
        outputs = keras.Model(net.inputs, [layer.output for layer in net.layers[1:]])([inputs])
        dead = [f"{layer.name} {float((np.asarray(a).reshape(-1, a.shape[-1]).max(0) <= 0).mean()):.2f}"
                for layer, a in zip(net.layers[1:], outputs)]
        print(f"{part} dead channels: " + ", ".join(dead))
    return 0


if __name__ == "__main__":
    sys.exit(main())
