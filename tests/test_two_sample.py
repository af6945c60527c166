"""The classifier two-sample test (two_sample.py): pairs kept together, power shown, figures with intervals."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import evaluation
import two_sample

QUICK = two_sample.TwoSampleConfig(filters=(8, 16, 16), epochs=3, min_steps=0, batch_size=16, repeats=1,
                                   min_train_accuracy=0.0, bootstrap=200, permutations=200)


class Brightness:
    """A stand-in classifier for tests of the bookkeeping: calls an image generated when its mean is below
    the training images' median (blurred and darkened copies are darker at the bright pixels)."""

    def __init__(self, x):
        self.cut = float(np.median(x.mean(axis=(1, 2, 3))))

    def __call__(self, x, training=False):
        return self.cut - x.mean(axis=(1, 2, 3))


def brightness_fit(x, y, config, seed):
    return Brightness(x), 1.0, 1


def grainy_slices(cases=8, slices=8, size=32, seed=0):
    """Brain-like slices with per-pixel grain, as uint8, and their case labels."""
    from conftest import brain_like

    rng = np.random.default_rng(seed)
    images = np.stack([np.clip(brain_like(size, c, k) + rng.normal(0, 12, (size, size)), 0, 255)
                       for c in range(cases) for k in range(slices)]).astype(np.uint8)[..., None]
    return images, np.repeat(np.arange(cases), slices)


def small_splits(tmp_path, size=16, slices=4):
    import dataset
    from conftest import write_tree

    cases = {"train": [1], "validate": [2, 3], "test": [4, 5, 6, 7]}
    return dataset.read_oasis(write_tree(tmp_path, size=size, cases=cases, slices=slices))


def test_two_sample_test_tells_real_from_blurred_real():
    from scipy.ndimage import gaussian_filter

    real, cases = grainy_slices()
    blurred = gaussian_filter(real / np.float32(255), sigma=(0, 1.5, 1.5, 0))  # same anatomy, no grain
    config = two_sample.TwoSampleConfig(filters=(8, 16, 16), epochs=40, min_steps=0, batch_size=16,
                                        learning_rate=3e-3, bootstrap=200, permutations=200)
    result = two_sample.two_sample_test(real, blurred, cases, config=config, paired=True)
    assert result["trained"] and result["accuracy"] >= 0.9, result
    lo, hi = result["interval"]
    assert lo <= result["accuracy"] <= hi and lo > 0.5 and result["p_value"] < 0.05, result
    # blurred and halved on both sides, grain is gone from the real side too: much harder to tell
    assert two_sample.two_sample_view(blurred, "blurred").shape == (64, 16, 16, 1)


def test_two_sample_test_gives_about_half_for_two_halves_of_one_set():
    real, cases = grainy_slices(cases=12)
    first = cases % 2 == 0  # two sets of whole cases from one distribution
    result = two_sample.two_sample_test(real[first], real[~first], cases[first], cases[~first],
                                        config=two_sample.TwoSampleConfig(filters=(8, 16, 16), epochs=12,
                                                                          min_steps=0, batch_size=16))
    assert result["trained"], result  # the classifiers did fit their training halves ...
    assert min(result["train_accuracies"]) >= two_sample.TwoSampleConfig().min_train_accuracy
    assert 0.3 <= result["accuracy"] <= 0.7, result  # ... and that did not carry to unseen cases
    lo, hi = result["interval"]
    assert lo < 0.5 < hi and result["p_value"] > 0.05, result  # and the test says it found nothing


def distinct_cases(cases=8, slices=6, size=24, seed=0):
    """Slices whose case is plain to see (each case its own brightness), with a little grain."""
    from conftest import brain_like

    rng = np.random.default_rng(seed)
    images = np.stack([np.clip(brain_like(size, c, k) * (0.35 + 0.08 * c) + rng.normal(0, 6, (size, size)), 0, 255)
                       for c in range(cases) for k in range(slices)]).astype(np.uint8)[..., None]
    return images, np.repeat(np.arange(cases), slices)


def test_paired_test_keeps_each_case_with_its_reconstructions(monkeypatch):
    """In every fold, the cases of the real training slices are exactly the cases of the generated ones."""
    real, cases = distinct_cases()
    made = real.copy()
    made[:, 0, 0, 0] = real[:, 0, 0, 0] = cases * 10  # the case, written where the classifier input shows it
    made[:, 1:] = np.clip(made[:, 1:].astype(int) + 3, 0, 255).astype(np.uint8)
    folds = []

    def spy(x, y, config, seed):
        found = np.round(x[:, 0, 0, 0] * 255 / 10).astype(int)
        folds.append((set(found[y == 0]), set(found[y == 1])))
        return None, 0.5, 1

    monkeypatch.setattr(two_sample, "_fit_two_sample_classifier", spy)
    with pytest.warns(RuntimeWarning, match="did not fit"):
        two_sample.two_sample_test(real, made, cases, config=QUICK, paired=True)
    assert len(folds) == 2 and all(r == g and 2 <= len(r) <= 6 for r, g in folds), folds
    assert folds[0][0].isdisjoint(folds[1][0])  # the halves hold different cases
    with pytest.raises(ValueError, match="paired sets must align"):
        two_sample.two_sample_test(real, made[1:], cases, config=QUICK, paired=True)


def test_reconstructions_are_compared_with_their_own_cases(tmp_path):
    """Reconstructions that only differ from their slices by faint noise read as chance, with an interval
    around 0.5; dealt to other cases than their real slices, the classifier would learn the cases instead
    and score far from chance."""
    real, cases = distinct_cases()
    noisy = np.clip(real.astype(int) + np.random.default_rng(1).integers(-2, 3, real.shape), 0, 255).astype(np.uint8)
    config = two_sample.TwoSampleConfig(filters=(8, 16), epochs=15, min_steps=0, batch_size=16, min_train_accuracy=0.0,
                                        bootstrap=300, permutations=300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no confound warning
        paired = two_sample.two_sample_test(real, noisy, cases, config=config, paired=True)
    lo, hi = paired["interval"]
    assert 0.3 <= paired["accuracy"] <= 0.7 and lo <= 0.5 <= hi, paired
    # the design this replaced: real slices of some cases against the reconstructions of the others
    other = cases >= 4
    crossed = two_sample.two_sample_test(real[~other], noisy[other], cases[~other], cases[other], config=config,
                                         seed=0)
    assert abs(crossed["accuracy"] - 0.5) > abs(paired["accuracy"] - 0.5), (crossed, paired)


def test_an_interval_below_chance_warns_of_a_confound(monkeypatch):
    real, cases = grainy_slices(cases=4, slices=4, size=16)
    monkeypatch.setattr(two_sample, "_fit_two_sample_classifier", brightness_fit)
    monkeypatch.setattr(two_sample, "_accuracy_statistics", lambda *a: (0.2, (0.1, 0.3), 1.0))
    with pytest.warns(RuntimeWarning, match="wholly below chance"):
        result = two_sample.two_sample_test(real, real // 2, cases, config=QUICK, paired=True)
    assert result["accuracy"] == 0.2


def test_accuracy_statistics_bootstrap_cases_and_permute_labels():
    config = two_sample.TwoSampleConfig(bootstrap=500, permutations=500)
    units = np.repeat(np.arange(10), 4)
    labels = np.tile([0, 0, 1, 1], 10)
    perfect = labels.astype(float)  # every item called what it is
    acc, (lo, hi), p = two_sample._accuracy_statistics(np.r_[units], labels, perfect, True, config,
                                                       np.random.default_rng(0))
    assert acc == 1.0 and lo == hi == 1.0 and p < 0.01
    coin = np.random.default_rng(1).integers(0, 2, len(labels)).astype(float)
    acc, (lo, hi), p = two_sample._accuracy_statistics(units, labels, coin, False, config, np.random.default_rng(0))
    assert lo < acc < hi and lo < 0.5 < hi and p > 0.05


def test_two_sample_test_is_reproducible_and_quantises_generated_images(monkeypatch):
    real, cases = grainy_slices(cases=4, slices=6)
    fake = real / np.float32(255) + np.float32(0.3 / 255)  # off the 8-bit grid by 0.3 levels: the same PNGs
    np.testing.assert_array_equal(two_sample.as_8bit(fake), two_sample.as_8bit(real))
    seen = []
    fit = two_sample._fit_two_sample_classifier
    monkeypatch.setattr(two_sample, "_fit_two_sample_classifier", lambda x, *a, **kw: seen.append(x) or fit(x, *a, **kw))
    a = two_sample.two_sample_test(real[::2], fake[1::2], cases[::2], seed=3, config=QUICK)
    levels = np.concatenate(seen) * 255
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)  # the classifier sees 8-bit images only
    b = two_sample.two_sample_test(real[::2], fake[1::2], cases[::2], seed=3, config=QUICK)
    assert a == b


def test_two_sample_test_reads_uint8_and_float_images_alike(monkeypatch):
    """uint8 images are read as pixel / 255, floats in [0, 1] as they are: the same slices given either way
    are the same classifier input (a uint8 PNG read as 0..255 floats would clip to a black-and-white mask)."""
    real, cases = grainy_slices(cases=4, slices=6)
    seen = []
    fit = two_sample._fit_two_sample_classifier
    monkeypatch.setattr(two_sample, "_fit_two_sample_classifier", lambda x, *a, **kw: seen.append(x) or fit(x, *a, **kw))
    as_uint8 = two_sample.two_sample_test(real[::2], real[1::2], cases[::2], cases[1::2], seed=1, config=QUICK)
    first = len(seen)
    as_float = two_sample.two_sample_test(real[::2] / np.float32(255), real[1::2] / np.float32(255), cases[::2],
                                          cases[1::2], seed=1, config=QUICK)
    for x, y in zip(seen[:first], seen[first:]):
        np.testing.assert_array_equal(x, y)
    assert as_uint8 == as_float
    levels = np.round(seen[0] * 255)
    assert np.isin(levels, (0, 255)).mean() < 0.5 and len(np.unique(levels)) > 50  # grey levels, not a mask


def test_a_classifier_that_cannot_learn_is_not_reported_as_indistinguishable(monkeypatch):
    import keras

    def dead(input_shape, config):  # constant logit 0 whatever the input: a collapsed classifier
        inputs = keras.Input(tuple(input_shape))
        pooled = keras.layers.GlobalAveragePooling2D()(inputs)
        return keras.Model(inputs, keras.layers.Dense(1, kernel_initializer="zeros", trainable=False)(pooled))

    built = []
    monkeypatch.setattr(two_sample, "build_two_sample_classifier", lambda *a: built.append(1) or dead(*a))
    real, cases = grainy_slices(cases=4, slices=6)
    config = two_sample.TwoSampleConfig(epochs=1, min_steps=0, repeats=1, restarts=2)
    with pytest.warns(RuntimeWarning, match="did not fit its training half"):
        result = two_sample.two_sample_test(real[::2], real[1::2] // 2, cases[::2], config=config)
    assert not result["trained"] and math.isnan(result["accuracy"])  # not 0.5
    assert all(math.isnan(v) for v in result["interval"]) and math.isnan(result["p_value"])
    assert result["train_accuracies"] == [0.5, 0.5]
    assert result["attempts"] == [2, 2] and len(built) == 4  # retrained before giving up


def test_the_patch_view_cuts_patches_inside_each_head_at_the_real_slices_positions():
    real = two_sample.as_8bit(grainy_slices(cases=3, slices=4, size=64)[0])
    source, corners = two_sample.patch_positions(real, seed=0)
    assert len(source) == two_sample.PATCHES_PER_IMAGE * len(real)  # every slice here has a head
    items, src = two_sample.two_sample_items(real, "patch", (source, corners))
    assert items.shape == (len(source), 16, 16, 1) and np.array_equal(src, source)
    assert (items > 0.05).mean() > 0.95  # inside the head: no background
    empty = np.zeros((2, 64, 64, 1), np.uint8)
    assert len(two_sample.patch_positions(empty)[0]) == 0  # no head, no patches


def test_two_sample_scores_report_every_row_with_its_interval(tmp_path, monkeypatch):
    monkeypatch.setattr(two_sample, "_fit_two_sample_classifier", brightness_fit)  # the rows, not the CNN
    splits = small_splits(tmp_path)
    test = splits["test"]
    recon = test.float()[:, ::-1]  # mirrored: easy to tell
    config = two_sample.TwoSampleConfig(bootstrap=100, permutations=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a brightness rule lacks power: that is tested below
        scores = two_sample.two_sample_scores(splits, recon, test.float()[::-1], views=("full", "interior"),
                                              config=config, progress=False,
                                              validate_reconstructions=splits["validate"].float())
    rows = ("real_validate", "blurred_real", "blurred_validate", "reconstructions", "samples",
            "samples_reconstructions")
    expected = {f"{row}_{view}" for view in ("full", "interior") for row in rows} | {"half_blurred_real_full"}
    assert {k[len("two_sample_"):] for k in scores if not k.endswith(("_interval", "_p"))} == expected
    for key in expected:
        acc, (lo, hi), p = (scores[f"two_sample_{key}{s}"] for s in ("", "_interval", "_p"))
        assert 0.0 <= lo <= acc <= hi <= 1.0 and 0.0 < p <= 1.0, key
    table = two_sample.two_sample_table(scores)
    assert f"{scores['two_sample_reconstructions_full']:.2f} (" in table and table.count("\n") == 8
    few = {**splits, "test": test.subset(np.flatnonzero(test.case_ids == 7))}
    assert "needs at least 2" in two_sample.two_sample_unavailable(few)
    with pytest.raises(ValueError, match="the test split holds 1 case"):
        two_sample.two_sample_scores(few, progress=False)


def test_a_two_sample_test_that_cannot_see_a_blur_warns_that_it_lacks_power(tmp_path, monkeypatch):
    """The power rows: real test slices against blurred copies (paired) and blurred validate slices
    (unpaired). A classifier that does not tell those apart cannot call reconstructions or samples
    indistinguishable, and says so."""
    splits = small_splits(tmp_path)
    calls = []

    def blind(real, generated, *args, paired=False, **kwargs):  # a classifier that sees nothing at all
        calls.append((np.asarray(real), np.asarray(generated), paired))
        return {"accuracy": 0.5, "interval": (0.4, 0.6), "p_value": 0.5}

    monkeypatch.setattr(two_sample, "two_sample_test", blind)
    with pytest.warns(RuntimeWarning, match="lacks the power") as caught:
        scores = two_sample.two_sample_scores(splits, views=("full",), floor=False, progress=False)
    assert len([w for w in caught if "lacks the power" in str(w.message)]) == 3
    assert {k for k in scores if not k.endswith(("_interval", "_p"))} == {
        "two_sample_blurred_real_full", "two_sample_half_blurred_real_full", "two_sample_blurred_validate_full"}
    test = splits["test"].float()
    (real1, blur1, paired1), (_, blur_half, _), (real3, blur_val, paired3) = calls
    assert paired1 and not paired3
    assert len(real1) == len(blur1) == len(test) and not np.allclose(blur1, test)  # the same slices, blurred
    assert np.abs(blur_half - test).mean() < np.abs(blur1 - test).mean()
    assert not any(np.allclose(b, t) for b in blur_val for t in test)  # other cases: no test slice
    monkeypatch.setattr(two_sample, "two_sample_test",
                        lambda *a, **kw: {"accuracy": 0.97, "interval": (0.9, 1.0), "p_value": 0.001})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a test that sees the blur: no warning
        two_sample.two_sample_scores(splits, views=("full",), floor=False, progress=False)


def test_evaluation_still_exports_the_two_sample_test():
    assert evaluation.two_sample_scores is two_sample.two_sample_scores
    assert evaluation.TWO_SAMPLE_VIEWS == ("full", "interior", "blurred", "patch")


def test_subject_scores_report_the_two_sample_test_with_its_power_check(tmp_path, monkeypatch):
    splits = small_splits(tmp_path)
    generated = np.random.default_rng(0).random((2, 4, 16, 16, 1)).astype("float32")
    seen = []

    def fake(real, other, *args, **kwargs):  # records what each comparison was given
        seen.append(np.asarray(other))
        return {"accuracy": 0.97 if len(seen) < 4 else 0.9, "interval": (0.8, 1.0), "p_value": 0.01}

    monkeypatch.setattr(two_sample, "two_sample_test", fake)
    out = evaluation.subject_scores(generated, generated, two_sample_splits=splits)
    assert out["two_sample_blurred_real_full"] == 0.97 and out["two_sample_subjects_full"] == 0.9
    assert out["two_sample_subjects_full_interval"] == [0.8, 1.0]
    np.testing.assert_array_equal(seen[3], two_sample.as_8bit(generated.reshape(-1, 16, 16, 1)))  # every slice
