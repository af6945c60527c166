"""Synthetic-lesion benchmark: anomaly maps against the VQ-VAE residual, lesion kind by lesion kind.

    python bench/bench_anomaly.py --run runs/demo [--split validate] [--limit 128]

Lesions (``anomaly.add_lesion`` / ``anomaly.add_lesion_volume``) come in every combination of
bright / dark, small / medium / large (2-4, 5-8, 9-12 px radius at 128 px), sharp / soft edge,
high / low contrast, centred in grey / white matter (placed by the data's tissue masks), in a
seeded order, so no single kind can be tuned to. Two settings:

* **single slices**: each slice of the split (the first ``--limit``) gets one lesion; the lesioned
  slices and the same slices without lesions are scored by the VQ-VAE residual (baseline),
  today's prior-healed map (``anomaly.heal``) and the averaged, region-limited healing
  (``anomaly.heal_average``: its mean ``|x - healed|`` in the redrawn region, and its chosen
  ``anomaly_map``: the healings' difference weighted by the squared code NLL plus twice the
  residual, over the reconstruction's edge strength, ``anomaly.combine_maps``; and that difference
  times the squared NLL alone, the map before the residual and edge terms);
* **whole cases** (the volume path): each whole case among those slices gets three lesions that
  span neighbouring slices (same centre, radius shrinking with the distance), and the lesioned and
  clean cases are scored by the residual, the single-slice map (``heal_average``) and the
  volume-aware map (``anomaly.heal_volume``: slices healed in order, each given the healed slice
  below; ``--volume-flags`` picks how its codes are flagged, ``--volume-weights`` what weights its
  map; ``--no-single`` skips the single-slice setting).

Each setting's overall figures come with 95 % bootstrap intervals (``--bootstrap`` draws,
``anomaly.bootstrap_detection``): single slices are drawn with their clean twins, whole cases with
their clean copies, and every map sees the same draws, so the printed ratio (chosen map over the
residual; volume-aware over single-slice map) and difference are paired.

Reported per map: pixel AUROC, AUPRC and best Dice (head pixels of all lesioned and clean
slices), slice AUROC (slices holding a lesion vs clean slices, each scored by ``anomaly.slice_scores``:
the mean of its map's top ``anomaly.SLICE_FRACTION`` of pixels, for every map alike; ``--slice-fractions``
adds rows of the chosen map scored by other fractions), and the same three per factor level
(bright, dark, small, ..., white). Settings are chosen with ``--split validate`` and reported on the
test split; seeds are fixed (``--seed``). Writes the figures as JSON (``--out``) and a figure of
lesion slices with the maps (``--figure``).
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

FACTORS = ("polarity", "size", "edge", "contrast", "tissue")
VOLUME_CENTRES = (0.25, 0.5, 0.75)   # lesion centres of a case, as fractions of its slices


def make_lesions(images, tissue, seed: int):
    """One lesion per slice with room for it. Returns (slice indices, lesioned (n, H, W, 1), masks, kinds)."""
    import anomaly

    kinds = anomaly.lesion_kinds(len(images), seed)
    keep, lesioned, masks, kept = [], [], [], []
    for i, (img, t, kind) in enumerate(zip(images, tissue, kinds)):
        out = anomaly.add_lesion(img, t, kind, np.random.default_rng([seed, i]))
        if out is None:
            continue
        keep.append(i)
        lesioned.append(out[0])
        masks.append(out[1])
        kept.append(kind)
    return np.array(keep), np.stack(lesioned)[..., None], np.stack(masks), kept


def make_volume_lesions(volumes, tissue, seed: int):
    """Lesions spanning slices, ``len(VOLUME_CENTRES)`` per case.

    Returns (lesioned (C, S, H, W), masks (C, S, H, W), kinds per slice (C, S) with None where no
    lesion; a slice holding two lesions keeps the first's kind).
    """
    import anomaly

    c, s = volumes.shape[:2]
    kinds = anomaly.lesion_kinds(c * len(VOLUME_CENTRES), seed + 1)
    out, masks = volumes.copy(), np.zeros(volumes.shape, bool)
    slice_kinds = np.full((c, s), None, dtype=object)
    for i in range(c):
        for j, frac in enumerate(VOLUME_CENTRES):
            kind, centre = kinds[i * len(VOLUME_CENTRES) + j], int(round(frac * (s - 1)))
            painted = anomaly.add_lesion_volume(out[i], tissue[i], kind, np.random.default_rng([seed, i, j]), centre)
            if painted is None:
                continue
            out[i], m = painted
            new = m & ~masks[i]
            masks[i] |= m
            for k in np.flatnonzero(new.any(axis=(1, 2))):
                slice_kinds[i, k] = slice_kinds[i, k] or kind
    return out, masks, slice_kinds


def _levels(kinds):
    """``("all", every lesion)`` and then ``(level, selection)`` for each factor level, in report order."""
    yield "all", np.ones(len(kinds), bool)
    for f in FACTORS:
        values = np.array([getattr(k, f) for k in kinds])
        for v in dict.fromkeys(values):
            yield v, values == v


def slice_aurocs(maps_lesion, maps_clean, kinds, fraction: float | None = None) -> dict:
    """Slice AUROC, lesion slices of each level (and all) against every clean slice, by
    ``anomaly.slice_scores`` with ``fraction`` (its default when None): ``{level: auroc}``."""
    import anomaly

    lesion = anomaly.slice_scores(maps_lesion, fraction)
    clean = anomaly.slice_scores(maps_clean, fraction)
    return {name: anomaly.roc_auc(np.r_[lesion[sel], clean], np.r_[np.ones(int(sel.sum()), bool),
                                                                   np.zeros(len(clean), bool)])
            for name, sel in _levels(kinds)}


def score(maps_lesion, maps_clean, masks, heads_lesion, heads_clean, kinds) -> dict:
    """Pixel metrics over head pixels of lesioned + clean slices, slice AUROC (:func:`slice_aurocs`),
    and per factor level the same three.

    Args:
        maps_lesion, masks, heads_lesion: ``(n, H, W)`` of the slices holding a lesion; kinds: ``n``
            ``LesionKind``; maps_clean, heads_clean: ``(m, H, W)`` of clean slices.
    """
    import anomaly

    slice_auroc = slice_aurocs(maps_lesion, maps_clean, kinds)
    clean_pixels = maps_clean[heads_clean]
    out = {}
    for name, sel in _levels(kinds):
        ml, mk, hl = maps_lesion[sel], masks[sel], heads_lesion[sel]
        # clean slices: the lesioned slices' own clean twins when paired, else all clean slices
        m = anomaly.detection_metrics(np.concatenate([ml[hl], clean_pixels]),
                                      np.concatenate([mk[hl], np.zeros(len(clean_pixels), bool)]))
        out[name] = {"pixel_auroc": m["auroc"], "pixel_auprc": m["auprc"], "best_dice": m["best_dice"],
                     "slice_auroc": slice_auroc[name], "lesions": int(len(ml))}
    return out


def bootstrap(maps: dict, masks, heads_lesion, heads_clean, groups_lesion, groups_clean, num: int, seed: int) -> dict:
    """Bootstrap draws of each map's pixel AUPRC and slice AUROC (``anomaly.bootstrap_detection``).

    Args:
        maps: name -> ``(L + C, H, W)``: the ``L`` slices holding a lesion, then ``C`` clean slices.
        masks, heads_lesion: ``(L, H, W)``; heads_clean: ``(C, H, W)``.
        groups_lesion ``(L,)``, groups_clean ``(C,)``: what is drawn together (a lesion slice and its
            clean twin; a lesioned case and its clean copy). Every map sees the same draws.
    Returns:
        name -> ``{"pixel_auprc": (num,), "slice_auroc": (num,)}``.
    """
    import anomaly

    n = len(masks)
    px_groups = np.r_[np.broadcast_to(groups_lesion[:, None, None], heads_lesion.shape)[heads_lesion],
                      np.broadcast_to(groups_clean[:, None, None], heads_clean.shape)[heads_clean]]
    px_labels = np.r_[masks[heads_lesion], np.zeros(int(heads_clean.sum()), bool)]
    slice_groups = np.r_[groups_lesion, groups_clean]
    slice_labels = np.r_[np.ones(n, bool), np.zeros(len(groups_clean), bool)]
    out = {}
    for name, m in maps.items():
        px = anomaly.bootstrap_detection(np.r_[m[:n][heads_lesion], m[n:][heads_clean]], px_labels, px_groups,
                                         num, seed)
        sl = anomaly.bootstrap_detection(anomaly.slice_scores(m), slice_labels, slice_groups, num, seed)
        out[name] = {"pixel_auprc": px["auprc"], "slice_auroc": sl["auroc"]}
    return out


def print_intervals(unit: str, draws: dict, pairs=()) -> dict:
    """Print each map's 95 % intervals, and for each ``(a, b)`` in ``pairs`` the interval of ``a``
    over ``b`` (AUPRC ratio) and ``a`` minus ``b`` (slice AUROC) under the same draws. Returns them as JSON."""
    import anomaly

    out = {}
    print(f"95 % bootstrap intervals over {unit}:")
    for name, d in draws.items():
        out[name] = {k: anomaly.interval(v) for k, v in d.items()}
        print(f"  {name:<28} pixel AUPRC {out[name]['pixel_auprc'][0]:.3f}-{out[name]['pixel_auprc'][1]:.3f}, "
              f"slice AUROC {out[name]['slice_auroc'][0]:.3f}-{out[name]['slice_auroc'][1]:.3f}")
    for a, b in pairs:
        ratio = anomaly.interval(draws[a]["pixel_auprc"] / draws[b]["pixel_auprc"])
        diff = anomaly.interval(draws[a]["slice_auroc"] - draws[b]["slice_auroc"])
        out[f"{a} vs {b}"] = {"pixel_auprc_ratio": ratio, "slice_auroc_difference": diff}
        print(f"  {a} against {b}: pixel AUPRC ratio {ratio[0]:.2f}-{ratio[1]:.2f}, "
              f"slice AUROC difference {diff[0]:+.3f} to {diff[1]:+.3f}")
    return out


def print_table(title: str, results: dict) -> None:
    names = list(results)
    print(f"\n{title}")
    print(f"{'kind':<10}{'n':>5}" + "".join(f" {n[:22]:>22}" for n in names) + "   (pixel AUROC / AUPRC / slice AUROC)")
    for kind in results[names[0]]:
        cells = [results[n][kind] for n in names]
        print(f"{kind:<10}{cells[0]['lesions']:>5}" + "".join(
            f" {c['pixel_auroc']:>6.3f} {c['pixel_auprc']:>6.3f} {c['slice_auroc']:>6.3f}" for c in cells))


def plot_examples(x, maps: dict, masks, titles, path: Path) -> None:
    """Columns: lesion slices; rows: input, then each map (same colour scale); ground truth outlined."""
    from matplotlib.figure import Figure

    n = len(x)
    rows = [("lesion slice", x, "gray", 1.0)] + [
        (name, m, "hot", max(float(np.percentile(m, 99.9)), 1e-3)) for name, m in maps.items()]
    fig = Figure(figsize=(1.9 * n + 0.6, 1.9 * len(rows)))
    axes = np.asarray(fig.subplots(len(rows), n, squeeze=False))
    for r, (label, imgs, cmap, top) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(np.asarray(imgs[c]).squeeze(), cmap=cmap, vmin=0, vmax=top, interpolation="nearest")
            ax.contour(masks[c], levels=[0.5], colors="cyan", linewidths=0.7)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=6)
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.suptitle("synthetic lesions (cyan: ground truth) and anomaly maps", fontsize=9)
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
                   help=f"scoring / redrawing rounds of anomaly.heal (default: {anomaly.DEFAULT_ROUNDS})")
    p.add_argument("--average-rounds", type=int, default=anomaly.DEFAULT_AVERAGE_ROUNDS,
                   help="scoring / redrawing rounds of heal_average and heal_volume "
                        f"(default: {anomaly.DEFAULT_AVERAGE_ROUNDS})")
    p.add_argument("--samples", type=int, default=anomaly.DEFAULT_SAMPLES,
                   help=f"healings averaged per slice (default: {anomaly.DEFAULT_SAMPLES})")
    p.add_argument("--dilate", type=int, default=anomaly.DEFAULT_DILATE,
                   help=f"codes the flagged region grows by (default: {anomaly.DEFAULT_DILATE})")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N slices of the split (quick checks; whole cases among them "
                        "make the volume part)")
    p.add_argument("--no-volume", action="store_true", help="skip the whole-case (volume) part")
    p.add_argument("--volume-flags", choices=anomaly.VOLUME_FLAGS, nargs="+", default=["propagated"],
                   help="how the volume-aware map flags codes (anomaly.heal_volume's flag): one volume-aware map "
                        "per value given (default: propagated)")
    p.add_argument("--volume-weights", choices=anomaly.VOLUME_WEIGHTS, nargs="+", default=["max"],
                   help="what weights the volume-aware map (anomaly.heal_volume's weight): max, the higher of the "
                        "single-slice NLL and the NLL given the real slice below; flag, the flagging NLL; one "
                        "volume-aware map per flag and weight given (default: max)")
    p.add_argument("--no-single", action="store_true",
                   help="skip the single-slice part (to compare volume-aware maps on whole cases alone)")
    p.add_argument("--residual-weights", type=float, nargs="+", default=None, metavar="W",
                   help="also score the chosen map with each of these residual weights (how "
                        f"anomaly.RESIDUAL_WEIGHT = {anomaly.RESIDUAL_WEIGHT:g} was chosen, with --split validate)")
    p.add_argument("--slice-fractions", type=float, nargs="+", default=None, metavar="F",
                   help="also score the chosen map's slices by the mean of each of these top fractions of its "
                        f"pixels (how anomaly.SLICE_FRACTION = {anomaly.SLICE_FRACTION:g} is chosen, with --split "
                        "validate); each in (0, 1]")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap draws for the 95 %% intervals of the overall figures (lesion slices drawn with "
                        "their clean twins, whole cases with their clean copies; 0: none; default: 1000)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON of the figures (default: RUN/anomaly_bench/bench_anomaly_SPLIT.json)")
    p.add_argument("--figure", type=Path, default=None,
                   help="figure of lesion slices and the maps (default: images/anomaly_examples.png on test)")
    args = p.parse_args(argv)
    if args.no_single and args.no_volume:
        p.error("--no-single with --no-volume leaves nothing to measure; drop one of them")
    if args.no_single and (args.residual_weights or args.slice_fractions):
        p.error("--residual-weights and --slice-fractions score the single-slice map; drop --no-single")
    if args.bootstrap < 0:
        p.error(f"--bootstrap {args.bootstrap}: the number of bootstrap draws is 0 (no intervals) or more")
    bad = [f for f in args.slice_fractions or () if not 0 < f <= 1]
    if bad:
        p.error(f"--slice-fractions {bad[0]:g}: a fraction of the map's pixels, in (0, 1]")

    import dataset
    import evaluation
    import predict
    import utils

    try:
        run = predict.load_run(args.run)
    except predict.PredictError as e:
        p.error(str(e))
    split = run.read_splits(masks=True)[args.split]
    if split.masks is None:
        p.error(f"{run.config['data']['root']}: the benchmark places lesions by tissue mask and this data has none")
    if args.limit:
        split = split.subset(np.arange(min(args.limit, len(split))))
    x = split.float()
    positions = split.slice_indices.astype(np.int32)
    percentile = anomaly.DEFAULT_PERCENTILE if args.percentile is None else args.percentile
    threshold = anomaly.run_threshold(run, percentile)
    heads_of = lambda imgs: np.stack([evaluation.brain_interior_mask(i, margin=0) for i in imgs])  # noqa: E731
    common = dict(samples=args.samples, dilate=args.dilate, rounds=args.average_rounds, seed=args.seed,
                  temperature=args.temperature)
    report = {"run": str(run.path), "split": args.split, "seed": args.seed, "percentile": percentile,
              "threshold_nats": threshold, **common}

    # ---- single slices
    maps, timing = {}, {}
    if not args.no_single:
        idx, lesioned, masks, kinds = make_lesions(x[..., 0], split.masks, args.seed)
        clean = x[idx]
        cond = np.r_[positions[idx], positions[idx]] if run.conditioned else None
        n = len(idx)
        heads = heads_of(clean[..., 0])
        print(f"single slices: {n} of {len(x)} {args.split} slices hold a lesion "
              f"({100 * masks.sum() / heads.sum():.2f} % of head pixels); NLL threshold {threshold:.3f} nats "
              f"({percentile:g}th percentile of validation code NLL)")
        both = np.concatenate([lesioned, clean])
        t0 = time.perf_counter()
        maps["VQ-VAE residual"] = anomaly.residual_map(run.vqvae, both)
        t0 = time.perf_counter()
        maps["prior-healed (before)"] = anomaly.heal(run.vqvae, run.prior, both, threshold, condition=cond,
                                                     seed=args.seed, rounds=args.rounds,
                                                     temperature=args.temperature).anomaly_map
        timing["prior-healed (before)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        avg = anomaly.heal_average(run.vqvae, run.prior, both, threshold, condition=cond, **common)
        timing["averaged healing"] = time.perf_counter() - t0
        maps["averaged healing"] = avg.healed_map
        difference = anomaly.healing_differences(both, avg.healed, avg.codes.shape[1:]).mean(axis=0)
        maps["healing x NLL^2 (before)"] = anomaly.combine_maps(difference, avg.nll)
        recon = evaluation.decode_codes(run.vqvae, avg.codes) if args.residual_weights else None
        for weight in args.residual_weights or ():
            maps[f"chosen, residual weight {weight:g}"] = anomaly.combine_maps(
                difference, avg.nll, threshold=threshold, residual=avg.residual, recon=recon,
                residual_weight=weight)
        maps["chosen"] = avg.anomaly_map
        single = {name: score(m[:n], m[n:], masks, heads, heads, kinds) for name, m in maps.items()}
        for fraction in args.slice_fractions or ():      # the chosen map's pixel figures, another slice score
            by_level = slice_aurocs(maps["chosen"][:n], maps["chosen"][n:], kinds, fraction)
            single[f"top {fraction:g} slice score"] = {k: {**v, "slice_auroc": by_level[k]}
                                                       for k, v in single["chosen"].items()}
        print_table(f"single slices ({args.split}, {n} lesions)", single)
        report["single"] = {"num_lesion_slices": n, "seconds": timing, "results": single}
        if args.bootstrap and n < 2:
            print("no intervals over single slices: one lesion slice gives nothing to draw from")
        elif args.bootstrap:
            pair = np.arange(n)                                                 # a lesion slice and its clean twin
            draws = bootstrap({k: maps[k] for k in ("VQ-VAE residual", "chosen")}, masks, heads, heads,
                              pair, pair, args.bootstrap, args.seed)
            report["single"]["intervals"] = print_intervals(
                f"the {n} lesion slices (each with its clean twin)", draws, [("chosen", "VQ-VAE residual")])

    # ---- whole cases
    by_case = {c: i for c, i in dataset.subjects(split).items()}
    s_full = max((len(i) for i in by_case.values()), default=0)
    whole = [c for c, i in by_case.items() if len(i) == s_full and np.array_equal(positions[i], np.arange(s_full))]
    previous = getattr(run.prior.config, "previous_slice", False)
    if not args.no_volume and not (whole and previous):
        why = ("its prior does not see the slice below" if not previous
               else f"the {args.split} split holds no whole case")
        if args.no_single:
            p.error(f"--no-single: {why}, so there is nothing to measure; drop --no-single")
        print(f"\nno whole-case part: {why}")
    if not args.no_volume and whole and previous:
        order = np.stack([by_case[c] for c in whole])                      # (C, S)
        vols, tissue = x[order][..., 0], split.masks[order]
        les_v, mask_v, kinds_v = make_volume_lesions(vols, tissue, args.seed)
        threshold_prev = (anomaly.run_threshold(run, percentile, previous=True)
                          if "previous" in args.volume_flags else None)
        c, s = vols.shape[:2]
        print(f"\nwhole cases: {c} cases of {s} slices, {len(whole) * len(VOLUME_CENTRES)} lesions spanning slices"
              + ("" if threshold_prev is None else f"; NLL threshold given the slice below {threshold_prev:.3f} nats"))
        vol_both = np.concatenate([les_v, vols])[..., None]                # (2C, S, H, W, 1)
        flat = vol_both.reshape(2 * c * s, *vol_both.shape[2:])
        vcond = np.tile(positions[order[0]], 2 * c) if run.conditioned else None
        vmaps = {"VQ-VAE residual": anomaly.residual_map(run.vqvae, flat)}
        t0 = time.perf_counter()
        vs = anomaly.heal_average(run.vqvae, run.prior, flat, threshold, condition=vcond, **common)
        timing["volume: single-slice"] = time.perf_counter() - t0
        vmaps["single-slice map"] = vs.anomaly_map
        for flag in args.volume_flags:
            for weight in args.volume_weights:
                parts = ([f"flag {flag}"] if len(args.volume_flags) > 1 else []) + (
                    [f"weight {weight}"] if len(args.volume_weights) > 1 else [])
                name = "volume-aware map" + (f" ({', '.join(parts)})" if parts else "")
                t0 = time.perf_counter()
                vv = anomaly.heal_volume(run.vqvae, run.prior, vol_both, threshold, threshold_prev,
                                         condition=positions[order[0]] if run.conditioned else None, progress=True,
                                         flag=flag, weight=weight, **common)
                timing[f"volume: {name}"] = time.perf_counter() - t0
                vmaps[name] = vv.anomaly_map
        has = mask_v.reshape(c * s, *mask_v.shape[2:]).any(axis=(1, 2))
        vmask = mask_v.reshape(c * s, *mask_v.shape[2:])[has]
        vkinds = list(kinds_v.reshape(-1)[has])
        heads_v = heads_of(flat[:c * s, ..., 0])
        clean_heads = heads_of(flat[c * s:, ..., 0])
        volume = {name: score(m[:c * s][has], m[c * s:], vmask, heads_v[has], clean_heads, vkinds)
                  for name, m in vmaps.items()}
        # pixel metrics over every slice of the lesioned cases too (lesion-free slices' false positives count)
        for name, m in vmaps.items():
            allm = anomaly.detection_metrics(np.r_[m[:c * s][heads_v], m[c * s:][clean_heads]],
                                             np.r_[mask_v.reshape(c * s, *mask_v.shape[2:])[heads_v],
                                                   np.zeros(int(clean_heads.sum()), bool)])
            volume[name]["all"]["pixel_auprc_every_slice"] = allm["auprc"]
        print_table(f"whole cases ({args.split}, {int(has.sum())} lesion slices)", volume)
        print("pixel AUPRC over every slice of the cases: " + ", ".join(
            f"{k} {v['all']['pixel_auprc_every_slice']:.3f}" for k, v in volume.items()))
        report["volume"] = {"cases": [int(w) for w in whole], "threshold_previous_nats": threshold_prev,
                            "num_lesion_slices": int(has.sum()), "results": volume}
        if args.bootstrap and c < 2:
            print("no intervals over whole cases: one case gives nothing to draw from")
        elif args.bootstrap:
            case = np.repeat(np.arange(c), s)                                 # a lesioned case and its clean copy
            lesion_maps = {k: np.concatenate([m[:c * s][has], m[c * s:]]) for k, m in vmaps.items()}
            draws = bootstrap(lesion_maps, vmask, heads_v[has], clean_heads, case[has], case,
                              args.bootstrap, args.seed)
            report["volume"]["intervals"] = print_intervals(
                f"the {c} cases (each with its clean copy)", draws,
                [(k, "single-slice map") for k in vmaps if k.startswith("volume-aware")])
    print("\nseconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timing.items()))
    report["seconds"] = timing
    out = args.out or run.path / "anomaly_bench" / f"bench_anomaly_{args.split}.json"
    utils.save_json(report, out)
    figure = args.figure or (REPO / "images" / "anomaly_examples.png" if args.split == "test" else None)
    if figure is not None and not args.no_single:
        picks = []
        for size in ("small", "medium", "large"):
            for pol in ("bright", "dark"):
                where = [k for k, kd in enumerate(kinds) if kd.size == size and kd.polarity == pol]
                if where:
                    picks.append(where[len(where) // 2])
        plot_examples(lesioned[picks], {k: v[:n][picks] for k, v in maps.items()}, masks[picks],
                      [f"{kinds[k]}, slice {positions[idx[k]]}" for k in picks], figure)
    print(f"\nwrote {out}" + (f" and {figure}" if figure else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
