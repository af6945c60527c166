"""Synthetic-lesion benchmark: prior-healed anomaly maps against the VQ-VAE residual baseline.

    python bench/bench_anomaly.py --run runs/demo

Every test slice of the run's data with room for it gets one synthetic lesion
(``anomaly.add_synthetic_lesion``: a bright or dark blob with a soft edge and texture, long
semi-axis 3, 5 or 8 % of the image, cycling over the slices, placed well inside the head) with its
known mask. The lesioned slices and the same slices without lesions are scored by two maps:

* **prior-healed**: ``anomaly.heal`` -- codes above the run's default NLL threshold (a high
  percentile of its validation slices' code NLL) are redrawn from the prior given the others, and
  the map is the smoothed ``|input - healed|`` inside the redrawn codes; with one round (the
  single pass of Pinaya et al.) and with ``--rounds`` rounds of rescoring the healed grid (the
  default of ``anomaly.heal``);
* **VQ-VAE residual** (baseline): the smoothed ``|input - decode(encode(input))|``.

Settings (temperature, rounds, percentile) are chosen with ``--split validate`` (lesions in the
validation slices) and reported on the test split. Reported for both, side by side, from this one run: pixel-level AUROC and AUPRC and the best Dice
over all thresholds (over the head pixels of all lesioned and clean slices), and slice-level AUROC
(lesioned vs clean, each slice scored by its map's mean); pixel AUPRC per lesion kind too. Writes
the figures as JSON (``--out``) and a figure of a few lesion slices with both maps and the
ground-truth outlines (``--figure``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

RADII = (0.03, 0.05, 0.08)


def make_lesions(images: np.ndarray, seed: int):
    """One lesion per slice with room for it. Returns (slice indices, lesioned, masks, kinds)."""
    import anomaly

    keep, lesioned, masks, kinds = [], [], [], []
    for i, img in enumerate(images):
        radius, bright = RADII[i % 3], (i // 3) % 2 == 0
        out = anomaly.add_synthetic_lesion(img, np.random.default_rng([seed, i]), radius, bright)
        if out is None:
            continue
        keep.append(i)
        lesioned.append(out[0])
        masks.append(out[1])
        kinds.append(f"{'bright' if bright else 'dark'} {round(100 * radius)}%")
    return np.array(keep), np.stack(lesioned)[..., None], np.stack(masks), kinds


def score(maps_lesion, maps_clean, masks, heads, kinds) -> dict:
    """Pixel metrics over head pixels of lesioned + clean slices; slice AUROC from map means."""
    import anomaly

    pix_scores = np.concatenate([maps_lesion[heads], maps_clean[heads]])
    pix_labels = np.concatenate([masks[heads], np.zeros(int(heads.sum()), bool)])
    m = anomaly.detection_metrics(pix_scores, pix_labels)
    slice_scores = np.r_[maps_lesion.mean(axis=(1, 2)), maps_clean.mean(axis=(1, 2))]
    slice_labels = np.r_[np.ones(len(maps_lesion), bool), np.zeros(len(maps_clean), bool)]
    out = {"pixel_auroc": m["auroc"], "pixel_auprc": m["auprc"], "best_dice": m["best_dice"],
           "slice_auroc": anomaly.roc_auc(slice_scores, slice_labels)}
    kinds = np.array(kinds)
    for kind in sorted(set(kinds)):
        sel = kinds == kind
        h = heads[sel]
        s = np.concatenate([maps_lesion[sel][h], maps_clean[sel][h]])
        y = np.concatenate([masks[sel][h], np.zeros(int(h.sum()), bool)])
        out[f"pixel_auprc {kind}"] = anomaly.average_precision(s, y)
    return out


def plot_examples(x, healed, maps_h, maps_r, masks, titles, path: Path, label: str = "prior-healed") -> None:
    """Columns: lesion slices; rows: input, healed, healed map, residual map; ground truth outlined."""
    from matplotlib.figure import Figure

    n = len(x)
    fig = Figure(figsize=(1.9 * n + 0.6, 1.9 * 4))
    axes = np.asarray(fig.subplots(4, n, squeeze=False))
    vmax = max(float(np.percentile(maps_h, 99.9)), float(np.percentile(maps_r, 99.9)), 1e-3)
    rows = [("lesion slice", x, "gray", 1.0), ("healed", healed, "gray", 1.0),
            (label, maps_h, "hot", vmax), ("VQ-VAE residual", maps_r, "hot", vmax)]
    for r, (label, imgs, cmap, top) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(np.asarray(imgs[c]).squeeze(), cmap=cmap, vmin=0, vmax=top, interpolation="nearest")
            ax.contour(masks[c], levels=[0.5], colors="cyan", linewidths=0.7)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=7)
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle("synthetic lesions (cyan: ground truth) and anomaly maps (same colour scale)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    import anomaly

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=REPO / "runs" / "demo", help="a train.py run (default: runs/demo)")
    p.add_argument("--percentile", type=float, default=None,
                   help="threshold percentile of validation code NLL (default: anomaly.DEFAULT_PERCENTILE)")
    p.add_argument("--seed", type=int, default=0, help="lesion placement and healing seed (default: 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of redrawn codes (default: 1)")
    p.add_argument("--split", choices=("test", "validate"), default="test",
                   help="slices to put lesions in: test (report) or validate (to choose settings; default: test)")
    p.add_argument("--rounds", type=int, default=anomaly.DEFAULT_ROUNDS,
                   help="report healing with 1 and with this many scoring / redrawing rounds "
                        f"(default: anomaly.DEFAULT_ROUNDS = {anomaly.DEFAULT_ROUNDS})")
    p.add_argument("--limit", type=int, default=None, help="use only the first N test slices (quick checks)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON of the figures (default: RUN/anomaly_bench/bench_anomaly.json)")
    p.add_argument("--figure", type=Path, default=REPO / "images" / "anomaly_examples.png",
                   help="figure of lesion slices and both maps (default: images/anomaly_examples.png)")
    args = p.parse_args(argv)

    import evaluation
    import predict
    import utils

    try:
        run = predict.load_run(args.run)
    except predict.PredictError as e:
        p.error(str(e))
    test = run.read_splits()[args.split]
    x = test.images.astype(np.float32) / 255.0
    positions = test.slice_indices.astype(np.int32)
    if args.limit:
        x, positions = x[:args.limit], positions[:args.limit]
    idx, lesioned, masks, kinds = make_lesions(x[..., 0], args.seed)
    clean, cond = x[idx], positions[idx] if run.conditioned else None
    heads = np.stack([evaluation.brain_interior_mask(img, margin=0) for img in clean[..., 0]])  # whole head
    percentile = anomaly.DEFAULT_PERCENTILE if args.percentile is None else args.percentile
    threshold = anomaly.run_threshold(run, percentile)
    print(f"{len(idx)} of {len(x)} {args.split} slices have room for a lesion; lesion pixels: "
          f"{100 * masks.sum() / heads.sum():.2f} % of head pixels; NLL threshold {threshold:.3f} nats "
          f"({percentile:g}th percentile of validation code NLL)")

    both = np.concatenate([lesioned, clean])
    n = len(idx)
    f = x.shape[1] // run.vqvae.grid_shape[0]
    lesion_codes = masks.reshape(n, masks.shape[1] // f, f, masks.shape[2] // f, f).mean(axis=(2, 4)) >= 0.25
    results, healings, timing, resampled = {}, {}, {}, {}
    for rounds in sorted({1, args.rounds}):
        name = f"prior-healed, {rounds} round{'s' if rounds > 1 else ''}"
        t0 = time.perf_counter()
        healings[name] = h = anomaly.heal(run.vqvae, run.prior, both, threshold, rounds=rounds,
                                          condition=None if cond is None else np.r_[cond, cond], seed=args.seed,
                                          temperature=args.temperature, progress=True)
        timing[name] = time.perf_counter() - t0
        results[name] = score(h.anomaly_map[:n], h.anomaly_map[n:], masks, heads, kinds)
        resampled[name] = {"lesion codes": float(h.resampled[:n][lesion_codes].mean()),
                           "other codes, lesioned slices": float(h.resampled[:n][~lesion_codes].mean()),
                           "clean slices": float(h.resampled[n:].mean())}
    residual = anomaly.residual_map(run.vqvae, both)
    results["VQ-VAE residual"] = score(residual[:n], residual[n:], masks, heads, kinds)
    print()
    for name, r in resampled.items():
        print(f"{name}: healing {2 * n} slices took {timing[name]:.1f} s; codes redrawn: "
              f"{100 * r['lesion codes']:.1f} % of lesion codes, {100 * r['other codes, lesioned slices']:.1f} % of "
              f"the others, {100 * r['clean slices']:.1f} % in clean slices")
    names = list(results)
    print(f"\n{'metric':<24}" + "".join(f" {m:>{max(14, len(m))}}" for m in names))
    for k in results[names[0]]:
        print(f"{k:<24}" + "".join(f" {results[m][k]:>{max(14, len(m))}.3f}" for m in names))

    out = args.out or run.path / "anomaly_bench" / "bench_anomaly.json"
    utils.save_json({"run": str(run.path), "split": args.split, "temperature": args.temperature, "seed": args.seed,
                     "percentile": percentile, "threshold_nats": threshold,
                     "num_lesion_slices": n, "resampled_fraction": resampled, "heal_seconds": timing,
                     "results": results}, out)
    healing = healings[names[-2]]   # the figure shows the last prior-healed variant
    # Figure: one slice of each lesion size, bright and dark, spread over the slices.
    picks = []
    for kind in [f"{b} {round(100 * r)}%" for b in ("bright", "dark") for r in RADII]:
        where = [k for k, kd in enumerate(kinds) if kd == kind]
        if where:
            picks.append(where[len(where) // 2])
    picks = picks[:6]
    plot_examples(lesioned[picks], healing.healed[picks], healing.anomaly_map[picks], residual[picks], masks[picks],
                  [f"{kinds[k]}, slice {positions[idx[k]]}" for k in picks], args.figure, label=names[-2])
    print(f"\nwrote {out} and {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
