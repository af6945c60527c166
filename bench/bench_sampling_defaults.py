"""Sampling settings (temperature, top-p) judged by anatomy: the measurements behind the sampling defaults.

    python bench/bench_sampling_defaults.py --run runs/demo
    python bench/bench_sampling_defaults.py --run runs/demo --settings t1 t0.8 --subjects 8

For each setting (``t<T>``: temperature T; ``p<P>``: top-p P at temperature 1; ``t<T>p<P>``: both)
this runs ``predict.py evaluate --two-sample-num 0`` (64 samples at test slices' positions, seed 0;
with ``--subjects N``, ``predict.py evaluate --subjects N --two-sample-num 0`` as well) into
``--out/<setting>/`` and prints one table: the anatomy judge's figures (pieces of white, grey and
CSF per slice, the segmenter's confidence, tissue-area difference by position, ventricle symmetry,
Frechet distance in the segmenter's features), interior realism and sharpness as ratios to real,
and diversity (mean MS-SSIM between samples; real test slices beside it), with the real validate
slices (the floor), the real test split (how far two real splits differ: CSF pieces do by about five)
and the validate reconstructions (the decoder's ceiling) as rows of their own,
and for each setting the share of the gap between temperature 1 and the floor that it closes.

Lower temperatures and top-p cut the tail of each code's distribution: fewer stray codes (the dark
spots that break white matter into pieces), at the price of diversity. Every setting draws the same
seed, so the rows differ by the setting alone.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

# (column, metrics key with {} for the group, direction of better: -1 lower, +1 higher, 0 towards the floor)
ANATOMY = (("white pieces", "anatomy_components_white_{}", 0), ("grey pieces", "anatomy_components_grey_{}", 0),
           ("CSF pieces", "anatomy_components_csf_{}", 0), ("confidence", "anatomy_confidence_{}", 0),
           ("area diff", "anatomy_area_difference_{}", 0), ("ventricle sym", "anatomy_ventricle_symmetry_{}", 0),
           ("Frechet", "anatomy_frechet_{}_vs_test", 0))


def parse_setting(text: str) -> dict:
    """``t0.8`` -> temperature 0.8; ``p0.9`` -> top-p 0.9; ``t0.9p0.95`` -> both."""
    m = re.fullmatch(r"(?:t([0-9.]+))?(?:p([0-9.]+))?", text)
    if not m or not (m.group(1) or m.group(2)):
        raise argparse.ArgumentTypeError(f"setting {text!r}: write t<temperature>, p<top-p> or t<T>p<P>, e.g. t0.8")
    t, p = float(m.group(1) or 1.0), (float(m.group(2)) if m.group(2) else None)
    if t <= 0 or (p is not None and not 0 < p <= 1):
        raise argparse.ArgumentTypeError(f"setting {text!r}: temperature must be > 0 and top-p in (0, 1]")
    return {"temperature": t, "top_p": p}


def gap_closed(value: float, start: float, floor: float) -> float:
    """Share of the gap ``start -> floor`` that ``value`` closes (1: at the floor, 0: no better than start)."""
    return float("nan") if start == floor else (start - value) / (start - floor)


def rows_for(metrics: dict, group: str) -> list[float]:
    return [metrics.get(key.format(group), float("nan")) for _, key, _ in ANATOMY]


def print_table(results: dict[str, dict], kind: str, group: str) -> None:
    names = list(results)
    first = results[names[0]]
    floor = rows_for(first, "real_validate")
    cols = [c for c, _, _ in ANATOMY]
    extra = ["interior realism", "sharpness", "diversity"] if kind == "samples" else []
    print(f"\n{kind}: anatomy judge (floor = real validate slices; 'closed' = share of the gap from "
          f"{names[0]} to the floor)")
    print("| row | " + " | ".join(cols + extra) + " |")
    print("|" + " --- |" * (1 + len(cols) + len(extra)))
    print("| real validate (floor) | " + " | ".join(f"{v:.3f}" for v in floor)
          + (f" | 1.00 | 1.00 | {first.get('diversity_ms_ssim_real_test', float('nan')):.3f}" if extra else "") + " |")
    real_test = rows_for(first, "real_test")  # the other real split: how far two real splits differ
    if not all(np.isnan(real_test)):
        print("| real test (all slices; area and Frechet are measured against it) | "
              + " | ".join("" if np.isnan(v) else f"{v:.3f}" for v in real_test) + (" | | | |" if extra else " |"))
    if kind == "samples":
        print("| reconstructions | " + " | ".join(f"{v:.3f}" for v in rows_for(first, "reconstructions"))
              + f" | | {first.get('sharpness_reconstructions', float('nan')) / first['sharpness_real_test']:.2f} | |")
    start = rows_for(first, group)
    for name in names:
        m = results[name]
        vals = rows_for(m, group)
        cells = [f"{v:.3f}" + ("" if name == names[0] else f" ({100 * gap_closed(v, s, f):.0f} %)")
                 for v, s, f in zip(vals, start, floor)]
        if extra:
            cells += [f"{m['interior_realism_ratio']:.2f}", f"{m['sharpness_ratio']:.2f}",
                      f"{m['diversity_ms_ssim_samples']:.3f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=REPO / "runs" / "demo", help="a train.py run (default: runs/demo)")
    p.add_argument("--settings", nargs="+", default=["t1", "t0.9", "t0.8", "t0.7", "p0.9"],
                   help="sampling settings, the first the reference: t<T>, p<P> or t<T>p<P> "
                        "(default: t1 t0.9 t0.8 t0.7 p0.9)")
    p.add_argument("--num", type=int, default=64, help="samples per setting (default: 64, as predict.py evaluate)")
    p.add_argument("--subjects", type=int, default=0, metavar="N",
                   help="also draw N whole subjects per setting and judge them (0: single slices only; default 0)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for each setting's evaluation (default: RUN/evaluation_sampling)")
    args = p.parse_args(argv)
    try:
        settings = {s: parse_setting(s) for s in args.settings}
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.num < 2:
        p.error(f"--num must be at least 2, got {args.num}")

    import predict

    try:
        run = predict.load_run(args.run)
    except predict.PredictError as e:
        print(f"bench_sampling_defaults.py: {e}", file=sys.stderr)
        return 2
    if predict.load_segmenter(run) is None:
        print(f"bench_sampling_defaults.py: {args.run} has no segmenter.keras: train it with "
              f"python train.py --out {args.run} --stage segmenter", file=sys.stderr)
        return 2
    out = args.out or args.run / "evaluation_sampling"
    singles, subjects = {}, {}
    for name, kw in settings.items():
        print(f"== {name}: temperature {kw['temperature']}, top-p {kw['top_p']}", file=sys.stderr)
        singles[name] = predict.evaluate(run, args.num, kw["temperature"], 0, out_dir=out / name,
                                         top_p=kw["top_p"], two_sample_num=0)
        if args.subjects:
            if kw["top_p"] is not None:
                print(f"   (subjects: {name} has top-p, which predict.py subject does not take; skipped)",
                      file=sys.stderr)
                continue
            subjects[name] = predict.evaluate_subjects(run, args.subjects, kw["temperature"], 0,
                                                       out_dir=out / name / "subjects", two_sample=False)
    print(f"\n{args.num} samples per setting, seed 0, run {args.run}")
    print_table(singles, "samples", "samples")
    if subjects:
        print_table(subjects, "subjects", "subjects")
        print("\n| setting | adjacent SSIM / real | WM volume z | between-subject MS-SSIM (real) |")
        print("| --- | --- | --- | --- |")
        for name, m in subjects.items():
            print(f"| {name} | {m['adjacent_ssim_ratio']:.3f} | {m.get('anatomy_volume_white_z_generated', np.nan):.2f} "
                  f"| {m['between_subject_ms_ssim_generated']:.3f} ({m['between_subject_ms_ssim_real']:.3f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
