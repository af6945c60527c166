"""How well the prior completes a slice: keep the top code rows of real test slices, draw the rest.

    python bench/bench_completion.py --run runs/demo [--keep-rows 16] [--seeds 2] [--limit N]

Each test slice (the first ``--limit``) keeps its first ``--keep-rows`` code rows and the prior draws
the others, once per seed (``anomaly.complete``, what ``predict.py complete`` runs; temperature 1 as
its default). On the completed part, the image rows below the kept code rows, it reports:

* **SSIM against the real slice's same rows** (``evaluation.ssim``): how much of the real
  continuation the completion finds. Beside it, the same for the slice's reconstruction (the
  decoder's ceiling: a completion can at best draw the real codes) and for a fresh sample drawn at
  the same slice position with nothing kept (what the position alone gives). A prior that reads the
  kept rows lands between the two.
* **the seam**: the mean absolute step between the last kept image row and the first drawn one,
  over the same step in the real slices; a completion whose step is no larger than the
  reconstructions' (which have no seam) shows none.
* with the run's segmenter, the **anatomy judge** on the whole completed slices (pieces of white,
  grey and CSF per slice, the segmenter's confidence), beside the reconstructions and the real
  slices: the kept rows are the real slice's, so what differs is the drawn part.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def seam_step(images, row: int) -> float:
    """Mean absolute difference between image rows ``row - 1`` and ``row`` over a batch ``(N, H, W[, 1])``."""
    x = np.asarray(images, np.float32)
    return float(np.abs(x[:, row] - x[:, row - 1]).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=REPO / "runs" / "demo", help="a train.py run (default: runs/demo)")
    p.add_argument("--keep-rows", type=int, default=None,
                   help="code rows kept from the real slice (default: half the grid's rows)")
    p.add_argument("--seeds", type=int, default=2, help="completions per slice, seeds 0..N-1 (default: 2)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature of the drawn rows (default: 1, as predict.py complete)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N test slices (default: all)")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds {args.seeds}: at least one completion per slice")
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit {args.limit}: at least one slice")

    import anomaly
    import evaluation
    import predict
    from sampler import sample_codes

    try:
        run = predict.load_run(args.run)
    except predict.PredictError as e:
        p.error(str(e))
    h, w = run.vqvae.grid_shape
    keep_rows = h // 2 if args.keep_rows is None else args.keep_rows
    if not 1 <= keep_rows < h:
        p.error(f"--keep-rows {keep_rows}: this run's code grid has {h} rows; keep 1 to {h - 1}")
    test = run.read_splits()["test"]
    if args.limit:
        test = test.subset(np.arange(min(args.limit, len(test))))
    x = test.float()
    positions = test.slice_indices.astype(np.int32) if run.conditioned else None
    seeds = tuple(range(args.seeds))
    row = keep_rows * (x.shape[1] // h)                           # the first image row drawn, not kept
    print(f"{len(x)} test slices, first {keep_rows} of {h} code rows kept (image rows 0-{row - 1}), "
          f"{len(seeds)} completion(s) each, temperature {args.temperature:g}")

    codes, _, completed = anomaly.complete(run.vqvae, run.prior, x, keep_rows, condition=positions, seeds=seeds,
                                           temperature=args.temperature, progress=True)
    recon = evaluation.decode_codes(run.vqvae, codes)             # the real codes decoded: the ceiling
    fresh = np.stack([evaluation.decode_codes(run.vqvae, sample_codes(
        run.prior, len(x), grid_shape=(h, w), temperature=args.temperature, seed=1000 + s, condition=positions,
        progress=True)) for s in seeds])

    below = lambda images: np.asarray(images)[:, row:]  # noqa: E731  (the completed part)
    rows = {"reconstructions (ceiling)": [recon], "completions": list(completed),
            "fresh samples at the position (nothing kept)": list(fresh)}
    real_step = seam_step(x, row)
    print("\n| images | SSIM of the completed part against the real slice | seam step / real |")
    print("| --- | --- | --- |")
    for name, sets in rows.items():
        ssim = np.mean([evaluation.ssim(below(x), below(s)).mean() for s in sets])
        step = np.mean([seam_step(s, row) for s in sets]) / max(real_step, 1e-8)
        print(f"| {name} | {ssim:.3f} | {step:.2f} |")

    segmenter = predict.load_segmenter(run)
    if segmenter is not None:
        print("\n| images (anatomy judge, whole slices) | white pieces | grey pieces | CSF pieces | confidence |")
        print("| --- | --- | --- | --- | --- |")
        for name, images in (("real test slices", x), ("reconstructions", recon),
                             ("completions", completed.reshape(-1, *x.shape[1:])),
                             ("fresh samples", fresh.reshape(-1, *x.shape[1:]))):
            a = evaluation.anatomy_summary(evaluation.anatomy_readout(segmenter, images), "set")
            pieces = [f"{a[f'anatomy_components_{t}_set']:.2f}" for t in ("white", "grey", "csf")]
            print(f"| {name} | {' | '.join(pieces)} | {a['anatomy_confidence_set']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
