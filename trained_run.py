"""A trained run as ``predict.py`` and its commands read it: :class:`Run`, :func:`load_run`, the slice
positions a sample is drawn at and the folders of slices a command reads, and :class:`PredictError`.

``predict`` re-exports every name (``from predict import load_run`` works as before). Nothing runs on
import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


class PredictError(Exception):
    """A problem the user can fix; reported as one line without a traceback."""


@dataclass
class Run:
    """A trained run: its directory, saved config and models (``prior`` is None if not trained).

    ``top`` is the top level of a two-level run (``train.py --top-run``): the run in ``<path>/top``,
    whose prior draws each slice's coarse codes first; ``prior`` then draws the fine codes given them.
    """

    path: Path
    config: dict
    vqvae: object
    prior: object | None
    top: "Run | None" = None

    @property
    def two_level(self) -> bool:
        return self.top is not None

    @property
    def conditioned(self) -> bool:
        return self.num_conditions > 0 and self.prior is not None

    @property
    def num_conditions(self) -> int:
        return int(self.config.get("prior", {}).get("num_conditions") or 0)

    def read_splits(self, masks: bool = False):
        """The run's data as it was trained on: ``dataset.read_oasis`` with the run's root, image
        size, validation fraction and seed (``{"train", "validate", "test"} -> Split``, uint8), with
        ``masks`` the tissue masks too where the data has them.

        Raises:
            dataset.DatasetError: the data folder is gone or unreadable.
        """
        import dataset

        data = self.config["data"]
        return dataset.read_oasis(data["root"], image_size=data["image_size"], val_fraction=data["val_fraction"],
                                  seed=self.config["seed"], masks=masks and dataset.has_masks(data["root"]))


def load_run(run_dir, need_prior: bool = True) -> Run:
    """Load ``config.json``, ``vqvae.keras`` and (if ``need_prior``) ``pixelcnn.keras`` from a run.

    Raises:
        PredictError: the directory, its config or a model is missing, with the command that makes it.
    """
    import keras

    import modules  # noqa: F401  (registers the custom layers for load_model)
    import utils

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PredictError(f"run directory {run_dir} not found; train one with: python train.py --out {run_dir}")
    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise PredictError(f"{config_path} not found: {run_dir} is not a train.py run directory")
    config = utils.load_json(config_path)
    vq_path, prior_path = run_dir / "vqvae.keras", run_dir / "pixelcnn.keras"
    if not vq_path.exists():
        raise PredictError(f"{vq_path} not found; finish training with: python train.py --out {run_dir} --resume")
    prior = None
    if need_prior:
        if not prior_path.exists():
            raise PredictError(f"{prior_path} not found: this run has no trained prior; train it with: "
                               f"python train.py --stage prior --out {run_dir}")
        prior = keras.models.load_model(prior_path)
    top = None
    if need_prior and config.get("prior", {}).get("top_codes"):  # two levels: the top level lives in <run>/top
        if not (run_dir / "top").is_dir():
            raise PredictError(f"{run_dir / 'top'} not found: this run's prior has two levels but its top level is "
                               f"gone; retrain its prior: python train.py --stage prior --out {run_dir} --top-run RUN")
        top = load_run(run_dir / "top")
    return Run(run_dir, config, keras.models.load_model(vq_path), prior, top)


def one_level(run: Run, command: str) -> Run:
    """``run``, or a :class:`PredictError` when it has two levels: ``command`` heals and completes code grids
    with a one-level prior (the fine prior of a two-level run would need top codes of the healed slice)."""
    if run.two_level:
        raise PredictError(f"{run.path}: predict.py {command} works on one-level runs; this run's prior has two levels "
                           "(train.py --top-run). Use a one-level run, e.g. --run runs/demo")
    return run


def _conditions(run: Run, slice_index, num: int):
    """The condition array for ``num`` samples, validated against the run's prior."""
    if slice_index is None:
        return None
    if not run.conditioned:
        raise PredictError("--slice was given but this run's prior is not conditioned on slice position; "
                           "drop --slice (or train with --condition-on-slice)")
    if not 0 <= slice_index < run.num_conditions:
        raise PredictError(f"--slice {slice_index} is out of range: this prior knows slices 0 to "
                           f"{run.num_conditions - 1}")
    return np.full(num, slice_index, dtype=np.int32)


def load_slices(run: Run, folder: Path, slice_index: int | None = None):
    """The PNGs of ``folder`` at the run's image size, their names, and their slice positions.

    Returns:
        ``(images (N, H, W, 1) float32, names, condition)``; ``condition`` is None for an
        unconditioned prior, else int32 ``(N,)``: ``slice_index`` for all, or parsed from the names.
    Raises:
        PredictError: empty or missing folder, names without a position on a conditioned prior,
            positions the prior does not know.
    """
    import dataset

    try:
        x, info = dataset.load_images(folder, image_size=run.config["vqvae"]["image_size"], return_info=True)
    except dataset.DatasetError as e:
        raise PredictError(f"--images: {e}") from None
    if not run.conditioned:
        if slice_index is not None:
            raise PredictError("--slice was given but this run's prior is not conditioned on slice position; "
                               "drop --slice")
        return x, info.names, None
    if slice_index is not None:
        return x, info.names, _conditions(run, slice_index, len(x))
    positions = np.asarray(info.slice_indices)
    unknown = [n for n, k in zip(info.names, positions) if k < 0]
    if unknown:
        raise PredictError(f"--images {folder}: {len(unknown)} file(s) have no slice position in their name "
                           f"(e.g. {unknown[0]}) and this run's prior is conditioned on it: rename them "
                           "case_<id>_slice_<k>.nii.png, or pass --slice K to use one position for all")
    bad = [(n, k) for n, k in zip(info.names, positions) if k >= run.num_conditions]
    if bad:
        raise PredictError(f"--images {folder}: {bad[0][0]} has slice position {bad[0][1]} but this prior knows "
                           f"positions 0 to {run.num_conditions - 1}; pass --slice K to override")
    return x, info.names, positions.astype(np.int32)
