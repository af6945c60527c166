"""The VQ-VAE (Keras 3): vector quantiser, encoder, decoder and the optional PatchGAN. Nothing runs on import.

* :class:`VectorQuantizer` -- the codebook layer (van den Oord et al. 2017, "Neural Discrete
  Representation Learning"), optionally with exponential-moving-average codebook updates
  (Razavi et al. 2019, VQ-VAE-2; sonnet ``VectorQuantizerEMA``) and dead-code restarts.
* :class:`ResidualBlock` -- ``x + Conv1x1(ReLU(Conv3x3(ReLU(x))))`` as in the VQ-VAE paper.
* :class:`VQVAEConfig` / :class:`VQVAE` -- encoder, vector quantiser and decoder as one
  ``keras.Model`` that trains with ``compile(optimizer=...)`` + ``fit(images)``.

Users import these from :mod:`modules`. Shape conventions: images are ``(B, H, W, 1)`` float32 in
``[0, 1]``; the latent grid is ``(B, h, w, D)`` with ``h = H / downsample``; code indices are int32
``(B, h, w)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
from keras import ops

import utils
from keras_common import _LAYER_KWARGS, _PACKAGE, _config_from_dict


# --------------------------------------------------------------------------------------------
# tf.distribute helpers. Keras has no backend-neutral all-reduce, so these are the only places
# that look at TensorFlow; on other backends (or with no strategy) they are identities.
# --------------------------------------------------------------------------------------------
def _replica_context():
    """The TF replica context when running inside ``strategy.run`` with > 1 replica, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return None
    return ctx


def _cross_replica_sum(x):
    """Sum ``x`` over replicas so every replica sees global-batch statistics."""
    ctx = _replica_context()
    if ctx is None:
        return x
    import tensorflow as tf

    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, x)


def _from_first_replica(x):
    """Replica 0's value of ``x`` on every replica (an all-reduce of ``x`` zeroed elsewhere).

    ``replica_id_in_sync_group`` numbers replicas across all workers, so under a multi-worker
    strategy every worker gets the same value, not its own first device's.
    """
    ctx = _replica_context()
    if ctx is None:
        return x
    import tensorflow as tf

    first = tf.cast(tf.equal(ctx.replica_id_in_sync_group, 0), x.dtype)
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, x * first)


def _num_replicas() -> int:
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return int(tf.distribute.get_strategy().num_replicas_in_sync)


# --------------------------------------------------------------------------------------------
# Vector quantiser
# --------------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package=_PACKAGE)
class VectorQuantizer(keras.layers.Layer):
    """Nearest-neighbour vector quantiser with a straight-through gradient.

    ``call(z)`` maps every ``D``-vector of ``z`` (B, h, w, D) to its nearest codebook row
    (Euclidean distance) and returns ``z + stop_gradient(e - z)``: the forward value is the code
    ``e``, the backward pass copies the decoder's gradient onto the encoder output (the
    straight-through estimator of van den Oord et al. 2017, eq. 3).

    Loss added with ``add_loss`` (paper eq. 3; ``sg`` = stop-gradient)::

        codebook_loss   = mean((sg[z] - e)^2)      # moves codes toward encoder outputs
        commitment_loss = mean((z - sg[e])^2)      # keeps the encoder near its code
        loss = codebook_loss + beta * commitment_loss        (use_ema=False)
        loss = beta * commitment_loss                        (use_ema=True)

    With ``use_ema=True`` the codebook is not trained by gradients but by exponential moving
    averages of the assigned encoder outputs (Razavi et al. 2019, appendix; sonnet
    ``VectorQuantizerEMA``; MONAI ``EMAQuantizer``)::

        N_k <- decay * N_k + (1 - decay) * n_k                 # n_k = batch count of code k
        m_k <- decay * m_k + (1 - decay) * sum_{z -> k} z
        e_k  = m_k / N~_k,  N~_k = (N_k + eps) / (sum N + K eps) * sum N   # Laplace smoothing

    ``N_k`` starts at 1 and ``m_k`` at the initial codebook, so an unused code stays put instead
    of blowing up when ``N_k`` is ~0. EMA updates and dead-code restarts only happen when the layer
    is called with ``training=True`` and the layer is trainable (``trainable=False`` freezes the codebook,
    as it freezes a batch normalisation's statistics).

    Dead-code restart (``restart_after=N > 0``): a code that received no vector for ``N``
    consecutive training steps is re-initialised to a random encoder output of the current batch
    (drawn with a ``keras.random.SeedGenerator``), its EMA count reset to 1 (lucidrains
    ``threshold_ema_dead_code``; Dhariwal et al. 2020 Jukebox "random restarts").

    Codebook usage is reported per batch (on every call, training or not) in two non-trainable
    scalars: ``batch_perplexity = exp(-sum_k p_k log p_k)`` with ``p_k`` the fraction of the
    batch's vectors assigned to code ``k`` (equals K for uniform use, 1 for a single code), and
    ``batch_active_fraction`` = fraction of codes used at least once *in this batch* (not an EMA).
    Under ``tf.distribute`` the counts and EMA sums are all-reduced over replicas first, so the
    numbers refer to the global batch and every replica applies the same EMA update; a restarted
    code takes the random encoder output drawn on the first replica (broadcast by an all-reduce),
    so replicas stay identical on one machine and across workers. The state variables use
    ``aggregation="only_first_replica"``, which lets each replica assign them in ``fit``.

    ``get_code_indices`` and ``quantize`` are pure lookups (no state changes). ``quantize`` here is
    the codebook lookup, not Keras's int8 weight-quantisation hook of the same name (which this
    layer does not support).

    Args:
        num_embeddings: ``K``, the codebook size.
        embedding_dim: ``D``, the length of each code (last axis of ``z``).
        beta: commitment cost.
        use_ema: update the codebook by EMA instead of the codebook loss.
        ema_decay: EMA decay (``gamma``), e.g. 0.99.
        epsilon: Laplace smoothing constant for EMA cluster sizes.
        restart_after: re-initialise a code unused for this many training steps (0 = never).
        seed: seed of the restart sampler.
        **kwargs: ``keras.layers.Layer`` arguments. ``dtype`` defaults to ``"float32"`` so the
            distances and the EMA stay in float32 under a ``mixed_float16`` policy.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        beta: float = 0.25,
        use_ema: bool = False,
        ema_decay: float = 0.99,
        epsilon: float = 1e-5,
        restart_after: int = 0,
        seed: int | None = None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError("num_embeddings and embedding_dim must be positive")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.beta = float(beta)
        self.use_ema = bool(use_ema)
        self.ema_decay = float(ema_decay)
        self.epsilon = float(epsilon)
        self.restart_after = int(restart_after)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if self.restart_after > 0 else None
        # Keras wraps every layer's `quantize` as its int8/float8 weight-quantisation hook. Here
        # `quantize(indices)` is the codebook lookup (sonnet/keras.io naming), and a codebook is not
        # something to int8-quantise, so drop the wrapper and expose the class method.
        vars(self).pop("quantize", None)

    def build(self, input_shape):
        if input_shape[-1] is not None and input_shape[-1] != self.embedding_dim:
            raise ValueError(
                f"VectorQuantizer: last axis of z must be embedding_dim={self.embedding_dim}, "
                f"got shape {input_shape}"
            )
        k, d = self.num_embeddings, self.embedding_dim
        # Statistics are identical on every replica (counts are all-reduced); only_first_replica
        # lets replica-context assigns of MirroredVariables go through.
        agg = "only_first_replica"
        self.embeddings = self.add_weight(
            shape=(k, d),
            initializer=keras.initializers.RandomUniform(-1.0 / k, 1.0 / k, seed=self.seed),
            trainable=not self.use_ema,
            aggregation=agg,
            name="embeddings",
        )
        if self.use_ema:
            self.ema_cluster_size = self.add_weight(
                shape=(k,), initializer="ones", trainable=False, aggregation=agg,
                name="ema_cluster_size",
            )
            self.ema_embed_sum = self.add_weight(
                shape=(k, d), initializer="zeros", trainable=False, aggregation=agg,
                name="ema_embed_sum",
            )
            self.ema_embed_sum.assign(self.embeddings)  # m_k / N_k = e_k at the start
        if self.restart_after > 0:
            self.unused_steps = self.add_weight(
                shape=(k,), initializer="zeros", dtype="int32", trainable=False,
                aggregation=agg, name="unused_steps",
            )
        self.batch_perplexity = self.add_weight(
            shape=(), initializer="zeros", trainable=False, aggregation=agg,
            name="batch_perplexity",
        )
        self.batch_active_fraction = self.add_weight(
            shape=(), initializer="zeros", trainable=False, aggregation=agg,
            name="batch_active_fraction",
        )

    @property
    def codebook(self):
        """The ``(num_embeddings, embedding_dim)`` codebook (a Keras variable)."""
        return self.embeddings

    # -- lookup ----------------------------------------------------------------------------
    def _nearest(self, flat):
        """flat (N, D) float32 -> int32 (N,) index of the nearest code (squared Euclidean)."""
        e = ops.convert_to_tensor(self.embeddings)
        # |z - e|^2 = |z|^2 - 2 z.e + |e|^2; |z|^2 is constant per row so argmin ignores it,
        # but it keeps the distances meaningful if someone inspects them.
        dist = (
            ops.sum(flat**2, axis=1, keepdims=True)
            - 2.0 * ops.matmul(flat, ops.transpose(e))
            + ops.sum(e**2, axis=1)[None, :]
        )  # (N, K)
        return ops.cast(ops.argmin(dist, axis=1), "int32")

    def get_code_indices(self, z):
        """Nearest code per position.

        Args:
            z: (B, h, w, D) encoder outputs (any float dtype).
        Returns:
            int32 (B, h, w) indices into the codebook.
        """
        z = ops.cast(z, "float32")
        idx = self._nearest(ops.reshape(z, (-1, self.embedding_dim)))
        return ops.reshape(idx, ops.shape(z)[:-1])

    def quantize(self, indices):
        """Codebook rows for ``indices``: int (B, h, w) -> float32 (B, h, w, D)."""
        return ops.take(ops.convert_to_tensor(self.embeddings), ops.cast(indices, "int32"), axis=0)

    def usage_stats(self, indices):
        """Perplexity and active-code fraction of one assignment.

        Args:
            indices: int array of any shape with values in ``[0, num_embeddings)``.
        Returns:
            dict ``{"perplexity": scalar, "active_fraction": scalar}`` (float32).
        """
        counts = ops.sum(ops.one_hot(ops.reshape(indices, (-1,)), self.num_embeddings), axis=0)
        return self._stats_from_counts(counts)

    def _stats_from_counts(self, counts):
        probs = counts / ops.maximum(ops.sum(counts), 1.0)
        entropy = -ops.sum(probs * ops.log(probs + 1e-10))
        return {
            "perplexity": ops.exp(entropy),
            "active_fraction": ops.mean(ops.cast(counts > 0, "float32")),
        }

    # -- forward -----------------------------------------------------------------------------
    def call(self, z, training=None):
        """z (B, h, w, D) -> quantised (B, h, w, D), straight-through gradient; adds the VQ loss."""
        z = ops.cast(z, "float32")
        flat = ops.reshape(z, (-1, self.embedding_dim))  # (N, D)
        idx = self._nearest(flat)  # (N,)
        e = ops.reshape(ops.take(ops.convert_to_tensor(self.embeddings), idx, axis=0), ops.shape(z))

        commitment = ops.mean((z - ops.stop_gradient(e)) ** 2)
        if self.use_ema:
            self.add_loss(self.beta * commitment)
        else:
            codebook_loss = ops.mean((ops.stop_gradient(z) - e) ** 2)
            self.add_loss(codebook_loss + self.beta * commitment)

        onehot = ops.one_hot(idx, self.num_embeddings)  # (N, K)
        counts = _cross_replica_sum(ops.sum(onehot, axis=0))  # (K,) global-batch counts
        stats = self._stats_from_counts(counts)
        self.batch_perplexity.assign(stats["perplexity"])
        self.batch_active_fraction.assign(stats["active_fraction"])

        if training and self.trainable:  # a frozen quantiser (trainable=False) keeps its codebook
            self._update_codebook(flat, onehot, counts)

        return z + ops.stop_gradient(e - z)

    def _update_codebook(self, flat, onehot, counts):
        """EMA step and dead-code restart; runs only when training."""
        flat = ops.stop_gradient(flat)
        if self.use_ema:
            decay = self.ema_decay
            embed_sum = _cross_replica_sum(ops.matmul(ops.transpose(onehot), flat))  # (K, D)
            cluster_size = decay * self.ema_cluster_size + (1.0 - decay) * counts
            ema_sum = decay * self.ema_embed_sum + (1.0 - decay) * embed_sum
            n = ops.sum(cluster_size)
            smoothed = (cluster_size + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
            new_codebook = ema_sum / smoothed[:, None]
        else:
            new_codebook = ops.convert_to_tensor(self.embeddings)

        if self.restart_after > 0:
            unused = ops.where(counts > 0, 0, self.unused_steps + 1)
            dead = unused >= self.restart_after  # (K,)
            pick = keras.random.randint(
                (self.num_embeddings,), 0, ops.shape(flat)[0], seed=self.seed_generator
            )
            # (K, D) random encoder outputs, drawn on the first replica so that all replicas (on
            # all workers) restart a code to the same vector.
            samples = _from_first_replica(ops.take(flat, pick, axis=0))
            new_codebook = ops.where(dead[:, None], samples, new_codebook)
            if self.use_ema:
                cluster_size = ops.where(dead, 1.0, cluster_size)
                ema_sum = ops.where(dead[:, None], samples, ema_sum)
            self.unused_steps.assign(ops.where(dead, 0, unused))

        if self.use_ema:
            self.ema_cluster_size.assign(cluster_size)
            self.ema_embed_sum.assign(ema_sum)
        if self.use_ema or self.restart_after > 0:
            self.embeddings.assign(new_codebook)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            num_embeddings=self.num_embeddings,
            embedding_dim=self.embedding_dim,
            beta=self.beta,
            use_ema=self.use_ema,
            ema_decay=self.ema_decay,
            epsilon=self.epsilon,
            restart_after=self.restart_after,
            seed=self.seed,
        )
        return config


# --------------------------------------------------------------------------------------------
# Encoder / decoder building blocks
# --------------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package=_PACKAGE)
class ResidualBlock(keras.layers.Layer):
    """``x + Conv1x1(ReLU(Conv3x3(ReLU(x))))`` (van den Oord et al. 2017, section 4.1).

    Input and output (B, H, W, C) with ``C == filters``; ``hidden`` channels in the 3x3 conv.
    """

    def __init__(self, filters: int, hidden: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.hidden = int(hidden or filters)
        self.conv3 = keras.layers.Conv2D(self.hidden, 3, padding="same", name="conv3x3")
        self.conv1 = keras.layers.Conv2D(self.filters, 1, name="conv1x1")

    def build(self, input_shape):
        if input_shape[-1] != self.filters:
            raise ValueError(f"ResidualBlock({self.filters}) got input shape {input_shape}")
        self.conv3.build(input_shape)
        self.conv1.build(tuple(input_shape[:-1]) + (self.hidden,))

    def call(self, x):
        h = self.conv3(ops.relu(x))
        return x + self.conv1(ops.relu(h))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, hidden=self.hidden)
        return config


def build_encoder(config: "VQVAEConfig", name: str = "encoder") -> keras.Model:
    """Images (B, H, W, 1) -> latents (B, H/downsample, W/downsample, embedding_dim).

    ``log2(downsample)`` stride-2 4x4 convs (ReLU), a 3x3 conv, ``num_res_blocks`` residual blocks
    at the low resolution (where they are cheap), ReLU and a 1x1 projection to ``embedding_dim``.
    Spatial size is left free (``None``) so the same weights run on any multiple of downsample.
    """
    c = config.channels
    steps = int(round(math.log2(config.downsample)))
    inputs = keras.Input(shape=(None, None, 1), name="images")
    x = inputs
    for i in range(steps):
        # first stride halves the channels at full resolution, where convs are most expensive
        filters = c // 2 if (i == 0 and steps > 1) else c
        x = keras.layers.Conv2D(filters, 4, strides=2, padding="same", activation="relu",
                                name=f"down{i}")(x)
    x = keras.layers.Conv2D(c, 3, padding="same", name="conv_in")(x)
    for i in range(config.num_res_blocks):
        x = ResidualBlock(c, config.res_hidden, name=f"res{i}")(x)
    x = keras.layers.Activation("relu", name="relu_out")(x)
    x = keras.layers.Conv2D(config.embedding_dim, 1, name="pre_quantizer")(x)
    return keras.Model(inputs, x, name=name)


def build_decoder(config: "VQVAEConfig", name: str = "decoder") -> keras.Model:
    """Quantised latents (B, h, w, embedding_dim) -> images (B, h*ds, w*ds, 1) in [0, 1].

    Mirror of :func:`build_encoder`: 3x3 conv, residual blocks, then ``log2(downsample)``
    stride-2 4x4 transposed convs; the last one outputs one linear float32 channel (float32 even
    under ``mixed_float16``). Linear, not sigmoid: on slices that are mostly black background with a
    dim brain (the OASIS look), a sigmoid output saturates at 0 in the first epoch and its gradient
    vanishes, so training stalls at a constant image; ``VQVAE`` clips to [0, 1] at inference.
    """
    c = config.channels
    steps = int(round(math.log2(config.downsample)))
    inputs = keras.Input(shape=(None, None, config.embedding_dim), name="latents")
    x = keras.layers.Conv2D(c, 3, padding="same", name="conv_in")(inputs)
    for i in range(config.num_res_blocks):
        x = ResidualBlock(c, config.res_hidden, name=f"res{i}")(x)
    x = keras.layers.Activation("relu", name="relu")(x)
    for i in range(steps - 1):
        filters = c // 2 if i == steps - 2 else c
        x = keras.layers.Conv2DTranspose(filters, 4, strides=2, padding="same",
                                         activation="relu", name=f"up{i}")(x)
    x = keras.layers.Conv2DTranspose(1, 4, strides=2, padding="same", name=f"up{steps - 1}")(x)
    x = keras.layers.Activation("linear", dtype="float32", name="output")(x)
    return keras.Model(inputs, x, name=name)


def build_discriminator(config: "VQVAEConfig", name: str = "discriminator") -> keras.Model:
    """PatchGAN discriminator: images (B, H, W, 1) in [0, 1] -> logits (B, H/2^L, W/2^L, 1) float32.

    ``L = disc_layers`` stride-2 4x4 convs with LeakyReLU(0.2) (Isola et al. 2017, pix2pix; Taming
    Transformers' ``NLayerDiscriminator``), then a 4x4 conv to one logit per patch. No batch
    normalisation: real and reconstructed images go through it as one batch, and per-replica batch
    statistics would differ under ``MirroredStrategy``. The logits are float32 even under
    ``mixed_float16``, so the hinge losses are computed in full precision.
    """
    inputs = keras.Input(shape=(None, None, 1), name="images")
    x = keras.layers.Rescaling(2.0, offset=-1.0, name="signed")(inputs)  # [0, 1] -> [-1, 1]
    for i in range(config.disc_layers):
        x = keras.layers.Conv2D(config.disc_filters * min(2 ** i, 8), 4, strides=2, padding="same",
                                name=f"down{i}")(x)
        x = keras.layers.LeakyReLU(0.2, name=f"lrelu{i}")(x)
    x = keras.layers.Conv2D(1, 4, padding="same", name="patch_logits")(x)
    x = keras.layers.Activation("linear", dtype="float32", name="output")(x)
    return keras.Model(inputs, x, name=name)


def hinge_discriminator_loss(logits_real, logits_fake):
    """``0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))))`` (Taming Transformers' ``hinge_d_loss``)."""
    return 0.5 * (ops.mean(ops.relu(1.0 - logits_real)) + ops.mean(ops.relu(1.0 + logits_fake)))


def adaptive_weight(recon_grad, adv_grad, max_weight: float = 1e4, eps: float = 1e-4):
    """Weight of the adversarial term: ``||recon_grad|| / (||adv_grad|| + eps)``, clipped to ``[0, max_weight]``.

    Taming Transformers' ``calculate_adaptive_weight`` (Esser et al. 2021, eq. 7): both gradients are
    of the losses with respect to the decoder's last layer kernel, so the adversarial term pulls on
    the decoder about as hard as the reconstruction does. Treated as a constant (stop-gradient); a
    non-finite ratio (a float16 overflow, skipped by the loss-scale optimiser) gives 0.
    """
    num = ops.sqrt(ops.sum(ops.square(ops.cast(recon_grad, "float32"))))
    den = ops.sqrt(ops.sum(ops.square(ops.cast(adv_grad, "float32")))) + eps
    ratio = num / den
    return ops.stop_gradient(ops.clip(ops.where(ops.isfinite(ratio), ratio, 0.0), 0.0, max_weight))


# --------------------------------------------------------------------------------------------
# VQ-VAE
# --------------------------------------------------------------------------------------------
@dataclass
class VQVAEConfig:
    """Hyper-parameters of :class:`VQVAE` (saved as ``config.json`` beside the weights).

    Each field's ``metadata["help"]`` says what it sets; ``train.py --help`` shows it as the flag's
    help, so the text lives in one place.
    """

    image_size: int = field(default=128, metadata={"help": "side of the square training images (H = W)"})
    channels: int = field(default=32, metadata={
        "help": "conv filters in the encoder/decoder (the full-resolution conv uses half)"})
    num_res_blocks: int = field(default=2, metadata={
        "help": "residual blocks at the latent resolution, in encoder and decoder"})
    res_hidden: int | None = field(default=None, metadata={
        "help": "channels inside each residual block (default: channels)"})
    downsample: int = field(default=4, metadata={
        "help": "total stride, a power of 2 >= 2; the code grid is image_size / downsample on a side"})
    num_embeddings: int = field(default=128, metadata={"help": "codebook size K"})
    embedding_dim: int = field(default=32, metadata={"help": "code length D"})
    beta: float = field(default=0.25, metadata={"help": "commitment cost (van den Oord et al. 2017, eq. 3)"})
    use_ema: bool = field(default=True, metadata={
        "help": "update the codebook by exponential moving averages instead of the codebook loss"})
    ema_decay: float = field(default=0.99, metadata={"help": "EMA decay of the codebook statistics"})
    restart_after: int = field(default=20, metadata={
        "help": "re-initialise a code unused for this many training steps to a random encoder output (0: never)"})
    recon_weight: float = field(default=1.0, metadata={"help": "weight of the pixel MSE in the training loss"})
    # MSE alone favours blur; the structural term keeps edges, as in the SSIM-based losses of image
    # restoration (Zhao et al. 2017). Gaussian-window SSIM as in tf.image.ssim.
    ssim_weight: float = field(default=0.0, metadata={
        "help": "weight of 1 - SSIM(x, x_hat) in the training loss, which keeps edges that MSE blurs (0: off)"})
    # Detail-aware losses (docs/training.md#detail-aware-losses): MSE and SSIM forgive blur, these two
    # do not, and unlike a discriminator they act from the first step.
    spectral_weight: float = field(default=0.0, metadata={
        "help": "weight of the spectral loss, the mean L1 distance of real and reconstructed 2-D FFT amplitudes "
                "(orthonormal FFT, float32), which asks for the high-frequency power that blur removes (0: off)"})
    spectral_focal: float = field(default=0.0, metadata={
        "help": "focal frequency exponent alpha (Jiang et al. 2021): each frequency's distance is weighted by its "
                "own distance^alpha over the image's largest (stop-gradient), so the worst frequencies lead (0: plain)"})
    spectral_log: bool = field(default=False, metadata={
        "help": "spectral loss on log amplitudes, |log(eps + |F x|) - log(eps + |F x_hat|)|: every frequency counts "
                "by its relative error, the faint high ones as much as the strong low ones (weights of 0.001-0.01 "
                "then act like 0.1-1 on amplitudes)"})
    gradient_weight: float = field(default=0.0, metadata={
        "help": "weight of the image-gradient loss, mean |dx x - dx x_hat| + |dy x - dy x_hat| over neighbouring "
                "pixels, which asks for sharp borders (0: off)"})
    band_power_weight: float = field(default=0.0, metadata={
        "help": "weight of the band-power loss, the mean over 8 radial frequency bands up to Nyquist of |log P_b(x) - "
                "log P_b(x_hat)|, P_b the batch's mean power in the band (float32): asks only for the right amount "
                "of power per band, so the MSE finds the cheapest way to it (the decoder's own detail, sharpened) "
                "rather than texture matched frequency by frequency (0: off)"})
    code_noise: float = field(default=0.0, metadata={
        "help": "training only: the fraction of code positions whose quantised vector is replaced by a random "
                "code's before the decoder (the reconstruction target stays the real slice), so the decoder learns "
                "to render a grid holding a few wrong codes, as every grid a prior draws does, from their "
                "neighbours instead of as a dark spot; train.py --stage decoder --code-noise 0.1 teaches an "
                "existing run's decoder (0: off)"})
    freeze_encoder: bool = field(default=False, metadata={
        "help": "encoder and vector quantiser frozen (no gradient steps, no EMA updates, no restarts), so only "
                "the decoder trains; set by train.py --stage decoder"})
    seed: int = field(default=0, metadata={"help": "seed of the codebook initialiser and the restart sampler"})
    # VQGAN (Esser et al. 2021, "Taming Transformers"): the decoder also plays against a PatchGAN
    # discriminator, which restores the grain and crisp borders that the pixel losses average away.
    adversarial: bool = field(default=False, metadata={
        "help": "train the decoder against a PatchGAN discriminator (VQGAN hinge loss, adaptive weight)"})
    disc_start: int = field(default=250, metadata={
        "help": "VQ-VAE optimiser steps of reconstruction-only warm-up before the adversarial term and the "
                "discriminator's updates switch on"})
    disc_weight: float = field(default=0.8, metadata={
        "help": "factor on the adaptive adversarial weight ||grad recon|| / ||grad adv|| at the decoder's last layer"})
    disc_filters: int = field(default=32, metadata={
        "help": "filters of the discriminator's first conv (doubled per stride-2 layer, at most 8x)"})
    disc_layers: int = field(default=3, metadata={
        "help": "stride-2 4x4 convs in the discriminator; each logit judges one patch"})
    disc_lr: float = field(default=2e-4, metadata={
        "help": "Adam learning rate of the discriminator (constant; betas 0.5, 0.9 as in Taming Transformers)"})

    def __post_init__(self):
        ds = int(self.downsample)
        if ds < 2 or ds & (ds - 1):
            raise ValueError(f"downsample must be a power of 2 >= 2, got {self.downsample}")
        if self.image_size % ds:
            raise ValueError(f"image_size {self.image_size} is not a multiple of downsample {ds}")
        if self.channels < 2:
            raise ValueError(f"channels must be >= 2, got {self.channels}")
        if self.disc_start < 0:
            raise ValueError(f"disc_start must be >= 0, got {self.disc_start}")
        if self.disc_weight < 0:
            raise ValueError(f"disc_weight must be >= 0, got {self.disc_weight}")
        if self.disc_filters < 1 or self.disc_layers < 1:
            raise ValueError(f"disc_filters and disc_layers must be >= 1, got {self.disc_filters}, {self.disc_layers}")
        if self.disc_lr <= 0:
            raise ValueError(f"disc_lr must be > 0, got {self.disc_lr}")
        for name in ("spectral_weight", "spectral_focal", "gradient_weight", "band_power_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 (0: off), got {getattr(self, name)}")
        if not 0.0 <= self.code_noise < 1.0:
            raise ValueError(f"code_noise must be in [0, 1) (0: off), got {self.code_noise}")

    @property
    def grid_shape(self) -> tuple[int, int]:
        side = self.image_size // self.downsample
        return (side, side)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "VQVAEConfig":
        return _config_from_dict(cls, d)


def _mean_ssim(x, y, max_val: float = 1.0, sigma: float = 1.5):
    """Mean SSIM of two image batches ``(B, H, W, 1)`` (static H, W), cheap to back-propagate.

    The same quantity as ``tf.image.ssim`` (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5,
    K1 = 0.01, K2 = 0.03, valid windows only), averaged over the batch. TensorFlow's version filters
    with a depthwise convolution whose gradient is very slow on CPUs; here the five local statistics
    are stacked along the batch and the separable Gaussian filter is applied as two matrix products
    (``utils.gaussian_band``). ``tests/test_modules.py`` checks the two agree.
    """
    from utils import gaussian_band

    h, w = int(x.shape[1]), int(x.shape[2])
    size = min(11, h, w)
    b = ops.shape(x)[0]
    stats = ops.concatenate([x, y, x * x, y * y, x * y], axis=0)[..., 0]  # (5B, H, W)
    stats = ops.einsum("ph,nhw->npw", gaussian_band(h, size, sigma), stats)
    stats = ops.einsum("npw,qw->npq", stats, gaussian_band(w, size, sigma))
    mu_x, mu_y, xx, yy, xy = (stats[i * b:(i + 1) * b] for i in range(5))
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    luminance = (2.0 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)
    contrast_structure = (2.0 * (xy - mu_x * mu_y) + c2) / (xx - mu_x ** 2 + yy - mu_y ** 2 + c2)
    return ops.mean(luminance * contrast_structure)


SPECTRAL_LOG_EPS = 1e-3  # orthonormal amplitudes below this count as this (real 128x128 slices: ~0.01 near Nyquist)


def spectral_loss(x, y, focal: float = 0.0, log: bool = False):
    """Mean L1 distance of the 2-D Fourier amplitudes of two image batches ``(B, H, W, 1)``.

    ``|F x| - |F y|`` per frequency, with the orthonormal FFT (divided by ``sqrt(H W)``, so by Parseval
    the mean squared amplitude over frequencies equals the mean squared pixel: the loss is on the scale
    of a pixel difference, and weights of 0.1-1 beside the MSE are meaningful). Amplitudes only, no
    phase: a decoder that cannot know where the fine grain lies is still asked for its power, which
    the MSE's best guess (the blurred mean) drops. Computed in float32 whatever the inputs' dtype. The
    L1 distance never rewards more power than the real image has. A spectral loss on the amplitudes
    trains the brain VQ-VAE of Tudosiu et al. 2022 ("Morphology-preserving autoregressive 3D generative
    modelling of the brain").

    ``focal > 0`` is the focal frequency loss of Jiang et al. 2021 ("Focal Frequency Loss for Image
    Reconstruction and Synthesis", ICCV): each frequency's distance ``d`` is weighted by
    ``(d / max d)^focal`` per image, a stop-gradient weight in [0, 1], so the frequencies the model gets
    most wrong lead. (Jiang et al. weight complex distances; here amplitudes, as above.)

    ``log=True`` compares ``log(eps + amplitude)`` instead (a log-spectral distance, ``eps`` =
    ``SPECTRAL_LOG_EPS``): a frequency counts by its relative error, so the faint high frequencies,
    whose absolute errors are tiny beside the low ones', lead as much; its values are ~100x those
    of the amplitude distance's for the same blur.

    Returns:
        a float32 scalar, 0 for identical images.
    """
    x = ops.cast(x, "float32")[..., 0]
    y = ops.cast(y, "float32")[..., 0]
    h, w = int(x.shape[1]), int(x.shape[2])
    zeros = ops.zeros_like(x)
    xr, xi = ops.fft2((x, zeros))
    yr, yi = ops.fft2((y, zeros))
    # eps inside the root keeps the gradient finite where an amplitude is 0
    amp_x = ops.sqrt(xr * xr + xi * xi + 1e-12)
    amp_y = ops.sqrt(yr * yr + yi * yi + 1e-12)
    norm = 1.0 / math.sqrt(h * w)  # the orthonormal FFT's scale
    if log:
        dist = ops.abs(ops.log(SPECTRAL_LOG_EPS + norm * amp_x) - ops.log(SPECTRAL_LOG_EPS + norm * amp_y))
    else:
        dist = ops.abs(amp_x - amp_y) * norm  # (B, H, W)
    if focal:
        weight = dist ** focal
        weight = weight / ops.maximum(ops.max(weight, axis=(1, 2), keepdims=True), 1e-12)
        dist = ops.stop_gradient(weight) * dist
    return ops.mean(dist)


BAND_POWER_EPS = 1e-10  # orthonormal band powers below this count as this (real 128x128 slices' top band: ~1e-5)


def band_power_loss(x, y, bands: int = utils.POWER_BANDS):
    """Band-power loss of two image batches ``(B, H, W, 1)``: ``mean_b |log(eps + P_b(x)) - log(eps + P_b(y))|``.

    ``P_b`` is the batch's mean power (orthonormal 2-D FFT, so per pixel) over the frequencies of radial
    band ``b`` (``utils.frequency_bands``, the bands ``evaluation.radial_power_spectrum`` reports). Unlike
    :func:`spectral_loss`, which matches every frequency of every image and so asks for texture where
    the decoder cannot know the phase, this asks only for each band's total power: beside the MSE, the
    cheapest way there is to draw the detail the decoder does know more strongly (a blur undone),
    and to add power it cannot place only as far as the band needs. Computed in float32.

    Returns:
        a float32 scalar, 0 for identical batches (and for any two with the same band powers).
    """
    x = ops.cast(x, "float32")[..., 0]
    y = ops.cast(y, "float32")[..., 0]
    h, w = int(x.shape[1]), int(x.shape[2])
    _, members = utils.frequency_bands(h, w, bands)
    average = np.stack([m.reshape(-1) / max(m.sum(), 1) for m in members], axis=1).astype("float32")  # (H W, bands)
    zeros = ops.zeros_like(x)

    def band_power(images):
        re, im = ops.fft2((images, zeros))
        power = ops.mean(re * re + im * im, axis=0) / float(h * w)  # (H, W), the batch's mean
        return ops.matmul(ops.reshape(power, (1, h * w)), average)[0]

    return ops.mean(ops.abs(ops.log(BAND_POWER_EPS + band_power(x)) - ops.log(BAND_POWER_EPS + band_power(y))))


def gradient_loss(x, y):
    """Image-gradient loss of two batches ``(B, H, W, 1)``: ``mean|dx x - dx y| + mean|dy x - dy y|``.

    ``dx``, ``dy`` are differences of horizontally and vertically neighbouring pixels. A blurred border
    has the right mean but too shallow a slope, which this L1 distance charges for at every pixel (the
    gradient-difference loss of Mathieu et al. 2016, "Deep multi-scale video prediction beyond mean
    square error", with exponent 1). Computed in float32.

    Returns:
        a float32 scalar, 0 for identical images.
    """
    x = ops.cast(x, "float32")
    y = ops.cast(y, "float32")
    dx = (x[:, :, 1:] - x[:, :, :-1]) - (y[:, :, 1:] - y[:, :, :-1])
    dy = (x[:, 1:] - x[:, :-1]) - (y[:, 1:] - y[:, :-1])
    return ops.mean(ops.abs(dx)) + ops.mean(ops.abs(dy))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class VQVAE(keras.Model):
    """Encoder -> :class:`VectorQuantizer` -> decoder, trained with ``compile(optimizer)`` + ``fit``.

    Sub-models/layers are named ``encoder``, ``vector_quantizer`` and ``decoder``.

    Training data are image batches only, ``x`` (B, H, W, 1) float32 in [0, 1] (no ``y``). The
    loss is ``recon_weight * mean((x - x_hat)^2) + ssim_weight * (1 - SSIM(x, x_hat)) + vq_loss``
    where ``vq_loss`` is the quantiser's ``codebook + beta * commitment`` (or ``beta * commitment``
    with EMA). ``fit``/``evaluate`` report ``loss``, ``recon_loss`` (the unweighted MSE), ``ssim``,
    ``vq_loss``, ``perplexity`` and ``active_codes`` (fraction of the codebook used in a batch,
    averaged over batches). The detail losses :func:`spectral_loss` and :func:`gradient_loss` are
    added with ``spectral_weight`` and ``gradient_weight`` and then reported too (``spectral_loss``,
    ``gradient_loss``, unweighted). With ``freeze_encoder`` only the decoder trains.

    With ``adversarial=True`` (VQGAN, Esser et al. 2021) the model also holds ``discriminator`` (a
    PatchGAN, :func:`build_discriminator`) and ``disc_optimizer`` (its own Adam, loss-scaled under
    ``mixed_float16``), both saved with the model, so per-epoch checkpoints resume them; ``train_step``
    then updates the discriminator (hinge loss) and the VQ-VAE (``loss`` plus the adaptively weighted
    ``-mean(D(x_hat))``) after ``disc_start`` steps, and ``fit`` also reports ``disc_loss``,
    ``adv_loss`` and ``adv_weight`` (0 before ``disc_start``). Off, training is Keras' own
    ``train_step`` over ``compute_loss`` as before.

    The config's defaults (128x128, 32 filters, 2 residual blocks at 32x32, K=128 codes of D=32, EMA +
    restart after 20 idle steps; the demo preset changes K to 64) train at roughly 30-65 images/s
    (batch 16, 2 CPU cores, depending on load).

    Args:
        config: a :class:`VQVAEConfig`, a dict of its fields, or None (defaults).
        **overrides: config fields to override, plus Keras ``name``/``trainable``/``dtype``.
    """

    def __init__(self, config: VQVAEConfig | dict | None = None, **overrides):
        layer_kwargs = {k: overrides.pop(k) for k in _LAYER_KWARGS if k in overrides}
        layer_kwargs.setdefault("name", "vqvae")
        base = config.to_dict() if isinstance(config, VQVAEConfig) else dict(config or {})
        base.update(overrides)
        self.config = VQVAEConfig.from_dict(base)
        super().__init__(**layer_kwargs)
        cfg = self.config
        self.encoder = build_encoder(cfg)
        self.vector_quantizer = VectorQuantizer(
            cfg.num_embeddings, cfg.embedding_dim, beta=cfg.beta, use_ema=cfg.use_ema,
            ema_decay=cfg.ema_decay, restart_after=cfg.restart_after, seed=cfg.seed,
            dtype="float32", name="vector_quantizer",
        )
        self.decoder = build_decoder(cfg)
        self.vector_quantizer.build((None, *cfg.grid_shape, cfg.embedding_dim))
        self.recon_loss_tracker = keras.metrics.Mean(name="recon_loss")
        self.ssim_tracker = keras.metrics.Mean(name="ssim")
        self.vq_loss_tracker = keras.metrics.Mean(name="vq_loss")
        self.perplexity_tracker = keras.metrics.Mean(name="perplexity")
        self.active_codes_tracker = keras.metrics.Mean(name="active_codes")
        # the detail losses are tracked (and so shown in the progress bar) only when they are on
        self.spectral_tracker = keras.metrics.Mean(name="spectral_loss") if cfg.spectral_weight else None
        self.gradient_tracker = keras.metrics.Mean(name="gradient_loss") if cfg.gradient_weight else None
        self.band_power_tracker = keras.metrics.Mean(name="band_power_loss") if cfg.band_power_weight else None
        if cfg.code_noise:
            self.code_noise_seed = keras.random.SeedGenerator(cfg.seed + 1, name="code_noise_seed")
        if cfg.freeze_encoder:
            # train.py --stage decoder: no gradient step reaches them, and a frozen quantiser makes no
            # EMA update and no restart (VectorQuantizer.call), so the codes stay what they were.
            self.encoder.trainable = False
            self.vector_quantizer.trainable = False
        self.discriminator = None
        if cfg.adversarial:
            # Training only, but an attribute, so checkpoints (model.save) carry its weights and its
            # optimiser's state. The optimiser is built here rather than in compile(): load_model then
            # finds its variables to restore, and compile() stays Keras' own (compile_from_config
            # skips a custom one).
            self.discriminator = build_discriminator(cfg)
            disc_optimizer = keras.optimizers.Adam(cfg.disc_lr, beta_1=0.5, beta_2=0.9, name="disc_adam")
            if self.dtype_policy.name == "mixed_float16":  # as compile() wraps the VQ-VAE's own optimiser
                disc_optimizer = keras.optimizers.LossScaleOptimizer(disc_optimizer, name="disc_loss_scale_optimizer")
            disc_optimizer.build(self.discriminator.trainable_variables)
            self.disc_optimizer = disc_optimizer
            self.disc_loss_tracker = keras.metrics.Mean(name="disc_loss")
            self.adv_loss_tracker = keras.metrics.Mean(name="adv_loss")
            self.adv_weight_tracker = keras.metrics.Mean(name="adv_weight")
        self.built = True  # every weight exists now; load_model only has to fill them

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(h, w) of the code grid for ``config.image_size``."""
        return self.config.grid_shape

    @property
    def num_embeddings(self) -> int:
        return self.config.num_embeddings

    def call(self, images, training=None):
        """images (B, H, W, 1) in [0, 1] -> reconstructions (B, H, W, 1) float32.

        In training the decoder's linear output is returned as it is (clipping would cut the
        gradient where the target is 0 or 1); otherwise it is clipped to [0, 1].
        """
        z = self.encoder(images, training=training)  # (B, h, w, D)
        q = self.vector_quantizer(z, training=training)  # (B, h, w, D) float32
        if training and self.config.code_noise:
            q = self._with_code_noise(q)
        out = self.decoder(q, training=training)
        return out if training else ops.clip(out, 0.0, 1.0)

    def _with_code_noise(self, q):
        """``q`` with ``config.code_noise`` of its positions set to random codes' vectors (training only).

        A prior's grids hold codes that a real slice would not have at that place; a decoder that has only
        seen encoded real slices draws each such code as what it stands for alone (often a dark spot).
        Trained with random codes at random places and the real slice as the target, it learns to read a
        code in its neighbours' context. No gradient flows to the encoder through a replaced position.
        """
        grid = ops.shape(q)[:3]
        swap = keras.random.uniform(grid, seed=self.code_noise_seed) < self.config.code_noise
        codes = keras.random.randint(grid, 0, self.config.num_embeddings, seed=self.code_noise_seed)
        noisy = ops.stop_gradient(self.vector_quantizer.quantize(codes))
        return ops.where(swap[..., None], ops.cast(noisy, q.dtype), q)

    def encode(self, images):
        """images (B, H, W, 1) -> int32 codes (B, h, w)."""
        return self.vector_quantizer.get_code_indices(self.encoder(images, training=False))

    def decode(self, codes):
        """int codes (B, h, w) -> images (B, h*ds, w*ds, 1) float32 in [0, 1]."""
        return ops.clip(self.decoder(self.vector_quantizer.quantize(codes), training=False), 0.0, 1.0)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """``recon_weight * MSE + ssim_weight * (1 - SSIM) + spectral_weight * spectral_loss
        + gradient_weight * gradient_loss + band_power_weight * band_power_loss + vq_loss``; also updates
        the metrics."""
        x = ops.cast(x, "float32")
        y_pred = ops.cast(y_pred, "float32")
        recon = ops.mean((x - y_pred) ** 2)
        ssim = _mean_ssim(x, y_pred)
        vq = ops.sum([ops.cast(l, "float32") for l in self.losses]) if self.losses else 0.0
        total = self.config.recon_weight * recon + vq
        if self.config.ssim_weight:
            total = total + self.config.ssim_weight * (1.0 - ssim)
        if self.config.spectral_weight:
            spectral = spectral_loss(x, y_pred, self.config.spectral_focal, self.config.spectral_log)
            total = total + self.config.spectral_weight * spectral
            self.spectral_tracker.update_state(spectral)
        if self.config.gradient_weight:
            grad = gradient_loss(x, y_pred)
            total = total + self.config.gradient_weight * grad
            self.gradient_tracker.update_state(grad)
        if self.config.band_power_weight:
            band = band_power_loss(x, y_pred)
            total = total + self.config.band_power_weight * band
            self.band_power_tracker.update_state(band)
        self.recon_loss_tracker.update_state(recon)
        self.ssim_tracker.update_state(ssim)
        self.vq_loss_tracker.update_state(vq)
        self.perplexity_tracker.update_state(self.vector_quantizer.batch_perplexity)
        self.active_codes_tracker.update_state(self.vector_quantizer.batch_active_fraction)
        # Gradients are summed over replicas, so each replica contributes total / replicas
        # (what Keras does for compiled losses); train_step's "loss" metric undoes this.
        n = _num_replicas()
        return total / n if n > 1 else total

    def train_step(self, data):
        """Keras' own step (``compute_loss``) unless ``config.adversarial``; then the two-player step."""
        if not self.config.adversarial:
            return super().train_step(data)
        return self._adversarial_train_step(data)

    def test_step(self, data):
        """Keras' own step; the adversarial trackers are left out (validation trains no discriminator)."""
        logs = super().test_step(data)
        if self.config.adversarial:
            logs = {k: v for k, v in logs.items() if k not in ("disc_loss", "adv_loss", "adv_weight")}
        return logs

    def _adversarial_train_step(self, data):
        """One VQGAN step on a batch: the discriminator's hinge update, then the VQ-VAE's.

        The VQ-VAE minimises ``compute_loss + lambda * adv_loss`` with ``adv_loss = -mean(D(x_hat))``
        and ``lambda = disc_weight * adaptive_weight(...)`` from the global-batch gradients at the
        decoder's last kernel; the discriminator minimises
        ``hinge_discriminator_loss(D(x), D(x_hat))`` (x_hat held fixed). Before ``disc_start`` VQ-VAE
        optimiser steps both terms are multiplied by 0, as Taming Transformers' ``adopt_weight`` does:
        the discriminator's Adam then steps on zero gradients, which leaves its weights exactly as
        they are. Losses are divided by the replica count (gradients are summed over replicas) and
        scaled by each optimiser's loss scale under ``mixed_float16``.
        """
        import tensorflow as tf

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        cfg = self.config
        n = _num_replicas()
        if not self.optimizer.built:
            # On every trainable variable, discriminator's included, as Keras' own paths build it
            # (fit's symbolic build, compile_from_config on load), so a checkpoint's state fits.
            with keras.name_scope(self.optimizer.name, caller=self.optimizer):
                self.optimizer.build(self.trainable_variables)
        active = ops.cast(ops.greater_equal(self.optimizer.iterations, cfg.disc_start), "float32")
        disc_vars = self.discriminator.trainable_variables
        disc_ids = {id(v) for v in disc_vars}
        vq_vars = [v for v in self.trainable_variables if id(v) not in disc_ids]
        last_kernel = self._decoder_last_kernel()
        with tf.GradientTape(persistent=True) as tape:
            y_pred = self(x, training=True)
            recon_total = self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            batch = ops.shape(y_pred)[0]
            logits = self.discriminator(ops.concatenate([ops.cast(x, y_pred.dtype), y_pred], axis=0), training=True)
            logits = ops.cast(logits, "float32")
            adv_loss = -ops.mean(logits[batch:])
            disc_loss = hinge_discriminator_loss(logits[:batch], logits[batch:])
            scaled_recon = self.optimizer.scale_loss(recon_total)
            scaled_adv = self.optimizer.scale_loss(adv_loss / n)
            with tape.stop_recording():
                unscale = 1.0 / ops.cast(self.optimizer.scale_loss(1.0), "float32")
                grad_recon = tape.gradient(scaled_recon, last_kernel)
                grad_adv = tape.gradient(scaled_adv, last_kernel)
                weight = cfg.disc_weight * active * adaptive_weight(
                    _cross_replica_sum(grad_recon * unscale), _cross_replica_sum(grad_adv * unscale))
            total = recon_total + weight * adv_loss / n
            scaled_total = self.optimizer.scale_loss(total)
            scaled_disc = self.disc_optimizer.scale_loss(active * disc_loss / n)
        disc_grads = tape.gradient(scaled_disc, disc_vars)
        vq_grads = tape.gradient(scaled_total, vq_vars)
        del tape
        self.disc_optimizer.apply_gradients(zip(disc_grads, disc_vars))
        self.optimizer.apply_gradients(zip(vq_grads, vq_vars))

        self._loss_tracker.update_state(total * n, sample_weight=batch)
        self.disc_loss_tracker.update_state(active * disc_loss)
        self.adv_loss_tracker.update_state(active * adv_loss)
        self.adv_weight_tracker.update_state(weight)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _decoder_last_kernel(self):
        """The kernel of the decoder's last (transposed) convolution: where the adaptive weight is measured."""
        steps = int(round(math.log2(self.config.downsample)))
        return self.decoder.get_layer(f"up{steps - 1}").kernel

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, **self.config.to_dict()}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
