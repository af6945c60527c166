"""Time naive vs fast PixelCNN sampling in one run and check they return identical codes.

Example:
    python bench/bench_sampling.py --num-samples 4 --grid 32 32 --repeats 2
    python bench/bench_sampling.py --attention-every 0            # the gated stack alone
    python bench/bench_sampling.py --model runs/x/pixelcnn.keras --guidance 2 --top-k 32

Besides the naive / fast ratio on ``--num-samples`` samples it prints the cost of fast sampling of
``--cost-samples`` (default 64) samples in full-forward-pass equivalents: the fast time divided by
the time of one full-grid forward pass of the prior on that batch. The naive sampler costs h * w
such passes (1,024 on a 32x32 grid) by construction.

``--scaling N ...`` (default 32 128 256 512) times fast sampling of N samples for each N in one process,
each after a warm-up that compiles its batch shape, with the default ``batch_size`` (chunks of
``sampler.DEFAULT_BATCH_SIZE``), and prints the seconds per sample, the ratio of each total to the
smallest N's, and the near-tie fallbacks per sample: the full-grid passes that keep fast == naive,
each over the tied samples only, so the cost per sample stays flat as N grows. A conditioned prior
samples at slice positions spread over its conditions, as ``predict.py`` does.

The built prior (no ``--model``) is the default ``PriorConfig`` (gated, 48 filters x 6 layers) with
a causal attention block after every ``--attention-every``-th layer (default 3: two blocks).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import keras  # noqa: E402

import modules  # noqa: E402,F401  (registers the prior layers for load_model)
import sampler  # noqa: E402
from modules import PixelCNN, PriorConfig  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="a saved prior (.keras); default: build one (see below)")
    ap.add_argument("--num-embeddings", type=int, default=128)
    ap.add_argument("--plain", action="store_true", help="plain (not gated) prior when building")
    ap.add_argument("--attention-every", type=int, default=3,
                    help="attention block after every N-th layer when building (0: none; default 3)")
    ap.add_argument("--num-conditions", type=int, default=0,
                    help="build a conditioned prior with a 'no condition' slot (for --guidance)")
    ap.add_argument("--num-samples", type=int, default=4, help="samples for the naive vs fast ratio")
    ap.add_argument("--cost-samples", type=int, default=64,
                    help="samples for the forward-pass-equivalent cost of fast sampling (0: skip)")
    ap.add_argument("--scaling", type=int, nargs="*", default=(32, 128, 256, 512), metavar="N",
                    help="sample counts for the scaling table (none: skip; default 32 128 256 512)")
    ap.add_argument("--grid", type=int, nargs=2, default=(32, 32), metavar=("H", "W"))
    ap.add_argument("--repeats", type=int, default=1, help="timed fast runs after a warm-up run")
    ap.add_argument("--train-steps", type=int, default=0,
                    help="briefly fit the built prior on random codes first (0: random init)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    grid = tuple(args.grid)
    if args.model:
        prior = keras.models.load_model(args.model)
    else:
        cfg = PriorConfig(gated=not args.plain, grid_shape=grid, attention_every=args.attention_every,
                          num_conditions=args.num_conditions,
                          condition_dropout=0.1 if args.num_conditions else 0.0)
        prior = PixelCNN(args.num_embeddings, cfg)
        prior.build()
        if args.train_steps:
            codes = np.random.default_rng(args.seed).integers(0, args.num_embeddings, (64,) + grid)
            x = (codes, np.zeros(64, "int32")) if args.num_conditions else codes
            prior.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            prior.fit(x, codes, batch_size=16, epochs=1, steps_per_epoch=args.train_steps, verbose=0)
    cond = 0 if prior.config.num_conditions else None
    print(f"prior: {prior.config}, num_embeddings={prior.num_embeddings}, "
          f"params={prior.count_params()}")
    print(f"grid {grid}, {args.num_samples} samples, temperature {args.temperature}, guidance {args.guidance}, "
          f"top_k {args.top_k}, top_p {args.top_p}")

    kw = dict(grid_shape=grid, temperature=args.temperature, seed=args.seed, condition=cond,
              guidance=args.guidance, top_k=args.top_k, top_p=args.top_p)
    t0 = time.perf_counter()
    fast_codes = sampler.sample_codes(prior, args.num_samples, method="fast", **kw)
    fast_cold = time.perf_counter() - t0
    fallbacks = sampler.last_exact_fallbacks
    fast_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        again = sampler.sample_codes(prior, args.num_samples, method="fast", **kw)
        fast_times.append(time.perf_counter() - t0)
        assert np.array_equal(again, fast_codes)
    t0 = time.perf_counter()
    naive_codes = sampler.sample_codes(prior, args.num_samples, method="naive", **kw)
    naive = time.perf_counter() - t0

    fast = min(fast_times) if fast_times else fast_cold
    same = np.array_equal(fast_codes, naive_codes)
    print(f"naive: {naive:.2f} s")
    print(f"fast (first call, incl. XLA compile): {fast_cold:.2f} s "
          f"({fallbacks} near-tie positions decided by a full pass)")
    print(f"fast (warm, best of {len(fast_times)}): {fast:.2f} s")
    print(f"speed-up: {naive / fast:.1f}x warm, {naive / fast_cold:.1f}x incl. compile")
    print(f"identical codes: {same}")

    if args.cost_samples:
        n = args.cost_samples
        codes = np.zeros((n,) + grid, "int32")
        x = (codes, np.zeros(n, "int32")) if cond is not None else codes
        prior(x, training=False)  # warm
        passes = []
        for _ in range(3):
            t0 = time.perf_counter()
            np.asarray(prior(x, training=False))
            passes.append(time.perf_counter() - t0)
        one_pass = min(passes)
        sampler.sample_codes(prior, n, method="fast", **kw)  # compile for this batch
        t0 = time.perf_counter()
        sampler.sample_codes(prior, n, method="fast", **kw)
        fast_n = time.perf_counter() - t0
        print(f"{n} samples: one full forward pass {one_pass:.3f} s; fast sampling {fast_n:.2f} s "
              f"= {fast_n / one_pass:.0f} forward-pass equivalents (naive: {grid[0] * grid[1]}"
              f"{', x2 with guidance' if args.guidance is not None else ''})")
    if args.scaling:
        scaling(prior, sorted(args.scaling), kw)
    return 0 if same else 1


def scaling(prior, sizes, kw):
    """Seconds per sample and exact fallbacks per sample of fast sampling, for each N side by side."""
    nc = prior.config.num_conditions
    compiled, rows = set(), []
    for n in sizes:
        kw_n = {**kw, "condition": np.arange(n) % nc} if nc else kw
        chunk = min(n, sampler.DEFAULT_BATCH_SIZE)
        if chunk not in compiled:  # compile this batch shape outside the timing
            warm = {**kw_n, "condition": kw_n["condition"][:chunk]} if nc else kw_n
            sampler.sample_codes(prior, chunk, method="fast", **warm)
            compiled.add(chunk)
        t0 = time.perf_counter()
        sampler.sample_codes(prior, n, method="fast", **kw_n)
        seconds = time.perf_counter() - t0
        rows.append((n, seconds, sampler.last_exact_fallbacks, sampler.last_exact_rows))
    base_n, base_s = rows[0][:2]
    print(f"\nfast sampling, default batch_size (chunks of {sampler.DEFAULT_BATCH_SIZE}), one process:")
    print("| samples | seconds | s / sample | time / time at %d | fallbacks / sample | exact rows / sample |"
          % base_n)
    print("| --- | --- | --- | --- | --- | --- |")
    for n, seconds, fallbacks, exact_rows in rows:
        print(f"| {n} | {seconds:.1f} | {seconds / n:.3f} | {seconds / base_s:.1f}x (samples {n / base_n:.0f}x) "
              f"| {fallbacks / n:.2f} | {exact_rows / n:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
