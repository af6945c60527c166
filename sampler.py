"""Sampling code grids from a PixelCNN prior: ``sample_codes``.

Codes are drawn position by position in raster order from ``softmax(logits / temperature)`` by the
Gumbel-max trick: ``code = argmax(logits / T + g)`` with Gumbel noise ``g`` drawn up front from a
NumPy ``Generator`` seeded by ``(seed, sample_index)``. Both methods use the same noise, so they
return the same codes, and chunking (``batch_size``) does not change any sample. ``top_k`` /
``top_p`` set the scores outside the kept codes to ``-inf`` before the same Gumbel-max draw;
classifier-free ``guidance`` mixes the logits of the conditioned and the "no condition" prior;
``previous`` passes a prior with ``previous_slice`` the previous slices' codes, and ``top`` a two-level
prior the top level's codes (the prior's own business how they enter: the sampler hands these *given
grids* to the full-grid call and to ``init_cache``, row for row with the samples).

* ``method="naive"``: the reference (keras.io): one full-grid forward pass of the model per position.
* ``method="fast"``: the prior's ``init_cache`` / ``call_with_cache``: one raster position per call,
  every layer updating its own cache through its own ``step`` (masked convs keep their inputs,
  the gated vertical stack one row at a time, attention a key/value cache; Ramachandran et al.
  2017, "Fast Generation for Convolutional Autoregressive Models"). This module knows nothing of
  the layers: the whole grid runs in one XLA-compiled ``tf.while_loop`` around ``call_with_cache``.

Exactness: the fast path's logits differ from a full-grid pass by float rounding (~1e-6). Where a
draw is within a tolerance ``tol * (1 + max|logits|) / T`` of changing (the top-two Gumbel scores,
or the top-k / top-p cut; about once in 10^4 positions), the fast loop stops and that one position
is decided exactly as the naive sampler decides it, by a full-grid model call on the same partial
grid, for the tied samples only (every other sample keeps the code the loop drew), then the loop
resumes. So the two methods agree unless rounding exceeds ``tol`` (1e-4 relative), not merely
"usually", and exactness costs in proportion to the number of ties, i.e. to the number of samples
(a full pass over the whole batch at each tie would cost in proportion to its square). To keep that
true everywhere, sampling always runs in float32 (a prior trained under a ``mixed_float16`` policy
is sampled through a float32 copy of its weights), and TensorFloat-32 matmuls (on by default on
Ampere and later NVIDIA GPUs, ~1e-3 relative error) are switched off for the duration of
``sample_codes`` and the user's setting restored after.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

__all__ = ["sample_codes", "gumbel_noise", "DEFAULT_TEMPERATURE"]

_TIE_TOL = 1e-4
# Samples per chunk when batch_size is None: bounds the memory of the caches and of the noise on large
# requests (the caches hold every layer's inputs for the whole grid); chunking never changes a sample.
DEFAULT_BATCH_SIZE = 256
# The temperature that predict.py and train.py's samples figure draw at unless told otherwise.
# ``sample_codes`` itself defaults to 1 (the prior's own distribution). Chosen by
# bench/bench_sampling_defaults.py on the demo run (docs/prior-designs.md): 0.8 cuts the stray codes that
# break white matter into pieces (white pieces per slice 8.4 -> 6.6, real 4.8; tissue-area difference
# 0.145 -> 0.113, real 0.100) while the samples stay as varied as real slices (MS-SSIM between samples
# 0.578, real 0.565); 0.7 closes more of those gaps but makes samples alike (0.603).
DEFAULT_TEMPERATURE = 0.8
_FAST_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_FLOAT32_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# Diagnostics of the last sample_codes call (tests, benchmarks): the positions at which the fast loop
# stopped for a near-tie, and the rows (samples) that the exact full-grid passes received in all.
last_exact_fallbacks = 0
last_exact_rows = 0


# --------------------------------------------------------------------------- arguments and noise
def _resolve_args(prior, num_samples, grid_shape, temperature, condition, method, batch_size,
                  guidance, top_k, top_p, codes, keep, previous=None, top=None):
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if method not in ("fast", "naive"):
        raise ValueError(f"method must be 'fast' or 'naive', got {method!r}")
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    cfg = prior.config
    if grid_shape is None:
        grid_shape = cfg.grid_shape
        if grid_shape is None:
            raise ValueError("grid_shape is None and the prior's config has no grid_shape; pass one")
    grid_shape = tuple(int(s) for s in grid_shape)
    if len(grid_shape) != 2 or min(grid_shape) < 1:
        raise ValueError(f"grid_shape must be (h, w) with h, w >= 1, got {grid_shape!r}")
    if cfg.positional and grid_shape != tuple(cfg.grid_shape):
        raise ValueError(f"this prior learned positions of a {tuple(cfg.grid_shape)} grid (positional=True); "
                         f"it cannot sample a {grid_shape} grid")
    n = int(num_samples)
    if cfg.num_conditions == 0:
        if condition is not None:
            raise ValueError("condition given but the prior is unconditioned (num_conditions=0)")
        if guidance is not None:
            raise ValueError("guidance needs a conditioned prior (num_conditions > 0)")
        cond = None
    elif condition is None:
        if guidance is not None:
            raise ValueError("guidance needs condition= (it mixes the conditioned and unconditioned logits)")
        if not prior.has_null_condition:
            raise ValueError(f"the prior is conditioned (num_conditions={cfg.num_conditions}) and has no "
                             "'no condition' slot (trained with condition_dropout=0): pass condition= an "
                             "int or a sequence of num_samples ints")
        cond = np.full((n,), prior.null_condition, "int32")
    else:
        cond = np.asarray(condition)
        if cond.ndim == 0:
            cond = np.full((n,), int(cond))
        if cond.shape != (n,) or not np.issubdtype(cond.dtype, np.integer):
            raise ValueError(f"condition must be an int or {n} ints, got shape {cond.shape} "
                             f"dtype {cond.dtype}")
        if cond.min() < 0 or cond.max() >= cfg.num_conditions:
            raise ValueError(f"condition values must lie in [0, {cfg.num_conditions}), "
                             f"got [{cond.min()}, {cond.max()}]")
        cond = cond.astype("int32")
        if guidance is not None:
            if not prior.has_null_condition:
                prior.null_condition  # raises: no unconditional slot to guide against
            guidance = float(guidance)
    if keep is None:
        keep, codes = np.zeros((n, *grid_shape), bool), np.zeros((n, *grid_shape), "int32")
    else:
        keep = np.asarray(keep)
        if keep.shape != (n, *grid_shape) or keep.dtype != bool:
            raise ValueError(f"keep must be a bool array {(n, *grid_shape)} (samples, grid), "
                             f"got {keep.dtype} {keep.shape}")
        if codes is None:
            raise ValueError("keep given without codes: pass codes= the (N, h, w) ints to keep")
        codes = np.asarray(codes)
        if codes.shape != keep.shape or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be an int array {keep.shape} like keep, got {codes.dtype} {codes.shape}")
        kept = codes[keep]
        if kept.size and (kept.min() < 0 or kept.max() >= prior.num_embeddings):
            raise ValueError(f"kept codes must lie in [0, {prior.num_embeddings}), got [{kept.min()}, {kept.max()}]")
        codes = np.where(keep, codes, 0).astype("int32")
    if previous is not None:
        if not getattr(cfg, "previous_slice", False):
            raise ValueError("previous= given but the prior is not conditioned on the previous slice "
                             "(previous_slice=False); drop previous=, or train a prior with previous_slice")
        previous = _given_grid("previous", previous, (n, *grid_shape), prior.num_embeddings,
                               "the previous slices' codes", f" ({prior.num_embeddings}: no previous slice)")
    top_codes = getattr(cfg, "top_codes", 0)
    if top_codes and top is None:
        raise ValueError("this prior is the fine level of a two-level model (top_codes > 0): pass top= the top "
                         f"level's (N, {cfg.top_grid_shape[0]}, {cfg.top_grid_shape[1]}) codes, drawn first by "
                         "the top level's prior")
    if top is not None:
        if not top_codes:
            raise ValueError("top= given but the prior has one level (top_codes=0); drop top=")
        top = _given_grid("top", top, (n, *cfg.top_grid_shape), top_codes - 1, "the top level's codes")
    given = {name: a for name, a in (("previous", previous), ("top", top)) if a is not None}
    options = {"top_k": None if top_k is None or top_k >= prior.num_embeddings else int(top_k),
               "top_p": None if top_p is None or top_p >= 1.0 else float(top_p),
               "guided": guidance is not None}
    chunk = min(n, DEFAULT_BATCH_SIZE if batch_size is None else int(batch_size))
    return n, grid_shape, float(temperature), cond, chunk, guidance, options, codes, keep, given


def _given_grid(name: str, a, shape, highest: int, what: str, note: str = "") -> np.ndarray:
    """``a`` as int32 after checking it is an int array of ``shape`` with values in ``[0, highest]``."""
    a = np.asarray(a)
    if a.shape != shape or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be an int array {shape} ({what}), got {a.dtype} {a.shape}")
    if a.min() < 0 or a.max() > highest:
        raise ValueError(f"{name} codes must lie in [0, {highest}]{note}, got [{a.min()}, {a.max()}]")
    return a.astype("int32")


def gumbel_noise(seed: int, sample_indices: Sequence[int], grid_shape, num_embeddings: int):
    """Gumbel(0, 1) noise ``(len(sample_indices), h, w, K)`` float32.

    Sample ``n`` always gets the noise of ``numpy.random.default_rng([seed, n])``, so a sample does
    not depend on how the samples are chunked, nor on the sampling method.
    """
    h, w = grid_shape
    return np.stack([np.random.default_rng([seed, int(n)]).gumbel(size=(h, w, num_embeddings))
                     .astype("float32") for n in sample_indices])


def _draw(logits, noise, temperature, top_k=None, top_p=None):
    """One Gumbel-max draw per row, after the top-k / top-p filters.

    Args: logits, noise ``(B, K)`` float32; temperature a float scalar; ``top_k``: keep the k
        largest logits; ``top_p``: then keep the fewest most likely codes whose probability (at
        this temperature) sums to >= p (nucleus sampling, Holtzman et al. 2020).
    Returns: ``(codes (B,) int32, ambiguous (B,) bool)``: ``ambiguous`` marks rows where a change
        of the logits by the rounding tolerance could change the draw (near-equal top-two scores,
        or a filter cut that is nearly a tie); the fast sampler decides those exactly.
    """
    z = logits / temperature
    k_all = logits.shape[-1]
    thr = _TIE_TOL * (1.0 + tf.reduce_max(tf.abs(logits), -1)) / temperature  # (B,)
    ambiguous = tf.zeros(tf.shape(logits)[:1], tf.bool)
    neg_inf = tf.constant(-np.inf, z.dtype)
    if top_k is not None:
        top = tf.math.top_k(z, top_k + 1).values
        cut = top[:, top_k - 1]
        ambiguous |= top[:, top_k - 1] - top[:, top_k] <= thr
        z = tf.where(z >= cut[:, None], z, neg_inf)
    if top_p is not None:
        srt = tf.sort(z, axis=-1, direction="DESCENDING")
        before = tf.math.cumsum(tf.nn.softmax(srt, -1), axis=-1, exclusive=True)  # mass of the larger ones
        inside = before < top_p
        n_in = tf.reduce_sum(tf.cast(inside, tf.int32), -1)  # >= 1: the first code always stays
        cut = tf.gather(srt, n_in - 1, batch_dims=1)
        nxt = tf.gather(srt, tf.minimum(n_in, k_all - 1), batch_dims=1)
        nxt = tf.where(n_in < k_all, nxt, neg_inf)
        finite = srt > neg_inf
        ambiguous |= tf.reduce_any(finite & (tf.abs(before - top_p) <= _TIE_TOL), -1)
        ambiguous |= cut - nxt <= thr
        z = tf.where(z >= cut[:, None], z, neg_inf)
    scores = z + noise
    if k_all > 1:
        top2 = tf.math.top_k(scores, 2).values
        ambiguous |= top2[:, 0] - top2[:, 1] <= thr
    return tf.argmax(scores, -1, output_type=tf.int32), ambiguous


def _mix(logits, guidance):
    """Guided logits from a 2B batch (conditioned rows, then "no condition" rows): (2B, K) -> (B, K)."""
    cond, uncond = tf.split(logits, 2, axis=0)
    return uncond + guidance * (cond - uncond)


def _rows(given: dict, index) -> dict:
    """The given grids (``previous``, ``top``) of the rows ``index``."""
    return {name: a[index] for name, a in given.items()}


def _doubled(given: dict, guided: bool) -> dict:
    """The given grids for a guided batch: twice, as guidance mixes over the slice position only."""
    return {name: np.concatenate([a, a]) for name, a in given.items()} if guided else given


def _model_inputs(grid, cond, guided, null, given=None):
    """Batch for a full-grid call: the grid, the condition and the given grids (``previous``, then
    ``top``) when the prior takes them (all twice, with the null condition second, when guided)."""
    from pixelcnn import pack_inputs

    given = _doubled(given or {}, guided)
    if guided:
        grid, cond = np.concatenate([grid, grid]), np.concatenate([cond, np.full_like(cond, null)])
    return pack_inputs(grid, cond, **given)


def _exact_logits(prior, grid: np.ndarray, cond, i: int, j: int, guidance, given=None) -> tf.Tensor:
    """Logits ``(B, K)`` at ``(i, j)`` from one full-grid forward pass (the reference)."""
    guided = guidance is not None
    null = prior.config.num_conditions
    logits = tf.convert_to_tensor(prior(_model_inputs(grid, cond, guided, null, given), training=False))[:, i, j, :]
    return _mix(logits, guidance) if guided else logits


def _exact_draw(prior, grid, cond, i, j, noise_ij, temperature, guidance, options, codes, keep, given=None):
    """The code at ``(i, j)`` of every row of ``grid`` as the naive sampler decides it (kept codes stay).

    Rows are independent, so the fast sampler passes only its tied rows (and their ``cond``,
    ``noise_ij``, ``codes``, ``keep`` and given grids).
    """
    logits = _exact_logits(prior, grid, cond, i, j, guidance, given)
    drawn, _ = _draw(logits, tf.constant(noise_ij), tf.constant(temperature, tf.float32),
                     options["top_k"], options["top_p"])
    return np.where(keep[:, i, j], codes[:, i, j], drawn.numpy()).astype("int32")


# --------------------------------------------------------------------------- precision
def _float32_prior(prior):
    """``prior`` if it computes in float32, else a float32 copy holding its current weights.

    A prior built under a ``mixed_float16`` policy computes in float16; sampling it in float32 keeps
    fast, naive and the near-tie fallback exact and avoids float16/float32 mismatches.
    """
    if all(layer.dtype_policy.compute_dtype == "float32" for layer in prior._flatten_layers()):
        return prior
    copy = _FLOAT32_COPIES.get(prior)
    if copy is None:
        policy = keras.config.dtype_policy()
        keras.config.set_dtype_policy("float32")
        try:
            copy = prior.__class__.from_config(prior.get_config())
            copy.build()
        finally:
            keras.config.set_dtype_policy(policy)
        _FLOAT32_COPIES[prior] = copy
    copy.set_weights(prior.get_weights())
    return copy


@contextlib.contextmanager
def _no_tf32():
    """TensorFloat-32 off inside (its ~1e-3 matmul error would void the 1e-4 tie tolerance)."""
    enabled = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    try:
        yield
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(enabled)


# --------------------------------------------------------------------------- public entry point
def sample_codes(prior, num_samples: int, grid_shape=None, temperature: float = 1.0,
                 seed: int | None = None, condition=None, method: str = "fast",
                 batch_size: int | None = None, progress: bool = False, *,
                 guidance: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 codes=None, keep=None, previous=None, top=None) -> np.ndarray:
    """Draw code grids from a PixelCNN prior, position by position in raster order.

    Args:
        prior: a ``PixelCNN`` (plain or gated, with or without attention, conditioned or not).
        num_samples: number of grids N >= 1.
        grid_shape: ``(h, w)``; defaults to ``prior.config.grid_shape``. Any size works (a
            positional prior only takes its own).
        temperature: T > 0; codes are drawn from ``softmax(logits / T)`` (never argmax of logits).
        seed: int for reproducible codes (None: fresh entropy).
        condition: None for an unconditioned prior; for a conditioned one an int (all samples) or
            a sequence of N ints in ``[0, num_conditions)``, or None to sample unconditionally
            through the "no condition" slot (priors trained with ``condition_dropout > 0``).
        method: "fast" (cached incremental, XLA) or "naive" (one full forward pass per position).
            Both give the same codes for the same weights and seed.
        batch_size: samples per chunk (None: ``DEFAULT_BATCH_SIZE``, 256, which bounds memory);
            does not change the codes. A last, shorter chunk of the fast sampler is padded to the
            chunk's size (with kept rows that cost no exact pass), so one compiled loop serves all.
        progress: show a tqdm progress bar over samples (advances chunk by chunk).
        guidance: classifier-free guidance scale s (Ho & Salimans 2022): draw from
            ``uncond + s * (cond - uncond)`` logits (s = 1: the conditioned prior; needs
            ``condition`` and a prior with the "no condition" slot). Costs twice the batch.
        top_k: draw only among the k most likely codes at each position.
        top_p: draw only among the fewest most likely codes whose probability (at temperature T,
            after top_k) sums to >= top_p.
        codes, keep: int ``(N, h, w)`` and bool ``(N, h, w)``: where ``keep`` is True the sample
            takes the given code instead of a draw; every other position is drawn in raster
            order given all earlier codes, kept or drawn (completion, anomaly healing).
            ``keep=None``: nothing kept.
        previous: for a prior with ``previous_slice``: int ``(N, h, w)``, the codes of each sample's
            previous slice (a sample is drawn given them, as given its slice position); None: "no
            previous slice" (a subject's first slice, or a single slice). Guidance leaves it in
            both halves: it mixes over the slice position only.
        top: for the fine prior of a two-level model (``top_codes > 0``, required there): int
            ``(N, *top_grid_shape)``, each sample's top-level codes (drawn first by the top level's
            prior); the fine codes are drawn given them. Guidance leaves them in both halves.

    Returns:
        int32 array ``(N, h, w)`` with values in ``[0, num_embeddings)``.
    """
    n, (h, w), temperature, cond, chunk, guidance, options, codes, keep, given = _resolve_args(
        prior, num_samples, grid_shape, temperature, condition, method, batch_size,
        guidance, top_k, top_p, codes, keep, previous, top)
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2 ** 63))
    k = prior.num_embeddings
    out = np.zeros((n, h, w), dtype="int32")
    global last_exact_fallbacks, last_exact_rows
    last_exact_fallbacks = last_exact_rows = 0
    from tqdm import tqdm

    with _no_tf32():
        model = _float32_prior(prior)
        bar = tqdm(total=n, desc=f"sampling {h}x{w} codes ({method})", unit="sample", disable=not progress)
        for start in range(0, n, chunk):
            idx = np.arange(start, min(start + chunk, n))
            noise = gumbel_noise(seed, idx, (h, w), k)
            c = None if cond is None else cond[idx]
            g = _rows(given, idx)
            if method == "naive":
                out[idx] = _sample_naive(model, noise, temperature, c, guidance, options, codes[idx], keep[idx], g)
            else:
                out[idx] = _sample_fast(model, noise, temperature, c, guidance, options, codes[idx], keep[idx],
                                        pad_to=chunk, given=g)
            bar.update(len(idx))
        bar.close()
    return out


def sample_two_level(top_prior, prior, num_samples: int, seed: int | None = None, *, previous=None,
                     top_previous=None, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Draw two-level code grids: the top level's coarse codes first, then the fine codes given them.

    Args:
        top_prior: the top level's prior (its own grid, e.g. 16x16).
        prior: the fine prior (``top_codes > 0``), conditioned on the top codes of each sample.
        num_samples, seed: as in :func:`sample_codes`; each level draws with its own seed derived
            from ``seed``, so the same seed gives the same pairs.
        previous, top_previous: the previous slices' fine and top codes (subjects), or None.
        **kwargs: the rest of :func:`sample_codes`' arguments (temperature, condition, guidance,
            top_k, top_p, batch_size, progress, method), used by both levels.
    Returns:
        ``(codes (N, h, w), top (N, *top_grid_shape))``, int32.
    """
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2 ** 63))
    top_seed, fine_seed = (int(s) for s in np.random.SeedSequence([int(seed), 2]).generate_state(2))
    top = sample_codes(top_prior, num_samples, seed=top_seed, previous=top_previous, **kwargs)
    codes = sample_codes(prior, num_samples, seed=fine_seed, previous=previous, top=top, **kwargs)
    return codes, top


def _sample_naive(prior, noise, temperature, cond, guidance, options, codes, keep, given=None):
    b, h, w, _ = noise.shape
    grid = np.zeros((b, h, w), dtype="int32")
    for i in range(h):
        for j in range(w):
            grid[:, i, j] = _exact_draw(prior, grid, cond, i, j, noise[:, i, j], temperature, guidance,
                                        options, codes, keep, given)
    return grid


def _pad_rows(pad_to, noise, cond, codes, keep, given=None):
    """Pad a short last chunk to ``pad_to`` rows with fully kept rows (they never tie, cost no exact pass)."""
    given = given or {}
    extra = pad_to - len(noise)
    if extra <= 0:
        return noise, cond, codes, keep, given

    def pad(a, value):
        return np.concatenate([a, np.full((extra, *a.shape[1:]), value, a.dtype)])

    return (pad(noise, 0.0), (None if cond is None else pad(cond, cond[0])), pad(codes, 0), pad(keep, True),
            {name: pad(a, 0) for name, a in given.items()})


def _sample_fast(prior, noise, temperature, cond, guidance, options, codes, keep, pad_to=None, given=None):
    global last_exact_fallbacks, last_exact_rows
    n = len(noise)
    noise, cond, codes, keep, given = _pad_rows(pad_to or n, noise, cond, codes, keep, given)
    b, h, w, _ = noise.shape
    key = tuple(sorted(options.items()))
    fns = _FAST_FNS.setdefault(prior, {})
    if key not in fns:
        fns[key] = _build_fast_fn(prior, **options)
    run = fns[key]
    guided = options["guided"]
    rows = 2 * b if guided else b
    null = prior.config.num_conditions
    cond_t = None if cond is None else tf.constant(_model_inputs(codes, cond, guided, null)[1], tf.int32)
    # the prior turns the given grids (previous slices, top codes) into its condition map once, here
    cache_kw = {name: tf.constant(a, tf.int32) for name, a in _doubled(given, guided).items()}
    args = (tf.constant(noise), tf.constant(temperature, tf.float32),
            tf.constant(1.0 if guidance is None else guidance, tf.float32),
            tf.constant(keep), tf.constant(codes))
    state = (tf.zeros((b, h, w), tf.int32), tf.zeros((rows,), tf.int32), prior.init_cache(rows, (h, w), **cache_kw))
    pos = 0
    while pos < h * w:
        pos_t, tied, state = run(*args, cond_t, tf.constant(pos, tf.int32), state)
        pos = int(pos_t)
        if pos < h * w:  # near-tie: decide this position of the tied samples as the naive sampler does
            i, j = divmod(pos, w)
            grid = state[0].numpy()  # codes before pos; at pos the loop's draws, 0 for the tied rows
            r = np.flatnonzero(tied.numpy())
            grid[r, i, j] = _exact_draw(prior, grid[r], None if cond is None else cond[r], i, j, noise[r, i, j],
                                        temperature, guidance, options, codes[r], keep[r], _rows(given, r))
            code = grid[:, i, j]
            prev = np.concatenate([code, code]) if guided else code
            state = (tf.constant(grid), tf.constant(prev), state[2])
            pos += 1
            last_exact_fallbacks += 1
            last_exact_rows += len(r)
    return state[0].numpy()[:n]


def _build_fast_fn(prior, top_k, top_p, guided):
    """One XLA-compiled loop over raster positions from ``pos0`` until the end or a near-tie.

    ``state = (codes (B, h, w) int32, previous code (rows,) int32, the prior's cache)`` with
    ``rows = 2B`` when guided (conditioned rows, then "no condition" rows, drawing the same code).
    Returns ``(stop position, tied (B,) bool, state)``: at a near-tie the caches already hold that
    position's step, the untied samples hold their code there and the tied ones 0 (what the naive
    grid holds there); the caller decides the tied ones and resumes after the position.
    """

    @tf.function(jit_compile=True)  # traced once per (batch, h, w)
    def run(noise, temperature, guidance, keep, given, cond, pos0, state):
        b, h, w, _ = noise.shape

        def body(pos, stop, tied, codes, prev, cache):
            i, j = pos // w, pos % w
            logits, cache = prior.call_with_cache(prev, i, j, cache, cond)
            if guided:
                logits = _mix(logits, guidance)
            code, ambiguous = _draw(logits, noise[:, i, j], temperature, top_k, top_p)
            kept = keep[:, i, j]
            code = tf.where(kept, given[:, i, j], code)
            tied = ambiguous & ~kept
            tie = tf.reduce_any(tied)
            code = tf.where(tied, tf.zeros_like(code), code)
            codes = tf.tensor_scatter_nd_update(
                codes, tf.stack([tf.range(b), tf.fill([b], i), tf.fill([b], j)], -1), code)
            prev = tf.concat([code, code], 0) if guided else code
            return tf.where(tie, pos, pos + 1), tie, tied, codes, prev, cache

        pos, _, tied, codes, prev, cache = tf.while_loop(
            lambda pos, stop, *_: tf.logical_and(pos < h * w, tf.logical_not(stop)), body,
            (pos0, tf.constant(False), tf.zeros([b], tf.bool), *state))
        return pos, tied, (codes, prev, cache)

    return run
