"""Which frequency bands a decoder gets right, and the least PSNR that lifting the rest would cost.

    python bench/bench_power_bands.py --runs runs/demo_nofinetune runs/demo

Each run's VQ-VAE reconstructs the real test slices; per band of ``evaluation.radial_power_spectrum``
(8 bands of 1/16 cycle per pixel up to Nyquist), ``evaluation.band_coherence`` gives the power ratio,
the correlation of the reconstructed band with the real one (1: drawn in place, 0: power in the wrong
place, such as noise drawn afresh), the band's error over its real power and its share of the squared
error. Then the floor under the cost of a target, every band's power ratio at least
``--target``: with the correlations the decoder has, the cheapest output of that power is its own band
scaled up (``evaluation.cheapest_power_error``); the bands below the target are lifted that way, the
rest kept, and the squared error that results is given as a PSNR change (of the total squared error;
the run's PSNR is the mean of per-slice PSNRs, so read it as about that much). A decoder can only beat
that floor by knowing more of a band (a higher correlation), never by drawing power alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def lift_cost_db(coherence: dict, target: float) -> float:
    """PSNR change (dB) of lifting every band whose power ratio is under ``target`` to it, the cheapest way
    for the decoder's correlations (:func:`evaluation.cheapest_power_error`): below 0 a cost; above 0
    where a band known in place was drawn too faint (a blur, which scaling up undoes)."""
    import evaluation

    error, share = coherence["error"], coherence["mse_share"]
    lift = coherence["power"] < target  # a band below the target differs from the real one, so its error is > 0
    if not lift.any():  # nothing to lift (identical images too, whose error shares are 0 / 0)
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):  # kept bands (error possibly 0) keep their share as it is
        scaled = share * evaluation.cheapest_power_error(coherence["correlation"], target) / error
    new_total = 1.0 - share.sum() + np.where(lift, scaled, share).sum()  # the total error was 1
    return float(-10.0 * np.log10(new_total))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, nargs="+", default=[REPO / "runs" / "demo"],
                   help="train.py runs (default: runs/demo)")
    p.add_argument("--target", type=float, default=0.8, help="the least power ratio asked of every band (default: 0.8)")
    args = p.parse_args(argv)
    if not 0 < args.target <= 1:
        p.error(f"--target must be in (0, 1], got {args.target}")

    import evaluation
    import predict

    for path in args.runs:
        try:
            run = predict.load_run(path, need_prior=False)
        except predict.PredictError as e:
            p.error(str(e))
        test = run.read_splits()["test"]
        x = test.float()
        _, recon = evaluation.reconstruct(run.vqvae, x)
        psnr = float(evaluation.psnr(x, recon).mean())
        ssim = float(evaluation.ssim(x, recon).mean())
        c = evaluation.band_coherence(x, recon)
        print(f"\n{path}: {len(x)} test slices, SSIM {ssim:.4f}, PSNR {psnr:.2f} dB")
        print("| band (cycles / px) | power ratio | correlation | error / real power | share of squared error |")
        print("| --- | --- | --- | --- | --- |")
        for b in range(len(c["power"])):
            print(f"| {c['edges'][b]:.4g}-{c['edges'][b + 1]:.4g} | {c['power'][b]:.2f} | {c['correlation'][b]:.2f} "
                  f"| {c['error'][b]:.2f} | {c['mse_share'][b]:.3f} |")
        print(f"least PSNR change to lift every band to a power ratio of {args.target:g} with these correlations: "
              f"{lift_cost_db(c, args.target):+.2f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
