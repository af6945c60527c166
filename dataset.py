"""OASIS brain-MRI slices: PNG loading, tf.data pipelines, an embedded demo set, raw-volume preparation.

Data layout (the "Keras OASIS" PNG release, which this module reads and also writes)::

    ROOT/keras_png_slices_train/case_001_slice_0.nii.png     256x256 8-bit grayscale, black background
    ROOT/keras_png_slices_validate/...                        optional: made from train by case if absent
    ROOT/keras_png_slices_test/...
    ROOT/keras_png_slices_seg_*/...                           segmentation masks: never read as images

Two views of the same data:

* ``read_split`` / ``read_oasis`` return :class:`Split` objects: ``uint8`` images ``(N, H, W, 1)`` plus file
  names, case ids and slice indices. Full OASIS is ~630 MB as uint8 (2.5 GB as float32), so training keeps
  uint8 in memory and ``to_dataset`` normalises each batch inside the tf.data pipeline.
* ``load_images`` / ``load_oasis`` return float32 arrays in ``[0, 1]`` (``pixel / 255``) for small sets and
  notebooks; the metadata rides along (``return_info=True`` / ``OasisSplits.info``).

Reading rules (every conversion is counted in a :class:`LoadReport` and announced with a
:class:`DatasetWarning`; nothing is dropped silently):

* Only ``*.png`` files are images; any other entry in a split folder is ignored, counted and reported.
* Files are ordered by name with numbers compared as numbers (``slice_2`` before ``slice_10``).
* 8-bit grayscale PNGs are used as they are. RGB/RGBA/palette/other 8-bit modes are converted to
  grayscale with PIL's ITU-R 601-2 luma (``L = 0.299 R + 0.587 G + 0.114 B``; alpha is ignored).
  16-bit (and 32-bit integer/float) PNGs are scaled by their own min..max range to 0..255 (so to
  ``[0, 1]`` as float); a constant image becomes all zeros.
* ``image_size=S`` resizes every image to ``S x S`` with PIL's Lanczos filter (``Image.LANCZOS``, a
  windowed sinc whose support widens with the scale factor, so downsampling is antialiased). Without
  ``image_size`` all images must share one size.
* Names that are not ``case_<id>_slice_<k>...`` are still loaded, with ``case_id = slice_index = -1``
  (see :data:`UNKNOWN`). For the case-wise validation split each such file is its own group, because its
  subject is unknown.
* Corrupt, truncated or zero-byte PNGs, mixed sizes, and empty or missing split folders raise
  :class:`DatasetError` with a one-line message naming the file or folder and the fix.

Command line: ``python dataset.py --help`` (subcommands ``demo``, ``prepare``, ``check``).
Nothing runs on import; TensorFlow, nibabel and matplotlib are imported only by the functions that use them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

SPLITS = ("train", "validate", "test")
SPLIT_DIRS = {name: f"keras_png_slices_{name}" for name in SPLITS}
IMAGE_SUFFIX = ".png"
UNKNOWN = -1  # case id / slice index of a file whose name is not case_<id>_slice_<k>
RESIZE_FILTER = "LANCZOS"  # PIL filter used for every resize in this module
DEFAULT_DEMO_ROOT = Path(__file__).resolve().parent / "data" / "oasis_demo"
DEMO_MARKER = "demo.json"  # written last by make_demo_dataset: its presence means the tree is complete
DEMO_VERSION = 1  # bump when the demo generator changes, so ensure_demo_dataset rebuilds old trees
DEMO_DEFAULTS = dict(n_train=20, n_validate=4, n_test=4, slices_per_case=32, image_size=256, seed=0)
MNI_TEMPLATE_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"  # ships inside nilearn

_NAME_RE = re.compile(r"case_(\d+)_slice_(\d+)(?!\d)", re.IGNORECASE)
_OASIS_SUBJECT_RE = re.compile(r"OAS1_(\d+)", re.IGNORECASE)
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class DatasetError(ValueError):
    """Bad input data. The message is one line naming the file or folder and what to do about it."""


class DatasetWarning(UserWarning):
    """A documented conversion was applied to some input files (counts in the message)."""


# ----------------------------------------------------------------------------------------------
# Containers
# ----------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What ``read_split`` did to one folder beyond plain 8-bit decoding. Lists hold file names."""

    folder: str
    ignored: list[str] = field(default_factory=list)  # non-PNG entries, skipped
    converted_to_gray: list[str] = field(default_factory=list)  # RGB/RGBA/palette/... -> luma
    rescaled_high_depth: list[str] = field(default_factory=list)  # 16-bit etc., own min..max -> 0..255
    unparsed_names: list[str] = field(default_factory=list)  # case_id = slice_index = UNKNOWN
    resized: int = 0  # images resized to image_size

    def messages(self) -> list[str]:
        """One line per non-empty category (what the warnings say)."""
        out = []
        if self.ignored:
            out.append(f"{self.folder}: ignored {len(self.ignored)} non-PNG entr{'y' if len(self.ignored) == 1 else 'ies'}"
                       f" (e.g. {self.ignored[0]!r}); only *.png files are read")
        if self.converted_to_gray:
            out.append(f"{self.folder}: converted {len(self.converted_to_gray)} color/alpha PNG(s) to grayscale "
                       f"(ITU-R 601-2 luma, alpha ignored; e.g. {self.converted_to_gray[0]!r})")
        if self.rescaled_high_depth:
            out.append(f"{self.folder}: scaled {len(self.rescaled_high_depth)} 16-bit/high-depth PNG(s) by their own "
                       f"min..max to 0..255 (e.g. {self.rescaled_high_depth[0]!r})")
        if self.unparsed_names:
            out.append(f"{self.folder}: {len(self.unparsed_names)} file name(s) are not case_<id>_slice_<k>.png "
                       f"(e.g. {self.unparsed_names[0]!r}); loaded with case_id = slice_index = {UNKNOWN}")
        return out


@dataclass
class SplitInfo:
    """Per-image metadata of one split, aligned with its image array."""

    names: list[str]
    case_ids: np.ndarray  # int64 (N,), UNKNOWN where the name does not parse
    slice_indices: np.ndarray  # int64 (N,), UNKNOWN where the name does not parse
    report: LoadReport | None = None

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class Split:
    """One split held as uint8: ``images`` (N, H, W, 1) plus per-image names, case ids, slice indices."""

    images: np.ndarray
    names: list[str]
    case_ids: np.ndarray
    slice_indices: np.ndarray
    report: LoadReport | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        n = len(self.images)
        if not (len(self.names) == len(self.case_ids) == len(self.slice_indices) == n):
            raise ValueError(f"Split: {n} images but {len(self.names)} names, {len(self.case_ids)} case ids, "
                             f"{len(self.slice_indices)} slice indices")

    def __len__(self) -> int:
        return len(self.images)

    def float(self) -> np.ndarray:
        """Images as float32 ``(N, H, W, 1)`` in ``[0, 1]``: exactly ``pixel / 255``."""
        return np.divide(self.images, 255, dtype=np.float32)

    @property
    def info(self) -> SplitInfo:
        return SplitInfo(self.names, self.case_ids, self.slice_indices, self.report)

    def subset(self, index) -> Split:
        """The images at ``index`` (integer array or boolean mask), metadata kept aligned."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return Split(self.images[index], [self.names[i] for i in index], self.case_ids[index],
                     self.slice_indices[index], self.report)


class OasisSplits(dict):
    """``{"train", "validate", "test"} -> float32 (N, H, W, 1)`` in ``[0, 1]``; ``.info[split]`` holds
    the :class:`SplitInfo` (names, case ids, slice indices, load report) aligned with each array."""

    def __init__(self, arrays: dict[str, np.ndarray], info: dict[str, SplitInfo]):
        super().__init__(arrays)
        self.info = info


# ----------------------------------------------------------------------------------------------
# Reading PNG splits
# ----------------------------------------------------------------------------------------------


def parse_slice_name(name: str) -> tuple[int, int]:
    """``"case_011_slice_12.nii.png"`` -> ``(11, 12)``; a name without that pattern -> ``(-1, -1)``."""
    m = _NAME_RE.search(name)
    return (int(m.group(1)), int(m.group(2))) if m else (UNKNOWN, UNKNOWN)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)], name


def _num_workers() -> int:
    # PIL releases the GIL while inflating, so one thread more than cores keeps both cores busy.
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores + 1))


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _read_png(path: Path, image_size: int | None) -> tuple[np.ndarray, str, bool]:
    """Decode one PNG to uint8 ``(H, W)``. Returns ``(array, kind, resized)``, kind in gray/color/deep."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise DatasetError(f"{path}: is {im.format}, not PNG; convert it to an 8-bit grayscale PNG")
            im.load()
            if im.mode == "L":
                kind, a = "gray", np.asarray(im)
            elif im.mode in _HIGH_DEPTH_MODES:
                kind, a = "deep", _rescale_to_uint8(np.asarray(im))
            else:
                kind, a = "color", np.asarray(im.convert("L"))
    except DatasetError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error... for bad files
        if path.is_file() and path.stat().st_size == 0:  # checked only on failure: one syscall less per image
            raise DatasetError(f"{path}: empty file (0 bytes); delete it or export the slice again") from None
        raise DatasetError(f"{path}: not a readable PNG ({_one_line(e)}); export the file again or delete it") from None
    resized = False
    if image_size is not None and a.shape != (image_size, image_size):
        a = np.asarray(Image.fromarray(a).resize((image_size, image_size), getattr(Image.Resampling, RESIZE_FILTER)))
        resized = True
    return a, kind, resized


def _rescale_to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale by the image's own min..max to 0..255 (rounded); a constant image becomes zeros."""
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _list_pngs(folder: Path) -> tuple[list[Path], list[str]]:
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "folder not found"
        raise DatasetError(f"{folder}: {what}; expected a folder of PNG slices such as case_001_slice_0.nii.png")
    pngs, ignored = [], []
    for entry in os.scandir(folder):
        if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIX):
            pngs.append(Path(entry.path))
        else:
            ignored.append(entry.name)
    if not pngs:
        extra = f" (it holds {len(ignored)} other entries)" if ignored else ""
        raise DatasetError(f"{folder}: no .png images{extra}; put the PNG slices (case_001_slice_0.nii.png, ...) there")
    pngs.sort(key=lambda p: _natural_key(p.name))
    return pngs, sorted(ignored, key=_natural_key)


def read_split(folder: str | os.PathLike, image_size: int | None = None) -> Split:
    """Read one folder of PNG slices as uint8.

    Args:
        folder: a folder of ``*.png`` files (other entries are ignored and reported).
        image_size: resize every image to ``image_size x image_size`` (Lanczos); ``None`` keeps the size,
            which must then be the same for all images.
    Returns:
        A :class:`Split`: ``images`` uint8 ``(N, H, W, 1)`` in file-name order, ``names``, ``case_ids`` and
        ``slice_indices`` (int64, ``-1`` where the name does not parse), and a :class:`LoadReport`.
    Raises:
        DatasetError: missing/empty folder, a corrupt, truncated or zero-byte PNG, mixed sizes.
    """
    folder = Path(folder)
    if image_size is not None and int(image_size) < 1:
        raise DatasetError(f"image_size must be a positive integer, got {image_size}")
    paths, ignored = _list_pngs(folder)
    n = len(paths)
    first, kind0, resized0 = _read_png(paths[0], image_size)
    h, w = first.shape
    images = np.empty((n, h, w, 1), np.uint8)
    images[0, :, :, 0] = first
    kinds = np.empty(n, dtype=object)
    kinds[0] = kind0
    resized = np.zeros(n, bool)
    resized[0] = resized0

    def decode(bounds):  # fills images[lo:hi]; returns the first wrong-sized file (index, shape) or None
        lo, hi = bounds
        for i in range(lo, hi):
            a, kinds[i], resized[i] = _read_png(paths[i], image_size)
            if a.shape != (h, w):
                return i, a.shape
            images[i, :, :, 0] = a
        return None

    step = 64
    chunks = [(lo, min(lo + step, n)) for lo in range(1, n, step)]
    pool = ThreadPoolExecutor(_num_workers())
    try:
        for bad in pool.map(decode, chunks):  # in order, so the first bad file in name order is reported
            if bad is not None:
                i, shape = bad
                raise DatasetError(
                    f"{folder}: images differ in size: {paths[0].name} is {w}x{h} but {paths[i].name} is "
                    f"{shape[1]}x{shape[0]}; pass image_size (--image-size) to resize all images to one square size")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

    names = [p.name for p in paths]
    parsed = np.array([parse_slice_name(s) for s in names], dtype=np.int64).reshape(n, 2)
    report = LoadReport(
        folder=str(folder), ignored=ignored,
        converted_to_gray=[s for s, k in zip(names, kinds) if k == "color"],
        rescaled_high_depth=[s for s, k in zip(names, kinds) if k == "deep"],
        unparsed_names=[s for s, (c, _) in zip(names, parsed) if c == UNKNOWN],
        resized=int(resized.sum()))
    for message in report.messages():
        warnings.warn(DatasetWarning(message), stacklevel=2)
    return Split(images, names, parsed[:, 0].copy(), parsed[:, 1].copy(), report)


def _find_split_root(root: Path) -> Path:
    """``root`` itself, or ``root/keras_png_slices_data`` (how the OASIS archive unpacks) if that holds the splits."""
    if not (root / SPLIT_DIRS["train"]).exists() and (root / "keras_png_slices_data" / SPLIT_DIRS["train"]).is_dir():
        return root / "keras_png_slices_data"
    return root


def _group_keys(split: Split) -> list[str]:
    # Files with unknown case ids form their own groups: there is nothing to tie them to a subject.
    return [f"case {c}" if c != UNKNOWN else f"file {s}" for c, s in zip(split.case_ids, split.names)]


def split_by_case(split: Split, val_fraction: float, seed: int = 0) -> tuple[Split, Split]:
    """Hold out ``round(val_fraction * cases)`` whole cases (at least one, at most all but one).

    Cases are drawn with ``numpy.random.default_rng(seed)`` from the sorted case ids, so the result
    depends only on the set of cases and the seed. Returns ``(train, validate)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    keys = np.array(_group_keys(split))
    groups = sorted(set(keys.tolist()), key=_natural_key)
    if val_fraction == 0:
        return split, split.subset(np.zeros(len(split), bool))
    if len(groups) < 2:
        raise DatasetError(f"{split.report.folder if split.report else 'train'}: only one case, cannot hold out a "
                           "validation case; add a keras_png_slices_validate folder or pass val_fraction=0")
    n_val = int(np.clip(round(val_fraction * len(groups)), 1, len(groups) - 1))
    order = np.random.default_rng(seed).permutation(len(groups))
    held = {groups[i] for i in order[:n_val]}
    is_val = np.array([k in held for k in keys])
    return split.subset(~is_val), split.subset(is_val)


def read_oasis(root: str | os.PathLike, image_size: int | None = None, val_fraction: float = 0.2,
               seed: int = 0) -> dict[str, Split]:
    """Read ``keras_png_slices_{train,validate,test}`` under ``root`` as uint8 :class:`Split` objects.

    ``keras_png_slices_seg_*`` folders are never read. When there is no validate folder, whole cases are
    moved from train to validate (``split_by_case(train, val_fraction, seed)``) and one line says so.

    Returns:
        ``{"train": Split, "validate": Split, "test": Split}``, all with one image size.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder not found; expected a folder holding {SPLIT_DIRS['train']}/, "
                           f"{SPLIT_DIRS['test']}/ and optionally {SPLIT_DIRS['validate']}/ "
                           "(python dataset.py demo builds one)")
    root = _find_split_root(root)
    for name in ("train", "test"):
        if not (root / SPLIT_DIRS[name]).exists():
            raise DatasetError(f"{root}: no {SPLIT_DIRS[name]}/ folder; expected {SPLIT_DIRS['train']}/, "
                               f"{SPLIT_DIRS['test']}/ and optionally {SPLIT_DIRS['validate']}/ of PNG slices")
    out = {"train": read_split(root / SPLIT_DIRS["train"], image_size)}
    if (root / SPLIT_DIRS["validate"]).exists():
        out["validate"] = read_split(root / SPLIT_DIRS["validate"], image_size)
    else:
        train, val = split_by_case(out["train"], val_fraction, seed)
        out["train"], out["validate"] = train, val
        print(f"{root}: no {SPLIT_DIRS['validate']}/ folder; held out {len(set(_group_keys(val)))} of "
              f"{len(set(_group_keys(train))) + len(set(_group_keys(val)))} train cases ({len(val)} images) as "
              f"validation (val_fraction={val_fraction}, seed={seed})")
    out["test"] = read_split(root / SPLIT_DIRS["test"], image_size)
    out = {name: out[name] for name in SPLITS}

    sized = [(name, s) for name, s in out.items() if len(s)]
    ref_name, ref = sized[0]
    for name, s in sized[1:]:
        if s.images.shape[1:] != ref.images.shape[1:]:
            raise DatasetError(
                f"{root}: splits differ in image size: {ref_name}/{ref.names[0]} is {ref.images.shape[2]}x"
                f"{ref.images.shape[1]} but {name}/{s.names[0]} is {s.images.shape[2]}x{s.images.shape[1]}; "
                "pass image_size (--image-size) to resize all images to one square size")
    known = {name: set(s.case_ids.tolist()) - {UNKNOWN} for name, s in out.items()}
    for a, b in (("train", "validate"), ("train", "test"), ("validate", "test")):
        shared = known[a] & known[b]
        if shared:
            warnings.warn(DatasetWarning(f"{root}: {len(shared)} case id(s) appear in both {a} and {b} "
                                         f"(e.g. case {min(shared)}); the same subject may be in both"), stacklevel=2)
    return out


def load_oasis(root: str | os.PathLike, image_size: int | None = None, val_fraction: float = 0.2,
               seed: int = 0) -> OasisSplits:
    """Like :func:`read_oasis` but with float32 images in ``[0, 1]`` (``pixel / 255``).

    Returns:
        :class:`OasisSplits`: ``splits["train"]`` is float32 ``(N, H, W, 1)``; ``splits.info["train"]``
        is the aligned :class:`SplitInfo` (names, case_ids, slice_indices, report).
    """
    splits = read_oasis(root, image_size=image_size, val_fraction=val_fraction, seed=seed)
    arrays, info = {}, {}
    for name in SPLITS:
        split = splits.pop(name)  # drop each uint8 copy as soon as it is converted
        arrays[name], info[name] = split.float(), split.info
    return OasisSplits(arrays, info)


def load_images(folder: str | os.PathLike, image_size: int | None = None, return_info: bool = False):
    """One folder of PNG slices as float32 ``(N, H, W, 1)`` in ``[0, 1]``, sorted by file name.

    With ``return_info=True`` returns ``(images, SplitInfo)``.
    """
    split = read_split(folder, image_size)
    return (split.float(), split.info) if return_info else split.float()


# ----------------------------------------------------------------------------------------------
# tf.data
# ----------------------------------------------------------------------------------------------


def to_dataset(split, batch_size: int, shuffle: bool = True, seed: int | None = None, repeat: bool = False,
               drop_remainder: bool = False, with_slices: bool = False):
    """A ``tf.data.Dataset`` of float32 batches ``(B, H, W, 1)`` in ``[0, 1]``.

    The images stay one uint8 NumPy array (no copy); the pipeline shuffles indices (a full, seeded
    shuffle that reshuffles every epoch), batches them, gathers each batch from the array and
    normalises it in a parallel ``map`` (``uint8 / 255``; float input is only cast to float32), and
    prefetches. Being fed by ``tf.numpy_function``, the dataset lives in this Python process (fine for
    ``fit`` and one-machine ``MirroredStrategy``; it cannot be serialised to a tf.data service).

    Args:
        split: a :class:`Split`, or an array ``(N, H, W[, 1])`` of uint8 or float images.
        batch_size: images per batch.
        shuffle, seed: shuffle every epoch; a seed makes the order reproducible.
        repeat: repeat forever (give ``steps_per_epoch`` to ``fit``).
        drop_remainder: drop a last, smaller batch.
        with_slices: yield ``(x, slice_indices)`` with int64 ``(B,)`` slice indices (needs a Split).
    Returns:
        A dataset yielding ``x`` or ``(x, slice_indices)``.
    """
    import tensorflow as tf

    slices = None
    if isinstance(split, Split):
        images, slices = split.images, split.slice_indices
    else:
        images = np.asarray(split)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] != 1:
        raise DatasetError(f"to_dataset: expected images shaped (N, H, W, 1), got {images.shape}")
    if not (images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
        raise DatasetError(f"to_dataset: expected uint8 or float images, got {images.dtype}; convert them first")
    if with_slices and slices is None:
        raise DatasetError("to_dataset: with_slices=True needs a Split (an array carries no slice indices)")
    if int(batch_size) < 1:
        raise DatasetError(f"to_dataset: batch_size must be >= 1, got {batch_size}")
    if len(images) == 0:
        raise DatasetError("to_dataset: no images (empty split)")

    is_uint8 = images.dtype == np.uint8
    # Batches are gathered from the NumPy array itself (tf.numpy_function): no second in-memory copy of
    # the data set (tf.constant would need one, and graph constants stop at 2 GB).
    out_dtype = tf.uint8 if is_uint8 else tf.as_dtype(images.dtype)
    slices_t = tf.constant(slices, tf.int64) if with_slices else None
    ds = tf.data.Dataset.range(len(images))
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)

    def gather(index):
        x = tf.numpy_function(lambda i: images[i], [index], out_dtype, stateful=False)
        x.set_shape((None,) + images.shape[1:])
        x = tf.cast(x, tf.float32) / 255.0 if is_uint8 else tf.cast(x, tf.float32)
        return (x, tf.gather(slices_t, index)) if with_slices else x

    return ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------------------------
# Writing PNG trees (shared by the demo builder and prepare)
# ----------------------------------------------------------------------------------------------


def slice_file_name(case_id: int, slice_index: int) -> str:
    return f"case_{case_id:03d}_slice_{slice_index}.nii.png"


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="L").save(path, format="PNG")


def _check_output_root(out_dir: Path, own_markers: Sequence[str]) -> None:
    """Refuse to write into split folders that already hold PNGs not written by us (see own_markers)."""
    if any((out_dir / m).exists() for m in own_markers):
        return
    for name in SPLITS:
        folder = out_dir / SPLIT_DIRS[name]
        if folder.is_dir() and any(p.suffix.lower() == IMAGE_SUFFIX for p in folder.iterdir()):
            raise DatasetError(f"{folder}: already holds PNG slices not written by this command; "
                               "choose an empty output folder or delete them")


def _clear_own_slices(folder: Path) -> None:
    for p in folder.glob("case_*_slice_*.nii.png"):
        p.unlink()


# ----------------------------------------------------------------------------------------------
# Demo data from the MNI ICBM152 template
# ----------------------------------------------------------------------------------------------

_DEMO_PIXEL_MM = 0.85  # output pixel size: a ~180 mm long brain spans ~210 of 256 pixels, as in OASIS
_DEMO_COARSE = 17  # geometry and bias are smooth: computed on a 17x17 grid per slice, then bilinear
_DEMO_WHITE = 0.92  # template white matter (~0.9) lands near 210/255, below saturation


@functools.lru_cache(maxsize=1)
def _mni_template() -> np.ndarray:
    """The MNI ICBM152 2009a T1 brain (skull-stripped, 1 mm, RAS), cropped to the brain, float32 in [0, 1].

    Read-only and cached: the demo builder and the benchmark load it once per process.
    """
    import importlib.util

    import nibabel as nib

    spec = importlib.util.find_spec("nilearn")
    path = Path(spec.origin).parent / "datasets" / "data" / MNI_TEMPLATE_FILE if spec and spec.origin else None
    if path is not None and path.is_file():
        img = nib.load(path)
    else:  # other nilearn layouts: ask nilearn (slower import, same file)
        from nilearn.datasets import load_mni152_template

        img = load_mni152_template(resolution=1)
    img = nib.as_closest_canonical(img)
    vol = np.asarray(img.dataobj, dtype=np.float32)
    vol /= vol.max()
    nz = np.nonzero(vol > 0)
    lo = [max(int(a.min()) - 2, 0) for a in nz]
    hi = [int(a.max()) + 3 for a in nz]
    vol = np.ascontiguousarray(vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    vol.flags.writeable = False
    return vol


def _axial_levels(vol: np.ndarray, min_area_fraction: float = 0.3) -> tuple[float, float]:
    """Lowest and highest axial level (voxel z) whose brain area is at least min_area_fraction of the largest."""
    area = (vol > 0.1).sum(axis=(0, 1))
    z = np.flatnonzero(area >= min_area_fraction * area.max())
    return float(z[0]), float(z[-1])


def _upsample(coarse: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a coarse ``(c, c)`` grid whose corners sit on the image corners -> ``(size, size)``.

    Plain NumPy indexing: faster here than a matrix product, whose BLAS threads stall on a busy machine.
    """
    c = coarse.shape[0]
    pos = np.linspace(0, c - 1, size)
    i0 = np.minimum(pos.astype(np.int64), c - 2)
    t = pos - i0
    rows = coarse[i0] * (1 - t)[:, None] + coarse[i0 + 1] * t[:, None]
    return rows[:, i0] * (1 - t) + rows[:, i0 + 1] * t


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


def _demo_case(vol: np.ndarray, levels: tuple[float, float], n_slices: int, image_size: int,
               rng: np.random.Generator) -> np.ndarray:
    """One synthetic subject: ``n_slices`` axial uint8 slices ``(n, S, S)``, low to high.

    Per case: a random affine (rotation up to ~5 deg in-plane, 3 deg tilt; 0.93-1.07 scale per axis;
    a few mm shift), a smooth elastic warp (random 6x6x5 control grid of ~2 mm displacements, cubic
    interpolation), a gamma in [0.75, 1.33], a smooth multiplicative bias field (+-10 %) and mild noise
    inside the brain. Output orientation: rows run left->right of the subject (R at the bottom),
    columns run anterior->posterior, so the brain faces left as in the OASIS slices.
    """
    from scipy import ndimage

    center = (np.array(vol.shape) - 1) / 2.0
    rot = _rotation(*np.deg2rad([rng.uniform(-3, 3), rng.uniform(-2, 2), rng.uniform(-5, 5)]))
    scale = rng.uniform(0.93, 1.07, size=3)  # brain size per axis: coordinates are divided by it
    matrix = rot / scale[None, :]
    shift = np.array([rng.normal(0, 2.0), rng.normal(0, 2.5), rng.normal(0, 1.5)])  # mm
    elastic = rng.normal(0, 2.0, size=(3, 6, 6, 5))  # mm at control points
    bias = rng.normal(0, 0.1, size=(4, 4, 3))  # log-gain at control points
    gamma = float(np.exp(rng.uniform(np.log(0.75), np.log(1.33))))
    noise_sd = rng.uniform(1.0, 3.0) / 255.0

    c = _DEMO_COARSE
    grid = (np.arange(c) / (c - 1) - 0.5) * (image_size - 1) * _DEMO_PIXEL_MM  # mm from the image center
    z_lo, z_hi = levels
    depth = np.linspace(z_lo, z_hi, n_slices) - center[2] + rng.normal(0, 1.0)  # voxel z from the center
    # Coarse (c, c, n) grid of subject-frame points: rows = subject x, columns = subject -y (anterior left).
    u, v, w = np.meshgrid(grid, grid, depth, indexing="ij")
    q = np.einsum("ij,j...->i...", matrix, np.stack([u, -v, w])) + shift[:, None, None, None]
    # Smooth fields: control grids evaluated (cubic) at the coarse points of every slice at once.
    t = np.linspace(0, 1, n_slices)
    ctrl = np.stack(np.meshgrid(np.linspace(0, 1, c), np.linspace(0, 1, c), t, indexing="ij"))
    for i in range(3):
        q[i] += ndimage.map_coordinates(elastic[i], ctrl * (np.array(elastic.shape[1:]) - 1)[:, None, None, None],
                                        order=3, mode="nearest")
    q += center[:, None, None, None]
    log_gain = ndimage.map_coordinates(bias, ctrl * (np.array(bias.shape) - 1)[:, None, None, None],
                                       order=3, mode="nearest")
    out = np.empty((n_slices, image_size, image_size), np.uint8)
    for k in range(n_slices):
        # The fields are smooth, so bilinear upsampling of the coarse grid is accurate and cheap.
        coords = np.stack([_upsample(q[i, :, :, k], image_size) for i in range(3)]).astype(np.float32)
        gain = (np.exp(_upsample(log_gain[:, :, k], image_size)) * _DEMO_WHITE).astype(np.float32)
        x = ndimage.map_coordinates(vol, coords, order=1, mode="constant", cval=0.0, output=np.float32)
        brain = x > 0.02
        x = np.power(x, np.float32(gamma)) * gain
        x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(noise_sd)
        out[k] = np.rint(np.clip(x * brain, 0, 1) * 255)  # background exactly 0, as in OASIS
    return out


def make_demo_dataset(out_dir: str | os.PathLike, n_train: int = 20, n_validate: int = 4, n_test: int = 4,
                      slices_per_case: int = 32, image_size: int = 256, seed: int = 0,
                      progress: bool = True) -> Path:
    """Write an OASIS-layout tree of synthetic 8-bit PNG slices built from the MNI ICBM152 T1 template.

    Each case is the template under its own seeded deformation and intensity change (see
    ``_demo_case``); cases get ids 1..n_train (train), then validate, then test, so splits never share
    a case. Slices run from low (cerebellum) to high axial levels, skipping levels where the brain
    covers under 30 % of its largest area. Case ``i`` depends only on ``(seed, i)``, and equal
    arguments give byte-identical PNGs. ``demo.json`` (the parameters) is written last; earlier demo
    files in the split folders are replaced.

    Returns:
        ``out_dir`` as a Path, ready for ``load_oasis`` / ``read_oasis``.
    """
    out_dir = Path(out_dir)
    _check_demo_args(out_dir, n_train, n_validate, n_test, slices_per_case, image_size)  # before touching out_dir
    with _demo_lock(out_dir):
        return _build_demo(out_dir, n_train, n_validate, n_test, slices_per_case, image_size, seed, progress)


def _check_demo_args(out_dir: Path, n_train, n_validate, n_test, slices_per_case, image_size) -> None:
    if n_train < 1 or n_test < 1 or n_validate < 0:
        raise DatasetError(f"demo: need >= 1 train and test case and >= 0 validate cases, got "
                           f"{n_train}/{n_validate}/{n_test}")
    if slices_per_case < 1 or image_size < 32:
        raise DatasetError(f"demo: need slices_per_case >= 1 and image_size >= 32, got {slices_per_case}, {image_size}")
    _check_output_root(out_dir, (DEMO_MARKER, ".demo_incomplete"))


@contextlib.contextmanager
def _demo_lock(root: Path):
    """Exclusive lock on ``root/.demo.lock`` so two processes never build one demo tree at once."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(root / ".demo.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_demo(out_dir: Path, n_train: int, n_validate: int, n_test: int, slices_per_case: int, image_size: int,
                seed: int, progress: bool) -> Path:
    from tqdm import tqdm

    from utils import save_json

    counts = {"train": int(n_train), "validate": int(n_validate), "test": int(n_test)}
    _check_demo_args(out_dir, n_train, n_validate, n_test, slices_per_case, image_size)
    building = out_dir / ".demo_incomplete"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DEMO_MARKER).unlink(missing_ok=True)
    building.write_text("make_demo_dataset started; the tree is complete once demo.json exists\n")

    vol = _mni_template()
    levels = _axial_levels(vol)
    params = dict(version=DEMO_VERSION, seed=int(seed), n_train=counts["train"], n_validate=counts["validate"],
                  n_test=counts["test"], slices_per_case=int(slices_per_case), image_size=int(image_size),
                  source=f"MNI ICBM152 2009a symmetric T1 ({MNI_TEMPLATE_FILE}, shipped with nilearn)")
    case_id = 0
    cases = {}
    bar = tqdm(total=sum(counts.values()), desc="demo cases", unit="case", disable=not progress)
    for name in SPLITS:
        folder = out_dir / SPLIT_DIRS[name]
        folder.mkdir(exist_ok=True)
        _clear_own_slices(folder)
        cases[name] = []
        for _ in range(counts[name]):
            case_id += 1
            slices = _demo_case(vol, levels, slices_per_case, image_size, np.random.default_rng([seed, case_id]))
            for k, image in enumerate(slices):
                _write_png(folder / slice_file_name(case_id, k), image)
            cases[name].append(case_id)
            bar.update()
    bar.close()
    params["cases"] = cases
    save_json(params, out_dir / DEMO_MARKER)
    building.unlink()
    return out_dir


def demo_is_complete(root: str | os.PathLike, **params) -> bool:
    """True when ``root`` holds a finished demo tree built with these parameters (defaults: DEMO_DEFAULTS)."""
    from utils import load_json

    root = Path(root)
    want = {**DEMO_DEFAULTS, **params}
    try:
        meta = load_json(root / DEMO_MARKER)
    except ValueError:
        return False
    if meta.get("version") != DEMO_VERSION or any(meta.get(k) != v for k, v in want.items()):
        return False
    for name, key in (("train", "n_train"), ("validate", "n_validate"), ("test", "n_test")):
        folder = root / SPLIT_DIRS[name]
        found = len(list(folder.glob("case_*_slice_*.nii.png"))) if folder.is_dir() else 0
        if found != want[key] * want["slices_per_case"]:
            return False
    return True


def ensure_demo_dataset(root: str | os.PathLike | None = None, *, progress: bool = True, **params) -> Path:
    """Build the demo tree at ``root`` (default :data:`DEFAULT_DEMO_ROOT`) unless a complete one is there.

    ``params`` override :data:`DEMO_DEFAULTS` (n_train, n_validate, n_test, slices_per_case, image_size,
    seed). A tree without ``demo.json``, with other parameters, or with missing files is rebuilt.
    """
    root = Path(root) if root is not None else DEFAULT_DEMO_ROOT
    unknown = set(params) - set(DEMO_DEFAULTS)
    if unknown:
        raise TypeError(f"ensure_demo_dataset: unknown parameter(s) {sorted(unknown)}")
    if not demo_is_complete(root, **params):
        with _demo_lock(root):
            if not demo_is_complete(root, **params):  # another process may have built it meanwhile
                p = {**DEMO_DEFAULTS, **params}
                _build_demo(root, p["n_train"], p["n_validate"], p["n_test"], p["slices_per_case"], p["image_size"],
                            p["seed"], progress)
    return root


def save_demo_contact_sheet(root: str | os.PathLike, path: str | os.PathLike, n_cases: int = 4,
                            n_depths: int = 6) -> Path:
    """Save a grid of slices from ``root`` (any OASIS-layout tree): one row per case (the first train,
    validate and test cases), ``n_depths`` evenly spaced slices per row, with captions."""
    from PIL import Image

    from utils import save_image_grid

    root = _find_split_root(Path(root))
    by_case: dict[tuple[str, int], dict[int, Path]] = {}
    for name in SPLITS:
        folder = root / SPLIT_DIRS[name]
        if folder.is_dir():
            for p in folder.glob("*.png"):
                case, k = parse_slice_name(p.name)
                if case != UNKNOWN:
                    by_case.setdefault((name, case), {})[k] = p
    if not by_case:
        raise DatasetError(f"{root}: no case_<id>_slice_<k>.png slices to draw; build them with: python dataset.py demo")
    # Take cases round-robin over the splits so the sheet shows train, validate and test cases.
    per_split = {name: sorted(c for s, c in by_case if s == name) for name in SPLITS}
    chosen = []
    while len(chosen) < n_cases and any(per_split.values()):
        for name in SPLITS:
            if per_split[name] and len(chosen) < n_cases:
                chosen.append((name, per_split[name].pop(0)))
    images, titles = [], []
    for name, case in chosen:
        slices = by_case[(name, case)]
        ks = sorted(slices)
        picks = [ks[int(round(i))] for i in np.linspace(0, len(ks) - 1, n_depths)]
        for k in picks:
            with Image.open(slices[k]) as im:
                images.append(np.asarray(im.convert("L"), np.float32) / 255.0)
            titles.append(f"{name} case {case}, slice {k}")
    return save_image_grid(np.stack(images), path, ncols=n_depths, titles=titles,
                           suptitle=f"{root.name}: rows = cases, columns = low to high axial slices (anterior left)")


# ----------------------------------------------------------------------------------------------
# OASIS-1 volumes -> PNG slices
# ----------------------------------------------------------------------------------------------


def _find_volumes(volumes_dir: Path, pattern: str) -> list[Path]:
    found = {}
    for p in sorted(volumes_dir.rglob(pattern)):
        name = p.name.lower()
        if not p.is_file():
            continue
        if name.endswith((".nii", ".nii.gz")):
            found[str(p)] = p
        elif name.endswith((".img", ".hdr")):  # an Analyze pair counts once, by its .img
            found.setdefault(str(p.with_suffix("")), p.with_suffix(".img") if p.with_suffix(".img").exists() else p)
    return sorted(found.values(), key=lambda p: _natural_key(p.name))


def _volume_slices(path: Path, slices_per_case: int | None, image_size: int) -> list[np.ndarray]:
    """Axial uint8 slices ``(S, S)`` of one volume, low to high, oriented like the OASIS PNGs."""
    import nibabel as nib
    from PIL import Image

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        affine = img.affine
    except Exception as e:
        raise DatasetError(f"{path}: cannot read volume ({_one_line(e)}); for Analyze files keep the .hdr beside "
                           "the .img, or convert to NIfTI") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DatasetError(f"{path}: expected a 3-D volume, got shape {data.shape}; pass one 3-D image per file")
    # Reorient to RAS (nibabel's canonical) through NIfTI, which, unlike Analyze, can carry any affine.
    canon = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    data = np.asarray(canon.dataobj, dtype=np.float32)
    zooms = np.abs(np.asarray(canon.header.get_zooms()[:3], dtype=float))
    values = data[data != 0]
    if values.size == 0:
        raise DatasetError(f"{path}: volume is all zeros; remove it from the volumes folder")
    lo, hi = np.percentile(values, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    scaled = np.where(data != 0, np.clip((data - lo) / (hi - lo), 0, 1) * 255.0, 0.0).astype(np.float32)

    area = (scaled > 25).sum(axis=(0, 1))
    zs = np.flatnonzero(area >= 0.2 * area.max())
    z_lo, z_hi = int(zs[0]), int(zs[-1])
    if slices_per_case:
        levels = np.unique(np.rint(np.linspace(z_lo, z_hi, slices_per_case)).astype(int))
    else:
        levels = np.arange(z_lo, z_hi + 1)

    # Rows: subject x (right at the bottom); columns: anterior -> posterior, so the brain faces left.
    extent = np.array([data.shape[0] * zooms[0], data.shape[1] * zooms[1]])
    rows, cols = np.maximum(1, np.rint(extent * image_size / extent.max()).astype(int))
    resample = getattr(Image.Resampling, RESIZE_FILTER)
    out = []
    for z in levels:
        plane = np.ascontiguousarray(scaled[:, ::-1, z])
        if plane.shape != (rows, cols):
            plane = np.asarray(Image.fromarray(plane, mode="F").resize((int(cols), int(rows)), resample))
        canvas = np.zeros((image_size, image_size), np.uint8)
        r0, c0 = (image_size - rows) // 2, (image_size - cols) // 2
        canvas[r0:r0 + rows, c0:c0 + cols] = np.rint(np.clip(plane, 0, 255))
        out.append(canvas)
    return out


def prepare_oasis_volumes(volumes_dir: str | os.PathLike, out_dir: str | os.PathLike,
                          pattern: str = "*_masked_gfc.*", val_fraction: float = 0.1, test_fraction: float = 0.05,
                          seed: int = 0, slices_per_case: int | None = 32, image_size: int = 256,
                          progress: bool = True) -> dict:
    """Turn OASIS-1 volumes (Analyze ``.img/.hdr`` or NIfTI ``.nii/.nii.gz``) into the PNG layout.

    Each volume is reoriented to RAS with nibabel, scaled to 8 bits by the 0.5/99.5 percentiles of its
    nonzero voxels (zero voxels stay black), cut into ``slices_per_case`` evenly spaced axial slices
    between the lowest and highest level whose brain area is >= 20 % of the largest (``None``: every
    such level), resized with Lanczos so the longer in-plane side fills ``image_size`` and zero-padded
    to ``image_size x image_size``. Subjects (``OAS1_XXXX`` -> case id ``XXXX``) are split into
    train/validate/test with a seeded permutation, so a subject's slices stay in one split; a subject
    with several matching volumes (e.g. MR1 and MR2 sessions) uses the first by name, and the rest
    are reported.

    Args:
        volumes_dir: searched recursively for files matching ``pattern``.
        pattern: glob for the volumes; the default picks OASIS-1's skull-stripped, atlas-registered,
            bias-corrected images (``..._t88_masked_gfc.img``), from which the Keras PNG slices were made.
    Returns:
        The summary also written to ``out_dir/prepare.json``: parameters, ``cases`` per split, ``images``
        per split, ``skipped`` volumes.
    """
    from tqdm import tqdm

    from utils import save_json

    volumes_dir, out_dir = Path(volumes_dir), Path(out_dir)
    if not volumes_dir.is_dir():
        raise DatasetError(f"{volumes_dir}: volumes folder not found; pass the folder holding the OASIS-1 "
                           "OAS1_XXXX_MR1 directories (or .img/.hdr/.nii/.nii.gz files)")
    for frac, name in ((val_fraction, "val_fraction"), (test_fraction, "test_fraction")):
        if not 0 <= frac < 1:
            raise DatasetError(f"prepare: {name} must be in [0, 1), got {frac}")
    paths = _find_volumes(volumes_dir, pattern)
    if not paths:
        n_any = len(_find_volumes(volumes_dir, "*"))
        raise DatasetError(f"{volumes_dir}: no volumes match {pattern!r} ({n_any} .img/.hdr/.nii/.nii.gz files in "
                           "all); pass --pattern '*' or a glob that matches your files")
    by_subject: dict[int, list[Path]] = {}
    for p in paths:
        m = _OASIS_SUBJECT_RE.search(p.name)
        if not m:
            raise DatasetError(f"{p}: no OAS1_XXXX subject id in the file name; rename it like "
                               "OAS1_0001_MR1_mpr_n4_anon_111_t88_masked_gfc.img")
        by_subject.setdefault(int(m.group(1)), []).append(p)
    skipped = [str(p) for ps in by_subject.values() for p in ps[1:]]
    if skipped:
        warnings.warn(DatasetWarning(f"{volumes_dir}: skipped {len(skipped)} extra volume(s) of subjects already "
                                     f"used (e.g. {Path(skipped[0]).name}); one volume per subject"), stacklevel=2)

    subjects = sorted(by_subject)
    n = len(subjects)
    n_test = int(round(test_fraction * n)) if test_fraction > 0 else 0
    n_val = int(round(val_fraction * n)) if val_fraction > 0 else 0
    if n >= 3:  # a requested split gets at least one subject when there are enough to go round
        n_test = max(n_test, int(test_fraction > 0))
        n_val = max(n_val, int(val_fraction > 0))
    if n - n_test - n_val < 1:
        raise DatasetError(f"{volumes_dir}: {n} subject(s) cannot fill train, validate ({val_fraction}) and "
                           f"test ({test_fraction}); add volumes or lower --val-fraction/--test-fraction")
    order = np.random.default_rng(seed).permutation(n)
    assign = {"test": order[:n_test], "validate": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    cases = {name: sorted(subjects[i] for i in assign[name]) for name in SPLITS}

    _check_output_root(out_dir, ())
    images = {}
    bar = tqdm(total=n, desc="volumes", unit="vol", disable=not progress)
    for name in SPLITS:
        folder = out_dir / SPLIT_DIRS[name]
        folder.mkdir(parents=True, exist_ok=True)
        images[name] = 0
        for case in cases[name]:
            for k, image in enumerate(_volume_slices(by_subject[case][0], slices_per_case, image_size)):
                _write_png(folder / slice_file_name(case, k), image)
                images[name] += 1
            bar.update()
    bar.close()
    summary = dict(volumes_dir=str(volumes_dir), pattern=pattern, val_fraction=val_fraction,
                   test_fraction=test_fraction, seed=seed, slices_per_case=slices_per_case, image_size=image_size,
                   cases=cases, images=images, skipped=skipped,
                   volumes={str(c): str(by_subject[c][0]) for c in subjects})
    save_json(summary, out_dir / "prepare.json")
    print(f"{out_dir}: wrote " + ", ".join(f"{name} {images[name]} images / {len(cases[name])} cases" for name in SPLITS))
    return summary


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python dataset.py",
        description="OASIS brain-MRI PNG slices: build the embedded demo set, convert OASIS-1 volumes, "
                    "or check a data folder. Bad input ends with a one-line error and exit code 2.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,prepare,check}")

    demo = sub.add_parser("demo", help="write synthetic OASIS-layout PNG slices from the MNI152 template",
                          description="Write an OASIS-layout tree of 8-bit PNG slices made from the MNI ICBM152 "
                                      "T1 template shipped with nilearn, one seeded deformation per case.")
    demo.add_argument("--out", type=Path, default=DEFAULT_DEMO_ROOT,
                      help=f"output folder (default: {DEFAULT_DEMO_ROOT})")
    demo.add_argument("--train-cases", type=int, default=DEMO_DEFAULTS["n_train"], help="train cases (default: %(default)s)")
    demo.add_argument("--validate-cases", type=int, default=DEMO_DEFAULTS["n_validate"],
                      help="validate cases (default: %(default)s)")
    demo.add_argument("--test-cases", type=int, default=DEMO_DEFAULTS["n_test"], help="test cases (default: %(default)s)")
    demo.add_argument("--slices", type=int, default=DEMO_DEFAULTS["slices_per_case"],
                      help="axial slices per case, low to high (default: %(default)s)")
    demo.add_argument("--image-size", type=int, default=DEMO_DEFAULTS["image_size"],
                      help="square image side in pixels (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=DEMO_DEFAULTS["seed"],
                      help="random seed; equal arguments give byte-identical PNGs (default: %(default)s)")
    demo.add_argument("--contact-sheet", type=Path, default=None, metavar="PNG",
                      help="also save a grid of slices (4 cases x 6 depths) to this file, "
                           "e.g. images/demo_slices.png")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")

    prep = sub.add_parser("prepare", help="convert OASIS-1 volumes (.img/.hdr, .nii, .nii.gz) to PNG slices",
                          description="Convert OASIS-1 MRI volumes to the keras_png_slices_* layout: RAS reorientation, "
                                      "0.5/99.5 percentile scaling to 8 bits, axial slices resized and padded to a "
                                      "square, train/validate/test split by subject.")
    prep.add_argument("--volumes", type=Path, required=True, help="folder searched recursively for volumes")
    prep.add_argument("--out", type=Path, required=True, help="output folder (its split folders must not hold PNGs yet)")
    prep.add_argument("--pattern", default="*_masked_gfc.*",
                      help="glob selecting the volumes (default: %(default)s, the skull-stripped atlas-registered "
                           "OASIS-1 images; use '*' for every volume file)")
    prep.add_argument("--val-fraction", type=float, default=0.1, help="fraction of subjects for validate (default: %(default)s)")
    prep.add_argument("--test-fraction", type=float, default=0.05, help="fraction of subjects for test (default: %(default)s)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the subject split (default: %(default)s)")
    prep.add_argument("--slices", type=int, default=32,
                      help="axial slices per subject, evenly spaced over the brain; 0 = every level (default: %(default)s)")
    prep.add_argument("--image-size", type=int, default=256, help="square output side in pixels (default: %(default)s)")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")

    check = sub.add_parser("check", help="load a data folder the way training does and summarise it",
                           description="Read ROOT/keras_png_slices_{train,validate,test} with read_oasis and print "
                                       "images, size and cases per split, plus any conversions applied.")
    check.add_argument("root", type=Path, help="folder holding the keras_png_slices_* folders")
    check.add_argument("--image-size", type=int, default=None, help="resize images to this square size (Lanczos)")
    check.add_argument("--val-fraction", type=float, default=0.2,
                       help="cases held out of train when there is no validate folder (default: %(default)s)")
    check.add_argument("--seed", type=int, default=0, help="seed of that held-out split (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", DatasetWarning)
            warnings.showwarning = _show_warning_line
            if args.command == "demo":
                root = make_demo_dataset(args.out, n_train=args.train_cases, n_validate=args.validate_cases,
                                         n_test=args.test_cases, slices_per_case=args.slices,
                                         image_size=args.image_size, seed=args.seed, progress=not args.quiet)
                print(f"{root}: demo slices written ({DEMO_MARKER} lists the cases)")
                if args.contact_sheet is not None:
                    print(f"contact sheet: {save_demo_contact_sheet(root, args.contact_sheet)}")
            elif args.command == "prepare":
                prepare_oasis_volumes(args.volumes, args.out, pattern=args.pattern, val_fraction=args.val_fraction,
                                      test_fraction=args.test_fraction, seed=args.seed,
                                      slices_per_case=args.slices or None, image_size=args.image_size,
                                      progress=not args.quiet)
            else:
                splits = read_oasis(args.root, image_size=args.image_size, val_fraction=args.val_fraction,
                                    seed=args.seed)
                for name, s in splits.items():
                    size = f"{s.images.shape[2]}x{s.images.shape[1]}" if len(s) else "-"
                    cases = set(s.case_ids.tolist()) - {UNKNOWN}
                    print(f"{name:9s} {len(s):6d} images  {size:>9s}  {len(cases):4d} cases")
    except (DatasetError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _show_warning_line(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
