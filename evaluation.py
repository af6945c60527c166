"""Every evaluation metric of the tool, computed once, here; ``train.py``, ``predict.py``, the benches
and the tests all call these functions.

* chunked encoding / decoding: :func:`encode_images`, :func:`decode_codes`, :func:`reconstruct`;
* reconstruction quality: :func:`reconstruction_metrics` (SSIM / PSNR), code usage: :func:`code_usage`;
* the prior: :func:`code_nll` (per-position cross-entropy in nats), :func:`prior_nll` (bits per code
  and bits per slice);
* generation: realism / memorisation (:func:`nearest_by_ssim`), interior realism on the central half
  (:func:`center_crop`), diversity (:func:`mean_pairwise_ms_ssim`), interior sharpness
  (:func:`brain_interior_mask`, :func:`interior_sharpness`);
* in the judge's feature space (``judge.py``): :func:`frechet_distance` and
  :func:`precision_recall` (Kynkaanniemi et al. 2019).

Images are float32 ``(N, H, W, 1)`` in ``[0, 1]``; codes are int ``(N, h, w)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import utils

LOG2 = math.log(2.0)


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
        ``{"ssim": (N,), "psnr": (N,), "ssim_mean": float, "psnr_mean": float}`` (``utils.ssim`` /
        ``utils.psnr``: ``tf.image`` definitions on [0, 1] images).
    """
    ssim, psnr = utils.ssim(images, recon), utils.psnr(images, recon)
    return {"ssim": ssim, "psnr": psnr, "ssim_mean": float(ssim.mean()), "psnr_mean": float(psnr.mean())}


# ----------------------------------------------------------------------------------------------
# The prior
# ----------------------------------------------------------------------------------------------

def code_nll(prior, codes, condition=None, batch_size: int = 64) -> np.ndarray:
    """Per-position negative log-likelihood, in nats, of the given codes under the prior.

    The prior's logits at ``(i, j)`` see only codes before ``(i, j)`` in raster order, so this is
    ``-log p(code[i, j] | earlier codes, condition)``: summed over the grid it is the exact NLL of
    the slice, and a high value marks a code the prior did not expect there (anomaly maps).

    Args:
        prior: a ``PixelCNN`` (logits ``(B, h, w, K)``).
        codes: int ``(N, h, w)``.
        condition: int ``(N,)`` (or one int for all) slice positions for a conditioned prior; None
            calls the prior on the codes alone.
        batch_size: grids per forward pass.
    Returns:
        float32 ``(N, h, w)``: the sparse categorical cross-entropy (from logits) at each position.
    """
    import keras

    codes = np.asarray(codes).astype(np.int32)
    if codes.ndim != 3:
        raise ValueError(f"code_nll: codes must be (N, h, w), got shape {codes.shape}")
    if condition is not None:
        condition = np.broadcast_to(np.asarray(condition, dtype=np.int32), (len(codes),))
    out = []
    for i in range(0, len(codes), batch_size):
        batch = codes[i:i + batch_size]
        inputs = batch if condition is None else (batch, condition[i:i + batch_size])
        logits = prior(inputs, training=False)
        out.append(np.asarray(keras.ops.sparse_categorical_crossentropy(batch, logits, from_logits=True)))
    return np.concatenate(out).astype(np.float32)


def prior_nll(prior, codes, condition=None, batch_size: int = 64) -> dict[str, float]:
    """The prior's mean NLL of a set of code grids, in bits per code and in bits per slice.

    Bits per code depend on the grid (a 16x16 grid packs more of the image into each code than a
    32x32 one); bits per slice (the sum over the grid) compare priors across grids.

    Returns:
        ``{"bits_per_code": float, "bits_per_slice": float}``.
    """
    nll = code_nll(prior, codes, condition, batch_size).astype(np.float64)
    per_slice = nll.sum(axis=(1, 2)) / LOG2
    return {"bits_per_code": float(nll.mean() / LOG2), "bits_per_slice": float(per_slice.mean())}
