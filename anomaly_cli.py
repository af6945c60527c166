"""The ``anomaly`` and ``complete`` commands of ``predict.py``: their flags and what they run.

The maps and healing themselves live in :mod:`anomaly`; this module reads a folder of slices
through :func:`load_slices`, picks the maps (:func:`_anomaly_maps_choice`) and writes the
panels, maps and scores. ``predict`` re-exports every name, so ``predict.whole_cases`` works as before.
Nothing runs on import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trained_run import PredictError, Run, load_run, load_slices, one_level

ANOMALY_MAPS = ("auto", "volume", "single", "healed")


def add_anomaly_parsers(sub, common) -> None:
    """The ``anomaly`` and ``complete`` commands (handlers: :func:`_anomaly_command`, :func:`_complete_command`)."""
    import anomaly  # light: NumPy only until a function runs

    def slices_flags(sp):
        sp.add_argument("--images", type=Path, required=True,
                        help="folder of PNG slices; a slice-conditioned prior reads each slice's position from "
                             "its name (case_<id>_slice_<k>.nii.png)")
        sp.add_argument("--slice", type=int, default=None,
                        help="slice position for every image, for a conditioned prior (default: from file names)")
        sp.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature of the redrawn codes (default: 1)")

    a = sub.add_parser("anomaly", help="anomaly maps: resample the codes the prior finds unlikely",
                       description="For each slice: the per-code NLL under the prior; codes above --threshold "
                                   "(and their neighbours) are redrawn in raster order given the kept codes, "
                                   "--samples times, and decoded (the healings); the anomaly map is the healings' "
                                   "mean difference from the input weighted by the squared code NLL, plus twice "
                                   "the VQ-VAE residual, over the reconstruction's edge strength (--maps picks "
                                   "single slices, whole cases healed in order, or the plain |input - healed| of "
                                   "one healing). Writes a PNG panel per slice, nll_maps.npy, anomaly_maps.npy, "
                                   "healed.npy, spread_maps.npy and scores.json / scores.csv (slice score: the "
                                   f"mean of the map's top {100 * anomaly.SLICE_FRACTION:g} % of pixels; the map's "
                                   "mean with --maps healed).")
    common(a)
    slices_flags(a)
    a.add_argument("--threshold", type=float, default=None,
                   help="NLL threshold in nats: codes above it are resampled (default: the --percentile-th "
                        "percentile of the run's validation code NLL, cached in the run directory)")
    a.add_argument("--percentile", type=float, default=None,
                   help="percentile (0-100) of healthy validation code NLL used as the default threshold "
                        f"(default: {anomaly.DEFAULT_PERCENTILE:g})")
    a.add_argument("--rounds", type=int, default=None,
                   help="scoring / redrawing rounds: after the first, kept codes that are above the threshold "
                        f"given the healed codes are redrawn too; 1 redraws exactly the codes above it "
                        f"(default: {anomaly.DEFAULT_AVERAGE_ROUNDS}; {anomaly.DEFAULT_ROUNDS} with --maps healed)")
    a.add_argument("--seed", type=int, default=0, help="sampling seed of the redrawn codes (default: 0)")
    a.add_argument("--maps", choices=ANOMALY_MAPS, default="auto",
                   help="volume: heal each case's slices in order, each given the healed slice below, and weight "
                        "the map by the higher of each code's NLL as a single slice and given the real slice below "
                        "(needs whole cases, case_<id>_slice_<k>.nii.png from slice 0, and a prior with "
                        "previous_slice); single: each slice alone, weighted by its single-slice NLL; both average "
                        "--samples healings of the flagged region, weight the difference by the code NLL, add the "
                        "residual and divide by the reconstruction's edges (anomaly.heal_volume / heal_average, "
                        "anomaly.combine_maps); healed: the plain |input - healed| of one healing (anomaly.heal); "
                        "auto: volume where possible, else single (default: auto; on whole cases the volume-aware "
                        "maps score higher in bench/bench_anomaly.py; the command says which it used and why)")
    a.add_argument("--samples", type=int, default=anomaly.DEFAULT_SAMPLES,
                   help=f"healings averaged per slice with --maps volume / single (default: {anomaly.DEFAULT_SAMPLES})")
    a.add_argument("--dilate", type=int, default=anomaly.DEFAULT_DILATE,
                   help=f"codes the flagged region grows by before it is redrawn (default: {anomaly.DEFAULT_DILATE})")
    c = sub.add_parser("complete", help="complete slices from their top code rows",
                       description="Keep the first --keep-rows rows of each slice's code grid and draw the other "
                                   "rows from the prior, once per seed; writes a PNG panel per slice and codes.npy.")
    common(c)
    slices_flags(c)
    c.add_argument("--keep-rows", type=int, required=True, help="code rows to keep, 1 to (grid rows - 1)")
    c.add_argument("--seeds", type=int, default=3, help="completions per slice, seeds --seed .. --seed+N-1 (default: 3)")
    c.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")


def whole_cases(names) -> np.ndarray | None:
    """The files as whole cases: int ``(C, S)`` indices into ``names``, slices 0..S-1 of each case in
    order, when every file is ``case_<id>_slice_<k>.nii.png`` and every case holds the same slices
    0..S-1 (S >= 2); else None."""
    import dataset

    parsed = [dataset.parse_slice_name(n) for n in names]
    cases = {}
    for i, (c, k) in enumerate(parsed):
        if c < 0 or k < 0:
            return None
        cases.setdefault(c, {})[k] = i
    sizes = {len(v) for v in cases.values()}
    if len(sizes) != 1 or min(sizes) < 2:
        return None
    s = sizes.pop()
    if any(sorted(v) != list(range(s)) for v in cases.values()):
        return None
    return np.array([[cases[c][k] for k in range(s)] for c in sorted(cases)])


def _anomaly_maps_choice(run: Run, names, choice: str):
    """``(path, cases (C, S) or None, why)``: which maps ``predict.py anomaly`` makes."""
    previous = getattr(getattr(run.prior, "config", None), "previous_slice", False)
    if choice in ("single", "healed"):
        return choice, None, "--maps " + choice
    cases = whole_cases(names)
    why = ("the prior does not see the previous slice" if not previous else
           "the folder does not hold whole cases (case_<id>_slice_<k>.nii.png, slices 0..S-1 of every case)"
           if cases is None else f"{len(cases)} whole case(s) of {cases.shape[1]} slices")
    if choice == "volume" and (cases is None or not previous):
        raise PredictError(f"--maps volume: {why}; use --maps single")
    return ("volume" if cases is not None and previous else "single"), cases, why


def _anomaly_command(args) -> None:
    import csv

    from tqdm import tqdm

    import anomaly
    import utils

    run = one_level(load_run(args.run), args.command)
    x, names, condition = load_slices(run, args.images, args.slice)
    path, cases, why = _anomaly_maps_choice(run, names, args.maps)
    threshold, source = args.threshold, "--threshold"
    percentile = anomaly.DEFAULT_PERCENTILE if args.percentile is None else args.percentile
    if threshold is None:
        try:
            threshold = anomaly.run_threshold(run, percentile)
        except FileNotFoundError as e:
            raise PredictError(str(e)) from None
        source = f"{percentile:g}th percentile of the validation code NLL"
    rounds = args.rounds or (anomaly.DEFAULT_ROUNDS if path == "healed" else anomaly.DEFAULT_AVERAGE_ROUNDS)
    label = {"volume": "volume-aware maps (slices healed in order, each given the healed slice below; weighted by "
                       "the higher of the single-slice NLL and the NLL given the real slice below)",
             "single": "single-slice maps (each slice healed alone)",
             "healed": "plain healed maps (|input - healed|, one healing)"}[path]
    print(f"anomaly: {label}: {why}")
    print(f"anomaly: {len(x)} slices, NLL threshold {threshold:.3f} nats ({source})")
    if path == "healed":
        result = anomaly.heal(run.vqvae, run.prior, x, threshold, condition=condition, seed=args.seed,
                              temperature=args.temperature, rounds=rounds, batch_size=args.batch_size,
                              progress=True)
        resampled, healed = result.resampled, result.healed
    else:
        common = dict(samples=args.samples, dilate=args.dilate, rounds=rounds, seed=args.seed,
                      temperature=args.temperature, batch_size=args.batch_size)
        if path == "volume":
            order = cases.reshape(-1)
            vol = x[cases]                                                     # (C, S, H, W, 1)
            result = anomaly.heal_volume(run.vqvae, run.prior, vol, threshold,
                                         condition=None if condition is None else condition[cases[0]],
                                         progress=True, **common)
            result = result.take(np.argsort(order))                            # case-major -> file order
        else:
            result = anomaly.heal_average(run.vqvae, run.prior, x, threshold, condition=condition, **common)
        resampled, healed = result.region, result.healed.mean(axis=0)
    out = Path(args.out or run.path / "anomaly")
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "nll_maps.npy", result.nll)
    np.save(out / "anomaly_maps.npy", result.anomaly_map)
    np.save(out / "healed.npy", healed[..., 0])
    if path != "healed":
        np.save(out / "spread_maps.npy", result.spread)
    rows = []
    for k, name in enumerate(tqdm(names, desc="panels", unit="slice")):
        stem = name.removesuffix(".png").removesuffix(".nii")
        anomaly.plot_healing(x[k], result.nll[k], healed[k], result.anomaly_map[k], threshold,
                             title=f"{stem}: score {result.scores[k]:.4f}", path=out / f"{stem}_anomaly.png")
        rows.append({"file": name, "slice": None if condition is None else int(condition[k]),
                     "score": float(result.scores[k]), "resampled_fraction": float(resampled[k].mean()),
                     "mean_nll_nats": float(result.nll[k].mean())})
    score = ("mean of the anomaly map" if path == "healed"
             else f"mean of the anomaly map's top {100 * anomaly.SLICE_FRACTION:g} % of pixels")
    utils.save_json({"maps": path, "maps_reason": why, "threshold_nats": threshold, "threshold_source": source,
                     "seed": args.seed, "temperature": args.temperature, "rounds": rounds,
                     **({} if path == "healed" else {"samples": args.samples, "dilate": args.dilate}),
                     "score": score, "slices": rows},
                    out / "scores.json")
    with open(out / "scores.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(x)} panels, nll_maps.npy, anomaly_maps.npy, healed.npy"
          f"{'' if path == 'healed' else ', spread_maps.npy'}, scores.json and scores.csv to {out} ({path} maps)")


def _complete_command(args) -> None:
    import anomaly
    run = one_level(load_run(args.run), args.command)
    h = int(run.config["prior"]["grid_shape"][0])
    if not 1 <= args.keep_rows < h:
        raise PredictError(f"--keep-rows {args.keep_rows} is outside the code grid: this run's grid has "
                                   f"{h} rows; pass 1 to {h - 1}")
    x, names, condition = load_slices(run, args.images, args.slice)
    seeds = list(range(args.seed, args.seed + args.seeds))
    _, codes, images = anomaly.complete(run.vqvae, run.prior, x, args.keep_rows, condition=condition, seeds=seeds,
                                        temperature=args.temperature, batch_size=args.batch_size, progress=True)
    out = Path(args.out or run.path / "completions")
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "codes.npy", codes)
    for k, name in enumerate(names):
        stem = name.removesuffix(".png").removesuffix(".nii")
        anomaly.plot_completion(x[k], images[:, k], args.keep_rows, h,
                                title=f"{stem}: first {args.keep_rows} of {h} code rows kept, seeds {seeds[0]}-{seeds[-1]}",
                                path=out / f"{stem}_completion.png")
    print(f"wrote {len(x)} completion panels ({len(seeds)} seeds each) and codes.npy (seeds, slices, h, w) to {out}")
