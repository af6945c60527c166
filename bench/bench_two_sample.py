"""What the two-sample test can see: real test slices against known degradations of real test slices.

    python bench/bench_two_sample.py --data data/oasis_demo --blur 0.5 1 2 --noise 2 4 --downup 2 4

Each degradation takes the place of the reconstructions in ``evaluation.two_sample_scores``: paired by
case (the test cases dealt into two halves, each case's real slices and their degraded copies in the
same half), so each figure reads as the reconstruction figure does: 0.5, the classifier cannot tell
them apart; 1.0, it always can; with its 95 % interval over cases. ``--blur S``: a Gaussian of S px; ``--noise S``: Gaussian noise of S
grey levels inside the head (the background stays exactly 0, as in OASIS); ``--downup F``: down-sampled
F times (Lanczos) and up again (bicubic), a decoder perfect at the scale of an F x F block and blank
below it.
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


def degrade(images: np.ndarray, kind: str, amount: float, seed: int = 0) -> np.ndarray:
    """``(N, H, W, 1)`` float images in [0, 1] degraded by ``kind`` (blur / noise / downup)."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    if kind == "blur":
        return gaussian_filter(images, sigma=(0, amount, amount, 0))
    if kind == "noise":
        noise = np.random.default_rng(seed).standard_normal(images.shape).astype(np.float32) * (amount / 255)
        return np.clip(np.where(images > 0, images + noise, 0.0), 0, 1)
    if kind == "downup":
        n, f = images.shape[1], int(amount)
        small = [Image.fromarray(x[..., 0], "F").resize((n // f, n // f), Image.Resampling.LANCZOS) for x in images]
        return np.stack([np.asarray(s.resize((n, n), Image.Resampling.BICUBIC)) for s in small])[..., None]
    raise ValueError(f"unknown degradation {kind!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "oasis_demo",
                        help="an OASIS-layout tree (keras_png_slices_{validate,test}/ at least)")
    parser.add_argument("--image-size", type=int, default=128, help="resize slices to this side, as training does")
    parser.add_argument("--blur", type=float, nargs="*", default=[0.5, 1.0, 2.0], help="Gaussian blurs, in px")
    parser.add_argument("--noise", type=float, nargs="*", default=[2.0, 4.0], help="added noise, in grey levels")
    parser.add_argument("--downup", type=int, nargs="*", default=[2, 4], help="down- and up-sampling factors")
    parser.add_argument("--views", nargs="+", default=["full", "patch"],
                        help="views of the test (evaluation.TWO_SAMPLE_VIEWS)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the halves and the classifiers")
    args = parser.parse_args(argv)

    import utils

    utils.quiet_tensorflow()
    import dataset
    import evaluation

    splits = dataset.read_oasis(args.data, image_size=args.image_size)
    test = splits["test"].float()
    jobs = [*(("blur", a) for a in args.blur), *(("noise", a) for a in args.noise),
            *(("downup", a) for a in args.downup)]
    print(f"{len(test)} test slices at {args.image_size}x{args.image_size}; views {', '.join(args.views)}")
    print("| degradation of real test slices | " + " | ".join(args.views) + " | seconds |")
    print("| --- |" + " --- |" * (len(args.views) + 1))
    for kind, amount in jobs:
        start = time.perf_counter()
        scores = evaluation.two_sample_scores(splits, reconstructions=degrade(test, kind, amount, args.seed),
                                              seed=args.seed, views=args.views, floor=False, power=False,
                                              progress=False)
        row = " | ".join("{:.2f} ({:.2f}-{:.2f})".format(scores[f"two_sample_reconstructions_{v}"],
                                                       *scores[f"two_sample_reconstructions_{v}_interval"])
                         for v in args.views)
        print(f"| {kind} {amount:g} | {row} | {time.perf_counter() - start:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
