"""Whole synthetic subjects: predict.py subject, generate_subjects, volume completion, the subject metrics."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from conftest import TINY_RUN_FLAGS, write_tree

SLICES = 6
PREVIOUS = ["--prior-condition-map", "2", "--prior-previous-slice", "--prior-previous-dropout", "0.3"]


@pytest.fixture(scope="module")
def subject_run(tmp_path_factory):
    """A tiny run (32x32 images, 8x8 codes, 6 slices per case) whose prior sees the previous slice."""
    import train

    root = tmp_path_factory.mktemp("subjects")
    data = write_tree(root / "oasis", slices=SLICES)
    assert train.main(["--data", data, "--out", root / "run", *TINY_RUN_FLAGS, *PREVIOUS]) == 0
    return root / "run"


def predict_main(*argv):
    import predict

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = predict.main([str(a) for a in argv])
        except SystemExit as e:  # argparse's errors: usage line + one line naming the flag
            code = e.code
    return code, [line for line in err.getvalue().strip().splitlines() if "%|" not in line]


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_subjects_are_nifti_volumes_an_oasis_folder_and_montages(subject_run, tmp_path):
    import nibabel as nib
    from PIL import Image

    import dataset

    out = tmp_path / "synth"
    assert predict_main("subject", "--run", subject_run, "--num", 2, "--out", out)[0] == 0
    split = dataset.read_split(out / "keras_png_slices_train")  # this project's own loader reads it
    assert len(split) == 2 * SLICES and sorted(set(split.case_ids)) == [9000, 9001]
    assert sorted(set(split.slice_indices)) == list(range(SLICES))
    for n in range(2):
        img = nib.load(out / f"subject_{n:03d}.nii.gz")
        assert img.shape == (32, 32, SLICES) and img.get_data_dtype() == np.uint8
        np.testing.assert_allclose(img.affine, np.diag([1.0, 1.0, 1.0, 1.0]))  # OASIS PNGs: 1 mm, stated
        assert img.header.get_xyzt_units()[0] == "mm"
        volume = np.asarray(img.dataobj)
        for k in range(SLICES):  # the volume holds exactly the slices of the folder
            png = np.asarray(Image.open(out / "keras_png_slices_train" / f"case_{9000 + n}_slice_{k}.nii.png"))
            np.testing.assert_array_equal(volume[:, :, k], png)
        assert (out / f"subject_{n:03d}_montage.png").exists()
    meta = json.loads((out / "subjects.json").read_text())
    assert meta["voxel_mm"] == [1.0, 1.0, 1.0] and "1 mm assumed" in meta["voxel_mm_source"]


def test_same_seed_same_files_and_subjects_differ(subject_run, tmp_path):
    import predict

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert predict_main("subject", "--run", subject_run, "--num", 2, "--seed", 3, "--out", a)[0] == 0
    assert predict_main("subject", "--run", subject_run, "--num", 2, "--seed", 3, "--out", b,
                        "--batch-size", 1)[0] == 0
    assert predict_main("subject", "--run", subject_run, "--num", 2, "--seed", 4, "--out", c)[0] == 0
    assert files_of(a) == files_of(b)
    assert files_of(a)["subject_000.nii.gz"] != files_of(c)["subject_000.nii.gz"]
    run = predict.load_run(subject_run)
    subjects = predict.generate_subjects(run, 3, seed=3, progress=False)
    assert subjects.codes.shape == (3, SLICES, 8, 8) and subjects.images.shape == (3, SLICES, 32, 32, 1)
    assert not np.array_equal(subjects.codes[0], subjects.codes[1])  # subjects differ from each other
    np.testing.assert_array_equal(predict.generate_subjects(run, 2, seed=3, progress=False).codes,
                                  subjects.codes[:2])  # subject n does not depend on --num


def test_each_slice_is_drawn_given_its_position_and_the_slice_before(subject_run, monkeypatch):
    import predict
    import sampler

    calls = []
    real = sampler.sample_codes

    def spy(prior, num, **kw):
        calls.append((kw["condition"], None if kw["previous"] is None else kw["previous"].copy()))
        return real(prior, num, **kw)

    monkeypatch.setattr(predict, "sample_codes", spy)
    subjects = predict.generate_subjects(predict.load_run(subject_run), 2, seed=0, progress=False)
    assert [c for c, _ in calls] == list(range(SLICES))
    assert calls[0][1] is None  # slice 0: the learned "no previous slice"
    for k in range(1, SLICES):
        np.testing.assert_array_equal(calls[k][1], subjects.codes[:, k - 1])


def test_completion_never_changes_the_kept_slices(subject_run, tmp_path):
    from PIL import Image

    write_tree(tmp_path / "real", slices=SLICES, cases={"test": [7, 8]})
    images = tmp_path / "real" / "keras_png_slices_test"
    out = tmp_path / "completed"
    assert predict_main("subject", "--run", subject_run, "--num", 2, "--keep", 3, "--images", images,
                        "--case", 8, "--out", out)[0] == 0
    folder = out / "keras_png_slices_train"
    for n in (9000, 9001):
        for k in range(SLICES):
            made = np.asarray(Image.open(folder / f"case_{n}_slice_{k}.nii.png"))
            real = np.asarray(Image.open(images / f"case_008_slice_{k}.nii.png"))
            assert np.array_equal(made, real) == (k < 3)  # kept exactly; the rest drawn
    meta = json.loads((out / "subjects.json").read_text())
    assert meta["kept_slices"] == 3 and meta["kept_case"] == 8


@pytest.fixture(scope="module")
def plain_run(subject_run, tmp_path_factory):
    """The same VQ-VAE with a prior that does not see the previous slice."""
    import shutil

    import train

    out = tmp_path_factory.mktemp("plain") / "run"
    shutil.copytree(subject_run, out)
    assert train.main(["--out", out, "--stage", "prior", "--no-prior-previous-slice", "--prior-previous-dropout", "0",
                       "--prior-epochs", "1", "--num-samples", "0", "--judge-epochs", "0"]) == 0
    return out


@pytest.mark.parametrize("case", ["plain prior", "num 0", "keep alone", "keep all", "no such case", "missing slices"])
def test_subject_errors_are_one_line(case, subject_run, plain_run, tmp_path):
    write_tree(tmp_path / "real", slices=SLICES, cases={"test": [7]})
    images = tmp_path / "real" / "keras_png_slices_test"
    (images / "case_007_slice_1.nii.png").unlink() if case == "missing slices" else None
    argv, expect = {
        "plain prior": (["--run", plain_run], "--prior-previous-slice"),
        "num 0": (["--run", subject_run, "--num", 0], "--num must be at least 1"),
        "keep alone": (["--run", subject_run, "--keep", 2], "--keep and --images go together"),
        "keep all": (["--run", subject_run, "--keep", SLICES, "--images", images], f"keep 1 to {SLICES - 1}"),
        "no such case": (["--run", subject_run, "--keep", 2, "--images", images, "--case", 3], "--case 3"),
        "missing slices": (["--run", subject_run, "--keep", 3, "--images", images], "does not hold slices 0 to 2"),
    }[case]
    code, lines = predict_main("subject", *argv, "--out", tmp_path / "o")
    assert code == 2 and (len(lines) == 1 or (len(lines) == 2 and lines[0].startswith("usage:"))), lines
    assert expect in lines[-1]


def test_generate_subjects_refuses_bad_arguments(subject_run, plain_run):
    import predict

    with pytest.raises(predict.PredictError, match="--num must be at least 1"):
        predict.generate_subjects(predict.load_run(subject_run), 0)
    with pytest.raises(predict.PredictError, match="does not see the previous slice"):
        predict.generate_subjects(predict.load_run(plain_run), 1)


def test_the_demo_states_its_own_voxel_size(tmp_path):
    import build_data

    (tmp_path / "demo.json").write_text(json.dumps({"image_size": 256, "slab_mni_z_mm": [2.0, 27.0],
                                                    "slices_per_case": 32}))
    rows, cols, step = build_data.demo_voxel_mm(tmp_path, 128)
    pixel_256 = build_data._pixel_mm(build_data.demo_template(), 256)
    assert rows == cols == pytest.approx(2 * pixel_256) and step == pytest.approx(25 / 31)
    assert build_data.demo_voxel_mm(tmp_path / "nothing", 128) is None


# ----------------------------------------------------------------------------------- the metrics
def test_adjacent_slice_ssim_pairs_each_slice_with_the_next():
    import evaluation

    rng = np.random.default_rng(0)
    slabs = rng.random((2, 4, 24, 24, 1)).astype("float32")
    got = evaluation.adjacent_slice_ssim(slabs)
    assert got.shape == (2, 3)
    for n in range(2):
        for k in range(3):
            assert got[n, k] == pytest.approx(evaluation.ssim(slabs[n, k:k + 1], slabs[n, k + 1:k + 2])[0], abs=1e-6)
    still = np.repeat(slabs[:, :1], 4, axis=1)  # a slab that copies its first slice
    np.testing.assert_allclose(evaluation.adjacent_slice_ssim(still), 1.0, atol=1e-6)


def test_spearman_and_between_subject_diversity():
    import evaluation

    assert evaluation.spearman([0, 1, 2, 3], [1, 5, 7, 30]) == pytest.approx(1.0)
    assert evaluation.spearman([0, 1, 2, 3], [3, 2, 1, 0]) == pytest.approx(-1.0)
    rng = np.random.default_rng(1)
    slab = rng.random((1, 3, 48, 48, 1)).astype("float32")
    assert evaluation.between_subject_ms_ssim(np.concatenate([slab, slab])) == pytest.approx(1.0, abs=1e-5)
    other = rng.random((1, 3, 48, 48, 1)).astype("float32")
    assert evaluation.between_subject_ms_ssim(np.concatenate([slab, other])) < 0.5


def test_evaluate_subjects_reports_every_metric(subject_run, tmp_path):
    code, _ = predict_main("evaluate", "--run", subject_run, "--subjects", 2, "--two-sample-num", 0,
                           "--out", tmp_path / "ev")
    assert code == 0
    metrics = json.loads((tmp_path / "ev" / "subject_metrics.json").read_text())
    for key in ("adjacent_ssim_generated", "adjacent_ssim_real", "adjacent_ssim_independent", "adjacent_ssim_ratio",
                "judge_spearman_generated", "judge_spearman_real", "realism_fraction_above_0.6",
                "between_subject_ms_ssim_generated"):
        assert key in metrics, key
    assert metrics["slices_per_subject"] == SLICES and metrics["num_real_subjects"] == 1
    assert metrics["adjacent_ssim_ratio"] == pytest.approx(
        metrics["adjacent_ssim_generated"] / metrics["adjacent_ssim_real"])
    assert (tmp_path / "ev" / "subjects_vs_real.png").exists()


def test_nifti_affine_states_the_voxel_size(tmp_path):
    import nibabel as nib

    import predict

    volume = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    predict._write_nifti(volume, (2.0, 2.0, 0.8), tmp_path / "v.nii.gz", "note")
    img = nib.load(tmp_path / "v.nii.gz")
    np.testing.assert_allclose(img.affine, np.diag([2.0, 2.0, 0.8, 1.0]))
    np.testing.assert_allclose(img.header.get_zooms(), (2.0, 2.0, 0.8))
    np.testing.assert_array_equal(np.asarray(img.dataobj), volume)


def test_training_pairs_are_consecutive_slices_of_one_case():
    from types import SimpleNamespace

    import dataset
    from modules import PriorConfig

    # shuffled order, case 2 lacks slice 1, one file without a parsed name
    split = SimpleNamespace(case_ids=np.array([1, 2, 1, 2, 1, -1]), slice_indices=np.array([2, 0, 0, 2, 1, -1]))
    index = dataset.previous_slice_index(split)
    np.testing.assert_array_equal(index, [4, -1, -1, -1, 2, -1])
    codes = {"codes": np.arange(6 * 4, dtype=np.int32).reshape(6, 2, 2) % 5,
             "slices": np.maximum(split.slice_indices, 0), "previous": index}
    cfg = PriorConfig(condition_map=2, grid_shape=(2, 2), previous_slice=True, num_conditions=3)
    (current, slices, previous), target = next(iter(dataset.prior_dataset(codes, True, cfg, 5, 6)))
    np.testing.assert_array_equal(current, codes["codes"])
    np.testing.assert_array_equal(target, codes["codes"])
    np.testing.assert_array_equal(slices, codes["slices"])
    for n, k in enumerate(index):
        np.testing.assert_array_equal(previous[n], codes["codes"][k] if k >= 0 else np.full((2, 2), 5))


def test_demo_preset_trains_the_previous_slice_and_drops_it_with_its_condition_map(tmp_path, capsys):
    import train

    parser = train.build_parser()
    cfg, _ = train.resolve_config(parser.parse_args(["--out", str(tmp_path / "a")]), parser)
    assert cfg["prior"]["previous_slice"] is True and cfg["prior"]["previous_dropout"] == 0.5
    cfg, _ = train.resolve_config(parser.parse_args(["--out", str(tmp_path / "b"), "--prior-condition-map", "0"]),
                                  parser)
    assert cfg["prior"]["previous_slice"] is False and cfg["prior"]["previous_dropout"] == 0.0
    assert "previous_slice -> off" in capsys.readouterr().out
    args = parser.parse_args(["--out", str(tmp_path / "c"), "--prior-condition-map", "0", "--prior-previous-slice"])
    with pytest.raises(train.TrainError, match="previous_slice needs condition_map"):  # asked for: an error
        train.resolve_config(args, parser)
