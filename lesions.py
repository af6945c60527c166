"""Synthetic lesions: the anomaly benchmark's ground truth (``bench/bench_anomaly.py``), also used by
the notebook and the tests.

:func:`add_lesion` paints one lesion of a :class:`LesionKind` (bright / dark, small / medium /
large, sharp / soft, high / low contrast, in grey / white matter) into a slice, placed by the
data's tissue mask; :func:`add_lesion_volume` paints one that spans neighbouring slices of a case;
:func:`lesion_kinds` lists kinds so that every factor level appears equally often;
:func:`add_synthetic_lesion` places a blob without a tissue mask. ``anomaly`` re-exports every
name, so ``anomaly.add_lesion`` works as before. NumPy and SciPy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import evaluation


def _lesion_shape(rng: np.random.Generator) -> dict:
    """Random shape parameters of one lesion: aspect ratio, angle, outline wobble, texture seed."""
    return {"aspect": rng.uniform(0.6, 1.0), "angle": rng.uniform(0, np.pi),
            "wobble": [(rng.uniform(0, 0.12), rng.uniform(0, 2 * np.pi)) for _ in (2, 3, 4)],
            "texture_seed": int(rng.integers(2 ** 31))}


def _paint(img, cy: int, cx: int, r: float, shape: dict, edge_px: float, target_fn):
    """Paint one elliptical blob of long semi-axis ``r`` px at ``(cy, cx)`` into ``img`` ``(H, W)``.

    ``edge_px`` is the width of the logistic edge ramp (about 1 px: sharp); ``target_fn(local)``
    gives the lesion's intensity from the median tissue intensity under it. Returns
    ``(painted (H, W) float32, mask (H, W) bool where the opacity >= 0.5)``.
    """
    from scipy import ndimage

    ry, rx, angle = r, r * shape["aspect"], shape["angle"]
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(np.float32)
    u = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
    v = -(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
    theta = np.arctan2(v, u)
    wobble = 1 + sum(a * np.cos(k * theta + ph) for k, (a, ph) in zip((2, 3, 4), shape["wobble"]))
    rho = np.sqrt((u / ry) ** 2 + (v / rx) ** 2) / wobble                 # 1 on the outline
    alpha = 1 / (1 + np.exp(np.clip((rho - 1) * ry * 4.0 / max(edge_px, 1e-3), -50, 50)))
    texture = ndimage.gaussian_filter(np.random.default_rng(shape["texture_seed"]).standard_normal(img.shape), 1.5)
    texture = 1 + 0.08 * texture / (texture.std() + 1e-8)
    inside = alpha >= 0.5
    local = float(np.median(img[inside])) if inside.any() else float(img[cy, cx])
    target = target_fn(local)
    out = np.clip(img * (1 - alpha) + np.clip(target * texture, 0, 1) * alpha, 0, 1).astype(np.float32)
    return out, inside


def add_synthetic_lesion(image, rng: np.random.Generator, radius: float, bright: bool,
                         margin: float = 0.12) -> tuple[np.ndarray, np.ndarray] | None:
    """Paint one lesion-like blob into a slice, well inside the head (no tissue mask needed).

    The blob is an ellipse (axes ``radius`` and 0.6-1 x ``radius``, random angle) whose outline is
    perturbed by low angular harmonics, with a soft edge (a logistic ramp about 1 px wide) and a
    smooth multiplicative texture (+-8 %). Bright lesions are the local tissue plus 0.25-0.4, dark
    ones 0.25-0.5 x the local tissue (0 to 1 intensity scale). The centre is drawn from the points
    at least ``margin x H + 1.2 x radius`` from the head's outline
    (``evaluation.brain_interior_mask``), so the lesion lies inside the brain even when a scalp
    ring and skull band surround it. :func:`add_lesion` places lesions of a :class:`LesionKind` by
    tissue mask (the benchmark's generator).

    Args:
        image: ``(H, W)`` or ``(H, W, 1)`` in [0, 1].
        radius: the long semi-axis as a fraction of ``H``.
    Returns:
        ``(lesioned image like the input, mask (H, W) bool where the lesion's opacity >= 0.5)``, or
        None when the head has no room for the lesion (e.g. a small top or bottom slice).
    """
    x = np.asarray(image, dtype=np.float32)
    img = x.squeeze()
    size = img.shape[0]
    r = radius * size
    room = np.argwhere(evaluation.brain_interior_mask(img, margin=int(np.ceil(margin * size + 1.2 * r))))
    if len(room) == 0:
        return None
    cy, cx = room[rng.integers(len(room))]
    shape = _lesion_shape(rng)
    lift, scale = rng.uniform(0.25, 0.4), rng.uniform(0.25, 0.5)
    out, inside = _paint(img, cy, cx, r, shape, 4.0, (lambda t: t + lift) if bright else (lambda t: t * scale))
    return out.reshape(x.shape), inside


# Lesion kinds of the benchmark: every combination of these factors (radii in px at 128 px images,
# scaled with the image size). Tissue labels follow dataset.TISSUES: 2 grey matter, 3 white matter.
LESION_SIZES = {"small": (2.0, 4.0), "medium": (5.0, 8.0), "large": (9.0, 12.0)}
LESION_POLARITIES = ("bright", "dark")
LESION_EDGES = {"sharp": 1.0, "soft": None}      # soft: an edge ramp of 0.6 x the radius
LESION_CONTRASTS = {"high": (0.25, 0.4), "low": (0.08, 0.14)}   # |lesion - tissue| on the 0-1 scale
LESION_TISSUES = {"grey": 2, "white": 3}


@dataclass(frozen=True)
class LesionKind:
    """One kind of synthetic lesion: ``polarity`` (bright / dark), ``size`` (small / medium / large),
    ``edge`` (sharp / soft), ``contrast`` (high / low), ``tissue`` its centre lies in (grey / white)."""

    polarity: str
    size: str
    edge: str
    contrast: str
    tissue: str

    def factors(self) -> dict[str, str]:
        return {"polarity": self.polarity, "size": self.size, "edge": self.edge, "contrast": self.contrast,
                "tissue": self.tissue}

    def __str__(self) -> str:
        return " ".join(self.factors().values())


def lesion_kinds(n: int, seed: int) -> list[LesionKind]:
    """``n`` lesion kinds that cycle through all 48 combinations of the factors, in a seeded order
    (every factor level appears equally often in each block of 48)."""
    import itertools

    combos = [LesionKind(*c) for c in itertools.product(LESION_POLARITIES, LESION_SIZES, LESION_EDGES,
                                                         LESION_CONTRASTS, LESION_TISSUES)]
    rng = np.random.default_rng([seed, 48])
    out = []
    while len(out) < n:
        out += [combos[i] for i in rng.permutation(len(combos))]
    return out[:n]


def _lesion_plan(tissue, kind: LesionKind, rng: np.random.Generator, size: int):
    """Centre, radius (px) and shape of one lesion of ``kind`` in a slice with tissue labels
    ``tissue`` ``(H, W)``, or None: the centre lies in the kind's tissue, at least 0.8 x the radius
    plus 1 px plus 4 % of the image from the head's outline (so the lesion stays inside the brain)."""
    from scipy import ndimage

    r = rng.uniform(*LESION_SIZES[kind.size]) * size / 128
    depth = ndimage.distance_transform_edt(ndimage.binary_fill_holes(tissue > 0))
    room = np.argwhere((tissue == LESION_TISSUES[kind.tissue]) & (depth >= 0.8 * r + 1 + 0.04 * size))
    if len(room) == 0:
        return None
    cy, cx = room[rng.integers(len(room))]
    return int(cy), int(cx), float(r), _lesion_shape(rng), float(rng.uniform(*LESION_CONTRASTS[kind.contrast]))


def _paint_kind(img, cy, cx, r, shape, delta, kind: LesionKind):
    edge = LESION_EDGES[kind.edge]
    edge = 0.6 * r if edge is None else edge
    if kind.polarity == "bright":
        return _paint(img, cy, cx, r, shape, edge, lambda t: t + delta)
    return _paint(img, cy, cx, r, shape, edge, lambda t: max(t - delta, 0.15 * t))


def add_lesion(image, tissue, kind: LesionKind, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
    """Paint one lesion of ``kind`` into a slice, its centre in the kind's tissue (the benchmark's lesions).

    The lesion is an ellipse with a wobbly outline and a +-8 % texture (as :func:`add_synthetic_lesion`),
    long semi-axis drawn from ``LESION_SIZES[kind.size]`` (px at 128 px), the local tissue's
    intensity plus (bright) or minus (dark) a contrast drawn from ``LESION_CONTRASTS``; a sharp edge
    is a ~1 px ramp, a soft one a ramp of 0.6 x the radius.

    Args:
        image: ``(H, W)`` or ``(H, W, 1)`` in [0, 1].
        tissue: ``(H, W)`` tissue labels 0-3 (``dataset.TISSUES``: background, CSF, grey, white).
    Returns:
        ``(lesioned image like the input, mask (H, W) bool where the opacity >= 0.5)``, or None
        when the slice has no room for that lesion in that tissue.
    """
    x = np.asarray(image, dtype=np.float32)
    img = x.squeeze()
    plan = _lesion_plan(np.asarray(tissue), kind, rng, img.shape[0])
    if plan is None:
        return None
    out, mask = _paint_kind(img, *plan, kind)
    return out.reshape(x.shape), mask


def add_lesion_volume(volume, tissue, kind: LesionKind, rng: np.random.Generator, centre_slice: int,
                      slice_spacing_px: float = 3.0) -> tuple[np.ndarray, np.ndarray] | None:
    """Paint one lesion of ``kind`` that spans neighbouring slices of a case (the volume benchmark).

    The lesion is a ball-like blob: the same centre, shape and contrast in every slice it reaches,
    its radius ``sqrt(r^2 - (d * slice_spacing_px)^2)`` at ``d`` slices from ``centre_slice`` (slices
    where that is below 1 px are left as they are). The centre is placed as :func:`add_lesion`
    places it, in ``centre_slice``.

    Args:
        volume: ``(S, H, W)`` or ``(S, H, W, 1)`` slices of one case in order, in [0, 1].
        tissue: ``(S, H, W)`` tissue labels.
        slice_spacing_px: the distance between slices in in-plane pixels.
    Returns:
        ``(lesioned volume like the input, masks (S, H, W) bool)``, or None (no room).
    """
    x = np.asarray(volume, dtype=np.float32)
    vol = x.reshape(x.shape[:3])
    plan = _lesion_plan(np.asarray(tissue[centre_slice]), kind, rng, vol.shape[1])
    if plan is None:
        return None
    cy, cx, r, shape, delta = plan
    out, masks = vol.copy(), np.zeros(vol.shape, bool)
    for k in range(len(vol)):
        rk2 = r ** 2 - ((k - centre_slice) * slice_spacing_px) ** 2
        if rk2 < 1.0:
            continue
        out[k], masks[k] = _paint_kind(vol[k], cy, cx, float(np.sqrt(rk2)), shape, delta, kind)
    return out.reshape(x.shape), masks
