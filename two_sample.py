"""The classifier two-sample test (Lopez-Paz & Oquab 2017, "Revisiting classifier two-sample tests").

A small CNN is trained to tell two sets of slices apart and scored on slices it did not see: 0.5 means
it cannot, 1.0 that it always can. Three things make the figure mean what it says:

* **Pairs stay together.** A slice and what was made from it (its reconstruction, a blurred copy) are
  compared *paired*: the cases are dealt into two halves and each case's real slices and its made
  slices go to the same half, so both classes hold the same cases and recognising a case earns
  nothing (:func:`two_sample_test` with ``paired=True``). Sets with no pairs (samples, other cases)
  are compared *unpaired*, each side split by its own cases.
* **Power is shown, not assumed.** :func:`two_sample_scores` runs the test on known, small
  degradations of real slices beside every comparison (:data:`POWER_ROWS`); below the minimum
  accuracy there the test could not have seen a difference of that size, and a warning says so.
* **Each figure comes with how sure it is**: a 95 % bootstrap interval over cases (the units that are
  independent) and a p-value against chance from a permutation of the labels by case, both on the
  held-out decisions. An interval wholly below 0.5 is a confound of the split, never a result, and
  a warning says so.

``evaluation`` re-exports the public names, so ``from evaluation import two_sample_scores`` works.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

import utils

VIEWS = ("full", "interior", "blurred", "patch")
# The patch view: this many patches of PATCH_FRACTION of the side from inside each head.
PATCHES_PER_IMAGE = 4
PATCH_FRACTION = 0.25
# The power rows of :func:`two_sample_scores`: real slices against real slices blurred by a Gaussian
# of ``blur`` px, paired (the same cases on both sides, blurred copies of the very slices) or unpaired
# (real test slices against as many *validate* slices blurred: other cases, as samples are), and the
# accuracy the test must reach on the full slice to claim the power to see a difference that small.
POWER_ROWS = {
    "blurred_real": {"blur": 1.0, "paired": True, "min_full": 0.95},
    "half_blurred_real": {"blur": 0.5, "paired": True, "min_full": 0.75},
    "blurred_validate": {"blur": 1.0, "paired": False, "min_full": 0.85},
}
# The power row that stands beside the reconstructions (and samples) on every view.
VIEW_POWER_ROWS = ("blurred_real", "blurred_validate")


@dataclass(frozen=True)
class TwoSampleConfig:
    """The classifier of :func:`two_sample_test` (stride-2 convolutions, one logit per image) and its
    statistics."""

    filters: tuple[int, ...] = (16, 32, 64, 64)  # one stride-2 4x4 convolution each
    # The classifier trains at least ``epochs`` epochs and at least ``min_steps`` steps of
    # ``batch_size``, so that small sets (a few hundred slices) get the steps they need. It fits its
    # training half long before it generalises: on the demo's 544 test slices, paired with copies
    # blurred by 0.5 px, the held-out figure was 0.67 after 400 steps, 0.79 after 800 and 0.83 after
    # 1,600 (full slice; training accuracy 1.0 from 800 on).
    epochs: int = 8
    min_steps: int = 1200
    batch_size: int = 32
    # Two-fold tests on this many different splits by case; each image is held out once per repeat
    # and its decisions are averaged over the repeats.
    repeats: int = 1
    learning_rate: float = 1e-3
    # The collapse guard: a classifier that did not fit its own training half to this balanced
    # accuracy did not train (a dead one, constant output, scores exactly 0.5 there). It is retrained
    # from another seed with twice the steps of the attempt before, up to ``restarts`` attempts, and
    # its held-out 0.5 is never reported as "indistinguishable". (Paired sets too alike to memorise, such
    # as slices and copies with 2 grey levels of noise, cannot be fitted either: they report NaN, "not
    # fitted", which is the honest answer for a difference the classifier cannot see.)
    min_train_accuracy: float = 0.55
    restarts: int = 2
    bootstrap: int = 2000  # draws of the bootstrap over cases (the interval)
    permutations: int = 2000  # label permutations by case (the p-value)
    confidence: float = 0.95


def as_8bit(images) -> np.ndarray:
    """Float32 images in [0, 1] on the 8-bit grid, exactly as a saved PNG would hold them.

    uint8 input is read as ``pixel / 255``; float input is clipped to [0, 1] and rounded to the
    nearest of the 256 levels (without this a classifier could win on quantisation alone).
    """
    x = np.asarray(images)
    x = x if x.dtype == np.uint8 else utils.to_uint8(x)
    return utils.as_image_batch(np.divide(x, 255, dtype=np.float32))


def patch_positions(images, seed: int = 0, per_image: int = PATCHES_PER_IMAGE,
                    fraction: float = PATCH_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners of ``per_image`` patches of ``fraction`` of the side inside each head.

    A patch's centre is drawn (seeded) from the pixels whose whole patch lies inside the head
    (``utils.brain_interior_mask`` with a margin of half a patch); a slice with no such pixel
    (the lowest and highest slices, a sample without a head) gives no patches.

    Returns:
        ``(source, corners)``: int ``(P,)`` the image each patch comes from, int ``(P, 2)`` its corner.
    """
    x = np.asarray(images)
    side = max(1, round(x.shape[1] * fraction))
    half = side // 2
    rng = np.random.default_rng([int(seed), 7])
    source, corners = [], []
    for i, image in enumerate(x):
        inside = np.argwhere(utils.brain_interior_mask(image, margin=half))
        if len(inside) == 0:
            continue
        for r, c in inside[rng.choice(len(inside), per_image, replace=len(inside) < per_image)]:
            source.append(i)
            corners.append((min(max(r - half, 0), x.shape[1] - side), min(max(c - half, 0), x.shape[2] - side)))
    return np.asarray(source, np.int64), np.asarray(corners, np.int64).reshape(-1, 2)


def two_sample_view(images, view: str) -> np.ndarray:
    """One view of the two-sample test of every image (:func:`two_sample_items` without the sources)."""
    return two_sample_items(images, view)[0]


def two_sample_items(images, view: str, patches=None) -> tuple[np.ndarray, np.ndarray]:
    """One view of the two-sample test, with the image each item comes from.

    ``full``: the slice; ``interior``: its central half (``utils.center_crop``); ``blurred``: a
    Gaussian of 1.5 px then every second pixel (anatomy without grain or sharp borders); ``patch``:
    patches from inside the head at ``patches`` (:func:`patch_positions`, drawn from ``images``
    themselves when None: pass a real slice's positions to its reconstruction so a pair stays a pair).

    Returns:
        ``(items (M, h, w, 1), source (M,))``.
    """
    x = utils.as_image_batch(images)
    every = np.arange(len(x))
    if view == "full":
        return x, every
    if view == "interior":
        return utils.center_crop(x), every
    if view == "blurred":
        from scipy.ndimage import gaussian_filter

        return gaussian_filter(x, sigma=(0, 1.5, 1.5, 0))[:, ::2, ::2], every
    if view == "patch":
        source, corners = patch_positions(x) if patches is None else patches
        side = max(1, round(x.shape[1] * PATCH_FRACTION))
        items = np.stack([x[i, r:r + side, c:c + side] for i, (r, c) in zip(source, corners)]) if len(source) \
            else np.zeros((0, side, side, 1), np.float32)
        return items, source
    raise ValueError(f"two_sample_items: view must be one of {VIEWS}, got {view!r}")


def build_two_sample_classifier(input_shape, config: TwoSampleConfig = TwoSampleConfig()):
    """A small CNN of stock Keras layers: ``(N, H, W, 1)`` in [0, 1] -> one logit ("generated")."""
    import keras
    from keras import layers

    x = inputs = keras.Input(tuple(input_shape))
    x = layers.Rescaling(2.0, offset=-1.0)(x)
    for f in config.filters:
        x = layers.Conv2D(f, 4, strides=2, padding="same")(x)
        x = layers.LeakyReLU(0.2)(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(1)(x), name="two_sample_classifier")


def _balanced_accuracy(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean of the per-class accuracies (0.5 for a constant guess whatever the class sizes)."""
    guess = np.asarray(logits).reshape(-1) > 0
    return float(np.mean([np.mean(guess[labels == c] == bool(c)) for c in (0, 1)]))


def _logits(model, x, batch_size: int = 256) -> np.ndarray:
    """The classifier's logits ``(N,)``, called in chunks (no ``predict``: no retracing per new model)."""
    return np.concatenate([np.asarray(model(x[i:i + batch_size], training=False)).reshape(-1)
                           for i in range(0, len(x), batch_size)])


def _fit_two_sample_classifier(x, y, config: TwoSampleConfig, seed):
    """Train until the classifier fits its training half (the collapse guard): up to ``restarts`` attempts,
    each from another seed with twice the steps of the one before.

    Returns ``(model or None, training balanced accuracy of the last attempt, attempts)``.
    """
    import keras

    steps_per_epoch = -(-len(x) // config.batch_size)
    epochs = max(config.epochs, -(-config.min_steps // steps_per_epoch))
    train_acc = float("nan")
    for attempt in range(config.restarts):
        keras.utils.set_random_seed(int(np.random.SeedSequence([*seed, attempt]).generate_state(1)[0] % 2**31))
        model = build_two_sample_classifier(x.shape[1:], config)
        model.compile(keras.optimizers.Adam(config.learning_rate),
                      keras.losses.BinaryCrossentropy(from_logits=True))
        # classes weighted to equal total weight: unequal halves do not bias the guess
        weight = {c: len(y) / (2.0 * max(1, int((y == c).sum()))) for c in (0, 1)}
        model.fit(x, y.astype("float32"), epochs=epochs * 2 ** attempt, batch_size=config.batch_size,
                  shuffle=True, class_weight=weight, verbose=0)
        logits = _logits(model, x)
        train_acc = _balanced_accuracy(y, logits) if np.all(np.isfinite(logits)) else float("nan")
        if train_acc >= config.min_train_accuracy:
            return model, train_acc, attempt + 1
    return None, train_acc, config.restarts


def _two_halves(groups, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of half A: whole groups (cases) kept together, dealt largest first in a seeded order
    to the half that holds fewer items."""
    groups = np.asarray(groups)
    names, sizes = np.unique(groups, return_counts=True)
    order = rng.permutation(len(names))
    order = order[np.argsort(-sizes[order], kind="stable")]
    in_a, count = [], [0, 0]
    for g in order:
        half = 0 if count[0] <= count[1] else 1
        count[half] += sizes[g]
        if half == 0:
            in_a.append(names[g])
    return np.isin(groups, in_a)


def _units(groups, n: int, prefix: str) -> np.ndarray:
    """Group labels as strings; each item its own unit where there are none."""
    if groups is None:
        return np.array([f"{prefix}{i}" for i in range(n)])
    groups = np.asarray(groups).astype(str)
    if len(groups) != n:
        raise ValueError(f"two_sample_test: {len(groups)} group labels for {n} images")
    return groups


def _accuracy_statistics(units, labels, said_generated, paired: bool, config: TwoSampleConfig,
                         rng: np.random.Generator) -> tuple[float, tuple[float, float], float]:
    """Balanced accuracy of the held-out decisions, its bootstrap interval over units and the
    permutation p-value against chance.

    ``said_generated[i]`` is the share of the times item ``i`` was held out that the classifier called
    it generated. Items are summed per (unit, label) row; the bootstrap resamples units (paired: a case
    with both its rows; unpaired: within each label), the permutation swaps the labels of whole units
    (paired: each case's two rows exchange labels with probability 1/2; unpaired: the labels of the
    units are shuffled).
    """
    keys = np.char.add(np.char.add(units.astype(str), "|"), labels.astype(str))
    rows, row_of = np.unique(keys, return_inverse=True)
    n = np.bincount(row_of).astype(np.float64)
    k = np.bincount(row_of, weights=said_generated)
    row_label = np.zeros(len(rows), np.int64)
    row_label[row_of] = labels
    row_unit = np.array([r.rsplit("|", 1)[0] for r in rows])

    def accuracy(weight, label):  # weight, label: (B, rows)
        real, gen = weight * (label == 0), weight * (label == 1)
        return 0.5 * ((real @ (n - k)) / (real @ n) + (gen @ k) / (gen @ n))

    observed = float(accuracy(np.ones((1, len(rows))), row_label[None])[0])
    if paired:
        clusters, row_cluster = np.unique(row_unit, return_inverse=True)
        draws = rng.integers(0, len(clusters), (config.bootstrap, len(clusters)))
        counts = np.stack([np.bincount(d, minlength=len(clusters)) for d in draws])[:, row_cluster]
        flips = rng.integers(0, 2, (config.permutations, len(clusters)))[:, row_cluster]
        permuted = row_label[None] ^ flips
    else:
        counts = np.zeros((config.bootstrap, len(rows)))
        for c in (0, 1):
            idx = np.flatnonzero(row_label == c)
            draws = idx[rng.integers(0, len(idx), (config.bootstrap, len(idx)))]
            counts += np.stack([np.bincount(d, minlength=len(rows)) for d in draws])
        permuted = np.stack([rng.permutation(row_label) for _ in range(config.permutations)])
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = accuracy(counts, np.broadcast_to(row_label, counts.shape))
        null = accuracy(np.ones_like(permuted, dtype=np.float64), permuted)
    tail = (1.0 - config.confidence) / 2
    lo, hi = np.nanquantile(boot, [tail, 1.0 - tail])
    p = (1 + int(np.sum(null >= observed - 1e-12))) / (1 + len(null))
    return observed, (float(lo), float(hi)), float(p)


def two_sample_test(real, generated, real_groups=None, generated_groups=None, seed: int = 0,
                    config: TwoSampleConfig | None = None, view: str = "full", paired: bool = False,
                    warn: bool = True) -> dict[str, Any]:
    """Classifier two-sample test: how well a small CNN tells ``generated`` images from ``real`` ones.

    Both sets are put on the 8-bit grid (:func:`as_8bit`), seen in ``view`` (:func:`two_sample_items`)
    and split in two halves by group (case ids: a classifier must not win by recognising a case):

    * ``paired=False``: each set by its own groups (each image its own group where there are none);
    * ``paired=True``: ``generated[i]`` was made from ``real[i]`` (its reconstruction, a degraded
      copy): the pairs' shared groups are dealt once, and each half holds a case's real *and* made
      slices, so both classes hold the same cases. In the patch view a made slice is cut at its real
      slice's patch positions.

    A classifier trained on half A of both sets is scored on half B, and one trained on B on A;
    ``config.repeats`` different splits are averaged per image. The score is the balanced accuracy
    of the held-out decisions, with a bootstrap interval over groups and a permutation p-value by
    group (:func:`_accuracy_statistics`).

    A classifier that does not fit its own training half (``config.min_train_accuracy``) did not
    train: it is retrained from another seed with twice the steps, and if no attempt trains the score
    is NaN with ``trained = False`` and a warning. An interval wholly below 0.5 means the split
    confounds (the classifier learned something that flips between the halves, such as cases) and
    warns (``warn``).

    Args:
        real, generated: images ``(N, H, W, 1)`` (uint8, or float in [0, 1]), same H and W; with
            ``paired``, the same N, aligned.
        real_groups, generated_groups: ``(N,)`` group labels (e.g. case ids) or None; with ``paired``
            only ``real_groups`` is read (the pairs share it).
        seed: seeds the halves, the classifiers and the statistics: the same inputs give the same figure.
    Returns:
        ``{"accuracy", "interval", "p_value", "fold_accuracies", "train_accuracies", "attempts",
        "trained", "paired", "num_real", "num_generated"}`` (counts of view items: patches in the
        patch view).
    """
    config = config or TwoSampleConfig()
    real8, gen8 = as_8bit(real), as_8bit(generated)
    if real8.shape[1:] != gen8.shape[1:]:
        raise ValueError(f"two_sample_test: real images are {real8.shape[1:]}, generated {gen8.shape[1:]}")
    real_units = _units(real_groups, len(real8), "real ")
    if paired:
        if len(real8) != len(gen8):
            raise ValueError(f"two_sample_test: paired sets must align, got {len(real8)} real and {len(gen8)} "
                             "generated images")
        gen_units = real_units
    else:
        gen_units = _units(generated_groups, len(gen8), "generated ")
    patches = patch_positions(real8, seed) if view == "patch" else None
    real_x, real_src = two_sample_items(real8, view, patches)
    gen_x, gen_src = two_sample_items(gen8, view, patches if paired else
                                     (patch_positions(gen8, seed) if view == "patch" else None))
    nan = {"accuracy": float("nan"), "interval": (float("nan"), float("nan")), "p_value": float("nan"),
           "trained": False, "paired": paired, "num_real": len(real_x), "num_generated": len(gen_x)}
    for name, src in (("real", real_src), ("generated", gen_src)):
        if view == "patch" and len(np.unique(src)) < 2:
            warnings.warn(f"two_sample_test: only {len(np.unique(src))} of the {name} images hold a head to cut "
                          "patches from (a patch lies wholly inside the head): no patch view (NaN)", RuntimeWarning,
                          stacklevel=2)
            return {**nan, "fold_accuracies": [], "train_accuracies": [], "attempts": []}
    real_u, gen_u = real_units[real_src], gen_units[gen_src]
    units = np.r_[real_u, gen_u]
    labels = np.r_[np.zeros(len(real_x), np.int64), np.ones(len(gen_x), np.int64)]
    said = np.zeros(len(units))
    folds, train_accs, attempts = [], [], []
    for repeat in range(config.repeats):
        rng = np.random.default_rng([int(seed), 2, repeat])
        if paired:
            a = _two_halves(units, rng)
        else:
            a = np.r_[_two_halves(real_u, rng), _two_halves(gen_u, rng)]
        for label, name in ((0, "real"), (1, "generated")):
            side = a[labels == label]
            if min(side.sum(), (~side).sum()) < 2:
                raise ValueError(f"two_sample_test: the {name} images do not split into two halves of at least 2 "
                                 f"(got {side.sum()} and {(~side).sum()} in the {view} view; at least two groups "
                                 "are needed)")
        for fold, train in enumerate((a, ~a)):
            model, train_acc, tries = _fit_two_sample_classifier(
                np.concatenate([real_x, gen_x])[train], labels[train], config, seed=[int(seed), repeat, fold])
            train_accs.append(train_acc)
            attempts.append(tries)
            if model is None:
                folds.append(float("nan"))
                continue
            logits = _logits(model, np.concatenate([real_x, gen_x])[~train])
            folds.append(_balanced_accuracy(labels[~train], logits))
            said[~train] += (logits > 0) / config.repeats
    out = {**nan, "fold_accuracies": folds, "train_accuracies": train_accs, "attempts": attempts}
    if not np.all(np.isfinite(folds)):
        warnings.warn(f"two_sample_test: the classifier did not fit its training half to balanced accuracy "
                      f"{config.min_train_accuracy} in {config.restarts} attempts (reached {train_accs}); "
                      "no accuracy is reported (NaN), since an untrained classifier's 0.5 would read as "
                      "'indistinguishable'", RuntimeWarning, stacklevel=2)
        return out
    accuracy, interval, p = _accuracy_statistics(units, labels, said, paired, config,
                                                 np.random.default_rng([int(seed), 5]))
    if warn and interval[1] < 0.5:
        warnings.warn(f"two_sample_test: accuracy {accuracy:.2f} with its interval {interval[0]:.2f}-"
                      f"{interval[1]:.2f} wholly below chance ({view} view): the halves confound (the classifier "
                      "learned something that flips between them, such as the cases on each side); this is a "
                      "defect of the split, not a result", RuntimeWarning, stacklevel=2)
    return {**out, "accuracy": accuracy, "interval": interval, "p_value": p, "trained": True}


def two_sample_unavailable(splits) -> str | None:
    """Why :func:`two_sample_scores` cannot run on these splits (one line), or None when it can."""
    from dataset import case_groups

    for name in ("test", "validate"):
        cases = len(set(case_groups(splits[name])))
        if cases < 2:
            return (f"the {name} split holds {cases} case(s); the two-sample test splits real slices by case and "
                    "needs at least 2 there")
    return None


def _blur(images, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(as_8bit(images), sigma=(0, sigma, sigma, 0))


def two_sample_scores(splits, reconstructions=None, samples=None, seed: int = 0, views=VIEWS,
                      config: TwoSampleConfig | None = None, progress: bool = True, floor: bool = True,
                      power=True, validate_reconstructions=None) -> dict[str, Any]:
    """The two-sample test of a run on each view: its floor, its power, its reconstructions, its samples.

    Rows (keys ``two_sample_<row>_<view>``, each with ``..._interval`` ``[low, high]`` and ``..._p``):

    * ``real_validate`` (``floor``): validation slices vs as many test slices, unpaired: two sets of
      real cases, the level a perfect generator reaches (0.40-0.60 expected);
    * the power rows of :data:`POWER_ROWS` (``power``: True for all, or the names of some):
      ``blurred_real`` and ``half_blurred_real``,
      test slices vs the same slices blurred by 1 and 0.5 px, paired; ``blurred_validate``, test
      slices vs as many validate slices blurred by 1 px, unpaired (as samples are). ``half_blurred_real``
      runs on the full view only. Below ``min_full`` on the full slice a warning says the test lacks
      the power to call anything indistinguishable;
    * ``reconstructions``: test slices vs their reconstructions, **paired by case**: the decoder alone;
    * ``samples``: every validate and test slice vs the samples, unpaired;
    * ``samples_reconstructions``: the samples vs the reconstructions of the test (and, given
      ``validate_reconstructions``, validate) slices: both through the same decoder, so only the code
      grids differ: the prior alone.

    Args:
        splits: ``{"validate", "test"} -> dataset.Split``.
        reconstructions: the VQ-VAE's reconstructions of ``splits["test"].images``, aligned, or None.
        samples: float ``(N, H, W, 1)`` generated slices, or None (at most as many as the real slices
            are used; the rows above use as many real slices as samples where there are fewer).
        validate_reconstructions: reconstructions of ``splits["validate"].images``, aligned, or None.
        views: any of :data:`VIEWS`.
    Returns:
        ``{key: accuracy, key_interval: [low, high], key_p: p}`` (NaN where a classifier did not train).
    """
    from tqdm import tqdm

    from dataset import case_groups

    reason = two_sample_unavailable(splits)
    if reason:
        raise ValueError(f"two_sample_scores: {reason}")
    test, val = splits["test"], splits["validate"]
    test_groups, val_groups = np.asarray(case_groups(test)), np.asarray(case_groups(val))
    rng = np.random.default_rng([int(seed), 3])
    n = min(len(test), len(val))
    t_pick, v_pick = (np.sort(rng.choice(len(s), n, replace=False)) for s in (test, val))
    rows = {}  # name -> (real, generated, real groups, generated groups, paired, views)
    if floor:
        rows["real_validate"] = (test.images[t_pick], val.images[v_pick], test_groups[t_pick], val_groups[v_pick],
                                 False, views)
    power = tuple(POWER_ROWS) if power is True else tuple(power or ())
    for name in power:
        if name not in POWER_ROWS:
            raise ValueError(f"two_sample_scores: power rows are {tuple(POWER_ROWS)}, got {name!r}")
    for name in power:
        row = POWER_ROWS[name]
        row_views = views if name in VIEW_POWER_ROWS else [v for v in views if v == "full"]
        if row["paired"]:
            rows[name] = (test.images, _blur(test.images, row["blur"]), test_groups, None, True, row_views)
        else:
            rows[name] = (test.images[t_pick], _blur(val.images[v_pick], row["blur"]), test_groups[t_pick],
                          val_groups[v_pick], False, row_views)
    if reconstructions is not None:
        if len(reconstructions) != len(test):
            raise ValueError(f"two_sample_scores: {len(reconstructions)} reconstructions for {len(test)} test slices")
        rows["reconstructions"] = (test.images, reconstructions, test_groups, None, True, views)
    if validate_reconstructions is not None and len(validate_reconstructions) != len(val):
        raise ValueError(f"two_sample_scores: {len(validate_reconstructions)} validate reconstructions for "
                         f"{len(val)} validate slices")
    if samples is not None:
        real = np.concatenate([val.images, test.images])
        groups = np.r_[val_groups, test_groups]
        m = min(len(real), len(samples))
        pick = np.sort(rng.choice(len(real), m, replace=False))
        rows["samples"] = (real[pick], as_8bit(samples[:m]), groups[pick], None, False, views)
        if reconstructions is not None:
            recon = as_8bit(reconstructions)
            recon_groups = test_groups
            if validate_reconstructions is not None:
                recon = np.concatenate([as_8bit(validate_reconstructions), recon])
                recon_groups = groups
            m = min(len(recon), len(samples))
            pick = np.sort(rng.choice(len(recon), m, replace=False))
            rows["samples_reconstructions"] = (recon[pick], as_8bit(samples[:m]), recon_groups[pick], None, False,
                                               views)
    out: dict[str, Any] = {}
    bar = tqdm(total=sum(len(r[-1]) for r in rows.values()), desc="two-sample test", unit="test",
               disable=not progress)
    for name, (real, fake, real_groups, fake_groups, paired, row_views) in rows.items():
        for view in row_views:
            result = two_sample_test(real, fake, real_groups, fake_groups, seed=seed, config=config, view=view,
                                     paired=paired)
            key = f"two_sample_{name}_{view}"
            out[key] = result["accuracy"]
            out[f"{key}_interval"] = [float(v) for v in result["interval"]]
            out[f"{key}_p"] = result["p_value"]
            bar.update()
    bar.close()
    for name in power:
        row = POWER_ROWS[name]
        seen = out.get(f"two_sample_{name}_full", 1.0)
        if seen < row["min_full"]:  # NaN (a classifier that did not train) has warned already
            warnings.warn(f"two_sample_scores: the classifier told real test slices from "
                          f"{'the same' if row['paired'] else 'validate'} slices blurred by {row['blur']:g} px only "
                          f"{seen:.2f} of the time (< {row['min_full']}, {name}): it lacks the power to call the "
                          "generated slices indistinguishable; give it more slices or steps (TwoSampleConfig)",
                          RuntimeWarning, stacklevel=2)
    return out


# The rows of :func:`two_sample_table`, in order: key, what the row compares, what it measures.
TABLE_ROWS = (
    ("real_validate", "real validate vs real test", "floor: two sets of real cases (0.40-0.60)"),
    ("blurred_real", "real vs the same slices blurred 1 px, paired", "power (full: >= 0.95)"),
    ("half_blurred_real", "real vs the same slices blurred 0.5 px, paired", "power (full: >= 0.75)"),
    ("blurred_validate", "real test vs validate slices blurred 1 px", "power, unpaired (full: >= 0.85)"),
    ("reconstructions", "reconstructions vs their real slices, paired", "the decoder"),
    ("samples", "samples vs real validate and test slices", "the whole model"),
    ("samples_reconstructions", "samples vs reconstructions of real slices", "the prior alone"),
)


def two_sample_table(scores, views=VIEWS) -> str:
    """The scores of :func:`two_sample_scores` as a Markdown table: a row per comparison, a column per view,
    each cell ``accuracy (low-high)``; rows and views that were not run are left out."""
    views = [v for v in views if any(k.startswith("two_sample_") and k.endswith(f"_{v}") for k in scores)]
    lines = ["| comparison | reads as | " + " | ".join(views) + " |", "| --- | --- |" + " --- |" * len(views)]
    for row, label, reads in TABLE_ROWS:
        cells = []
        for view in views:
            key = f"two_sample_{row}_{view}"
            if key not in scores:
                cells.append("-")
                continue
            lo, hi = scores.get(f"{key}_interval", (float("nan"), float("nan")))
            cells.append(f"{scores[key]:.2f} ({lo:.2f}-{hi:.2f})")
        if any(c != "-" for c in cells):
            lines.append(f"| {label} | {reads} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
