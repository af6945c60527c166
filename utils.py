"""Small helpers shared by the scripts: seeding, image batches, image grids and plots, JSON files, and
the image geometry that several metrics share (the central crop, the head's interior mask).

The metrics (SSIM, PSNR, MS-SSIM, code usage, NLL, realism, sharpness, ...) live in ``evaluation.py``;
``gaussian_band`` stays here because the VQ-VAE's SSIM loss (``vqvae.py``) uses it too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np


POWER_BANDS = 8  # equal bands of radial frequency from 0 to Nyquist (0.5 cycles per pixel)


def frequency_bands(h: int, w: int, bands: int = POWER_BANDS) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(edges, members)``: the band edges in cycles per pixel and, per band, the ``(H, W)`` boolean mask
    of the 2-D FFT's frequencies in it (radius ``sqrt(fx^2 + fy^2)`` in ``(edge_b, edge_b+1]``; the zero
    frequency and the corners beyond the Nyquist radius 0.5 left out). The one definition of the bands
    that ``evaluation``'s power spectrum and the VQ-VAE's band-power loss share."""
    radius = np.hypot(*np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij"))  # (H, W)
    edges = np.linspace(0.0, 0.5, bands + 1)
    band = np.digitize(radius, edges[1:-1])  # 0 .. bands - 1; radii above 0.5 go to the last, masked below
    keep = (radius > 0) & (radius <= 0.5)
    return edges, [keep & (band == b) for b in range(bands)]


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and the Keras/TensorFlow backends in one call."""
    import keras

    keras.utils.set_random_seed(int(seed))


def as_image_batch(images) -> np.ndarray:
    """``(H, W)``, ``(H, W, 1)``, ``(N, H, W)`` or ``(N, H, W, 1)`` -> float32 ``(N, H, W, 1)``."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 2:
        x = x[None, ..., None]
    elif x.ndim == 3:
        x = x[None] if x.shape[-1] == 1 else x[..., None]
    if x.ndim != 4:
        raise ValueError(f"expected images shaped (N, H, W, 1), got {np.shape(images)}")
    return x


def to_uint8(images) -> np.ndarray:
    """Float images in [0, 1] -> uint8 ``round(clip(x, 0, 1) * 255)``: what a saved 8-bit PNG holds."""
    return np.round(np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def gaussian_band(n: int, size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """``(n - size + 1, n)`` float32 matrix whose rows are the normalised 1-D Gaussian window at each
    valid offset: ``band @ x`` filters ``x`` along one axis as SSIM's window does (valid padding)."""
    coords = np.arange(size, dtype="float64") - (size - 1) / 2.0
    g = np.exp(-0.5 * (coords / sigma) ** 2)
    band = np.zeros((n - size + 1, n), "float32")
    for i in range(n - size + 1):
        band[i, i:i + size] = g / g.sum()
    return band


def save_image_grid(
    images,
    path: str | os.PathLike,
    ncols: int | None = None,
    titles: Sequence[str] | None = None,
    suptitle: str | None = None,
    cell_inches: float = 1.6,
) -> Path:
    """Save grayscale images ``(N, H, W[, 1])`` in ``[0, 1]`` as one PNG grid with matplotlib.

    Args:
        images: the images, shown with a fixed 0..1 gray scale so grids are comparable.
        path: output PNG; parent folders are created.
        ncols: columns (default: about the square root of N).
        titles: optional caption per image.
        suptitle: optional title above the grid.
    Returns:
        The path written.
    """
    plt = _pyplot()
    x = as_image_batch(images)[..., 0]
    n = len(x)
    if n == 0:
        raise ValueError("save_image_grid: no images to draw")
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell_inches * ncols, cell_inches * nrows + (0.4 if suptitle else 0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(x[i], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


def _json_default(obj: Any):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON, atomically (NumPy scalars and arrays, paths allowed)."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default)
    return atomic_write_bytes(path, (text + "\n").encode())


def load_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or broken file raises ``ValueError`` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); delete or fix it") from None


def library_versions() -> dict[str, str]:
    """Versions of the libraries a run depends on, for ``config.json``."""
    import platform

    import keras
    import tensorflow as tf

    return {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__}


# ----------------------------------------------------------------------------------------------
# Figures shared by train.py and predict.py (matplotlib, Agg backend: no display needed).
# ----------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as PNG (creating folders) and free it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def read_history_csv(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a Keras ``CSVLogger`` file into ``{column: float array}`` (empty dict if absent)."""
    import csv

    path = Path(path)
    if not path.exists():
        return {}
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {key: np.asarray([float(r[key]) if r[key] not in ("", None) else np.nan for r in rows])
            for key in rows[0]}


def plot_training_curves(histories: dict[str, dict[str, np.ndarray]], path: str | os.PathLike) -> Path:
    """One panel per (stage, metric) pair of training and validation curves against epoch.

    Args:
        histories: ``{stage title: read_history_csv(...)}``; metrics with a ``val_`` twin are drawn
            together. Empty histories are skipped.
    """
    plt = _pyplot()
    panels = []
    for stage, hist in histories.items():
        for key in hist:
            if key == "epoch" or key.startswith("val_"):
                continue
            panels.append((stage, key, hist))
    if not panels:
        raise ValueError("plot_training_curves: no history to plot")
    ncols = min(4, len(panels))
    nrows = int(math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (stage, key, hist) in zip(axes.flat, panels):
        epochs = hist.get("epoch", np.arange(len(hist[key]))) + 1
        ax.plot(epochs, hist[key], label="train", marker=".")
        if f"val_{key}" in hist:
            ax.plot(epochs, hist[f"val_{key}"], label="validate", marker=".")
            ax.legend(fontsize=7)
        ax.set_title(f"{stage}: {key}", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_codebook_usage(usage: dict, path: str | os.PathLike, title: str = "codebook usage") -> Path:
    """Bar chart of how often each code is used, most used first, with perplexity in the title.

    Args:
        usage: ``evaluation.code_usage(...)``: ``counts`` (K,), ``perplexity``, ``active_codes``.
    """
    plt = _pyplot()
    counts = np.asarray(usage["counts"])
    order = np.argsort(-counts, kind="stable")
    fig, ax = plt.subplots(figsize=(7, 2.8))
    ax.bar(np.arange(len(counts)), counts[order] / max(1, counts.sum()), width=1.0)
    ax.set_xlabel("code (sorted by use)")
    ax.set_ylabel("fraction of positions")
    ax.set_title(f"{title}: perplexity {usage['perplexity']:.1f} of {len(counts)}, "
                 f"{100 * usage['active_codes']:.0f}% active", fontsize=9)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_power_spectrum(edges, spectra: dict[str, Any], path: str | os.PathLike, title: str | None = None) -> Path:
    """Radial power spectra on a log scale, one curve per image set, against the band centres.

    Args:
        edges: ``(bands + 1,)`` band edges in cycles per pixel (``evaluation.radial_power_spectrum``).
        spectra: ``{label: power (bands,)}``, e.g. real, reconstructions, samples.
    """
    plt = _pyplot()
    edges = np.asarray(edges, float)
    centres = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, power in spectra.items():
        ax.plot(centres, np.asarray(power, float), marker=".", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("radial frequency (cycles per pixel; Nyquist 0.5)", fontsize=8)
    ax.set_ylabel("mean power per frequency", fontsize=8)
    ax.set_title(title or "radial power spectrum", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_image_rows(rows: Sequence[tuple[str, Any]], path: str | os.PathLike, titles=None,
                    cmaps: Sequence[str] | None = None, cell_inches: float = 1.6) -> Path:
    """Draw aligned rows of images: ``rows = [(label, images (N, H, W[, 1])), ...]``.

    Used for "original / reconstruction" and "image / code grid" figures. Grayscale rows are drawn
    on a fixed 0..1 scale; a row with cmap other than "gray" (a code grid) uses its own range.
    """
    plt = _pyplot()
    n = max(len(imgs) for _, imgs in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(cell_inches * n + 0.8, cell_inches * len(rows)), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        imgs = np.asarray(imgs)
        if imgs.ndim == 4:
            imgs = imgs[..., 0]
        cmap = cmaps[r] if cmaps else "gray"
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(imgs):
                kw = {"vmin": 0.0, "vmax": 1.0} if cmap == "gray" else {}
                ax.imshow(imgs[c], cmap=cmap, interpolation="nearest", **kw)
                if titles is not None and titles[r] is not None:
                    ax.set_title(titles[r][c], fontsize=7)
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, path)


def quiet_tensorflow(verbose: bool = False) -> None:
    """Start TensorFlow without its start-up log lines on the console, unless ``verbose``.

    TensorFlow 2.21 writes its start-up notices (oneDNN, "Could not find cuda drivers", CPU
    features, "failed call to cuInit") to stderr from C++ before absl logging is initialised, where
    ``TF_CPP_MIN_LOG_LEVEL`` does not reach them. So the import and the first device query run with
    file descriptor 2 pointed at ``/dev/null``; after that stderr is back, ``TF_CPP_MIN_LOG_LEVEL`` is
    3 (no C++ log lines: on a CPU, Grappler logs "remapper failed" errors it recovers from) and
    TensorFlow's and absl's Python loggers are at ERROR. Python exceptions are not affected.
    Call before anything imports TensorFlow (the scripts do it first thing); once TensorFlow is
    imported only the logger levels change.
    """
    if verbose:
        return
    import sys

    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if "tensorflow" not in sys.modules:
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            import tensorflow as tf

            tf.config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
    import absl.logging
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    absl.logging.set_verbosity(absl.logging.ERROR)


def _show_warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    (file or sys.stderr).write(f"warning: {message}\n")


@contextlib.contextmanager
def one_line_warnings():
    """Inside the block every warning prints as one line, ``warning: <message>``, on stderr.

    Python's default adds the file, line number and source line of the ``warnings.warn`` call, which
    tell a user of the command line nothing. Each script (``train.py``, ``predict.py``, ``dataset.py``,
    ``build_data.py``) runs its ``main`` inside this when started from a shell: one formatter for every
    command. Called in-process (a test, a notebook), ``main`` leaves warnings to the caller. The
    previous ``warnings.showwarning`` and filters come back on exit.
    """
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning_line
        yield


# ----------------------------------------------------------------------------------------------
# Image geometry: the central crop and the head's interior (used by evaluation.py, two_sample.py,
# anomaly.py; evaluation.py names them too)
# ----------------------------------------------------------------------------------------------

def center_crop(images, fraction: float = 0.5) -> np.ndarray:
    """The central ``fraction`` of each side of every image: ``(N, H, W, 1) -> (N, h, w, 1)``.

    With ``fraction=0.5`` this is the central half of the height and of the width, where the
    anatomy is: a best-SSIM search on these crops ("interior realism") cannot be carried by the
    outline and the black background, which full-image SSIM rewards.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"center_crop: fraction must be in (0, 1], got {fraction}")
    x = np.asarray(images)
    h, w = x.shape[1:3]
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[:, top:top + ch, left:left + cw]


def brain_interior_mask(image, threshold: float = 0.1, margin: int | None = None) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the head's interior, at least ``margin`` pixels from its outline.

    Steps: foreground = pixels above ``threshold``; a small closing (radius 2 % of the side)
    bridges thin gaps in a bright scalp ring; holes are filled (the dark skull band, ventricles and
    CSF inside the head are inside it); the largest connected component is the head (noise specks
    in a sample are dropped); then every pixel closer than ``margin`` to the outside (Euclidean
    distance transform) is removed, so the outline -- scalp, skull and the brain edge of a
    skull-stripped slice -- does not count as texture.

    Args:
        image: ``(H, W)`` or ``(H, W, 1)`` in [0, 1].
        threshold: intensity above which a pixel is head rather than background.
        margin: pixels removed inside the outline (default: 6 % of the shorter side, 8 px at 128).
    Returns:
        bool ``(H, W)``; all False when no head is found.
    """
    from scipy import ndimage
    from skimage.morphology import disk

    x = np.asarray(image, dtype=np.float32)
    x = x[..., 0] if x.ndim == 3 else x
    side = min(x.shape)
    margin = max(1, round(0.06 * side)) if margin is None else int(margin)
    radius = max(1, round(0.02 * side))
    fg = np.pad(x > threshold, radius + 1)  # padded so the closing does not stick to the border
    fg = ndimage.binary_closing(fg, structure=disk(radius))[radius + 1:-radius - 1, radius + 1:-radius - 1]
    fg = ndimage.binary_fill_holes(fg)
    labels, n = ndimage.label(fg)
    if n == 0:
        return np.zeros_like(fg)
    head = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    # Distance to the nearest background pixel, the image border counting as background.
    dist = ndimage.distance_transform_edt(np.pad(head, 1))[1:-1, 1:-1]
    return dist > margin
