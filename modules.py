"""VQ-VAE and PixelCNN priors for brain MRI slices (Keras 3): the names users import. Nothing runs on import.

The VQ-VAE lives in :mod:`vqvae`, the priors in :mod:`pixelcnn` and their layers in :mod:`prior_layers`;
this module gathers them, so
``from modules import VQVAE, PixelCNN`` and ``import modules`` (which registers every layer) work as
they always have.

Contents:

* :class:`VectorQuantizer` -- the codebook layer (van den Oord et al. 2017, "Neural Discrete
  Representation Learning"), optionally with exponential-moving-average codebook updates
  (Razavi et al. 2019, VQ-VAE-2; sonnet ``VectorQuantizerEMA``) and dead-code restarts.
* :class:`ResidualBlock` -- ``x + Conv1x1(ReLU(Conv3x3(ReLU(x))))`` as in the VQ-VAE paper.
* :class:`VQVAEConfig` / :class:`VQVAE` -- encoder, vector quantiser and decoder as one
  ``keras.Model`` that trains with ``compile(optimizer=...)`` + ``fit(images)``.
* :class:`MaskedConv2D`, :class:`GatedPixelCNNBlock`, :class:`MaskedResidualBlock`,
  :class:`CausalAttentionBlock`, :class:`CodeGridMap`, :class:`PreviousSliceMap`, :class:`PriorConfig` /
  :class:`PixelCNN` -- autoregressive priors over the code grid: the plain masked stack (mask A, then
  mask B) and the gated PixelCNN without a blind spot, optionally with causal self-attention blocks,
  conditioned on the slice position (with a "no condition" slot for classifier-free guidance), on the
  previous slice's codes and, as the fine level of two, on a top level's codes. Each of these layers has an
  ``init_cache`` / ``step`` pair for incremental generation; sampling lives in
  ``sampler.sample_codes``.

Every layer and model is registered with ``keras.saving.register_keras_serializable`` under the
package ``"oasis_vqvae"``, so after ``import modules`` a ``.keras`` file loads with
``keras.models.load_model(path)`` and no ``custom_objects``.

Shape conventions: images are ``(B, H, W, 1)`` float32 in ``[0, 1]``; the latent grid is
``(B, h, w, D)`` with ``h = H / downsample``; code indices are int32 ``(B, h, w)``.
"""

from keras_common import _PACKAGE  # noqa: F401
from pixelcnn import PixelCNN, PriorConfig  # noqa: F401
from prior_layers import (CausalAttentionBlock, CodeGridMap, GatedPixelCNNBlock, MaskedConv2D,  # noqa: F401
                          MaskedResidualBlock, PreviousSliceMap, causal_mask, grid_position_encoding)
from vqvae import (VQVAE, ResidualBlock, VectorQuantizer, VQVAEConfig, _mean_ssim, adaptive_weight,  # noqa: F401
                   band_power_loss, build_decoder, build_discriminator, build_encoder, gradient_loss,
                   hinge_discriminator_loss, spectral_loss)

__all__ = ["VectorQuantizer", "ResidualBlock", "VQVAEConfig", "VQVAE", "build_encoder", "build_decoder",
           "build_discriminator", "hinge_discriminator_loss", "adaptive_weight", "spectral_loss", "gradient_loss",
           "band_power_loss", "causal_mask", "MaskedConv2D", "GatedPixelCNNBlock", "MaskedResidualBlock", "CausalAttentionBlock",
           "grid_position_encoding", "CodeGridMap", "PreviousSliceMap", "PriorConfig", "PixelCNN"]
