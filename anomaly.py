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

The threshold is a high percentile of healthy per-code NLL: :func:`healthy_threshold` on any set of
healthy slices, :func:`run_threshold` on a run's validation split (cached in the run directory).
The baseline the benchmark compares against is :func:`residual_map`, the plain VQ-VAE residual
``|input - decode(encode(input))|`` smoothed the same way.

:func:`complete` keeps the first ``K`` code rows of each slice and draws the rest from the prior.

All functions take the models (``vqvae``, ``prior``), not a run, so a notebook can call them on
anything; images are float32 ``(N, H, W, 1)`` in ``[0, 1]``, codes int ``(N, h, w)``, NLL in nats.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

import evaluation

__all__ = ["DEFAULT_PERCENTILE", "DEFAULT_ROUNDS", "Healing", "nll_map", "healthy_threshold", "run_threshold", "heal",
           "residual_map", "complete", "upsample_codes", "smooth", "add_synthetic_lesion",
           "detection_metrics", "roc_auc", "average_precision", "best_dice", "plot_healing", "plot_completion"]

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


def run_threshold(run, percentile: float = DEFAULT_PERCENTILE, cache: bool = True) -> float:
    """The default threshold of a trained run: a high percentile of its validation slices' code NLL.

    The validation codes come from the run's ``codes.npz`` (written by ``train.py``) when it belongs
    to this VQ-VAE, else the validation split is read from the run's data folder and encoded. The
    result is cached in ``anomaly_threshold.json`` in the run directory, keyed by the percentile and
    the hashes of ``vqvae.keras`` and ``pixelcnn.keras``, so retraining either invalidates it.

    Args:
        run: a ``predict.Run`` (``path``, ``vqvae``, ``prior``, ``conditioned``, ``read_splits()``).
    Raises:
        FileNotFoundError: neither the cached codes nor the validation data can be found.
    """
    import utils

    path = Path(run.path)
    key = {"percentile": float(percentile), "vqvae_sha256": evaluation.file_sha256(path / "vqvae.keras"),
           "prior_sha256": evaluation.file_sha256(path / "pixelcnn.keras")}
    cache_path = path / "anomaly_threshold.json"
    if cache and cache_path.exists():
        saved = utils.load_json(cache_path)
        if all(saved.get(k) == v for k, v in key.items()):
            return float(saved["threshold_nats"])
    codes = slices = None
    cached = evaluation.cached_codes(path, key["vqvae_sha256"], ["validate"])
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
    cond = np.asarray(slices, dtype=np.int32) if run.conditioned else None
    nll = evaluation.code_nll(run.prior, codes, cond)
    threshold = float(np.percentile(nll, percentile))
    if cache:
        utils.save_json({**key, "threshold_nats": threshold, "num_codes": int(nll.size),
                         "source": "validation split"}, cache_path)
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
# Synthetic lesions (the benchmark's ground truth; also used by the notebook)
# ----------------------------------------------------------------------------------------------

def add_synthetic_lesion(image, rng: np.random.Generator, radius: float, bright: bool,
                         margin: float = 0.12) -> tuple[np.ndarray, np.ndarray] | None:
    """Paint one lesion-like blob into a slice, well inside the head.

    The blob is an ellipse (axes ``radius`` and 0.6-1 x ``radius``, random angle) whose outline is
    perturbed by low angular harmonics, with a soft edge (a logistic ramp about 1 px wide) and a
    smooth multiplicative texture (+-8 %). Bright lesions are the local tissue plus 0.25-0.4, dark
    ones 0.25-0.5 x the local tissue (0 to 1 intensity scale). The centre is drawn from the points
    at least ``margin x H + 1.2 x radius`` from the head's outline
    (``evaluation.brain_interior_mask``), so the lesion lies inside the brain even when a scalp
    ring and skull band surround it.

    Args:
        image: ``(H, W)`` or ``(H, W, 1)`` in [0, 1].
        radius: the long semi-axis as a fraction of ``H``.
    Returns:
        ``(lesioned image like the input, mask (H, W) bool where the lesion's opacity >= 0.5)``, or
        None when the head has no room for the lesion (e.g. a small top or bottom slice).
    """
    from scipy import ndimage

    x = np.asarray(image, dtype=np.float32)
    img = x.squeeze()
    size = img.shape[0]
    r = radius * size
    room = np.argwhere(evaluation.brain_interior_mask(img, margin=int(np.ceil(margin * size + 1.2 * r))))
    if len(room) == 0:
        return None
    cy, cx = room[rng.integers(len(room))]
    ry, rx, angle = r, r * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(np.float32)
    u = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
    v = -(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
    theta = np.arctan2(v, u)
    wobble = 1 + sum(rng.uniform(0, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
    rho = np.sqrt((u / ry) ** 2 + (v / rx) ** 2) / wobble                 # 1 on the outline
    alpha = 1 / (1 + np.exp(np.clip((rho - 1) * ry, -50, 50)))             # a ramp of at most ~1 px
    texture = ndimage.gaussian_filter(rng.standard_normal(img.shape), 1.5)
    texture = 1 + 0.08 * texture / (texture.std() + 1e-8)
    inside = alpha >= 0.5
    local = float(np.median(img[inside])) if inside.any() else float(img[cy, cx])
    target = local + rng.uniform(0.25, 0.4) if bright else local * rng.uniform(0.25, 0.5)
    out = np.clip(img * (1 - alpha) + np.clip(target * texture, 0, 1) * alpha, 0, 1).astype(np.float32)
    return out.reshape(x.shape), inside


# ----------------------------------------------------------------------------------------------
# Detection metrics (NumPy; tests check them against direct threshold sweeps)
# ----------------------------------------------------------------------------------------------

def _sorted_counts(scores, labels):
    """True / false positives when predicting "positive" above each distinct score, high to low."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("detection metrics need both positive and negative labels")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each run of equal scores
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return tp.astype(np.float64), fp.astype(np.float64), float(labels.sum()), float((~labels).sum())


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve (ties count one half): P(score of a positive > score of a negative)."""
    tp, fp, p, n = _sorted_counts(scores, labels)
    tpr, fpr = np.r_[0.0, tp / p], np.r_[0.0, fp / n]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def average_precision(scores, labels) -> float:
    """Area under the precision-recall curve as a step sum, ``sum_k (R_k - R_{k-1}) P_k`` (AUPRC)."""
    tp, fp, p, _ = _sorted_counts(scores, labels)
    recall, precision = tp / p, tp / (tp + fp)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def best_dice(scores, labels) -> tuple[float, float]:
    """The highest Dice ``2 TP / (2 TP + FP + FN)`` over all thresholds, and the threshold giving it.

    Returns:
        ``(dice, threshold)``: predicting ``score >= threshold`` as positive scores ``dice``.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    tp, fp, p, _ = _sorted_counts(scores, labels)
    dice = 2 * tp / (p + tp + fp)
    k = int(np.argmax(dice))
    return float(dice[k]), float(np.sort(np.unique(scores))[::-1][k])


def detection_metrics(scores, labels) -> dict[str, float]:
    """``{"auroc", "auprc", "best_dice", "best_dice_threshold"}`` of scores against binary labels."""
    dice, thr = best_dice(scores, labels)
    return {"auroc": roc_auc(scores, labels), "auprc": average_precision(scores, labels),
            "best_dice": dice, "best_dice_threshold": thr}


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
