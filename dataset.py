"""OASIS brain-MRI slices: PNG loading and tf.data pipelines (the loader; building data sets is build_data.py).

Data layout (the "Keras OASIS" PNG release, which this module reads and build_data.py writes)::

    ROOT/keras_png_slices_train/case_001_slice_0.nii.png     256x256 8-bit grayscale, black background
    ROOT/keras_png_slices_validate/...                        optional: made from train by case if absent
    ROOT/keras_png_slices_test/...
    ROOT/keras_png_slices_seg_*/seg_001_slice_0.nii.png     tissue masks 0/85/170/255: read only as masks

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

Writing data sets -- the synthetic demo set and OASIS-1 volume conversion -- is :mod:`build_data`'s job
(``python build_data.py demo|prepare``); this module does not import it.

Command line: ``python dataset.py check ROOT`` summarises a data folder the way training reads it;
``python dataset.py profile FOLDER`` prints the head's intensity profile (:func:`head_profile`).
Nothing runs on import; TensorFlow and PIL are imported only by the functions that use them.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

SPLITS = ("train", "validate", "test")
SPLIT_DIRS = {name: f"keras_png_slices_{name}" for name in SPLITS}
SEG_DIRS = {name: f"keras_png_slices_seg_{name}" for name in SPLITS}  # tissue masks, beside the images
TISSUES = ("background", "csf", "grey", "white")  # label k of a mask is TISSUES[k]
SEG_LEVELS = (0, 85, 170, 255)  # OASIS's grey level of each label in its seg_*.nii.png masks
IMAGE_SUFFIX = ".png"
UNKNOWN = -1  # case id / slice index of a file whose name is not case_<id>_slice_<k>
RESIZE_FILTER = "LANCZOS"  # PIL filter used for every resize in this module

_NAME_RE = re.compile(r"case_(\d+)_slice_(\d+)(?!\d)", re.IGNORECASE)
_SEG_NAME_RE = re.compile(r"^seg_(\d+)_slice_(\d+)(?!\d)", re.IGNORECASE)
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
    # uint8 (N, H, W) tissue labels (TISSUES: 0..3) aligned with images by case and slice, when read
    # with masks (read_oasis(..., masks=True)); never images to learn from
    masks: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        n = len(self.images)
        if not (len(self.names) == len(self.case_ids) == len(self.slice_indices) == n):
            raise ValueError(f"Split: {n} images but {len(self.names)} names, {len(self.case_ids)} case ids, "
                             f"{len(self.slice_indices)} slice indices")
        if self.masks is not None and self.masks.shape != self.images.shape[:3]:
            raise ValueError(f"Split: masks {self.masks.shape} do not match images {self.images.shape}")

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
                     self.slice_indices[index], self.report,
                     None if self.masks is None else self.masks[index])


class OasisSplits(dict):
    """``{"train", "validate", "test"} -> float32 (N, H, W, 1)`` in ``[0, 1]``; ``.info[split]`` holds
    the :class:`SplitInfo` (names, case ids, slice indices, load report) aligned with each array."""

    def __init__(self, arrays: dict[str, np.ndarray], info: dict[str, SplitInfo],
                 masks: dict[str, np.ndarray] | None = None):
        super().__init__(arrays)
        self.info = info
        self.masks = masks  # {split: uint8 tissue labels (N, H, W)} when loaded with masks=True, else None


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


# ----------------------------------------------------------------------------------------------
# Tissue masks (keras_png_slices_seg_*): labels aligned with the images by case and slice
# ----------------------------------------------------------------------------------------------

MISALIGNED_FRACTION = 0.1  # a mask whose tissue lies on more of the image's black background is misaligned


def seg_file_name(case_id: int, slice_index: int) -> str:
    """``(11, 12)`` -> ``"seg_011_slice_12.nii.png"``: the mask of ``case_011_slice_12.nii.png``."""
    return f"seg_{case_id:03d}_slice_{slice_index}.nii.png"


def labels_to_mask(labels: np.ndarray) -> np.ndarray:
    """Tissue labels (0..3, :data:`TISSUES`) -> OASIS's uint8 grey levels (:data:`SEG_LEVELS`)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= len(SEG_LEVELS)):
        raise ValueError(f"labels_to_mask: labels must lie in 0..{len(SEG_LEVELS) - 1}, got {labels.min()}..{labels.max()}")
    return np.asarray(SEG_LEVELS, np.uint8)[labels]


def mask_to_labels(mask: np.ndarray, where: str = "mask") -> np.ndarray:
    """OASIS's grey levels -> uint8 labels 0..3. Raises DatasetError naming ``where`` for any other level."""
    lut = np.full(256, 255, np.uint8)
    lut[list(SEG_LEVELS)] = np.arange(len(SEG_LEVELS), dtype=np.uint8)
    labels = lut[np.asarray(mask, np.uint8)]
    if (labels == 255).any():
        bad = sorted(set(np.unique(mask[labels == 255]).tolist()))
        raise DatasetError(f"{where}: grey level(s) {bad[:5]} outside the four tissue levels {list(SEG_LEVELS)} "
                           f"(background, CSF, grey, white matter); export the mask without smoothing or resizing")
    return labels


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Tissue labels ``(H, W)`` -> ``(size, size)``: each tissue's indicator area-averaged (PIL box
    filter), then the tissue covering most of each new pixel, so the mask stays on the image's grid."""
    from PIL import Image

    if labels.shape == (size, size):
        return labels
    cover = [np.asarray(Image.fromarray((labels == k).astype(np.float32), mode="F").resize(
        (size, size), Image.Resampling.BOX)) for k in range(len(TISSUES))]
    return np.argmax(np.stack(cover), axis=0).astype(np.uint8)


def read_masks(folder: str | os.PathLike, split: Split, image_folder: str | os.PathLike | None = None) -> np.ndarray:
    """The tissue masks of ``split``'s images from a ``keras_png_slices_seg_*`` folder, matched by name.

    Image ``case_<c>_slice_<k>`` takes mask ``seg_<c>_slice_<k>`` -- by case and slice, never by sorted
    order. The masks must have the images' size on disk (they are then resized like the images, see
    :func:`resize_labels`) and only OASIS's four grey levels.

    Args:
        folder: the seg folder; split: the images' :class:`Split`; image_folder: where the images are
            (default ``split.report.folder``), to compare sizes on disk.
    Returns:
        uint8 labels ``(N, H, W)`` aligned with ``split.images`` (0..3, :data:`TISSUES`).
    Raises:
        DatasetError (one line naming the file): no seg folder, an image without a mask, a mask without
        an image, a file not named ``seg_<case>_slice_<k>``, a mask of another size, a grey level outside
        the four, a mask whose tissue lies on the image's black background (misaligned).
    """
    from PIL import Image

    folder = Path(folder)
    image_folder = Path(image_folder or (split.report.folder if split.report else folder))
    if not folder.is_dir():
        raise DatasetError(f"{folder}: mask folder not found; the masks of {image_folder} (seg_<case>_slice_<k>.nii.png) "
                           "go there, or read the data without masks")
    by_key: dict[tuple[int, int], Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: _natural_key(e.name)):
        if not (entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIX)):
            continue
        m = _SEG_NAME_RE.match(entry.name)
        if not m:
            raise DatasetError(f"{Path(entry.path)}: not a mask name (seg_<case>_slice_<k>.nii.png); rename it or move it "
                               "out of the mask folder")
        by_key[(int(m.group(1)), int(m.group(2)))] = Path(entry.path)
    keys = list(zip(split.case_ids.tolist(), split.slice_indices.tolist()))
    for name, key in zip(split.names, keys):
        if key[0] == UNKNOWN:
            raise DatasetError(f"{image_folder / name}: no case and slice in the name, so no mask can be matched to it; "
                               "rename it case_<id>_slice_<k>.nii.png")
        if key not in by_key:
            raise DatasetError(f"{image_folder / name}: no mask {folder / seg_file_name(*key)}; every image needs its "
                               "seg_ mask (or read the data without masks)")
    extra = sorted(set(by_key) - set(keys))
    if extra:
        raise DatasetError(f"{by_key[extra[0]]}: a mask without an image ({len(extra)} in {folder.name}; no "
                           f"{slice_file_name(*extra[0])} in {image_folder}); delete it or add its image")
    n, h, w = split.images.shape[:3]
    out = np.empty((n, h, w), np.uint8)

    def read(i):
        path = by_key[keys[i]]
        mask, kind, _ = _read_png(path, None)
        if kind != "gray":
            raise DatasetError(f"{path}: a mask must be an 8-bit grayscale PNG with levels {list(SEG_LEVELS)}")
        with Image.open(image_folder / split.names[i]) as im:
            size = im.size
        if mask.shape[::-1] != size:
            raise DatasetError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {split.names[i]} is "
                               f"{size[0]}x{size[1]}: misaligned; export masks at the images' size")
        labels = resize_labels(mask_to_labels(mask, str(path)), h) if (h, w) != mask.shape else mask_to_labels(mask, str(path))
        tissue = labels > 0
        if tissue.sum() and (split.images[i, :, :, 0][tissue] == 0).mean() > MISALIGNED_FRACTION:
            share = (split.images[i, :, :, 0][tissue] == 0).mean()
            raise DatasetError(f"{path}: {share:.0%} of its tissue lies on the black background of {split.names[i]}: "
                               "misaligned with its image (shifted, flipped or another slice's mask)")
        out[i] = labels

    with ThreadPoolExecutor(_num_workers()) as pool:
        list(pool.map(read, range(n)))
    return out


def _find_split_root(root: Path) -> Path:
    """``root`` itself, or ``root/keras_png_slices_data`` (how the OASIS archive unpacks) if that holds the splits."""
    if not (root / SPLIT_DIRS["train"]).exists() and (root / "keras_png_slices_data" / SPLIT_DIRS["train"]).is_dir():
        return root / "keras_png_slices_data"
    return root


def case_groups(split: Split) -> list[str]:
    """One group label per slice: its case (``"case 11"``), so that whole cases go to one side of any split.

    Files with unknown case ids form their own groups: there is nothing to tie them to a subject.
    """
    return [f"case {c}" if c != UNKNOWN else f"file {s}" for c, s in zip(split.case_ids, split.names)]


def split_by_case(split: Split, val_fraction: float, seed: int = 0) -> tuple[Split, Split]:
    """Hold out ``round(val_fraction * cases)`` whole cases (at least one, at most all but one).

    Cases are drawn with ``numpy.random.default_rng(seed)`` from the sorted case ids, so the result
    depends only on the set of cases and the seed. Returns ``(train, validate)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    keys = np.array(case_groups(split))
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
               seed: int = 0, masks: bool = False) -> dict[str, Split]:
    """Read ``keras_png_slices_{train,validate,test}`` under ``root`` as uint8 :class:`Split` objects.

    ``keras_png_slices_seg_*`` folders are read only with ``masks=True``, and then only as each
    split's ``masks`` (tissue labels matched to the images by case and slice, :func:`read_masks`),
    never as images. When there is no validate folder, whole cases are moved from train to validate
    (``split_by_case(train, val_fraction, seed)``, masks moving with their images) and one line says so.

    Returns:
        ``{"train": Split, "validate": Split, "test": Split}``, all with one image size.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder not found; expected a folder holding {SPLIT_DIRS['train']}/, "
                           f"{SPLIT_DIRS['test']}/ and optionally {SPLIT_DIRS['validate']}/ "
                           "(python build_data.py demo builds one)")
    root = _find_split_root(root)
    for name in ("train", "test"):
        if not (root / SPLIT_DIRS[name]).exists():
            raise DatasetError(f"{root}: no {SPLIT_DIRS[name]}/ folder; expected {SPLIT_DIRS['train']}/, "
                               f"{SPLIT_DIRS['test']}/ and optionally {SPLIT_DIRS['validate']}/ of PNG slices")
    def read(name):
        split = read_split(root / SPLIT_DIRS[name], image_size)
        if masks:
            split.masks = read_masks(root / SEG_DIRS[name], split, root / SPLIT_DIRS[name])
        return split

    out = {"train": read("train")}
    if (root / SPLIT_DIRS["validate"]).exists():
        out["validate"] = read("validate")
    else:
        train, val = split_by_case(out["train"], val_fraction, seed)
        out["train"], out["validate"] = train, val
        print(f"{root}: no {SPLIT_DIRS['validate']}/ folder; held out {len(set(case_groups(val)))} of "
              f"{len(set(case_groups(train))) + len(set(case_groups(val)))} train cases ({len(val)} images) as "
              f"validation (val_fraction={val_fraction}, seed={seed})")
    out["test"] = read("test")
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
               seed: int = 0, masks: bool = False) -> OasisSplits:
    """Like :func:`read_oasis` but with float32 images in ``[0, 1]`` (``pixel / 255``).

    Returns:
        :class:`OasisSplits`: ``splits["train"]`` is float32 ``(N, H, W, 1)``; ``splits.info["train"]``
        is the aligned :class:`SplitInfo` (names, case_ids, slice_indices, report); with ``masks=True``
        ``splits.masks["train"]`` holds the aligned uint8 tissue labels ``(N, H, W)`` (:data:`TISSUES`).
    """
    splits = read_oasis(root, image_size=image_size, val_fraction=val_fraction, seed=seed, masks=masks)
    arrays, info, labels = {}, {}, {}
    for name in SPLITS:
        split = splits.pop(name)  # drop each uint8 copy as soon as it is converted
        arrays[name], info[name], labels[name] = split.float(), split.info, split.masks
    return OasisSplits(arrays, info, labels if masks else None)


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
# Head profile: how the head around the brain looks, for comparing one set of slices with another
# ----------------------------------------------------------------------------------------------

PROFILE_DISTANCES = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 25)
HEAD_THRESHOLD = 20  # head mask: pixels above this (0..255), closed, holes filled, largest region


@dataclass
class HeadProfile:
    """Mean intensity (0..255) at each distance inward from the head's outline, plus per-slice features.

    ``mean[i]`` is the mean over slices of each slice's mean intensity at ``distances[i]`` pixels inside
    its outline (NaN where no slice reaches that deep). Per slice (``(N,)`` arrays, NaN for a slice with
    no head): ``outer`` the outline's mean (distance 0), ``peak`` / ``peak_at`` the bright ring's
    maximum and its distance (searched over 0..10 px), ``band_min`` / ``band_at`` the darkest point of the
    band under the ring (searched from the peak to 20 px).
    """

    distances: np.ndarray  # int (D,)
    mean: np.ndarray  # float (D,)
    outer: np.ndarray
    peak: np.ndarray
    peak_at: np.ndarray
    band_min: np.ndarray
    band_at: np.ndarray

    def __len__(self) -> int:
        return len(self.outer)

    def table(self) -> str:
        """The profile and the per-slice ranges as a few printable lines."""
        d = " ".join(f"{int(x):>4d}" for x in self.distances)
        m = " ".join("   -" if np.isnan(x) else f"{x:4.0f}" for x in self.mean)
        lines = [f"distance from the outline (px)  {d}", f"mean intensity (0-255)          {m}"]
        for label, v, fmt in (("outermost pixel", self.outer, ".0f"), ("ring peak", self.peak, ".0f"),
                              ("ring peak at (px)", self.peak_at, ".0f"), ("band minimum", self.band_min, ".0f"),
                              ("band minimum at (px)", self.band_at, ".0f")):
            lo, med, hi = np.nanpercentile(v, [0, 50, 100])
            lines.append(f"{label:22s} min {lo:{fmt}}  median {med:{fmt}}  max {hi:{fmt}}  (per slice)")
        n_missing = int(np.isnan(self.outer).sum())
        lines.append(f"{len(self)} slices" + (f", {n_missing} without a head (nothing above {HEAD_THRESHOLD})"
                                               if n_missing else ""))
        return "\n".join(lines)


def head_mask(image: np.ndarray, threshold: float = HEAD_THRESHOLD) -> np.ndarray:
    """The head of one 2-D slice (0..255): the largest connected region above ``threshold`` after a
    binary closing (disk of radius 2) and hole filling. Boolean, the image's shape; all False if empty."""
    from scipy import ndimage
    from skimage.morphology import disk

    mask = ndimage.binary_fill_holes(ndimage.binary_closing(image > threshold, structure=disk(2)))
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    return labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))


def head_profile(images, distances: Sequence[int] = PROFILE_DISTANCES, image_size: int | None = None) -> HeadProfile:
    """The head's mean intensity profile, measured inward from its outline, over a set of slices.

    Per slice, the head is :func:`head_mask`; a pixel is ``d`` px inside the outline when its Euclidean
    distance to the nearest background pixel (``scipy.ndimage.distance_transform_edt``) is in
    ``(d, d + 1]``, so the outline (``d = 0``) is the head's pixels with a background 4-neighbour; pixels
    of the slice as it is (OASIS PNGs: 256x256). Real OASIS
    ``keras_png_slices`` (issue 17, six subjects): 39, 70, 98, 129, 137, 124, 107, 75, 56, 50, 52, 59, 72,
    82 at the default distances -- a soft outline, a bright ring 4-5 px in, a dim grey band under it.

    Args:
        images: a folder of PNG slices (read with :func:`read_split`), or an array ``(N, H, W)`` /
            ``(N, H, W, 1)`` / ``(H, W)``: integers are 0..255, floats are ``[0, 1]`` (as from
            :func:`load_images`).
        distances: the distances (px) reported in ``mean``.
        image_size: with a folder, resize the slices to this square size first (Lanczos).
    Returns:
        :class:`HeadProfile`.
    Raises:
        DatasetError: a missing or empty folder (one line), or an array of the wrong shape.
    """
    from scipy import ndimage

    if isinstance(images, (str, os.PathLike)):
        images = read_split(images, image_size).images
    a = np.asarray(images)
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    elif a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[0] == 0:
        raise DatasetError(f"head_profile: need slices (N, H, W) or (N, H, W, 1), got shape {np.shape(images)}")
    a = a.astype(np.float64) * (255.0 if np.issubdtype(a.dtype, np.floating) else 1.0)
    distances = np.asarray(distances, dtype=int)
    if distances.ndim != 1 or distances.size == 0 or distances.min() < 0:
        raise DatasetError(f"head_profile: distances must be non-negative pixels, got {distances.tolist()}")
    depth = max(int(distances.max()), 20) + 1  # the band is searched to 20 px
    per_slice = np.full((len(a), depth), np.nan)
    for i, image in enumerate(a):
        mask = head_mask(image)
        if not mask.any():
            continue
        at = np.ceil(ndimage.distance_transform_edt(mask)[mask]).astype(int) - 1  # (d, d + 1] px to the background -> d
        keep = at < depth
        counts = np.bincount(at[keep], minlength=depth)
        sums = np.bincount(at[keep], weights=image[mask][keep], minlength=depth)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_slice[i] = np.where(counts > 0, sums / counts, np.nan)
    with warnings.catch_warnings():  # all-NaN columns (no slice that deep) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(per_slice, axis=0)[distances]
    outer, peak, peak_at, band_min, band_at = (np.full(len(a), np.nan) for _ in range(5))
    for i, p in enumerate(per_slice):
        if np.isnan(p[0]):
            continue
        ring = np.nan_to_num(p[:11], nan=-1.0)
        k = int(np.argmax(ring))
        band = np.nan_to_num(p[k:21], nan=np.inf)
        j = k + int(np.argmin(band))
        outer[i], peak[i], peak_at[i], band_min[i], band_at[i] = p[0], p[k], k, p[j], j
    return HeadProfile(distances, mean, outer, peak, peak_at, band_min, band_at)


# ----------------------------------------------------------------------------------------------
# File names
# ----------------------------------------------------------------------------------------------


def slice_file_name(case_id: int, slice_index: int) -> str:
    """``(11, 12)`` -> ``"case_011_slice_12.nii.png"``, the OASIS name that :func:`parse_slice_name` reads."""
    return f"case_{case_id:03d}_slice_{slice_index}.nii.png"


def previous_slice_index(split) -> np.ndarray:
    """For each slice, the index (in ``split``) of the slice just below it in the same case, else -1.

    Slice ``k`` of case ``c`` pairs with slice ``k - 1`` of case ``c``; a case's first slice, a slice
    whose neighbour is missing, and a file whose name gives no case or slice get -1. This is the one
    place that pairs consecutive slices (the previous-slice prior's training pairs, its NLL, the
    real subjects of the evaluation).

    Args:
        split: anything with ``case_ids`` and ``slice_indices`` (a :class:`Split` or :class:`SplitInfo`).
    Returns:
        int64 ``(N,)``.
    """
    cases, slices = np.asarray(split.case_ids), np.asarray(split.slice_indices)
    where = {(c, k): n for n, (c, k) in enumerate(zip(cases.tolist(), slices.tolist())) if c != UNKNOWN and k != UNKNOWN}
    return np.array([where.get((c, k - 1), -1) if (c, k) in where else -1
                     for c, k in zip(cases.tolist(), slices.tolist())], dtype=np.int64)


def prior_dataset(codes: dict, conditioned: bool, prior_cfg, num_embeddings: int, batch_size: int,
                  shuffle_seed: int | None = None):
    """``tf.data`` of ``(inputs, codes)`` batches for the prior.

    With ``previous_slice`` each example is a consecutive pair from one case: the inputs are
    ``(codes, slice, previous)``, ``previous`` gathered from the split's codes by
    ``codes["previous"]`` (``dataset.previous_slice_index``; a case's first slice gets the "no
    previous slice" grid), so the pairs cost no second copy of the codes. A two-level prior
    (``top_codes``) also takes the slice's top-level codes, ``codes["top"]``, last.
    """
    import tensorflow as tf

    from pixelcnn import pack_inputs

    target = codes["codes"]
    slices = codes["slices"].astype(np.int32) if conditioned else None
    top = codes.get("top")
    if prior_cfg.top_codes and top is None:
        raise ValueError("prior_dataset: this prior has two levels (top_codes > 0) but the codes have no 'top' "
                         "grids (the top level's codes of each slice)")

    def shuffled(ds):
        return ds if shuffle_seed is None else ds.shuffle(len(target), seed=shuffle_seed)

    if not prior_cfg.previous_slice:
        ds = shuffled(tf.data.Dataset.from_tensor_slices((pack_inputs(target, slices, top=top), target)))
    else:
        table = tf.constant(target, tf.int32)
        none = tf.fill(tf.shape(table)[1:], num_embeddings)
        index = np.asarray(codes["previous"], np.int64)

        def pair(n, k):
            previous = tf.where(k >= 0, tf.gather(table, tf.maximum(k, 0)), none)
            current = tf.gather(table, n)
            return pack_inputs(current, None if slices_t is None else tf.gather(slices_t, n), previous,
                               None if top_t is None else tf.gather(top_t, n)), current

        slices_t = None if slices is None else tf.constant(slices)
        top_t = None if top is None else tf.constant(top, tf.int32)
        ds = shuffled(tf.data.Dataset.from_tensor_slices((np.arange(len(target), dtype=np.int64), index))).map(pair)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def subjects(split) -> dict[int, np.ndarray]:
    """``{case_id: indices into split, ordered by slice}`` for every case with a parsed name."""
    cases, slices = np.asarray(split.case_ids), np.asarray(split.slice_indices)
    out = {}
    for c in sorted(set(cases.tolist()) - {UNKNOWN}):
        idx = np.flatnonzero(cases == c)
        out[int(c)] = idx[np.argsort(slices[idx], kind="stable")]
    return out


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _build_parser(prog: str = "python dataset.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="OASIS brain-MRI PNG slices: check a data folder the way training reads it, or print its head profile. Bad input ends "
                    "with a one-line error and exit code 2. Building data sets (the demo set, OASIS-1 volume "
                    "conversion) is python build_data.py demo|prepare.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{check,profile}")
    check = sub.add_parser("check", help="load a data folder the way training does and summarise it",
                           description="Read ROOT/keras_png_slices_{train,validate,test} with read_oasis and print "
                                       "images, size and cases per split, plus any conversions applied; with "
                                       "keras_png_slices_seg_* folders also their tissue masks, matched by case and "
                                       "slice (a missing, extra or misaligned mask, or a grey level outside "
                                       "0/85/170/255, is a one-line error).")
    check.add_argument("root", type=Path, help="folder holding the keras_png_slices_* folders")
    check.add_argument("--image-size", type=int, default=None, help="resize images to this square size (Lanczos)")
    check.add_argument("--val-fraction", type=float, default=0.2,
                       help="cases held out of train when there is no validate folder (default: %(default)s)")
    check.add_argument("--seed", type=int, default=0, help="seed of that held-out split (default: %(default)s)")
    check.set_defaults(run=_run_check)
    prof = sub.add_parser("profile", help="the head's mean intensity profile inward from its outline",
                          description="Print the mean intensity (0-255) of a folder of slices at each distance "
                                      "(px) inward from the head's outline, and per-slice ranges of the outermost "
                                      "pixel, the bright ring's peak and the band under it (see head_profile), to "
                                      "compare a data set with the demo or with real OASIS.")
    prof.add_argument("folder", type=Path, help="a folder of PNG slices, e.g. data/oasis_demo/keras_png_slices_test")
    prof.add_argument("--image-size", type=int, default=None,
                      help="resize the slices to this square size first (the OASIS figures are at 256)")
    prof.set_defaults(run=_run_profile)
    return parser


def _run_check(args: argparse.Namespace) -> None:
    masks = has_masks(args.root)
    splits = read_oasis(args.root, image_size=args.image_size, val_fraction=args.val_fraction, seed=args.seed,
                        masks=masks)
    for name, s in splits.items():
        size = f"{s.images.shape[2]}x{s.images.shape[1]}" if len(s) else "-"
        cases = set(s.case_ids.tolist()) - {UNKNOWN}
        line = f"{name:9s} {len(s):6d} images  {size:>9s}  {len(cases):4d} cases"
        if s.masks is not None and len(s):
            share = np.bincount(s.masks.ravel(), minlength=len(TISSUES)) / s.masks.size
            line += "  masks aligned: " + ", ".join(f"{t} {p:.1%}" for t, p in zip(TISSUES[1:], share[1:]))
        print(line)
    if not masks:
        print(f"no {SEG_DIRS['train']}/ folder: no tissue masks (the images alone were checked)")


def has_masks(root: str | os.PathLike) -> bool:
    """True when ``root`` (or its ``keras_png_slices_data``) holds any ``keras_png_slices_seg_*`` folder."""
    root = _find_split_root(Path(root))
    return any((root / d).is_dir() for d in SEG_DIRS.values())


def _run_profile(args: argparse.Namespace) -> None:
    print(f"{args.folder}: head profile")
    print(head_profile(args.folder, image_size=args.image_size).table())


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command (``args.run``) of ``dataset.py`` or ``build_data.py``: every DatasetWarning
    shown, even when repeated; bad input (DatasetError, OSError) a one-line error. Returns the exit code."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", DatasetWarning)  # every conversion, even when repeated
            args.run(args)
    except (DatasetError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "python dataset.py") -> int:
    """The command line: ``check`` and ``profile``. Returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _build_parser(prog)
    if argv[:1] in (["demo"], ["prepare"]):  # they build data sets: not the loader's commands
        parser.error(f"{argv[0]} builds a data set: run python build_data.py {' '.join(argv)}")
    args = parser.parse_args(argv)
    return run_command(args)


if __name__ == "__main__":
    import utils

    with utils.one_line_warnings():  # "warning: <message>", as every command prints them
        sys.exit(main())
