"""What the two-sample test can see: real test slices against known degradations of real test slices.

    python bench/bench_two_sample.py --data data/oasis_demo --blur 0.5 1 2 --noise 2 4 --downup 2 4

Each degradation takes the place of the reconstructions in ``evaluation.two_sample_scores``: paired by
case (the test cases dealt into two halves, each case's real slices and their degraded copies in the
same half), so each figure reads as the reconstruction figure does: 0.5, the classifier cannot tell
them apart; 1.0, it always can; with its 95 % interval over cases. ``--blur S``: a Gaussian of S px; ``--noise S``: Gaussian noise of S
grey levels inside the head (the background stays exactly 0, as in OASIS); ``--downup F``: down-sampled
F times (Lanczos) and up again (bicubic), a decoder perfect at the scale of an F x F block and blank
below it.

``--runs RUN ...`` adds a row per trained run: its VQ-VAE's reconstructions of the test slices, paired
the same way (the reconstruction row of ``predict.py evaluate`` alone, without its other rows), e.g.
a run before and after ``train.py --stage decoder``. With ``--runs`` and no degradation flags only the
runs are measured.
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
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "oasis_demo",
                        help="an OASIS-layout tree (keras_png_slices_{validate,test}/ at least; default: data/oasis_demo)")
    parser.add_argument("--image-size", type=int, default=128, help="resize slices to this side, as training does (default: 128)")
    parser.add_argument("--blur", type=float, nargs="*", default=None,
                        help="Gaussian blurs, in px (default: 0.5 1 2 unless --runs is given)")
    parser.add_argument("--noise", type=float, nargs="*", default=None,
                        help="added noise, in grey levels (default: 2 4 unless --runs is given)")
    parser.add_argument("--downup", type=int, nargs="*", default=None,
                        help="down- and up-sampling factors (default: 2 4 unless --runs is given)")
    parser.add_argument("--views", nargs="+", default=["full", "patch"],
                        help="views of the test (evaluation.TWO_SAMPLE_VIEWS; default: full patch)")
    parser.add_argument("--runs", type=Path, nargs="*", default=[],
                        help="train.py runs whose reconstructions of the test slices are rows too (default: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the halves and the classifiers (default: 0)")
    args = parser.parse_args(argv)
    given = (args.blur, args.noise, args.downup)
    defaults = ([], [], []) if args.runs and all(g is None for g in given) else ([0.5, 1.0, 2.0], [2.0, 4.0], [2, 4])
    args.blur, args.noise, args.downup = (d if g is None else g for g, d in zip(given, defaults))

    import utils

    utils.quiet_tensorflow()
    import dataset
    import evaluation

    splits = dataset.read_oasis(args.data, image_size=args.image_size)
    test = splits["test"].float()
    jobs = [*(("blur", a) for a in args.blur), *(("noise", a) for a in args.noise),
            *(("downup", a) for a in args.downup), *(("run", r) for r in args.runs)]
    print(f"{len(test)} test slices at {args.image_size}x{args.image_size}; views {', '.join(args.views)}")
    print("| degradation of real test slices | " + " | ".join(args.views) + " | seconds |")
    print("| --- |" + " --- |" * (len(args.views) + 1))
    for kind, amount in jobs:
        start = time.perf_counter()
        if kind == "run":
            import predict

            try:
                run = predict.load_run(amount, need_prior=False)
            except predict.PredictError as e:
                print(f"bench_two_sample.py: --runs: {e}", file=sys.stderr)
                return 2
            if run.config["data"]["image_size"] != args.image_size:
                print(f"bench_two_sample.py: --runs: {amount} was trained at {run.config['data']['image_size']} px; "
                      f"pass --image-size {run.config['data']['image_size']}", file=sys.stderr)
                return 2
            changed = evaluation.reconstruct(run.vqvae, test)[1]
        else:
            changed = degrade(test, kind, amount, args.seed)
        scores = evaluation.two_sample_scores(splits, reconstructions=changed,
                                              seed=args.seed, views=args.views, floor=False, power=False,
                                              progress=False)
        row = " | ".join("{:.2f} ({:.2f}-{:.2f})".format(scores[f"two_sample_reconstructions_{v}"],
                                                       *scores[f"two_sample_reconstructions_{v}_interval"])
                         for v in args.views)
        label = f"reconstructions of {amount}" if kind == "run" else f"{kind} {amount:g}"
        print(f"| {label} | {row} | {time.perf_counter() - start:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
