"""Generate brain slices from a trained run, reconstruct given slices, and evaluate generation.

    python predict.py                                   # 16 samples from the demo run (runs/demo)
    python predict.py --run runs/oasis --num 64 --temperature 0.9 --slice 20
    python predict.py reconstruct --images some/pngs/   # originals beside reconstructions, SSIM/PSNR
    python predict.py evaluate --num 64                 # realism, sharpness, diversity, judge, NLL
    python predict.py anomaly --images some/pngs/       # NLL maps, healed slices, anomaly maps, scores
    python predict.py complete --images some/pngs/ --keep-rows 12 --seeds 3   # prior fills the rest
    python predict.py subject --num 4 --out synth/   # whole subjects: NIfTI, OASIS-style PNGs, montages
    python predict.py segment --images some/pngs/ --out masks/   # tissue masks in OASIS's format

Everything is rebuilt from the run directory that ``train.py`` wrote: its ``config.json``,
``vqvae.keras`` and ``pixelcnn.keras``. Grid shape, codebook size and slice conditioning come from
there, never from constants. In a notebook::

    from predict import load_run, sample_codes
    run = load_run("runs/demo")
    codes = sample_codes(run.prior, 4, seed=0, condition=16)      # (4, h, w) ints
    images = run.vqvae.decode(codes)                              # (4, H, W, 1) in [0, 1]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __name__ == "__main__":  # hide TensorFlow's start-up lines before anything imports it
    import utils

    utils.quiet_tensorflow(verbose="--verbose" in sys.argv[1:])

from sampler import DEFAULT_TEMPERATURE, sample_codes, sample_two_level  # noqa: E402,F401  (public: `from predict import sample_codes`)
from trained_run import PredictError, Run, _conditions, load_run, load_slices  # noqa: E402,F401  (public here too)
from anomaly_cli import (ANOMALY_MAPS, _anomaly_command, _anomaly_maps_choice, _complete_command,  # noqa: E402,F401
                         add_anomaly_parsers, whole_cases)  # the anomaly and complete commands

REPO = Path(__file__).resolve().parent
DEFAULT_RUN = REPO / "runs" / "demo"
COMMANDS = ("sample", "reconstruct", "evaluate", "anomaly", "complete", "subject", "segment")
SYNTHETIC_CASE = 9000  # case id of the first synthetic subject in the OASIS-style folder (real ids stay below)
SYNTHETIC_SPLIT = "keras_png_slices_train"  # so that dataset.read_oasis / train.py --data read the folder as is


def generate(run: Run, num: int, temperature: float = DEFAULT_TEMPERATURE, seed: int | None = None, condition=None,
             batch_size: int | None = None, progress: bool = True, *, guidance: float | None = None,
             top_k: int | None = None, top_p: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``num`` code grids from the run's prior and decode them.

    ``condition=None`` on a slice-conditioned prior samples unconditionally (its "no condition"
    slot); ``guidance``, ``top_k`` and ``top_p`` are those of :func:`sampler.sample_codes`. A
    two-level run draws the top level's codes first (:func:`sampler.sample_two_level`).

    Returns:
        ``(codes, images)``: int32 ``(num, h, w)`` and float32 ``(num, H, W, 1)`` in [0, 1].
    """
    options = dict(temperature=temperature, condition=condition, batch_size=batch_size, progress=progress,
                   guidance=guidance, top_k=top_k, top_p=top_p)
    try:
        if run.two_level:
            codes, _ = sample_two_level(run.top.prior, run.prior, num, seed=seed, **options)
        else:
            codes = sample_codes(run.prior, num, seed=seed, **options)
    except ValueError as e:  # the sampler's argument checks: one line each, naming what to change
        raise PredictError(f"{run.path}: {e}") from None
    import evaluation

    return codes, evaluation.decode_codes(run.vqvae, codes, batch_size or 32)


def _save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    import utils

    Image.fromarray(utils.to_uint8(image[..., 0]), mode="L").save(path)


def _spread_slices(run: Run, num: int) -> np.ndarray:
    """Slice positions spread evenly over the conditioned prior's range, low to high."""
    return np.linspace(0, run.num_conditions - 1, num).round().astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Whole subjects: slabs of consecutive slices, each drawn given its position and the slice before
# ----------------------------------------------------------------------------------------------

@dataclass
class Subjects:
    """Synthetic subjects: ``codes`` int32 ``(N, S, h, w)``, ``images`` float32 ``(N, S, H, W, 1)`` in
    [0, 1], slice 0 lowest; the first ``kept`` slices are a real case's (completion), the same in all."""

    codes: np.ndarray
    images: np.ndarray
    kept: int = 0


def _slice_seed(seed: int, k: int) -> int:
    """The sampling seed of slice ``k`` of subjects drawn with ``seed`` (each slice its own noise)."""
    return int(np.random.SeedSequence([int(seed), int(k)]).generate_state(1)[0])


def _check_subject_run(run: Run) -> None:
    cfg = run.prior.config
    if not getattr(cfg, "previous_slice", False) or not run.conditioned:
        raise PredictError(f"{run.path}: this run's prior does not see the previous slice (previous_slice is off"
                           f"{'' if run.conditioned else ' and it is not conditioned on slice position'}), so it "
                           f"cannot draw subjects; retrain its prior: python train.py --stage prior --out {run.path} "
                           "--prior-previous-slice --prior-previous-dropout 0.5")
    if run.two_level and not run.top.prior.config.previous_slice:
        raise PredictError(f"{run.path}: the top level's prior ({run.top.path}) does not see the previous slice, so "
                           "this run cannot draw subjects; retrain the top level's prior with --prior-previous-slice")


def generate_subjects(run: Run, num: int, seed: int = 0, temperature: float = DEFAULT_TEMPERATURE, *, keep=None,
                      batch_size: int | None = None, progress: bool = True) -> Subjects:
    """Draw ``num`` subjects of ``run.num_conditions`` consecutive slices, slice 0 first.

    Slice 0 is drawn at position 0 with the prior's "no previous slice"; each next slice ``k`` at
    position ``k`` given the codes of slice ``k - 1``. Slice ``k`` uses the seed
    ``_slice_seed(seed, k)``, so the same seed gives the same subjects, and subject ``n`` does not
    depend on ``num`` or ``batch_size``.

    Args:
        run: a run whose prior has ``previous_slice`` and slice conditioning.
        num: subjects, >= 1. temperature: as in :func:`sampler.sample_codes`.
        keep: optional uint8 or float images ``(K, H, W[, 1])``, a real case's slices 0..K-1
            (volume completion): they are encoded and kept as they are in every subject, and the
            slices from K on are drawn given them.
    Returns:
        :class:`Subjects`.
    Raises:
        PredictError: a prior that does not see the previous slice, ``num`` < 1, a bad ``keep``.
    """
    from tqdm import tqdm

    import evaluation
    import utils

    if int(num) != num or num < 1:
        raise PredictError(f"--num must be at least 1, got {num}")
    _check_subject_run(run)
    num, n_slices = int(num), run.num_conditions
    h, w = run.prior.config.grid_shape
    size = int(run.config["vqvae"]["image_size"])
    codes = np.zeros((num, n_slices, h, w), np.int32)
    top = np.zeros((num, n_slices, *run.prior.config.top_grid_shape), np.int32) if run.two_level else None
    images = np.zeros((num, n_slices, size, size, 1), np.float32)
    kept = 0
    if keep is not None:
        keep = np.asarray(keep)
        x = utils.as_image_batch(keep.astype(np.float32) / 255.0 if keep.dtype == np.uint8 else keep)
        kept = len(x)
        if x.shape[1:3] != (size, size):
            raise PredictError(f"kept slices are {x.shape[1]}x{x.shape[2]} but this run's images are {size}x{size}")
        if not 1 <= kept < n_slices:
            raise PredictError(f"--keep {kept}: keep 1 to {n_slices - 1} slices (this prior draws {n_slices})")
        codes[:, :kept] = evaluation.encode_images(run.vqvae, x)[None]
        if top is not None:
            top[:, :kept] = evaluation.encode_images(run.top.vqvae, x)[None]
        images[:, :kept] = x[None]
    bar = tqdm(range(kept, n_slices), desc=f"subjects: {num} x {n_slices} slices", unit="slice", disable=not progress)
    for k in bar:
        previous = codes[:, k - 1] if k > 0 else None
        options = dict(temperature=temperature, seed=_slice_seed(seed, k), condition=k, previous=previous,
                       batch_size=batch_size)
        try:
            if top is None:
                codes[:, k] = sample_codes(run.prior, num, **options)
            else:
                codes[:, k], top[:, k] = sample_two_level(run.top.prior, run.prior, num, **options,
                                                          top_previous=top[:, k - 1] if k > 0 else None)
        except ValueError as e:
            raise PredictError(f"{run.path}: {e}") from None
        images[:, k] = evaluation.decode_codes(run.vqvae, codes[:, k], batch_size or 32)
    return Subjects(codes, images, kept)


def run_voxel_mm(run: Run) -> tuple[tuple[float, float, float], str]:
    """The voxel size (mm: rows, columns, slices) of the run's images, and where it comes from.

    The demo data knows its own (``build_data.demo_voxel_mm``); OASIS PNGs carry none, so 1 mm.
    """
    import build_data

    root = run.config.get("data", {}).get("root")
    voxel = build_data.demo_voxel_mm(root, run.config["vqvae"]["image_size"]) if root else None
    if voxel is not None:
        return voxel, "the demo data's at this image size"
    return (1.0, 1.0, 1.0), "1 mm assumed (OASIS PNGs carry none)"


def _write_nifti(volume: np.ndarray, voxel_mm, path: Path, note: str) -> None:
    """uint8 ``(H, W, S)`` as a NIfTI-1 file whose affine states ``voxel_mm``; gzip without a time stamp,
    so the same volume gives the same bytes."""
    import gzip

    import nibabel as nib

    img = nib.Nifti1Image(volume, np.diag([*map(float, voxel_mm), 1.0]))
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = note[:79].encode()
    data = img.to_bytes()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)


def write_subjects(subjects: Subjects, out: Path, voxel_mm, note: str, first_case: int = SYNTHETIC_CASE) -> list[Path]:
    """Write each subject as ``subject_NNN.nii.gz`` (uint8 H x W x slices), as PNG slices
    ``SYNTHETIC_SPLIT/case_<first_case + n>_slice_<k>.nii.png`` (an OASIS-style folder) and as
    ``subject_NNN_montage.png``. Returns the NIfTI paths."""
    import dataset
    import utils

    out = Path(out)
    folder = out / SYNTHETIC_SPLIT
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, slab in enumerate(subjects.images):
        pixels = utils.to_uint8(slab[..., 0])  # (S, H, W): exactly what the PNGs hold
        path = out / f"subject_{n:03d}.nii.gz"
        _write_nifti(np.ascontiguousarray(pixels.transpose(1, 2, 0)), voxel_mm, path, note)
        paths.append(path)
        for k, image in enumerate(slab):
            _save_png(image, folder / dataset.slice_file_name(first_case + n, k))
        utils.save_image_grid(slab, out / f"subject_{n:03d}_montage.png", ncols=8,
                              titles=[f"slice {k}" + (" (kept)" if k < subjects.kept else "") for k in range(len(slab))],
                              suptitle=f"synthetic subject {n} (case {first_case + n})", cell_inches=1.2)
    return paths


def plot_subjects(subjects: Subjects, path: Path, real=None, columns: int = 8) -> Path:
    """One row per subject (every ``S / columns``-th slice), a real subject's row first if given
    (``real`` float ``(S, H, W, 1)``)."""
    import utils

    n_slices = subjects.images.shape[1]
    pick = np.linspace(0, n_slices - 1, min(columns, n_slices)).round().astype(int)
    rows = ([("real test subject", real[pick])] if real is not None else []) + [
        (f"synthetic {n}", slab[pick]) for n, slab in enumerate(subjects.images)]
    titles = [[f"slice {k}" for k in pick]] + [None] * (len(rows) - 1)
    return utils.plot_image_rows(rows, path, titles=titles, cell_inches=1.3)


def _kept_case(run: Run, folder: Path, keep: int, case: int | None):
    """Slices 0..keep-1 of one case in ``folder`` as uint8 ``(keep, H, W, 1)``, and the case id."""
    import dataset

    try:
        split = dataset.read_split(folder, image_size=run.config["vqvae"]["image_size"])
    except dataset.DatasetError as e:
        raise PredictError(f"--images: {e}") from None
    by_case = dataset.subjects(split)
    if not by_case:
        raise PredictError(f"--images {folder}: no file is named case_<id>_slice_<k>.nii.png, so no case to complete")
    if case is None:
        case = min(by_case)
    if case not in by_case:
        raise PredictError(f"--case {case}: {folder} holds cases {', '.join(map(str, sorted(by_case)))}; pick one")
    idx = by_case[case]
    have = np.asarray(split.slice_indices)[idx]
    if len(have) < keep or not np.array_equal(have[:keep], np.arange(keep)):
        raise PredictError(f"--keep {keep}: case {case} in {folder} does not hold slices 0 to {keep - 1} "
                           f"(it has {len(have)} slices from {have.min()}); pass a smaller --keep or another --case")
    return split.images[idx[:keep]], case


def _subject_command(args) -> None:
    import dataset
    import utils

    run = load_run(args.run)
    _check_subject_run(run)
    keep, case = None, None
    if args.keep is not None:
        keep, case = _kept_case(run, args.images, args.keep, args.case)
        print(f"completion: keeping slices 0 to {args.keep - 1} of case {case} from {args.images}")
    subjects = generate_subjects(run, args.num, seed=args.seed, temperature=args.temperature, keep=keep,
                                 batch_size=args.batch_size)
    out = Path(args.out or run.path / "subjects")
    voxel, source = run_voxel_mm(run)
    note = f"oasis-vqvae synthetic, seed {args.seed}; voxel size {source}"  # the NIfTI header's 80 characters
    write_subjects(subjects, out, voxel, note)
    meta = {"num": args.num, "seed": args.seed, "temperature": args.temperature, "slices": subjects.images.shape[1],
            "voxel_mm": voxel, "voxel_mm_source": source, "kept_slices": subjects.kept, "kept_case": case,
            "kept_from": None if keep is None else str(args.images),
            "cases": [SYNTHETIC_CASE + n for n in range(args.num)], "run": str(run.path)}
    utils.save_json(meta, out / "subjects.json")
    if args.figure:
        real = None
        try:
            test = run.read_splits()["test"]
            groups = dataset.subjects(test)
            if groups:
                real = test.subset(groups[min(groups)]).float()
        except dataset.DatasetError as e:
            print(f"predict.py: notice: no real subject in the figure: {e}", file=sys.stderr)
        plot_subjects(subjects, Path(args.figure), real=real)
    print(f"wrote {args.num} subjects to {out}: subject_NNN.nii.gz ({subjects.images.shape[2]}x"
          f"{subjects.images.shape[3]}x{subjects.images.shape[1]} uint8, voxel {voxel[0]:.3g} x {voxel[1]:.3g} x "
          f"{voxel[2]:.3g} mm: {source}), montages and the OASIS-style folder {out / SYNTHETIC_SPLIT}")


# ----------------------------------------------------------------------------------------------
# Evaluation (every metric is computed in evaluation.py)
# ----------------------------------------------------------------------------------------------

def load_judge(run: Run):
    """The run's judge (``judge.keras``), or None with a notice when the run has none."""
    import keras

    path = run.path / "judge.keras"
    if not path.exists():
        print(f"predict.py: notice: {path} not found, so the judge's metrics (Frechet distance, precision / "
              f"recall, slice agreement) are skipped; train it with: python train.py --stage judge --out {run.path}",
              file=sys.stderr)
        return None
    return keras.models.load_model(path)


def load_segmenter(run: Run, notice: bool = True):
    """The run's tissue segmenter (``segmenter.keras``), or None (with a notice) when the run has none."""
    import keras

    import segmenter  # noqa: F401  (registers its loss for load_model)

    path = run.path / "segmenter.keras"
    if not path.exists():
        if notice:
            print(f"predict.py: notice: {path} not found, so the anatomy judge (tissue areas, fragmentation, "
                  "ventricles, confidence, Frechet distance of the segmenter's features) is skipped; train it "
                  f"on data with keras_png_slices_seg_* masks with: python train.py --stage segmenter --out {run.path}",
                  file=sys.stderr)
        return None
    return keras.models.load_model(path)


NO_SEGMENTER_NOTE = "no segmenter.keras in the run: the anatomy judge was skipped (python train.py --stage segmenter)"


def _anatomy(run: Run, segmenter, sets: dict, splits, out_dir: Path, figure: str, shown) -> dict:
    """The anatomy judge's figures of ``sets`` (``name -> (images, positions)``, ``real_validate`` the
    floor) against the run's test split, and a figure of the first set's slices and segmentations
    beside real test slices (``shown``: their test indices) with theirs."""
    import evaluation

    test = splits["test"]
    positions = test.slice_indices if run.conditioned else None
    metrics, readouts = evaluation.anatomy_scores(segmenter, sets, test.images, positions, test_masks=test.masks)
    first = next(iter(sets))
    k = min(8, len(sets[first][0]), len(shown))
    evaluation.plot_anatomy([(first.replace("_", " "), sets[first][0][:k], readouts[first].labels[:k]),
                             ("real test", test.subset(shown[:k]).float(), readouts["real_test"].labels[shown[:k]])],
                            out_dir / figure)
    return metrics


def _evaluation_setup(run: Run, out_dir) -> tuple[Path, dict]:
    """The evaluation commands' output folder (made; default ``RUN/evaluation``) and the run's splits
    (with their tissue masks where the data has them)."""
    import dataset

    out_dir = Path(out_dir or run.path / "evaluation")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return out_dir, run.read_splits(masks=True)
    except dataset.DatasetError as e:
        raise PredictError(str(e)) from None


def evaluate(run: Run, num: int = 64, temperature: float = DEFAULT_TEMPERATURE, seed: int = 0, batch_size: int | None = None,
             out_dir: Path | None = None, *, guidance: float | None = None, top_k: int | None = None,
             top_p: float | None = None, two_sample_num: int | None = None) -> dict:
    """Generate ``num`` samples, score them against the run's data; write JSON and figures.

    A conditioned prior is sampled at the slice positions of ``num`` randomly chosen test slices
    (``evaluation.reference_pick``), so the samples follow the test split's distribution of depths.
    The metrics are those of ``evaluation.score_samples`` (realism, memorisation, interior realism,
    sharpness, diversity and, with the run's ``judge.keras``, Frechet distance, precision / recall
    and slice agreement; validation reconstructions scored alike as the decoder's ceiling), the
    prior's NLL of the test codes in bits per code and per slice (two levels: the fine prior's given the
    top codes, and ``prior_test_top_nll_bits_per_slice`` the top prior's own), the power of the test slices'
    reconstructions and of the samples over the real test slices' per frequency band
    (``evaluation.power_spectrum_ratios``; the three spectra in ``power_spectrum.png``), and the classifier two-sample
    test (``evaluation.two_sample_scores``: its floor and power rows, reconstructions vs real paired by
    case, samples vs real and vs reconstructions, on every view, each with its interval and p-value;
    the table also in ``two_sample.md``) on ``two_sample_num`` further samples drawn at the positions
    of validate and test slices (None: as many as those two splits hold; 0: skip the test).
    """
    import time

    import evaluation
    import utils

    out_dir, splits = _evaluation_setup(run, out_dir)
    test = splits["test"]
    pick = evaluation.reference_pick(len(test), num, seed)
    condition = None
    if run.conditioned:
        condition = np.resize(test.slice_indices[pick].astype(np.int32), num)
    judge = load_judge(run)

    codes, samples = generate(run, num, temperature=temperature, seed=seed, condition=condition,
                              batch_size=batch_size, guidance=guidance, top_k=top_k, top_p=top_p)
    scores, details = evaluation.score_samples(samples, splits, pick=pick, requested=condition, judge=judge,
                                               vqvae=run.vqvae, seed=seed)
    metrics = {"num_samples": num, "temperature": temperature, "seed": seed, "guidance": guidance,
               "top_k": top_k, "top_p": top_p, **scores}
    test_codes = evaluation.encode_images(run.vqvae, test.images)
    test_condition = test.slice_indices.astype(np.int32) if run.conditioned else None
    test_top = evaluation.encode_images(run.top.vqvae, test.images) if run.two_level else None
    nll = evaluation.prior_nll(run.prior, test_codes, test_condition, top=test_top)  # two levels: given the top codes
    if run.two_level:  # the top prior's own bits, as train.py's metrics.json names them; the two levels' add up
        metrics["prior_test_top_nll_bits_per_slice"] = evaluation.prior_nll(run.top.prior, test_top,
                                                                            test_condition)["bits_per_slice"]
    test_recon = evaluation.decode_codes(run.vqvae, test_codes)  # the power spectrum's and the two-sample test's
    power, spectra = evaluation.power_spectrum_ratios(test.images, {"reconstructions": test_recon, "samples": samples})
    metrics.update(power)
    utils.plot_power_spectrum(power["power_band_edges"],
                              {"real test": spectra["real"], "reconstructions (test)": spectra["reconstructions"],
                               f"samples ({num})": spectra["samples"]},
                              out_dir / "power_spectrum.png")
    val = splits["validate"]
    _, val_recon = evaluation.reconstruct(run.vqvae, val.images)  # read by the anatomy judge and the two-sample test
    segmenter = load_segmenter(run)
    if segmenter is None:
        metrics["anatomy_note"] = NO_SEGMENTER_NOTE
    else:  # samples, reconstructions of real validate slices and those slices (the floor), all segmented
        val_pick = evaluation.validate_pick(len(val), num, seed)
        val_images = val.subset(val_pick).float()
        recon_val = val_recon[val_pick]
        val_positions = val.slice_indices[val_pick] if run.conditioned else None
        metrics.update(_anatomy(run, segmenter, {"samples": (samples, condition),
                                                 "reconstructions": (recon_val, val_positions),
                                                 "real_validate": (val_images, val_positions)},
                                splits, out_dir, "anatomy_samples_vs_real.png", pick))
    metrics["prior_test_nll_bits"] = nll["bits_per_code"]
    metrics["prior_test_nll_bits_per_slice"] = nll["bits_per_slice"]
    real_all = np.concatenate([splits["validate"].slice_indices, test.slice_indices])
    m = len(real_all) if two_sample_num is None else int(two_sample_num)
    unavailable = evaluation.two_sample_unavailable(splits)
    if m and unavailable:
        print(f"predict.py: notice: the two-sample test is skipped: {unavailable}", file=sys.stderr)
    elif m:
        # samples at the positions of the real slices they are compared with (validate and test)
        pick_m = evaluation.reference_pick(len(real_all), m, seed)
        cond_m = np.resize(real_all[pick_m].astype(np.int32), m) if run.conditioned else None
        start = time.perf_counter()
        _, many = generate(run, m, temperature=temperature, seed=seed, condition=cond_m, batch_size=batch_size,
                           guidance=guidance, top_k=top_k, top_p=top_p)
        metrics["two_sample_num_samples"] = m
        metrics["two_sample_sampling_seconds"] = time.perf_counter() - start
        print(f"two-sample test: drew {m} samples at the real slices' positions in "
              f"{metrics['two_sample_sampling_seconds']:.0f} s; training its classifiers", file=sys.stderr)
        start = time.perf_counter()
        metrics.update(evaluation.two_sample_scores(splits, test_recon, many, seed=seed, validate_reconstructions=val_recon))
        metrics["two_sample_classifier_seconds"] = time.perf_counter() - start
        table = evaluation.two_sample_table(metrics)
        (out_dir / "two_sample.md").write_text(table + "\n")
        print(table, file=sys.stderr)
        show = pick_m[:4]  # the first samples were drawn at these real slices' positions
        # what the classifier sees, for the eye: real slices, their reconstructions, samples drawn at
        # their positions, each beside a 4x zoom of its centre (grain and grey / white borders)
        real = np.concatenate([val.float(), test.float()])[show]
        rows = []
        for label, images in (("real", real), ("reconstruction", np.concatenate([val_recon, test_recon])[show]),
                              ("sample", many[:len(show)])):
            rows += [(label, images), (f"{label}, centre x4", evaluation.center_crop(images, 0.25))]
        utils.plot_image_rows(rows, out_dir / "real_recon_samples_zoom.png", cell_inches=2.4)
    utils.save_json(metrics, out_dir / "generation_metrics.json")
    show = np.arange(min(8, num))
    nearest = details["nearest_test"]
    utils.plot_image_rows(
        [("sample", samples[show]), ("nearest test", test.subset(nearest[show]).float())],
        out_dir / "samples_vs_nearest.png",
        titles=[[f"slice {condition[k]}" if condition is not None else f"#{k}" for k in show],
                [f"SSIM {details['realism'][k]:.2f}" for k in show]])
    utils.save_image_grid(samples[:min(num, 16)], out_dir / "samples_grid.png", ncols=8)
    return metrics


def evaluate_subjects(run: Run, num: int = 8, temperature: float = DEFAULT_TEMPERATURE, seed: int = 0, batch_size: int | None = None,
                      out_dir: Path | None = None, two_sample: bool = True) -> dict:
    """Draw ``num`` subjects and score them (``evaluation.subject_scores``) beside the real test subjects and
    beside ``num`` slabs of slices drawn independently at positions 0..S-1 (no previous slice); write
    ``subject_metrics.json`` and ``subjects_vs_real.png`` in ``out_dir`` (default: ``RUN/evaluation``)."""
    import dataset
    import evaluation

    out_dir, splits = _evaluation_setup(run, out_dir)
    test = splits["test"]
    subjects = generate_subjects(run, num, seed=seed, temperature=temperature, batch_size=batch_size)
    n_slices = subjects.images.shape[1]
    real = [idx for idx in dataset.subjects(test).values() if len(idx) == n_slices]
    if not real:
        raise PredictError(f"the test split holds no case with all {n_slices} slices to compare subjects with")
    real_slabs = np.stack([test.subset(idx).images for idx in real])
    positions = np.tile(np.arange(n_slices, dtype=np.int32), num)
    _, independent = generate(run, num * n_slices, temperature=temperature, seed=seed + 1, condition=positions,
                              batch_size=batch_size)
    metrics = {"num_subjects": num, "temperature": temperature, "seed": seed}
    unavailable = evaluation.two_sample_unavailable(splits)
    if two_sample and unavailable:
        print(f"predict.py: notice: the two-sample test is skipped: {unavailable}", file=sys.stderr)
    metrics.update(evaluation.subject_scores(
        subjects.images, real_slabs, independent.reshape(num, n_slices, *independent.shape[1:]),
        test_images=test.images, judge=load_judge(run),
        two_sample_splits=splits if two_sample and not unavailable else None, seed=seed))
    segmenter = load_segmenter(run)
    if segmenter is None:
        metrics["anatomy_note"] = NO_SEGMENTER_NOTE
    else:  # the subjects' slices at their positions, the real validate slices as the floor; tissue volumes
        val = splits["validate"]
        flat = subjects.images.reshape(-1, *subjects.images.shape[2:])
        metrics.update(_anatomy(run, segmenter, {"subjects": (flat, np.tile(np.arange(n_slices), num)),
                                                 "real_validate": (val.float(), val.slice_indices)},
                                splits, out_dir, "anatomy_subjects_vs_real.png", real[0]))
        if len(real_slabs) >= 2:
            metrics.update(evaluation.subject_anatomy(segmenter, subjects.images, real_slabs))
        else:
            metrics["anatomy_volume_note"] = (f"{len(real_slabs)} real test subject: tissue volumes need at least two "
                                              "to compare with")
    import utils

    utils.save_json(metrics, out_dir / "subject_metrics.json")
    plot_subjects(Subjects(subjects.codes[:3], subjects.images[:3]), out_dir / "subjects_vs_real.png",
                  real=real_slabs[0].astype(np.float32) / 255.0)
    return metrics


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="predict.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample new slices from a trained run (default command), reconstruct given slices, "
                    "or evaluate generation. Run 'python predict.py COMMAND --help' for each command.",
        epilog="commands:\n  sample       draw codes from the prior, decode them, write PNGs (default)\n"
               "  reconstruct  encode and decode the PNGs in --images, with per-image SSIM / PSNR\n"
               "  evaluate     realism, sharpness, diversity, judge metrics, NLL and the two-sample test of samples\n"
               "  anomaly      per-code NLL maps, healed slices and anomaly maps of the PNGs in --images\n"
               "  complete     keep the top --keep-rows code rows of each slice in --images, sample the rest\n"
               "  subject      whole subjects slice by slice: NIfTI volumes, an OASIS-style folder, montages\n"
               "  segment      tissue masks of the PNGs in --images, in OASIS's format (seg_ names, 0/85/170/255)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp):
        sp.add_argument("--run", type=Path, default=DEFAULT_RUN, help=f"run directory from train.py (default: {DEFAULT_RUN})")
        sp.add_argument("--out", type=Path, default=None, help="output folder (default: a folder in the run directory)")
        sp.add_argument("--batch-size", type=int, default=None,
                        help="samples (or images) processed at once; results do not depend on it (default: all)")
        sp.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's start-up and library logging (hidden by default)")

    def sampling(sp, default_num):
        sp.add_argument("--num", type=int, default=default_num, help=f"number of samples (default: {default_num})")
        sp.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help="divide the prior's logits by this before sampling: 1 draws from the prior as it is, < 1 "
                             "cuts its unlikely codes (fewer stray spots, less variety) (default: "
                             f"{DEFAULT_TEMPERATURE}, chosen by bench/bench_sampling_defaults.py)")
        sp.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives identical files (default: 0)")
        sp.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale s on slice position: logits uncond + s * (cond - uncond); "
                             "1 is plain conditioned sampling, > 1 follows the slice position more closely "
                             "(needs a prior trained with --prior-condition-dropout > 0; default: none)")
        sp.add_argument("--top-k", type=int, default=None,
                        help="draw each code from the k most likely codes only (default: all)")
        sp.add_argument("--top-p", type=float, default=None,
                        help="nucleus sampling: draw from the smallest set of codes whose probability reaches p, "
                             "0 < p <= 1 (default: all)")

    s = sub.add_parser("sample", help="draw samples (the default command)",
                       description="Draw code grids from the prior, decode them, write one PNG per sample and a grid.")
    common(s)
    sampling(s, 16)
    s.add_argument("--slice", type=int, default=None,
                   help="slice position to generate, for a prior conditioned on slice position "
                        "(default for such a prior: positions spread from lowest to highest)")
    s.add_argument("--unconditional", action="store_true",
                   help="sample a slice-conditioned prior without a slice position (its 'no condition' slot; "
                        "needs a prior trained with --prior-condition-dropout > 0)")
    r = sub.add_parser("reconstruct", help="encode and decode given slices",
                       description="Encode and decode a folder of PNG slices; write originals beside reconstructions.")
    common(r)
    r.add_argument("--images", type=Path, required=True, help="folder of PNG slices to reconstruct")
    e = sub.add_parser("evaluate", help="judge generated samples",
                       description="Write generation_metrics.json (realism, memorisation, interior realism, sharpness, "
                                   "diversity, the judge's Frechet distance, precision / recall and slice "
                                   "agreement, prior NLL, the power ratio per frequency band of reconstructions and "
                                   "samples over real test slices) and figures: samples beside their nearest test "
                                   "slices, the three radial power spectra (power_spectrum.png).")
    common(e)
    sampling(e, 64)
    e.add_argument("--two-sample-num", type=int, default=None, metavar="N",
                   help="samples for the classifier two-sample test (a small CNN trained to tell them from real "
                        "slices and from reconstructions; 0.5: indistinguishable, 1.0: always told apart), drawn at "
                        "the validate and test slices' positions besides --num (default: as many as those splits "
                        "hold; 0: skip the test); its table, with intervals and power rows, goes to two_sample.md")
    e.add_argument("--subjects", type=int, default=None, metavar="N",
                   help="instead of single slices, draw N whole subjects (predict.py subject) and write "
                        "subject_metrics.json: adjacent-slice SSIM beside real test subjects and beside slices drawn "
                        "independently, the judge's slice order (Spearman), realism, diversity between subjects, "
                        "the two-sample test (skipped with --two-sample-num 0)")
    add_anomaly_parsers(sub, common)
    g = sub.add_parser("segment", help="tissue masks of given slices, in OASIS's format",
                       description="Segment a folder of PNG slices with the run's segmenter (segmenter.keras) into "
                                   "background, CSF, grey and white matter; write one mask per slice in OASIS's "
                                   "format: seg_<case>_slice_<k>.nii.png for case_<case>_slice_<k>.nii.png, the "
                                   "slice's size, grey levels 0/85/170/255.")
    common(g)
    g.add_argument("--images", type=Path, required=True, help="folder of PNG slices to segment")
    j = sub.add_parser("subject", help="draw whole subjects: 32-slice slabs, each slice given the one before",
                       description="Draw --num subjects slice by slice (slice 0 first; each next slice given its "
                                   "position and the slice before) with a prior trained with --prior-previous-slice. "
                                   "Writes per subject subject_NNN.nii.gz (H x W x slices, uint8, the affine "
                                   "stating the voxel size), subject_NNN_montage.png, the slices as an OASIS-style "
                                   f"folder {SYNTHETIC_SPLIT}/case_{SYNTHETIC_CASE}_slice_K.nii.png, and "
                                   "subjects.json. With --keep K --images DIR: volume completion, keeping a real "
                                   "case's first K slices.")
    common(j)
    j.add_argument("--num", type=int, default=4, help="subjects to draw (default: 4)")
    j.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"sampling temperature, as for sample (default: {DEFAULT_TEMPERATURE})")
    j.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives identical files (default: 0)")
    j.add_argument("--keep", type=int, default=None, metavar="K",
                   help="volume completion: keep the first K real slices of one case of --images and draw the rest")
    j.add_argument("--images", type=Path, default=None, help="with --keep: folder of a real case's PNG slices")
    j.add_argument("--case", type=int, default=None, help="with --keep: the case id to complete (default: the lowest)")
    j.add_argument("--figure", type=Path, default=None,
                   help="also draw a figure PATH: a row per subject (8 slices), a real test subject's row first")
    return p


def _check_positive(parser, name: str, value) -> None:
    if value is not None and value < 1:
        parser.error(f"{name} must be at least 1, got {value}")


def main(argv=None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "sample")
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_positive(parser, "--batch-size", args.batch_size)
    if args.command in ("sample", "evaluate"):
        _check_positive(parser, "--num", args.num)
        _check_positive(parser, "--top-k", args.top_k)
        if args.top_p is not None and not 0 < args.top_p <= 1:
            parser.error(f"--top-p must lie in (0, 1], got {args.top_p}")
        if args.command == "sample" and args.unconditional and args.slice is not None:
            parser.error("--unconditional and --slice exclude each other: drop one")
        if args.command == "evaluate" and args.subjects is not None and args.subjects < 2:
            parser.error(f"--subjects must be at least 2 (diversity compares pairs of subjects), got {args.subjects}")
        if args.command == "evaluate" and args.num < 2:
            parser.error(f"--num must be at least 2 for evaluate (diversity compares pairs of samples), got {args.num}")
        if args.command == "evaluate" and args.two_sample_num is not None and not (
                args.two_sample_num == 0 or args.two_sample_num >= 4):
            parser.error(f"--two-sample-num must be 0 (skip the test) or at least 4 (two halves of two), "
                         f"got {args.two_sample_num}")
    if args.command == "complete":
        _check_positive(parser, "--seeds", args.seeds)
    if args.command == "subject":
        _check_positive(parser, "--num", args.num)
        if (args.keep is None) != (args.images is None):
            parser.error("--keep and --images go together: --keep K --images DIR completes a real case")
        if args.keep is not None and args.keep < 1:
            parser.error(f"--keep must be at least 1, got {args.keep}")
        if args.case is not None and args.keep is None:
            parser.error("--case needs --keep K --images DIR")
    if args.command == "anomaly":
        _check_positive(parser, "--rounds", args.rounds)
        _check_positive(parser, "--samples", args.samples)
        if args.dilate < 0:
            parser.error(f"--dilate must be 0 or more, got {args.dilate}")
    if args.command == "anomaly" and args.percentile is not None and not 0 < args.percentile < 100:
        parser.error(f"--percentile must lie between 0 and 100, got {args.percentile}")
    if args.command not in ("reconstruct", "segment") and args.temperature <= 0:
        parser.error(f"--temperature must be above 0, got {args.temperature}")
    try:
        return _run_command(args)
    except PredictError as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 2


def _run_command(args) -> int:
    import json

    import utils

    if args.command == "sample":
        run = load_run(args.run)
        if args.unconditional:
            if not run.conditioned:
                raise PredictError("--unconditional: this run's prior is not conditioned on slice position, so "
                                   "its samples are unconditional already; drop the flag")
            condition = None
        elif args.slice is None and run.conditioned:
            condition = _spread_slices(run, args.num)
            print(f"prior is conditioned on slice position: sampling slices {condition[0]} to {condition[-1]} "
                  "spread over the samples (pick one with --slice)")
        else:
            condition = _conditions(run, args.slice, args.num)
        codes, images = generate(run, args.num, args.temperature, args.seed, condition, args.batch_size,
                                 guidance=args.guidance, top_k=args.top_k, top_p=args.top_p)
        out = Path(args.out or run.path / "samples")
        out.mkdir(parents=True, exist_ok=True)
        for k, image in enumerate(images):
            _save_png(image, out / f"sample_{k:03d}.png")
        utils.save_image_grid(images, out / "samples_grid.png",
                              titles=None if condition is None else [f"slice {c}" for c in condition],
                              suptitle=f"{args.num} samples, temperature {args.temperature}, seed {args.seed}"
                              + "".join(f", {name} {value}" for name, value in (("guidance", args.guidance),
                                        ("top-k", args.top_k), ("top-p", args.top_p)) if value is not None)
                              + (", unconditional" if args.unconditional else ""))
        np.save(out / "codes.npy", codes)
        print(f"wrote {args.num} samples and samples_grid.png to {out}")
    elif args.command == "reconstruct":
        import dataset
        import evaluation

        run = load_run(args.run, need_prior=False)
        try:
            x, info = dataset.load_images(args.images, image_size=run.config["vqvae"]["image_size"],
                                          return_info=True)
        except dataset.DatasetError as e:
            raise PredictError(str(e)) from None
        _, recon = evaluation.reconstruct(run.vqvae, x, args.batch_size or 32)
        scores = evaluation.reconstruction_metrics(x, recon)
        ssim, psnr = scores["ssim"], scores["psnr"]
        out = Path(args.out or run.path / "reconstructions")
        out.mkdir(parents=True, exist_ok=True)
        rows = [{"file": name, "ssim": float(s), "psnr": float(p)} for name, s, p in zip(info.names, ssim, psnr)]
        utils.save_json({"mean_ssim": scores["ssim_mean"], "mean_psnr": scores["psnr_mean"], "images": rows},
                        out / "reconstruction_metrics.json")
        for start in range(0, len(x), 8):
            sl = slice(start, start + 8)
            utils.plot_image_rows([("original", x[sl]), ("reconstruction", recon[sl])],
                                  out / f"reconstructions_{start // 8:03d}.png",
                                  titles=[[Path(n).stem for n in info.names[sl]],
                                          [f"SSIM {s:.3f} / {p:.1f} dB" for s, p in zip(ssim[sl], psnr[sl])]])
        print(f"{len(x)} images: mean SSIM {ssim.mean():.4f}, mean PSNR {psnr.mean():.2f} dB; figures in {out}")
    elif args.command == "anomaly":
        _anomaly_command(args)
    elif args.command == "complete":
        _complete_command(args)
    elif args.command == "subject":
        _subject_command(args)
    elif args.command == "segment":
        _segment_command(args)
    elif args.subjects is not None:
        metrics = evaluate_subjects(load_run(args.run), args.subjects, args.temperature, args.seed, args.batch_size,
                                    args.out, two_sample=args.two_sample_num != 0)
        print(json.dumps(metrics, indent=2))
    else:
        run = load_run(args.run)
        metrics = evaluate(run, args.num, args.temperature, args.seed, args.batch_size, args.out,
                           guidance=args.guidance, top_k=args.top_k, top_p=args.top_p,
                           two_sample_num=args.two_sample_num)
        print(json.dumps(metrics, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------
# Anomaly maps and completion (the functions live in anomaly.py)
# ----------------------------------------------------------------------------------------------

def mask_file_name(image_name: str) -> str:
    """The OASIS mask name of an image: ``case_011_slice_12.nii.png`` -> ``seg_011_slice_12.nii.png``
    (any other name gets a ``seg_`` prefix)."""
    return "seg_" + (image_name[len("case_"):] if image_name.lower().startswith("case_") else image_name)


def _segment_command(args) -> None:
    from PIL import Image

    import dataset
    import segmenter as seg

    run = load_run(args.run, need_prior=False)
    model = load_segmenter(run, notice=False)
    if model is None:
        raise PredictError(f"{run.path / 'segmenter.keras'} not found: this run has no segmenter; train it on data "
                           f"with keras_png_slices_seg_* masks with: python train.py --stage segmenter --out {run.path}")
    try:
        x, info = dataset.load_images(args.images, image_size=run.config["vqvae"]["image_size"], return_info=True)
    except dataset.DatasetError as e:
        raise PredictError(f"--images: {e}") from None
    out = Path(args.out or run.path / "segmentations")
    out.mkdir(parents=True, exist_ok=True)
    step = args.batch_size or 64
    counts = np.zeros(len(dataset.TISSUES))
    for start in range(0, len(x), step):
        probs, _ = seg.segmenter_outputs(model, x[start:start + step], step)
        for p, name in zip(probs, info.names[start:start + step]):
            with Image.open(Path(args.images) / name) as im:
                size = im.size  # (W, H): the mask has the slice's own size
            if p.shape[:2] != size[::-1]:  # probabilities resized (bilinear), then the most probable tissue
                p = np.stack([np.asarray(Image.fromarray(p[..., k], mode="F").resize(size, Image.Resampling.BILINEAR))
                              for k in range(p.shape[-1])], axis=-1)
            labels = np.argmax(p, axis=-1).astype(np.uint8)
            counts += np.bincount(labels.ravel(), minlength=len(counts))
            Image.fromarray(dataset.labels_to_mask(labels), mode="L").save(out / mask_file_name(name))
    share = ", ".join(f"{t} {c / counts.sum():.1%}" for t, c in zip(dataset.TISSUES[1:], counts[1:]))
    print(f"wrote {len(x)} masks (seg_*.png, grey levels {list(dataset.SEG_LEVELS)}) to {out}; pixels: {share}")


if __name__ == "__main__":
    import utils

    with utils.one_line_warnings():  # "warning: <message>", as every command prints them
        sys.exit(main())
