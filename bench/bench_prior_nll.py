"""Plain vs gated vs gated + attention PixelCNN priors: held-out NLL on a trained run's codes.

    python bench/bench_prior_nll.py --run runs/demo --epochs 8
    python bench/bench_prior_nll.py --run runs/demo --epochs 60 --time-budget 300 --attention-every 5 2

Every prior gets the run's prior settings (filters, layers, kernels, positions, slice conditioning),
differing only in ``gated`` and the attention blocks (``--attention-every``: one gated + attention
variant per value; 5 with 5 layers = one attention block after the last layer). All train on the
run's cached training codes (``codes.npz``, written by ``train.py``'s prior stage) with the same
seed, optimiser, batch size and epochs, and are scored on the validate and test codes in bits per
code. With ``--time-budget`` each variant stops after the first epoch that ends past that many
seconds, so the comparison is at equal CPU time (what the demo preset has), not equal epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    p.add_argument("--time-budget", type=float, default=None,
                   help="stop each prior after the first epoch ending past this many seconds (default: none)")
    p.add_argument("--variants", nargs="+", default=["plain", "gated", "attention"],
                   choices=["plain", "gated", "attention"], help="priors to compare (default: all three)")
    p.add_argument("--attention-every", type=int, nargs="+", default=[3],
                   help="attention placements for the 'attention' variant, one prior each (default: 3)")
    p.add_argument("--attention-heads", type=int, default=None, help="heads (default: PriorConfig's)")
    p.add_argument("--attention-dim", type=int, default=None, help="channels per head (default: PriorConfig's)")
    p.add_argument("--dropout", type=float, default=None, help="override the run's prior dropout")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and batch order (default: 0)")
    args = p.parse_args(argv)
    if not (args.run / "codes.npz").exists():
        p.error(f"{args.run / 'codes.npz'} not found: train the run's prior stage first "
                f"(python train.py --out {args.run}; --prior-epochs 1 is enough to write the codes)")

    import keras
    import tensorflow as tf

    import utils
    import evaluation
    from modules import PixelCNN, PriorConfig

    cfg = utils.load_json(args.run / "config.json")
    fields = {f.name for f in dataclasses.fields(PriorConfig)}
    settings = {k: v for k, v in cfg["prior"].items() if k in fields}
    conditioned = settings.get("num_conditions", 0) > 0
    if args.dropout is not None:
        settings["dropout"] = args.dropout
    batch, lr = cfg["training"]["prior_batch_size"], cfg["training"]["prior_lr"]
    cached = evaluation.cached_codes(args.run, evaluation.file_sha256(args.run / "vqvae.keras"),
                                     ("train", "validate", "test"))
    if cached is None:
        p.error(f"{args.run / evaluation.CODE_CACHE} does not hold all three splits' codes of this run's "
                f"vqvae.keras: rerun its prior stage (python train.py --out {args.run} --stage prior)")
    data = {s: (c["codes"], c["slices"].astype(np.int32)) for s, c in cached.items()}

    def inputs(split):
        codes, slices = data[split]
        return (codes, slices) if conditioned else codes

    variants = []
    for name in args.variants:
        if name == "attention":
            for every in args.attention_every:
                extra = {"attention_every": every}
                if args.attention_heads:
                    extra["attention_heads"] = args.attention_heads
                if args.attention_dim:
                    extra["attention_dim"] = args.attention_dim
                variants.append((f"gated+attn/{every}", {"gated": True, **extra}))
        else:
            variants.append((name, {"gated": name == "gated", "attention_every": 0}))

    print(f"codes: train {data['train'][0].shape}, K = {cfg['vqvae']['num_embeddings']}; "
          f"prior: {settings['filters']} filters x {settings['num_layers']} layers, conditioned: {conditioned}; "
          f"up to {args.epochs} epochs" + (f" or {args.time_budget:.0f} s" if args.time_budget else "")
          + f", batch {batch}, Adam {lr}")

    class Budget(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start, self.epochs = time.perf_counter(), 0

        def on_epoch_end(self, epoch, logs=None):
            self.epochs += 1
            if args.time_budget and time.perf_counter() - self.start > args.time_budget:
                self.model.stop_training = True

    rows = []
    for name, overrides in variants:
        utils.set_seed(args.seed)
        prior_cfg = PriorConfig.from_dict({**settings, **overrides})
        prior = PixelCNN(cfg["vqvae"]["num_embeddings"], prior_cfg)
        prior.compile(optimizer=keras.optimizers.Adam(lr),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        ds = (tf.data.Dataset.from_tensor_slices((inputs("train"), data["train"][0]))
              .shuffle(len(data["train"][0]), seed=args.seed).batch(batch).prefetch(2))
        budget = Budget()
        start = time.perf_counter()
        hist = prior.fit(ds, epochs=args.epochs, verbose=2, callbacks=[budget],
                         validation_data=(inputs("validate"), data["validate"][0]), validation_batch_size=batch)
        seconds = time.perf_counter() - start
        curve = " ".join(f"{v / math.log(2):.2f}" for v in hist.history["val_loss"])
        print(f"{name}: validation bits/code after each epoch: {curve}", flush=True)
        nll = {s: evaluation.prior_nll(prior, data[s][0], data[s][1] if conditioned else None, batch)["bits_per_code"]
               for s in ("validate", "test")}
        rows.append((name, prior.count_params(), budget.epochs, seconds / budget.epochs, seconds,
                     nll["validate"], nll["test"]))
        print(f"{name}: {budget.epochs} epochs in {seconds:.0f} s, val {nll['validate']:.3f} bits/code", flush=True)
    print(f"\n{'prior':<14} {'params':>8} {'epochs':>6} {'s/epoch':>8} {'train s':>8} {'val bits/code':>14} "
          f"{'test bits/code':>15}")
    for name, params, epochs, per_epoch, seconds, val, test in rows:
        print(f"{name:<14} {params:>8} {epochs:>6} {per_epoch:>8.1f} {seconds:>8.0f} {val:>14.3f} {test:>15.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
