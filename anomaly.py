"""Anomaly maps and slice completion from a trained VQ-VAE + PixelCNN prior.

Anomaly maps follow Pinaya et al. 2022 ("Unsupervised brain imaging 3D anomaly detection and
segmentation with transformers", Medical Image Analysis), in 2D:

1. encode the slice to its code grid and score every code by its negative log-likelihood under the
   prior, given the codes before it in raster order (and the slice position when the prior is
   conditioned): :func:`nll_map`;
2. codes whose NLL is above a threshold are *resampled* from the prior in raster order, given every
   kept code (``sampler.sample_codes(..., codes=, keep=)``), and the healed grid is decoded:
   :func:`heal`;
3. the anomaly map is ``|input - healed|``, smoothed with a small Gaussian and restricted to the
   resampled codes' footprint in the image (each code covers an ``f x f`` block, ``f`` the VQ-VAE's
   down-sampling factor), so VQ-VAE reconstruction error where the prior found nothing wrong never
   shows up in the map; the slice score is the map's mean.

That is the plain map. The chosen maps heal the flagged region (grown by a code) several times and
average (:func:`heal_average` for single slices; :func:`heal_volume` for whole cases, slice by slice
from the bottom, each given the healed slice below and flagged by :func:`propagated_nll`), then
weight the healings' difference by the squared code NLL, add the residual and divide by the
reconstruction's edges (:func:`combine_maps`); their slice score is the mean of the map's top
pixels (:func:`slice_scores`). :func:`bootstrap_detection` gives the detection metrics' intervals.

The threshold is a high percentile of healthy per-code NLL: :func:`healthy_threshold` on any set of
healthy slices, :func:`run_threshold` on a run's validation split (cached in the run directory).
The baseline the benchmark compares against is :func:`residual_map`, the plain VQ-VAE residual
``|input - decode(encode(input))|`` smoothed the same way.

:func:`complete` keeps the first ``K`` code rows of each slice and draws the rest from the prior.

The synthetic lesions of the benchmark live in :mod:`lesions` and the detection metrics in
:mod:`detection`; this module re-exports both, so ``anomaly.add_lesion`` and ``anomaly.roc_auc`` work.

All functions take the models (``vqvae``, ``prior``), not a run, so a notebook can call them on
anything; images are float32 ``(N, H, W, 1)`` in ``[0, 1]``, codes int ``(N, h, w)``, NLL in nats.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

import evaluation
from detection import (average_precision, best_dice, bootstrap_detection, detection_metrics,
                       interval, roc_auc)
from lesions import (LESION_CONTRASTS, LESION_EDGES, LESION_POLARITIES, LESION_SIZES,
                     LESION_TISSUES, LesionKind, add_lesion, add_lesion_volume, add_synthetic_lesion,
                     lesion_kinds)

__all__ = ["DEFAULT_PERCENTILE", "DEFAULT_ROUNDS", "Healing", "nll_map", "healthy_threshold", "run_threshold",
           "heal", "residual_map", "complete", "upsample_codes", "smooth", "add_synthetic_lesion", "LesionKind",
           "lesion_kinds", "add_lesion", "add_lesion_volume", "AveragedHealing", "heal_average", "heal_volume",
           "combine_maps", "edge_strength", "healing_differences", "RESIDUAL_WEIGHT", "slice_scores", "dilate_codes",
           "SLICE_FRACTION", "DEFAULT_SAMPLES", "DEFAULT_DILATE", "detection_metrics", "roc_auc", "average_precision",
           "best_dice", "plot_healing", "plot_completion", "bootstrap_detection", "interval", "propagated_nll",
           "volume_map_nll", "VOLUME_FLAGS", "VOLUME_WEIGHTS", "LESION_SIZES", "LESION_POLARITIES", "LESION_EDGES",
           "LESION_CONTRASTS", "LESION_TISSUES"]

# Codes above this percentile of healthy validation NLL are resampled. On healthy data about
# 100 - 97 = 3 % of codes are then resampled: enough to catch anomalies of a few codes, few enough
# that the healed slice stays the input almost everywhere.
DEFAULT_PERCENTILE = 97.0
# Scoring / redrawing rounds of `heal`. Chosen with synthetic lesions in the validation slices
# (bench/bench_anomaly.py --split validate): 3 rounds against 1 raised pixel AUPRC from 0.025 to
# 0.088 and best Dice from 0.08 to 0.21 on a demo run.
DEFAULT_ROUNDS = 3


# ----------------------------------------------------------------------------------------------
# Likelihood and threshold
# ----------------------------------------------------------------------------------------------

def _condition(condition, n: int):
    """None, one int or ``(n,)`` ints -> None or int32 ``(n,)``."""
    if condition is None:
        return None
    cond = np.asarray(condition)
    if cond.ndim == 0:
        cond = np.full((n,), int(cond))
    if cond.shape != (n,):
        raise ValueError(f"condition must be one int or {n} ints (one per slice), got shape {cond.shape}")
    return cond.astype(np.int32)


def nll_map(vqvae, prior, images, condition=None, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Encode slices and score each code by its NLL under the prior.

    Args:
        images: float32 ``(N, H, W, 1)`` in [0, 1] (or uint8).
        condition: slice positions ``(N,)`` (or one int) for a conditioned prior, else None.
    Returns:
        ``(codes, nll)``: int32 ``(N, h, w)`` and float32 ``(N, h, w)`` nats,
        ``nll[n, i, j] = -log p(codes[n, i, j] | codes before (i, j), condition[n])``
        (``evaluation.code_nll``, the one implementation of this quantity).
    """
    codes = evaluation.encode_images(vqvae, images, batch_size)
    cond = _condition(condition, len(codes))
    return codes, evaluation.code_nll(prior, codes, cond, batch_size)


def healthy_threshold(vqvae, prior, images, condition=None, percentile: float = DEFAULT_PERCENTILE,
                      batch_size: int = 64) -> float:
    """The ``percentile``-th percentile (0-100) of per-code NLL (nats) over healthy slices."""
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must lie in (0, 100), got {percentile}")
    _, nll = nll_map(vqvae, prior, images, condition, batch_size)
    return float(np.percentile(nll, percentile))


def run_threshold(run, percentile: float = DEFAULT_PERCENTILE, cache: bool = True, previous: bool = False) -> float:
    """The default threshold of a trained run: a high percentile of its validation slices' code NLL.

    The validation codes come from the run's ``codes.npz`` (written by ``train.py``) when it belongs
    to this VQ-VAE, else the validation split is read from the run's data folder and encoded. The
    result is cached in ``anomaly_threshold.json`` in the run directory, keyed by the percentile and
    the hashes of ``vqvae.keras`` and ``pixelcnn.keras``, so retraining either invalidates it.

    Args:
        run: a ``predict.Run`` (``path``, ``vqvae``, ``prior``, ``conditioned``, ``read_splits()``).
        previous: the threshold of the volume path (:func:`heal_volume`): the NLL of each validation
            slice given the slice below it in its case (a case's first slice given "no previous
            slice"); needs a prior with ``previous_slice`` and the validation split's files (cached
            in ``anomaly_threshold_previous.json``).
    Raises:
        FileNotFoundError: neither the cached codes nor the validation data can be found.
    """
    import utils

    path = Path(run.path)
    key = {"percentile": float(percentile), "vqvae_sha256": evaluation.file_sha256(path / "vqvae.keras"),
           "prior_sha256": evaluation.file_sha256(path / "pixelcnn.keras")}
    cache_path = path / ("anomaly_threshold_previous.json" if previous else "anomaly_threshold.json")
    if cache and cache_path.exists():
        saved = utils.load_json(cache_path)
        if all(saved.get(k) == v for k, v in key.items()):
            return float(saved["threshold_nats"])
    codes = slices = prev = None
    cached = None if previous else evaluation.cached_codes(path, key["vqvae_sha256"], ["validate"])
    if cached is not None:
        codes, slices = cached["validate"]["codes"], cached["validate"]["slices"]
    else:
        import dataset

        try:
            val = run.read_splits()["validate"]
        except dataset.DatasetError as e:
            raise FileNotFoundError(f"cannot choose a threshold: the run's validation data is not readable "
                                    f"({e}); pass --threshold") from None
        codes = evaluation.encode_images(run.vqvae, val.images)
        slices = val.slice_indices
        if previous:
            prev = evaluation.previous_codes(codes, dataset.previous_slice_index(val), run.prior.num_embeddings)
    cond = np.asarray(slices, dtype=np.int32) if run.conditioned else None
    nll = evaluation.code_nll(run.prior, codes, cond, previous=prev)
    threshold = float(np.percentile(nll, percentile))
    if cache:
        utils.save_json({**key, "threshold_nats": threshold, "num_codes": int(nll.size),
                         "source": "validation split" + (", given the slice below" if previous else "")}, cache_path)
    return threshold


# ----------------------------------------------------------------------------------------------
# Healing and anomaly maps
# ----------------------------------------------------------------------------------------------

def upsample_codes(mask, image_shape) -> np.ndarray:
    """A per-code map ``(N, h, w)`` -> per-pixel ``(N, H, W)``: each code fills its ``H/h x W/w`` block."""
    mask = np.asarray(mask)
    fy, fx = image_shape[0] // mask.shape[1], image_shape[1] // mask.shape[2]
    if (fy * mask.shape[1], fx * mask.shape[2]) != tuple(image_shape[:2]):
        raise ValueError(f"image {tuple(image_shape[:2])} is not a whole multiple of the grid {mask.shape[1:]}")
    return np.repeat(np.repeat(mask, fy, axis=1), fx, axis=2)


def smooth(maps, sigma: float) -> np.ndarray:
    """Gaussian smoothing of each ``(H, W)`` map in ``(N, H, W)`` (``scipy.ndimage``; sigma in pixels)."""
    from scipy import ndimage

    maps = np.asarray(maps, dtype=np.float32)
    if sigma <= 0:
        return maps.copy()
    return ndimage.gaussian_filter(maps, sigma=(0, sigma, sigma), mode="nearest").astype(np.float32)


def _default_sigma(images, grid_shape) -> float:
    """Half a code's width in pixels: removes pixel noise, keeps structures of a code's size."""
    return 0.5 * images.shape[1] / grid_shape[0]


@dataclass
class Healing:
    """What :func:`heal` computed for ``N`` slices (grid ``(h, w)``, images ``(H, W)``).

    Attributes:
        codes: int32 ``(N, h, w)``, the input slices' codes.
        nll: float32 ``(N, h, w)``, each input code's NLL under the prior (nats).
        resampled: bool ``(N, h, w)``, the codes the prior redrew: ``nll > threshold`` after one
            round, plus the codes above it given the healed context after later rounds.
        healed_codes: int32 ``(N, h, w)``; equal to ``codes`` wherever ``resampled`` is False.
        healed: float32 ``(N, H, W, 1)``, the decoded healed codes.
        anomaly_map: float32 ``(N, H, W)``, smoothed ``|input - healed|`` inside the resampled
            codes' footprint, exactly 0 outside it.
        scores: float32 ``(N,)``, the slice-level score: the mean of the anomaly map.
        threshold: the NLL threshold used (nats).
    """

    codes: np.ndarray
    nll: np.ndarray
    resampled: np.ndarray
    healed_codes: np.ndarray
    healed: np.ndarray
    anomaly_map: np.ndarray
    scores: np.ndarray
    threshold: float


def heal(vqvae, prior, images, threshold: float, condition=None, seed: int = 0, temperature: float = 1.0,
         sigma: float | None = None, rounds: int = DEFAULT_ROUNDS, batch_size: int | None = None,
         progress: bool = False) -> Healing:
    """Resample the codes the prior finds unlikely, decode, and map where the slice changed.

    With ``rounds > 1`` the healed grid is scored again: a kept code whose NLL, given the redrawn
    codes before it, is now above the threshold joins the redrawn set, and the whole set is drawn
    again given the kept codes; this stops early when no code joins. The NLL of a code is taken
    given the codes before it in raster order, so inside a lesion only its first codes look
    unlikely (later ones follow a lesion-like context); rescoring after the first codes are healed
    exposes the rest (a cheap stand-in for the several orderings of Pinaya et al. 2022).

    Args:
        images: float32 ``(N, H, W, 1)`` in [0, 1].
        threshold: NLL in nats; codes with ``nll > threshold`` are resampled (see
            :func:`run_threshold` / :func:`healthy_threshold` for a default). ``inf`` keeps every code.
        condition: slice positions ``(N,)`` (or one int) for a conditioned prior, else None.
        seed: sampling seed; the same seed gives the same healed codes (for any ``batch_size``).
        temperature: sampling temperature of the resampled codes.
        sigma: Gaussian smoothing of the residual, in pixels (default: half a code's width).
        rounds: scoring / redrawing rounds (1: redraw exactly the codes with ``nll > threshold``;
            default ``DEFAULT_ROUNDS``).
        batch_size: slices sampled at once (None: all); results do not depend on it.
        progress: show the sampler's progress bar.
    Returns:
        a :class:`Healing`.
    """
    from sampler import sample_codes

    if int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    x = evaluation._as_float_images(images)
    codes, nll = nll_map(vqvae, prior, x, condition)
    cond = _condition(condition, len(codes))
    resampled, healed_codes, scores = np.zeros(codes.shape, bool), codes, nll
    for r in range(int(rounds)):
        new = (scores > threshold) & ~resampled
        if r > 0 and not new.any():
            break
        resampled |= new
        round_seed = seed if r == 0 else int(np.random.default_rng([seed, r]).integers(2 ** 31))
        healed_codes = sample_codes(prior, len(codes), grid_shape=codes.shape[1:], temperature=temperature,
                                    seed=round_seed, condition=cond, batch_size=batch_size, progress=progress,
                                    codes=codes, keep=~resampled)
        if r + 1 < rounds:
            scores = evaluation.code_nll(prior, healed_codes, cond)
    healed = evaluation.decode_codes(vqvae, healed_codes)
    sigma = _default_sigma(x, codes.shape[1:]) if sigma is None else sigma
    region = upsample_codes(resampled, x.shape[1:3])
    amap = smooth(np.abs(x - healed)[..., 0], sigma) * region
    return Healing(codes, nll, resampled, healed_codes.astype(np.int32), healed, amap.astype(np.float32),
                   amap.mean(axis=(1, 2)).astype(np.float32), float(threshold))


def residual_map(vqvae, images, sigma: float | None = None) -> np.ndarray:
    """The baseline anomaly map: smoothed ``|input - decode(encode(input))|``, float32 ``(N, H, W)``."""
    x = evaluation._as_float_images(images)
    codes, recon = evaluation.reconstruct(vqvae, x)
    sigma = _default_sigma(x, codes.shape[1:]) if sigma is None else sigma
    return smooth(np.abs(x - recon)[..., 0], sigma)


# Averaged, region-limited healing and the volume path. Chosen on validate lesions
# (bench/bench_anomaly.py --split validate; docs/anomaly.md "How the map was chosen").
DEFAULT_SAMPLES = 4   # healings averaged per slice
DEFAULT_DILATE = 1    # codes the flagged region grows by before it is redrawn
DEFAULT_AVERAGE_ROUNDS = 2  # scoring / redrawing rounds of heal_average and heal_volume


@dataclass
class AveragedHealing:
    """What :func:`heal_average` / :func:`heal_volume` computed for ``N`` slices, ``S`` healings each.

    Attributes:
        codes: int32 ``(N, h, w)``, the input slices' codes.
        nll: float32 ``(N, h, w)``, the NLL the codes were flagged by (nats): as single slices; on the
            volume path the flag's NLL (:func:`heal_volume`; with ``flag="previous"`` averaged over the
            ``S`` healings' slices below).
        map_nll: float32 ``(N, h, w)``, the NLL that weights the anomaly map (:func:`combine_maps`):
            ``nll`` for single slices; on the volume path by default the higher of the single-slice
            NLL and the NLL given the real slice below (:func:`volume_map_nll`).
        region: bool ``(N, h, w)``, the redrawn codes: the flagged codes grown by ``dilate`` codes.
        healed_codes: int32 ``(S, N, h, w)``; equal to ``codes`` outside ``region``.
        healed: float32 ``(S, N, H, W, 1)``, the decoded healings.
        residual: float32 ``(N, H, W)``, the smoothed VQ-VAE residual ``|x - decode(encode(x))|``.
        healed_map: float32 ``(N, H, W)``, the mean over healings of smoothed ``|x - healed|`` inside
            the region's pixels, 0 outside.
        spread: float32 ``(N, H, W)``, the healings' standard deviation of that difference (a low
            spread beside a high map: the healings agree the pixel is abnormal).
        anomaly_map: float32 ``(N, H, W)``, the chosen map (:func:`combine_maps` of the healings'
            mean difference, inside and outside the region, the NLL, the residual and the edges).
        scores: float32 ``(N,)``, slice scores (:func:`slice_scores` of the anomaly map).
        threshold: the NLL threshold(s) used (nats).
    """

    codes: np.ndarray
    nll: np.ndarray
    map_nll: np.ndarray
    region: np.ndarray
    healed_codes: np.ndarray
    healed: np.ndarray
    residual: np.ndarray
    healed_map: np.ndarray
    spread: np.ndarray
    anomaly_map: np.ndarray
    scores: np.ndarray
    threshold: float | tuple

    _PER_HEALING = ("healed_codes", "healed")   # fields with the healings' axis before the slices'

    def take(self, index) -> AveragedHealing:
        """The same result for the slices ``index`` (int array), in that order: every per-slice field
        indexed along its slice axis (axis 1 of ``healed_codes`` and ``healed``), ``threshold`` kept."""
        index = np.asarray(index)
        picked = {f.name: getattr(self, f.name)[:, index] if f.name in self._PER_HEALING
                  else getattr(self, f.name)[index] for f in fields(self) if f.name != "threshold"}
        return replace(self, **picked)


def dilate_codes(mask, steps: int) -> np.ndarray:
    """Grow a per-code mask ``(N, h, w)`` by ``steps`` codes (3 x 3 neighbourhood per step)."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    if steps <= 0 or not mask.any():
        return mask.copy()
    return ndimage.binary_dilation(mask, structure=np.ones((1, 3, 3), bool), iterations=int(steps))


def _heal_codes(prior, codes, cond, previous, threshold: float, samples: int, dilate: int, rounds: int,
                seed: int, temperature: float, batch_size, score_previous: bool = True, nll=None):
    """Redraw the flagged region of ``codes`` ``samples`` times.

    Args:
        codes: int ``(N, h, w)``; cond: None or int32 ``(N,)``.
        previous: None (no slice below) or int ``(samples, N, h, w)``: each healing's slice below.
        score_previous: flag codes by their NLL given ``previous`` (True) or given no slice below
            (False; the redraws are given ``previous`` either way).
        nll: float ``(N, h, w)``, the NLL to flag the codes by in the first round, computed by the
            caller (then ``score_previous`` only decides how later rounds rescore the healed grids).
    Returns:
        ``(nll (N, h, w) averaged over the healings' slices below, region (N, h, w), healed (S, N, h, w))``.
    """
    from sampler import sample_codes

    n = len(codes)
    tile = np.tile(codes, (samples, 1, 1))
    cond_t = None if cond is None else np.tile(cond, samples)
    prev_t = None if previous is None else np.asarray(previous).reshape(samples * n, *codes.shape[1:])
    score_prev = prev_t if score_previous else None

    if nll is not None:
        nll = np.asarray(nll, np.float32)
    elif score_prev is None:  # no slice below: the same NLL for every healing
        nll = evaluation.code_nll(prior, codes, cond)
    else:
        nll = evaluation.code_nll(prior, tile, cond_t, previous=prev_t).reshape(samples, n, *codes.shape[1:]).mean(0)
    region = dilate_codes(nll > threshold, dilate)
    healed = tile
    for r in range(int(rounds)):
        round_seed = seed if r == 0 else int(np.random.default_rng([seed, r]).integers(2 ** 31))
        keep = np.tile(~region, (samples, 1, 1))
        healed = sample_codes(prior, samples * n, grid_shape=codes.shape[1:], temperature=temperature,
                              seed=round_seed, condition=cond_t, batch_size=batch_size, codes=tile, keep=keep,
                              previous=prev_t)
        if r + 1 == rounds:
            break
        # A code's NLL is taken given the codes before it, so inside a lesion only its first codes
        # look unlikely until they are healed: rescore the healed grids, grow the region, redraw.
        scores = evaluation.code_nll(prior, healed, cond_t, previous=score_prev).reshape(samples, n, *codes.shape[1:])
        new = dilate_codes(scores.mean(axis=0) > threshold, dilate) & ~region
        if not new.any():
            break
        region |= new
    return nll.astype(np.float32), region, healed.reshape(samples, n, *codes.shape[1:]).astype(np.int32)


# The residual's weight in the chosen map (docs/anomaly.md "How the map was chosen"): chosen on
# validate lesions by the worst lesion kind's pixel AUPRC ratio to the residual, flat from 2 to 3
# (1.68-1.71); 2 keeps more of the overall AUPRC and slice AUROC than 2.5.
RESIDUAL_WEIGHT = 2.0
# Slice scores are the mean of the map's top this fraction of pixels; chosen with bench_anomaly.py
# --slice-fractions on validate (docs/anomaly.md#how-the-map-was-chosen-validate)
SLICE_FRACTION = 0.001
# The reconstruction's edge strength (smoothed gradient magnitude, per pixel on the 0-1 scale) is
# floored at this, so flat background does not divide by zero.
EDGE_FLOOR = 0.01


def edge_strength(recon, sigma: float) -> np.ndarray:
    """The local edge strength of reconstructions ``(N, H, W)`` (or ``(N, H, W, 1)``): the gradient
    magnitude smoothed with a Gaussian of ``sigma`` px, plus :data:`EDGE_FLOOR`. The VQ-VAE's error,
    and the healings' redrawn texture, are largest along edges (cortex, ventricles, the head's
    outline); dividing a map by this puts a lesion in flat tissue and one on an edge on one scale."""
    r = np.asarray(recon, np.float32)
    r = r[..., 0] if r.ndim == 4 else r
    gy, gx = np.gradient(r, axis=(1, 2))
    return (smooth(np.hypot(gy, gx), sigma) + EDGE_FLOOR).astype(np.float32)


def combine_maps(difference, nll, sigma: float | None = None, *, threshold: float | None = None, residual=None,
                 recon=None, residual_weight: float = RESIDUAL_WEIGHT) -> np.ndarray:
    """The chosen anomaly map: the healings' difference weighted by the squared code NLL, plus the
    residual, over the reconstruction's edge strength.

    ``map = (difference * (smooth(upsample(nll), sigma) / threshold) ** 2 + residual_weight * residual)
    / edge_strength(recon, sigma)``.

    - The difference (mean over healings of the smoothed ``|x - healed|``; outside the redrawn region
      the healings equal the VQ-VAE reconstruction, so there it is the residual) says *where* a slice
      differs from a healthy one; the NLL, in units of the flagging threshold, says *whether* the
      prior finds the codes there unlikely, so a dark lesion the VQ-VAE reconstructs well shows
      through its redrawn codes and redrawn healthy texture is damped.
    - The residual ``|x - decode(encode(x))|`` catches what is smaller than a code (a 2-4 px lesion
      is at most one code, and its code is often not unlikely) and bright lesions the VQ-VAE cannot
      draw.
    - Both parts are largest along edges for healthy tissue too, so both are divided by the
      reconstruction's local edge strength (:func:`edge_strength`).

    Without ``threshold`` the NLL is taken in nats; without ``residual`` and ``recon`` the map is the
    difference times the squared NLL alone (the map before the residual and edge terms).

    Args:
        difference: float ``(N, H, W)``; nll: float ``(N, h, w)`` nats; sigma: px over which the NLL
            and the edge strength are smoothed (default one code's width, ``H / h``).
        threshold: the NLL threshold (nats) the codes were flagged against.
        residual: float ``(N, H, W)``, the smoothed VQ-VAE residual; recon: ``(N, H, W[, 1])``, the
            VQ-VAE's reconstructions (both or neither).
    Returns:
        float32 ``(N, H, W)``.
    """
    if (residual is None) != (recon is None):
        raise ValueError("combine_maps: pass residual and recon together, or neither")
    difference = np.asarray(difference, np.float32)
    sigma = difference.shape[1] / np.shape(nll)[1] if sigma is None else sigma
    weight = np.maximum(smooth(upsample_codes(nll, difference.shape[1:3]), sigma), 0)
    if threshold is not None:
        weight = weight / float(threshold)
    out = difference * weight ** 2
    if residual is not None:
        out = (out + residual_weight * np.asarray(residual, np.float32)) / edge_strength(recon, sigma)
    return out.astype(np.float32)


def slice_scores(maps, fraction: float | None = None) -> np.ndarray:
    """Slice-level scores: the mean of each map's top ``fraction`` of pixels (default
    :data:`SLICE_FRACTION`, 0.1 %: 16 px at 128 px, a small lesion's area), float32 ``(N,)``.
    A lesion covers a few per cent of a slice at most, so the map's mean is dominated by normal
    tissue; its top pixels are not (validate: slice AUROC 0.83 against 0.71 by the mean for the
    chosen map). Raises ``ValueError`` for a fraction outside (0, 1]."""
    fraction = SLICE_FRACTION if fraction is None else fraction
    if not 0 < fraction <= 1:
        raise ValueError(f"slice_scores: fraction {fraction} must be in (0, 1]")
    flat = np.asarray(maps, np.float32).reshape(len(maps), -1)
    k = max(1, int(round(fraction * flat.shape[1])))
    return np.sort(flat, axis=1)[:, -k:].mean(axis=1).astype(np.float32)


def healing_differences(images, healed, grid_shape, sigma: float | None = None) -> np.ndarray:
    """Each healing's smoothed difference from the input, ``smooth(|x - healed_s|, sigma)``, float32
    ``(S, N, H, W)``; ``sigma`` defaults to half a code's width (``grid_shape`` is the code grid's).
    Their mean is the ``difference`` of :func:`combine_maps`."""
    x = np.asarray(images, np.float32)
    sigma = _default_sigma(x, grid_shape) if sigma is None else sigma
    return np.stack([smooth(np.abs(x - h)[..., 0], sigma) for h in np.asarray(healed, np.float32)])


def _finish(x, codes, nll, region, healed_codes, vqvae, sigma, threshold, map_nll, map_threshold: float):
    """The maps of an :class:`AveragedHealing`; the map is weighted by ``map_nll``, in units of ``map_threshold``."""
    s, n = healed_codes.shape[:2]
    healed = evaluation.decode_codes(vqvae, healed_codes.reshape(s * n, *codes.shape[1:]))
    healed = np.asarray(healed, np.float32).reshape(s, n, *x.shape[1:])
    recon = np.asarray(evaluation.decode_codes(vqvae, codes), np.float32)
    sigma = _default_sigma(x, codes.shape[1:]) if sigma is None else sigma
    px = upsample_codes(region, x.shape[1:3])
    diffs = healing_differences(x, healed, codes.shape[1:], sigma)
    residual = smooth(np.abs(x - recon)[..., 0], sigma)
    amap = combine_maps(diffs.mean(axis=0), map_nll, threshold=map_threshold, residual=residual, recon=recon)
    return AveragedHealing(codes=codes, nll=nll, map_nll=np.asarray(map_nll, np.float32), region=region,
                           healed_codes=healed_codes, healed=healed, residual=residual,
                           healed_map=(diffs.mean(axis=0) * px).astype(np.float32),
                           spread=(diffs.std(axis=0) * px).astype(np.float32), anomaly_map=amap,
                           scores=slice_scores(amap), threshold=threshold)


def heal_average(vqvae, prior, images, threshold: float, condition=None, samples: int = DEFAULT_SAMPLES,
                 dilate: int = DEFAULT_DILATE, rounds: int = DEFAULT_AVERAGE_ROUNDS, seed: int = 0,
                 temperature: float = 1.0, sigma: float | None = None, batch_size: int | None = None,
                 ) -> AveragedHealing:
    """Heal single slices several times inside the flagged region only, and average.

    The codes with NLL above ``threshold`` (given no slice below) are flagged, the flagged set grows
    by ``dilate`` codes (a lesion's edge codes are often only just below the threshold), and only
    that region is redrawn, ``samples`` times with different seeds, given every kept code; with
    ``rounds > 1`` the healed grids are rescored and codes that are now unlikely join the region
    (as :func:`heal`). The map is the mean over healings of the smoothed ``|x - healed|`` inside the
    region and 0 outside, so one healing's redrawn healthy texture (mottling) is averaged down, and
    its standard deviation is returned as ``spread``.

    Args:
        images: float32 ``(N, H, W, 1)`` in [0, 1]; threshold: nats (:func:`run_threshold`).
        condition: slice positions ``(N,)`` (or one int) for a conditioned prior, else None.
        samples, dilate, rounds, seed, temperature, sigma, batch_size: as named; the same seed gives
            the same result.
    Returns:
        an :class:`AveragedHealing` (``healed_codes`` ``(samples, N, h, w)``).
    """
    x = evaluation._as_float_images(images)
    codes = evaluation.encode_images(vqvae, x)
    cond = _condition(condition, len(codes))
    nll, region, healed = _heal_codes(prior, codes, cond, None, threshold, samples, dilate, rounds, seed,
                                      temperature, batch_size)
    return _finish(x, codes, nll, region, healed, vqvae, sigma, float(threshold), nll, float(threshold))


def propagated_nll(single, given_below, flagged_below, carry: int = 1) -> np.ndarray:
    """The NLL the volume path flags a slice's codes by (``heal_volume(..., flag="propagated")``).

    A code is unexpected in a volume when neither the prior of single slices nor the prior given the
    real slice below expects it: ``min(single, given_below)``. Where the code below (grown by
    ``carry`` codes) was itself flagged, the slice below may hold the same lesion and cannot vouch
    for the code, so the single-slice NLL stands there. A lesion spanning slices is so flagged on its
    lowest slice by both priors and above it by the single-slice prior, while healthy anatomy that a
    single slice makes look unusual but the slice below predicts is not flagged.

    Args:
        single: float ``(N, h, w)``, the codes' NLL given no slice below; given_below: the same codes'
            NLL given the real slice below; flagged_below: bool ``(N, h, w)``, the slice below's flags.
    Returns:
        float32 ``(N, h, w)``.
    """
    single, given_below = np.asarray(single, np.float32), np.asarray(given_below, np.float32)
    return np.where(dilate_codes(flagged_below, carry), single, np.minimum(single, given_below)).astype(np.float32)


def volume_map_nll(single, given_below) -> np.ndarray:
    """The NLL the volume-aware map is weighted by (``heal_volume(..., weight="max")``): the higher of
    a code's NLL as a single slice and its NLL given the real slice below.

    Flagging asks whether a code must be redrawn, and :func:`propagated_nll` redraws only what neither
    prior explains; the weight asks how loud the map is there, and takes the more surprised prior. On
    the lowest slice of a lesion that is the prior given the slice below: it expects the healthy
    continuation of that slice confidently, so the lesion's codes cost it more nats than they cost the
    single-slice prior. Above it, where the slice below holds the lesion too, the single-slice NLL
    stands. (Validate lesions: volume-aware maps weighted so beat the single-slice maps; weighted by
    the flagging NLL they scored alike; docs/anomaly.md.)

    Args:
        single, given_below: float ``(N, h, w)``, the codes' NLL given no slice below and given the
            real slice below (nats).
    Returns:
        float32 ``(N, h, w)``.
    """
    return np.maximum(np.asarray(single, np.float32), np.asarray(given_below, np.float32))


VOLUME_FLAGS = ("propagated", "single", "previous")
VOLUME_WEIGHTS = ("max", "flag")   # what weights the volume-aware map: volume_map_nll, or the flagging NLL


def heal_volume(vqvae, prior, volumes, threshold: float, threshold_previous: float | None = None, condition=None,
                samples: int = DEFAULT_SAMPLES, dilate: int = DEFAULT_DILATE, rounds: int = DEFAULT_AVERAGE_ROUNDS,
                seed: int = 0, temperature: float = 1.0, sigma: float | None = None,
                batch_size: int | None = None, progress: bool = False, flag: str = "propagated",
                weight: str = "max") -> AveragedHealing:
    """Heal whole cases slice by slice from the bottom, each slice given the *healed* slice below.

    Slice 0 of each case is healed as :func:`heal_average` heals a single slice (threshold
    ``threshold``, the prior's "no previous slice"). Each later slice ``k`` has its region flagged
    and redrawn by the prior given its position and the healed codes of slice ``k - 1`` (each of the
    ``samples`` healings carries its own healed slice below). So a lesion that spans slices is
    redrawn from a healed slice below, not from the lesion's own lower part.

    How the codes are flagged (``flag``), each against ``threshold`` unless said otherwise:

    - ``"propagated"`` (default): by :func:`propagated_nll`, the lower of the NLL as a single slice and
      the NLL given the *real* slice below, except next to codes flagged on the slice below, where
      the single-slice NLL stands. Healthy anatomy the slice below predicts is not flagged; a lesion
      is flagged on its lowest slice and, above it, where the slice below was flagged too.
    - ``"single"``: as a single slice is (the region :func:`heal_average` redraws).
    - ``"previous"``: by the NLL given the *healed* slice below, against ``threshold_previous`` (the
      same percentile of healthy NLL given the slice below, :func:`run_threshold` with
      ``previous=True``). A healed slice below holds codes the prior never saw below a real slice, so
      healthy codes above it look unlikely; on validate lesions this flagged and weighted worse.

    What weights the map (``weight``; ``map_nll``, the NLL of :func:`combine_maps`):

    - ``"max"`` (default): :func:`volume_map_nll`, the higher of the code's NLL as a single slice and
      given the *real* slice below (slice 0: as a single slice), in units of ``threshold``.
    - ``"flag"``: the flagging NLL (``nll``), in units of the threshold it was flagged against.

    See docs/anomaly.md for how they score.

    Args:
        volumes: float32 ``(C, S, H, W, 1)`` (or ``(C, S, H, W)``): ``C`` cases of ``S`` slices in order.
        condition: slice positions ``(S,)`` for a conditioned prior (the same for every case), else None.
        prior: a prior with ``previous_slice`` (``ValueError`` otherwise).
        flag: which NLL flags the codes to redraw, ``"propagated"``, ``"single"`` or ``"previous"``
            (above); either way the region is redrawn given the healed slice below.
        weight: what weights the map, ``"max"`` or ``"flag"`` (above).
    Returns:
        an :class:`AveragedHealing` over the ``C * S`` slices in case-major order.
    """
    if not getattr(getattr(prior, "config", None), "previous_slice", False):
        raise ValueError("heal_volume needs a prior trained with previous_slice; use heal_average for single slices")
    if flag not in VOLUME_FLAGS:
        raise ValueError(f"flag must be one of {', '.join(map(repr, VOLUME_FLAGS))}, got {flag!r}")
    if weight not in VOLUME_WEIGHTS:
        raise ValueError(f"weight must be one of {', '.join(map(repr, VOLUME_WEIGHTS))}, got {weight!r}")
    if flag == "previous" and threshold_previous is None:
        raise ValueError("heal_volume: flag='previous' needs threshold_previous (run_threshold(..., previous=True))")
    v = np.asarray(volumes, np.float32)
    v = v[..., None] if v.ndim == 4 else v
    c, s = v.shape[:2]
    x = v.reshape(c * s, *v.shape[2:])
    codes = evaluation.encode_images(vqvae, x)
    h, w = codes.shape[1:]
    codes = codes.reshape(c, s, h, w)
    cond = None if condition is None else np.asarray(condition, np.int32).reshape(s)
    nll, region = np.zeros((c, s, h, w), np.float32), np.zeros((c, s, h, w), bool)
    map_nll = np.zeros((c, s, h, w), np.float32)
    healed = np.zeros((samples, c, s, h, w), np.int32)
    steps = range(s)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="healing slices in order", unit="slice")
    for k in steps:
        prev = None if k == 0 else healed[:, :, k - 1]
        ck = None if cond is None else np.full((c,), cond[k], np.int32)
        flag_nll = single = given_below = None
        if k > 0 and (flag == "propagated" or weight == "max"):
            single = evaluation.code_nll(prior, codes[:, k], ck)
            given_below = evaluation.code_nll(prior, codes[:, k], ck, previous=codes[:, k - 1])
        if flag == "propagated" and k > 0:
            flag_nll = propagated_nll(single, given_below, nll[:, k - 1] > threshold)
        elif flag == "single":
            flag_nll = single                     # None on slice 0: _heal_codes scores it as a single slice
        nll[:, k], region[:, k], healed[:, :, k] = _heal_codes(
            prior, codes[:, k], ck, prev, threshold if k == 0 or flag != "previous" else threshold_previous, samples,
            dilate, rounds, int(np.random.default_rng([seed, k]).integers(2 ** 31)), temperature, batch_size,
            score_previous=flag == "previous", nll=flag_nll)
        map_nll[:, k] = volume_map_nll(single, given_below) if weight == "max" and k > 0 else nll[:, k]
    used = (float(threshold), float(threshold_previous)) if flag == "previous" else float(threshold)
    map_threshold = used[1] if flag == "previous" and weight == "flag" else float(threshold)
    return _finish(x, codes.reshape(c * s, h, w), nll.reshape(c * s, h, w), region.reshape(c * s, h, w),
                   healed.reshape(samples, c * s, h, w), vqvae, sigma, used, map_nll.reshape(c * s, h, w),
                   map_threshold)


# ----------------------------------------------------------------------------------------------
# Completion
# ----------------------------------------------------------------------------------------------

def complete(vqvae, prior, images, keep_rows: int, condition=None, seeds=(0,), temperature: float = 1.0,
             batch_size: int | None = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the first ``keep_rows`` code rows of each slice and draw the other rows from the prior.

    Args:
        images: float32 ``(N, H, W, 1)`` in [0, 1].
        keep_rows: rows of the code grid to keep, ``1 <= keep_rows < h``.
        condition: slice positions ``(N,)`` (or one int) for a conditioned prior, else None.
        seeds: one completion per seed (the same seed gives the same completion).
    Returns:
        ``(input_codes (N, h, w), codes (S, N, h, w), images (S, N, H, W, 1))`` for ``S = len(seeds)``.
    Raises:
        ValueError: ``keep_rows`` outside ``1 .. h - 1``.
    """
    from sampler import sample_codes

    input_codes = evaluation.encode_images(vqvae, images)
    n, h, w = input_codes.shape
    if not 1 <= keep_rows < h:
        raise ValueError(f"keep_rows={keep_rows} is outside the code grid: keep 1 to {h - 1} of its {h} rows")
    cond = _condition(condition, n)
    keep = np.zeros((n, h, w), dtype=bool)
    keep[:, :keep_rows] = True
    out = np.stack([sample_codes(prior, n, grid_shape=(h, w), temperature=temperature, seed=int(s),
                                 condition=cond, batch_size=batch_size, progress=progress,
                                 codes=input_codes, keep=keep) for s in seeds]).astype(np.int32)
    decoded = evaluation.decode_codes(vqvae, out.reshape(-1, h, w)).reshape(len(seeds), n, *np.shape(images)[1:3], 1)
    return input_codes, out, decoded


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib Figures without pyplot: saved by the CLI, shown inline by a notebook)
# ----------------------------------------------------------------------------------------------

def _figure(nrows: int, ncols: int, cell: float = 1.9):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(cell * ncols, cell * nrows + 0.3))
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def plot_healing(image, nll, healed, anomaly_map, threshold: float | None = None, title: str | None = None,
                 path=None):
    """One slice's panel: input, NLL map (resampled codes outlined), healed slice, anomaly map.

    Args:
        image, healed: ``(H, W[, 1])`` in [0, 1]; nll: ``(h, w)`` nats; anomaly_map: ``(H, W)``.
        path: if given, the panel is also saved there as PNG.
    Returns:
        the ``matplotlib.figure.Figure``.
    """
    image, healed = np.asarray(image).squeeze(), np.asarray(healed).squeeze()
    fig, axes = _figure(1, 4)
    axes = axes[0]
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[0].set_title("input", fontsize=8)
    im = axes[1].imshow(nll, cmap="magma", interpolation="nearest")
    if threshold is not None and np.any(nll > threshold):
        axes[1].contour(nll > threshold, levels=[0.5], colors="cyan", linewidths=0.8)
    axes[1].set_title("code NLL (nats)" + (f", > {threshold:.2f} resampled" if threshold is not None else ""),
                      fontsize=7)
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    axes[2].imshow(healed, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[2].set_title("healed", fontsize=8)
    im = axes[3].imshow(anomaly_map, cmap="hot", vmin=0, vmax=max(0.05, float(np.max(anomaly_map))),
                        interpolation="nearest")
    axes[3].set_title("anomaly map", fontsize=8)
    fig.colorbar(im, ax=axes[3], fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    return _finish_figure(fig, title, path)


def _finish_figure(fig, title: str | None, path):
    """Title, layout, and (if ``path``) save: the common end of the panel figures."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    return fig


def plot_completion(image, completions, keep_rows: int, grid_rows: int, title: str | None = None, path=None):
    """One slice and its completions side by side; a line marks where the kept code rows end.

    Args:
        image: ``(H, W[, 1])``; completions: ``(S, H, W[, 1])``, all in [0, 1].
        keep_rows, grid_rows: kept code rows and rows of the code grid (to place the line).
    Returns:
        the ``matplotlib.figure.Figure`` (also saved to ``path`` if given).
    """
    image = np.asarray(image).squeeze()
    completions = np.asarray(completions).reshape(len(completions), *image.shape)
    fig, axes = _figure(1, 1 + len(completions))
    y = keep_rows * image.shape[0] / grid_rows - 0.5
    for k, (ax, img) in enumerate(zip(axes[0], [image, *completions])):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.axhline(y, color="cyan", linewidth=0.8)
        ax.set_title("input" if k == 0 else f"completion {k}", fontsize=8)
    return _finish_figure(fig, title, path)
