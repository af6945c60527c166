"""The segmenter: a small U-Net, trained only on real training slices and their tissue masks.

It labels every pixel of a slice background, CSF, grey or white matter (``dataset.TISSUES``), the
four classes of OASIS's ``keras_png_slices_seg_*`` masks. Like the judge (``judge.py``) it is a
referee that never sees a sample: ``train_segmenter`` accepts nothing but the dataset's splits of
real PNG slices with their masks, so it cannot be tuned toward the generator. It serves twice:

* ``predict.py segment --images DIR`` writes masks in OASIS's format (``seg_`` names, grey levels
  0/85/170/255) for any folder of slices: a tissue segmenter for real OASIS users;
* the anatomy judge (``anatomy.py``, through ``predict.py evaluate``) segments samples,
  reconstructions and real slices alike and compares tissue areas, fragmentation, ventricles, its
  confidence and the Frechet distance of its bottleneck features (``segmenter_outputs``).

``train.py`` trains it after the judge (``--segmenter-epochs``; ``--stage segmenter`` for an existing
run) when the data has masks, and saves it as ``segmenter.keras``: built from stock Keras layers,
it loads with ``keras.models.load_model`` and no custom objects. Its per-class Dice on the real
test split goes into ``metrics.json``.

The U-Net is Ronneberger et al. 2015 ("U-Net: convolutional networks for biomedical image
segmentation"), shrunk: ``depth`` poolings, two 3x3 convolutions per level, skip connections by
concatenation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

NUM_TISSUES = 4  # background, CSF, grey matter, white matter (dataset.TISSUES)


def keras_serializable(fn):
    """Register ``fn`` with Keras (package ``segmenter``) so ``segmenter.keras`` loads after ``import segmenter``."""
    import keras

    return keras.saving.register_keras_serializable(package="segmenter")(fn)


@dataclass
class SegmenterConfig:
    """Settings of the segmenter and its (short) training.

    Attributes:
        image_size: side of the square input slices (the run's image size); divisible by ``2 ** depth``.
        filters: channels of the first level; doubled at each pooling.
        depth: max-poolings between the input and the bottleneck.
        crop: training sees random square crops of this fraction of the side (rounded to a multiple
            of ``2 ** depth``; 1: whole slices): 0.5 costs a quarter of a whole slice per step, and
            the network, fully convolutional, segments whole slices all the same. On the demo data
            (128 px) five epochs of half-side crops reach a test Dice of 0.91 / 0.96 / 0.98 (CSF,
            grey, white matter; ``bench/bench_segmenter.py``), as many epochs of whole slices cost four
            times as much.
        epochs: training epochs (0: no segmenter).
        batch_size: training batch size.
        learning_rate: Adam learning rate (cosine decay to 5 % of it over the planned steps).
        seed: seed of the weights and the data order.
    """

    image_size: int = 128
    filters: int = 8
    depth: int = 3
    crop: float = 0.5
    epochs: int = 5
    batch_size: int = 8
    learning_rate: float = 3e-3
    seed: int = 0

    def __post_init__(self):
        for name in ("image_size", "filters", "depth", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SegmenterConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.epochs < 0:
            raise ValueError(f"SegmenterConfig.epochs must be 0 or more, got {self.epochs}")
        if not 0 < self.crop <= 1:
            raise ValueError(f"SegmenterConfig.crop must lie in (0, 1], got {self.crop}")
        if self.image_size % (2 ** self.depth):
            raise ValueError(f"SegmenterConfig: image_size {self.image_size} must be divisible by 2 ** depth "
                             f"= {2 ** self.depth}")

    @property
    def crop_size(self) -> int:
        """Side of the training crops in pixels (a multiple of ``2 ** depth``, at most ``image_size``)."""
        unit = 2 ** self.depth
        return int(min(self.image_size, max(unit, round(self.crop * self.image_size / unit) * unit)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SegmenterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"SegmenterConfig: unknown settings {unknown}")
        return cls(**values)


@keras_serializable
def tissue_loss(y_true, y_pred):
    """Cross-entropy plus the soft Dice loss of the three tissues (Milletari et al. 2016, V-Net).

    The Dice term weighs each tissue alike however few its pixels (CSF is ~5 % of a slice), which
    the pixel-wise cross-entropy alone does not. Args: ``y_true`` int ``(B, H, W)``, ``y_pred``
    probabilities ``(B, H, W, 4)``. Returns: ``(B,)``.
    """
    from keras import ops

    y_true = ops.cast(y_true, "int32")
    ce = ops.mean(ops.sparse_categorical_crossentropy(y_true, y_pred), axis=(1, 2))
    onehot = ops.one_hot(y_true, NUM_TISSUES)[..., 1:]
    p = y_pred[..., 1:]
    inter = ops.sum(onehot * p, axis=(1, 2))
    total = ops.sum(onehot + p, axis=(1, 2))
    dice = (2.0 * inter + 1.0) / (total + 1.0)  # per slice and tissue; +1: a tissue absent from both scores 1
    return ce + 1.0 - ops.mean(dice, axis=-1)


def build_segmenter(config: SegmenterConfig, steps: int | None = None):
    """The U-Net as a compiled functional ``keras.Model``: image ``(B, S, S, 1)`` in [0, 1] -> tissue
    probabilities ``(B, S, S, 4)`` (softmax, float32).

    The layer named ``bottleneck`` is the deepest feature map ``(B, S / 2**depth, S / 2**depth,
    filters * 2**depth)``; its spatial mean is the feature vector of :func:`segmenter_outputs`.
    ``steps``: the planned optimiser steps, for the cosine decay of the learning rate (None: constant).
    """
    import keras
    from keras import layers

    c = config

    def block(x, width, name):
        for i in (1, 2):  # batch normalisation: a few hundred steps are all the training it gets
            x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
            x = layers.BatchNormalization(momentum=0.9, name=f"{name}_norm{i}")(x)
            x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
        return x

    inputs = keras.Input((None, None, 1), name="image")  # any side divisible by 2 ** depth
    x, skips = inputs, []
    for level in range(c.depth):
        x = block(x, c.filters * 2 ** level, f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{level}")(x)
    x = block(x, c.filters * 2 ** c.depth, "mid")
    x = layers.Activation("linear", name="bottleneck")(x)
    for level in reversed(range(c.depth)):
        x = layers.UpSampling2D(2, name=f"up{level}")(x)
        x = layers.Concatenate(name=f"skip{level}")([x, skips[level]])
        x = block(x, c.filters * 2 ** level, f"dec{level}")
    outputs = layers.Conv2D(NUM_TISSUES, 1, activation="softmax", dtype="float32", name="tissue_probabilities")(x)
    model = keras.Model(inputs, outputs, name="segmenter")
    lr = c.learning_rate if not steps else keras.optimizers.schedules.CosineDecay(c.learning_rate, steps, alpha=0.05)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=tissue_loss,
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model


def _check_real(split) -> None:
    import dataset

    if not isinstance(split, dataset.Split):
        raise TypeError(f"the segmenter trains only on real slices (a dataset.Split), got {type(split).__name__}")
    if split.masks is None:
        raise ValueError("the segmenter needs the split's tissue masks: read the data with "
                         "dataset.read_oasis(..., masks=True)")


def segmenter_dataset(split, batch_size: int, shuffle: bool = False, seed: int = 0, crop: int | None = None):
    """``tf.data`` of ``(image float32 (B, S, S, 1) in [0, 1], labels uint8 (B, S, S))`` from a real split.

    Args:
        split: a ``dataset.Split`` read with ``masks=True``; nothing else is accepted, so generated
            images cannot reach the segmenter's training.
        crop: a side in pixels: each slice and its mask are cropped alike at a random place (seeded).
    """
    import tensorflow as tf

    _check_real(split)
    ds = tf.data.Dataset.from_tensor_slices((split.images, split.masks))
    if shuffle:
        ds = ds.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    if crop and crop < split.images.shape[1]:
        def cut(x, y):  # one window for the slice and its mask
            both = tf.concat([x, y[..., None]], axis=-1)
            both = tf.image.random_crop(both, (crop, crop, 2), seed=seed)
            return both[..., :1], both[..., 1]

        ds = ds.map(cut, num_parallel_calls=tf.data.AUTOTUNE)
    return (ds.batch(batch_size)
            .map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y), num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))


def train_segmenter(train, validate=None, config: SegmenterConfig | None = None, callbacks=(), verbose: int = 0):
    """Fit a fresh segmenter on real training slices and masks (``validate`` only scores it per epoch).

    Args:
        train, validate: ``dataset.Split`` of real slices read with masks (see :func:`segmenter_dataset`).
        config: its settings; ``image_size`` must be the slices' side.
        callbacks: Keras callbacks for ``fit`` (``train.py`` passes a ``CSVLogger``).
    Returns:
        The trained ``keras.Model``.
    """
    import keras

    config = config or SegmenterConfig()
    for split in (train, validate):
        if split is not None:
            _check_real(split)
    if len(train) == 0:
        raise ValueError("segmenter: the training split is empty")
    if train.images.shape[1:3] != (config.image_size, config.image_size):
        raise ValueError(f"segmenter: slices are {train.images.shape[2]}x{train.images.shape[1]} but "
                         f"SegmenterConfig.image_size is {config.image_size}")
    keras.utils.set_random_seed(config.seed)
    steps = config.epochs * -(-len(train) // config.batch_size)
    model = build_segmenter(config, steps=steps)
    val = segmenter_dataset(validate, config.batch_size) if validate is not None and len(validate) else None
    model.fit(segmenter_dataset(train, config.batch_size, shuffle=True, seed=config.seed, crop=config.crop_size),
              validation_data=val,
              epochs=config.epochs, callbacks=list(callbacks), verbose=verbose,
              shuffle=False)  # the tf.data pipeline shuffles
    return model


def segmenter_outputs(segmenter, images, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The segmenter's tissue probabilities and bottleneck features of each image.

    Args:
        images: float ``(N, S, S, 1)`` in [0, 1] (or uint8, read as ``pixel / 255``).
    Returns:
        ``(probabilities float32 (N, S, S, 4), features float64 (N, D))``; the features are the
        bottleneck's spatial mean (``D = filters * 2 ** depth``).
    """
    import keras

    both = keras.Model(segmenter.input, [segmenter.output, segmenter.get_layer("bottleneck").output])
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    probs, feats = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        x = np.divide(x, 255, dtype=np.float32) if x.dtype == np.uint8 else x.astype(np.float32)
        p, f = both(x, training=False)
        probs.append(np.asarray(p, np.float32))
        feats.append(np.asarray(f, np.float64).mean(axis=(1, 2)))
    if not probs:
        return np.zeros((0,) + tuple(segmenter.output.shape[1:]), np.float32), np.zeros((0, 0))
    return np.concatenate(probs), np.concatenate(feats)


def segment(segmenter, images, batch_size: int = 64) -> np.ndarray:
    """Tissue labels ``uint8 (N, S, S)`` (0..3, ``dataset.TISSUES``): the most probable tissue per pixel."""
    probs, _ = segmenter_outputs(segmenter, images, batch_size)
    return np.argmax(probs, axis=-1).astype(np.uint8)
