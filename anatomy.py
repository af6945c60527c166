"""The anatomy judge: segment what the models make, and compare its anatomy with real slices'.

Pixel measures (SSIM, the judge's slice-position features, the two-sample test) can call mottled
slices excellent; anatomy is measured by segmenting, as Tudosiu et al. 2022 ("Morphology-preserving
autoregressive 3D generative modelling of the brain") judge generated brains by the volumes of their
segmented structures. The run's segmenter (``segmenter.py``, trained on real slices and masks only)
labels samples, reconstructions and real slices alike; :func:`anatomy_readout` measures each slice,
:func:`anatomy_scores` compares a set with the real test split, each figure beside the real validate
slices' value -- the floor a perfect generator reaches:

* tissue area by slice position: the mean area of CSF, grey and white matter at each position,
  against real test slices at the same positions (mean absolute difference / real area);
* fragmentation: connected components of each tissue per slice (8-connected; mottling makes many
  small ones);
* ventricles: the largest component of deep CSF (at least :data:`VENTRICLE_DEPTH` of the side inside
  the head), its area as a fraction of the head's, and its left-right symmetry (Dice of it with its
  mirror image across the head's midline; rows run left-right in OASIS's slices);
* confidence: the mean highest class probability inside the head (a slice the segmenter cannot read
  is not anatomy);
* a Frechet distance of the segmenter's bottleneck features (``evaluation.frechet_distance``);
* per subject (:func:`subject_anatomy`): each tissue's volume, against real subjects'.

``evaluation`` re-exports these functions; ``predict.py evaluate`` (and ``--subjects``) calls them
when the run has ``segmenter.keras``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TISSUE_NAMES = ("csf", "grey", "white")  # labels 1, 2, 3 of dataset.TISSUES (0 is background)
VENTRICLE_DEPTH = 0.1  # deep CSF: at least this fraction of the image side inside the head's outline
MIN_SEGMENTER_DICE = 0.7  # below this on the real test split, the segmenter's readings mean little


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
    ``ventricle_area`` ``(N,)`` the largest deep CSF component as a fraction of the head (0: none);
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
    from evaluation import brain_interior_mask

    return brain_interior_mask(image, margin=0)


def _ventricle(labels: np.ndarray, head: np.ndarray) -> tuple[float, float]:
    """``(area / head area, mirror Dice)`` of the largest deep CSF component of one slice."""
    from scipy import ndimage

    if not head.any():
        return 0.0, float("nan")
    depth = ndimage.distance_transform_edt(np.pad(head, 1))[1:-1, 1:-1]
    deep = (labels == 1) & (depth >= VENTRICLE_DEPTH * labels.shape[0])
    comp, n = ndimage.label(deep, structure=np.ones((3, 3)))
    if n == 0:
        return 0.0, float("nan")
    v = comp == 1 + int(np.argmax(np.bincount(comp.ravel())[1:]))
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

    from evaluation import _as_float_images
    from segmenter import segmenter_outputs

    x = _as_float_images(images)
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


def _summary(readout: AnatomyReadout, name: str) -> dict[str, float]:
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


def anatomy_scores(segmenter, sets: dict[str, tuple[Any, Any]], test_images, test_positions,
                   test_masks=None, batch_size: int = 64) -> tuple[dict[str, Any], dict[str, AnatomyReadout]]:
    """The anatomy judge's figures of each image set against the real test split.

    Args:
        segmenter: the run's ``segmenter.keras``.
        sets: ``name -> (images (N, H, W, 1), slice positions (N,) or None)``, N >= 2 each; include
            ``"real_validate"`` (real unseen slices): its figures are the floor a perfect generator
            reaches, the others read beside it (samples, reconstructions, subjects).
        test_images, test_positions: the real test split (uint8 or float) and its slice indices.
        test_masks: the test split's true tissue labels, if any: the segmenter's own Dice on them is
            reported, and a warning says when it is below :data:`MIN_SEGMENTER_DICE` (an untrained
            segmenter's figures would read as anatomy that is not there).
    Returns:
        ``(metrics, readouts)``. Per set ``S``: ``anatomy_area_difference_S`` (mean over tissues) and
        ``anatomy_area_difference_{csf,grey,white}_S``, ``anatomy_components_{csf,grey,white}_S`` and
        ``anatomy_components_S`` (their sum), ``anatomy_ventricle_area_S``,
        ``anatomy_ventricle_symmetry_S``, ``anatomy_confidence_S``, ``anatomy_frechet_S_vs_test``;
        the same properties of the real test slices (``_real_test``); ``anatomy_segmenter_test_dice_*``
        with ``test_masks``. ``readouts``: the :class:`AnatomyReadout` of each set and ``"real_test"``.
    Raises:
        ValueError: a set with fewer than two images, or no test slices.
    """
    from evaluation import frechet_distance

    if len(test_images) < 2:
        raise ValueError(f"anatomy_scores: needs at least two test slices, got {len(test_images)}")
    for name, (images, _) in sets.items():
        if len(images) < 2:
            raise ValueError(f"anatomy_scores: the set {name!r} has {len(images)} image(s); needs at least two")
    test = anatomy_readout(segmenter, test_images, batch_size)
    readouts = {"real_test": test}
    metrics: dict[str, Any] = {}
    if test_masks is not None:
        dice = tissue_dice(test.labels, test_masks)
        metrics.update({f"anatomy_segmenter_test_dice_{k}": v for k, v in dice.items()})
        worst = min(dice.values())
        if not worst >= MIN_SEGMENTER_DICE:
            warnings.warn(f"the segmenter's Dice on the real test split is {worst:.2f} (below "
                          f"{MIN_SEGMENTER_DICE}): its anatomy figures mean little; train it longer "
                          "(python train.py --stage segmenter)", stacklevel=2)
    if len(np.unique(test.labels)) < 2:
        warnings.warn("the segmenter labels every real test pixel alike: it did not learn, so its anatomy "
                      "figures mean nothing", stacklevel=2)
    metrics.update(_summary(test, "real_test"))
    for name, (images, positions) in sets.items():
        r = anatomy_readout(segmenter, images, batch_size)
        readouts[name] = r
        diff = area_difference(r, positions, test, test_positions)
        metrics[f"anatomy_area_difference_{name}"] = float(diff.mean())
        for k, tissue in enumerate(TISSUE_NAMES):
            metrics[f"anatomy_area_difference_{tissue}_{name}"] = float(diff[k])
        metrics.update(_summary(r, name))
        metrics[f"anatomy_frechet_{name}_vs_test"] = frechet_distance(r.features, test.features)
    return metrics, readouts


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
