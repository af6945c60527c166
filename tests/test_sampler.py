"""Specification of sample_codes beyond plain sampling: attention, guidance, top-k / top-p, kept
codes, mixed precision and TF32. (Plain fast == naive, chunking and argument checks: test_prior.py.)"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import sampler  # noqa: E402
from modules import PixelCNN  # noqa: E402
from sampler import sample_codes  # noqa: E402

K = 12
GRID = (4, 5)


def make_prior(gated=True, nc=0, seed=0, **kw):  # noqa: D103
    """A small prior with random (non-zero) position biases and logits spread like a trained one's."""
    keras.utils.set_random_seed(seed)
    kw = {"filters": 8, "num_layers": 2, "grid_shape": GRID, **kw}
    prior = PixelCNN(K, gated=gated, num_conditions=nc, **kw)
    prior.build()
    rng = np.random.default_rng(seed)
    for var in prior.weights:
        if "position" in var.path:
            var.assign(rng.normal(0, 0.5, var.shape).astype("float32"))
    prior.head_out.kernel.assign(np.asarray(prior.head_out.kernel) * 10.0)
    return prior


def logits_of(prior, codes, cond=None):
    inputs = codes if cond is None else (codes, np.asarray(cond, "int32"))
    return np.asarray(prior(inputs, training=False))


GUIDED = dict(gated=True, nc=3, attention_every=2, condition_dropout=0.1)


# ------------------------------------------------------------------- fast == naive, every option
@pytest.mark.parametrize("prior_kw,kw", [
    (dict(gated=True, attention_every=2), {}),
    (dict(gated=False, attention_every=2, positional=True), {"top_p": 0.7}),
    (dict(GUIDED, positional=True), {"condition": [0, 2, 1], "guidance": 2.5, "top_k": 4}),
    (GUIDED, {"condition": None, "top_k": 5, "top_p": 0.9}),
])
def test_fast_equals_naive_with_attention_guidance_and_filters(prior_kw, kw):
    prior = make_prior(**prior_kw)
    fast = sample_codes(prior, 3, seed=5, **kw)
    naive = sample_codes(prior, 3, seed=5, method="naive", **kw)
    np.testing.assert_array_equal(fast, naive)
    assert len(np.unique(fast)) > 2
    assert sampler.last_exact_fallbacks == 0 or sampler.last_exact_fallbacks <= 3


def test_near_ties_are_decided_exactly():
    # all logits equal: the top-k cut is a tie at every position, so the fast loop hands every
    # position to the exact (naive) decision, and the result is still the naive one
    prior = make_prior(gated=True)
    prior.head_out.kernel.assign(np.zeros(prior.head_out.kernel.shape, "float32"))
    fast = sample_codes(prior, 2, seed=1, top_k=3)
    assert sampler.last_exact_fallbacks == GRID[0] * GRID[1]
    np.testing.assert_array_equal(fast, sample_codes(prior, 2, seed=1, top_k=3, method="naive"))


def test_a_tie_costs_an_exact_pass_over_the_tied_samples_only(monkeypatch):
    # issue 15: a near-tie in one sample must not send the whole batch through a full-grid pass
    # (that made the cost grow with the square of the batch). Flat logits make every free
    # position a top-k tie; kept positions never tie. Sample 0 is free everywhere, sample 1 at
    # three positions, samples 2-5 nowhere: the exact passes must receive exactly the free rows.
    prior = make_prior(gated=True, attention_every=2)
    prior.head_out.kernel.assign(np.zeros(prior.head_out.kernel.shape, "float32"))
    n = 6
    given = np.random.default_rng(3).integers(0, K, (n, *GRID))
    keep = np.ones((n, *GRID), bool)
    keep[0] = False
    keep[1, 0, 1] = keep[1, 2, 3] = keep[1, 3, 0] = False
    received = []
    exact_logits = sampler._exact_logits

    def counting(prior_, grid, *args):
        received.append(len(grid))
        return exact_logits(prior_, grid, *args)

    monkeypatch.setattr(sampler, "_exact_logits", counting)
    fast = sample_codes(prior, n, seed=1, top_k=3, codes=given, keep=keep)
    assert sampler.last_exact_fallbacks == GRID[0] * GRID[1]  # sample 0 ties at every position
    assert received == [2 if not keep[1].flat[p] else 1 for p in range(GRID[0] * GRID[1])]
    assert sum(received) == sampler.last_exact_rows == (~keep).sum()
    np.testing.assert_array_equal(fast[keep], given[keep])
    monkeypatch.setattr(sampler, "_exact_logits", exact_logits)
    np.testing.assert_array_equal(fast, sample_codes(prior, n, seed=1, top_k=3, codes=given, keep=keep,
                                                     method="naive"))


def test_fast_equals_naive_when_some_samples_tie_and_others_do_not(monkeypatch):
    # At a tie position the untied samples keep the loop's own draw and only the tied ones get the
    # exact decision. With a zero output kernel the logits are the output bias everywhere, so noise
    # can be made to tie: sample 2's top two scores are equal at every position, the other samples
    # draw from ordinary Gumbel noise. With guidance (both halves of the doubled batch follow the
    # decision), kept codes, and chunks of 2 with a padded last chunk.
    prior = make_prior(**GUIDED)
    prior.head_out.kernel.assign(np.zeros(prior.head_out.kernel.shape, "float32"))
    bias = np.random.default_rng(5).normal(0, 2, K).astype("float32")
    prior.head_out.bias.assign(bias)
    pair = np.argsort(bias)[-2:]  # the two most likely codes: inside the top-k cut
    noise_of = sampler.gumbel_noise

    def tying(seed, indices, grid_shape, k):
        noise = noise_of(seed, indices, grid_shape, k)
        for row, n in enumerate(indices):
            if n == 2:
                noise[row] = -bias + 5.0 * np.isin(np.arange(k), pair)
        return noise

    monkeypatch.setattr(sampler, "gumbel_noise", tying)
    keep = np.zeros((5, *GRID), bool)
    keep[3] = np.random.default_rng(2).random(GRID) < 0.5
    given = np.random.default_rng(4).integers(0, K, keep.shape)
    kw = dict(seed=8, condition=[0, 1, 2, 0, 1], guidance=1.5, top_k=4, codes=given, keep=keep)
    fast = sample_codes(prior, 5, batch_size=2, **kw)
    assert sampler.last_exact_fallbacks == sampler.last_exact_rows == GRID[0] * GRID[1]  # sample 2 only
    assert np.isin(fast[2], pair).all()  # decided within the tied pair
    assert len(np.unique(fast[[0, 1, 4]])) > 3  # the others drew freely
    np.testing.assert_array_equal(fast, sample_codes(prior, 5, method="naive", **kw))


def test_short_last_chunk_is_padded_and_reuses_the_compiled_loop():
    prior = make_prior(gated=True)
    whole = sample_codes(prior, 5, seed=13)
    chunked = sample_codes(prior, 5, seed=13, batch_size=2)  # chunks of 2, 2 and 1 (padded to 2)
    np.testing.assert_array_equal(chunked, whole)
    (run,) = sampler._FAST_FNS[sampler._float32_prior(prior)].values()
    assert run.experimental_get_tracing_count() == 2  # batch 5 and batch 2: not a third for batch 1
    assert sampler.last_exact_rows == 0  # padding rows are kept everywhere: they never tie


def test_default_batch_size_bounds_the_chunk(monkeypatch):
    prior = make_prior(gated=True)
    monkeypatch.setattr(sampler, "DEFAULT_BATCH_SIZE", 2)
    seen = []
    fast = sampler._sample_fast
    monkeypatch.setattr(sampler, "_sample_fast", lambda *a, **kw: seen.append(len(a[1])) or fast(*a, **kw))
    codes = sample_codes(prior, 3, seed=2)
    assert seen == [2, 1]
    monkeypatch.setattr(sampler, "_sample_fast", fast)
    np.testing.assert_array_equal(codes, sample_codes(prior, 3, seed=2, batch_size=3))


# -------------------------------------------------------------------------------- top-k, top-p
def test_top_k_and_top_p_keep_draws_inside_the_allowed_set():
    prior = make_prior(gated=True, attention_every=2)
    greedy = sample_codes(prior, 3, seed=2, top_k=1, temperature=5.0)
    np.testing.assert_array_equal(greedy, logits_of(prior, greedy).argmax(-1))  # k = 1: the mode, any T
    codes = sample_codes(prior, 4, seed=2, top_k=3)
    rank = (logits_of(prior, codes) > np.take_along_axis(logits_of(prior, codes), codes[..., None], -1)).sum(-1)
    assert rank.max() < 3 and rank.max() > 0  # always one of the 3 most likely, not always the mode
    t, p = 2.0, 0.6
    codes = sample_codes(prior, 4, seed=2, top_p=p, temperature=t)
    z = logits_of(prior, codes) / t
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.take_along_axis(probs, codes[..., None], -1)
    mass_above = np.where(probs > chosen, probs, 0).sum(-1)  # probability of the more likely codes
    assert mass_above.max() < p  # inside the nucleus
    free = sample_codes(prior, 4, seed=2, temperature=t)  # without it, draws fall outside sometimes
    zf = logits_of(prior, free) / t
    pf = np.exp(zf - zf.max(-1, keepdims=True))
    pf /= pf.sum(-1, keepdims=True)
    cf = np.take_along_axis(pf, free[..., None], -1)
    assert np.where(pf > cf, pf, 0).sum(-1).max() >= p


# -------------------------------------------------------------------------------------- guidance
def test_guidance_zero_is_unconditional_and_one_is_conditioned():
    prior = make_prior(**GUIDED)
    uncond = sample_codes(prior, 4, seed=3)  # condition=None: the "no condition" slot
    np.testing.assert_array_equal(uncond, sample_codes(prior, 4, seed=3, condition=1, guidance=0.0))
    cond = sample_codes(prior, 4, seed=3, condition=1)
    np.testing.assert_array_equal(cond, sample_codes(prior, 4, seed=3, condition=1, guidance=1.0))
    assert not np.array_equal(cond, uncond)
    # unconditional sampling really uses the null slot: greedy draws follow its logits
    greedy = sample_codes(prior, 2, seed=3, top_k=1)
    np.testing.assert_array_equal(greedy, logits_of(prior, greedy, [3, 3]).argmax(-1))
    # guided greedy draws follow uncond + s (cond - uncond)
    s = 3.0
    g = sample_codes(prior, 2, seed=3, condition=[0, 2], guidance=s, top_k=1)
    mixed = logits_of(prior, g, [3, 3]) + s * (logits_of(prior, g, [0, 2]) - logits_of(prior, g, [3, 3]))
    np.testing.assert_array_equal(g, mixed.argmax(-1))


def test_guidance_and_unconditional_need_a_null_slot():
    plain_cond = make_prior(gated=True, nc=3)
    with pytest.raises(ValueError, match="condition_dropout"):
        sample_codes(plain_cond, 2, seed=0)
    with pytest.raises(ValueError, match="condition_dropout"):
        sample_codes(plain_cond, 2, seed=0, condition=1, guidance=2.0)
    with pytest.raises(ValueError, match="guidance"):
        sample_codes(make_prior(**GUIDED), 2, seed=0, guidance=2.0)  # no condition to guide by
    with pytest.raises(ValueError, match="guidance"):
        sample_codes(make_prior(), 2, seed=0, guidance=2.0)  # unconditioned prior


# ------------------------------------------------------------------------------ codes and keep
def test_kept_codes_stay_and_the_rest_is_drawn_given_them():
    prior = make_prior(gated=True, attention_every=2)
    free = sample_codes(prior, 3, seed=4)
    # keeping a sample's own codes anywhere changes nothing: the rest is drawn given them
    keep = np.random.default_rng(0).random(free.shape) < 0.4
    np.testing.assert_array_equal(sample_codes(prior, 3, seed=4, codes=free, keep=keep), free)
    # keeping other codes: they stay, later draws follow them, fast == naive, chunks don't matter
    other = np.random.default_rng(1).integers(0, K, free.shape)
    keep = np.zeros(free.shape, bool)
    keep[:, :2] = True  # completion: first two rows given
    keep[1, 3, 2] = True
    fast = sample_codes(prior, 3, seed=4, codes=other, keep=keep)
    np.testing.assert_array_equal(fast[keep], other[keep])
    np.testing.assert_array_equal(fast, sample_codes(prior, 3, seed=4, codes=other, keep=keep, method="naive"))
    np.testing.assert_array_equal(fast, sample_codes(prior, 3, seed=4, codes=other, keep=keep, batch_size=1))
    assert not np.array_equal(fast[:, 2:], free[:, 2:])
    everything = np.ones(free.shape, bool)
    np.testing.assert_array_equal(sample_codes(prior, 3, seed=9, codes=other, keep=everything), other)
    np.testing.assert_array_equal(sample_codes(prior, 3, seed=4, codes=other, keep=None), free)  # nothing kept


def test_bad_keep_top_k_top_p():
    prior = make_prior()
    shape = (2, *GRID)
    for kw, match in (({"keep": np.ones(shape, bool)}, "codes"),
                      ({"keep": np.ones((2, 3, 3), bool), "codes": np.zeros((2, 3, 3), int)}, "keep"),
                      ({"keep": np.ones(shape, int), "codes": np.zeros(shape, int)}, "keep"),
                      ({"keep": np.ones(shape, bool), "codes": np.full(shape, K)}, "kept codes"),
                      ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")):
        with pytest.raises(ValueError, match=match):
            sample_codes(prior, 2, seed=0, **kw)


# ------------------------------------------------------------------------- precision (issue 8)
def test_mixed_float16_prior_samples_in_float32_fast_equals_naive():
    # issue 8, fault 1: a conditioned positional prior built under mixed_float16 failed in the fast
    # sampler (float16 / float32 AddV2); sampling must run in float32 and agree code for code
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        prior = PixelCNN(K, filters=8, num_layers=2, num_conditions=3, grid_shape=GRID, positional=True)
        prior((np.zeros((1, *GRID), "int32"), np.zeros(1, "int32")))
        assert prior.input_block.compute_dtype == "float16"
        fast = sample_codes(prior, 3, seed=6, condition=[0, 1, 2])
        naive = sample_codes(prior, 3, seed=6, condition=[0, 1, 2], method="naive")
    finally:
        keras.config.set_dtype_policy(policy)
    np.testing.assert_array_equal(fast, naive)
    # the float32 sampling copy holds the prior's weights: same codes as a float32 rebuild
    clone = PixelCNN.from_config(prior.get_config())
    clone.build()
    clone.set_weights(prior.get_weights())
    np.testing.assert_array_equal(sample_codes(clone, 3, seed=6, condition=[0, 1, 2]), fast)


@pytest.mark.parametrize("method,user_setting", [("fast", True), ("naive", True), ("fast", False)])
def test_tf32_is_off_while_sampling_and_restored(monkeypatch, method, user_setting):
    # issue 8, fault 2: TF32 matmuls (GPU default) exceed the sampler's tie tolerance
    prior = make_prior()
    seen = []

    def spying(name):
        original = getattr(type(prior), name)

        def spy(self, *args, **kwargs):
            seen.append(tf.config.experimental.tensor_float_32_execution_enabled())
            return original(self, *args, **kwargs)
        return spy

    for name in ("call", "call_with_cache"):  # naive calls the model; fast traces its step
        if hasattr(type(prior), name):
            monkeypatch.setattr(type(prior), name, spying(name))
    before = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(user_setting)
    try:
        sample_codes(prior, 1, seed=0, method=method)
        after = tf.config.experimental.tensor_float_32_execution_enabled()
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(before)
    assert seen and not any(seen)
    assert after == user_setting
