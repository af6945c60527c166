"""Tissue masks, the segmenter and the anatomy judge (issue 24), on small phantom trees with masks."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset
from dataset import SEG_LEVELS, DatasetError

LEVELS = np.array([0.0, 0.15, 0.45, 0.75])  # background, CSF, grey, white: a T1-like order


def phantom(size: int, case: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A head-like slice ``uint8 (size, size)`` and its tissue labels: outer CSF ring, grey ribbon,
    white matter with a few grey islands, two mirror-symmetric ventricles; the head grows with ``k``
    and varies by case."""
    rng = np.random.default_rng(100 * case + k)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    scale = 0.5 + 0.07 * k + 0.03 * (case % 3)
    r = np.sqrt((yy / (0.8 * scale)) ** 2 + (xx / scale) ** 2)
    labels = np.select([r < 0.7, r < 0.88, r < 1.0], [3, 2, 1], 0).astype(np.uint8)
    for side in (-1, 1):  # ventricles, mirrored across the middle row
        v = ((yy - side * 0.16 * scale) / (0.1 * scale)) ** 2 + (xx / (0.3 * scale)) ** 2 < 1
        labels[v] = 1
    for _ in range(6):  # grey islands in the white matter at random places: the segmenter must read intensity
        cy, cx = rng.uniform(-0.45, 0.45, 2) * scale
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < (rng.uniform(0.06, 0.14) * scale) ** 2) & (labels == 3)
        labels[blob] = 2
    image = LEVELS[labels] + rng.normal(0, 0.03, labels.shape) * (labels > 0)
    image = np.where(labels > 0, np.clip(image, 0.05, 1), 0.0)
    return (image * 255).round().astype(np.uint8), labels


def write_seg_tree(root: Path, size: int = 64, cases=None, slices: int = 6) -> Path:
    cases = cases or {"train": list(range(1, 9)), "validate": [9, 10], "test": [11, 12]}
    for split, ids in cases.items():
        img_dir, seg_dir = root / dataset.SPLIT_DIRS[split], root / dataset.SEG_DIRS[split]
        img_dir.mkdir(parents=True, exist_ok=True)
        seg_dir.mkdir(parents=True, exist_ok=True)
        for case in ids:
            for k in range(slices):
                image, labels = phantom(size, case, k)
                Image.fromarray(image, mode="L").save(img_dir / dataset.slice_file_name(case, k))
                Image.fromarray(dataset.labels_to_mask(labels), mode="L").save(seg_dir / dataset.seg_file_name(case, k))
    return root


@pytest.fixture
def seg_tree(tmp_path) -> Path:
    return write_seg_tree(tmp_path / "oasis", size=32, cases={"train": [1, 2], "validate": [3], "test": [4]}, slices=4)


# ----------------------------------------------------------------------------------------------
# Masks in the loader
# ----------------------------------------------------------------------------------------------


def test_masks_are_matched_to_images_by_case_and_slice_not_by_sorted_order(seg_tree):
    # slice_10 sorts before slice_2 by plain name but after it by number: only matching by key is right
    write_seg_tree(seg_tree, size=32, cases={"train": [1, 2]}, slices=12)
    splits = dataset.read_oasis(seg_tree, masks=True)
    for split in splits.values():
        assert split.masks is not None and split.masks.shape == split.images.shape[:3]
        for i, (c, k) in enumerate(zip(split.case_ids, split.slice_indices)):
            np.testing.assert_array_equal(split.masks[i], phantom(32, int(c), int(k))[1])
    resized = dataset.read_oasis(seg_tree, image_size=16, masks=True)["test"]
    assert resized.masks.shape == (len(resized), 16, 16) and set(np.unique(resized.masks)) <= {0, 1, 2, 3}
    assert dataset.read_oasis(seg_tree)["train"].masks is None  # masks only when asked
    # a validation split carved out of train takes the masks of its own images
    import shutil

    shutil.rmtree(seg_tree / dataset.SPLIT_DIRS["validate"])
    shutil.rmtree(seg_tree / dataset.SEG_DIRS["validate"])
    val = dataset.read_oasis(seg_tree, masks=True, val_fraction=0.5)["validate"]
    for i, (c, k) in enumerate(zip(val.case_ids, val.slice_indices)):
        np.testing.assert_array_equal(val.masks[i], phantom(32, int(c), int(k))[1])


def test_a_shuffled_mask_tree_fails_with_a_one_line_error_naming_the_mask(seg_tree):
    seg = seg_tree / dataset.SEG_DIRS["train"]
    paths = sorted(seg.glob("*.png"))
    contents = [p.read_bytes() for p in paths]
    for p, data in zip(paths, contents[::-1]):  # every mask now holds another slice's (reversed order)
        p.write_bytes(data)
    with pytest.raises(DatasetError, match=r"seg_\d+_slice_\d+\.nii\.png: .*misaligned") as e:
        dataset.read_oasis(seg_tree, masks=True)
    assert "\n" not in str(e.value)


def test_renamed_masks_fail_as_missing_and_extra(seg_tree):
    seg = seg_tree / dataset.SEG_DIRS["test"]
    for p in seg.glob("seg_004_*"):  # renumbered as another case: sorted order still pairs them up
        p.rename(seg / p.name.replace("seg_004_", "seg_104_"))
    with pytest.raises(DatasetError, match=r"case_004_slice_0\.nii\.png: no mask .*seg_004_slice_0\.nii\.png"):
        dataset.read_oasis(seg_tree, masks=True)


def test_missing_extra_and_bad_masks_each_give_a_one_line_error(seg_tree):
    seg = seg_tree / dataset.SEG_DIRS["validate"]
    (seg / "seg_003_slice_2.nii.png").rename(seg_tree / "kept.png")
    with pytest.raises(DatasetError, match=r"case_003_slice_2\.nii\.png: no mask"):
        dataset.read_oasis(seg_tree, masks=True)
    (seg_tree / "kept.png").rename(seg / "seg_003_slice_2.nii.png")
    extra = seg / "seg_003_slice_9.nii.png"
    extra.write_bytes((seg / "seg_003_slice_2.nii.png").read_bytes())
    with pytest.raises(DatasetError, match=r"seg_003_slice_9\.nii\.png: a mask without an image"):
        dataset.read_oasis(seg_tree, masks=True)
    extra.unlink()
    bad = seg / "seg_003_slice_1.nii.png"
    mask = np.asarray(Image.open(bad)).copy()
    mask[mask == 170] = 128  # a smoothed or rescaled mask
    Image.fromarray(mask, mode="L").save(bad)
    with pytest.raises(DatasetError, match=r"seg_003_slice_1\.nii\.png: grey level\(s\) \[128\] outside"):
        dataset.read_oasis(seg_tree, masks=True)
    Image.fromarray(mask[:16], mode="L").save(bad)  # another size than its image
    with pytest.raises(DatasetError, match=r"seg_003_slice_1\.nii\.png: mask is 32x16 .* misaligned"):
        dataset.read_oasis(seg_tree, masks=True)


def test_dataset_check_reports_masks_and_their_errors(seg_tree, capsys):
    assert dataset.main(["check", str(seg_tree)]) == 0
    out = capsys.readouterr().out
    assert out.count("masks aligned") == 3 and "white" in out
    (seg_tree / dataset.SEG_DIRS["test"] / "seg_004_slice_0.nii.png").unlink()
    assert dataset.main(["check", str(seg_tree)]) == 2
    err = capsys.readouterr().err
    assert "case_004_slice_0.nii.png: no mask" in err and err.count("\n") == 1


def test_the_demo_builder_writes_aligned_masks_in_oasis_levels(tmp_path):
    import build_data

    root = build_data.make_demo_dataset(tmp_path / "demo", n_train=1, n_validate=1, n_test=1, slices_per_case=3,
                                        image_size=64, progress=False, workers=1)
    for name in ("train", "validate", "test"):
        images = sorted(p.name for p in (root / dataset.SPLIT_DIRS[name]).glob("*.png"))
        masks = sorted(p.name for p in (root / dataset.SEG_DIRS[name]).glob("*.png"))
        assert masks == [n.replace("case_", "seg_") for n in images]
    splits = dataset.read_oasis(root, masks=True)
    for split in splits.values():
        for image, labels in zip(split.images[..., 0], split.masks):
            assert (image[labels > 0] > 0).all()  # every tissue pixel lies on the head
            means = [image[labels == k].mean() for k in (1, 2, 3)]
            assert means[0] < means[1] < means[2]  # T1: CSF darker than grey, grey darker than white
    raw = np.asarray(Image.open(next((root / dataset.SEG_DIRS["test"]).glob("*.png"))))
    assert set(np.unique(raw)) <= set(SEG_LEVELS) and len(np.unique(raw)) == 4
    assert build_data.demo_is_complete(root, n_train=1, n_validate=1, n_test=1, slices_per_case=3, image_size=64)
    next((root / dataset.SEG_DIRS["train"]).glob("*.png")).unlink()  # a mask gone: the tree is rebuilt
    assert not build_data.demo_is_complete(root, n_train=1, n_validate=1, n_test=1, slices_per_case=3, image_size=64)


# ----------------------------------------------------------------------------------------------
# The segmenter
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A segmenter trained on a 64x64 phantom tree (8 train cases x 6 slices), and the tree's splits."""
    from segmenter import SegmenterConfig, train_segmenter

    root = write_seg_tree(tmp_path_factory.mktemp("seg") / "oasis")
    splits = dataset.read_oasis(root, masks=True)
    config = SegmenterConfig(image_size=64, filters=8, depth=2, crop=1.0, epochs=12, batch_size=8, learning_rate=5e-3)
    return train_segmenter(splits["train"], splits["validate"], config), splits


def test_the_segmenter_trains_only_on_real_splits_with_masks(trained):
    from segmenter import SegmenterConfig, train_segmenter

    _, splits = trained
    config = SegmenterConfig(image_size=64, depth=2, epochs=1)
    with pytest.raises(TypeError, match="only on real slices"):
        train_segmenter(splits["train"].float(), None, config)
    with pytest.raises(ValueError, match="masks"):
        train_segmenter(dataset.Split(splits["train"].images, splits["train"].names, splits["train"].case_ids,
                                      splits["train"].slice_indices), None, config)


def test_the_segmenter_learns_the_phantom_and_round_trips_through_keras(trained, tmp_path):
    import keras

    import segmenter  # noqa: F401  (registers its loss)
    from anatomy import tissue_dice
    from segmenter import segment, segmenter_outputs

    model, splits = trained
    dice = tissue_dice(segment(model, splits["test"].images), splits["test"].masks)
    assert min(dice.values()) > 0.9, dice
    model.save(tmp_path / "segmenter.keras")
    again = keras.models.load_model(tmp_path / "segmenter.keras")
    a, fa = segmenter_outputs(model, splits["test"].images[:4])
    b, fb = segmenter_outputs(again, splits["test"].images[:4])
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(fa, fb, atol=1e-6)
    assert fa.shape == (4, 8 * 4)  # the bottleneck's channels: filters * 2 ** depth


def test_tissue_dice_is_exact_and_refuses_empty_sets():
    from anatomy import tissue_dice

    true = np.array([[[0, 1, 2, 3]]])
    pred = np.array([[[0, 1, 2, 2]]])
    assert tissue_dice(pred, true) == {"csf": 1.0, "grey": 2 * 1 / 3, "white": 0.0}
    with pytest.raises(ValueError):
        tissue_dice(np.zeros((0, 4, 4)), np.zeros((0, 4, 4)))


# ----------------------------------------------------------------------------------------------
# The anatomy judge
# ----------------------------------------------------------------------------------------------


def mottle(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Darken 3x3 blocks of the white matter, 5 px apart (70 % of them), to the grey matter's level."""
    rng = np.random.default_rng(seed)
    out = images.copy()
    n, h, w = labels.shape
    for i in range(n):
        for r in range(0, h, 5):
            for c in range(0, w, 5):
                if (labels[i, r:r + 3, c:c + 3] == 3).all() and rng.random() < 0.7:
                    out[i, r:r + 3, c:c + 3, 0] = np.uint8(LEVELS[2] * 255)
    return out


def _scores(model, splits, samples):
    from evaluation import anatomy_scores

    val, test = splits["validate"], splits["test"]
    return anatomy_scores(model, {"samples": (samples, splits["train"].slice_indices),
                                  "real_validate": (val.images, val.slice_indices)},
                          test.images, test.slice_indices, test_masks=test.masks)[0]


def test_the_judge_on_real_slices_sits_at_the_floor_and_mottling_moves_it_away(trained):
    model, splits = trained
    real = _scores(model, splits, splits["train"].images)
    assert real["anatomy_segmenter_test_dice_grey"] > 0.9
    floor = {k[:-len("_real_validate")]: v for k, v in real.items() if k.endswith("_real_validate")}
    assert real["anatomy_area_difference_samples"] < max(0.1, 2 * floor["anatomy_area_difference"])
    assert real["anatomy_components_samples"] == pytest.approx(floor["anatomy_components"], rel=0.25)
    assert real["anatomy_confidence_samples"] == pytest.approx(floor["anatomy_confidence"], abs=0.03)
    assert real["anatomy_ventricle_symmetry_samples"] > 0.8 and floor["anatomy_ventricle_symmetry"] > 0.8
    assert real["anatomy_ventricle_area_samples"] == pytest.approx(floor["anatomy_ventricle_area"], rel=0.3)
    assert real["anatomy_frechet_samples_vs_test"] < 3 * max(real["anatomy_frechet_real_validate_vs_test"], 1e-3)

    mottled = mottle(splits["train"].images, splits["train"].masks)
    bad = _scores(model, splits, mottled)
    assert bad["anatomy_components_samples"] > 1.4 * floor["anatomy_components"]
    assert bad["anatomy_components_grey_samples"] > 1.7 * floor["anatomy_components_grey"]
    assert bad["anatomy_area_difference_samples"] > 2 * floor["anatomy_area_difference"]
    assert bad["anatomy_area_difference_white_samples"] > 1.5 * floor["anatomy_area_difference_white"]
    assert bad["anatomy_confidence_samples"] < real["anatomy_confidence_samples"] - 0.01
    # the phantom's features are few and simple: the distance moves away from the real slices' value,
    # though with 12 validate slices its floor is too noisy to be passed here
    assert bad["anatomy_frechet_samples_vs_test"] > 2 * real["anatomy_frechet_samples_vs_test"]


def test_the_judge_warns_about_an_untrained_segmenter_and_refuses_empty_sets(trained):
    from evaluation import anatomy_scores, subject_anatomy
    from segmenter import SegmenterConfig, build_segmenter

    _, splits = trained
    untrained = build_segmenter(SegmenterConfig(image_size=64, depth=2))
    with pytest.warns(UserWarning, match="Dice on the real test split"):
        _scores(untrained, splits, splits["train"].images)
    with pytest.raises(ValueError, match="at least two"):
        anatomy_scores(untrained, {"samples": (splits["train"].images[:1], None)}, splits["test"].images, None)
    with pytest.raises(ValueError):
        subject_anatomy(untrained, splits["train"].images[None, :6], splits["test"].images[None, :6])


def test_subject_volumes_of_real_subjects_score_like_real_ones(trained):
    from anatomy import subject_anatomy

    model, splits = trained
    train = splits["train"]
    slabs = np.stack([train.subset(idx).images for idx in dataset.subjects(train).values()])
    out = subject_anatomy(model, slabs[:4], slabs[4:])
    assert out["anatomy_volume_z_generated"] < 2.5
    shrunk = slabs[:4].copy()
    shrunk[:, :, :, :32] = 0  # half of each head gone
    assert subject_anatomy(model, shrunk, slabs[4:])["anatomy_volume_z_generated"] > 5


def test_evaluation_re_exports_the_anatomy_judge():
    import anatomy
    import evaluation

    for name in ("anatomy_readout", "anatomy_summary", "area_difference", "subject_anatomy", "tissue_dice",
                 "plot_anatomy"):
        assert getattr(evaluation, name) is getattr(anatomy, name)


# ----------------------------------------------------------------------------------------------
# train.py and predict.py
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """A tiny run on a 32x32 phantom tree with masks; its prior sees the previous slice (for subjects)."""
    import train
    from conftest import TINY_RUN_FLAGS

    root = tmp_path_factory.mktemp("seg_run")
    data = write_seg_tree(root / "oasis", size=32, cases={"train": [1, 2, 3, 4], "validate": [5], "test": [6]})
    assert train.main(["--data", data, "--out", root / "run", *TINY_RUN_FLAGS, "--segmenter-epochs", "1",
                       "--prior-condition-map", "2", "--prior-previous-slice"]) == 0
    return root / "run"


def _predict(*argv):
    import contextlib
    import io

    import predict

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = predict.main([str(a) for a in argv])
    return code, err.getvalue()


def test_train_fits_the_segmenter_on_a_tree_with_masks_and_reports_its_dice(seg_run):
    import json

    metrics = json.loads((seg_run / "metrics.json").read_text())
    for tissue in ("csf", "grey", "white"):
        assert 0 <= metrics[f"segmenter_test_dice_{tissue}"] <= 1
    assert (seg_run / "segmenter.keras").exists() and "segmenter" in json.loads((seg_run / "config.json").read_text())


def test_predict_segment_writes_masks_in_oasis_format(seg_run, tmp_path):
    code, err = _predict("segment", "--run", seg_run, "--images", seg_run.parent / "oasis" / dataset.SPLIT_DIRS["test"],
                         "--out", tmp_path / "masks")
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "masks").glob("*.png"))
    assert names == sorted(dataset.seg_file_name(6, k) for k in range(6))
    mask = np.asarray(Image.open(tmp_path / "masks" / names[0]))
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= set(SEG_LEVELS)


def test_evaluate_reports_the_anatomy_judge_beside_its_floor(seg_run, tmp_path):
    import json

    code, err = _predict("evaluate", "--run", seg_run, "--num", 4, "--two-sample-num", 0, "--out", tmp_path / "ev")
    assert code == 0, err
    m = json.loads((tmp_path / "ev" / "generation_metrics.json").read_text())
    for s in ("samples", "reconstructions", "real_validate"):
        for key in ("area_difference", "components", "ventricle_area", "confidence"):
            assert f"anatomy_{key}_{s}" in m  # NaN confidence where a barely trained model draws no head
        assert m[f"anatomy_frechet_{s}_vs_test"] >= 0
    assert all(np.isfinite(m[f"anatomy_{key}_real_validate"]) for key in ("area_difference", "confidence"))
    assert "anatomy_segmenter_test_dice_grey" in m and "anatomy_note" not in m
    assert (tmp_path / "ev" / "anatomy_samples_vs_real.png").exists()
    code, err = _predict("evaluate", "--run", seg_run, "--subjects", 2, "--two-sample-num", 0, "--out", tmp_path / "sub")
    assert code == 0, err
    m = json.loads((tmp_path / "sub" / "subject_metrics.json").read_text())
    assert np.isfinite(m["anatomy_components_subjects"]) and np.isfinite(m["anatomy_components_real_validate"])
    assert "1 real test subject" in m["anatomy_volume_note"]  # volumes need two; subject_anatomy is tested above
    assert (tmp_path / "sub" / "anatomy_subjects_vs_real.png").exists()


def test_without_a_segmenter_evaluate_says_so_and_stage_segmenter_makes_one(seg_run, tmp_path):
    import json
    import shutil

    import train

    run = tmp_path / "run"
    shutil.copytree(seg_run, run)
    (run / "segmenter.keras").unlink()
    code, err = _predict("evaluate", "--run", run, "--num", 2, "--two-sample-num", 0)
    assert code == 0 and "segmenter.keras not found" in err and "--stage segmenter" in err
    m = json.loads((run / "evaluation" / "generation_metrics.json").read_text())
    assert "--stage segmenter" in m["anatomy_note"] and not any(k.startswith("anatomy_c") for k in m)
    code, err = _predict("segment", "--run", run, "--images", seg_run.parent / "oasis" / dataset.SPLIT_DIRS["test"])
    assert code == 2 and "segmenter.keras not found" in err
    assert train.main(["--out", run, "--stage", "segmenter", "--segmenter-epochs", "1"]) == 0
    assert (run / "segmenter.keras").exists()


def _write_fseg_volumes(folder: Path, subjects=(1, 2, 3), with_seg=(1, 2, 3)) -> None:
    """OASIS-1-like volumes (a head of three tissue shells) and, for ``with_seg``, FAST ``*_fseg`` labels."""
    import nibabel as nib

    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (20, 24, 16)], indexing="ij")
    r = np.sqrt(x ** 2 / 0.8 + y ** 2 / 0.9 + z ** 2 / 0.9)
    labels = np.select([r < 0.5, r < 0.75, r < 0.9], [3, 2, 1], 0).astype(np.float32)
    for s in subjects:
        name = f"OAS1_{s:04d}_MR1_mpr_n4_anon_111_t88_masked_gfc"
        noisy = np.array([0, 200, 500, 800], np.float32)[labels.astype(int)]
        noisy += (labels > 0) * np.random.default_rng(s).normal(0, 20, labels.shape).astype(np.float32)
        for sub, data, suffix in (("PROCESSED", noisy, ""),
                                  ("FSL_SEG", labels, "_fseg")):
            if suffix and s not in with_seg:
                continue
            d = folder / f"OAS1_{s:04d}_MR1" / sub
            d.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, np.eye(4)), d / f"{name}{suffix}.nii.gz")


def test_prepare_writes_masks_from_fseg_segmentations_and_says_when_there_are_none(tmp_path, capsys):
    import build_data

    kw = dict(val_fraction=0.34, test_fraction=0.34, slices_per_case=4, image_size=32, progress=False)
    _write_fseg_volumes(tmp_path / "vols")
    summary = build_data.prepare_oasis_volumes(tmp_path / "vols", tmp_path / "out", **kw)
    assert len(summary["segmentations"]) == 3 and "wrote tissue masks" in capsys.readouterr().out
    splits = dataset.read_oasis(tmp_path / "out", masks=True)  # aligned by name, size and head
    for split in splits.values():
        for image, labels in zip(split.images[..., 0], split.masks):
            means = [image[labels == k].mean() for k in (1, 2, 3) if (labels == k).any()]
            assert means == sorted(means) and image[labels == 0].mean() < 10  # CSF < grey < white, as in T1
    _write_fseg_volumes(tmp_path / "partial", with_seg=(1,))
    with pytest.warns(dataset.DatasetWarning, match="only 1 of 3 volumes have a \\*_fseg"):
        build_data.prepare_oasis_volumes(tmp_path / "partial", tmp_path / "out2", **kw)
    assert "no tissue masks" in capsys.readouterr().out and not dataset.has_masks(tmp_path / "out2")
