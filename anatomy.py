"""The anatomy judge: segment what the models make, and compare its anatomy with real slices'.

Pixel measures (SSIM, the judge's slice-position features, the two-sample test) can call mottled
slices excellent; anatomy is measured by segmenting, as Tudosiu et al. 2022 ("Morphology-preserving
autoregressive 3D generative modelling of the brain") judge generated brains by the volumes of their
segmented structures. The run's segmenter (``segmenter.py``, trained on real slices and masks only)
labels samples, reconstructions and real slices alike; :func:`anatomy_readout` measures each slice,
``evaluation.anatomy_scores`` compares a set with the real test split, each figure beside the real
validate slices' value -- the floor a perfect generator reaches:

* tissue area by slice position: the mean area of CSF, grey and white matter at each position,
  against real test slices at the same positions (mean absolute difference / real area);
* fragmentation: connected components of each tissue per slice (8-connected; mottling makes many
  small ones);
* ventricles: the largest component of deep CSF (at least :data:`VENTRICLE_DEPTH` of the side inside
  the head) with any at least a quarter its size (the two lateral ventricles often part at the
  septum), their area as a fraction of the head's, and their left-right symmetry (Dice of them with
  their mirror image across the head's midline; rows run left-right in OASIS's slices);
* confidence: the mean highest class probability inside the head (a slice the segmenter cannot read
  is not anatomy);
* a Frechet distance of the segmenter's bottleneck features (``evaluation.frechet_distance``);
* per subject (:func:`subject_anatomy`): each tissue's volume, against real subjects'.

This module measures; ``evaluation.anatomy_scores`` gathers the figures of each set beside the floor
(it needs ``evaluation.frechet_distance``, so it lives there, and ``evaluation`` re-exports this
module's functions). ``predict.py evaluate`` (and ``--subjects``) calls it when the run has
``segmenter.keras``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TISSUE_NAMES = ("csf", "grey", "white")  # labels 1, 2, 3 of dataset.TISSUES (0 is background)
VENTRICLE_DEPTH = 0.1  # deep CSF: at least this fraction of the image side inside the head's outline
VENTRICLE_PART = 0.25  # a deep CSF component this fraction of the largest one's size belongs to the ventricles


def tissue_dice(predicted, true) -> dict[str, float]:
    """Dice ``2 |P & T| / (|P| + |T|)`` of each tissue over a whole set of label maps.

    Args:
        predicted, true: int labels ``(N, H, W)`` (0..3, ``dataset.TISSUES``), the same shape.
    Returns:
        ``{"csf", "grey", "white"} -> Dice`` pooled over all pixels of all slices (NaN for a tissue
        found in neither).
    Raises:
        ValueError: shapes differ or the sets are empty (a Dice of nothing is no success).
    """
    p, t = np.asarray(predicted), np.asarray(true)
    if p.shape != t.shape or p.size == 0:
        raise ValueError(f"tissue_dice: need two non-empty label sets of one shape, got {p.shape} and {t.shape}")
    out = {}
    for k, name in enumerate(TISSUE_NAMES, start=1):
        a, b = p == k, t == k
        total = int(a.sum() + b.sum())
        out[name] = float(2 * (a & b).sum() / total) if total else float("nan")
    return out


@dataclass
class AnatomyReadout:
    """What the segmenter reads in each of N slices (all arrays have N rows).

    ``labels`` uint8 ``(N, H, W)``; ``areas`` ``(N, 3)`` pixels of CSF, grey, white matter;
    ``components`` ``(N, 3)`` their 8-connected components; ``head_area`` ``(N,)`` pixels;
    ``ventricle_area`` ``(N,)`` the ventricles (see :func:`_ventricle`) as a fraction of the head (0: none);
    ``ventricle_symmetry`` ``(N,)`` its Dice with its mirror image (NaN: no ventricle);
    ``confidence`` ``(N,)`` mean highest class probability inside the head (NaN: no head);
    ``features`` ``(N, D)`` bottleneck features.
    """

    labels: np.ndarray
    areas: np.ndarray
    components: np.ndarray
    head_area: np.ndarray
    ventricle_area: np.ndarray
    ventricle_symmetry: np.ndarray
    confidence: np.ndarray
    features: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def _head(image: np.ndarray) -> np.ndarray:
    """The head of one slice in [0, 1]: ``dataset.head_mask`` (above 20 / 255, closed, holes filled)."""
    from dataset import head_mask

    return head_mask(image * 255.0)


def _ventricle(labels: np.ndarray, head: np.ndarray) -> tuple[float, float]:
    """``(area / head area, mirror Dice)`` of the ventricles of one slice: the largest deep CSF component
    and any at least :data:`VENTRICLE_PART` of its size."""
    from scipy import ndimage

    if not head.any():
        return 0.0, float("nan")
    depth = ndimage.distance_transform_edt(np.pad(head, 1))[1:-1, 1:-1]
    deep = (labels == 1) & (depth >= VENTRICLE_DEPTH * labels.shape[0])
    comp, n = ndimage.label(deep, structure=np.ones((3, 3)))
    if n == 0:
        return 0.0, float("nan")
    sizes = np.bincount(comp.ravel())[1:]
    # the largest body of deep CSF, with any at least a quarter its size: the two lateral ventricles are
    # often apart at the septum, and a mirror image of one of them alone would never match
    v = np.isin(comp, 1 + np.flatnonzero(sizes >= VENTRICLE_PART * sizes.max()))
    # Mirror across the head's midline: rows run along the subject's left-right axis.
    rows = np.flatnonzero(head.any(axis=1))
    axis = rows[0] + rows[-1]  # row r mirrors to axis - r
    r, c = np.nonzero(v)
    mirrored = np.zeros_like(v)
    rm = axis - r
    keep = (rm >= 0) & (rm < v.shape[0])
    mirrored[rm[keep], c[keep]] = True
    return float(v.sum() / head.sum()), float(2 * (v & mirrored).sum() / (v.sum() + mirrored.sum()))


def anatomy_readout(segmenter, images, batch_size: int = 64) -> AnatomyReadout:
    """Segment ``images`` (float ``(N, H, W, 1)`` in [0, 1] or uint8) and measure each slice's anatomy.

    Raises:
        ValueError: no images.
    """
    from scipy import ndimage

    from segmenter import segmenter_outputs

    x = np.asarray(images)
    x = np.divide(x, 255, dtype=np.float32) if x.dtype == np.uint8 else x.astype(np.float32, copy=False)
    if x.ndim == 3:
        x = x[..., None]
    if len(x) == 0:
        raise ValueError("anatomy_readout: no images to read")
    probs, features = segmenter_outputs(segmenter, x, batch_size)
    labels = np.argmax(probs, axis=-1).astype(np.uint8)
    n = len(x)
    areas, components = np.zeros((n, 3)), np.zeros((n, 3))
    head_area, v_area, v_sym, conf = np.zeros(n), np.zeros(n), np.full(n, np.nan), np.full(n, np.nan)
    eight = np.ones((3, 3))
    for i in range(n):
        head = _head(x[i, :, :, 0])
        head_area[i] = head.sum()
        for k in range(3):
            tissue = labels[i] == k + 1
            areas[i, k] = tissue.sum()
            components[i, k] = ndimage.label(tissue, structure=eight)[1]
        v_area[i], v_sym[i] = _ventricle(labels[i], head)
        if head.any():
            conf[i] = probs[i].max(axis=-1)[head].mean()
    return AnatomyReadout(labels, areas, components, head_area, v_area, v_sym, conf, features)


def area_difference(readout: AnatomyReadout, positions, reference: AnatomyReadout, reference_positions) -> np.ndarray:
    """Per tissue (CSF, grey, white), the mean over slice positions of ``|mean area of the set at the
    position - mean area of the reference there| / mean area of the reference there``, over the
    positions both sets have (either positions None: all slices pooled as one position). Returns ``(3,)``.

    Raises:
        ValueError: the sets share no slice position.
    """
    pooled = positions is None or reference_positions is None
    pos = np.zeros(len(readout), int) if pooled else np.asarray(positions)
    ref_pos = np.zeros(len(reference), int) if pooled else np.asarray(reference_positions)
    shared = sorted(set(pos.tolist()) & set(ref_pos.tolist()))
    if not shared:
        raise ValueError("area_difference: the set and the reference share no slice position")
    diffs = []
    for k in shared:
        a = readout.areas[pos == k].mean(axis=0)
        b = reference.areas[ref_pos == k].mean(axis=0)
        diffs.append(np.abs(a - b) / np.maximum(b, 1.0))
    return np.mean(diffs, axis=0)


def anatomy_summary(readout: AnatomyReadout, name: str) -> dict[str, float]:
    """The set's mean fragmentation, ventricle area and symmetry, and confidence, keyed
    ``anatomy_{components[_tissue],ventricle_area,ventricle_symmetry,confidence}_{name}``."""
    out = {}
    for k, tissue in enumerate(TISSUE_NAMES):
        out[f"anatomy_components_{tissue}_{name}"] = float(readout.components[:, k].mean())
    out[f"anatomy_components_{name}"] = float(readout.components.sum(axis=1).mean())
    out[f"anatomy_ventricle_area_{name}"] = float(readout.ventricle_area.mean())
    sym = readout.ventricle_symmetry
    out[f"anatomy_ventricle_symmetry_{name}"] = float(np.nanmean(sym)) if np.isfinite(sym).any() else float("nan")
    out[f"anatomy_confidence_{name}"] = float(np.nanmean(readout.confidence)) if np.isfinite(
        readout.confidence).any() else float("nan")
    return out


def subject_anatomy(segmenter, generated, real, batch_size: int = 64) -> dict[str, Any]:
    """Each subject's tissue volumes (pixels summed over its slices), generated against real subjects.

    Args:
        generated: ``(N, S, H, W[, 1])`` slabs; real: ``(M, S, H, W[, 1])`` real test subjects, M >= 2.
    Returns:
        Per tissue ``anatomy_volume_{tissue}_{generated,real}`` (mean pixels per subject),
        ``anatomy_volume_{tissue}_sd_real`` and ``anatomy_volume_{tissue}_z_generated``: the mean
        absolute z-score of the generated subjects' volumes against the real subjects' (about 0.8 for
        subjects like the real ones), and ``anatomy_volume_z_generated``, its mean over tissues.
    """
    generated, real = np.asarray(generated), np.asarray(real)
    if len(real) < 2 or len(generated) < 1:
        raise ValueError(f"subject_anatomy: needs >= 1 generated and >= 2 real subjects, got {len(generated)}, {len(real)}")

    def volumes(slabs):
        flat = slabs.reshape(-1, *slabs.shape[2:])
        return anatomy_readout(segmenter, flat, batch_size).areas.reshape(len(slabs), -1, 3).sum(axis=1)

    v_gen, v_real = volumes(generated), volumes(real)
    mu, sd = v_real.mean(axis=0), v_real.std(axis=0, ddof=1)
    out: dict[str, Any] = {}
    z = np.abs(v_gen - mu) / np.maximum(sd, 1.0)
    for k, tissue in enumerate(TISSUE_NAMES):
        out[f"anatomy_volume_{tissue}_generated"] = float(v_gen[:, k].mean())
        out[f"anatomy_volume_{tissue}_real"] = float(mu[k])
        out[f"anatomy_volume_{tissue}_sd_real"] = float(sd[k])
        out[f"anatomy_volume_{tissue}_z_generated"] = float(z[:, k].mean())
    out["anatomy_volume_z_generated"] = float(z.mean())
    return out


def plot_anatomy(rows: list[tuple[str, Any, np.ndarray]], path, columns: int = 8) -> Path:
    """A figure of slices above their segmentations: ``rows = [(label, images, labels), ...]``; each
    gives two rows (the slices, then their tissue labels drawn in OASIS's grey levels)."""
    import utils

    drawn = []
    for label, images, labels in rows:
        k = min(columns, len(images))
        drawn += [(label, np.asarray(images)[:k]), (f"{label}: tissues", np.asarray(labels)[:k] / 3.0)]
    return utils.plot_image_rows(drawn, path)
