"""The PixelCNN priors' layers (Keras 3): masked and gated convolutions, causal attention, and the maps
of code grids known in full. Nothing runs on import.

* :func:`causal_mask`, :class:`MaskedConv2D`, :class:`GatedPixelCNNBlock`, :class:`MaskedResidualBlock`,
  :class:`CausalAttentionBlock` (with :func:`grid_position_encoding`) -- each sampled layer has an
  ``init_cache`` / ``step`` pair for incremental generation;
* :class:`CodeGridMap`, :class:`PreviousSliceMap` -- condition maps from the previous slice's or the top
  level's code grid.

:mod:`pixelcnn` assembles them into :class:`pixelcnn.PixelCNN`; users import all of them from :mod:`modules`.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import layers, ops

from keras_common import _PACKAGE


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
class CodeGridMap(layers.Layer):
    """Spatial condition map from a code grid known in full: ``(B, h, w)`` int -> ``(B, h*u, w*u, M)``.

    A grid known before the current one is drawn (the previous slice's codes, or the top level's
    coarse codes of this slice) enters as a condition, not through the raster order, and needs no
    mask: an embedding of its codes (one more row, index ``num_embeddings``, is the learned "no grid"),
    repeated ``upsample`` times along rows and columns (a coarse grid onto the prior's finer one),
    ``num_convs`` ordinary 3x3 convs with ReLU (each widens the view by one code each way) and a 1x1
    conv to ``channels`` = M. ``PixelCNN`` adds the map to the slice's condition map, so every gated
    layer sees it through its own 1x1 map convs (location-dependent conditioning, van den Oord et al.
    2016), in ``call`` over the grid and, row by row, in ``step``: the sampler computes it once per grid.
    """

    def __init__(self, num_embeddings, channels, filters=32, num_convs=2, upsample=1, **kwargs):
        super().__init__(**kwargs)
        self.num_embeddings, self.channels = int(num_embeddings), int(channels)
        self.filters, self.num_convs, self.upsample = int(filters), int(num_convs), int(upsample)
        if self.upsample < 1:
            raise ValueError(f"CodeGridMap.upsample must be an int >= 1, got {upsample!r}")
        self.embedding = layers.Embedding(self.num_embeddings + 1, self.filters, name="embedding")
        self.convs = [layers.Conv2D(self.filters, 3, padding="same", activation="relu", name=f"conv_{n}")
                      for n in range(self.num_convs)]
        self.out = layers.Conv2D(self.channels, 1, name="out")

    @property
    def none_code(self) -> int:
        """The code value that means "no grid" (``num_embeddings``)."""
        return self.num_embeddings

    def build(self, input_shape=None):
        self.embedding.build((None, None, None))
        for conv in self.convs:
            conv.build((None, None, None, self.filters))
        self.out.build((None, None, None, self.filters))

    def call(self, grid):
        x = self.embedding(ops.cast(grid, "int32"))  # (B, h, w, filters)
        if self.upsample > 1:
            x = ops.repeat(ops.repeat(x, self.upsample, axis=1), self.upsample, axis=2)
        for conv in self.convs:
            x = conv(x)
        return self.out(x)  # (B, h*u, w*u, M)

    def compute_output_shape(self, input_shape):
        b, h, w = tuple(input_shape)
        return (b, None if h is None else h * self.upsample, None if w is None else w * self.upsample,
                self.channels)

    def get_config(self):
        config = super().get_config()
        config.update(num_embeddings=self.num_embeddings, channels=self.channels, filters=self.filters,
                      num_convs=self.num_convs)
        if self.upsample != 1:
            config["upsample"] = self.upsample
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PreviousSliceMap(CodeGridMap):
    """The previous slice's code grid as a condition map (a :class:`CodeGridMap` on the prior's own grid).

    The slice before is known in full before the current one is drawn, so it enters as a condition;
    ``no_previous`` (= ``num_embeddings``) is the learned "no previous slice".
    """

    @property
    def no_previous(self) -> int:
        """The code value that means "no previous slice" (``num_embeddings``)."""
        return self.none_code
