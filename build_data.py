"""Building OASIS-layout PNG data sets: the synthetic demo set, and OASIS-1 volumes -> PNG slices.

:mod:`dataset` reads data sets; this module writes them (the layout is described there)::

    ROOT/keras_png_slices_{train,validate,test}/case_001_slice_0.nii.png    256x256 8-bit grayscale
    ROOT/keras_png_slices_seg_{train,validate,test}/seg_001_slice_0.nii.png tissue masks (0/85/170/255)

* :func:`make_demo_dataset` / :func:`ensure_demo_dataset`: the demo set that every new user trains on
  first, made from the MNI ICBM152 2009a templates that ship inside nilearn (no download). How each
  OASIS property is imitated is listed in :func:`render_demo_case`.
* :func:`prepare_oasis_volumes`: real OASIS-1 volumes (Analyze or NIfTI) -> the same PNG layout.

Command line: ``python build_data.py demo|prepare`` (``python dataset.py check|profile`` reads what they write).
Nothing runs on import; scipy, scikit-image, nibabel, PIL and matplotlib are imported by the functions
that use them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dataset import (IMAGE_SUFFIX, RESIZE_FILTER, SEG_DIRS, SPLIT_DIRS, SPLITS, UNKNOWN, DatasetError, DatasetWarning,
                     _find_split_root, _natural_key, _one_line, labels_to_mask, parse_slice_name, run_command,
                     seg_file_name, slice_file_name)

DEFAULT_DEMO_ROOT = Path(__file__).resolve().parent / "data" / "oasis_demo"
DEMO_MARKER = "demo.json"  # written last by make_demo_dataset: its presence means the tree is complete
DEMO_VERSION = 4  # bump when the demo generator changes, so ensure_demo_dataset rebuilds old trees (4: tissue masks)
# 60 / 8 / 17 cases of 32 slices: the test split is OASIS's (544 slices); the realism search needs as many
# test cases as OASIS has -- against 4 test cases, real unseen slices found a match above SSIM 0.6 for 75 %
# only, against 17 for all -- and with 60 training cases instead of 20 the demo prior's validation NLL fell
# from 1.85 to 1.53 bits per code at the same number of optimiser steps.
DEMO_DEFAULTS = dict(n_train=60, n_validate=8, n_test=17, slices_per_case=32, image_size=256, seed=0)
# The templates ship inside nilearn (nilearn/datasets/data/): T1 and the grey / white matter probability maps.
MNI_FILES = {kind: f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz" for kind in ("t1", "gm", "wm")}
MNI_TEMPLATE_FILE = MNI_FILES["t1"]

_OASIS_SUBJECT_RE = re.compile(r"OAS1_(\d+)", re.IGNORECASE)

# Demo geometry. OASIS slices: the head (scalp included) spans ~79 % of the image width, long axis horizontal.
HEAD_LENGTH_FRACTION = 0.79
_SCALP_MARGIN_MM = 24.0  # room around the brain in the template crop for the synthetic head
_VENTRICLE_SIGMA_MM = 5.0  # smoothing of the ventricle mask whose gradient drives the ventricle expansion
_SHARPEN = 1.6  # slope of the tissue-fraction sharpening at 0.5 (1 = the template as it is)
_FIELD_STEP = 2  # voxel step (mm) of the smooth template fields: ventricle field, head depth
_BAND_MM = (4.0, 7.0)  # range of the grey band's mean thickness (outer CSF + skull) per subject
_RING_MM = (6.0, 9.5)  # range of the bright ring's mean thickness (skin, fat, marrow)
# The head's levels per subject (0..255, before bias and noise), set so that the profile inward from the
# outline lies in real OASIS's ranges (issue 17): outermost pixel 29-49, ring peak 115-170 at 4-5 px,
# band minimum 33-56 at 8-17 px.
_SCALP = (125.0, 180.0)  # the ring's peak level
_PEAK_MM = (3.5, 4.8)  # the peak's depth inside the outer edge
_SKIN = (0.0, 0.15)  # level at the outer edge, as a fraction of the peak
_BONE = (35.0, 60.0)  # the grey band


# ----------------------------------------------------------------------------------------------
# PNG trees (shared by the demo builder and prepare)
# ----------------------------------------------------------------------------------------------


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
    for pattern in ("case_*_slice_*.nii.png", "seg_*_slice_*.nii.png"):
        for p in folder.glob(pattern):
            p.unlink()


# ----------------------------------------------------------------------------------------------
# The demo template: MNI ICBM152 tissue maps, the lateral ventricles, the slab, the head
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoTemplate:
    """What the demo builder needs from the MNI ICBM152 2009a templates, measured once per process.

    All volumes are float32 ``(X, Y, Z)`` in RAS orientation with 1 mm voxels, cropped to the brain plus
    ``_SCALP_MARGIN_MM`` in x and y (room for the synthetic head) and to the slab plus a margin in z.
    """

    gm: np.ndarray  # grey-matter probability in [0, 1]
    wm: np.ndarray  # white-matter probability in [0, 1]
    ventricles: np.ndarray  # 2 mm grid: smoothed ventricle mask, max |gradient| 1 per mm (see demo_template)
    head_depth: np.ndarray  # 2 mm grid: mm outside the brain's rounded outline (0 inside): where skull and scalp go
    tissue_depth_mm: float  # no grey or white matter lies deeper than this in head_depth
    slab: tuple[float, float]  # voxel z of the lowest / highest level where the lateral ventricles are seen
    slab_mni_mm: tuple[float, float]  # the same levels as MNI z coordinates (mm)
    center: tuple[float, float, float]  # voxel (x, y) centre of the brain's outline at mid-slab, and mid-slab z
    brain_length_mm: float  # anterior-posterior length of the brain at mid-slab


def _read_mni(kind: str):
    """One MNI ICBM152 2009a image shipped with nilearn, as a nibabel image (read from the package folder,
    which is much faster than importing nilearn; nilearn's loader is the fallback)."""
    import importlib.util

    import nibabel as nib

    spec = importlib.util.find_spec("nilearn")
    path = Path(spec.origin).parent / "datasets" / "data" / MNI_FILES[kind] if spec and spec.origin else None
    if path is not None and path.is_file():
        return nib.load(path)
    import nilearn.datasets as nd  # other nilearn layouts: same files through nilearn's offline loaders

    return {"t1": nd.load_mni152_template, "gm": nd.load_mni152_gm_template,
            "wm": nd.load_mni152_wm_template}[kind](resolution=1)


def find_lateral_ventricles(brain: np.ndarray, csf: np.ndarray, voxel_mm: float = 1.0,
                            min_depth_mm: float = 8.0) -> np.ndarray:
    """Boolean mask of the lateral ventricles in a brain volume, measured from its CSF map.

    The ventricles are the largest connected body of CSF (probability > 0.5) that lies at least
    ``min_depth_mm`` inside the brain (so not the CSF around the cortex) and survives a binary opening
    with a ~2 mm radius (which removes the thin interhemispheric and Sylvian fissures).
    """
    from scipy import ndimage

    deep = ndimage.distance_transform_edt(brain > 0.5, sampling=voxel_mm) >= min_depth_mm
    body = ndimage.binary_opening((csf > 0.5) & deep, iterations=max(1, int(round(2.0 / voxel_mm))))
    labels, n = ndimage.label(body)
    if n == 0:
        raise DatasetError("demo: found no ventricles in the MNI template's CSF map; is the nilearn install complete?")
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


@functools.lru_cache(maxsize=1)
def demo_template() -> DemoTemplate:
    """Load the MNI templates and measure the slab, the ventricles and the head outline (cached, ~2 s).

    The slab is measured on the template itself: OASIS's 32 slices run from the third ventricle / basal
    ganglia up to the bodies of the lateral ventricles, so the slab is the z range where the template's
    lateral-ventricle area is at least 10 % of its largest. Smooth fields (the ventricle field, the head
    depth) are computed on a 2 mm grid: they vary over several mm and the 1 mm grid would cost 8x more.
    """
    import nibabel as nib
    from scipy import ndimage
    from skimage.morphology import convex_hull_image

    vols = {}
    for kind in MNI_FILES:
        img = nib.as_closest_canonical(_read_mni(kind))
        v = np.asarray(img.dataobj, dtype=np.float32)
        vols[kind] = v / max(float(v.max()), 1e-6)
        affine = img.affine
    brain = (vols["t1"] > 0).astype(np.float32)
    gm, wm = vols["gm"] * brain, vols["wm"] * brain
    csf = np.clip(brain - gm - wm, 0, 1)
    # An average of 152 brains has blurred tissue borders; a single scan's are sharp. Steepen the white
    # matter and CSF fractions around 0.5 (grey matter takes the rest), which also deepens the sulci.
    wm, csf = (np.clip((p - 0.5) * _SHARPEN + 0.5, 0, 1) * brain for p in (wm, csf))
    gm = np.clip(brain - wm - csf, 0, 1)

    # Ventricles found on the 2 mm grid, then refined to the 1 mm CSF voxels they cover.
    s = _FIELD_STEP
    vent2 = find_lateral_ventricles(brain[::s, ::s, ::s], csf[::s, ::s, ::s], voxel_mm=s)
    vent = np.zeros(brain.shape, bool)
    up = vent2.repeat(s, 0).repeat(s, 1).repeat(s, 2)[:brain.shape[0], :brain.shape[1], :brain.shape[2]]
    vent[:up.shape[0], :up.shape[1], :up.shape[2]] = up
    vent &= csf > 0.5
    area = vent.sum(axis=(0, 1))
    zs = np.flatnonzero(area >= 0.1 * area.max())
    z_lo, z_hi = int(zs[0]), int(zs[-1])
    slab_mni_mm = tuple(float(affine[2, 3] + z * affine[2, 2]) for z in (z_lo, z_hi))

    # Crop: brain +- margin in x, y (the head grows outwards); slab +- 24 mm in z (tilt and jitter). Start
    # and size are even so that the 2 mm grid is every second voxel of the crop.
    m = int(_SCALP_MARGIN_MM)
    nz = np.nonzero(brain)
    lo = np.array([int(nz[0].min()) - m, int(nz[1].min()) - m, z_lo - m]) // 2 * 2
    hi = lo + (np.array([int(nz[0].max()) + m + 1, int(nz[1].max()) + m + 1, z_hi + m + 1]) - lo + 1) // 2 * 2
    pad = [(max(-lo[i], 0), max(hi[i] - brain.shape[i], 0)) for i in range(3)]

    def crop(v):
        v = np.pad(v, pad)
        return np.ascontiguousarray(v[tuple(slice(lo[i] + pad[i][0], hi[i] + pad[i][0]) for i in range(3))])

    brain, gm, wm, vent = crop(brain), crop(gm), crop(wm), crop(vent.astype(np.float32))
    z_lo, z_hi = z_lo - lo[2], z_hi - lo[2]

    # The ventricle field: the ventricle mask smoothed (Gaussian, sigma = _VENTRICLE_SIGMA_MM), scaled so
    # that its gradient, which points into the ventricles, is at most 1 (per mm). Sampling the template
    # from p + a * grad f(p) moves the walls out by up to a mm; every point samples from nearer the
    # ventricle's middle, never past it, while a < 1.2 sigma (for a thin ventricle f'' <= 1.65 / sigma).
    field = ndimage.gaussian_filter(vent, _VENTRICLE_SIGMA_MM)[::s, ::s, ::s]
    field /= np.sqrt(sum(d ** 2 for d in np.gradient(field, float(s)))).max()
    # The skull is rounder than the brain: per axial level the convex hull of the brain's outline, then
    # smoothed across levels (Gaussian, sigma 6 mm); head_depth is the distance outside it (mm). All on
    # the 2 mm grid. CSF fills the room between the brain and the hull.
    brain2 = brain[::s, ::s, ::s] > 0.5
    hull = np.stack([convex_hull_image(brain2[:, :, z]) if brain2[:, :, z].any() else brain2[:, :, z]
                     for z in range(brain2.shape[2])], axis=2)
    hull = ndimage.gaussian_filter(hull.astype(np.float32), 6.0 / s) > 0.5
    head_depth = ndimage.distance_transform_edt(~hull, sampling=s).astype(np.float32)
    tissue = np.array(np.nonzero(gm + wm > 0), dtype=np.float32)
    tissue_depth = float(ndimage.map_coordinates(head_depth, tissue / s, order=1).max()) + 0.5

    zc = 0.5 * (z_lo + z_hi)
    mid = brain[:, :, int(round(zc))] > 0.5
    xs, ys = np.flatnonzero(mid.any(axis=1)), np.flatnonzero(mid.any(axis=0))
    center = (0.5 * (xs[0] + xs[-1]), 0.5 * (ys[0] + ys[-1]), zc)
    for v in (gm, wm, field, head_depth):
        v.flags.writeable = False
    return DemoTemplate(gm=gm, wm=wm, ventricles=field, head_depth=head_depth, tissue_depth_mm=tissue_depth,
                        slab=(float(z_lo), float(z_hi)), slab_mni_mm=slab_mni_mm, center=center,
                        brain_length_mm=float(ys[-1] - ys[0] + 1))


# ----------------------------------------------------------------------------------------------
# One synthetic subject
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoSubject:
    """The random draws that make one demo case (all saved in ``demo.json``). Intensities are 0..255.

    ``age`` (uniform 18..96 years, OASIS-1's range) drives the ageing-like anatomy: with ``atrophy`` =
    ``((age - 18) / 78) ** 1.5`` times a per-subject factor in [0.7, 1.3], the ventricle walls move by
    ``ventricle_mm`` = -1 + 6.5 atrophy (at most 6 mm; slightly inwards for the youngest, since the
    template already averages young adults) and the CSF of the sulci and around the brain widens by
    ``sulcal_px`` ~ 2.6 atrophy pixels. On the default set this makes the ventricles' area at one
    slice index vary about 2.5- to 3-fold between cases, growing with age.
    """

    age: float
    ventricle_mm: float  # largest outward displacement of the lateral-ventricle walls (mm; < 0: inward)
    sulcal_px: float  # grey dilation radius applied to the CSF map (pixels; fractional part blended)
    rotation_deg: tuple[float, float, float]  # about x (pitch), y (roll), z (in-plane yaw)
    scale: tuple[float, float, float]  # head size per axis
    shift_mm: tuple[float, float, float]
    wm: float  # white matter
    gm: float  # grey matter
    csf: float  # CSF
    bone: float  # the dim grey band under the bright ring (skull, outer CSF)
    scalp: float  # the bright ring's peak level (marrow, scalp fat)
    peak_mm: float  # depth of the ring's peak inside the head's outer edge (mm)
    skin: float  # level at the outer edge as a fraction of ``scalp`` (the ramp up to the peak starts there)
    band_mm: float  # mean thickness of the grey band (outer CSF + skull)
    ring_mm: float  # mean thickness of the bright ring (skin, fat, marrow), outer edge to the band
    snr: float  # white matter / Rician noise sigma
    bias_sd: float  # sd of the log gain of the smooth bias field

    @classmethod
    def draw(cls, rng: np.random.Generator) -> DemoSubject:
        age = float(rng.uniform(18, 96))
        atrophy = ((age - 18) / 78) ** 1.5 * rng.uniform(0.7, 1.3)
        wm = rng.uniform(100, 135)
        return cls(
            age=round(age, 1),
            # The template averages adults of 18 to 44 years: the youngest get slightly smaller ventricles.
            ventricle_mm=float(min(-1.0 + 6.5 * atrophy, 6.0)),  # <= 1.2 sigma: no fold-over (demo_template)
            sulcal_px=float(np.clip(2.6 * atrophy + rng.normal(0, 0.2), 0, 3)),
            rotation_deg=tuple(float(a) for a in rng.uniform(-1, 1, 3) * (3.0, 2.0, 5.0)),
            scale=tuple(float(a) for a in rng.uniform(0.95, 1.05, 3)),
            shift_mm=tuple(float(a) for a in rng.normal(0, (2.0, 2.5, 1.0))),
            wm=float(wm),
            gm=float(wm * rng.uniform(0.5, 0.64)),
            csf=float(wm * rng.uniform(0.12, 0.24)),
            # The head (issue 17): as many draws as before, in the same order, so the brain's draws and
            # the rendering's random stream (warp, bias field, noise) are those of demo version 2.
            bone=float(rng.uniform(*_BONE)),
            scalp=float(rng.uniform(*_SCALP)),
            peak_mm=float(rng.uniform(*_PEAK_MM)),
            skin=float(rng.uniform(*_SKIN)),
            band_mm=float(rng.uniform(*_BAND_MM)),
            ring_mm=float(rng.uniform(*_RING_MM)),
            snr=float(rng.uniform(18, 35)),
            bias_sd=float(rng.uniform(0.03, 0.08)),
        )


def _pixel_mm(template: DemoTemplate, image_size: int) -> float:
    """Pixel size that makes an average head (brain + dark band + bright ring) span HEAD_LENGTH_FRACTION
    of the image width, as the OASIS slices do."""
    head_mm = template.brain_length_mm + 2 * (np.mean(_BAND_MM) + np.mean(_RING_MM))
    return head_mm / (HEAD_LENGTH_FRACTION * image_size)


def demo_voxel_mm(root: str | os.PathLike, image_size: int) -> tuple[float, float, float] | None:
    """Voxel size (mm: rows, columns, slices) of the demo data set under ``root`` read at ``image_size``,
    or None when ``root`` holds no ``demo.json`` (not a demo set).

    In-plane: the pixel size the demo was rendered at (:func:`_pixel_mm`), scaled to ``image_size``;
    across slices: the slab's height over its ``slices_per_case - 1`` steps (nominal: each case is
    tilted and scaled a little).
    """
    path = Path(root) / "demo.json"
    if not path.exists():
        return None
    meta = json.loads(path.read_text())
    pixel = _pixel_mm(demo_template(), int(meta["image_size"])) * int(meta["image_size"]) / int(image_size)
    z_lo, z_hi = meta["slab_mni_z_mm"]
    step = (z_hi - z_lo) / max(int(meta["slices_per_case"]) - 1, 1)
    return (float(pixel), float(pixel), float(step))


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", [rx, ry, rz], degrees=True).as_matrix()


def render_demo_case(template: DemoTemplate, subject: DemoSubject, n_slices: int, image_size: int,
                     rng: np.random.Generator, masks: bool = False):
    """One synthetic subject as ``n_slices`` axial uint8 slices ``(n, S, S)``, low to high.

    With ``masks=True`` returns ``(slices, labels)``: ``labels`` uint8 ``(n, S, S)`` holds the tissue of
    each pixel (:data:`dataset.TISSUES`: 0 background, 1 CSF, 2 grey matter, 3 white matter) from the
    very tissue fractions the pixel's intensity was made of: inside the skull (the intracranial
    fraction and the tissue fractions each at least 0.5) the tissue with the largest fraction,
    background elsewhere. Computing them draws nothing
    from ``rng``, so the slices are the same with or without masks.

    How each property of the OASIS slices is imitated:

    * slab: ``n_slices`` levels evenly spaced over the template's lateral ventricles
      (``template.slab``), so slice 0 is near the third ventricle and the last reaches the ventricles'
      bodies; each subject's tilt and shift move it a little;
    * anatomy: the MNI grey / white matter / CSF maps (borders sharpened, as in one scan rather than an
      average of 152) under a per-subject affine (rotation, scale per axis, shift) and a smooth elastic
      warp (6x6x5 control grid, ~2 mm, cubic). Ageing moves the
      ventricle walls outwards by up to ``ventricle_mm`` (each point samples the template from a point
      moved along the gradient of the smoothed ventricle mask) and widens the CSF of the sulci and
      around the brain by a grey dilation of the CSF map (``sulcal_px``), grey and white matter
      shrinking to make room;
    * head: outside the brain's rounded outline (per level its convex hull, smoothed across levels), a
      grey band (outer CSF, then skull; 4-7 mm) and a bright ring (skin, fat, marrow; 6-9.5 mm), their
      thicknesses varying smoothly around the head. Inward from the outer edge the level ramps up from
      ``skin * scalp`` to the ring's peak ``scalp`` (125-180) at ``peak_mm`` (3.5-4.8 mm), falls linearly
      to the band's level ``bone`` (35-60) 30 % of the way into the band, and fades out across the
      outer CSF, so the profile measured by :func:`dataset.head_profile` follows real OASIS's (issue
      17): a soft outline, the ring's peak 4-5 px in, a dim grey band (not black) under it;
    * intensity: ``GM * gm + WM * wm + CSF * csf`` with per-subject levels (a dim brain; the scalp ring
      about as bright as white matter or up to 1.4x), a smooth multiplicative bias field, Rician noise
      (the magnitude of the signal plus complex Gaussian noise) at ``snr`` (white matter / sigma,
      18-35); outside the head exactly 0;
    * view: the average head spans ``HEAD_LENGTH_FRACTION`` (79 %) of the width; rows run along the
      subject's x (right at the bottom), columns from anterior to posterior, so the face points left.

    Smooth fields are evaluated on a coarse grid of nodes every ``g = ceil(S / 16)`` pixels and zoomed
    (bilinear) to the pixels of the head's bounding box only: the rest of the image is background.
    """
    from scipy import ndimage
    from skimage.morphology import disk

    S = int(image_size)
    g = max(1, -(-S // 16))  # pixels between coarse nodes
    c = (S - 1) // g + 2  # nodes at pixels 0, g, ..., past S - 1
    px = _pixel_mm(template, S)
    center = np.array(template.center)
    matrix = _rotation(*subject.rotation_deg) / np.array(subject.scale)[None, :]
    grid = (np.arange(c) * g - (S - 1) / 2) * px  # mm from the image centre
    z_lo, z_hi = template.slab
    depth = np.linspace(z_lo, z_hi, n_slices) - center[2]
    # Coarse (3, c, c, n) template points: rows = subject x (right at the bottom), columns = -y (anterior left).
    u, v, w = np.meshgrid(grid, grid, depth, indexing="ij")
    q = np.einsum("ij,j...->i...", matrix, np.stack([u, -v, w])) + np.array(subject.shift_mm)[:, None, None, None]
    # Smooth per-subject fields: random control grids evaluated (cubic) at the coarse nodes of all slices.
    ctrl = np.stack(np.meshgrid(np.linspace(0, 1, c), np.linspace(0, 1, c), np.linspace(0, 1, n_slices),
                                indexing="ij"))

    def smooth_field(shape, sd):
        k = rng.normal(0, sd, size=shape)
        return ndimage.map_coordinates(k, ctrl * (np.array(shape) - 1)[:, None, None, None], order=3, mode="nearest")

    for i in range(3):
        q[i] += smooth_field((6, 6, 5), 2.0)
    q += center[:, None, None, None]
    fields = np.concatenate([q, smooth_field((4, 4, 3), subject.bias_sd)[None],
                             (subject.band_mm * np.exp(smooth_field((5, 5, 3), 0.1)))[None],
                             (subject.ring_mm * np.exp(smooth_field((5, 5, 3), 0.1)))[None]]).astype(np.float32)
    # Which nodes matter: near the head (its depth below band + ring, plus the reach of one cell), and
    # near the ventricles (where their field is not flat).
    s = float(_FIELD_STEP)
    head_nodes = ndimage.map_coordinates(template.head_depth, q / s, order=1, cval=1e3)
    head_nodes = head_nodes <= fields[4] + fields[5] + 1.6 * g * px
    vent_nodes = ndimage.map_coordinates(template.ventricles, q / s, order=1) > 1e-3
    step_r, step_c = matrix @ np.array([px, 0.0, 0.0]), matrix @ np.array([0.0, -px, 0.0])  # template voxels

    foot = disk(int(np.ceil(subject.sulcal_px))) if subject.sulcal_px > 0 else None
    frac = (subject.sulcal_px - np.floor(subject.sulcal_px)) or 1.0
    sigma = np.float32(subject.wm / subject.snr)
    out = np.zeros((n_slices, S, S), np.uint8)
    labels = np.zeros((n_slices, S, S), np.uint8) if masks else None
    for k in range(n_slices):
        box = _node_box(head_nodes[:, :, k])
        if box is None:
            continue
        (i0, i1), (j0, j1) = box
        block = _zoom_nodes(fields[:, i0:i1 + 1, j0:j1 + 1, k], g)[:, :S - i0 * g, :S - j0 * g]
        coords, log_gain, band, ring = block[:3], block[3], block[4], block[5]
        # Ageing 1: sample from points moved towards the ventricles, so that the ventricles grow.
        src = coords.copy()
        vbox = _node_box(vent_nodes[i0:i1 + 1, j0:j1 + 1, k])
        if vbox is not None and subject.ventricle_mm != 0:
            (a0, a1), (b0, b1) = vbox
            sub = (slice(a0 * g, a1 * g + 1), slice(b0 * g, b1 * g + 1))
            field = ndimage.map_coordinates(template.ventricles, coords[(slice(None),) + sub] / s, order=1)
            gr, gc = np.gradient(field)  # per pixel; |grad| per mm <= 1, so per pixel <= px
            amount = subject.ventricle_mm / px
            src[(slice(None),) + sub] += amount * (gr * step_r[:, None, None] + gc * step_c[:, None, None]) / px
        head = ndimage.map_coordinates(template.head_depth, coords / s, order=1, output=np.float32, cval=1e3)
        # The brain lies inside the hull (up to template.tissue_depth_mm outside it, at the hull's smoothed
        # corners): sample the tissue maps there only, a third fewer points than the whole box.
        inner = head <= template.tissue_depth_mm
        pts = src[:, inner]
        gm, wm = np.zeros_like(head), np.zeros_like(head)
        gm[inner] = ndimage.map_coordinates(template.gm, pts, order=1, output=np.float32)
        wm[inner] = ndimage.map_coordinates(template.wm, pts, order=1, output=np.float32)
        # Intracranial = the closed outline plus an outer CSF layer (the first 40 % of the band); CSF fills
        # whatever grey and white matter leave of it.
        intracranial = np.clip((0.4 * band - head) / px + 0.5, 0, 1)
        csf = np.clip(intracranial - gm - wm, 0, 1)
        # Ageing 2: CSF widened into the cortex (grey dilation of the CSF map); tissue scaled to make room.
        if foot is not None:
            wide = csf + frac * (ndimage.grey_dilation(csf, footprint=foot) - csf)
            tissue = gm + wm
            keep = np.where(tissue > 1 - wide, np.clip(1 - wide, 0, None) / np.maximum(tissue, 1e-6), 1.0)
            gm, wm, csf = gm * keep, wm * keep, wide
        x = subject.gm * gm + subject.wm * wm + subject.csf * csf
        if labels is not None:  # the tissue this pixel is mostly made of (CSF, grey, white), inside the skull
            fractions = np.stack([csf, gm, wm])
            inside = (fractions.sum(0) >= 0.5) & (intracranial >= 0.5)  # not the CSF widened past the skull
            tissue_k = np.where(inside, 1 + np.argmax(fractions, axis=0), 0)
            labels[k, i0 * g:i0 * g + x.shape[0], j0 * g:j0 * g + x.shape[1]] = tissue_k
        # Head, by depth inside its outer edge (issue 17, OASIS's profile): a linear ramp from skin * scalp
        # at the edge up to the ring's peak at peak_mm (a soft outline, as the scanner's point spread and
        # the resampling make it), a linear fall to the grey band's level 30 % of the way into the band,
        # and that level fading out linearly across the outer CSF (head = 0.4 band -> 0), so the band
        # under the ring is a dim grey (OASIS: 33-56), not black.
        depth = band + ring - head  # mm inside the outer edge
        peak = np.minimum(np.float32(subject.peak_mm), ring - px)
        up = np.clip(depth / peak, 0, 1)
        down = np.clip((depth - peak) / (ring + 0.3 * band - peak), 0, 1)
        level = subject.scalp * (subject.skin + (1 - subject.skin) * up) + (subject.bone - subject.scalp) * down
        x = (x + level * np.clip(head / (0.4 * band), 0, 1)) * np.exp(log_gain)
        noise = rng.standard_normal((2,) + x.shape, dtype=np.float32) * sigma
        x = np.sqrt((x + noise[0]) ** 2 + noise[1] ** 2)  # Rician: |signal + complex Gaussian noise|
        x[depth <= 0] = 0.0  # outside the head: exactly 0, as in OASIS
        out[k, i0 * g:i0 * g + x.shape[0], j0 * g:j0 * g + x.shape[1]] = np.rint(np.clip(x, 0, 255))
    return (out, labels) if masks else out


def _node_box(nodes: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Bounding box ``((i0, i1), (j0, j1))`` (inclusive, at least 2 nodes a side) of a boolean node grid."""
    rows, cols = np.flatnonzero(nodes.any(axis=1)), np.flatnonzero(nodes.any(axis=0))
    if rows.size == 0:
        return None
    n_i, n_j = nodes.shape
    i0, j0 = min(rows[0], n_i - 2), min(cols[0], n_j - 2)
    return (i0, max(rows[-1], i0 + 1)), (j0, max(cols[-1], j0 + 1))


def _zoom_nodes(block: np.ndarray, g: int) -> np.ndarray:
    """Bilinear values ``(F, (ni - 1) g + 1, (nj - 1) g + 1)`` at every pixel of ``(F, ni, nj)`` nodes ``g``
    pixels apart (``scipy.ndimage.zoom`` with ``grid_mode=False`` puts the outer nodes on the outer pixels)."""
    from scipy import ndimage

    f, ni, nj = block.shape
    shape = ((ni - 1) * g + 1, (nj - 1) * g + 1)
    out = np.empty((f,) + shape, np.float32)
    for i in range(f):  # one 2-D zoom per field: a 3-D zoom would interpolate along the field axis too (2x slower)
        ndimage.zoom(block[i], (shape[0] / ni, shape[1] / nj), order=1, grid_mode=False, output=out[i])
    return out


# ----------------------------------------------------------------------------------------------
# The demo tree
# ----------------------------------------------------------------------------------------------


def demo_case(template: DemoTemplate, seed: int, case_id: int, slices_per_case: int = 32,
              image_size: int = 256, masks: bool = False):
    """Demo case ``case_id`` of the set made with ``seed``: its :class:`DemoSubject` and its uint8 slices
    ``(slices_per_case, S, S)`` (with ``masks=True`` also their tissue labels, see :func:`render_demo_case`).
    It depends only on ``(seed, case_id)`` and the sizes."""
    rng = np.random.default_rng([seed, case_id])
    subject = DemoSubject.draw(rng)
    rendered = render_demo_case(template, subject, slices_per_case, image_size, rng, masks=masks)
    return (subject, *rendered) if masks else (subject, rendered)


def make_demo_dataset(out_dir: str | os.PathLike, n_train: int = DEMO_DEFAULTS["n_train"],
                      n_validate: int = DEMO_DEFAULTS["n_validate"], n_test: int = DEMO_DEFAULTS["n_test"],
                      slices_per_case: int = 32, image_size: int = 256, seed: int = 0,
                      progress: bool = True, workers: int | None = None) -> Path:
    """Write an OASIS-layout tree of synthetic 8-bit PNG slices made from the MNI ICBM152 templates.

    Each case is one synthetic subject (:class:`DemoSubject`, rendered by :func:`render_demo_case`):
    the template brain with its own age-like anatomy, a synthetic head, scanner texture and OASIS-like
    intensities, ``slices_per_case`` axial slices through the central slab that holds the lateral
    ventricles, low to high. Cases get ids 1..n_train (train), then validate, then test, so splits never
    share a case. Case ``i`` depends only on ``(seed, i)``, and equal arguments give byte-identical PNGs.
    ``demo.json`` (the parameters and each subject's draws) is written last; earlier demo files in the
    split folders are replaced. ``workers`` processes render cases side by side (default: one per CPU
    core, at most one per two cases; 1 renders in this process); the files do not depend on it.

    Returns:
        ``out_dir`` as a Path, ready for ``load_oasis`` / ``read_oasis``.
    """
    out_dir = Path(out_dir)
    _check_demo_args(out_dir, n_train, n_validate, n_test, slices_per_case, image_size)  # before touching out_dir
    with _demo_lock(out_dir):
        return _build_demo(out_dir, n_train, n_validate, n_test, slices_per_case, image_size, seed, progress,
                           workers)


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


def _render_demo_case(folder: Path, seg_folder: Path, seed: int, case_id: int, slices_per_case: int,
                      image_size: int) -> dict:
    """Render demo case ``case_id`` into ``folder`` and its tissue masks (OASIS's grey levels) into
    ``seg_folder``; its subject's draws as a dict (runs in a worker)."""
    subject, slices, labels = demo_case(demo_template(), seed, case_id, slices_per_case, image_size, masks=True)
    for k, (image, label) in enumerate(zip(slices, labels)):
        _write_png(folder / slice_file_name(case_id, k), image)
        _write_png(seg_folder / seg_file_name(case_id, k), labels_to_mask(label))
    return asdict(subject)


def _demo_workers(workers: int | None, n_cases: int) -> int:
    if workers is None:  # a worker costs a template load (~3 s): worth it from two cases each
        workers = min(os.cpu_count() or 1, n_cases // 2)
    if isinstance(workers, bool) or int(workers) != workers or workers < 1:
        raise DatasetError(f"demo: workers must be an int >= 1 (or None for one per CPU core), got {workers!r}")
    return max(1, min(int(workers), n_cases))


def _build_demo(out_dir: Path, n_train: int, n_validate: int, n_test: int, slices_per_case: int, image_size: int,
                seed: int, progress: bool, workers: int | None = None) -> Path:
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from tqdm import tqdm

    from utils import save_json

    counts = {"train": int(n_train), "validate": int(n_validate), "test": int(n_test)}
    _check_demo_args(out_dir, n_train, n_validate, n_test, slices_per_case, image_size)
    workers = _demo_workers(workers, sum(counts.values()))
    building = out_dir / ".demo_incomplete"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DEMO_MARKER).unlink(missing_ok=True)
    building.write_text("make_demo_dataset started; the tree is complete once demo.json exists\n")

    template = demo_template()
    params = dict(version=DEMO_VERSION, seed=int(seed), n_train=counts["train"], n_validate=counts["validate"],
                  n_test=counts["test"], slices_per_case=int(slices_per_case), image_size=int(image_size),
                  source="MNI ICBM152 2009a symmetric T1, grey and white matter maps (shipped with nilearn)",
                  slab_mni_z_mm=list(template.slab_mni_mm))
    jobs, cases = [], {}  # case ids 1..n_train are train, then validate, then test
    for name in SPLITS:
        folder, seg_folder = out_dir / SPLIT_DIRS[name], out_dir / SEG_DIRS[name]
        for f in (folder, seg_folder):
            f.mkdir(exist_ok=True)
            _clear_own_slices(f)
        cases[name] = list(range(len(jobs) + 1, len(jobs) + counts[name] + 1))
        jobs += [(folder, seg_folder, case_id) for case_id in cases[name]]
    bar = tqdm(total=len(jobs), desc="demo cases", unit="case", disable=not progress)
    subjects = {}
    if workers == 1:
        for folder, seg_folder, case_id in jobs:
            subjects[str(case_id)] = _render_demo_case(folder, seg_folder, seed, case_id, slices_per_case, image_size)
            bar.update()
    else:  # spawn: the workers start clean (no copy of a parent's TensorFlow threads) and load the template
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_render_demo_case, folder, seg_folder, seed, case_id, slices_per_case, image_size)
                       for folder, seg_folder, case_id in jobs]
            for (_, _, case_id), future in zip(jobs, futures):
                subjects[str(case_id)] = future.result()
                bar.update()
    bar.close()
    params["cases"] = cases
    params["subjects"] = subjects
    save_json(params, out_dir / DEMO_MARKER)
    building.unlink()
    return out_dir


def _demo_version(root: Path) -> int | None:
    from utils import load_json

    try:
        return load_json(root / DEMO_MARKER).get("version")
    except (ValueError, AttributeError):
        return None


def demo_is_complete(root: str | os.PathLike, **params) -> bool:
    """True when ``root`` holds a finished demo tree of this :data:`DEMO_VERSION` built with these
    parameters (defaults: :data:`DEMO_DEFAULTS`)."""
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
        for folder, pattern in ((root / SPLIT_DIRS[name], "case_*_slice_*.nii.png"),
                                (root / SEG_DIRS[name], "seg_*_slice_*.nii.png")):
            found = len(list(folder.glob(pattern))) if folder.is_dir() else 0
            if found != want[key] * want["slices_per_case"]:
                return False
    return True


def ensure_demo_dataset(root: str | os.PathLike | None = None, *, progress: bool = True, workers: int | None = None,
                        **params) -> Path:
    """Build the demo tree at ``root`` (default :data:`DEFAULT_DEMO_ROOT`) unless a complete one is there.

    ``params`` override :data:`DEMO_DEFAULTS` (n_train, n_validate, n_test, slices_per_case, image_size,
    seed). A tree without ``demo.json``, with other parameters, with missing files or made by an older
    demo generator (one line says so) is rebuilt, by ``workers`` processes (see :func:`make_demo_dataset`).
    """
    root = Path(root) if root is not None else DEFAULT_DEMO_ROOT
    unknown = set(params) - set(DEMO_DEFAULTS)
    if unknown:
        raise TypeError(f"ensure_demo_dataset: unknown parameter(s) {sorted(unknown)}")
    if not demo_is_complete(root, **params):
        with _demo_lock(root):
            if not demo_is_complete(root, **params):  # another process may have built it meanwhile
                old = _demo_version(root)
                if old is not None and old != DEMO_VERSION:
                    print(f"{root}: demo data version {old} is out of date; rebuilding it as version {DEMO_VERSION}")
                p = {**DEMO_DEFAULTS, **params}
                _build_demo(root, p["n_train"], p["n_validate"], p["n_test"], p["slices_per_case"], p["image_size"],
                            p["seed"], progress, workers)
    return root


def save_demo_contact_sheet(root: str | os.PathLike, path: str | os.PathLike, n_cases: int = 4,
                            n_depths: int = 6) -> Path:
    """Save a grid of slices from ``root`` (any OASIS-layout tree): one row per case, ``n_depths`` evenly
    spaced slices per row, with captions. For a demo tree the rows are cases of evenly spread ages,
    youngest first (the age is in the caption); otherwise the first train, validate and test cases."""
    from PIL import Image

    from utils import load_json, save_image_grid

    root = _find_split_root(Path(root))
    by_case: dict[int, tuple[str, dict[int, Path]]] = {}
    for name in SPLITS:
        folder = root / SPLIT_DIRS[name]
        if folder.is_dir():
            for p in folder.glob("*.png"):
                case, k = parse_slice_name(p.name)
                if case != UNKNOWN:
                    by_case.setdefault(case, (name, {}))[1][k] = p
    if not by_case:
        raise DatasetError(f"{root}: no case_<id>_slice_<k>.png slices to draw; build them with: python build_data.py demo")
    try:
        ages = {int(c): s["age"] for c, s in load_json(root / DEMO_MARKER)["subjects"].items() if int(c) in by_case}
    except (ValueError, KeyError, TypeError, AttributeError):
        ages = {}
    if ages:  # show the range of anatomy: cases at evenly spread ranks of age
        by_age = sorted(ages, key=ages.get)
        chosen = [by_age[int(round(i))] for i in np.linspace(0, len(by_age) - 1, min(n_cases, len(by_age)))]
        chosen = list(dict.fromkeys(chosen))
    else:  # round-robin over the splits so the sheet shows train, validate and test cases
        per_split = {name: sorted(c for c, (s, _) in by_case.items() if s == name) for name in SPLITS}
        chosen = []
        while len(chosen) < n_cases and any(per_split.values()):
            for name in SPLITS:
                if per_split[name] and len(chosen) < n_cases:
                    chosen.append(per_split[name].pop(0))
    images, titles = [], []
    for case in chosen:
        name, slices = by_case[case]
        ks = sorted(slices)
        picks = [ks[int(round(i))] for i in np.linspace(0, len(ks) - 1, n_depths)]
        for k in picks:
            with Image.open(slices[k]) as im:
                images.append(np.asarray(im.convert("L"), np.float32) / 255.0)
            age = f" (age {ages[case]:.0f})" if case in ages else ""
            titles.append(f"{name} case {case}{age}, slice {k}")
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


def _read_volume(path: Path):
    """One 3-D volume reoriented to RAS: ``(float32 data, voxel sizes (3,))``."""
    import nibabel as nib

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
    return np.asarray(canon.dataobj, dtype=np.float32), np.abs(np.asarray(canon.header.get_zooms()[:3], dtype=float))


def _volume_slices(path: Path, slices_per_case: int | None, image_size: int, seg_path: Path | None = None):
    """Axial uint8 slices ``(S, S)`` of one volume, low to high, oriented like the OASIS PNGs.

    With ``seg_path`` (its FSL FAST tissue segmentation, OASIS-1's ``*_fseg``: 0 background, 1 CSF,
    2 grey, 3 white matter) returns ``(slices, labels)``, the labels cut, flipped and placed exactly
    like the slices and resized with nearest neighbours.
    """
    from PIL import Image

    data, zooms = _read_volume(path)
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
    labels = None
    if seg_path is not None:
        labels, _ = _read_volume(seg_path)
        if labels.shape != data.shape:
            raise DatasetError(f"{seg_path}: segmentation is {labels.shape} but its volume {path.name} is {data.shape}; "
                               "pass the segmentation made from that volume")
        values = set(np.unique(labels).tolist())
        if not values <= {0.0, 1.0, 2.0, 3.0}:
            raise DatasetError(f"{seg_path}: labels {sorted(values)[:6]} are not FAST's 0-3 (background, CSF, grey, "
                               "white matter)")
        labels = labels.astype(np.uint8)
    r0, c0 = (image_size - rows) // 2, (image_size - cols) // 2
    out, masks = [], []
    for z in levels:
        plane = np.ascontiguousarray(scaled[:, ::-1, z])
        if plane.shape != (rows, cols):
            plane = np.asarray(Image.fromarray(plane, mode="F").resize((int(cols), int(rows)), resample))
        canvas = np.zeros((image_size, image_size), np.uint8)
        canvas[r0:r0 + rows, c0:c0 + cols] = np.rint(np.clip(plane, 0, 255))
        out.append(canvas)
        if labels is not None:
            plane = Image.fromarray(np.ascontiguousarray(labels[:, ::-1, z]), mode="L")
            mask = np.zeros((image_size, image_size), np.uint8)
            mask[r0:r0 + rows, c0:c0 + cols] = np.asarray(plane.resize((int(cols), int(rows)), Image.Resampling.NEAREST))
            masks.append(labels_to_mask(mask))
    return (out, masks) if seg_path is not None else out


def _find_segmentations(volumes_dir: Path, volumes: dict[int, Path]) -> dict[int, Path]:
    """Each volume's FSL FAST segmentation (OASIS-1: ``<volume name>_fseg.img`` under ``FSL_SEG/``), if any."""
    by_stem = {}
    for p in _find_volumes(volumes_dir, "*_fseg.*"):
        stem = p.name.split(".")[0]
        by_stem[stem[:-len("_fseg")]] = p
    return {case: by_stem[v.name.split(".")[0]] for case, v in volumes.items() if v.name.split(".")[0] in by_stem}


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
    When every volume has its FSL FAST tissue segmentation beside it (OASIS-1's
    ``FSL_SEG/..._masked_gfc_fseg.img``), the masks go to ``keras_png_slices_seg_*`` in OASIS's format
    (``seg_<case>_slice_<k>.nii.png``, 0/85/170/255), cut exactly like the slices; otherwise one line
    says there are none.

    Returns:
        The summary also written to ``out_dir/prepare.json``: parameters, ``cases`` per split, ``images``
        per split, ``skipped`` volumes, ``segmentations`` used.
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
    # Tissue masks when every volume comes with its FAST segmentation (a partial mask tree would not load)
    segs = _find_segmentations(volumes_dir, {c: by_subject[c][0] for c in subjects})
    if segs and len(segs) < n:
        missing = next(c for c in subjects if c not in segs)
        warnings.warn(DatasetWarning(f"{volumes_dir}: only {len(segs)} of {n} volumes have a *_fseg tissue segmentation "
                                     f"(none for {by_subject[missing][0].name}); no masks written"), stacklevel=2)
        segs = {}
    images = {}
    bar = tqdm(total=n, desc="volumes", unit="vol", disable=not progress)
    for name in SPLITS:
        folder = out_dir / SPLIT_DIRS[name]
        folder.mkdir(parents=True, exist_ok=True)
        if segs:
            (out_dir / SEG_DIRS[name]).mkdir(parents=True, exist_ok=True)
        images[name] = 0
        for case in cases[name]:
            cut = _volume_slices(by_subject[case][0], slices_per_case, image_size, segs.get(case))
            slices, masks = cut if segs else (cut, [])
            for k, image in enumerate(slices):
                _write_png(folder / slice_file_name(case, k), image)
                images[name] += 1
            for k, mask in enumerate(masks):
                _write_png(out_dir / SEG_DIRS[name] / seg_file_name(case, k), mask)
            bar.update()
    bar.close()
    summary = dict(volumes_dir=str(volumes_dir), pattern=pattern, val_fraction=val_fraction,
                   test_fraction=test_fraction, seed=seed, slices_per_case=slices_per_case, image_size=image_size,
                   cases=cases, images=images, skipped=skipped,
                   volumes={str(c): str(by_subject[c][0]) for c in subjects},
                   segmentations={str(c): str(p) for c, p in segs.items()})
    save_json(summary, out_dir / "prepare.json")
    print(f"{out_dir}: wrote " + ", ".join(f"{name} {images[name]} images / {len(cases[name])} cases" for name in SPLITS))
    if segs:
        print(f"{out_dir}: wrote tissue masks from the volumes' *_fseg segmentations into "
              f"{', '.join(SEG_DIRS[name] + '/' for name in SPLITS)} (seg_<case>_slice_<k>.nii.png, 0/85/170/255)")
    else:
        print(f"{out_dir}: no tissue masks: the volumes come without *_fseg segmentations (OASIS-1's FSL_SEG "
              "folders); the segmenter and the anatomy judge need them")
    return summary




# ----------------------------------------------------------------------------------------------
# Command line: ``python build_data.py demo|prepare``
# ----------------------------------------------------------------------------------------------


def add_commands(sub) -> None:
    """Add the ``demo`` and ``prepare`` subcommands to an argparse subparsers object; each sets ``run``."""
    demo = sub.add_parser("demo", help="write synthetic OASIS-like PNG slices made from the MNI152 templates",
                          description="Write an OASIS-layout tree of 8-bit PNG slices made from the MNI ICBM152 "
                                      "templates shipped with nilearn: per case a synthetic subject (age-like "
                                      "ventricles and sulci, scalp ring, scanner noise), 32 slices through the "
                                      "slab of the lateral ventricles.")
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
    demo.add_argument("--workers", type=int, default=None,
                      help="processes rendering cases side by side; the files do not depend on it "
                           "(default: one per CPU core)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(run=_run_demo)

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
    prep.set_defaults(run=_run_prepare)


def _run_demo(args: argparse.Namespace) -> None:
    root = make_demo_dataset(args.out, n_train=args.train_cases, n_validate=args.validate_cases,
                             n_test=args.test_cases, slices_per_case=args.slices, image_size=args.image_size,
                             seed=args.seed, progress=not args.quiet, workers=args.workers)
    print(f"{root}: demo slices written ({DEMO_MARKER} lists the cases)")
    if args.contact_sheet is not None:
        print(f"contact sheet: {save_demo_contact_sheet(root, args.contact_sheet)}")


def _run_prepare(args: argparse.Namespace) -> None:
    prepare_oasis_volumes(args.volumes, args.out, pattern=args.pattern, val_fraction=args.val_fraction,
                          test_fraction=args.test_fraction, seed=args.seed, slices_per_case=args.slices or None,
                          image_size=args.image_size, progress=not args.quiet)


def build_parser(prog: str = "python build_data.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Build OASIS-layout PNG data sets: the synthetic demo set (demo) or PNG slices from OASIS-1 "
                    "volumes (prepare). Bad input ends with a one-line error and exit code 2. "
                    "python dataset.py check ROOT reads a data folder the way training does.")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="{demo,prepare}"))
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python build_data.py") -> int:
    """The command line: ``demo`` and ``prepare``. Returns the exit code."""
    args = build_parser(prog).parse_args(argv)
    return run_command(args)


if __name__ == "__main__":
    import utils

    with utils.one_line_warnings():  # "warning: <message>", as every command prints them
        sys.exit(main())
