"""PixelCNN priors over VQ-VAE code grids (Keras 3). Nothing runs on import.

* :class:`PriorConfig` / :class:`PixelCNN` -- the prior, assembled from the layers of :mod:`prior_layers`
  (masked and gated convolutions, causal attention, the condition maps of code grids known in full);
  sampling lives in ``sampler.sample_codes``.

Users import these from :mod:`modules`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import keras
from keras import layers, ops

from keras_common import _LAYER_KWARGS, _PACKAGE, _config_from_dict
from prior_layers import (CausalAttentionBlock, CodeGridMap, GatedPixelCNNBlock, MaskedConv2D, MaskedResidualBlock,
                          PreviousSliceMap, _check_grid, _pointwise)


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
    top_codes: int = field(default=0, metadata={
        "help": "two levels: the codebook size of a top level (a coarser VQ-VAE of the same slices with its "
                "own prior) whose code grid of the slice, drawn first, conditions this prior through the "
                "condition map (VQ-VAE-2, Razavi et al. 2019); 0: one level (train.py sets it from --top-run)"})
    top_grid_shape: tuple | None = field(default=None, metadata={
        "help": "(h, w) of the top level's code grid; grid_shape must be a whole multiple of it (train.py "
                "sets it from --top-run)"})

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
        if self.top_codes < 0:
            raise ValueError(f"PriorConfig.top_codes must be >= 0 (0: one level), got {self.top_codes!r}")
        if self.top_codes:
            if not self.condition_map:
                raise ValueError("PriorConfig.top_codes needs condition_map > 0 (the top level's codes enter as a "
                                 "spatial map added to the slice's condition map)")
            if self.top_grid_shape is None:
                raise ValueError("PriorConfig.top_codes needs top_grid_shape (the top level's code grid)")
            self.top_grid_shape = tuple(int(s) for s in self.top_grid_shape)
            factors = {g // t for g, t in zip(self.grid_shape, self.top_grid_shape)}
            if (len(self.top_grid_shape) != 2 or min(self.top_grid_shape) < 1 or len(factors) != 1
                    or any(g % t for g, t in zip(self.grid_shape, self.top_grid_shape))):
                raise ValueError(f"PriorConfig.top_grid_shape {self.top_grid_shape!r} must divide grid_shape "
                                 f"{self.grid_shape!r} by one whole factor along both axes")
        elif self.top_grid_shape is not None:
            raise ValueError("PriorConfig.top_grid_shape needs top_codes > 0")

    @property
    def top_upsample(self) -> int:
        """How many codes of this prior's grid one top-level code covers along each axis (0: one level)."""
        return self.grid_shape[0] // self.top_grid_shape[0] if self.top_codes else 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("grid_shape", "top_grid_shape"):
            d[key] = list(d[key]) if d[key] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "PriorConfig":
        return _config_from_dict(cls, d)


def pack_inputs(codes, condition=None, previous=None, top=None):
    """A prior's call input from its parts: ``codes`` alone, or the tuple of the parts given, in the order
    :class:`PixelCNN` reads them (codes, condition, previous slice's codes, top level's codes).

    The one place that knows the order; works on arrays and on tensors (inside ``tf.data`` too).
    """
    parts = [codes] + [p for p in (condition, previous, top) if p is not None]
    return parts[0] if len(parts) == 1 else tuple(parts)


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

    Two levels (VQ-VAE-2, Razavi et al. 2019): with ``top_codes`` the prior is the fine level of a
    two-level model and takes the top level's code grid of the same slice (a coarser VQ-VAE's codes,
    drawn first by that level's own prior) as its last input, always: a :class:`CodeGridMap` repeats
    it onto this grid and adds it to the condition map, so the fine codes are drawn given the layout
    the top level chose. Tuple inputs are then ``(codes, condition, top)`` or ``(codes, condition,
    previous, top)`` (without ``condition`` when unconditioned).

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
        if c.top_codes:
            self.top_map = CodeGridMap(c.top_codes, c.condition_map, c.filters, upsample=c.top_upsample,
                                       name="top_map")
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
        if self.config.top_codes:
            self.top_map.build()
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

    def input_forms(self) -> str:
        """The input forms this prior accepts, as an error message names them."""
        c = self.config
        head = "codes" + (", condition" if c.num_conditions else "")
        tail = ", top" if c.top_codes else ""
        forms = [f"({head}{tail})" if head != "codes" or tail else "codes"]
        if c.previous_slice:
            forms.append(f"({head}, previous{tail})")
        return " or ".join(forms)

    def _split_inputs(self, inputs):
        """``(codes, cond, previous, top)`` from the accepted input forms (see the class docstring).

        A tuple holds, in order (:func:`pack_inputs` builds it): the codes, the condition (a
        conditioned prior), the previous slice's codes (optional, a prior with ``previous_slice``)
        and the top level's codes (a two-level prior: always).
        """
        c = self.config
        parts = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        required = 1 + (c.num_conditions > 0) + (c.top_codes > 0)
        if not required <= len(parts) <= required + bool(c.previous_slice):
            got = f"a {len(parts)}-tuple" if isinstance(inputs, (list, tuple)) else "codes alone"
            raise ValueError(f"this PixelCNN (num_conditions={c.num_conditions}, previous_slice={c.previous_slice}, "
                             f"top_codes={c.top_codes}) takes {self.input_forms()}; got {got}")
        codes = ops.cast(parts.pop(0), "int32")
        cond = ops.reshape(ops.cast(parts.pop(0), "int32"), (-1,)) if c.num_conditions else None
        top = ops.cast(parts.pop(), "int32") if c.top_codes else None
        previous = ops.cast(parts.pop(), "int32") if parts else None
        return codes, cond, previous, top

    def _top_map(self, top):
        """The top level's map ``(B, h, w, M)`` of a two-level prior, checked against ``top_grid_shape``."""
        if tuple(top.shape[1:]) != self.config.top_grid_shape:
            raise ValueError(f"top codes must be (B, *{self.config.top_grid_shape}) grids, got {tuple(top.shape)}")
        return self.top_map(top)

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
        codes, cond, previous, top = self._split_inputs(inputs)
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
            if top is not None:
                cmap = cmap + self._top_map(top)
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
    def init_cache(self, batch_size: int, grid_shape, previous=None, top=None):
        """Zero caches of every layer for sampling ``batch_size`` grids of ``grid_shape``.

        A nested structure of tensors (what ``tf.while_loop`` carries); only ``call_with_cache``
        reads it. ``previous``: int ``(B, h, w)``, the previous slices' codes, for a prior with
        ``previous_slice`` (None: "no previous slice"); ``top``: int ``(B, *top_grid_shape)``, the
        top level's codes, for a two-level prior (required). Their maps are computed here, once per
        grid, and read row by row.
        """
        grid_shape = tuple(int(s) for s in grid_shape)
        first = self.input_block if self.config.gated else self.input_conv
        cache = {"input": first.init_cache(batch_size, grid_shape),
                 "blocks": [b.init_cache(batch_size, grid_shape) for b in self.blocks],
                 "attention": [a.init_cache(batch_size, grid_shape) for a in self.attention_blocks]}
        code_map = None  # the maps of the grids known in full, summed: read row by row
        if self.config.previous_slice:
            code_map = self._previous_map(previous, batch_size, grid_shape)
        elif previous is not None:
            raise ValueError("init_cache: previous given but this prior is not conditioned on the previous slice")
        if self.config.top_codes:
            if top is None:
                raise ValueError("init_cache: this prior has two levels (top_codes > 0): pass top= the top codes")
            top_map = self._top_map(ops.cast(top, "int32"))
            code_map = top_map if code_map is None else code_map + top_map
        elif top is not None:
            raise ValueError("init_cache: top given but this prior has one level (top_codes=0)")
        if code_map is not None:
            cache["code_map"] = ops.cast(code_map, self.compute_dtype)
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
            if "code_map" in cache:
                map_row = map_row + ops.take(cache["code_map"], i, axis=1)

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
        if "code_map" in cache:
            new_cache["code_map"] = cache["code_map"]
        return logits, new_cache

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable,
                "num_embeddings": self.num_embeddings, "config": self.config.to_dict()}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config.pop("dtype", None)
        return cls(**config)
