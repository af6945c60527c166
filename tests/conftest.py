"""Shared fixtures: small OASIS-layout PNG trees written by the tests themselves."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def brain_like(size: int, case: int, slice_index: int) -> np.ndarray:
    """A smooth, case- and depth-dependent ellipse 'slice' in uint8 (black background)."""
    rng = np.random.default_rng(1000 * case + slice_index)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    radius = 0.55 + 0.25 * np.sin(np.pi * (slice_index + 1) / 10)
    ry, rx = radius * (1 + 0.1 * rng.standard_normal()), radius * 0.8
    inside = (yy / ry) ** 2 + (xx / rx) ** 2
    img = np.where(inside < 1, 0.45 + 0.4 * np.cos(3 * inside + slice_index / 3), 0.0)
    img += np.where(inside < 0.25, 0.3 * rng.random(), 0.0)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_tree(root: Path, size: int = 32, cases=None, slices: int = 4, validate: bool = True) -> Path:
    """Write ``keras_png_slices_{train,validate,test}`` under ``root`` with ``brain_like`` slices."""
    from PIL import Image

    cases = cases or {"train": [1, 2, 3, 4], "validate": [5], "test": [6]}
    for split, ids in cases.items():
        if split == "validate" and not validate:
            continue
        folder = root / f"keras_png_slices_{split}"
        folder.mkdir(parents=True, exist_ok=True)
        for case in ids:
            for k in range(slices):
                Image.fromarray(brain_like(size, case, k), mode="L").save(folder / f"case_{case:03d}_slice_{k}.nii.png")
    return root


@pytest.fixture
def oasis_tree(tmp_path) -> Path:
    """A 32x32 OASIS-layout tree: 4 train cases, 1 validate, 1 test, 4 slices each."""
    return write_tree(tmp_path / "oasis")


TINY_RUN_FLAGS = ["--image-size", "32", "--downsample", "4", "--channels", "8", "--num-res-blocks", "1",
                  "--num-embeddings", "16", "--embedding-dim", "4", "--prior-filters", "8", "--prior-num-layers", "2",
                  "--batch-size", "4", "--vqvae-epochs", "1", "--prior-epochs", "1", "--decoder-epochs", "1",
                  "--num-samples", "0"]  # the demo preset's decoder fine-tune, one epoch


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One tiny two-stage run (32x32 images, 8x8 codes, slice-conditioned prior) shared by the session."""
    import train

    root = tmp_path_factory.mktemp("tiny_run")
    write_tree(root / "oasis")
    assert train.main(["--data", root / "oasis", "--out", root / "run", *TINY_RUN_FLAGS]) == 0
    return root / "run"
