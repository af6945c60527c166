"""How realism depends on the size of the test split: real unseen slices searched against it.

    python bench/bench_realism_reference.py --data data/oasis_demo --cases 4 8 12 17

Realism (``evaluation.score_samples``) is each sample's best SSIM against the test split. What real
slices reach is the reference: ``--num`` seeded validation slices (the same choice ``score_samples``
makes) are searched the same way against the first ``k`` test cases for each ``k`` of ``--cases``,
full images and central halves (interior realism). A test split too small for its slices to find
their match makes every generator, and real data too, look worse; this shows where that stops.
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "oasis_demo",
                        help="an OASIS-layout tree (keras_png_slices_{train,validate,test}/)")
    parser.add_argument("--image-size", type=int, default=128, help="side the slices are resized to")
    parser.add_argument("--num", type=int, default=64, help="validation slices searched (as predict.py evaluate)")
    parser.add_argument("--cases", type=int, nargs="+", default=[4, 8, 12, 17],
                        help="numbers of test cases (the first k, by case id) to search against")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choice of validation slices")
    args = parser.parse_args(argv)

    import dataset
    import evaluation
    from utils import quiet_tensorflow

    quiet_tensorflow()
    splits = dataset.read_oasis(args.data, image_size=args.image_size)
    val, test = splits["validate"], splits["test"]
    # the validation subset score_samples uses for its real-slice reference
    pick = np.random.default_rng([args.seed, 1]).choice(len(val), size=min(args.num, len(val)), replace=False)
    images = val.images[pick]
    cases = np.unique(test.case_ids)
    print(f"{args.data}: {len(pick)} validation slices against the first k of {len(cases)} test cases")
    print("| test cases | test slices | realism mean | share > 0.6 | interior realism mean |")
    print("| --- | --- | --- | --- | --- |")
    for k in args.cases:
        if k > len(cases):
            print(f"(skipping {k}: the test split has {len(cases)} cases)")
            continue
        keep = np.isin(test.case_ids, cases[:k])
        best, _ = evaluation.nearest_by_ssim(images, test.images[keep])
        inner, _ = evaluation.nearest_by_ssim(evaluation.center_crop(images), evaluation.center_crop(test.images[keep]))
        print(f"| {k} | {int(keep.sum())} | {best.mean():.3f} | {np.mean(best > 0.6):.0%} | {inner.mean():.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
