"""Every evaluation metric of the tool, computed once, here; ``train.py``, ``predict.py``, the benches
and the tests all call these functions.

* image similarity: :func:`ssim`, :func:`ms_ssim`, :func:`psnr`, :func:`ssim_matrix` (all pairs);
* chunked encoding / decoding: :func:`encode_images`, :func:`decode_codes`, :func:`reconstruct`; a run's
  splits encoded once and cached (:func:`encode_splits`);
* reconstruction quality: :func:`reconstruction_metrics`; the codebook: :func:`code_usage`;
* detail: the radial power spectrum (:func:`radial_power_spectrum`) and the power of reconstructions or
  samples over real slices' per frequency band (:func:`power_spectrum_ratios`);
* the prior: :func:`code_nll` (per-position cross-entropy in nats), :func:`prior_nll` (bits per code
  and bits per slice);
* generation: realism / memorisation (:func:`nearest_by_ssim`), interior realism on the central half
  (:func:`center_crop`), diversity (:func:`mean_pairwise_ms_ssim`), interior sharpness
  (:func:`brain_interior_mask`, :func:`sharpness`);
* in the judge's feature space (``judge.py``): :func:`frechet_distance` and
  :func:`precision_recall` (Kynkaanniemi et al. 2019); :func:`score_samples` gathers all of them;
* the classifier two-sample test (Lopez-Paz & Oquab 2017), in ``two_sample.py`` and importable from
  here: :func:`two_sample_test` on one pair of image sets (paired by case or not, with an interval
  and a p-value), :func:`two_sample_scores` for the floor, power rows, reconstructions and samples of
  a run, each on the views of :data:`TWO_SAMPLE_VIEWS`;
* the anatomy judge, which segments what the models make (``segmenter.py``): tissue areas by slice
  position, fragmentation, ventricles, the segmenter's confidence, Frechet distance of its features,
  subjects' tissue volumes, Dice (:func:`anatomy_scores` here; :func:`subject_anatomy`,
  :func:`tissue_dice`; they live in ``anatomy.py`` and are re-exported here).

Images are float32 ``(N, H, W, 1)`` in ``[0, 1]``; codes are int ``(N, h, w)``.

Image similarity uses TensorFlow's implementations, one value per image pair as NumPy ``float64``:

* SSIM is ``tf.image.ssim`` -- the Wang et al. (2004) definition with an 11x11 Gaussian window
  (sigma 1.5), K1 = 0.01, K2 = 0.03, on images in [0, 1] (``max_val=1``). The window shrinks for
  images smaller than 11 pixels.
* MS-SSIM is ``tf.image.ssim_multiscale`` with the standard five-scale weights, truncated (and
  renormalised) to the scales that fit the image.
* PSNR is ``tf.image.psnr`` in dB with ``max_val=1``.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

import utils
from utils import brain_interior_mask, center_crop  # noqa: F401  (image geometry lives in utils; named here too)
from two_sample import (  # noqa: F401  (the two-sample test lives in two_sample.py; its names stay importable here)
    POWER_ROWS as TWO_SAMPLE_POWER_ROWS,
    VIEWS as TWO_SAMPLE_VIEWS,
    TwoSampleConfig,
    as_8bit,
    build_two_sample_classifier,
    two_sample_scores,
    two_sample_table,
    two_sample_test,
    two_sample_unavailable,
    two_sample_view,
)

LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------
# Image similarity: SSIM, MS-SSIM, PSNR (TensorFlow's definitions)
# ----------------------------------------------------------------------------------------------

# Standard MS-SSIM weights (Wang, Simoncelli & Bovik 2003), coarsest scale last.
_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _ssim_filter_size(height: int, width: int) -> int:
    return max(1, min(11, height, width))


def ssim(a, b, max_val: float = 1.0) -> np.ndarray:
    """Per-pair SSIM (``tf.image.ssim``, Gaussian window) of two image batches in ``[0, max_val]``.

    Args:
        a, b: images shaped ``(N, H, W, 1)`` (or anything ``utils.as_image_batch`` accepts), same shape.
    Returns:
        ``(N,)`` float64 SSIM values in ``[-1, 1]``.
    """
    import tensorflow as tf

    a, b = utils.as_image_batch(a), utils.as_image_batch(b)
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ, {a.shape} vs {b.shape}")
    size = _ssim_filter_size(a.shape[1], a.shape[2])
    return tf.image.ssim(a, b, max_val=max_val, filter_size=size).numpy().astype(np.float64)


def ms_ssim(a, b, max_val: float = 1.0) -> np.ndarray:
    """Per-pair multi-scale SSIM (``tf.image.ssim_multiscale``), using as many scales as fit.

    Each scale halves the image; a scale is used only while the image is at least as large as the
    11-pixel window, so 128x128 images use four scales and 256x256 images all five.
    """
    import tensorflow as tf

    a, b = utils.as_image_batch(a), utils.as_image_batch(b)
    if a.shape != b.shape:
        raise ValueError(f"ms_ssim: shapes differ, {a.shape} vs {b.shape}")
    side = min(a.shape[1], a.shape[2])
    scales = 1
    while scales < len(_MS_SSIM_WEIGHTS) and side // (2 ** scales) >= 11:
        scales += 1
    weights = np.asarray(_MS_SSIM_WEIGHTS[:scales], dtype=np.float32)
    weights = weights / weights.sum()
    size = _ssim_filter_size(a.shape[1], a.shape[2])
    out = tf.image.ssim_multiscale(a, b, max_val=max_val, power_factors=weights.tolist(), filter_size=size)
    return out.numpy().astype(np.float64)


def ssim_matrix(a, b, max_val: float = 1.0, chunk: int = 256, desc: str | None = None) -> np.ndarray:
    """SSIM of every pair ``(a[i], b[j])``: ``(N, M)``, the same values as :func:`ssim` per pair.

    ``a`` and ``b`` are ``(N, H, W, 1)`` / ``(M, H, W, 1)`` float images in [0, 1], or uint8 (read as
    ``pixel / 255``, converted one chunk at a time).

    Nearest-neighbour searches need N x M SSIMs; computing each pair from scratch filters both
    images again every time. Here the local means and variances of every image are filtered once
    and only the cross term is filtered per pair, with the separable Gaussian window applied as
    two matrix products (``gaussian_band``). ``b`` is processed ``chunk`` images at a time, so
    memory stays bounded for large reference sets; ``desc`` shows a tqdm bar over ``b``.
    """
    import tensorflow as tf
    from tqdm import tqdm

    a = utils.as_image_batch(_as_float_images(a))[..., 0]
    b = np.asarray(b)  # converted chunk by chunk below: a uint8 reference set never becomes float32 whole
    if b.ndim == 3:
        b = b[..., None]
    if b.ndim != 4 or a.shape[1:] != b.shape[1:3]:
        raise ValueError(f"ssim_matrix: image shapes differ, {a.shape[1:]} vs {b.shape[1:]}")
    h, w = a.shape[1:]
    size = _ssim_filter_size(h, w)
    gh, gw = tf.constant(utils.gaussian_band(h, size)), tf.constant(utils.gaussian_band(w, size))

    def blur(x):  # (n, H, W) -> (n, H - size + 1, W - size + 1)
        return tf.einsum("npw,qw->npq", tf.einsum("ph,nhw->npw", gh, x), gw)

    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    a_t = tf.constant(a)
    mu_a = blur(a_t)
    var_a = blur(a_t * a_t) - mu_a ** 2
    out = np.empty((len(a), len(b)))
    with tqdm(total=len(b), desc=desc, disable=desc is None, leave=False) as bar:
        for j in range(0, len(b), chunk):
            b_t = tf.constant(_as_float_images(b[j:j + chunk])[..., 0])
            mu_b = blur(b_t)
            var_b = blur(b_t * b_t) - mu_b ** 2
            for i in range(len(a)):
                cov = blur(a_t[i] * b_t) - mu_a[i] * mu_b
                lum = (2.0 * mu_a[i] * mu_b + c1) / (mu_a[i] ** 2 + mu_b ** 2 + c1)
                cs = (2.0 * cov + c2) / (var_a[i] + var_b + c2)
                out[i, j:j + chunk] = tf.reduce_mean(lum * cs, axis=(1, 2)).numpy()
            bar.update(len(b_t))
    return out


def psnr(a, b, max_val: float = 1.0) -> np.ndarray:
    """Per-pair PSNR in dB (``tf.image.psnr``); identical images give ``inf``."""
    import tensorflow as tf

    a, b = utils.as_image_batch(a), utils.as_image_batch(b)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ, {a.shape} vs {b.shape}")
    return tf.image.psnr(a, b, max_val=max_val).numpy().astype(np.float64)


# ----------------------------------------------------------------------------------------------
# Chunked encoding and decoding
# ----------------------------------------------------------------------------------------------

def _as_float_images(images) -> np.ndarray:
    """uint8 ``(N, H, W, 1)`` (``pixel / 255``) or float images -> float32 ``(N, H, W, 1)``."""
    x = np.asarray(images)
    if x.dtype == np.uint8:
        return np.divide(x, 255, dtype=np.float32)
    return x.astype(np.float32, copy=False)


def encode_images(vqvae, images, batch_size: int = 64) -> np.ndarray:
    """The VQ-VAE's code grid of every image, ``batch_size`` images at a time (bounded memory).

    Args:
        images: float ``(N, H, W, 1)`` in [0, 1], or uint8 (divided by 255 chunk by chunk, so a whole
            uint8 split is never held as float32).
    Returns:
        int32 ``(N, h, w)``.
    """
    images = np.asarray(images)
    if len(images) == 0:
        raise ValueError("encode_images: no images")
    return np.concatenate([np.asarray(vqvae.encode(_as_float_images(images[i:i + batch_size])))
                           for i in range(0, len(images), batch_size)]).astype(np.int32)


def decode_codes(vqvae, codes, batch_size: int = 64) -> np.ndarray:
    """Decode code grids int ``(N, h, w)`` to float32 images ``(N, H, W, 1)``, in chunks."""
    codes = np.asarray(codes)
    if len(codes) == 0:
        raise ValueError("decode_codes: no codes")
    return np.concatenate([np.asarray(vqvae.decode(codes[i:i + batch_size]))
                           for i in range(0, len(codes), batch_size)]).astype(np.float32)


def reconstruct(vqvae, images, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Encode then decode: ``(codes (N, h, w), reconstructions (N, H, W, 1))``.

    The reconstruction is the decoded codes, which is what ``vqvae(x)`` computes at inference; the
    codes come back too so code usage needs no second encoding.
    """
    codes = encode_images(vqvae, images, batch_size)
    return codes, decode_codes(vqvae, codes, batch_size)


CODE_CACHE = "codes.npz"  # a run's encoded splits, written by train.py, read by train.py and anomaly.py


def file_sha256(path) -> str:
    """Hex SHA-256 of a file's bytes ("" when it does not exist): the key of what is derived from a model."""
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def cached_codes(run_dir, vqvae_sha256: str, names) -> dict[str, dict[str, np.ndarray]] | None:
    """The split codes cached in ``run_dir/codes.npz``, if that VQ-VAE (by hash) made them.

    Returns ``{name: {"codes": int32 (N, h, w), "slices": (N,)}}`` for every split in ``names``, or
    None when there is no cache, it came from another VQ-VAE, or it lacks one of the splits.
    """
    cache = Path(run_dir) / CODE_CACHE
    if not cache.exists():
        return None
    with np.load(cache) as z:
        if str(z["vqvae_sha256"]) != vqvae_sha256 or not all(f"{s}_codes" in z for s in names):
            return None
        return {s: {"codes": z[f"{s}_codes"], "slices": z[f"{s}_slices"]} for s in names}


def save_code_cache(run_dir, vqvae_sha256: str, codes: dict[str, dict[str, np.ndarray]]) -> Path:
    """Write ``codes`` (as :func:`cached_codes` returns them) to ``run_dir/codes.npz`` atomically."""
    cache = Path(run_dir) / CODE_CACHE
    arrays = {"vqvae_sha256": np.asarray(vqvae_sha256)}
    for name, split in codes.items():
        arrays[f"{name}_codes"], arrays[f"{name}_slices"] = split["codes"], split["slices"]
    tmp = cache.with_name(f"tmp_{os.getpid()}_{CODE_CACHE}")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, cache)
    return cache


def encode_splits(vqvae, splits, run_dir: Path, model_path: Path | None = None,
                  batch_size: int = 64) -> dict[str, dict[str, np.ndarray]]:
    """Encode every split once; cached in ``run_dir/codes.npz``, keyed by the VQ-VAE file it came from
    (``model_path``, default ``run_dir/vqvae.keras``)."""
    digest = file_sha256(model_path or Path(run_dir) / "vqvae.keras")
    out = cached_codes(run_dir, digest, splits)
    if out is not None:
        print(f"[prior] using cached codes in {Path(run_dir) / CODE_CACHE}")
        return out
    out = {}
    for name, split in splits.items():
        out[name] = {"codes": encode_images(vqvae, split.images, batch_size),
                     "slices": np.asarray(split.slice_indices)}
        print(f"[prior] encoded {name}: {out[name]['codes'].shape}")
    save_code_cache(run_dir, digest, out)
    return out


# ----------------------------------------------------------------------------------------------
# Reconstruction and the codebook
# ----------------------------------------------------------------------------------------------

def code_usage(codes, num_embeddings: int) -> dict[str, Any]:
    """Histogram, perplexity (exp of the entropy of code frequencies) and active fraction of codes.

    Returns:
        ``{"counts": int (K,), "perplexity": float in [1, K], "active_codes": fraction of the K codes
        used at least once}``.
    """
    counts = np.bincount(np.asarray(codes).ravel().astype(np.int64), minlength=num_embeddings)
    p = counts / max(1, counts.sum())
    nz = p[p > 0]
    return {"counts": counts, "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
            "active_codes": float((counts > 0).mean())}


def reconstruction_metrics(images, recon) -> dict[str, Any]:
    """Per-image SSIM and PSNR of reconstructions, and their means.

    Returns:
        ``{"ssim": (N,), "psnr": (N,), "ssim_mean": float, "psnr_mean": float}``.
    """
    s, p = ssim(images, recon), psnr(images, recon)
    return {"ssim": s, "psnr": p, "ssim_mean": float(s.mean()), "psnr_mean": float(p.mean())}


# ----------------------------------------------------------------------------------------------
# Detail: the radial power spectrum
# ----------------------------------------------------------------------------------------------

POWER_BANDS = utils.POWER_BANDS  # equal bands of normalised frequency from 0 to Nyquist (0.5 cycles per pixel)


def radial_power_spectrum(images, bands: int = POWER_BANDS) -> tuple[np.ndarray, np.ndarray]:
    """Mean power of a set of images per band of radial spatial frequency.

    Each image's 2-D FFT (NumPy, whole image, divided by ``sqrt(H W)`` so power is per pixel) gives
    the power ``|F|^2`` at each frequency ``(fy, fx)`` in cycles per pixel; a frequency's radius is
    ``sqrt(fx^2 + fy^2)``. The radii from 0 to the Nyquist frequency 0.5 are cut into ``bands`` equal
    bands, and the power is averaged over the frequencies of each band and over the images. The
    zero frequency (the mean brightness, not detail) and the corners beyond 0.5 (reached only on the
    diagonals) are left out. Blur removes power from the upper bands first.

    Args:
        images: ``(N, H, W[, 1])`` in [0, 1] (or uint8), N >= 1.
        bands: number of bands.
    Returns:
        ``(edges (bands + 1,), power (bands,))``, float64.
    Raises:
        ValueError: no images.
    """
    x = _spectrum_batch(images, "radial_power_spectrum")
    h, w = x.shape[1:3]
    edges, members = utils.frequency_bands(h, w, bands)
    power = np.zeros((h, w))
    for i in range(0, len(x), 64):  # bounded memory
        power += (np.abs(np.fft.fft2(x[i:i + 64])) ** 2).sum(axis=0)
    power /= len(x) * h * w
    return edges, np.array([power[m].mean() if m.any() else np.nan for m in members])


def _spectrum_batch(images, caller: str) -> np.ndarray:
    x = np.asarray(images)
    if x.size == 0 or len(x) == 0:
        raise ValueError(f"{caller}: no images")
    return utils.as_image_batch(_as_float_images(x))[..., 0].astype(np.float64)


def band_coherence(real, made, bands: int = POWER_BANDS) -> dict[str, np.ndarray]:
    """How much of each frequency band of ``real`` the paired images ``made`` (its reconstructions) get right.

    Per band of :func:`radial_power_spectrum`, summed over the pairs' FFTs ``Y`` (real) and ``Z`` (made):
    ``power`` = ``sum |Z|^2 / sum |Y|^2`` (the power ratio), ``correlation`` = ``sum Re(Y conj Z) /
    sqrt(sum |Y|^2 sum |Z|^2)`` (1: the band drawn in place; 0: power at the right frequencies in the
    wrong place, such as noise drawn afresh) and ``error`` = ``sum |Y - Z|^2 / sum |Y|^2`` (the band's
    squared error over its real power; ``1 + power - 2 correlation sqrt(power)``). ``mse_share``: each
    band's part of the pairs' total squared error (over every frequency, so the shares of the bands add
    up to a little under 1: the zero frequency and the corners beyond Nyquist are left out).

    Returns:
        ``{"edges", "power", "correlation", "error", "mse_share"}``, float64 arrays (``bands`` each;
        ``edges`` ``bands + 1``).
    Raises:
        ValueError: no images, or ``made`` not paired with ``real`` (another shape).
    """
    y = _spectrum_batch(real, "band_coherence")
    z = _spectrum_batch(made, "band_coherence")
    if y.shape != z.shape:
        raise ValueError(f"band_coherence: {len(z)} made images of {z.shape[1:]} are not paired with "
                         f"{len(y)} real images of {y.shape[1:]}")
    edges, members = utils.frequency_bands(*y.shape[1:3], bands)
    sums = {k: np.zeros(y.shape[1:3]) for k in ("yy", "zz", "yz", "err")}
    for i in range(0, len(y), 64):  # bounded memory
        fy, fz = np.fft.fft2(y[i:i + 64]), np.fft.fft2(z[i:i + 64])
        sums["yy"] += (np.abs(fy) ** 2).sum(0)
        sums["zz"] += (np.abs(fz) ** 2).sum(0)
        sums["yz"] += np.real(fy * np.conj(fz)).sum(0)
        sums["err"] += (np.abs(fy - fz) ** 2).sum(0)
    per = {k: np.array([v[m].sum() for m in members]) for k, v in sums.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"edges": edges, "power": per["zz"] / per["yy"],
                "correlation": per["yz"] / np.sqrt(per["yy"] * per["zz"]),
                "error": per["err"] / per["yy"], "mse_share": per["err"] / sums["err"].sum()}


def cheapest_power_error(correlation, target: float):
    """A band's least squared error over its real power once its power ratio is ``target``, when the only
    knowledge of the real band is what a decoder with this ``correlation`` already draws.

    Outputs ``a Z + N`` (the band scaled, plus anything uncorrelated with the real band) of power
    ``target`` have error ``1 + target - 2 a correlation sqrt(power)``, least when all the power is the
    scaled band: ``1 + target - 2 correlation sqrt(target)``. Noise drawn afresh (correlation 0) costs
    its whole power: ``1 + target``. The floor under how much PSNR lifting a band's power must cost a
    decoder that knows no more of it.
    """
    rho = np.clip(np.nan_to_num(np.asarray(correlation, np.float64)), 0.0, 1.0)
    return 1.0 + target - 2.0 * rho * np.sqrt(target)


def power_spectrum_ratios(real, sets: dict[str, Any], bands: int = POWER_BANDS) -> tuple[dict[str, Any], dict]:
    """Power of each image set over the real images' per band of :func:`radial_power_spectrum`.

    A ratio below 1 in the upper bands is blur (power lost), above 1 noise or artefacts; the
    reconstructions of a decoder that keeps a scan's detail lie near 1 in every band.

    Args:
        real: the reference images (e.g. the real test split).
        sets: ``{name: images}``, e.g. ``{"reconstructions": ..., "samples": ...}``.
    Returns:
        ``(metrics, spectra)``. ``metrics``: ``power_band_edges`` (cycles per pixel) and per set
        ``power_ratio_<name>`` (one ratio per band, low to high frequency) with its ``_min`` and
        ``_max``; ``spectra``: ``{"real": power, name: power}`` per band, for the figure.
    """
    edges, reference = radial_power_spectrum(real, bands)
    metrics: dict[str, Any] = {"power_band_edges": [round(float(e), 4) for e in edges]}
    spectra = {"real": reference}
    for name, images in sets.items():
        _, power = radial_power_spectrum(images, bands)
        ratio = power / reference
        spectra[name] = power
        metrics[f"power_ratio_{name}"] = [round(float(r), 4) for r in ratio]
        metrics[f"power_ratio_{name}_min"] = float(np.nanmin(ratio))
        metrics[f"power_ratio_{name}_max"] = float(np.nanmax(ratio))
    return metrics, spectra


# ----------------------------------------------------------------------------------------------
# The prior
# ----------------------------------------------------------------------------------------------

def previous_codes(codes, previous_index, no_previous: int) -> np.ndarray:
    """Each grid's previous slice's codes: ``codes[previous_index]``, ``no_previous`` where the index is -1.

    Args: codes int ``(N, h, w)``; previous_index int ``(N,)`` (``dataset.previous_slice_index``).
    Returns: int32 ``(N, h, w)``.
    """
    codes, index = np.asarray(codes, np.int32), np.asarray(previous_index)
    out = codes[np.maximum(index, 0)].copy()
    out[index < 0] = no_previous
    return out


def code_nll(prior, codes, condition=None, batch_size: int = 64, previous=None, top=None) -> np.ndarray:
    """Per-position negative log-likelihood, in nats, of the given codes under the prior.

    The prior's logits at ``(i, j)`` see only codes before ``(i, j)`` in raster order, so this is
    ``-log p(code[i, j] | earlier codes, condition)``: summed over the grid it is the exact NLL of
    the slice, and a high value marks a code the prior did not expect there (anomaly maps).

    Args:
        prior: a ``PixelCNN`` (logits ``(B, h, w, K)``).
        codes: int ``(N, h, w)``.
        condition: int ``(N,)`` (or one int for all) slice positions for a conditioned prior. None
            for an unconditioned prior; for a conditioned one, None means its learned "no
            condition" slot (``prior.null_condition``, classifier-free guidance), which a prior
            trained without condition dropout does not have (``ValueError``).
        batch_size: grids per forward pass.
        previous: int ``(N, h, w)``, the previous slices' codes (``previous_codes``), for a prior with
            ``previous_slice``; None: its "no previous slice".
        top: int ``(N, *top_grid_shape)``, the top level's codes of the same slices, for the fine
            prior of a two-level model (required there): its NLL is then that of the fine codes
            given the top ones.
    Returns:
        float32 ``(N, h, w)``: the sparse categorical cross-entropy (from logits) at each position.
    """
    import keras

    from pixelcnn import pack_inputs

    codes = np.asarray(codes).astype(np.int32)
    if codes.ndim != 3:
        raise ValueError(f"code_nll: codes must be (N, h, w), got shape {codes.shape}")
    if condition is None and getattr(getattr(prior, "config", None), "num_conditions", 0):
        if not getattr(prior, "has_null_condition", False):
            raise ValueError("code_nll: this prior is conditioned on slice position and has no 'no condition' "
                             "slot; pass the slice positions as condition")
        condition = prior.null_condition
    if condition is not None:
        condition = np.broadcast_to(np.asarray(condition, dtype=np.int32), (len(codes),))
    out = []
    for i in range(0, len(codes), batch_size):
        batch = codes[i:i + batch_size]
        rows = [None if a is None else np.asarray(a[i:i + batch_size], np.int32) for a in (condition, previous, top)]
        logits = prior(pack_inputs(batch, *rows), training=False)
        out.append(np.asarray(keras.ops.sparse_categorical_crossentropy(batch, logits, from_logits=True)))
    return np.concatenate(out).astype(np.float32)


def prior_nll(prior, codes, condition=None, batch_size: int = 64, previous=None, top=None) -> dict[str, float]:
    """The prior's mean NLL of a set of code grids, in bits per code and in bits per slice.

    Bits per code depend on the grid (a 16x16 grid packs more of the image into each code than a
    32x32 one); bits per slice (the sum over the grid) compare priors across grids.

    Returns:
        ``{"bits_per_code": float, "bits_per_slice": float}``.
    """
    nll = code_nll(prior, codes, condition, batch_size, previous, top).astype(np.float64)
    per_slice = nll.sum(axis=(1, 2)) / LOG2
    return {"bits_per_code": float(nll.mean() / LOG2), "bits_per_slice": float(per_slice.mean())}


# ----------------------------------------------------------------------------------------------
# Generation: realism, memorisation, interior realism, diversity
# ----------------------------------------------------------------------------------------------

def nearest_by_ssim(samples, references, chunk: int = 256, desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each sample, the highest SSIM against any reference image and that reference's index.

    Realism is this against the test split, memorisation against the training split (a sample
    above 0.95 is counted as a copy).

    Args:
        samples: ``(N, H, W, 1)`` in [0, 1]; references: ``(M, H, W, 1)`` in [0, 1] (or uint8).
    Returns:
        ``(best_ssim (N,), best_index (N,))``.
    """
    scores = ssim_matrix(samples, references, chunk=chunk, desc=desc)  # (N, M)
    index = scores.argmax(axis=1)
    return scores[np.arange(len(scores)), index], index


def mean_pairwise_ms_ssim(images, max_pairs: int = 256, seed: int = 0) -> float:
    """Mean MS-SSIM over unordered pairs of distinct images (lower = more diverse).

    All pairs when there are at most ``max_pairs`` of them; otherwise a seeded uniform sample of
    ``max_pairs`` pairs (an unbiased estimate: 64 images have 2,016 pairs, and
    ``tf.image.ssim_multiscale`` takes about 0.05 s a pair on 2 CPU cores at 128x128).
    """
    images = _as_float_images(images)
    i, j = np.triu_indices(len(images), k=1)
    if len(i) == 0:
        raise ValueError("diversity needs at least two images")
    if len(i) > max_pairs:
        pick = np.random.default_rng(seed).choice(len(i), size=max_pairs, replace=False)
        i, j = i[pick], j[pick]
    return _mean_ms_ssim(images[i], images[j])


def _mean_ms_ssim(a, b, chunk: int = 64) -> float:
    """Mean :func:`ms_ssim` of the aligned pairs ``(a[k], b[k])``, computed ``chunk`` pairs at a time."""
    return float(np.concatenate([ms_ssim(a[t:t + chunk], b[t:t + chunk]) for t in range(0, len(a), chunk)]).mean())


# ----------------------------------------------------------------------------------------------
# Sharpness inside the brain
# ----------------------------------------------------------------------------------------------

def sobel_magnitude(images) -> np.ndarray:
    """Sobel gradient magnitude of each image, ``(N, H, W, 1) -> (N, H, W)`` float64.

    ``skimage.filters.sobel``: ``sqrt((Gx**2 + Gy**2) / 2)`` with the kernels
    ``[1, 2, 1]^T [1, 0, -1] / 4`` (and transposed), reflected at the border.
    """
    from skimage.filters import sobel

    x = utils.as_image_batch(_as_float_images(images))[..., 0].astype(np.float64)
    return np.stack([sobel(im) for im in x])


def sharpness(images, threshold: float = 0.1, margin: int | None = None) -> np.ndarray:
    """Per image, the mean Sobel gradient magnitude inside the brain, away from its outline.

    Blur lowers it while barely lowering SSIM, so it is reported beside realism: samples' mean
    over real test slices' mean should be near 1. Each image gets its own
    :func:`brain_interior_mask`.

    Returns:
        float64 ``(N,)``; NaN for an image in which no head interior was found.
    """
    x = utils.as_image_batch(_as_float_images(images))
    grads = sobel_magnitude(x)
    out = np.full(len(x), np.nan)
    for k in range(len(x)):
        mask = brain_interior_mask(x[k], threshold, margin)
        if mask.any():
            out[k] = grads[k][mask].mean()
    return out


# ----------------------------------------------------------------------------------------------
# Feature-space metrics (features of the judge, judge.py)
# ----------------------------------------------------------------------------------------------

def frechet_distance(a, b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula).

    ``|mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2))``, with sample means and
    covariances (``np.cov``, N - 1); Heusel et al. 2017 use Inception features, here the judge's.
    ``S_a S_b`` is similar to the PSD matrix ``S_a^(1/2) S_b S_a^(1/2)``, so the trace of its
    square root is the sum of the square roots of its (real, non-negative) eigenvalues: exact
    even when fewer images than feature dimensions make the covariances singular, where
    ``scipy.linalg.sqrtm`` warns and loses accuracy.

    Args:
        a: ``(N, D)``; b: ``(M, D)``; N, M >= 2.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance: need (N, D) and (M, D) features with N, M >= 2, got {a.shape}, {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    eig = np.linalg.eigvals(s_a @ s_b).real
    tr_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()  # rounding can leave tiny negative eigenvalues
    fd = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_sqrt
    return float(max(fd, 0.0))


def _kth_neighbour_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point of ``x`` to its k-th nearest other point of ``x``."""
    from scipy.spatial.distance import cdist

    return np.sort(cdist(x, x), axis=1)[:, k]  # column 0 is the point itself


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) in a feature space.

    Each set's manifold is the union of balls around its points, each ball reaching the point's
    k-th nearest neighbour in its own set. Precision: the fraction of ``fake`` points inside the
    real manifold (samples look real). Recall: the fraction of ``real`` points inside the fake
    manifold (the samples cover the real variety).

    Args:
        real: ``(N, D)``; fake: ``(M, D)``; both with more than ``k`` points.
    Returns:
        ``(precision, recall)`` in [0, 1].
    """
    from scipy.spatial.distance import cdist

    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision_recall: need more than k={k} points in each set, got {len(real)} and {len(fake)}")
    d = cdist(fake, real)  # (M, N)
    precision = (d <= _kth_neighbour_radii(real, k)[None, :]).any(axis=1).mean()
    recall = (d <= _kth_neighbour_radii(fake, k)[:, None]).any(axis=0).mean()
    return float(precision), float(recall)


# ----------------------------------------------------------------------------------------------
# All generation metrics of a set of samples
# ----------------------------------------------------------------------------------------------

def reference_pick(num_test: int, num: int, seed: int = 0) -> np.ndarray:
    """Indices of ``min(num, num_test)`` distinct test slices, seeded: the real slices whose positions
    a conditioned prior is asked for, and the real set that sample diversity is compared with."""
    return np.random.default_rng(seed).choice(num_test, size=min(num, num_test), replace=False)


def validate_pick(num_validate: int, num: int, seed: int = 0) -> np.ndarray:
    """Indices of ``min(num, num_validate)`` distinct validate slices, seeded: the real unseen slices
    scored like samples (the floor of each metric) and reconstructed (the decoder's ceiling)."""
    return np.random.default_rng([seed, 1]).choice(num_validate, size=min(num, num_validate), replace=False)


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def score_samples(samples, splits, pick=None, requested=None, judge=None, vqvae=None, seed: int = 0,
                  progress: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every generation metric of ``samples`` against a run's real splits.

    Args:
        samples: float ``(N, H, W, 1)`` in [0, 1], N >= 2.
        splits: ``{"train", "validate", "test"} -> dataset.Split`` (uint8 slices + slice indices).
        pick: indices into the test split of the real slices to compare diversity with (default
            :func:`reference_pick`); a conditioned prior is usually asked for their positions.
        requested: int ``(N,)`` slice positions a conditioned prior was asked for, or None.
        judge: the run's judge (``judge.keras``) or None to skip the judge's metrics.
        vqvae: the run's VQ-VAE, or None; given, the validation subset's reconstructions are
            scored like samples (sharpness, and with a judge Frechet distance and precision /
            recall): the best a prior can do through this decoder, which separates what the
            VQ-VAE loses from what the prior gets wrong.
        seed: seeds the choice of pairs for diversity and of the validation subset.
    Returns:
        ``(metrics, details)``. ``metrics`` (JSON-ready floats):

        * realism: best SSIM of each sample against the test split -- mean, fraction above 0.6;
          the same for ``min(N, |validate|)`` seeded real validation slices (the level real unseen
          slices reach: on noisy scans it sits near 0.6 too);
        * memorisation: the same against the training split -- mean, copies (> 0.95);
        * interior realism: the same search on the central half (:func:`center_crop`) against
          test crops, for the samples and for ``min(N, |validate|)`` seeded validation slices
          (the level real unseen slices reach), and samples / real;
        * sharpness: mean :func:`sharpness` of samples and of all test slices, and their ratio;
        * diversity: mean pairwise MS-SSIM of samples and of the ``pick`` test slices;
        * with a judge: Frechet distance of its features, samples vs test and (the floor a
          perfect generator reaches, with the same number of images) the validation subset vs
          test; precision / recall (k = 3) of samples and of the validation subset against test;
          the judge's own median slice error on real test slices; with ``requested`` also the
          slice agreement, median |judge's slice - requested slice| over the samples;
        * with a VQ-VAE: the same for reconstructions of the validation subset (``*_reconstructions``),
          and with a judge its median slice error on them: the slice agreement a prior reaches at best
          through this decoder.

        ``details``: per-sample arrays ``realism``, ``nearest_test`` (index of the best test
        slice), ``memorisation``, ``interior_realism``, ``sharpness``, and with a judge
        ``judge_slice``.
    """
    samples = utils.as_image_batch(_as_float_images(samples))
    test, train, val = splits["test"], splits["train"], splits["validate"]
    n = len(samples)
    if n < 2:
        raise ValueError("score_samples: needs at least two samples (diversity compares pairs)")
    if len(val) < 2 or len(test) < 2:
        raise ValueError(f"score_samples: needs at least two validate and two test slices, got {len(val)} and {len(test)}")
    pick = reference_pick(len(test), n, seed) if pick is None else np.asarray(pick)
    val_pick = validate_pick(len(val), n, seed)
    val_images = _as_float_images(val.images[val_pick])

    def desc(text):
        return text if progress else None

    realism, nearest = nearest_by_ssim(samples, test.images, desc=desc("realism (vs test)"))
    realism_real, _ = nearest_by_ssim(val_images, test.images, desc=desc("realism, validate (vs test)"))
    memo, _ = nearest_by_ssim(samples, train.images, desc=desc("memorisation (vs train)"))
    test_crops = center_crop(test.images)  # uint8, converted chunk by chunk
    interior, _ = nearest_by_ssim(center_crop(samples), test_crops, desc=desc("interior realism"))
    interior_real, _ = nearest_by_ssim(center_crop(val_images), test_crops, desc=desc("interior realism, validate"))
    sharp, sharp_real = sharpness(samples), sharpness(test.images)
    metrics: dict[str, Any] = {
        "num_samples": n,
        "realism_ssim_mean": float(realism.mean()),
        "realism_fraction_above_0.6": float((realism > 0.6).mean()),
        "realism_ssim_mean_real_validate": float(realism_real.mean()),
        "realism_fraction_above_0.6_real_validate": float((realism_real > 0.6).mean()),
        "memorisation_ssim_mean": float(memo.mean()),
        "memorisation_copies_above_0.95": int((memo > 0.95).sum()),
        "interior_realism_samples": float(interior.mean()),
        "interior_realism_real_validate": float(interior_real.mean()),
        "sharpness_samples": float(np.nanmean(sharp)),
        "sharpness_real_test": float(np.nanmean(sharp_real)),
        "diversity_ms_ssim_samples": mean_pairwise_ms_ssim(samples, seed=seed),
        "diversity_ms_ssim_real_test": mean_pairwise_ms_ssim(test.images[pick], seed=seed),
    }
    metrics["interior_realism_ratio"] = _ratio(metrics["interior_realism_samples"],
                                               metrics["interior_realism_real_validate"])
    metrics["sharpness_ratio"] = _ratio(metrics["sharpness_samples"], metrics["sharpness_real_test"])
    details = {"realism": realism, "nearest_test": nearest, "memorisation": memo, "interior_realism": interior,
               "sharpness": sharp}
    recon = None
    if vqvae is not None:
        _, recon = reconstruct(vqvae, val_images)
        metrics["sharpness_reconstructions"] = float(np.nanmean(sharpness(recon)))
    if judge is not None:
        from judge import judge_outputs

        f_samples, slice_samples = judge_outputs(judge, samples)
        f_test, slice_test = judge_outputs(judge, test.images)
        f_val, _ = judge_outputs(judge, val_images)
        metrics["judge_frechet_samples_vs_test"] = frechet_distance(f_samples, f_test)
        metrics["judge_frechet_validate_vs_test"] = frechet_distance(f_val, f_test)
        metrics["judge_frechet_ratio"] = _ratio(metrics["judge_frechet_samples_vs_test"],
                                                metrics["judge_frechet_validate_vs_test"])
        k = 3
        if min(len(f_test), len(f_samples), len(f_val)) > k:
            metrics["judge_precision"], metrics["judge_recall"] = precision_recall(f_test, f_samples, k)
            metrics["judge_precision_validate"], metrics["judge_recall_validate"] = precision_recall(f_test, f_val, k)
        if recon is not None:
            f_recon, slice_recon = judge_outputs(judge, recon)
            metrics["judge_slice_error_reconstructions"] = float(
                np.median(np.abs(slice_recon - val.slice_indices[val_pick])))
            metrics["judge_frechet_reconstructions_vs_test"] = frechet_distance(f_recon, f_test)
            if min(len(f_test), len(f_recon)) > k:
                metrics["judge_precision_reconstructions"], metrics["judge_recall_reconstructions"] = (
                    precision_recall(f_test, f_recon, k))
        metrics["judge_slice_error_real_test"] = float(np.median(np.abs(slice_test - test.slice_indices)))
        if requested is not None:
            requested = np.broadcast_to(np.asarray(requested), (n,))
            metrics["slice_agreement_median_abs_error"] = float(np.median(np.abs(slice_samples - requested)))
        details["judge_slice"] = slice_samples
    return metrics, details


# ----------------------------------------------------------------------------------------------
# Whole subjects: slabs of consecutive slices (predict.py subject)
# ----------------------------------------------------------------------------------------------

def _as_slabs(slabs) -> np.ndarray:
    """``(N, S, H, W[, 1])`` in [0, 1] (or uint8) -> float32 ``(N, S, H, W, 1)``."""
    x = _as_float_images(slabs)
    if x.ndim == 4:
        x = x[..., None]
    if x.ndim != 5 or x.shape[1] < 2:
        raise ValueError(f"slabs must be (N, S, H, W[, 1]) with S >= 2 slices, got {np.shape(slabs)}")
    return x


def adjacent_slice_ssim(slabs) -> np.ndarray:
    """SSIM of each slice with the next one in its slab: ``(N, S, H, W[, 1]) -> (N, S - 1)``.

    Consecutive slices of one head are alike but not equal: a generated slab whose value sits far
    below real slabs' jumps between slices, one far above copies the slice before.
    """
    x = _as_slabs(slabs)
    n, s = x.shape[:2]
    return ssim(x[:, :-1].reshape(-1, *x.shape[2:]), x[:, 1:].reshape(-1, *x.shape[2:])).reshape(n, s - 1)


def spearman(a, b) -> float:
    """Spearman's rank correlation of two equal-length sequences (NaN when one is constant)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def slab_order(judge, slabs) -> np.ndarray:
    """Per slab, the Spearman correlation of the judge's predicted slice position with the slice index
    (1: the slab runs from low to high in order, as a real one does): ``(N,)``."""
    from judge import judge_outputs

    x = _as_slabs(slabs)
    _, predicted = judge_outputs(judge, x.reshape(-1, *x.shape[2:]))
    predicted = predicted.reshape(x.shape[:2])
    return np.array([spearman(p, np.arange(len(p))) for p in predicted])


def between_subject_ms_ssim(slabs, max_pairs: int = 256, seed: int = 0) -> float:
    """Mean MS-SSIM between the same slice of two different slabs (lower: subjects differ more).

    Pairs of slabs ``(a, b)`` and a slice ``k`` are drawn at random (seeded) among all of them.
    """
    x = _as_slabs(slabs)
    n, s = x.shape[:2]
    if n < 2:
        raise ValueError("between-subject diversity needs at least two slabs")
    i, j = np.triu_indices(n, k=1)
    pairs = [(a, b, k) for a, b in zip(i, j) for k in range(s)]
    rng = np.random.default_rng(seed)
    if len(pairs) > max_pairs:
        pairs = [pairs[p] for p in rng.choice(len(pairs), size=max_pairs, replace=False)]
    a = np.stack([x[p, k] for p, _, k in pairs])
    b = np.stack([x[q, k] for _, q, k in pairs])
    return _mean_ms_ssim(a, b)


def subject_scores(generated, real, independent=None, test_images=None, judge=None,
                   two_sample_splits=None, seed: int = 0) -> dict[str, Any]:
    """Every whole-subject metric of generated slabs beside real ones.

    Args:
        generated: ``(N, S, H, W[, 1])`` generated subjects (slice 0 lowest).
        real: ``(M, S, H, W[, 1])`` real test subjects (``dataset.subjects`` of the test split).
        independent: optional ``(N, S, ...)`` slabs of slices drawn independently at positions
            0..S-1 (no previous slice): what consecutive slices look like without the condition.
        test_images: the test split's images, for realism (best SSIM of each generated slice).
        judge: the run's judge, for the slice order of each slab (Spearman).
        two_sample_splits: the run's splits, for the classifier two-sample test of the generated
            slices against the test slices (full view; 0.5: indistinguishable, 1: told apart).
    Returns:
        ``adjacent_ssim_{generated,real,independent}`` (means over slices and slabs),
        ``adjacent_ssim_ratio`` (generated / real; the target is 0.85-1.05),
        ``judge_spearman_{generated,real,independent}`` (mean over slabs), ``realism_mean``,
        ``realism_fraction_above_0.6``, ``between_subject_ms_ssim_{generated,real}`` (diversity) and
        ``two_sample_subjects_full`` (with ``_interval`` and ``_p``) and the test's power rows beside it
        (``two_sample_blurred_real_full``, ...: ``two_sample.POWER_ROWS``).
    """
    generated, real = _as_slabs(generated), _as_slabs(real)
    out: dict[str, Any] = {"num_subjects": len(generated), "num_real_subjects": len(real),
                           "slices_per_subject": int(generated.shape[1])}
    slabs = {"generated": generated, "real": real}
    if independent is not None:
        slabs["independent"] = _as_slabs(independent)
    for name, x in slabs.items():
        out[f"adjacent_ssim_{name}"] = float(adjacent_slice_ssim(x).mean())
    out["adjacent_ssim_ratio"] = _ratio(out["adjacent_ssim_generated"], out["adjacent_ssim_real"])
    if judge is not None:
        for name, x in slabs.items():
            order = slab_order(judge, x)  # NaN for a slab the judge puts at one position throughout
            out[f"judge_spearman_{name}"] = float(np.nanmean(order)) if np.isfinite(order).any() else float("nan")
    flat = generated.reshape(-1, *generated.shape[2:])
    if test_images is not None:
        realism, _ = nearest_by_ssim(flat, test_images, desc="subjects: realism")
        out["realism_mean"] = float(realism.mean())
        out["realism_fraction_above_0.6"] = float((realism > 0.6).mean())
    if len(generated) > 1:
        out["between_subject_ms_ssim_generated"] = between_subject_ms_ssim(generated, seed=seed)
    if len(real) > 1:
        out["between_subject_ms_ssim_real"] = between_subject_ms_ssim(real, seed=seed)
    if two_sample_splits is not None:
        scores = two_sample_scores(two_sample_splits, samples=flat, seed=seed, views=("full",), floor=False,
                                   progress=False)
        # the subjects' slices against real slices, with the test's power rows beside them
        out.update({k.replace("two_sample_samples_", "two_sample_subjects_"): v for k, v in scores.items()})
    return out


# ----------------------------------------------------------------------------------------------
# The anatomy judge: segment samples, reconstructions and real slices alike (anatomy.py measures)
# ----------------------------------------------------------------------------------------------

# anatomy.py's measures, re-exported so that every metric is reached from here.
from anatomy import (TISSUE_NAMES, AnatomyReadout, anatomy_readout, anatomy_summary, area_difference,  # noqa: E402,F401
                     plot_anatomy, subject_anatomy, tissue_dice)

MIN_SEGMENTER_DICE = 0.7  # below this on the real test split, the segmenter's readings mean little


def anatomy_scores(segmenter, sets: dict[str, tuple[Any, Any]], test_images, test_positions,
                   test_masks=None, batch_size: int = 64) -> tuple[dict[str, Any], dict[str, AnatomyReadout]]:
    """The anatomy judge's figures of each image set against the real test split.

    Args:
        segmenter: the run's ``segmenter.keras``.
        sets: ``name -> (images (N, H, W, 1), slice positions (N,) or None)``, N >= 2 each; include
            ``"real_validate"`` (real unseen slices): its figures are the floor a perfect generator
            reaches, the others read beside it (samples, reconstructions, subjects).
        test_images, test_positions: the real test split (uint8 or float) and its slice indices.
        test_masks: the test split's true tissue labels, if any: the segmenter's own Dice on them is
            reported, and a warning says when it is below :data:`MIN_SEGMENTER_DICE` (an untrained
            segmenter's figures would read as anatomy that is not there).
    Returns:
        ``(metrics, readouts)``. Per set ``S``: ``anatomy_area_difference_S`` (mean over tissues) and
        ``anatomy_area_difference_{csf,grey,white}_S``, ``anatomy_components_{csf,grey,white}_S`` and
        ``anatomy_components_S`` (their sum), ``anatomy_ventricle_area_S``,
        ``anatomy_ventricle_symmetry_S``, ``anatomy_confidence_S``, ``anatomy_frechet_S_vs_test``;
        the same properties of the real test slices (``_real_test``); ``anatomy_segmenter_test_dice_*``
        with ``test_masks``. ``readouts``: the :class:`AnatomyReadout` of each set and ``"real_test"``.
    Raises:
        ValueError: a set with fewer than two images, or no test slices.
    """
    if len(test_images) < 2:
        raise ValueError(f"anatomy_scores: needs at least two test slices, got {len(test_images)}")
    for name, (images, _) in sets.items():
        if len(images) < 2:
            raise ValueError(f"anatomy_scores: the set {name!r} has {len(images)} image(s); needs at least two")
    test = anatomy_readout(segmenter, test_images, batch_size)
    readouts = {"real_test": test}
    metrics: dict[str, Any] = {}
    if test_masks is not None:
        dice = tissue_dice(test.labels, test_masks)
        metrics.update({f"anatomy_segmenter_test_dice_{k}": v for k, v in dice.items()})
        worst = min(dice.values())
        if not worst >= MIN_SEGMENTER_DICE:
            warnings.warn(f"the segmenter's Dice on the real test split is {worst:.2f} (below "
                          f"{MIN_SEGMENTER_DICE}): its anatomy figures mean little; train it longer "
                          "(python train.py --stage segmenter)", stacklevel=2)
    if len(np.unique(test.labels)) < 2:
        warnings.warn("the segmenter labels every real test pixel alike: it did not learn, so its anatomy "
                      "figures mean nothing", stacklevel=2)
    metrics.update(anatomy_summary(test, "real_test"))
    for name, (images, positions) in sets.items():
        r = anatomy_readout(segmenter, images, batch_size)
        readouts[name] = r
        diff = area_difference(r, positions, test, test_positions)
        metrics[f"anatomy_area_difference_{name}"] = float(diff.mean())
        for k, tissue in enumerate(TISSUE_NAMES):
            metrics[f"anatomy_area_difference_{tissue}_{name}"] = float(diff[k])
        metrics.update(anatomy_summary(r, name))
        metrics[f"anatomy_frechet_{name}_vs_test"] = frechet_distance(r.features, test.features)
    return metrics, readouts
