"""Time naive vs fast PixelCNN sampling in one run and check they return identical codes.

Example:
    python bench/bench_sampling.py --num-samples 16 --grid 32 32 --repeats 2
    python bench/bench_sampling.py --model runs/x/prior.keras
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
    ap.add_argument("--model", help="a saved prior (.keras); default: the default PriorConfig")
    ap.add_argument("--num-embeddings", type=int, default=128)
    ap.add_argument("--plain", action="store_true", help="plain (not gated) prior when building")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--grid", type=int, nargs=2, default=(32, 32), metavar=("H", "W"))
    ap.add_argument("--repeats", type=int, default=1, help="timed fast runs after a warm-up run")
    ap.add_argument("--train-steps", type=int, default=0,
                    help="briefly fit the built prior on random codes first (0: random init)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    grid = tuple(args.grid)
    if args.model:
        prior = keras.models.load_model(args.model)
    else:
        prior = PixelCNN(args.num_embeddings, PriorConfig(gated=not args.plain, grid_shape=grid))
        prior(np.zeros((1,) + grid, "int32"))
        if args.train_steps:
            codes = np.random.default_rng(args.seed).integers(0, args.num_embeddings,
                                                              (64,) + grid)
            prior.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            prior.fit(codes, codes, batch_size=16, epochs=1, steps_per_epoch=args.train_steps,
                      verbose=0)
    cond = 0 if prior.config.num_conditions else None
    print(f"prior: {prior.config}, num_embeddings={prior.num_embeddings}, "
          f"params={prior.count_params()}")
    print(f"grid {grid}, {args.num_samples} samples, temperature {args.temperature}")

    kw = dict(grid_shape=grid, temperature=args.temperature, seed=args.seed, condition=cond)
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
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
