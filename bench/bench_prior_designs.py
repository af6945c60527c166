"""Prior designs side by side: real slices, each design's reconstructions and samples at the same positions.

    python bench/bench_prior_designs.py --runs runs/demo runs/grid16 --figure images/prior_designs.png

Each ``--runs`` entry is a ``train.py`` run (its own VQ-VAE grid, codebook and prior). The same test
slices (``evaluation.reference_pick``, seed 0) are shown once, then for every run its reconstructions of
those slices and samples drawn at their slice positions (``predict.generate``, the default temperature,
seed 0), each beside a 4x zoom of its centre, where grey and white matter meet. It prints each run's
grid, codebook, test SSIM and the prior's test NLL per slice (``metrics.json``) and, with
``--time-samples N``, the seconds per sample of drawing N samples with each run's prior (the fast
sampler, after a warm-up draw of as many that compiles it; the runs timed one after another in this process); the anatomy judge's
figures for each run come from ``predict.py evaluate --run RUN`` or ``bench/bench_sampling_defaults.py``
(docs/prior-designs.md gathers them).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="train.py run directories, one per design")
    p.add_argument("--labels", nargs="+", default=None, help="a short name per run (default: the folder names)")
    p.add_argument("--num", type=int, default=4, help="test slices shown (default: 4)")
    p.add_argument("--time-samples", type=int, default=0, metavar="N",
                   help="also time drawing N samples per run (0: no timing; default 0)")
    p.add_argument("--figure", type=Path, default=REPO / "images" / "prior_designs.png",
                   help="where the figure goes (default: images/prior_designs.png)")
    args = p.parse_args(argv)
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        p.error(f"--labels: {len(labels)} names for {len(args.runs)} runs; give one per run")
    if args.num < 1:
        p.error(f"--num must be at least 1, got {args.num}")
    if args.time_samples < 0:
        p.error(f"--time-samples must be 0 or more, got {args.time_samples}")

    import dataset
    import evaluation
    import predict
    import utils

    rows, test = [], None
    for run_dir, label in zip(args.runs, labels):
        try:
            run = predict.load_run(run_dir)
        except predict.PredictError as e:
            print(f"bench_prior_designs.py: {e}", file=sys.stderr)
            return 2
        split = dataset.read_oasis(run.config["data"]["root"], image_size=run.config["data"]["image_size"])["test"]
        if test is None:  # the first run's test split sets the slices; every run must read the same ones
            test = split
            pick = evaluation.reference_pick(len(test), args.num, 0)
            real = test.subset(pick).float()
            rows += [("real", real), ("real, centre x4", evaluation.center_crop(real, 0.25))]
        elif len(split) != len(test) or not np.array_equal(split.slice_indices, test.slice_indices):
            print(f"bench_prior_designs.py: {run_dir} was trained on other data than {args.runs[0]}; compare runs "
                  "of one data set", file=sys.stderr)
            return 2
        _, recon = evaluation.reconstruct(run.vqvae, real)
        condition = test.slice_indices[pick].astype(np.int32) if run.conditioned else None
        _, samples = predict.generate(run, args.num, seed=0, condition=condition, progress=False)
        rows += [(f"{label}: recon", recon), ("centre x4", evaluation.center_crop(recon, 0.25)),
                 (f"{label}: sample", samples), ("centre x4", evaluation.center_crop(samples, 0.25))]
        timing = ""
        if args.time_samples:
            import time

            positions = np.resize(test.slice_indices.astype(np.int32), args.time_samples) if run.conditioned else None
            predict.generate(run, args.time_samples, seed=2, condition=positions, progress=False)  # compiles
            start = time.perf_counter()
            predict.generate(run, args.time_samples, seed=1, condition=positions, progress=False)
            timing = f", {(time.perf_counter() - start) / args.time_samples:.3f} s / sample ({args.time_samples} drawn)"
        metrics = utils.load_json(run.path / "metrics.json") if (run.path / "metrics.json").exists() else {}
        grid = run.config["prior"]["grid_shape"]
        print(f"{label}: grid {grid[0]}x{grid[1]}, {run.config['vqvae']['num_embeddings']} codes, test SSIM "
              f"{metrics.get('test_ssim', float('nan')):.3f}, prior test NLL "
              f"{metrics.get('prior_test_nll_bits_per_slice', float('nan')):.0f} bits / slice{timing}")
    titles = [[f"slice {k}" for k in test.slice_indices[pick]]] + [None] * (len(rows) - 1)
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    utils.plot_image_rows(rows, args.figure, titles=titles, cell_inches=1.8)
    print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
