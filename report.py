"""The end of a training run: test-split metrics for ``metrics.json`` and the run directory's figures.

``train.py`` calls these on the chief once the stages are trained: :func:`evaluate_vqvae` (SSIM, PSNR,
code usage, the reconstructions' power ratio per frequency band; ``reconstructions.png``, ``code_grids.png``, ``codebook_usage.png``), :func:`evaluate_prior`
(NLL of the validate and test codes), :func:`draw_samples` (``samples.png``) and
:func:`plot_training_curves` (``training_curves.png`` from the ``history_*.csv`` files). The metrics
themselves are computed in :mod:`evaluation`. Nothing runs on import.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def evaluate_vqvae(vqvae, splits, run_dir: Path, num_embeddings: int, batch_size: int = 32) -> dict:
    """Test-split reconstruction SSIM / PSNR and code usage (``evaluation``), and their figures. The
    two-sample test of the reconstructions, with the power to mean something, is ``predict.py evaluate``'s
    (its classifiers take longer than the demo's training budget leaves)."""
    import evaluation
    import utils

    split = splits["test"]
    x = split.float()
    codes, recon = evaluation.reconstruct(vqvae, x, batch_size)  # encoded once; codes reused for usage
    scores = evaluation.reconstruction_metrics(x, recon)
    ssim = scores["ssim"]
    usage = evaluation.code_usage(codes, num_embeddings)
    # Figures: a spread of test slices beside their reconstructions, the code grids, code usage.
    pick = np.linspace(0, len(x) - 1, min(8, len(x))).round().astype(int)
    utils.plot_image_rows(
        [("original", x[pick]), ("reconstruction", recon[pick])], run_dir / "reconstructions.png",
        titles=[[split.names[i].replace(".nii.png", "") for i in pick],
                [f"SSIM {ssim[i]:.3f}" for i in pick]])
    utils.plot_image_rows([("slice", x[pick]), ("codes", codes[pick])], run_dir / "code_grids.png",
                          cmaps=["gray", "nipy_spectral"])
    utils.plot_codebook_usage(usage, run_dir / "codebook_usage.png", title="test-split codes")
    out = {"test_ssim": scores["ssim_mean"], "test_psnr": scores["psnr_mean"],
           "codebook_perplexity": usage["perplexity"], "active_codes": usage["active_codes"]}
    # detail kept: the reconstructions' power over the real test slices', per frequency band
    power, _ = evaluation.power_spectrum_ratios(x, {"reconstructions": recon})
    out.update(power)
    return out


def evaluate_prior(prior, codes, conditioned: bool, batch_size: int, top_prior=None) -> dict:
    """The prior's NLL of the validate and test codes, in bits per code and bits per slice.

    A prior with ``previous_slice`` is scored twice: without the previous slice (its "no previous
    slice", comparable with a single-slice prior) and ``_given_previous`` (each slice given the one
    below it in its case, ``codes[split]["previous"]`` from ``dataset.previous_slice_index``).

    Two levels (``top_prior`` given, ``codes[split]["top"]`` the top level's codes): the fine prior is
    scored given the top codes, and ``prior_<split>_top_nll_bits_per_slice`` (``_given_previous``) is
    the top prior's own NLL of them; the two add up to the two-level model's bits per slice.
    """
    import evaluation

    out = {}
    for split in ("validate", "test"):
        condition = codes[split]["slices"].astype(np.int32) if conditioned else None
        name = "val" if split == "validate" else split
        levels = [("", prior, codes[split]["codes"], codes[split].get("top"))]
        if top_prior is not None:
            levels.append(("_top", top_prior, codes[split]["top"], None))
        for level, model, grids, top in levels:
            nll = evaluation.prior_nll(model, grids, condition, batch_size, top=top)
            out[f"prior_{name}{level}_nll_bits"] = nll["bits_per_code"]
            out[f"prior_{name}{level}_nll_bits_per_slice"] = nll["bits_per_slice"]
            if model.config.previous_slice and "previous" in codes[split]:
                previous = evaluation.previous_codes(grids, codes[split]["previous"], model.no_previous)
                nll = evaluation.prior_nll(model, grids, condition, batch_size, previous, top=top)
                out[f"prior_{name}{level}_nll_bits_given_previous"] = nll["bits_per_code"]
                out[f"prior_{name}{level}_nll_bits_per_slice_given_previous"] = nll["bits_per_slice"]
    return out


def draw_samples(vqvae, prior, cfg: dict, codes, run_dir: Path, num: int, top_prior=None) -> None:
    """``samples.png``: ``num`` samples at slice positions spread over the training split's, at the
    default temperature (two levels: ``top_prior`` draws the top codes first)."""
    import evaluation
    import sampler
    import utils

    condition = None
    if cfg["prior"]["num_conditions"] > 0:
        seen = np.unique(codes["train"]["slices"])
        condition = seen[np.linspace(0, len(seen) - 1, num).round().astype(int)]
    t0 = time.time()
    if top_prior is None:
        sampled = sampler.sample_codes(prior, num, seed=cfg["seed"], condition=condition,
                                       temperature=sampler.DEFAULT_TEMPERATURE)
    else:
        sampled, _ = sampler.sample_two_level(top_prior, prior, num, seed=cfg["seed"], condition=condition,
                                              temperature=sampler.DEFAULT_TEMPERATURE)
    images = evaluation.decode_codes(vqvae, sampled)
    titles = [f"slice {c}" for c in condition] if condition is not None else None
    utils.save_image_grid(images, run_dir / "samples.png", titles=titles,
                          suptitle=f"{num} samples from the prior, temperature {sampler.DEFAULT_TEMPERATURE} "
                                   f"({time.time() - t0:.1f} s)")


def plot_training_curves(run_dir: Path, stages) -> None:
    """``training_curves.png`` from the ``history_<stage>.csv`` files the stages left in ``run_dir``."""
    import utils

    histories = {s: utils.read_history_csv(run_dir / f"history_{s}.csv") for s in stages}
    histories = {s: h for s, h in histories.items() if h}
    if histories:
        utils.plot_training_curves(histories, run_dir / "training_curves.png")
