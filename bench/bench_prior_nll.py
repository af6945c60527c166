"""Plain vs gated PixelCNN prior: held-out NLL on a trained run's codes, trained side by side.

    python bench/bench_prior_nll.py --run runs/demo --epochs 8

Both priors get the run's prior settings (filters, layers, kernels, slice conditioning), differing
only in ``gated``; both train on the run's cached training codes (``codes.npz``, written by
``train.py``) with the same seed, optimiser and epochs, and are scored on the validate and test codes
in bits per code. The wall time per epoch is printed too, since the two stacks cost differently.
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path(__file__).resolve().parents[1] / "runs" / "demo",
                   help="a train.py run directory with codes.npz and config.json (default: runs/demo)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs for each prior (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and batch order (default: 0)")
    args = p.parse_args(argv)
    if not (args.run / "codes.npz").exists():
        p.error(f"{args.run / 'codes.npz'} not found: train the run first (python train.py --out {args.run})")

    import keras
    import tensorflow as tf

    import utils
    from modules import PixelCNN, PriorConfig

    cfg = utils.load_json(args.run / "config.json")
    prior_settings = {k: v for k, v in cfg["prior"].items() if k != "condition_on_slice"}  # (older runs)
    conditioned = prior_settings.get("num_conditions", 0) > 0
    batch, lr = cfg["training"]["prior_batch_size"], cfg["training"]["prior_lr"]
    with np.load(args.run / "codes.npz") as z:
        data = {s: (z[f"{s}_codes"], z[f"{s}_slices"].astype(np.int32)) for s in ("train", "validate", "test")}

    def inputs(split):
        codes, slices = data[split]
        return (codes, slices) if conditioned else codes

    print(f"codes: train {data['train'][0].shape}, K = {cfg['vqvae']['num_embeddings']}; "
          f"prior: {prior_settings['filters']} filters x {prior_settings['num_layers']} layers, "
          f"conditioned: {conditioned}; {args.epochs} epochs, batch {batch}, Adam {lr}")
    rows = []
    for gated in (False, True):
        utils.set_seed(args.seed)
        prior = PixelCNN(cfg["vqvae"]["num_embeddings"], PriorConfig.from_dict({**prior_settings, "gated": gated}))
        prior.compile(optimizer=keras.optimizers.Adam(lr),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        ds = (tf.data.Dataset.from_tensor_slices((inputs("train"), data["train"][0]))
              .shuffle(len(data["train"][0]), seed=args.seed).batch(batch).prefetch(2))
        start = time.perf_counter()
        prior.fit(ds, epochs=args.epochs, verbose=2)
        per_epoch = (time.perf_counter() - start) / args.epochs
        nll = {s: prior.evaluate(inputs(s), data[s][0], batch_size=batch, verbose=0) / math.log(2)
               for s in ("validate", "test")}
        rows.append(("gated" if gated else "plain", prior.count_params(), per_epoch, nll["validate"], nll["test"]))
    print(f"\n{'prior':<6} {'params':>8} {'s/epoch':>8} {'val bits/code':>14} {'test bits/code':>15}")
    for name, params, per_epoch, val, test in rows:
        print(f"{name:<6} {params:>8} {per_epoch:>8.1f} {val:>14.3f} {test:>15.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
