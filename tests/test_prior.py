"""Specification of the PixelCNN priors (modules) and of sample_codes (sampler)."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import keras  # noqa: E402

import sampler  # noqa: E402
from modules import (CausalAttentionBlock, GatedPixelCNNBlock, MaskedConv2D, MaskedResidualBlock,  # noqa: E402
                     PixelCNN, PriorConfig)
from sampler import sample_codes  # noqa: E402

K = 12  # codebook size in the tests


def make_prior(gated=True, num_conditions=0, grid=(6, 6), seed=0, **kw):
    keras.utils.set_random_seed(seed)
    kw = {"filters": 8, "num_layers": 3, **kw}
    prior = PixelCNN(K, gated=gated, num_conditions=num_conditions, grid_shape=grid, **kw)
    prior(_inputs(np.zeros((1,) + grid, "int32"), num_conditions))
    return prior


def _inputs(codes, num_conditions, cond=None):
    if not num_conditions:
        return codes
    cond = np.zeros(len(codes), "int32") if cond is None else np.asarray(cond, "int32")
    return (codes, cond)


def _logits(prior, codes, cond=None):
    return np.asarray(prior(_inputs(codes, prior.config.num_conditions, cond), training=False))


def influence(prior, codes, cond=None):
    """dep[q, p] = True iff changing the code at raster position q changes the logits at p."""
    h, w = codes.shape[1:]
    base = _logits(prior, codes, cond)
    dep = np.zeros((h * w, h * w), bool)
    for q in range(h * w):
        changed = codes.copy()
        changed[:, q // w, q % w] = (changed[:, q // w, q % w] + 1 + q % (K - 1)) % K
        diff = np.abs(_logits(prior, changed, cond) - base).max(axis=(0, 3)).reshape(-1)
        dep[q] = diff > 0
    return dep


# ----------------------------------------------------------------------------------------- masks
def test_mask_a_and_b_3x3():
    a = MaskedConv2D(1, 3, "A").mask
    b = MaskedConv2D(1, 3, "B").mask
    np.testing.assert_array_equal(a, [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(b, [[1, 1, 1], [1, 1, 0], [0, 0, 0]])


def test_mask_5x5_and_applied_in_call():
    a = MaskedConv2D(1, 5, "A").mask
    expected = np.zeros((5, 5))
    expected[:2] = 1
    expected[2, :2] = 1
    np.testing.assert_array_equal(a, expected)
    b = expected.copy()
    b[2, 2] = 1
    np.testing.assert_array_equal(MaskedConv2D(1, 5, "B").mask, b)
    # kernel stays unmasked (trainable), the conv sees kernel * mask: a delta input at the centre
    # of a 5x5 image reaches only the mirrored visible taps.
    layer = MaskedConv2D(1, 5, "A", use_bias=False, kernel_initializer="ones")
    x = np.zeros((1, 5, 5, 1), "float32")
    x[0, 2, 2, 0] = 1
    y = np.asarray(layer(x))[0, :, :, 0]
    np.testing.assert_array_equal(y, expected[::-1, ::-1])
    assert np.all(np.asarray(layer.kernel) == 1)


# ------------------------------------------------------------------------------------ causality
@pytest.mark.parametrize("gated,attention_every", [(False, 0), (True, 0), (False, 1), (True, 1), (True, 2)])
def test_causal_by_perturbation(gated, attention_every):
    prior = make_prior(gated, attention_every=attention_every)
    codes = np.random.default_rng(1).integers(0, K, (2, 6, 6))
    dep = influence(prior, codes)
    # a change at q never reaches p <= q in raster order (lower triangle incl. diagonal is False)
    assert not np.any(np.tril(np.ones_like(dep)) & dep)
    assert not dep[:, 0].any()  # the first position depends on no code
    assert dep[0, 1] and dep[0, 6]  # and the net does look at the past


def test_gated_has_no_blind_spot_plain_has_one():
    codes = np.random.default_rng(2).integers(0, K, (2, 6, 6))
    gated = influence(make_prior(True, num_layers=4), codes)
    # every earlier position influences every later one
    assert np.array_equal(gated, np.triu(np.ones_like(gated), 1))
    plain = influence(make_prior(False, num_layers=4), codes)
    # plain masked stack (first kernel 5 -> reach 2 columns right per row up): position (2, 0)
    # never sees (1, 3..5), however deep, although it sees the rest of row 1
    p, w = 2 * 6 + 0, 6
    assert not plain[[1 * w + 3, 1 * w + 4, 1 * w + 5], p].any()
    assert plain[[1 * w + 0, 1 * w + 1, 1 * w + 2], p].all()


@pytest.mark.parametrize("gated", [False, True])
def test_attention_has_no_blind_spot_even_in_one_layer(gated):
    codes = np.random.default_rng(2).integers(0, K, (2, 6, 6))
    # one conv layer alone reaches 2 rows up and a few columns; with attention every earlier
    # position influences every later one
    without = influence(make_prior(gated, num_layers=1), codes)
    assert not without[:2 * 6, 5 * 6 + 5].any()
    dep = influence(make_prior(gated, num_layers=1, attention_every=1), codes)
    assert np.array_equal(dep, np.triu(np.ones_like(dep), 1))


# --------------------------------------------------------------------------------- conditioning
@pytest.mark.parametrize("gated", [False, True])
def test_conditioning_changes_logits_including_first_position(gated):
    prior = make_prior(gated, num_conditions=4)
    codes = np.random.default_rng(3).integers(0, K, (2, 6, 6))
    a = _logits(prior, codes, [0, 0])
    b = _logits(prior, codes, [3, 3])
    assert np.abs(a - b).max() > 1e-4
    assert np.abs(a[:, 0, 0] - b[:, 0, 0]).max() > 1e-4
    with pytest.raises(ValueError):
        prior(codes)  # condition missing


# ------------------------------------------------------------------------------ config and save
def test_prior_config_round_trip_and_unknown_keys():
    cfg = PriorConfig(gated=False, num_conditions=3, grid_shape=(8, 8))
    assert PriorConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bogus"):
        PriorConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="bogus"):
        PixelCNN(K, cfg, bogus=2)
    prior = PixelCNN(K, cfg.to_dict(), filters=8)
    assert prior.config.filters == 8 and prior.config.grid_shape == (8, 8)
    clone = PixelCNN.from_config(prior.get_config())
    assert clone.config == prior.config and clone.num_embeddings == K


@pytest.mark.parametrize("gated,nc", [(False, 0), (True, 0), (True, 3), (False, 3)])
def test_keras_save_load_round_trip(tmp_path, gated, nc):
    prior = make_prior(gated, num_conditions=nc)
    codes = np.random.default_rng(4).integers(0, K, (2, 6, 6))
    path = str(tmp_path / "prior.keras")
    prior.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects needed
    assert isinstance(loaded, PixelCNN) and loaded.config == prior.config
    np.testing.assert_array_equal(_logits(loaded, codes, [1, 2]), _logits(prior, codes, [1, 2]))


def test_output_shape_dtype_any_grid():
    prior = make_prior(True)
    out = prior(np.zeros((3, 5, 9), "int32"))
    assert tuple(out.shape) == (3, 5, 9, K)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"


# ------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("gated,nc", [(True, 0), (False, 2)])
def test_fit_reduces_loss(gated, nc):
    prior = make_prior(gated, num_conditions=nc, grid=(8, 8), filters=16)
    rng = np.random.default_rng(5)
    # structured codes: each row repeats a code, so the left neighbour predicts the code
    codes = np.repeat(rng.integers(0, K, (64, 8, 1)), 8, axis=2)
    x = _inputs(codes, nc, rng.integers(0, 2, 64))
    prior.compile(keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    hist = prior.fit(x, codes, batch_size=16, epochs=4, verbose=0).history["loss"]
    assert hist[-1] < hist[0] - 0.2, hist


# ------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("gated,nc", [(False, 0), (True, 0), (True, 3), (False, 3)])
def test_fast_and_naive_give_identical_codes(gated, nc):
    prior = make_prior(gated, num_conditions=nc, grid=(5, 6))
    cond = [0, 2, 1] if nc else None
    naive = sample_codes(prior, 3, seed=7, condition=cond, method="naive")
    fast = sample_codes(prior, 3, seed=7, condition=cond, method="fast")
    assert naive.dtype == np.int32 and naive.shape == (3, 5, 6)  # grid from the prior's config
    np.testing.assert_array_equal(fast, naive)
    assert fast.min() >= 0 and fast.max() < K
    assert len(np.unique(fast)) > 3  # a draw, not a constant


def test_fast_sampler_chunks_seeds_and_grid_shape():
    prior = make_prior(True)
    a = sample_codes(prior, 4, grid_shape=(4, 7), seed=11)
    assert a.shape == (4, 4, 7) and a.dtype == np.int32
    np.testing.assert_array_equal(a, sample_codes(prior, 4, grid_shape=(4, 7), seed=11,
                                                  batch_size=2))
    np.testing.assert_array_equal(a[:2], sample_codes(prior, 2, grid_shape=(4, 7), seed=11))
    assert not np.array_equal(a, sample_codes(prior, 4, grid_shape=(4, 7), seed=12))
    assert sampler.last_exact_fallbacks <= 2  # exact full-pass decisions are rare


def test_low_temperature_approaches_the_mode():
    prior = make_prior(False, grid=(4, 4))
    # random init gives logits within ~0.05 of each other; spread them so modes are clear
    prior.head_out.kernel.assign(np.asarray(prior.head_out.kernel) * 200.0)
    codes = sample_codes(prior, 2, temperature=1e-4, seed=3)
    logits = _logits(prior, codes)
    top2 = np.sort(logits, -1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-2
    assert clear.mean() > 0.75, clear.mean()  # the check below covers most positions, not none
    # greedy given its own past wherever the mode is clear
    np.testing.assert_array_equal(codes[clear], logits.argmax(-1)[clear])
    hot = sample_codes(prior, 2, temperature=10.0, seed=3)
    assert np.mean(hot == _logits(prior, hot).argmax(-1)) < 0.5


def test_bad_arguments():
    prior = make_prior(True)
    cond_prior = make_prior(True, num_conditions=2)
    for kwargs in ({"temperature": 0.0}, {"temperature": -1.0}, {"condition": 1},
                   {"grid_shape": (0, 3)}, {"method": "slow"}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            sample_codes(prior, 2, seed=0, **kwargs)
    with pytest.raises(ValueError):
        sample_codes(prior, 0, seed=0)
    with pytest.raises(ValueError, match="conditioned"):
        sample_codes(cond_prior, 2, seed=0)
    with pytest.raises(ValueError):
        sample_codes(cond_prior, 2, seed=0, condition=[0, 5])
    with pytest.raises(ValueError):
        sample_codes(PixelCNN(K, filters=8, num_layers=1), 2, seed=0)  # no grid_shape anywhere


# ---------------------------------------------------------------------------- positional priors
def make_positional_prior(gated, nc=0, grid=(5, 6)):
    """A positional prior whose (zero-initialised) position biases are set to random values."""
    prior = make_prior(gated, num_conditions=nc, grid=grid, positional=True)
    rng = np.random.default_rng(9)
    weights = [prior.input_block.pos_h, prior.input_block.pos_v] if gated else [prior.position_bias]
    for var in weights:
        var.assign(rng.normal(0, 0.5, var.shape).astype("float32"))
    return prior


@pytest.mark.parametrize("gated", [False, True])
def test_positional_prior_stays_causal_and_knows_positions(gated):
    prior = make_positional_prior(gated, grid=(6, 6))
    codes = np.random.default_rng(1).integers(0, K, (2, 6, 6))
    dep = influence(prior, codes)
    assert not np.any(np.tril(np.ones_like(dep)) & dep)
    assert not dep[:, 0].any()
    # On a constant grid, a fully convolutional prior predicts the same away from the borders;
    # with per-position biases the interior positions differ.
    logits = _logits(prior, np.zeros((1, 6, 6), "int32"))[0]
    assert np.abs(logits[3, 2] - logits[3, 3]).max() > 1e-3


@pytest.mark.parametrize("gated,nc", [(False, 0), (True, 0), (True, 3), (False, 3)])
def test_positional_fast_and_naive_identical_and_round_trip(tmp_path, gated, nc):
    prior = make_positional_prior(gated, nc)
    cond = [0, 2, 1] if nc else None
    fast = sample_codes(prior, 3, seed=3, condition=cond)
    np.testing.assert_array_equal(fast, sample_codes(prior, 3, seed=3, condition=cond, method="naive"))
    path = str(tmp_path / "positional.keras")
    prior.save(path)
    loaded = keras.models.load_model(path)
    codes = np.random.default_rng(4).integers(0, K, (3, 5, 6))
    np.testing.assert_array_equal(_logits(loaded, codes, cond), _logits(prior, codes, cond))
    with pytest.raises(ValueError, match="learned positions of a"):
        sample_codes(prior, 1, grid_shape=(4, 4), condition=0 if nc else None)
    with pytest.raises(ValueError, match="learned positions of a"):
        prior(_inputs(np.zeros((1, 4, 4), "int32"), nc))


def test_positional_needs_a_grid():
    with pytest.raises(ValueError, match="needs grid_shape"):
        PriorConfig(positional=True)


# ------------------------------------------------------------------ each layer's step = its full pass
GRID = (4, 5)


def _raster():
    return [divmod(p, GRID[1]) for p in range(GRID[0] * GRID[1])]


def _previous(x, i, j):
    """x at the raster position before (i, j), zeros at (0, 0): what a first layer's step takes."""
    p = i * GRID[1] + j - 1
    return np.zeros_like(x[:, 0, 0]) if p < 0 else x[:, p // GRID[1], p % GRID[1]]


@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_masked_conv_step_equals_full_pass(mask_type):
    keras.utils.set_random_seed(0)
    layer = MaskedConv2D(4, 5 if mask_type == "A" else 3, mask_type)
    x = np.random.default_rng(0).normal(size=(2, *GRID, 3)).astype("float32")
    full = np.asarray(layer(x))
    cache = layer.init_cache(2, GRID)
    for i, j in _raster():
        y, cache = layer.step(_previous(x, i, j) if mask_type == "A" else x[:, i, j], i, j, cache)
        np.testing.assert_allclose(np.asarray(y), full[:, i, j], atol=1e-5)


@pytest.mark.parametrize("first,last,nc,positional", [(True, False, 0, True), (True, True, 3, False),
                                                       (False, False, 3, False), (False, True, 0, False)])
def test_gated_block_step_equals_full_pass(first, last, nc, positional):
    keras.utils.set_random_seed(0)
    block = GatedPixelCNNBlock(6, 5 if first else 3, first=first, last=last, num_conditions=nc,
                               position_shape=GRID if positional else None)
    rng = np.random.default_rng(0)
    v, h = (rng.normal(size=(2, *GRID, 6)).astype("float32") for _ in range(2))
    if first:
        v = h  # the first layer reads the code embedding in both stacks
    cond = np.array([0, 2], "int32") if nc else None
    block.build()
    for var in block.weights:  # non-zero position biases
        if "position" in var.path:
            var.assign(rng.normal(0, 0.5, var.shape).astype("float32"))
    v_full, h_full = (np.asarray(t) for t in block([v, h] + ([cond] if nc else [])))
    cache = block.init_cache(2, GRID)
    for i, j in _raster():
        inputs = [None, _previous(h, i, j)] if first else [v[:, i], h[:, i, j]]
        (v_row, h_out), cache = block.step(inputs, i, j, cache, cond)
        np.testing.assert_allclose(np.asarray(h_out), h_full[:, i, j], atol=1e-5)
        if not (first and last):
            np.testing.assert_allclose(np.asarray(v_row), v_full[:, i], atol=1e-5)


def test_masked_residual_block_step_equals_full_pass():
    keras.utils.set_random_seed(0)
    block = MaskedResidualBlock(6, 3, num_conditions=3)
    x = np.random.default_rng(0).normal(size=(2, *GRID, 6)).astype("float32")
    cond = np.array([1, 2], "int32")
    full = np.asarray(block([x, cond]))
    cache = block.init_cache(2, GRID)
    for i, j in _raster():
        y, cache = block.step(x[:, i, j], i, j, cache, cond)
        np.testing.assert_allclose(np.asarray(y), full[:, i, j], atol=1e-5)


def test_attention_block_step_equals_full_pass_and_is_causal():
    keras.utils.set_random_seed(0)
    block = CausalAttentionBlock(6, heads=2, key_dim=4)
    rng = np.random.default_rng(0)
    x, e = (rng.normal(size=(2, *GRID, 6)).astype("float32") for _ in range(2))
    full = np.asarray(block([x, e]))
    cache = block.init_cache(2, GRID)
    for i, j in _raster():
        y, cache = block.step([x[:, i, j], _previous(e, i, j)], i, j, cache)
        np.testing.assert_allclose(np.asarray(y), full[:, i, j], atol=1e-5)
    # the output at raster index p depends on the stream at <= p and on the codes' embedding at
    # < p only, and on all of them
    p = 2 * GRID[1] + 1
    for stream, shift in ((True, 0), (False, 1)):
        changed = [x.copy(), e.copy()]
        changed[0 if stream else 1][:, 2, 1] += rng.normal(size=6).astype("float32")  # (LayerNorm ignores a constant)
        diff = np.abs(np.asarray(block(changed)) - full).max(axis=(0, 3)).reshape(-1)
        assert not diff[:p + shift].any() and (diff[p + shift:] > 0).all()


def _assert_call_with_cache_equals_full_pass(prior, nc, rng):
    """Step ``prior.call_with_cache`` through random grids; each position's logits equal the full pass."""
    codes = rng.integers(0, K, (2, *GRID)).astype("int32")
    cond = np.array([1, 2], "int32") if nc else None
    full = _logits(prior, codes, cond)
    cache = prior.init_cache(2, GRID)
    for i, j in _raster():
        logits, cache = prior.call_with_cache(_previous(codes, i, j), i, j, cache, cond)
        np.testing.assert_allclose(np.asarray(logits), full[:, i, j], atol=1e-5)
    return codes, cond, full


@pytest.mark.parametrize("kw", [{"gated": True}, {"gated": False},
                                {"gated": True, "attention_every": 2, "num_conditions": 3, "positional": True},
                                {"gated": False, "attention_every": 1, "num_conditions": 3, "positional": True,
                                 "condition_dropout": 0.2},
                                {"gated": True, "num_layers": 1}])
def test_prior_call_with_cache_equals_full_pass(kw):
    nc = kw.get("num_conditions", 0)
    prior = make_prior(grid=GRID, **kw)
    rng = np.random.default_rng(1)
    for var in prior.weights:
        if "position" in var.path:
            var.assign(rng.normal(0, 0.5, var.shape).astype("float32"))
    _assert_call_with_cache_equals_full_pass(prior, nc, rng)


# ---------------------------------------------------------------- attention and guidance: config
def test_attention_layout_and_round_trip(tmp_path):
    prior = make_prior(True, num_layers=4, attention_every=2, attention_heads=3, attention_dim=4)
    assert [a.name for a in prior.attention_blocks] == ["attention_0", "attention_1"]
    assert prior.attention_blocks[0].heads == 3 and prior.attention_blocks[0].key_dim == 4
    layer = CausalAttentionBlock(8, heads=3, key_dim=4, dropout=0.1)
    clone = CausalAttentionBlock.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    codes = np.random.default_rng(4).integers(0, K, (2, 6, 6))
    path = str(tmp_path / "attention.keras")
    prior.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(_logits(loaded, codes), _logits(prior, codes))
    with pytest.raises(ValueError, match="attention"):
        PriorConfig(attention_every=-1)
    with pytest.raises(ValueError, match="condition_dropout"):
        PriorConfig(condition_dropout=1.0)


def test_condition_dropout_uses_the_null_slot_in_training_only():
    prior = make_prior(True, num_conditions=3, condition_dropout=0.5)
    assert prior.null_condition == 3 and prior.input_block.cond_h.input_dim == 4  # one more slot
    codes = np.repeat(np.random.default_rng(0).integers(0, K, (1, 6, 6)), 64, axis=0)
    cond = np.ones(64, "int32")
    with_cond = _logits(prior, codes[:1], [1])[0]
    without = _logits(prior, codes[:1], [3])[0]
    assert np.abs(with_cond - without).max() > 1e-4
    train = np.asarray(prior((codes, cond), training=True))
    dropped = np.array([np.allclose(t, without, atol=1e-5) for t in train])
    kept = np.array([np.allclose(t, with_cond, atol=1e-5) for t in train])
    assert (dropped ^ kept).all()  # each example is either conditioned or not
    assert 0.25 < dropped.mean() < 0.75  # about half with condition_dropout=0.5
    np.testing.assert_allclose(_logits(prior, codes, cond), np.broadcast_to(with_cond, train.shape), atol=1e-5)
    # reproducible: the drop pattern comes from the model's seeded SeedGenerator
    again = make_prior(True, num_conditions=3, condition_dropout=0.5)
    np.testing.assert_allclose(np.asarray(again((codes, cond), training=True)), train, atol=1e-6)


def test_prior_without_null_slot_loads_and_says_why_it_cannot_drop_the_condition(tmp_path):
    prior = make_prior(True, num_conditions=3)  # as saved before condition_dropout existed
    assert not prior.has_null_condition and prior.input_block.cond_h.input_dim == 3
    path = str(tmp_path / "old.keras")
    prior.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.config.condition_dropout == 0.0
    with pytest.raises(ValueError, match="condition_dropout"):
        sample_codes(loaded, 1, seed=0)  # condition=None needs the slot
    with pytest.raises(ValueError, match="condition_dropout"):
        sample_codes(loaded, 1, seed=0, condition=1, guidance=2.0)


# ------------------------------------------------- location-dependent conditioning (condition_map)
def _randomise_maps(prior, seed=0):
    rng = np.random.default_rng(seed)
    for var in prior.weights:
        if "condition_maps" in var.path or "position" in var.path:
            var.assign(rng.normal(0, 0.5, var.shape).astype("float32"))
    return prior


@pytest.mark.parametrize("nc", [0, 3])
def test_condition_map_stays_causal_without_blind_spot_and_places_each_condition(nc):
    prior = _randomise_maps(make_prior(True, nc, num_layers=4, condition_map=3, condition_dropout=0.1 if nc else 0))
    assert prior.condition_maps.shape == ((4 if nc else 1), 6, 6, 3)  # conditions + "no condition" slot
    codes = np.random.default_rng(1).integers(0, K, (2, 6, 6))
    dep = influence(prior, codes, [1, 2] if nc else None)
    assert np.array_equal(dep, np.triu(np.ones_like(dep), 1))  # causal, and no blind spot
    # each condition has its own spatial map: the same codes under two conditions differ by
    # position, not only by one offset shared by all positions (what a per-condition bias gives)
    logits = _logits(prior, np.zeros((1, 6, 6), "int32"), [0] if nc else None)[0]
    assert np.abs(logits[3, 2] - logits[3, 3]).max() > 1e-3
    if nc:
        diff = _logits(prior, codes, [0, 0]) - _logits(prior, codes, [2, 2])
        assert np.abs(diff[:, 0, 0] - diff[:, 4, 4]).max() > 1e-3
    with pytest.raises(ValueError, match="learned positions of a"):  # the maps cover one grid only
        prior(_inputs(np.zeros((1, 3, 3), "int32"), nc))


@pytest.mark.parametrize("kw", [dict(num_conditions=3, condition_dropout=0.2, attention_every=2),
                                dict(num_conditions=0, num_layers=1)])
def test_condition_map_step_fast_naive_guidance_and_round_trip(tmp_path, kw):
    prior = _randomise_maps(make_prior(True, grid=GRID, condition_map=2, positional=True, **kw))
    nc = kw["num_conditions"]
    rng = np.random.default_rng(1)
    codes, cond, full = _assert_call_with_cache_equals_full_pass(prior, nc, rng)
    sample_kw = {"condition": [0, 2, 1], "guidance": 2.0, "top_k": 5} if nc else {}
    fast = sample_codes(prior, 3, seed=3, **sample_kw)
    np.testing.assert_array_equal(fast, sample_codes(prior, 3, seed=3, method="naive", **sample_kw))
    path = str(tmp_path / "condition_map.keras")
    prior.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(_logits(loaded, codes, cond), full)
    assert loaded.config.condition_map == 2
    with pytest.raises(ValueError, match="learned positions of a"):
        prior(_inputs(np.zeros((1, 3, 3), "int32"), nc))


def test_condition_map_needs_a_gated_prior_on_a_grid():
    with pytest.raises(ValueError, match="condition_map needs gated=True and grid_shape"):
        PriorConfig(condition_map=4)
    with pytest.raises(ValueError, match="condition_map needs gated=True and grid_shape"):
        PriorConfig(condition_map=4, gated=False, grid_shape=(4, 4))
    with pytest.raises(ValueError, match="condition_map must be >= 0"):
        PriorConfig(condition_map=-1)


# ----------------------------------------------- the previous slice as a condition (previous_slice)
def make_previous_prior(nc=3, grid=(6, 6), **kw):
    """A prior conditioned on slice position and on the previous slice, with random condition maps."""
    kw = {"condition_map": 2, "previous_slice": True, "previous_dropout": 0.25, **kw}
    if nc:
        kw.setdefault("condition_dropout", 0.2)
    prior = _randomise_maps(make_prior(True, nc, grid=grid, **kw))
    prior.head_out.kernel.assign(np.asarray(prior.head_out.kernel) * 10.0)  # logits spread like a trained prior's
    prior.previous_map.out.kernel.assign(np.asarray(prior.previous_map.out.kernel) * 10.0)  # a strong condition
    return prior


def _prev_logits(prior, codes, cond, previous):
    inputs = (codes, np.asarray(cond, "int32"), previous) if cond is not None else (codes, previous)
    return np.asarray(prior(inputs, training=False))


@pytest.mark.parametrize("nc", [0, 3])
def test_previous_slice_is_a_condition_and_the_current_slice_stays_causal(nc):
    prior = make_previous_prior(nc, num_layers=4)
    rng = np.random.default_rng(2)
    codes = rng.integers(0, K, (2, 6, 6)).astype("int32")
    prev = rng.integers(0, K, (2, 6, 6)).astype("int32")
    cond = [1, 2] if nc else None
    base = _prev_logits(prior, codes, cond, prev)
    # another previous slice changes the logits at every position, the first one included
    other = _prev_logits(prior, codes, cond, rng.integers(0, K, (2, 6, 6)).astype("int32"))
    assert (np.abs(other - base).max(axis=-1) > 1e-6).all()
    # it is known in full, so a code late in the previous slice reaches an earlier position of this one
    late = prev.copy()
    late[:, 5, 5] = (late[:, 5, 5] + 1) % K
    assert np.abs(_prev_logits(prior, codes, cond, late) - base)[:, 4, 4].max() > 1e-6
    # ... while a code of the current slice still only reaches the positions after it (no blind spot)
    h, w = codes.shape[1:]
    dep = np.zeros((h * w, h * w), bool)
    for q in range(h * w):
        changed = codes.copy()
        changed[:, q // w, q % w] = (changed[:, q // w, q % w] + 1 + q % (K - 1)) % K
        dep[q] = np.abs(_prev_logits(prior, changed, cond, prev) - base).max(axis=(0, 3)).reshape(-1) > 0
    assert np.array_equal(dep, np.triu(np.ones_like(dep), 1))
    # leaving the previous slice out is "no previous slice": the grid of no_previous codes
    none = np.full_like(prev, prior.no_previous)
    without = np.asarray(prior(_inputs(codes, nc, cond), training=False))
    np.testing.assert_allclose(without, _prev_logits(prior, codes, cond, none), atol=1e-6)
    assert np.abs(without - base).max() > 1e-4


@pytest.mark.parametrize("nc,kw", [
    (3, {"condition": [0, 2, 1], "guidance": 2.0, "top_k": 5}),
    (3, {"condition": [1, 1, 0], "top_p": 0.8, "keep": True}),
    (0, {}),
])
def test_previous_slice_fast_equals_naive_with_guidance_filters_and_kept_codes(tmp_path, nc, kw):
    prior = make_previous_prior(nc, grid=GRID, positional=True, attention_every=2 if nc else 0)
    rng = np.random.default_rng(3)
    previous = rng.integers(0, K, (3, *GRID)).astype("int32")
    # the cached step reads the previous slice's map row by row and equals the full pass
    codes = rng.integers(0, K, (3, *GRID)).astype("int32")
    cond = np.array([1, 2, 0], "int32") if nc else None
    full = _prev_logits(prior, codes, cond, previous)
    cache = prior.init_cache(3, GRID, previous=previous)
    for i, j in _raster():
        logits, cache = prior.call_with_cache(_previous(codes, i, j), i, j, cache, cond)
        np.testing.assert_allclose(np.asarray(logits), full[:, i, j], atol=1e-5)
    kw = dict(kw)
    if kw.pop("keep", False):
        keep = np.zeros((3, *GRID), bool)
        keep[:, 0] = True
        keep[1, 2, 3] = True
        kw.update(keep=keep, codes=codes)
    for prev in (previous, None):
        fast = sample_codes(prior, 3, seed=4, previous=prev, **kw)
        np.testing.assert_array_equal(fast, sample_codes(prior, 3, seed=4, method="naive", previous=prev, **kw))
        if "keep" in kw:
            np.testing.assert_array_equal(fast[kw["keep"]], codes[kw["keep"]])
    assert not np.array_equal(sample_codes(prior, 3, seed=4, previous=previous, **kw),
                              sample_codes(prior, 3, seed=4, **kw))  # the previous slice matters
    path = str(tmp_path / "previous.keras")
    prior.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.config.previous_slice and loaded.config.previous_dropout == 0.25
    np.testing.assert_array_equal(_prev_logits(loaded, codes, cond, previous), full)


def test_previous_dropout_uses_no_previous_slice_in_training_only():
    prior = make_previous_prior(3, previous_dropout=0.5, condition_dropout=0.0)
    rng = np.random.default_rng(5)
    codes = np.repeat(rng.integers(0, K, (1, 6, 6)), 64, axis=0).astype("int32")
    prev = np.repeat(rng.integers(0, K, (1, 6, 6)), 64, axis=0).astype("int32")
    cond = np.ones(64, "int32")
    with_prev = _prev_logits(prior, codes[:1], [1], prev[:1])[0]
    without = _prev_logits(prior, codes[:1], [1], np.full_like(prev[:1], prior.no_previous))[0]
    train = np.asarray(prior((codes, cond, prev), training=True))
    dropped = np.array([np.allclose(t, without, atol=1e-5) for t in train])
    kept = np.array([np.allclose(t, with_prev, atol=1e-5) for t in train])
    assert (dropped ^ kept).all() and 0.25 < dropped.mean() < 0.75
    np.testing.assert_allclose(_prev_logits(prior, codes, cond, prev), np.broadcast_to(with_prev, train.shape),
                               atol=1e-5)


def test_previous_slice_settings_and_bad_arguments():
    with pytest.raises(ValueError, match="previous_slice needs condition_map"):
        PriorConfig(previous_slice=True)
    with pytest.raises(ValueError, match="previous_dropout needs previous_slice"):
        PriorConfig(previous_dropout=0.1)
    with pytest.raises(ValueError, match="previous_dropout must be in"):
        PriorConfig(previous_slice=True, condition_map=2, grid_shape=(4, 4), previous_dropout=1.0)
    # a config saved before the field existed loads with it off
    old = {k: v for k, v in PriorConfig().to_dict().items() if not k.startswith("previous")}
    assert PriorConfig.from_dict(old).previous_slice is False
    plain = make_prior(True, 3, grid=GRID, condition_map=2)
    with pytest.raises(ValueError, match="not conditioned on the previous slice"):
        sample_codes(plain, 1, seed=0, condition=1, previous=np.zeros((1, *GRID), "int32"))
    prior = make_previous_prior(3, grid=GRID)
    with pytest.raises(ValueError, match="previous must be an int array"):
        sample_codes(prior, 2, seed=0, condition=1, previous=np.zeros((1, *GRID), "int32"))
    with pytest.raises(ValueError, match="previous codes must lie in"):
        sample_codes(prior, 1, seed=0, condition=1, previous=np.full((1, *GRID), K + 1, "int32"))
    with pytest.raises(ValueError, match="takes"):
        prior((np.zeros((1, *GRID), "int32"),) * 4)
