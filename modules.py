"""VQ-VAE and PixelCNN priors for brain MRI slices (Keras 3). Nothing runs on import.

Contents:

* :class:`VectorQuantizer` -- the codebook layer (van den Oord et al. 2017, "Neural Discrete
  Representation Learning"), optionally with exponential-moving-average codebook updates
  (Razavi et al. 2019, VQ-VAE-2; sonnet ``VectorQuantizerEMA``) and dead-code restarts.
* :class:`ResidualBlock` -- ``x + Conv1x1(ReLU(Conv3x3(ReLU(x))))`` as in the VQ-VAE paper.
* :class:`VQVAEConfig` / :class:`VQVAE` -- encoder, vector quantiser and decoder as one
  ``keras.Model`` that trains with ``compile(optimizer=...)`` + ``fit(images)``.
* :class:`MaskedConv2D`, :class:`GatedPixelCNNBlock`, :class:`MaskedResidualBlock`,
  :class:`CausalAttentionBlock`, :class:`PreviousSliceMap`, :class:`PriorConfig` / :class:`PixelCNN` -- autoregressive priors
  over the code grid: the plain masked stack (mask A, then mask B) and the gated PixelCNN without a
  blind spot, optionally with causal self-attention blocks and conditioned on the slice position
  (with a "no condition" slot for classifier-free guidance). Each of these layers has an
  ``init_cache`` / ``step`` pair for incremental generation; sampling lives in
  ``sampler.sample_codes``.

Every layer and model is registered with ``keras.saving.register_keras_serializable`` under the
package ``"oasis_vqvae"``, so after ``import modules`` a ``.keras`` file loads with
``keras.models.load_model(path)`` and no ``custom_objects``.

Shape conventions: images are ``(B, H, W, 1)`` float32 in ``[0, 1]``; the latent grid is
``(B, h, w, D)`` with ``h = H / downsample``; code indices are int32 ``(B, h, w)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
from keras import layers, ops

_PACKAGE = "oasis_vqvae"
_LAYER_KWARGS = ("name", "trainable", "dtype")  # Keras arguments a model takes beside its config


def _config_from_dict(cls, d: dict[str, Any] | None):
    """Build config dataclass ``cls`` from a dict, naming any keys it does not have."""
    d = dict(d or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} keys: {unknown}. Valid keys: {sorted(known)}")
    return cls(**d)

__all__ = ["VectorQuantizer", "ResidualBlock", "VQVAEConfig", "VQVAE", "build_encoder", "build_decoder",
           "build_discriminator", "hinge_discriminator_loss", "adaptive_weight",
           "causal_mask", "MaskedConv2D", "GatedPixelCNNBlock", "MaskedResidualBlock", "CausalAttentionBlock",
           "grid_position_encoding", "PreviousSliceMap", "PriorConfig", "PixelCNN"]


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
    is called with ``training=True``.

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

        if training:
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


@keras.saving.register_keras_serializable(package=_PACKAGE)
class VQVAE(keras.Model):
    """Encoder -> :class:`VectorQuantizer` -> decoder, trained with ``compile(optimizer)`` + ``fit``.

    Sub-models/layers are named ``encoder``, ``vector_quantizer`` and ``decoder``.

    Training data are image batches only, ``x`` (B, H, W, 1) float32 in [0, 1] (no ``y``). The
    loss is ``recon_weight * mean((x - x_hat)^2) + ssim_weight * (1 - SSIM(x, x_hat)) + vq_loss``
    where ``vq_loss`` is the quantiser's ``codebook + beta * commitment`` (or ``beta * commitment``
    with EMA). ``fit``/``evaluate`` report ``loss``, ``recon_loss`` (the unweighted MSE), ``ssim``,
    ``vq_loss``, ``perplexity`` and ``active_codes`` (fraction of the codebook used in a batch,
    averaged over batches).

    With ``adversarial=True`` (VQGAN, Esser et al. 2021) the model also holds ``discriminator`` (a
    PatchGAN, :func:`build_discriminator`) and ``disc_optimizer`` (its own Adam, loss-scaled under
    ``mixed_float16``), both saved with the model, so per-epoch checkpoints resume them; ``train_step``
    then updates the discriminator (hinge loss) and the VQ-VAE (``loss`` plus the adaptively weighted
    ``-mean(D(x_hat))``) after ``disc_start`` steps, and ``fit`` also reports ``disc_loss``,
    ``adv_loss`` and ``adv_weight`` (0 before ``disc_start``). Off, training is Keras' own
    ``train_step`` over ``compute_loss`` as before.

    Demo defaults (128x128, 32 filters, 2 residual blocks at 32x32, K=128 codes of D=32, EMA +
    restart after 20 idle steps) train at roughly 30-65 images/s (batch 16, 2 CPU cores, depending
    on load).

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
        out = self.decoder(q, training=training)
        return out if training else ops.clip(out, 0.0, 1.0)

    def encode(self, images):
        """images (B, H, W, 1) -> int32 codes (B, h, w)."""
        return self.vector_quantizer.get_code_indices(self.encoder(images, training=False))

    def decode(self, codes):
        """int codes (B, h, w) -> images (B, h*ds, w*ds, 1) float32 in [0, 1]."""
        return ops.clip(self.decoder(self.vector_quantizer.quantize(codes), training=False), 0.0, 1.0)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """``recon_weight * MSE + ssim_weight * (1 - SSIM) + vq_loss``; also updates the metrics."""
        x = ops.cast(x, "float32")
        y_pred = ops.cast(y_pred, "float32")
        recon = ops.mean((x - y_pred) ** 2)
        ssim = _mean_ssim(x, y_pred)
        vq = ops.sum([ops.cast(l, "float32") for l in self.losses]) if self.losses else 0.0
        total = self.config.recon_weight * recon + vq
        if self.config.ssim_weight:
            total = total + self.config.ssim_weight * (1.0 - ssim)
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


# --------------------------------------------------------------------------------------------
# PixelCNN priors over VQ-VAE code grids.
#
# Two autoregressive priors over a grid of integer codes ``(B, h, w)`` in raster order:
#
# * plain: keras.io-style PixelCNN (van den Oord et al. 2016, "Pixel Recurrent Neural Networks"):
#   a mask-A convolution, residual blocks around mask-B convolutions and a 1x1 head. Stacked masked
#   convolutions have a *blind spot* (positions up and to the right are never seen).
# * gated: van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders": a vertical
#   stack (rows above) and a horizontal stack (the current row, to the left) with gated activations
#   ``tanh(a) * sigmoid(b)``; the vertical stack feeds the horizontal one, so the receptive field has
#   no blind spot. The first layer shifts its inputs (down for the vertical stack, right for the
#   horizontal one) so a position never sees its own code.
#
# Both embed the codes with a ``keras.layers.Embedding`` and are fully convolutional (any grid);
# causal self-attention blocks (PixelSNAIL) can be interleaved with either stack.
# A conditioned prior (``num_conditions > 0``) takes ``(codes, condition)`` with an int condition
# ``(B,)`` (e.g. the slice index) whose embedding is added as a bias inside every layer.
# --------------------------------------------------------------------------------------------

def causal_mask(kernel_size, mask_type: str = "B") -> np.ndarray:
    """Raster-order mask for a ``(kh, kw)`` kernel, as float32 ``(kh, kw)``.

    Rows above the centre are visible; in the centre row the taps left of the centre are visible;
    mask "B" also keeps the centre tap (a layer may see its own position in the previous layer),
    mask "A" hides it (the first layer must not see the code it predicts). Rows below are hidden.
    """
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    mask = np.zeros((kh, kw), dtype="float32")
    ch, cw = kh // 2, kw // 2
    mask[:ch, :] = 1.0
    mask[ch, :cw] = 1.0
    if mask_type == "B":
        mask[ch, cw] = 1.0
    return mask


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MaskedConv2D(layers.Layer):
    """2-D convolution whose kernel is multiplied by a raster-order causal mask in ``call``.

    Args:
        filters: output channels.
        kernel_size: int or ``(kh, kw)``, odd.
        mask_type: "A" (hides the centre and everything after it) or "B" (hides what comes after).
        padding: "same" (zero padding, default) or "valid".

    Input ``(B, H, W, C)`` float -> output ``(B, H, W, filters)``.
    """

    def __init__(self, filters, kernel_size, mask_type="B", padding="same", use_bias=True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = ((int(kernel_size),) * 2 if isinstance(kernel_size, int)
                            else tuple(int(k) for k in kernel_size))
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        self.mask_type = mask_type
        self.padding = padding
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self._mask_np = causal_mask(self.kernel_size, mask_type)

    @property
    def mask(self) -> np.ndarray:
        """The ``(kh, kw)`` float32 mask applied to every (in, out) channel pair."""
        return self._mask_np.copy()

    def build(self, input_shape):
        in_ch = int(input_shape[-1])
        self.kernel = self.add_weight(name="kernel", shape=self.kernel_size + (in_ch, self.filters),
                                      initializer=self.kernel_initializer)
        self.bias = (self.add_weight(name="bias", shape=(self.filters,),
                                     initializer=self.bias_initializer)
                     if self.use_bias else None)

    def masked_kernel(self):
        """``kernel * mask``, ``(kh, kw, C_in, filters)``; the kernel actually convolved."""
        mask = ops.convert_to_tensor(self._mask_np[:, :, None, None], dtype=self.kernel.dtype)
        return self.kernel * mask

    def call(self, x):
        y = ops.conv(x, self.masked_kernel(), strides=1, padding=self.padding)
        if self.use_bias:
            y = y + self.bias
        return y

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.filters,)

    # ---- incremental generation (one position at a time, raster order)
    def init_cache(self, batch_size: int, grid_shape):
        """Zeros ``(B, h + kh//2, w + 2*(kw//2), C_in)``: this layer's inputs, padded like ``call``."""
        if self.padding != "same":
            raise ValueError("MaskedConv2D.step needs padding='same'")
        (ph, pw), (h, w) = (self.kernel_size[0] // 2, self.kernel_size[1] // 2), grid_shape
        return ops.zeros((batch_size, h + ph, w + 2 * pw, int(self.kernel.shape[2])), self.compute_dtype)

    def step(self, x, i, j, cache):
        """Output at ``(i, j)`` from the cached inputs; equals ``call`` on the full grid there.

        Args:
            x: ``(B, C_in)``, the newest input the output at ``(i, j)`` may see: the input at
                ``(i, j)`` for mask "B", at the raster position before it for mask "A" (ignored at
                ``(0, 0)``, which has none).
            i, j: int scalars (tensors inside a compiled loop).
            cache: from ``init_cache`` or the previous step.
        Returns:
            ``(y (B, filters), cache)``. Only the visible rows ``i-kh//2 .. i`` of the kernel are
            applied; taps the mask hides are zero, whatever the cache holds there.
        """
        ph, pw = self.kernel_size[0] // 2, self.kernel_size[1] // 2
        b, w, c = ops.shape(x)[0], ops.shape(cache)[2] - 2 * pw, ops.shape(cache)[3]
        pos = i * w + j
        if self.mask_type == "A":
            x = x * ops.cast(pos > 0, x.dtype)
            pos = pos - 1
        cache = ops.slice_update(cache, [0, ph + pos // w, pw + pos % w, 0], x[:, None, None, :])
        window = ops.slice(cache, [0, i, j, 0], [b, ph + 1, self.kernel_size[1], c])
        kernel = ops.reshape(self.masked_kernel()[: ph + 1], (-1, self.filters))
        y = ops.matmul(ops.reshape(window, (b, -1)), kernel)
        return (y + self.bias if self.use_bias else y), cache

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size, mask_type=self.mask_type,
                      padding=self.padding, use_bias=self.use_bias,
                      kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
                      bias_initializer=keras.initializers.serialize(self.bias_initializer))
        return config


def _gate(x):
    """Gated activation ``tanh(a) * sigmoid(b)`` over the two channel halves: (..., 2F) -> (..., F)."""
    a, b = ops.split(x, 2, axis=-1)
    return ops.tanh(a) * ops.sigmoid(b)


def _pointwise(conv, x):
    """A built 1x1 ``Conv2D`` applied to vectors: ``(..., C) -> (..., filters)`` (same weights)."""
    kernel = conv.kernel
    y = ops.matmul(x, ops.reshape(kernel, (kernel.shape[-2], kernel.shape[-1])))
    return y + conv.bias if conv.use_bias else y


def _check_grid(x, grid_shape) -> None:
    """A prior with per-position biases only takes grids of the shape it learned them for."""
    h, w = x.shape[1], x.shape[2]
    if h is not None and w is not None and (h, w) != tuple(grid_shape):
        raise ValueError(f"this prior learned positions of a {tuple(grid_shape)} grid (positional=True) "
                         f"and cannot take a {(h, w)} grid")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GatedPixelCNNBlock(layers.Layer):
    """One gated PixelCNN layer: vertical + horizontal stacks (van den Oord et al. 2016).

    Vertical conv: kernel ``(p+1, k)`` (p = k // 2) on the input padded ``p`` rows on top and ``p``
    columns each side, so output row ``i`` sees input rows ``i-p..i``. Horizontal conv: kernel
    ``(1, p+1)`` padded ``p`` columns on the left, so column ``j`` sees columns ``j-p..j``. With
    ``first=True`` the vertical input is shifted down one row and the horizontal input right one
    column, so the output at ``(i, j)`` depends only on codes strictly before ``(i, j)`` in raster
    order, and there is no residual connection. The vertical pre-activation is linked into the
    horizontal stack by a 1x1 conv (it only holds rows above, so nothing leaks).

    Call with ``[v, h]``, ``[v, h, condition]`` or ``[v, h, condition, condition_map]``: ``v, h``
    ``(B, H, W, F)`` float, ``condition`` ``(B,)`` int (or None), ``condition_map`` ``(B, H, W, M)``
    float, a spatial map of the condition that a 1x1 conv (``M = map_channels``) adds to the gates
    (location-dependent conditioning, van den Oord et al. 2016). Returns ``(v_out, h_out)``, both
    ``(B, H, W, F)``. The ``last`` layer of a stack feeds nothing above it from its vertical stack:
    it returns its input ``v`` unchanged as ``v_out`` and has no vertical condition terms (which
    would get no gradient).
    """

    def __init__(self, filters, kernel_size=3, first=False, num_conditions=0, dropout=0.0,
                 last=False, position_shape=None, map_channels=0, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
        self.first = bool(first)
        self.last = bool(last)
        self.position_shape = tuple(int(s) for s in position_shape) if position_shape else None
        self.num_conditions = int(num_conditions)
        self.map_channels = int(map_channels)
        self.dropout = float(dropout)
        p, f2 = self.kernel_size // 2, 2 * self.filters
        self.v_conv = layers.Conv2D(f2, (p + 1, self.kernel_size), padding="valid", name="v_conv")
        self.h_conv = layers.Conv2D(f2, (1, p + 1), padding="valid", name="h_conv")
        self.v_to_h = layers.Conv2D(f2, 1, name="v_to_h")
        self.h_out = layers.Conv2D(self.filters, 1, name="h_out")
        if self.num_conditions:
            if not self.last:
                self.cond_v = layers.Embedding(self.num_conditions, f2, name="cond_v")
            self.cond_h = layers.Embedding(self.num_conditions, f2, name="cond_h")
        if self.map_channels:
            if not self.last:
                self.map_v = layers.Conv2D(f2, 1, use_bias=False, name="map_v")
            self.map_h = layers.Conv2D(f2, 1, use_bias=False, name="map_h")
        self.drop = layers.Dropout(self.dropout, name="dropout")

    def build(self, input_shape=None):
        f, f2 = self.filters, 2 * self.filters
        if self.map_channels:
            if not self.last:
                self.map_v.build((None, None, None, self.map_channels))
            self.map_h.build((None, None, None, self.map_channels))
        self.v_conv.build((None, None, None, f))
        self.h_conv.build((None, None, None, f))
        self.v_to_h.build((None, None, None, f2))
        self.h_out.build((None, None, None, f))
        if self.num_conditions:
            if not self.last:
                self.cond_v.build((None,))
            self.cond_h.build((None,))
        if self.position_shape:  # learned per-position biases of the gates, (h, w, 2F)
            shape = (*self.position_shape, f2)
            self.pos_h = self.add_weight(shape=shape, initializer="zeros", name="position_h")
            if not self.last:
                self.pos_v = self.add_weight(shape=shape, initializer="zeros", name="position_v")

    def call(self, inputs, training=None):
        v, h = inputs[0], inputs[1]
        cond = inputs[2] if len(inputs) > 2 else None
        cmap = inputs[3] if len(inputs) > 3 else None
        p = self.kernel_size // 2
        v_in, h_in = v, h
        if self.first:  # shift so that (i, j) sees only rows < i (v) and columns < j (h)
            v_in = ops.pad(v, [[0, 0], [1, 0], [0, 0], [0, 0]])[:, :-1]
            h_in = ops.pad(h, [[0, 0], [0, 0], [1, 0], [0, 0]])[:, :, :-1]
        v_pre = self.v_conv(ops.pad(v_in, [[0, 0], [p, 0], [p, p], [0, 0]]))  # (B, H, W, 2F)
        h_pre = self.h_conv(ops.pad(h_in, [[0, 0], [0, 0], [p, 0], [0, 0]])) + self.v_to_h(v_pre)
        if cond is not None:
            h_pre = h_pre + self.cond_h(cond)[:, None, None, :]
            if not self.last:
                v_pre = v_pre + self.cond_v(cond)[:, None, None, :]
        if cmap is not None:
            h_pre = h_pre + self.map_h(cmap)
            if not self.last:
                v_pre = v_pre + self.map_v(cmap)
        if self.position_shape:
            _check_grid(v, self.position_shape)
            h_pre = h_pre + self.pos_h[None]
            if not self.last:
                v_pre = v_pre + self.pos_v[None]
        v_out = v if self.last else _gate(v_pre)
        h_new = self.h_out(self.drop(_gate(h_pre), training=training))
        if not self.first:
            h_new = h_new + h
        return v_out, h_new

    # ---- incremental generation (one position at a time, raster order)
    def init_cache(self, batch_size: int, grid_shape):
        """Zero caches for sampling a ``grid_shape`` grid (dict of tensors).

        ``inputs``: the vertical stack's inputs, padded as in ``call`` (the first layer's are the
        embedded codes, padded one more row on top and column on the left for its shift, and also
        read by its horizontal stack); ``h_in``: this row's horizontal inputs, padded ``p`` on the
        left; ``link`` and ``v_out``: the current row's vertical-to-horizontal link ``(B, w, 2F)``
        and vertical output ``(B, w, F)``, computed once per row.
        """
        (h, w), f, p = grid_shape, self.filters, self.kernel_size // 2
        s = 1 if self.first else 0
        zeros = lambda *shape: ops.zeros(shape, self.compute_dtype)  # noqa: E731
        cache = {"inputs": zeros(batch_size, h + p + s, w + 2 * p + s, f),
                 "link": zeros(batch_size, w, 2 * f), "v_out": zeros(batch_size, w, f)}
        if not self.first:
            cache["h_in"] = zeros(batch_size, w + p, f)
        return cache

    def step(self, inputs, i, j, cache, condition=None, condition_map=None):
        """Outputs at ``(i, j)``; equal to ``call`` on the full grid there (inference mode).

        Args:
            inputs: ``[v_row, h]``: ``v_row`` ``(B, w, F)`` the vertical stack's input for all of
                row ``i`` (it only depends on rows above, so the whole row is known when the row
                starts); ``h`` ``(B, F)`` the horizontal input at ``(i, j)``. The first layer reads
                neither: its input is the embedded code at the raster position before ``(i, j)``,
                passed as ``h`` (ignored at ``(0, 0)``), and its vertical row comes from the codes
                it has cached.
            i, j: int scalars. condition: ``(B,)`` int or None.
            condition_map: row ``i`` of the condition map, ``(B, w, M)``, or None.
        Returns:
            ``([v_row_out (B, w, F), h_out (B, F)], cache)``. The vertical row is computed when
            ``j == 0`` and reused along the row.
        """
        v_row, h = inputs
        p, f, f2 = self.kernel_size // 2, self.filters, 2 * self.filters
        s = 1 if self.first else 0
        b, w = ops.shape(h)[0], ops.shape(cache["link"])[1]
        cache = dict(cache)
        if self.first:  # store the newest code embedding: the one at the position before (i, j)
            pos = i * w + j - 1
            x = h * ops.cast(pos >= 0, h.dtype)
            cache["inputs"] = ops.slice_update(cache["inputs"], [0, p + 1 + pos // w, p + 1 + pos % w, 0],
                                               x[:, None, None, :])
        else:  # rewriting the same row along it is harmless
            cache["inputs"] = ops.slice_update(cache["inputs"], [0, p + i, p, 0], v_row[:, None])
        v_cond = self.cond_v(condition)[:, None, :] if condition is not None and not self.last else None

        def new_row():
            window = ops.slice(cache["inputs"], [0, i, s, 0], [b, p + 1, w + 2 * p, f])
            v_pre = ops.conv(window, self.v_conv.kernel, padding="valid")[:, 0] + self.v_conv.bias
            link = _pointwise(self.v_to_h, v_pre)
            if self.last:
                return cache["v_out"], link
            if v_cond is not None:
                v_pre = v_pre + v_cond
            if condition_map is not None:
                v_pre = v_pre + _pointwise(self.map_v, condition_map)
            if self.position_shape:
                v_pre = v_pre + ops.take(self.pos_v, i, axis=0)
            return _gate(v_pre), link

        v_out, link = ops.cond(ops.equal(j, 0), new_row, lambda: (cache["v_out"], cache["link"]))
        cache["v_out"], cache["link"] = v_out, link
        if self.first:
            window = ops.slice(cache["inputs"], [0, p + 1 + i, j, 0], [b, 1, p + 1, f])
        else:
            cache["h_in"] = ops.slice_update(cache["h_in"], [0, p + j, 0], h[:, None])
            window = ops.slice(cache["h_in"], [0, j, 0], [b, p + 1, f])
        h_pre = (ops.matmul(ops.reshape(window, (b, -1)), ops.reshape(self.h_conv.kernel, (-1, f2)))
                 + self.h_conv.bias + ops.take(link, j, axis=1))
        if condition is not None:
            h_pre = h_pre + self.cond_h(condition)
        if condition_map is not None:
            h_pre = h_pre + _pointwise(self.map_h, ops.take(condition_map, j, axis=1))
        if self.position_shape:
            h_pre = h_pre + ops.take(ops.take(self.pos_h, i, axis=0), j, axis=0)
        h_new = _pointwise(self.h_out, _gate(h_pre))
        if not self.first:
            h_new = h_new + h
        if self.last and not self.first:
            v_out = v_row
        return [v_out, h_new], cache

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size, first=self.first,
                      num_conditions=self.num_conditions, dropout=self.dropout, last=self.last,
                      position_shape=list(self.position_shape) if self.position_shape else None,
                      map_channels=self.map_channels)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MaskedResidualBlock(layers.Layer):
    """keras.io PixelCNN residual block: 1x1 (F/2) -> mask-B kxk (F/2) -> 1x1 (F), plus input.

    Call with ``x`` or ``[x, condition]``: ``x`` ``(B, H, W, F)``, ``condition`` ``(B,)`` int whose
    embedding is added after the masked conv. Returns ``(B, H, W, F)``.
    """

    def __init__(self, filters, kernel_size=3, num_conditions=0, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.num_conditions = int(num_conditions)
        self.dropout = float(dropout)
        half = max(self.filters // 2, 1)
        self.in_proj = layers.Conv2D(half, 1, name="in_proj")
        self.masked_conv = MaskedConv2D(half, self.kernel_size, "B", name="masked_conv")
        self.out_proj = layers.Conv2D(self.filters, 1, name="out_proj")
        if self.num_conditions:
            self.cond = layers.Embedding(self.num_conditions, half, name="cond")
        self.drop = layers.Dropout(self.dropout, name="dropout")

    def build(self, input_shape=None):
        half = max(self.filters // 2, 1)
        self.in_proj.build((None, None, None, self.filters))
        self.masked_conv.build((None, None, None, half))
        self.out_proj.build((None, None, None, half))
        if self.num_conditions:
            self.cond.build((None,))

    def call(self, inputs, training=None):
        if isinstance(inputs, (list, tuple)):
            x, cond = inputs[0], (inputs[1] if len(inputs) > 1 else None)
        else:
            x, cond = inputs, None
        y = self.masked_conv(ops.relu(self.in_proj(x)))
        if cond is not None:
            y = y + self.cond(cond)[:, None, None, :]
        y = self.drop(ops.relu(y), training=training)
        return x + self.out_proj(y)

    # ---- incremental generation (one position at a time, raster order)
    def init_cache(self, batch_size: int, grid_shape):
        """The masked conv's input cache (see ``MaskedConv2D.init_cache``)."""
        return {"masked_conv": self.masked_conv.init_cache(batch_size, grid_shape)}

    def step(self, x, i, j, cache, condition=None):
        """``x`` ``(B, F)`` at ``(i, j)`` -> ``((B, F), cache)``; equals ``call`` there (inference)."""
        y, conv_cache = self.masked_conv.step(ops.relu(_pointwise(self.in_proj, x)), i, j,
                                              cache["masked_conv"])
        if condition is not None:
            y = y + self.cond(condition)
        return x + _pointwise(self.out_proj, ops.relu(y)), {"masked_conv": conv_cache}

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size,
                      num_conditions=self.num_conditions, dropout=self.dropout)
        return config


def grid_position_encoding(i, j, channels: int = 16):
    """Fixed sinusoidal 2-D position features (Vaswani et al. 2017, per axis).

    ``i, j``: float tensors of any (broadcastable) shape -> ``(..., channels)`` holding
    ``sin / cos`` of ``i`` and of ``j`` at ``channels // 4`` frequencies ``100^(-k / (channels // 4))``
    (periods ~6 to ~200 grid steps, enough to tell positions of grids up to 64 apart). Fixed, so an
    attention block works on any grid; the same function serves ``call`` and ``step``.
    """
    n = channels // 4
    freqs = ops.power(100.0, -ops.arange(n, dtype="float32") / n)
    a = ops.expand_dims(ops.cast(i, "float32"), -1) * freqs
    b = ops.expand_dims(ops.cast(j, "float32"), -1) * freqs
    return ops.concatenate([ops.sin(a), ops.cos(a), ops.sin(b), ops.cos(b)], axis=-1)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CausalAttentionBlock(layers.Layer):
    """Causal multi-head self-attention over the code grid in raster order (PixelSNAIL-style).

    ``x + W_o · dropout(attention)``. The query at raster index ``p`` is a projection of
    ``LayerNorm(x)`` at ``p`` joined with fixed 2-D position features (``grid_position_encoding``);
    it attends to every key ``q <= p``, whose key and value are projections of ``LayerNorm(x)`` at
    ``q`` joined with the position features and with the embedded code at ``q - 1`` (Chen et al.
    2018, "PixelSNAIL", feeds the input to its keys the same way; the VQ-VAE-2 top prior). So every
    code before ``p`` is one attention step away (no blind spot, whatever the conv stack's reach),
    and none at or after ``p`` is: placed after the mask-A / shifted first layer (whose output at
    ``p`` depends only on codes ``< p``), the prior stays strictly causal. Key ``p`` itself is
    always visible, so no row of the softmax is empty.

    Args:
        filters: channels F of the stream (input and output).
        heads: attention heads. key_dim: query/key/value channels per head.
        dropout: rate on the attention output before the projection (training only), as PixelSNAIL
            applies dropout inside its blocks.
        position_channels: size of the position features (a multiple of 4).

    Call: ``[x, e]``: the stream ``x`` ``(B, H, W, F)`` and the code embedding ``e`` ``(B, H, W, F)``
    (unshifted; the block shifts it) -> ``(B, H, W, F)``. Memory and time grow as ``(H·W)^2`` per head.
    """

    def __init__(self, filters, heads=2, key_dim=16, dropout=0.0, position_channels=16, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.heads, self.key_dim = int(filters), int(heads), int(key_dim)
        self.dropout = float(dropout)
        self.position_channels = int(position_channels)
        if self.position_channels % 4 or self.heads < 1 or self.key_dim < 1:
            raise ValueError("CausalAttentionBlock needs heads >= 1, key_dim >= 1 and position_channels % 4 == 0")
        d = self.heads * self.key_dim
        self.norm = layers.LayerNormalization(epsilon=1e-5, name="norm")
        self.query = layers.Dense(d, name="query")
        self.key = layers.Dense(d, name="key")
        self.value = layers.Dense(d, name="value")
        self.out_proj = layers.Dense(self.filters, name="out_proj")
        self.drop = layers.Dropout(self.dropout, name="dropout")

    def build(self, input_shape=None):
        f, d = self.filters, self.heads * self.key_dim
        self.norm.build((None, f))
        self.query.build((None, f + self.position_channels))
        self.key.build((None, 2 * f + self.position_channels))
        self.value.build((None, 2 * f + self.position_channels))
        self.out_proj.build((None, d))

    def _qkv(self, x, e_prev, pe):
        """x, previous code embedding ``(..., F)``, position features ``(..., P)`` -> q, k, v
        ``(..., heads, key_dim)``."""
        xn = self.norm(x)
        pe = ops.cast(pe, xn.dtype)
        xp = ops.concatenate([xn, pe], axis=-1)
        kv = ops.concatenate([xn, ops.cast(e_prev, xn.dtype), pe], axis=-1)
        split = lambda t: ops.reshape(t, ops.shape(t)[:-1] + (self.heads, self.key_dim))  # noqa: E731
        return split(self.query(xp)), split(self.key(kv)), split(self.value(kv))

    def call(self, inputs, training=None):
        x, e = inputs
        b, h, w = ops.shape(x)[0], ops.shape(x)[1], ops.shape(x)[2]
        ii, jj = ops.meshgrid(ops.arange(h), ops.arange(w), indexing="ij")
        pe = ops.broadcast_to(grid_position_encoding(ii, jj, self.position_channels)[None],
                              (b, h, w, self.position_channels))
        e = ops.reshape(e, (b, h * w, -1))  # shift by one raster position: key q gets code q - 1
        e_prev = ops.reshape(ops.pad(e, [[0, 0], [1, 0], [0, 0]])[:, :-1], (b, h, w, -1))
        q, k, v = self._qkv(x, e_prev, pe)  # (B, H, W, heads, d)
        flat = lambda t: ops.transpose(ops.reshape(t, (b, h * w, self.heads, self.key_dim)), (0, 2, 1, 3))  # noqa: E731
        q, k, v = flat(q), flat(k), flat(v)  # (B, heads, N, d)
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / math.sqrt(self.key_dim)
        n = h * w
        causal = ops.arange(n)[None, :] <= ops.arange(n)[:, None]  # key index <= query index
        scores = ops.where(causal, ops.cast(scores, "float32"), float("-inf"))
        attn = ops.matmul(ops.cast(ops.softmax(scores, axis=-1), v.dtype), v)  # (B, heads, N, d)
        attn = ops.reshape(ops.transpose(attn, (0, 2, 1, 3)), (b, h, w, self.heads * self.key_dim))
        return x + self.out_proj(self.drop(attn, training=training))

    # ---- incremental generation (one position at a time, raster order)
    def init_cache(self, batch_size: int, grid_shape):
        """Key and value caches, each ``(B, heads, h, w, key_dim)`` zeros."""
        shape = (batch_size, self.heads, *grid_shape, self.key_dim)
        return {"key": ops.zeros(shape, self.compute_dtype), "value": ops.zeros(shape, self.compute_dtype)}

    def step(self, inputs, i, j, cache, condition=None):
        """``[x, e_prev]``: the stream at ``(i, j)`` and the embedded code at the raster position
        before it (ignored at ``(0, 0)``), each ``(B, F)`` -> ``((B, F), cache)``. Stores this
        position's key and value and attends over the cached ones at raster index ``<= i*w + j``
        (KerasHub's ``CachedMultiHeadAttention``, in 2-D); equals ``call`` there (inference)."""
        x, e_prev = inputs
        b, h, w = ops.shape(x)[0], ops.shape(cache["key"])[2], ops.shape(cache["key"])[3]
        e_prev = e_prev * ops.cast(i * w + j > 0, e_prev.dtype)
        pe = ops.broadcast_to(grid_position_encoding(i, j, self.position_channels)[None], (b, self.position_channels))
        q, k, v = self._qkv(x, e_prev, pe)  # (B, heads, d)
        cache = {"key": ops.slice_update(cache["key"], [0, 0, i, j, 0], k[:, :, None, None, :]),
                 "value": ops.slice_update(cache["value"], [0, 0, i, j, 0], v[:, :, None, None, :])}
        keys = ops.reshape(cache["key"], (b, self.heads, h * w, self.key_dim))
        values = ops.reshape(cache["value"], (b, self.heads, h * w, self.key_dim))
        scores = ops.squeeze(ops.matmul(keys, q[..., None]), -1) / math.sqrt(self.key_dim)  # (B, heads, N)
        visible = ops.arange(h * w) <= i * w + j
        scores = ops.where(visible, ops.cast(scores, "float32"), float("-inf"))
        attn = ops.matmul(ops.cast(ops.softmax(scores, axis=-1), values.dtype)[:, :, None, :], values)[:, :, 0]
        return x + self.out_proj(ops.reshape(attn, (b, self.heads * self.key_dim))), cache

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, heads=self.heads, key_dim=self.key_dim, dropout=self.dropout,
                      position_channels=self.position_channels)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PreviousSliceMap(layers.Layer):
    """Spatial condition map from the previous slice's code grid: ``(B, h, w)`` int -> ``(B, h, w, M)``.

    The slice before is known in full before the current one is drawn, so it enters as a condition,
    not through the raster order, and needs no mask: an embedding of its codes (one more row, index
    ``num_embeddings``, is the learned "no previous slice"), ``num_convs`` ordinary 3x3 convs with ReLU
    (each widens the view by one code each way) and a 1x1 conv to ``channels`` = M. ``PixelCNN`` adds
    the map to the slice's condition map, so every gated layer sees it through its own 1x1 map convs
    (location-dependent conditioning, van den Oord et al. 2016), in ``call`` over the grid and, row
    by row, in ``step``: the sampler needs nothing new beyond computing the map once per grid.
    """

    def __init__(self, num_embeddings, channels, filters=32, num_convs=2, **kwargs):
        super().__init__(**kwargs)
        self.num_embeddings, self.channels = int(num_embeddings), int(channels)
        self.filters, self.num_convs = int(filters), int(num_convs)
        self.embedding = layers.Embedding(self.num_embeddings + 1, self.filters, name="embedding")
        self.convs = [layers.Conv2D(self.filters, 3, padding="same", activation="relu", name=f"conv_{n}")
                      for n in range(self.num_convs)]
        self.out = layers.Conv2D(self.channels, 1, name="out")

    @property
    def no_previous(self) -> int:
        """The code value that means "no previous slice" (``num_embeddings``)."""
        return self.num_embeddings

    def build(self, input_shape=None):
        self.embedding.build((None, None, None))
        for conv in self.convs:
            conv.build((None, None, None, self.filters))
        self.out.build((None, None, None, self.filters))

    def call(self, previous):
        x = self.embedding(ops.cast(previous, "int32"))  # (B, h, w, filters)
        for conv in self.convs:
            x = conv(x)
        return self.out(x)  # (B, h, w, M)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.channels,)

    def get_config(self):
        config = super().get_config()
        config.update(num_embeddings=self.num_embeddings, channels=self.channels, filters=self.filters,
                      num_convs=self.num_convs)
        return config


@dataclass
class PriorConfig:
    """Settings of a PixelCNN prior (saved as ``config.json`` beside the weights).

    Everything the prior needs is here: ``num_conditions > 0`` means conditioned on an int in
    ``[0, num_conditions)`` (the slice position), and ``grid_shape`` is the code grid it is trained
    on. Each field's ``metadata["help"]`` is the help of its ``train.py`` flag (``--prior-<field>``).
    """

    gated: bool = field(default=True, metadata={
        "help": "gated PixelCNN without blind spot (van den Oord et al. 2016); --no-prior-gated: plain masked stack"})
    filters: int = field(default=48, metadata={"help": "channels of the code embedding and of every layer"})
    num_layers: int = field(default=6, metadata={"help": "gated layers (including the first) or plain residual blocks"})
    kernel_size: int = field(default=3, metadata={"help": "kernel of the layers after the first (odd, >= 3)"})
    first_kernel_size: int = field(default=5, metadata={
        "help": "kernel of the first (mask-A / shifted) layer (odd, >= 3)"})
    num_conditions: int = field(default=0, metadata={
        "help": "0: unconditioned; else the number of condition classes 0..num_conditions-1 (train.py sets it "
                "from the training split's slice numbers)"})
    grid_shape: tuple | None = field(default=None, metadata={
        "help": "(h, w) of the code grids it is trained on (samplers default to it)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout rate inside the layers (training only)"})
    positional: bool = field(default=False, metadata={
        "help": "learn a bias per grid position in the first layer, so the prior knows where in the slice it "
                "is beyond its receptive field (samples only grids of grid_shape)"})
    attention_every: int = field(default=0, metadata={
        "help": "a causal self-attention block (PixelSNAIL) after every N-th layer; 0: none"})
    attention_heads: int = field(default=2, metadata={"help": "heads of each attention block"})
    attention_dim: int = field(default=16, metadata={"help": "query/key/value channels per attention head"})
    condition_dropout: float = field(default=0.0, metadata={
        "help": "fraction of training examples whose slice condition is replaced by a learned "
                "'no condition' slot, for classifier-free guidance (needs slice conditioning)"})
    condition_map: int = field(default=0, metadata={
        "help": "channels of a learned spatial map per slice position that every gated layer adds to its "
                "gates through a 1x1 conv (location-dependent conditioning, van den Oord et al. 2016): where "
                "the anatomy of that slice lies; an unconditioned prior learns one map. 0: none (needs "
                "gated and grid_shape)"})
    previous_slice: bool = field(default=False, metadata={
        "help": "also condition on the previous slice's code grid (known in full before this slice is drawn): an "
                "embedding of its codes and a few ordinary convs make a condition_map-channel map added to the "
                "slice's condition map, for drawing whole subjects slice by slice (needs condition_map)"})
    previous_dropout: float = field(default=0.0, metadata={
        "help": "fraction of training examples whose previous slice is replaced by a learned 'no previous "
                "slice', so one prior also draws a subject's first slice and single slices (needs previous_slice)"})

    def __post_init__(self):
        for name in ("kernel_size", "first_kernel_size"):
            k = getattr(self, name)
            if int(k) != k or k < 3 or k % 2 == 0:
                raise ValueError(f"PriorConfig.{name} must be an odd int >= 3, got {k!r}")
        if self.filters < 2 or self.num_layers < 1 or self.num_conditions < 0:
            raise ValueError("PriorConfig needs filters >= 2, num_layers >= 1, num_conditions >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"PriorConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.positional and self.grid_shape is None:
            raise ValueError("PriorConfig.positional needs grid_shape (the grid whose positions it learns)")
        if self.attention_every < 0 or self.attention_heads < 1 or self.attention_dim < 1:
            raise ValueError("PriorConfig needs attention_every >= 0 (0: no attention), attention_heads >= 1 "
                             "and attention_dim >= 1")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ValueError(f"PriorConfig.condition_dropout must be in [0, 1), got {self.condition_dropout!r}")
        if self.condition_map < 0:
            raise ValueError(f"PriorConfig.condition_map must be >= 0 (0: none), got {self.condition_map!r}")
        if self.condition_map and (not self.gated or self.grid_shape is None):
            raise ValueError("PriorConfig.condition_map needs gated=True and grid_shape (the grid its maps cover)")
        if self.previous_slice and not self.condition_map:
            raise ValueError("PriorConfig.previous_slice needs condition_map > 0 (the previous slice enters as a "
                             "spatial map added to the slice's condition map)")
        if not 0.0 <= self.previous_dropout < 1.0:
            raise ValueError(f"PriorConfig.previous_dropout must be in [0, 1), got {self.previous_dropout!r}")
        if self.previous_dropout and not self.previous_slice:
            raise ValueError("PriorConfig.previous_dropout needs previous_slice=True")
        if self.grid_shape is not None:
            self.grid_shape = tuple(int(s) for s in self.grid_shape)
            if len(self.grid_shape) != 2 or min(self.grid_shape) < 1:
                raise ValueError(f"PriorConfig.grid_shape must be (h, w), got {self.grid_shape!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["grid_shape"] = list(self.grid_shape) if self.grid_shape is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "PriorConfig":
        return _config_from_dict(cls, d)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PixelCNN(keras.Model):
    """Autoregressive prior over VQ-VAE code grids.

    Args:
        num_embeddings: codebook size K (codes are ints in ``[0, K)``).
        config: a ``PriorConfig``, its dict, or None (defaults).
        **overrides: PriorConfig fields overriding ``config`` (and Keras' name/trainable/dtype).

    Call: ``codes`` int ``(B, h, w)``; or ``(codes, condition)`` with ``condition`` int ``(B,)`` when
    ``config.num_conditions > 0``; a prior with ``previous_slice`` also takes ``(codes, condition,
    previous)`` (or ``(codes, previous)`` when unconditioned), ``previous`` int ``(B, h, w)`` the codes
    of the slice before (the value ``no_previous`` everywhere, or leaving it out: "no previous slice"). Returns logits ``(B, h, w, K)`` float32 whose value at ``(i, j)``
    depends only on codes before ``(i, j)`` in raster order (and on the condition). Train with
    ``compile(loss=SparseCategoricalCrossentropy(from_logits=True))``; ``fit(codes, codes)``.

    Layout: the input stage (gated: the shifted first gated layer; plain: a mask-A conv with the
    condition and position biases), then ``num_layers - 1`` gated layers (or ``num_layers`` masked
    residual blocks), with a ``CausalAttentionBlock`` on the horizontal stream (plain: the stream)
    after every ``attention_every``-th layer, then a 1x1 head. With ``condition_map = M`` the prior
    holds ``condition_maps`` ``(slots, h, w, M)``: a learned spatial map per condition slot (one map
    when unconditioned), which every gated layer adds to its gates through its own 1x1 conv, in
    ``call`` over the grid and in ``step`` at the row / position being drawn.

    Classifier-free guidance: with ``condition_dropout > 0`` the condition embeddings get one more
    row, the "no condition" slot ``null_condition`` (= ``num_conditions``); ``fit`` replaces the
    condition of that fraction of examples by it, and calling with ``condition == null_condition``
    gives the unconditional prior. Priors saved without ``condition_dropout`` load as before.

    Previous slice: with ``previous_slice`` a :class:`PreviousSliceMap` turns the previous slice's codes
    into an ``(B, h, w, M)`` map that is added to the slice's condition map before the gated layers, so
    the previous slice reaches every layer's gates the way the slice position does; ``previous_dropout``
    trains that fraction of examples with the learned "no previous slice" (a subject's first slice, and
    plain single-slice sampling). Priors saved without it load as before (default off).

    Sampling (``sampler.sample_codes``) uses ``init_cache`` and ``call_with_cache``: one raster
    position per call, each layer updating its own cache through its ``step`` method.
    """

    def __init__(self, num_embeddings: int, config: PriorConfig | dict | None = None, **overrides):
        keras_kwargs = {k: overrides.pop(k) for k in _LAYER_KWARGS if k in overrides}
        keras_kwargs.setdefault("name", "pixelcnn")
        if config is None:
            config = PriorConfig()
        elif isinstance(config, dict):
            config = PriorConfig.from_dict(config)
        elif not isinstance(config, PriorConfig):
            raise TypeError(f"config must be a PriorConfig, dict or None, got {type(config)}")
        if overrides:
            PriorConfig.from_dict({**config.to_dict(), **overrides})  # names unknown keys
            config = dataclasses.replace(config, **overrides)
        super().__init__(**keras_kwargs)
        self.num_embeddings = int(num_embeddings)
        self.config = config
        c = config
        slots = c.num_conditions + (1 if self.has_null_condition else 0)  # embedding rows per condition
        self.embedding = layers.Embedding(self.num_embeddings, c.filters, name="code_embedding")
        if c.gated:
            self.input_block = GatedPixelCNNBlock(c.filters, c.first_kernel_size, first=True,
                                                  num_conditions=slots, dropout=c.dropout,
                                                  last=c.num_layers == 1, name="gated_0",
                                                  position_shape=c.grid_shape if c.positional else None,
                                                  map_channels=c.condition_map)
            self.blocks = [GatedPixelCNNBlock(c.filters, c.kernel_size, num_conditions=slots,
                                              dropout=c.dropout, last=i == c.num_layers - 1, name=f"gated_{i}",
                                              map_channels=c.condition_map)
                           for i in range(1, c.num_layers)]
        else:
            self.input_conv = MaskedConv2D(c.filters, c.first_kernel_size, "A", name="input_conv")
            if c.num_conditions:
                self.input_cond = layers.Embedding(slots, c.filters, name="input_cond")
            self.blocks = [MaskedResidualBlock(c.filters, c.kernel_size, slots,
                                               c.dropout, name=f"residual_{i}")
                           for i in range(c.num_layers)]
        n_attention = c.num_layers // c.attention_every if c.attention_every else 0
        self.attention_blocks = [CausalAttentionBlock(c.filters, c.attention_heads, c.attention_dim, c.dropout,
                                                      name=f"attention_{a}") for a in range(n_attention)]
        if self.has_null_condition:
            self.condition_seed = keras.random.SeedGenerator(0, name="condition_dropout_seed")
        if c.previous_slice:
            self.previous_map = PreviousSliceMap(self.num_embeddings, c.condition_map, c.filters, name="previous_map")
            if c.previous_dropout:
                self.previous_seed = keras.random.SeedGenerator(1, name="previous_dropout_seed")
        self.head_hidden = layers.Conv2D(c.filters, 1, name="head_hidden")
        self.head_out = layers.Conv2D(self.num_embeddings, 1, dtype="float32", name="logits")

    @property
    def has_null_condition(self) -> bool:
        """True when the prior has the learned "no condition" slot (``condition_dropout > 0``)."""
        return self.config.num_conditions > 0 and self.config.condition_dropout > 0

    @property
    def null_condition(self) -> int:
        """The condition value meaning "no condition" (``num_conditions``); needs the slot."""
        if not self.has_null_condition:
            raise ValueError("this prior has no 'no condition' slot: it is unconditioned, or was trained "
                             "with condition_dropout=0; retrain it with condition_dropout > 0 "
                             "(e.g. 0.1) to sample without a condition or with guidance")
        return self.config.num_conditions

    @property
    def no_previous(self) -> int:
        """The code value meaning "no previous slice" in a ``previous`` grid (``num_embeddings``)."""
        if not self.config.previous_slice:
            raise ValueError("this prior is not conditioned on the previous slice (previous_slice=False)")
        return self.num_embeddings

    def build(self, input_shape=None):
        f = self.config.filters
        self.embedding.build((None, None, None))
        if self.config.previous_slice:
            self.previous_map.build()
        if self.config.gated:
            self.input_block.build()
            if self.config.condition_map:  # one map per condition slot (one map if unconditioned)
                slots = max(self.config.num_conditions + (1 if self.has_null_condition else 0), 1)
                self.condition_maps = self.add_weight(
                    shape=(slots, *self.config.grid_shape, self.config.condition_map), initializer="zeros",
                    name="condition_maps")
        else:
            self.input_conv.build((None, None, None, f))
            if self.config.num_conditions:
                self.input_cond.build((None,))
            if self.config.positional:
                self.position_bias = self.add_weight(shape=(*self.config.grid_shape, f), initializer="zeros",
                                                     name="position_bias")
        for block in self.blocks + self.attention_blocks:
            block.build()
        self.head_hidden.build((None, None, None, f))
        self.head_out.build((None, None, None, f))

    def _split_inputs(self, inputs):
        """``(codes, cond, previous)`` from the accepted input forms (see the class docstring)."""
        c = self.config
        conditioned = c.num_conditions > 0
        forms = ("(codes, condition)" if conditioned else "codes") + (
            (", or (codes, condition, previous)" if conditioned else ", or (codes, previous)")
            if c.previous_slice else "")
        cond = previous = None
        if isinstance(inputs, (list, tuple)):
            if len(inputs) == 2 and conditioned:
                codes, cond = inputs
            elif len(inputs) == 2 and c.previous_slice:
                codes, previous = inputs
            elif len(inputs) == 3 and conditioned and c.previous_slice:
                codes, cond, previous = inputs
            else:
                raise ValueError(f"this PixelCNN (num_conditions={c.num_conditions}, previous_slice="
                                 f"{c.previous_slice}) takes {forms}; got a {len(inputs)}-tuple")
        else:
            if conditioned:
                raise ValueError("This PixelCNN is conditioned (num_conditions="
                                 f"{c.num_conditions}): call it with {forms}")
            codes = inputs
        codes = ops.cast(codes, "int32")
        if cond is not None:
            cond = ops.reshape(ops.cast(cond, "int32"), (-1,))
        if previous is not None:
            previous = ops.cast(previous, "int32")
        return codes, cond, previous

    def _previous_map(self, previous, batch_size, grid_shape, training=None):
        """The previous slice's map ``(B, h, w, M)``; ``previous=None``: the "no previous slice" map."""
        if previous is None:
            previous = ops.full((batch_size, *grid_shape), self.num_embeddings, "int32")
        else:
            previous = ops.cast(previous, "int32")
        if training and self.config.previous_dropout:
            # one prior for first slices and single slices too: train some examples without the slice before
            drop = keras.random.uniform((batch_size,), seed=self.previous_seed) < self.config.previous_dropout
            previous = ops.where(drop[:, None, None], self.num_embeddings, previous)
        return self.previous_map(previous)

    def _attention_after(self, n: int):
        """The attention block after layer ``n`` (1-based, counting the gated first layer), or None."""
        every = self.config.attention_every
        return self.attention_blocks[n // every - 1] if every and n % every == 0 else None

    def call(self, inputs, training=None):
        codes, cond, previous = self._split_inputs(inputs)
        if cond is not None and training and self.has_null_condition:
            # classifier-free guidance (Ho & Salimans 2022): drop the condition of some examples
            drop = keras.random.uniform(ops.shape(cond), seed=self.condition_seed) < self.config.condition_dropout
            cond = ops.where(drop, self.config.num_conditions, cond)
        extra = [cond] if cond is not None else []
        x = self.embedding(codes)  # (B, h, w, F)
        if self.config.condition_map:
            _check_grid(x, self.config.grid_shape)
            cmap = ops.take(self.condition_maps, self._map_index(codes, cond), axis=0)  # (B, h, w, M)
            if self.config.previous_slice:
                cmap = cmap + self._previous_map(previous, ops.shape(codes)[0], self.config.grid_shape, training)
            extra = [cond, cmap]
        if self.config.gated:
            v, h = self.input_block([x, x] + extra, training=training)
            for n, block in enumerate(self.blocks, 2):
                h = self._attend(n - 1, h, x, training)
                v, h = block([v, h] + extra, training=training)
            out = self._attend(len(self.blocks) + 1, h, x, training)
        else:
            out = self.input_conv(x)
            if cond is not None:
                out = out + self.input_cond(cond)[:, None, None, :]
            if self.config.positional:
                _check_grid(out, self.config.grid_shape)
                out = out + self.position_bias[None]
            out = ops.relu(out)
            for n, block in enumerate(self.blocks, 1):
                out = self._attend(n, block([out] + extra, training=training), x, training)
        hidden = ops.relu(self.head_hidden(ops.relu(out)))
        return self.head_out(hidden)  # (B, h, w, K) float32 logits

    def _map_index(self, codes, cond):
        """Row of ``condition_maps`` per example: the condition, or 0 for an unconditioned prior."""
        return cond if cond is not None else ops.zeros(ops.shape(codes)[:1], "int32")

    def _attend(self, n, stream, embedded, training):
        block = self._attention_after(n)
        return stream if block is None else block([stream, embedded], training=training)

    # ---- incremental generation: one raster position per call, each layer owning its step
    def init_cache(self, batch_size: int, grid_shape, previous=None):
        """Zero caches of every layer for sampling ``batch_size`` grids of ``grid_shape``.

        A nested structure of tensors (what ``tf.while_loop`` carries); only ``call_with_cache``
        reads it. ``previous``: int ``(B, h, w)``, the previous slices' codes, for a prior with
        ``previous_slice`` (None: "no previous slice"); their map is computed here, once per grid,
        and read row by row.
        """
        grid_shape = tuple(int(s) for s in grid_shape)
        first = self.input_block if self.config.gated else self.input_conv
        cache = {"input": first.init_cache(batch_size, grid_shape),
                 "blocks": [b.init_cache(batch_size, grid_shape) for b in self.blocks],
                 "attention": [a.init_cache(batch_size, grid_shape) for a in self.attention_blocks]}
        if self.config.previous_slice:
            cache["previous_map"] = ops.cast(self._previous_map(previous, batch_size, grid_shape), self.compute_dtype)
        elif previous is not None:
            raise ValueError("init_cache: previous given but this prior is not conditioned on the previous slice")
        return cache

    def call_with_cache(self, prev_codes, i, j, cache, condition=None):
        """Logits at raster position ``(i, j)`` given the codes drawn so far (inference mode).

        Args:
            prev_codes: int ``(B,)``, the code at the position before ``(i, j)`` in raster order,
                the newest one the prior may see (ignored at ``(0, 0)``). Call at every position
                in raster order from ``(0, 0)``: each layer caches what it has been given.
            i, j: int scalars (tensors inside a compiled loop).
            cache: from ``init_cache`` or the previous call. condition: ``(B,)`` int or None.
        Returns:
            ``(logits (B, K) float32, cache)``, equal (up to float rounding) to
            ``self(codes)[:, i, j]`` for the full grid holding those codes.
        """
        if (condition is None) != (self.config.num_conditions == 0):
            raise ValueError("call_with_cache: pass condition exactly when the prior is conditioned")
        if condition is not None:
            condition = ops.cast(condition, "int32")
        x = self.embedding(ops.cast(prev_codes, "int32"))  # (B, F)
        blocks, attention = list(cache["blocks"]), list(cache["attention"])
        map_row = None  # row i of each example's condition map, (B, w, M)
        if self.config.condition_map:
            map_row = ops.take(ops.take(self.condition_maps, i, axis=1), self._map_index(prev_codes, condition),
                               axis=0)
            if self.config.previous_slice:
                map_row = map_row + ops.take(cache["previous_map"], i, axis=1)

        def attend(n, stream):
            block = self._attention_after(n)
            if block is None:
                return stream
            a = n // self.config.attention_every - 1
            stream, attention[a] = block.step([stream, x], i, j, attention[a])
            return stream

        if self.config.gated:
            (v, h), first = self.input_block.step([None, x], i, j, cache["input"], condition, map_row)
            for n, block in enumerate(self.blocks):
                h = attend(n + 1, h)
                (v, h), blocks[n] = block.step([v, h], i, j, blocks[n], condition, map_row)
            out = attend(len(self.blocks) + 1, h)
        else:
            out, first = self.input_conv.step(x, i, j, cache["input"])
            if condition is not None:
                out = out + self.input_cond(condition)
            if self.config.positional:
                out = out + ops.take(ops.take(self.position_bias, i, axis=0), j, axis=0)
            out = ops.relu(out)
            for n, block in enumerate(self.blocks):
                out, blocks[n] = block.step(out, i, j, blocks[n], condition)
                out = attend(n + 1, out)
        hidden = ops.relu(_pointwise(self.head_hidden, ops.relu(out)))
        logits = ops.cast(_pointwise(self.head_out, hidden), "float32")
        new_cache = {"input": first, "blocks": blocks, "attention": attention}
        if "previous_map" in cache:
            new_cache["previous_map"] = cache["previous_map"]
        return logits, new_cache

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable,
                "num_embeddings": self.num_embeddings, "config": self.config.to_dict()}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config.pop("dtype", None)
        return cls(**config)
