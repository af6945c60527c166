"""PixelCNN priors over VQ-VAE code grids (draft; merged verbatim into modules.py).

Two autoregressive priors over a grid of integer codes ``(B, h, w)`` in raster order:

* plain: keras.io-style PixelCNN (van den Oord et al. 2016, "Pixel Recurrent Neural Networks"):
  a mask-A convolution, residual blocks around mask-B convolutions and a 1x1 head. Stacked masked
  convolutions have a *blind spot* (positions up and to the right are never seen).
* gated: van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders": a vertical
  stack (rows above) and a horizontal stack (the current row, to the left) with gated activations
  ``tanh(a) * sigmoid(b)``; the vertical stack feeds the horizontal one, so the receptive field has
  no blind spot. The first layer shifts its inputs (down for the vertical stack, right for the
  horizontal one) so a position never sees its own code.

Both embed the codes with a ``keras.layers.Embedding`` and are fully convolutional (any grid).
A conditioned prior (``num_conditions > 0``) takes ``(codes, condition)`` with an int condition
``(B,)`` (e.g. the slice index) whose embedding is added as a bias inside every layer.

Nothing runs on import. Only numpy / keras / stdlib are imported so the file can be merged into
``modules.py`` as is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import keras
from keras import layers, ops

__all__ = [
    "causal_mask",
    "MaskedConv2D",
    "GatedPixelCNNBlock",
    "MaskedResidualBlock",
    "PriorConfig",
    "PixelCNN",
]

_PACKAGE = "oasis_vqvae"


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

    Call with ``[v, h]`` or ``[v, h, condition]``: ``v, h`` ``(B, H, W, F)`` float, ``condition``
    ``(B,)`` int. Returns ``(v_out, h_out)``, both ``(B, H, W, F)``.
    """

    def __init__(self, filters, kernel_size=3, first=False, num_conditions=0, dropout=0.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
        self.first = bool(first)
        self.num_conditions = int(num_conditions)
        self.dropout = float(dropout)
        p, f2 = self.kernel_size // 2, 2 * self.filters
        self.v_conv = layers.Conv2D(f2, (p + 1, self.kernel_size), padding="valid", name="v_conv")
        self.h_conv = layers.Conv2D(f2, (1, p + 1), padding="valid", name="h_conv")
        self.v_to_h = layers.Conv2D(f2, 1, name="v_to_h")
        self.h_out = layers.Conv2D(self.filters, 1, name="h_out")
        if self.num_conditions:
            self.cond_v = layers.Embedding(self.num_conditions, f2, name="cond_v")
            self.cond_h = layers.Embedding(self.num_conditions, f2, name="cond_h")
        self.drop = layers.Dropout(self.dropout, name="dropout")

    def build(self, input_shape=None):
        f, f2 = self.filters, 2 * self.filters
        self.v_conv.build((None, None, None, f))
        self.h_conv.build((None, None, None, f))
        self.v_to_h.build((None, None, None, f2))
        self.h_out.build((None, None, None, f))
        if self.num_conditions:
            self.cond_v.build((None,))
            self.cond_h.build((None,))

    def call(self, inputs, training=None):
        v, h = inputs[0], inputs[1]
        cond = inputs[2] if len(inputs) > 2 else None
        p = self.kernel_size // 2
        v_in, h_in = v, h
        if self.first:  # shift so that (i, j) sees only rows < i (v) and columns < j (h)
            v_in = ops.pad(v, [[0, 0], [1, 0], [0, 0], [0, 0]])[:, :-1]
            h_in = ops.pad(h, [[0, 0], [0, 0], [1, 0], [0, 0]])[:, :, :-1]
        v_pre = self.v_conv(ops.pad(v_in, [[0, 0], [p, 0], [p, p], [0, 0]]))  # (B, H, W, 2F)
        h_pre = self.h_conv(ops.pad(h_in, [[0, 0], [0, 0], [p, 0], [0, 0]])) + self.v_to_h(v_pre)
        if cond is not None:
            v_pre = v_pre + self.cond_v(cond)[:, None, None, :]
            h_pre = h_pre + self.cond_h(cond)[:, None, None, :]
        v_out = _gate(v_pre)
        h_new = self.h_out(self.drop(_gate(h_pre), training=training))
        if not self.first:
            h_new = h_new + h
        return v_out, h_new

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size, first=self.first,
                      num_conditions=self.num_conditions, dropout=self.dropout)
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

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size,
                      num_conditions=self.num_conditions, dropout=self.dropout)
        return config


@dataclass
class PriorConfig:
    """Settings of a PixelCNN prior (saved as ``config.json`` beside the weights).

    Attributes:
        gated: gated PixelCNN (no blind spot) if True, else the plain masked-conv stack.
        filters: channels of the code embedding and of every layer.
        num_layers: gated layers (including the first) or plain residual blocks.
        kernel_size: kernel of the layers after the first (odd, >= 3).
        first_kernel_size: kernel of the first (mask-A / shifted) layer (odd, >= 3).
        num_conditions: 0 = unconditioned; else number of condition classes (0..num_conditions-1).
        grid_shape: ``(h, w)`` of the code grids it is trained on (samplers default to it).
        dropout: dropout rate inside the layers (training only).
    """

    gated: bool = True
    filters: int = 48
    num_layers: int = 6
    kernel_size: int = 3
    first_kernel_size: int = 5
    num_conditions: int = 0
    grid_shape: tuple | None = None
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("kernel_size", "first_kernel_size"):
            k = getattr(self, name)
            if int(k) != k or k < 3 or k % 2 == 0:
                raise ValueError(f"PriorConfig.{name} must be an odd int >= 3, got {k!r}")
        if self.filters < 2 or self.num_layers < 1 or self.num_conditions < 0:
            raise ValueError("PriorConfig needs filters >= 2, num_layers >= 1, num_conditions >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"PriorConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.grid_shape is not None:
            self.grid_shape = tuple(int(s) for s in self.grid_shape)
            if len(self.grid_shape) != 2 or min(self.grid_shape) < 1:
                raise ValueError(f"PriorConfig.grid_shape must be (h, w), got {self.grid_shape!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["grid_shape"] = list(self.grid_shape) if self.grid_shape is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PriorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown PriorConfig keys: {unknown}")
        return cls(**d)


_KERAS_MODEL_KWARGS = ("name", "trainable", "dtype")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PixelCNN(keras.Model):
    """Autoregressive prior over VQ-VAE code grids.

    Args:
        num_embeddings: codebook size K (codes are ints in ``[0, K)``).
        config: a ``PriorConfig``, its dict, or None (defaults).
        **overrides: PriorConfig fields overriding ``config`` (and Keras' name/trainable/dtype).

    Call: ``codes`` int ``(B, h, w)``; or ``(codes, condition)`` with ``condition`` int ``(B,)`` when
    ``config.num_conditions > 0``. Returns logits ``(B, h, w, K)`` float32 whose value at ``(i, j)``
    depends only on codes before ``(i, j)`` in raster order (and on the condition). Train with
    ``compile(loss=SparseCategoricalCrossentropy(from_logits=True))``; ``fit(codes, codes)``.
    """

    def __init__(self, num_embeddings: int, config: PriorConfig | dict | None = None, **overrides):
        keras_kwargs = {k: overrides.pop(k) for k in _KERAS_MODEL_KWARGS if k in overrides}
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
        self.embedding = layers.Embedding(self.num_embeddings, c.filters, name="code_embedding")
        if c.gated:
            self.input_block = GatedPixelCNNBlock(c.filters, c.first_kernel_size, first=True,
                                                  num_conditions=c.num_conditions,
                                                  dropout=c.dropout, name="gated_0")
            self.blocks = [GatedPixelCNNBlock(c.filters, c.kernel_size, num_conditions=c.num_conditions,
                                              dropout=c.dropout, name=f"gated_{i}")
                           for i in range(1, c.num_layers)]
        else:
            self.input_conv = MaskedConv2D(c.filters, c.first_kernel_size, "A", name="input_conv")
            if c.num_conditions:
                self.input_cond = layers.Embedding(c.num_conditions, c.filters, name="input_cond")
            self.blocks = [MaskedResidualBlock(c.filters, c.kernel_size, c.num_conditions,
                                               c.dropout, name=f"residual_{i}")
                           for i in range(c.num_layers)]
        self.head_hidden = layers.Conv2D(c.filters, 1, name="head_hidden")
        self.head_out = layers.Conv2D(self.num_embeddings, 1, dtype="float32", name="logits")

    def build(self, input_shape=None):
        f = self.config.filters
        self.embedding.build((None, None, None))
        if self.config.gated:
            self.input_block.build()
        else:
            self.input_conv.build((None, None, None, f))
            if self.config.num_conditions:
                self.input_cond.build((None,))
        for block in self.blocks:
            block.build()
        self.head_hidden.build((None, None, None, f))
        self.head_out.build((None, None, None, f))

    def _split_inputs(self, inputs):
        conditioned = self.config.num_conditions > 0
        if isinstance(inputs, (list, tuple)):
            if len(inputs) != 2 or not conditioned:
                raise ValueError("PixelCNN takes codes (B, h, w), or (codes, condition) for a "
                                 f"conditioned prior; got a {len(inputs)}-tuple with "
                                 f"num_conditions={self.config.num_conditions}")
            codes, cond = inputs
        else:
            if conditioned:
                raise ValueError("This PixelCNN is conditioned (num_conditions="
                                 f"{self.config.num_conditions}): call it with (codes, condition)")
            codes, cond = inputs, None
        codes = ops.cast(codes, "int32")
        if cond is not None:
            cond = ops.reshape(ops.cast(cond, "int32"), (-1,))
        return codes, cond

    def call(self, inputs, training=None):
        codes, cond = self._split_inputs(inputs)
        extra = [cond] if cond is not None else []
        x = self.embedding(codes)  # (B, h, w, F)
        if self.config.gated:
            v, h = self.input_block([x, x] + extra, training=training)
            for block in self.blocks:
                v, h = block([v, h] + extra, training=training)
            out = h
        else:
            out = self.input_conv(x)
            if cond is not None:
                out = out + self.input_cond(cond)[:, None, None, :]
            out = ops.relu(out)
            for block in self.blocks:
                out = block([out] + extra, training=training)
        hidden = ops.relu(self.head_hidden(ops.relu(out)))
        return self.head_out(hidden)  # (B, h, w, K) float32 logits

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable,
                "num_embeddings": self.num_embeddings, "config": self.config.to_dict()}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config.pop("dtype", None)
        return cls(**config)
