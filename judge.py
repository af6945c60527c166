"""The judge: a small CNN, trained only on real training slices, that predicts a slice's position.

It is an independent referee of generated slices, in the role Inception plays for FID: it never
sees a sample (``train_judge`` takes nothing but dataset splits of real PNG slices), so it cannot
be tuned toward the generator. ``predict.py evaluate`` uses it twice:

* its penultimate features (``features``, ``feature_dim`` numbers per image) for the Frechet
  distance and the k-NN precision / recall between samples and real test slices
  (``evaluation.frechet_distance``, ``evaluation.precision_recall``);
* its predicted slice position, compared with the position a conditioned prior was asked for
  (slice agreement).

``train.py`` trains it after the prior (``--judge-epochs``; ``--stage judge`` for an existing run)
and saves it as ``judge.keras``: built from stock Keras layers, it loads with
``keras.models.load_model`` and no custom objects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class JudgeConfig:
    """Settings of the judge and its (short) training.

    Attributes:
        image_size: side of the square input slices (the run's image size).
        num_slices: number of slice positions it classifies (largest slice index + 1).
        filters: channels of the first convolution; doubled at each of the next two down-samplings.
        feature_dim: width of the penultimate layer, the features used for Frechet distance and
            precision / recall.
        epochs: training epochs (0: no judge).
        batch_size: training batch size.
        learning_rate: Adam learning rate.
        seed: seed of the weights and the data order.
    """

    image_size: int = 128
    num_slices: int = 1
    filters: int = 16
    feature_dim: int = 64
    epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        for name in ("image_size", "num_slices", "filters", "feature_dim", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"JudgeConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.epochs < 0:
            raise ValueError(f"JudgeConfig.epochs must be 0 or more, got {self.epochs}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> JudgeConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"JudgeConfig: unknown settings {unknown}")
        return cls(**values)


def build_judge(config: JudgeConfig):
    """The judge as a compiled functional ``keras.Model``: image ``(B, S, S, 1)`` -> logits ``(B, num_slices)``.

    Stride-2 3x3 convolutions halve the image until it is at most 4x4 (five at 128x128); the
    flattened map keeps where things are (slice position is mostly the brain's outline and size,
    which a global average would blur). No augmentation layer: Keras' random layers default to
    ``training=True`` when the model is called directly, which would make ``judge(x)`` random.
    The Dense layer named ``features`` is the penultimate layer.
    """
    import keras
    from keras import layers

    c = config
    inputs = keras.Input((c.image_size, c.image_size, 1), name="image")
    x, side, width, k = inputs, c.image_size, c.filters, 0
    while side > 4:
        x = layers.Conv2D(width, 3, strides=2, padding="same", activation="relu", name=f"conv{k}")(x)
        side, k = (side + 1) // 2, k + 1
        width = min(width * 2, 4 * c.filters)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(c.feature_dim, activation="relu", name="features")(x)
    outputs = layers.Dense(c.num_slices, dtype="float32", name="slice_logits")(x)
    model = keras.Model(inputs, outputs, name="judge")
    model.compile(optimizer=keras.optimizers.Adam(c.learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model


def judge_dataset(split, batch_size: int, shuffle: bool = False, seed: int = 0):
    """``tf.data`` of ``(image float32 (B, S, S, 1) in [0, 1], slice index int32 (B,))`` from a real split.

    Args:
        split: a ``dataset.Split`` (uint8 PNG slices and their parsed slice indices); nothing else
            is accepted, so generated images cannot reach the judge's training.
    """
    import tensorflow as tf

    import dataset

    if not isinstance(split, dataset.Split):
        raise TypeError(f"the judge trains only on real slices (a dataset.Split), got {type(split).__name__}")
    ds = tf.data.Dataset.from_tensor_slices((split.images, np.asarray(split.slice_indices, np.int32)))
    if shuffle:
        ds = ds.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    return (ds.batch(batch_size)
            .map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y), num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))


def train_judge(train, validate=None, config: JudgeConfig | None = None, callbacks=(), verbose: int = 0):
    """Fit a fresh judge on real training slices (``validate`` only scores it after each epoch).

    Args:
        train, validate: ``dataset.Split`` of real slices (see :func:`judge_dataset`).
        config: its settings; ``num_slices`` must exceed every slice index of ``train``.
        callbacks: Keras callbacks for ``fit`` (``train.py`` passes a ``CSVLogger``).
    Returns:
        The trained ``keras.Model``.
    """
    import keras

    import dataset

    config = config or JudgeConfig()
    for split in (train, validate):
        if split is not None and not isinstance(split, dataset.Split):
            raise TypeError(f"the judge trains only on real slices (a dataset.Split), got {type(split).__name__}")
    for name, split in (("train", train), ("validate", validate)):
        if split is not None and len(split) and int(np.max(split.slice_indices)) >= config.num_slices:
            raise ValueError(f"judge: the {name} split has slice index {int(np.max(split.slice_indices))}, "
                             f"but JudgeConfig.num_slices is {config.num_slices}")
    keras.utils.set_random_seed(config.seed)
    model = build_judge(config)
    val = judge_dataset(validate, config.batch_size) if validate is not None and len(validate) else None
    model.fit(judge_dataset(train, config.batch_size, shuffle=True, seed=config.seed), validation_data=val,
              epochs=config.epochs, callbacks=list(callbacks), verbose=verbose,
              shuffle=False)  # the tf.data pipeline shuffles
    return model


def judge_outputs(judge, images, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The judge's penultimate features and predicted slice position of each image.

    Args:
        images: float ``(N, S, S, 1)`` in [0, 1] (or uint8, read as ``pixel / 255``).
    Returns:
        ``(features float64 (N, feature_dim), predicted slice int64 (N,))`` -- the slice is the
        arg-max of the logits.
    """
    import keras

    both = keras.Model(judge.input, [judge.get_layer("features").output, judge.output])
    images = np.asarray(images)
    feats, slices = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        x = np.divide(x, 255, dtype=np.float32) if x.dtype == np.uint8 else x.astype(np.float32)
        f, logits = both(x, training=False)
        feats.append(np.asarray(f, np.float64))
        slices.append(np.argmax(np.asarray(logits), axis=-1))
    return np.concatenate(feats), np.concatenate(slices)
