"""Sampling code grids from a PixelCNN prior: ``sample_codes``.

Codes are drawn position by position in raster order from ``softmax(logits / temperature)`` by the
Gumbel-max trick: ``code = argmax(logits / T + g)`` with Gumbel noise ``g`` drawn up front from a
NumPy ``Generator`` seeded by ``(seed, sample_index)``. Both methods use the same noise, so they
return the same codes, and chunking (``batch_size``) does not change any sample.

* ``method="naive"``: the reference (keras.io): one full-grid forward pass of the model per position.
* ``method="fast"``: caches, for every layer, the activations of the positions already generated and
  computes only what the new position needs (Ramachandran et al. 2017, "Fast Generation for
  Convolutional Autoregressive Models"): per position, each masked / horizontal conv reads a small
  window of its cached input; the gated prior's vertical stack is computed one whole row at a time
  (it only sees rows above). The whole grid runs in one XLA-compiled ``tf.while_loop``.

Exactness: the fast path's logits differ from a full-grid pass by float rounding (~1e-6). Where the
top-two Gumbel scores of any sample are closer than a tolerance ``tol * (1 + max|logits|) / T``
(about once in 10^4 positions), the fast loop stops and that one position is decided exactly as the
naive sampler decides it (a full-grid model call on the same partial grid), then the loop resumes.
So the two methods agree unless rounding exceeds ``tol`` (1e-4 relative), not merely "usually".
"""

from __future__ import annotations

import weakref
from typing import Sequence

import numpy as np
import tensorflow as tf

try:  # in-place dynamic_update_slice inside the XLA loop (TensorFlow's public wrapper lacks it)
    from tensorflow.compiler.tf2xla.python import xla as _tfxla
except ImportError:  # pragma: no cover
    _tfxla = None

__all__ = ["sample_codes", "gumbel_noise"]

_TIE_TOL = 1e-4
_FAST_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# Positions the last fast call decided with a full-grid pass (near-ties); diagnostics for tests.
last_exact_fallbacks = 0


# --------------------------------------------------------------------------- arguments and noise
def _resolve_args(prior, num_samples, grid_shape, temperature, condition, method, batch_size):
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if method not in ("fast", "naive"):
        raise ValueError(f"method must be 'fast' or 'naive', got {method!r}")
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
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
        cond = None
    else:
        if condition is None:
            raise ValueError(f"the prior is conditioned (num_conditions={cfg.num_conditions}): "
                             "pass condition= an int or a sequence of num_samples ints")
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
    return n, grid_shape, float(temperature), cond, (n if batch_size is None else int(batch_size))


def gumbel_noise(seed: int, sample_indices: Sequence[int], grid_shape, num_embeddings: int):
    """Gumbel(0, 1) noise ``(len(sample_indices), h, w, K)`` float32.

    Sample ``n`` always gets the noise of ``numpy.random.default_rng([seed, n])``, so a sample does
    not depend on how the samples are chunked, nor on the sampling method.
    """
    h, w = grid_shape
    return np.stack([np.random.default_rng([seed, int(n)]).gumbel(size=(h, w, num_embeddings))
                     .astype("float32") for n in sample_indices])


def _select(logits: np.ndarray, noise: np.ndarray, temperature: float) -> np.ndarray:
    """Gumbel-max draw from softmax(logits / T): (B, K), (B, K) -> (B,) int32."""
    scores = logits.astype("float32") / np.float32(temperature) + noise
    return np.argmax(scores, axis=-1).astype("int32")


def _exact_logits(prior, grid: np.ndarray, cond, i: int, j: int) -> np.ndarray:
    """Logits ``(B, K)`` at ``(i, j)`` from one full-grid forward pass (the reference)."""
    inputs = grid if cond is None else (grid, cond)
    return np.asarray(prior(inputs, training=False))[:, i, j, :]


# --------------------------------------------------------------------------- public entry point
def sample_codes(prior, num_samples: int, grid_shape=None, temperature: float = 1.0,
                 seed: int | None = None, condition=None, method: str = "fast",
                 batch_size: int | None = None, progress: bool = False) -> np.ndarray:
    """Draw code grids from a PixelCNN prior, position by position in raster order.

    Args:
        prior: a ``PixelCNN`` (plain or gated, conditioned or not).
        num_samples: number of grids N >= 1.
        grid_shape: ``(h, w)``; defaults to ``prior.config.grid_shape``. Any size works.
        temperature: T > 0; codes are drawn from ``softmax(logits / T)`` (never argmax of logits).
        seed: int for reproducible codes (None: fresh entropy).
        condition: None for an unconditioned prior; for a conditioned one an int (all samples) or
            a sequence of N ints in ``[0, num_conditions)``.
        method: "fast" (cached incremental, XLA) or "naive" (one full forward pass per position).
            Both give the same codes for the same weights and seed.
        batch_size: samples per chunk (None: all at once); does not change the codes.
        progress: show a tqdm progress bar over samples (advances chunk by chunk).

    Returns:
        int32 array ``(N, h, w)`` with values in ``[0, num_embeddings)``.
    """
    n, (h, w), temperature, cond, chunk = _resolve_args(
        prior, num_samples, grid_shape, temperature, condition, method, batch_size)
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2 ** 63))
    k = prior.num_embeddings
    out = np.zeros((n, h, w), dtype="int32")
    global last_exact_fallbacks
    last_exact_fallbacks = 0
    from tqdm import tqdm

    bar = tqdm(total=n, desc=f"sampling {h}x{w} codes ({method})", unit="sample", disable=not progress)
    for start in range(0, n, chunk):
        idx = np.arange(start, min(start + chunk, n))
        noise = gumbel_noise(seed, idx, (h, w), k)
        c = None if cond is None else cond[idx]
        run = _sample_naive if method == "naive" else _sample_fast
        out[idx] = run(prior, noise, temperature, c)
        bar.update(len(idx))
    bar.close()
    return out


def _sample_naive(prior, noise, temperature, cond):
    b, h, w, _ = noise.shape
    grid = np.zeros((b, h, w), dtype="int32")
    for i in range(h):
        for j in range(w):
            logits = _exact_logits(prior, grid, cond, i, j)
            grid[:, i, j] = _select(logits, noise[:, i, j], temperature)
    return grid


def _sample_fast(prior, noise, temperature, cond):
    global last_exact_fallbacks
    b, h, w, k = noise.shape
    fns = _FAST_FNS.get(prior)
    if fns is None:
        fns = _FAST_FNS[prior] = _build_fast_fn(prior)
    init_state, fn = fns
    cond_t = tf.zeros((b,), tf.int32) if cond is None else tf.constant(cond, tf.int32)
    noise_t = tf.constant(noise)
    temp_t = tf.constant(temperature, tf.float32)
    state = init_state(b, h, w)
    pos, forced = 0, np.zeros((b,), "int32")
    use_forced = False
    while pos < h * w:
        pos_t, state = fn(noise_t, temp_t, cond_t, tf.constant(pos, tf.int32),
                          tf.constant(forced), tf.constant(use_forced), state)
        pos = int(pos_t)
        if pos < h * w:  # near-tie: decide this position exactly as the naive sampler does
            i, j = divmod(pos, w)
            grid = state[0].numpy()  # codes before pos, zeros from pos on: the naive grid
            forced = _select(_exact_logits(prior, grid, cond, i, j), noise[:, i, j], temperature)
            use_forced = True
            last_exact_fallbacks += 1
    return state[0].numpy()


# --------------------------------------------------------------------------- fast XLA loop
def _dyn_slice(x, starts, sizes):
    return tf.slice(x, tf.stack(starts), sizes)


def _dyn_update(x, update, starts):
    starts = tf.stack([tf.cast(s, tf.int32) for s in starts])
    if _tfxla is not None:
        return _tfxla.dynamic_update_slice(x, update, starts)
    idx = tf.reshape(tf.stack(tf.meshgrid(*[s + tf.range(d) for s, d in  # pragma: no cover
                                            zip(tf.unstack(starts), update.shape)],
                                          indexing="ij"), -1), (-1, len(update.shape)))
    return tf.tensor_scatter_nd_update(x, idx, tf.reshape(update, (-1,)))


def _gate(x):
    a, g = tf.split(x, 2, axis=-1)
    return tf.tanh(a) * tf.sigmoid(g)


def _dense(layer, x):
    """A 1x1 Conv2D applied to ``(B, C)`` vectors."""
    kern = tf.convert_to_tensor(layer.kernel)
    return tf.matmul(x, tf.reshape(kern, (kern.shape[-2], kern.shape[-1]))) + layer.bias


def _flat_kernel(kernel, rows=None):
    """``(kh, kw, C, O)`` (optionally only its first ``rows`` rows) -> ``(kh*kw*C, O)``."""
    kernel = tf.convert_to_tensor(kernel)
    if rows is not None:
        kernel = kernel[:rows]
    return tf.reshape(kernel, (-1, kernel.shape[-1]))


def _build_fast_fn(prior):
    """One XLA-compiled function: runs the raster loop from ``pos0`` until the end or a near-tie.

    ``state = (codes (B,h,w) int32, caches...)``; the caches hold, zero-padded, every layer input
    that a windowed conv reads. A near-tie position gets code 0 (what the naive grid holds there)
    and the loop returns its index; the caller decides it exactly and calls again with it forced.
    """
    cfg = prior.config
    gated = cfg.gated
    p1, p = cfg.first_kernel_size // 2, cfg.kernel_size // 2
    pad = p1 + 1  # covers every window and the first layer's one-position shift
    emb_layer = prior.embedding
    blocks = ([prior.input_block] + list(prior.blocks)) if gated else list(prior.blocks)
    conditioned = cfg.num_conditions > 0

    def head(x):
        return _dense(prior.head_out, tf.nn.relu(_dense(prior.head_hidden, tf.nn.relu(x))))

    def init_state(b, h, w):
        f = cfg.filters
        codes = tf.zeros((b, h, w), tf.int32)
        e_cache = tf.zeros((b, h + pad, w + 2 * pad, f))  # embedded codes, zero padded
        if gated:
            caches = [tf.zeros((b, h + pad, w + 2 * pad, f)) for _ in blocks[:-1]]  # v outputs
            caches += [tf.zeros((b, w + pad, f)) for _ in blocks[:-1]]  # h stack, current row
            caches += [tf.zeros((b, w, 2 * f)) for _ in blocks]  # v->h links, current row
        else:  # inputs of the masked convs
            caches = [tf.zeros((b, h + pad, w + 2 * pad, blk.in_proj.filters)) for blk in blocks]
        return (codes, e_cache, *caches)

    @tf.function(jit_compile=True)  # traced once per (batch, h, w)
    def run(noise, temperature, cond, pos0, forced, use_forced, state):
        b, h, w, k = noise.shape
        f = cfg.filters
        emb = tf.convert_to_tensor(emb_layer.embeddings)
        codes, e_cache, caches = state[0], state[1], list(state[2:])

        if gated:
            n_l = len(blocks)
            v_k = [_flat_kernel(blk.h_conv.kernel) for blk in blocks]
            cv = [blk.cond_v(cond) if conditioned and not blk.last else 0.0 for blk in blocks]
            ch = [blk.cond_h(cond) if conditioned else 0.0 for blk in blocks]
        else:
            first_k = _flat_kernel(prior.input_conv.masked_kernel(), p1 + 1)
            mask_k = [_flat_kernel(blk.masked_conv.masked_kernel(), p + 1) for blk in blocks]
            c_in = prior.input_cond(cond) if conditioned else 0.0
            c_blk = [blk.cond(cond) if conditioned else 0.0 for blk in blocks]

        def vertical_row(i, e_cache, caches):
            """Gated vertical stack for all of row i (sees rows < i only)."""
            v_caches = caches[:n_l - 1]
            new_v, new_links = [], []
            for l, blk in enumerate(blocks):
                q = p1 if l == 0 else p
                if l == 0:  # shifted input: embedded rows i-1-q .. i-1
                    win = _dyn_slice(e_cache, [0, pad + i - 1 - q, pad - q, 0], [b, q + 1, w + 2 * q, f])
                else:
                    win = _dyn_slice(new_v[l - 1], [0, pad + i - q, pad - q, 0],
                                     [b, q + 1, w + 2 * q, f])
                v_pre = tf.nn.conv2d(win, blk.v_conv.kernel, 1, "VALID") + blk.v_conv.bias
                v_pre = v_pre[:, 0]  # (B, w, 2F)
                new_links.append(tf.reshape(_dense(blk.v_to_h, tf.reshape(v_pre, (-1, 2 * f))),
                                            (b, w, 2 * f)))
                if l < n_l - 1:
                    cvl = cv[l][:, None, :] if conditioned else 0.0
                    if l == 0 and cfg.positional:
                        cvl = cvl + tf.gather(tf.convert_to_tensor(blk.pos_v), i)  # (w, 2F) of row i
                    v_out = _gate(v_pre + cvl)
                    new_v.append(_dyn_update(v_caches[l], v_out[:, None], [0, pad + i, pad, 0]))
            return new_v + caches[n_l - 1:2 * (n_l - 1)] + new_links

        def logits_at(i, j, e_cache, caches):
            if gated:
                h_rows, links = caches[n_l - 1:2 * (n_l - 1)], caches[2 * (n_l - 1):]
                x = None
                for l, blk in enumerate(blocks):
                    if l == 0:  # shifted: embedded columns j-1-p1 .. j-1 of row i
                        win = _dyn_slice(e_cache, [0, pad + i, pad + j - 1 - p1, 0], [b, 1, p1 + 1, f])
                    else:
                        win = _dyn_slice(h_rows[l - 1], [0, pad + j - p, 0], [b, p + 1, f])
                    link = _dyn_slice(links[l], [0, j, 0], [b, 1, 2 * f])[:, 0]
                    h_pre = (tf.matmul(tf.reshape(win, (b, -1)), v_k[l]) + blk.h_conv.bias + link
                             + ch[l])
                    if l == 0 and cfg.positional:
                        h_pre = h_pre + tf.gather_nd(tf.convert_to_tensor(blk.pos_h), [i, j])
                    h_new = _dense(blk.h_out, _gate(h_pre))
                    x = h_new if l == 0 else x + h_new
                    if l < n_l - 1:
                        h_rows[l] = _dyn_update(h_rows[l], x[:, None], [0, pad + j, 0])
                caches = caches[:n_l - 1] + h_rows + links
            else:
                win = _dyn_slice(e_cache, [0, pad + i - p1, pad + j - p1, 0], [b, p1 + 1, 2 * p1 + 1, f])
                x = tf.matmul(tf.reshape(win, (b, -1)), first_k) + prior.input_conv.bias + c_in
                if cfg.positional:
                    x = x + tf.gather_nd(tf.convert_to_tensor(prior.position_bias), [i, j])
                x = tf.nn.relu(x)
                caches = list(caches)
                for l, blk in enumerate(blocks):
                    y = tf.nn.relu(_dense(blk.in_proj, x))
                    caches[l] = _dyn_update(caches[l], y[:, None, None], [0, pad + i, pad + j, 0])
                    win = _dyn_slice(caches[l], [0, pad + i - p, pad + j - p, 0],
                                     [b, p + 1, 2 * p + 1, y.shape[-1]])
                    y = tf.matmul(tf.reshape(win, (b, -1)), mask_k[l]) + blk.masked_conv.bias
                    y = tf.nn.relu(y + c_blk[l])
                    x = x + _dense(blk.out_proj, y)
            return head(x), caches

        def step(i, j, first, codes, e_cache, caches):
            """Logits at (i, j), Gumbel-max draw (or forced / near-tie), caches updated."""
            logits, caches = logits_at(i, j, e_cache, caches)
            g = _dyn_slice(noise, [0, i, j, 0], [b, 1, 1, k])[:, 0, 0]
            scores = logits / temperature + g
            top2 = tf.math.top_k(scores, 2).values
            thr = _TIE_TOL * (1.0 + tf.reduce_max(tf.abs(logits), -1)) / temperature
            is_forced = tf.logical_and(first, use_forced)
            tie = tf.logical_and(tf.reduce_any(top2[:, 0] - top2[:, 1] <= thr),
                                 tf.logical_not(is_forced))
            code = tf.where(is_forced, forced, tf.argmax(scores, -1, output_type=tf.int32))
            code = tf.where(tie, tf.zeros_like(code), code)  # the naive grid holds 0 there
            codes = _dyn_update(codes, code[:, None, None], [0, i, j])
            e_cache = _dyn_update(e_cache, tf.gather(emb, code)[:, None, None],
                                  [0, pad + i, pad + j, 0])
            return tie, codes, e_cache, caches

        def row_body(i, j0, stop, first, codes, e_cache, *caches):
            caches = list(caches)
            if gated:  # the vertical stack of row i only needs rows < i (recomputing is harmless)
                caches = vertical_row(i, e_cache, caches)

            def col_body(j, stop, first, codes, e_cache, *caches):
                tie, codes, e_cache, caches = step(i, j, first, codes, e_cache, list(caches))
                return (tf.where(tie, j, j + 1), tie, tf.constant(False), codes, e_cache, *caches)

            out = tf.while_loop(lambda j, stop, *_: tf.logical_and(j < w, tf.logical_not(stop)),
                                col_body, (j0, stop, first, codes, e_cache, *caches))
            j, stop = out[0], out[1]
            return (tf.where(stop, i, i + 1), tf.where(stop, j, 0), stop, out[2], *out[3:])

        out = tf.while_loop(lambda i, j0, stop, *_: tf.logical_and(i < h, tf.logical_not(stop)),
                            row_body, (pos0 // w, pos0 % w, tf.constant(False), tf.constant(True),
                                       codes, e_cache, *caches))
        return out[0] * w + out[1], tuple(out[4:])

    return init_state, run
