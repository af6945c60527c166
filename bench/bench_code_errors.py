"""Where mottled samples come from: the prior's wrong codes, or a decoder that draws each one as a spot.

    python bench/bench_code_errors.py --run runs/demo
    python bench/bench_code_errors.py --run runs/twolevel      # a two-level run adds the fine level given real top codes

The real test slices at ``evaluation.reference_pick`` (64, seed 0) are encoded, and code grids made from
them are decoded by the run's decoder and read by the anatomy judge (pieces of white, grey and CSF per
slice, tissue-area difference by position, Frechet distance in the segmenter's features), beside the
real test slices themselves and the real validate slices (the judge's floor):

* **teacher-forced**: every code drawn from the prior's conditional given the *real* codes before it
  (one full-grid pass; argmax, temperature 1 and 0.8): the prior's own errors, without the drift of
  drawing a whole grid;
* **random swaps**: 5 % and 25 % of the real codes replaced by uniformly random codes: how the decoder
  draws a grid holding codes that do not belong there;
* two-level runs: the fine prior drawing whole grids given the real slices' top-level codes.

A decoder that renders swapped codes as dark spots turns every wrong code a prior draws into a piece of
CSF inside white matter; ``train.py --stage decoder --code-noise`` teaches it not to.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def code_sets(run, test, pick, seed: int = 0) -> dict:
    """``(sets, agreement)``: ``name -> (images, positions)``, decoded code grids made from the real test
    slices at ``pick``, and ``name -> share of positions holding the real code``."""
    import evaluation
    import sampler
    from pixelcnn import pack_inputs

    cond = test.slice_indices[pick].astype(np.int32) if run.conditioned else None
    x = test.subset(pick).float()
    codes = evaluation.encode_images(run.vqvae, x)
    top = evaluation.encode_images(run.top.vqvae, x) if run.two_level else None
    logits = np.asarray(run.prior(pack_inputs(codes, cond, top=top), training=False))
    rng = np.random.default_rng(seed)
    grids = {"real test slices, encoded and decoded": codes, "teacher-forced, argmax": logits.argmax(-1)}
    for t in (1.0, 0.8):
        grids[f"teacher-forced, temperature {t:g}"] = (logits / t + rng.gumbel(size=logits.shape)).argmax(-1)
    for share in (0.05, 0.25):
        swap = rng.random(codes.shape) < share
        grids[f"random swaps, {share:.0%} of codes"] = np.where(
            swap, rng.integers(0, run.prior.num_embeddings, codes.shape), codes)
    if top is not None:
        for t in (sampler.DEFAULT_TEMPERATURE, 0.5):
            grids[f"fine level given the real top codes, temperature {t:g}"] = sampler.sample_codes(
                run.prior, len(codes), seed=seed, condition=cond, top=top, temperature=t)
    agreement = {name: float((g == codes).mean()) for name, g in grids.items()}
    return {name: (evaluation.decode_codes(run.vqvae, g), cond) for name, g in grids.items()}, agreement


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=REPO / "runs" / "demo", help="a train.py run with a segmenter "
                   "(default: runs/demo)")
    p.add_argument("--num", type=int, default=64, help="test slices (default: 64, as predict.py evaluate)")
    args = p.parse_args(argv)
    if args.num < 2:
        p.error(f"--num must be at least 2, got {args.num}")

    import evaluation
    import predict

    try:
        run = predict.load_run(args.run)
    except predict.PredictError as e:
        p.error(str(e))
    segmenter = predict.load_segmenter(run)
    if segmenter is None:
        p.error(f"{args.run} has no segmenter.keras; train it: python train.py --stage segmenter --out {args.run}")
    splits = run.read_splits(masks=True)
    test, val = splits["test"], splits["validate"]
    pick = evaluation.reference_pick(len(test), args.num, 0)
    sets, agreement = code_sets(run, test, pick)
    sets["real test slices"] = (test.subset(pick).float(), test.slice_indices[pick] if run.conditioned else None)
    vp = evaluation.validate_pick(len(val), args.num, 0)
    sets["real_validate"] = (val.subset(vp).float(), val.slice_indices[vp] if run.conditioned else None)
    metrics, _ = evaluation.anatomy_scores(segmenter, sets, test.images, test.slice_indices)
    print(f"\n{args.run}: {args.num} test slices; the floor is the real validate slices")
    print("| codes | agree with the real codes | white pieces | grey pieces | CSF pieces | area diff | Frechet |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in sets:
        a = f"{agreement[name]:.2f}" if name in agreement else ""
        cells = [metrics[f"anatomy_components_{t}_{name}"] for t in ("white", "grey", "csf")]
        print(f"| {name} | {a} | " + " | ".join(f"{v:.2f}" for v in cells)
              + f" | {metrics[f'anatomy_area_difference_{name}']:.3f} | {metrics[f'anatomy_frechet_{name}_vs_test']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
