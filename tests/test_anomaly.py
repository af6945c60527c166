"""anomaly.py and ``predict.py anomaly / complete``: NLL maps, healing, completion, detection metrics, errors."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil

import numpy as np
import pytest


@pytest.fixture(scope="module")
def run(tiny_run):
    import predict

    return predict.load_run(tiny_run)


@pytest.fixture(scope="module")
def test_slices(tiny_run, run):
    """The tiny run's test split: float images (4, 32, 32, 1), their slice positions (4,) and folder."""
    import dataset

    folder = tiny_run.parent / "oasis" / "keras_png_slices_test"
    x, info = dataset.load_images(folder, image_size=32, return_info=True)
    return x, info.slice_indices.astype(np.int32), folder


def predict_main(*argv):
    import predict

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = predict.main([str(a) for a in argv])
    return code, [line for line in err.getvalue().strip().splitlines() if line.startswith("predict.py")]


def log_softmax(logits):
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ------------------------------------------------------------------------------------ NLL map and healing
def test_nll_map_follows_the_grid_and_equals_the_cross_entropy(run, test_slices):
    import anomaly

    x, cond, _ = test_slices
    codes, nll = anomaly.nll_map(run.vqvae, run.prior, x, cond)
    assert codes.shape == nll.shape == (4, 8, 8) and nll.dtype == np.float32
    np.testing.assert_array_equal(codes, np.asarray(run.vqvae.encode(x)))
    logits = np.asarray(run.prior((codes, cond), training=False))
    direct = -np.take_along_axis(log_softmax(logits), codes[..., None], -1)[..., 0]
    np.testing.assert_allclose(nll, direct, rtol=1e-5, atol=1e-5)
    # The slice position matters to a conditioned prior.
    _, other = anomaly.nll_map(run.vqvae, run.prior, x, (cond + 1) % run.num_conditions)
    assert not np.allclose(other, nll)


def test_healing_never_changes_codes_below_the_threshold(run, test_slices):
    import anomaly

    x, cond, _ = test_slices
    _, nll = anomaly.nll_map(run.vqvae, run.prior, x, cond)
    threshold = float(np.median(nll))
    h = anomaly.heal(run.vqvae, run.prior, x, threshold, condition=cond, seed=3, rounds=1)
    np.testing.assert_array_equal(h.resampled, nll > threshold)
    assert 0.3 < h.resampled.mean() < 0.7
    np.testing.assert_array_equal(h.healed_codes[~h.resampled], h.codes[~h.resampled])
    assert (h.healed_codes[h.resampled] != h.codes[h.resampled]).any()   # the others really are redrawn
    np.testing.assert_allclose(h.healed, np.asarray(run.vqvae.decode(h.healed_codes)), atol=1e-6)
    # The map is the smoothed residual inside the resampled codes' 4x4 blocks, exactly 0 outside them.
    region = np.kron(h.resampled, np.ones((4, 4), bool))
    assert h.anomaly_map.shape == (4, 32, 32) and (h.anomaly_map[~region] == 0).all()
    expected = anomaly.smooth(np.abs(x - h.healed)[..., 0], sigma=2.0) * region
    np.testing.assert_allclose(h.anomaly_map, expected, atol=1e-6)
    np.testing.assert_allclose(h.scores, h.anomaly_map.mean(axis=(1, 2)), rtol=1e-6)


def test_healing_above_every_nll_returns_the_input_codes(run, test_slices):
    import anomaly

    x, cond, _ = test_slices
    _, nll = anomaly.nll_map(run.vqvae, run.prior, x, cond)
    h = anomaly.heal(run.vqvae, run.prior, x, float(nll.max()) + 1e-3, condition=cond, seed=0)
    assert not h.resampled.any()
    np.testing.assert_array_equal(h.healed_codes, h.codes)
    assert (h.anomaly_map == 0).all() and (h.scores == 0).all()


def test_healing_rounds_only_grow_the_redrawn_set(run, test_slices):
    import anomaly
    import evaluation

    x, cond, _ = test_slices
    _, nll = anomaly.nll_map(run.vqvae, run.prior, x, cond)
    thr = float(np.percentile(nll, 70))
    one = anomaly.heal(run.vqvae, run.prior, x, thr, condition=cond, seed=1, rounds=1)
    three = anomaly.heal(run.vqvae, run.prior, x, thr, condition=cond, seed=1, rounds=3)
    assert (three.resampled >= one.resampled).all() and three.resampled.sum() >= one.resampled.sum()
    np.testing.assert_array_equal(three.healed_codes[~three.resampled], three.codes[~three.resampled])
    # A code joins in round 2 only if it is above the threshold given round 1's healed grid.
    two = anomaly.heal(run.vqvae, run.prior, x, thr, condition=cond, seed=1, rounds=2)
    rescored = evaluation.code_nll(run.prior, one.healed_codes, cond)
    np.testing.assert_array_equal(two.resampled, one.resampled | (rescored > thr))
    still = anomaly.heal(run.vqvae, run.prior, x, float(nll.max()) + 1e-3, condition=cond, rounds=3)
    np.testing.assert_array_equal(still.healed_codes, still.codes)


def test_same_seed_same_healing_whatever_the_batch(run, test_slices):
    import anomaly

    x, cond, _ = test_slices
    _, nll = anomaly.nll_map(run.vqvae, run.prior, x, cond)
    thr = float(np.percentile(nll, 60))
    a = anomaly.heal(run.vqvae, run.prior, x, thr, condition=cond, seed=5)
    b = anomaly.heal(run.vqvae, run.prior, x, thr, condition=cond, seed=5, batch_size=3)
    c = anomaly.heal(run.vqvae, run.prior, x, thr, condition=cond, seed=6)
    np.testing.assert_array_equal(a.healed_codes, b.healed_codes)
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    assert not np.array_equal(a.healed_codes, c.healed_codes)


def test_completion_keeps_the_first_rows_and_follows_the_seed(run, test_slices):
    import anomaly

    x, cond, _ = test_slices
    codes, out, images = anomaly.complete(run.vqvae, run.prior, x, 3, condition=cond, seeds=[0, 1, 0])
    assert out.shape == (3, 4, 8, 8) and images.shape == (3, 4, 32, 32, 1)
    for s in range(3):
        np.testing.assert_array_equal(out[s, :, :3], codes[:, :3])
    np.testing.assert_array_equal(out[0], out[2])              # same seed, same completion
    assert not np.array_equal(out[0, :, 3:], out[1, :, 3:])    # another seed draws other rows
    np.testing.assert_allclose(images[1], np.asarray(run.vqvae.decode(out[1])), atol=1e-6)
    for bad in (0, 8):
        with pytest.raises(ValueError, match="outside the code grid"):
            anomaly.complete(run.vqvae, run.prior, x, bad, condition=cond)


def test_run_threshold_is_a_percentile_of_validation_nll(tiny_run, tmp_path):
    import anomaly
    import dataset
    import evaluation
    import predict

    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    (copy / "codes.npz").unlink()            # force the path that reads the validation split
    r = predict.load_run(copy)
    thr = anomaly.run_threshold(r, 90.0)
    data = r.config["data"]
    val = dataset.read_oasis(data["root"], image_size=32, val_fraction=data["val_fraction"],
                             seed=r.config["seed"])["validate"]
    nll = evaluation.code_nll(r.prior, evaluation.encode_images(r.vqvae, val.images),
                              val.slice_indices.astype(np.int32))
    assert thr == pytest.approx(float(np.percentile(nll, 90.0)), rel=1e-6)
    saved = json.loads((copy / "anomaly_threshold.json").read_text())
    assert saved["threshold_nats"] == thr and saved["percentile"] == 90.0
    # The run's cached codes give the same figure; another percentile is recomputed, not read back.
    assert anomaly.run_threshold(predict.load_run(tiny_run), 90.0, cache=False) == pytest.approx(thr, rel=1e-6)
    assert anomaly.run_threshold(r, 50.0) < thr


# ------------------------------------------------------------------------------------ detection metrics
def brute_force(scores, labels):
    """AUROC by counting pairs; AUPRC and Dice by sweeping every distinct threshold."""
    pos, neg = scores[labels], scores[~labels]
    auroc = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    ap, prev_recall, dices = 0.0, 0.0, []
    for t in np.unique(scores)[::-1]:
        pred = scores >= t
        tp = (pred & labels).sum()
        recall, precision = tp / labels.sum(), tp / pred.sum()
        ap += (recall - prev_recall) * precision
        prev_recall = recall
        dices.append(2 * tp / (pred.sum() + labels.sum()))
    return auroc, ap, max(dices)


@pytest.mark.parametrize("seed", [0, 1])
def test_detection_metrics_match_a_direct_computation(seed):
    import anomaly

    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.2
    scores = np.round(rng.random(300) + labels * 0.4, 1)      # rounded: many ties
    auroc, ap, dice = brute_force(scores, labels)
    m = anomaly.detection_metrics(scores, labels)
    assert m["auroc"] == pytest.approx(auroc) and m["auprc"] == pytest.approx(ap)
    assert m["best_dice"] == pytest.approx(dice)
    pred = scores >= m["best_dice_threshold"]
    assert 2 * (pred & labels).sum() / (pred.sum() + labels.sum()) == pytest.approx(dice)
    perfect = anomaly.detection_metrics(labels.astype(float), labels)
    assert perfect["auroc"] == perfect["auprc"] == perfect["best_dice"] == 1.0
    with pytest.raises(ValueError, match="both positive and negative"):
        anomaly.roc_auc(scores, np.ones_like(labels))


# ------------------------------------------------------------------------------------ command line
def test_anomaly_command_writes_panels_maps_and_scores(tiny_run, test_slices, tmp_path):
    _, _, folder = test_slices
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert predict_main("anomaly", "--run", tiny_run, "--images", folder, "--out", out,
                            "--threshold", "1.5", "--seed", "2", "--rounds", "1", "--maps", "healed")[0] == 0
    names = sorted(p.name for p in folder.iterdir())
    stems = [n.removesuffix(".nii.png") for n in names]
    assert sorted(p.name for p in a.glob("*_anomaly.png")) == sorted(f"{s}_anomaly.png" for s in stems)
    nll, maps = np.load(a / "nll_maps.npy"), np.load(a / "anomaly_maps.npy")
    assert nll.shape == (4, 8, 8) and maps.shape == (4, 32, 32) and np.load(a / "healed.npy").shape == (4, 32, 32)
    for f in ("nll_maps.npy", "anomaly_maps.npy", "healed.npy"):   # same seed, same files
        assert (a / f).read_bytes() == (b / f).read_bytes()
    report = json.loads((a / "scores.json").read_text())
    assert report["threshold_nats"] == 1.5 and [r["file"] for r in report["slices"]] == names
    np.testing.assert_allclose([r["score"] for r in report["slices"]], maps.mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose([r["resampled_fraction"] for r in report["slices"]], (nll > 1.5).mean(axis=(1, 2)))
    with open(a / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == names and [int(r["slice"]) for r in rows] == [0, 1, 2, 3]


def test_anomaly_command_says_which_maps_it_made(tiny_run, test_slices, tmp_path, capsys):
    import predict

    _, _, folder = test_slices
    # the tiny test folder is one whole case (slices 0..3) and the prior sees the previous slice
    assert predict_main("anomaly", "--run", tiny_run, "--images", folder, "--out", tmp_path / "s", "--maps", "single",
                        "--threshold", "1.5", "--samples", "2", "--rounds", "1")[0] == 0
    said = capsys.readouterr().out
    assert "single-slice maps" in said and "--maps single" in said
    assert json.loads((tmp_path / "s" / "scores.json").read_text())["maps"] == "single"
    # the default (auto): volume-aware maps on whole cases, which score higher there
    assert predict_main("anomaly", "--run", tiny_run, "--images", folder, "--out", tmp_path / "a",
                        "--threshold", "1.5", "--samples", "2", "--rounds", "1")[0] == 0
    said = capsys.readouterr().out
    assert "volume-aware maps" in said and "1 whole case(s) of 4 slices" in said
    report = json.loads((tmp_path / "a" / "scores.json").read_text())
    assert report["maps"] == "volume" and report["samples"] == 2
    assert [r["file"] for r in report["slices"]] == sorted(p.name for p in folder.iterdir())
    maps, spread = np.load(tmp_path / "a" / "anomaly_maps.npy"), np.load(tmp_path / "a" / "spread_maps.npy")
    assert maps.shape == spread.shape == (4, 32, 32)
    # not whole cases: auto falls back to single slices, --maps volume is a one-line error
    part = tmp_path / "part"
    part.mkdir()
    for p in sorted(folder.iterdir())[1:]:
        shutil.copy(p, part / p.name)
    assert predict._anomaly_maps_choice(predict.load_run(tiny_run), [p.name for p in part.iterdir()], "auto")[0] == "single"
    code, errors = predict_main("anomaly", "--run", tiny_run, "--images", part, "--maps", "volume", "--out", tmp_path / "b")
    assert code == 2 and len(errors) == 1 and "--maps volume" in errors[0] and "whole cases" in errors[0]
    names = [f"case_00{c}_slice_{k}.nii.png" for c in (1, 2) for k in (1, 0, 2)]
    np.testing.assert_array_equal(predict.whole_cases(names), [[1, 0, 2], [4, 3, 5]])
    assert predict.whole_cases(names[:-1]) is None and predict.whole_cases(["a.png", "b.png"]) is None


def test_complete_command_writes_panels_and_codes(tiny_run, test_slices, tmp_path):
    import predict

    x, cond, folder = test_slices
    assert predict_main("complete", "--run", tiny_run, "--images", folder, "--out", tmp_path,
                        "--keep-rows", "5", "--seeds", "2")[0] == 0
    codes = np.load(tmp_path / "codes.npy")
    assert codes.shape == (2, 4, 8, 8) and len(list(tmp_path.glob("*_completion.png"))) == 4
    run = predict.load_run(tiny_run)
    kept = np.asarray(run.vqvae.encode(x))[:, :5]
    np.testing.assert_array_equal(codes[:, :, :5], np.broadcast_to(kept, (2, 4, 5, 8)))


@pytest.mark.parametrize("case", ["no_positions", "empty_folder", "keep_rows_zero", "keep_rows_past_grid",
                                  "position_unknown_to_prior"])
def test_errors_are_one_line(case, tiny_run, test_slices, tmp_path):
    _, _, folder = test_slices
    images = tmp_path / "images"
    images.mkdir()
    if case == "no_positions":
        for k, p in enumerate(sorted(folder.iterdir())):
            shutil.copy(p, images / f"scan{k}.png")
        argv, expect = ["anomaly", "--images", images, "--threshold", "1"], "no slice position in their name"
    elif case == "empty_folder":
        argv, expect = ["anomaly", "--images", images, "--threshold", "1"], "no .png images"
    elif case == "keep_rows_zero":
        argv, expect = ["complete", "--images", folder, "--keep-rows", "0"], "--keep-rows 0 is outside the code grid"
    elif case == "keep_rows_past_grid":
        argv, expect = ["complete", "--images", folder, "--keep-rows", "8"], "pass 1 to 7"
    else:
        shutil.copy(next(folder.iterdir()), images / "case_001_slice_9.nii.png")
        argv, expect = ["complete", "--images", images, "--keep-rows", "2"], "positions 0 to 3"
    code, lines = predict_main(*argv[:1], "--run", tiny_run, *argv[1:])
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("predict.py: error: ") and expect in lines[0], lines
    if case == "no_positions":   # the error says how to get past it, and --slice does
        assert "rename" in lines[0] and "--slice" in lines[0]
        assert predict_main("anomaly", "--run", tiny_run, "--images", images, "--threshold", "1", "--slice", "2",
                            "--out", tmp_path / "out")[0] == 0


# ------------------------------------------------------------------------------------ synthetic lesions
def test_synthetic_lesion_is_inside_the_head_soft_edged_and_seeded():
    import anomaly
    import evaluation
    from conftest import brain_like

    img = brain_like(64, case=1, slice_index=4).astype(np.float32) / 255.0
    a = anomaly.add_synthetic_lesion(img, np.random.default_rng(3), radius=0.08, bright=False)
    b = anomaly.add_synthetic_lesion(img, np.random.default_rng(3), radius=0.08, bright=False)
    assert a is not None and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    lesioned, mask = a
    assert lesioned.shape == img.shape and mask.dtype == bool and 10 < mask.sum() < 0.1 * img.size
    assert (mask <= evaluation.brain_interior_mask(img, margin=4)).all()      # well inside the head
    from scipy import ndimage

    changed = np.abs(lesioned - img) > 0.01      # the logistic edge: under 1 % beyond 4 px from the mask
    assert not (changed & ~ndimage.binary_dilation(mask, iterations=4)).any()
    assert lesioned[mask].mean() < 0.6 * img[mask].mean()                       # dark lesion
    bright = anomaly.add_synthetic_lesion(img, np.random.default_rng(3), radius=0.08, bright=True)
    assert bright[0][bright[1]].mean() > img[bright[1]].mean() + 0.15
    assert anomaly.add_synthetic_lesion(img, np.random.default_rng(0), radius=0.45, bright=True) is None


# ------------------------------------------------------------------------------------ lesion kinds (the bench's)
def tissue_phantom(size=64):
    """Tissue labels of a round head: white matter inside, a grey ring, CSF, background."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2) / (size / 2)
    labels = np.zeros((size, size), np.uint8)
    labels[r < 0.9], labels[r < 0.8], labels[r < 0.6] = 1, 2, 3
    image = np.choose(labels, [0.0, 0.15, 0.27, 0.45]).astype(np.float32)
    return image, labels


def test_lesion_kinds_cover_every_combination_and_follow_the_seed():
    import anomaly

    kinds = anomaly.lesion_kinds(48, seed=1)
    assert len(set(kinds)) == 48 and kinds == anomaly.lesion_kinds(48, seed=1) != anomaly.lesion_kinds(48, seed=2)
    for factor in ("polarity", "size", "edge", "contrast", "tissue"):
        values = [getattr(k, factor) for k in anomaly.lesion_kinds(96, seed=0)]
        assert len(set(values.count(v) for v in set(values))) == 1  # every level equally often


@pytest.mark.parametrize("tissue", ["white", "grey"])
def test_lesions_lie_in_their_tissue_with_their_polarity_size_and_edge(tissue):
    import anomaly

    image, labels = tissue_phantom(128)
    level = anomaly.LESION_TISSUES[tissue]
    areas = {}
    for size in ("small", "large"):
        for pol in ("bright", "dark"):
            kind = anomaly.LesionKind(pol, size, "sharp", "high", tissue)
            out, mask = anomaly.add_lesion(image, labels, kind, np.random.default_rng(0))
            assert out.shape == image.shape and mask.any() and labels[mask].max() > 0      # inside the head
            centre = np.round(np.argwhere(mask).mean(axis=0)).astype(int)
            assert labels[tuple(centre)] == level or np.isin(labels[mask], (level,)).mean() > 0.3
            change = (out - image)[mask].mean()
            assert change > 0.1 if pol == "bright" else change < -0.1
            assert np.abs(out[~np.isin(labels, (1, 2, 3))]).max() < 1e-6                  # background untouched
            areas[size] = mask.sum()
    assert areas["large"] > 5 * areas["small"]
    # a soft edge spreads the change beyond the mask; a sharp one hardly
    sharp, soft = (anomaly.add_lesion(image, labels, anomaly.LesionKind("bright", "large", e, "high", tissue),
                                      np.random.default_rng(0)) for e in ("sharp", "soft"))
    ring = lambda o: np.abs(o[0] - image)[~o[1]].sum()  # noqa: E731
    assert ring(soft) > 3 * ring(sharp)
    # no room: a slice without that tissue
    assert anomaly.add_lesion(image, np.minimum(labels, 1), anomaly.LesionKind("dark", "small", "sharp", "low", tissue),
                              np.random.default_rng(0)) is None


def test_volume_lesion_keeps_its_centre_and_shrinks_away_from_it():
    import anomaly

    image, labels = tissue_phantom(128)
    vol, tis = np.stack([image] * 9), np.stack([labels] * 9)
    out, masks = anomaly.add_lesion_volume(vol, tis, anomaly.LesionKind("dark", "large", "sharp", "high", "white"),
                                           np.random.default_rng(0), centre_slice=4, slice_spacing_px=3.0)
    areas = masks.sum(axis=(1, 2))
    assert areas[4] == areas.max() and areas[3] < areas[4] and areas[5] < areas[4] and areas[0] == areas[8] == 0
    centres = [np.argwhere(m).mean(axis=0) for m in masks if m.any()]
    assert np.ptp(np.array(centres), axis=0).max() < 2.0
    np.testing.assert_array_equal(out[~masks.any(axis=(1, 2))], vol[~masks.any(axis=(1, 2))])


# ------------------------------------------------------------------------------------ averaged healing, volume path
def test_averaged_healing_changes_nothing_outside_the_flagged_region(run, test_slices):
    import anomaly

    x, cond, _ = test_slices
    _, nll = anomaly.nll_map(run.vqvae, run.prior, x, cond)
    threshold = float(np.percentile(nll, 85))
    a = anomaly.heal_average(run.vqvae, run.prior, x, threshold, condition=cond, samples=3, dilate=1, rounds=2, seed=1)
    assert a.healed_codes.shape == (3, *a.codes.shape) and a.healed.shape == (3, *x.shape)
    assert (a.region >= anomaly.dilate_codes(nll > threshold, 1)).all()        # the flagged codes, grown
    for healed in a.healed_codes:
        np.testing.assert_array_equal(healed[~a.region], a.codes[~a.region])
    px = anomaly.upsample_codes(a.region, x.shape[1:3])
    assert (a.healed_map[~px] == 0).all() and (a.spread[~px] == 0).all() and a.healed_map[px].max() > 0
    assert a.anomaly_map.shape == x.shape[:3] and np.isfinite(a.anomaly_map).all()
    np.testing.assert_allclose(a.scores, anomaly.slice_scores(a.anomaly_map), rtol=1e-6)
    again = anomaly.heal_average(run.vqvae, run.prior, x, threshold, condition=cond, samples=3, dilate=1, rounds=2,
                                 seed=1)
    np.testing.assert_array_equal(again.healed_codes, a.healed_codes)
    nothing = anomaly.heal_average(run.vqvae, run.prior, x, np.inf, condition=cond, samples=2)
    assert not nothing.region.any() and (nothing.healed_map == 0).all()


def _volume_models():
    """An untrained 16 px VQ-VAE (4x4 codes) and a prior that sees the previous slice, seeded."""
    import keras

    from modules import VQVAE, VQVAEConfig, PixelCNN

    keras.utils.set_random_seed(0)
    vqvae = VQVAE(VQVAEConfig(image_size=16, channels=4, num_embeddings=6, embedding_dim=2, num_res_blocks=1,
                              downsample=4))
    prior = PixelCNN(6, filters=8, num_layers=2, num_conditions=3, grid_shape=(4, 4), condition_map=2,
                     previous_slice=True, previous_dropout=0.25)
    return vqvae, prior


def test_volume_path_heals_in_order_given_the_healed_slice_below(monkeypatch):
    import anomaly
    import sampler
    from modules import PixelCNN

    vqvae, prior = _volume_models()
    volumes = np.random.default_rng(0).uniform(0, 1, (2, 3, 16, 16, 1)).astype(np.float32)
    calls, real = [], sampler.sample_codes

    def recording(*a, **kw):
        out = real(*a, **kw)
        calls.append((None if kw.get("previous") is None else kw["previous"].copy(), out.copy()))
        return out

    monkeypatch.setattr(sampler, "sample_codes", recording)
    v = anomaly.heal_volume(vqvae, prior, volumes, threshold=-1.0, threshold_previous=-1.0, condition=[0, 1, 2],
                            samples=2, dilate=0, rounds=1, seed=0)
    assert len(calls) == 3 and calls[0][0] is None                             # slice 0: no slice below
    for k in (1, 2):
        # each healing of slice k is drawn given that same healing's slice k - 1
        np.testing.assert_array_equal(calls[k][0], calls[k - 1][1])
    healed = v.healed_codes.reshape(2, 2, 3, 4, 4)                             # (samples, cases, slices, h, w)
    np.testing.assert_array_equal(healed[:, :, 1].reshape(4, 4, 4), calls[1][1])
    assert v.region.all() and v.anomaly_map.shape == (6, 16, 16)
    with pytest.raises(ValueError, match="previous_slice"):
        anomaly.heal_volume(vqvae, PixelCNN(6, filters=8, num_layers=1, grid_shape=(4, 4)), volumes, 1.0, 1.0)


def test_averaged_healing_take_reorders_every_per_slice_field():
    import dataclasses

    import anomaly

    n, s = 3, 2
    fields = {f.name: f for f in dataclasses.fields(anomaly.AveragedHealing)}
    values = {}
    for name in fields:
        if name == "threshold":
            values[name] = 1.5
        elif name in anomaly.AveragedHealing._PER_HEALING:
            values[name] = np.arange(s * n * 4).reshape(s, n, 2, 2) + 1000 * len(values)
        else:
            values[name] = np.arange(n * 4).reshape(n, 2, 2) + 1000 * len(values)
    result = anomaly.AveragedHealing(**values)
    order = np.array([2, 0, 1])
    taken = result.take(order)
    for name, value in values.items():
        got = getattr(taken, name)
        if name == "threshold":
            assert got == 1.5
        elif name in anomaly.AveragedHealing._PER_HEALING:
            np.testing.assert_array_equal(got, value[:, order])
        else:
            np.testing.assert_array_equal(got, value[order])
    np.testing.assert_array_equal(taken.take(np.argsort(order)).anomaly_map, result.anomaly_map)


def test_volume_path_flag_single_scores_without_the_slice_below_and_previous_with_it(monkeypatch):
    import anomaly
    import evaluation

    vqvae, prior = _volume_models()
    volumes = np.random.default_rng(0).uniform(0, 1, (1, 3, 16, 16, 1)).astype(np.float32)
    scored, real = [], evaluation.code_nll

    def recording(prior_, codes, condition=None, *a, previous=None, **kw):
        scored.append(previous is not None)
        return real(prior_, codes, condition, *a, previous=previous, **kw)

    monkeypatch.setattr(evaluation, "code_nll", recording)
    single = anomaly.heal_volume(vqvae, prior, volumes, 2.0, condition=[0, 1, 2], samples=2, rounds=2, seed=0,
                                 flag="single", weight="flag")
    assert scored and not any(scored)                       # every flagging NLL given no slice below
    # weighting the map by the NLL given the real slice below does not change what is flagged
    weighted = anomaly.heal_volume(vqvae, prior, volumes, 2.0, condition=[0, 1, 2], samples=2, rounds=2, seed=0,
                                   flag="single")
    np.testing.assert_array_equal(weighted.region, single.region)
    np.testing.assert_array_equal(weighted.nll, single.nll)
    np.testing.assert_array_equal(weighted.healed_codes, single.healed_codes)
    scored.clear()
    prev = anomaly.heal_volume(vqvae, prior, volumes, 2.0, 1.5, condition=[0, 1, 2], samples=2, rounds=2, seed=0,
                               flag="previous")
    assert any(scored)                                      # slices 1 and 2 scored given the healed slice below
    assert single.threshold == 2.0 and prev.threshold == (2.0, 1.5)
    with pytest.raises(ValueError, match="threshold_previous"):
        anomaly.heal_volume(vqvae, prior, volumes, 2.0, flag="previous")
    with pytest.raises(ValueError, match="flag"):
        anomaly.heal_volume(vqvae, prior, volumes, 2.0, 1.5, flag="both")
    with pytest.raises(ValueError, match="weight must be one of 'max', 'flag'"):
        anomaly.heal_volume(vqvae, prior, volumes, 2.0, weight="mean")


def test_volume_map_nll_is_the_more_surprised_prior():
    import anomaly

    single = np.array([[[4.0, 1.0], [2.0, 0.5]]], np.float32)
    below = np.array([[[1.0, 3.0], [2.0, 0.25]]], np.float32)
    np.testing.assert_array_equal(anomaly.volume_map_nll(single, below), [[[4.0, 3.0], [2.0, 0.5]]])
    assert anomaly.volume_map_nll(single, below).dtype == np.float32


def test_volume_map_is_weighted_by_the_higher_nll_and_flagged_as_before():
    import anomaly
    import evaluation

    vqvae, prior = _volume_models()
    volumes = np.random.default_rng(2).uniform(0, 1, (2, 3, 16, 16, 1)).astype(np.float32)
    common = dict(condition=[0, 1, 2], samples=2, rounds=1, dilate=0, seed=0)
    by_flag = anomaly.heal_volume(vqvae, prior, volumes, 2.0, weight="flag", **common)
    by_max = anomaly.heal_volume(vqvae, prior, volumes, 2.0, **common)
    np.testing.assert_array_equal(by_max.region, by_flag.region)           # the same codes redrawn
    np.testing.assert_array_equal(by_max.healed_codes, by_flag.healed_codes)
    np.testing.assert_array_equal(by_flag.map_nll, by_flag.nll)
    codes = by_max.codes.reshape(2, 3, 4, 4)
    want = by_max.nll.reshape(2, 3, 4, 4).copy()                            # slice 0: as a single slice
    for k in (1, 2):
        cond = np.full((2,), k, np.int32)
        want[:, k] = anomaly.volume_map_nll(evaluation.code_nll(prior, codes[:, k], cond),
                                            evaluation.code_nll(prior, codes[:, k], cond, previous=codes[:, k - 1]))
    np.testing.assert_allclose(by_max.map_nll, want.reshape(6, 4, 4), rtol=1e-6)
    assert not np.allclose(by_max.map_nll, by_max.nll)                     # the weight is not the flag here
    # and the map is combine_maps of the same healings weighted by it
    x = volumes.reshape(6, 16, 16, 1)
    diff = anomaly.healing_differences(x, by_max.healed, (4, 4)).mean(axis=0)
    recon = evaluation.decode_codes(vqvae, by_max.codes)
    np.testing.assert_allclose(by_max.anomaly_map, anomaly.combine_maps(
        diff, by_max.map_nll, threshold=2.0, residual=by_max.residual, recon=recon), rtol=1e-5, atol=1e-6)


def test_propagated_nll_lets_the_slice_below_vouch_only_where_it_was_not_flagged():
    import anomaly

    single = np.full((1, 5, 5), 4.0, np.float32)
    below = np.full((1, 5, 5), 1.0, np.float32)
    flagged = np.zeros((1, 5, 5), bool)
    flagged[0, 0, 0] = True
    got = anomaly.propagated_nll(single, below, flagged)
    # within one code of a flagged code below: the single-slice NLL; elsewhere the lower of the two
    np.testing.assert_array_equal(got[0, :2, :2], 4.0)
    assert (got[0, 2:] == 1.0).all() and (got[0, :, 2:] == 1.0).all()
    np.testing.assert_array_equal(anomaly.propagated_nll(below, single, flagged), below)   # never above single
    np.testing.assert_array_equal(anomaly.propagated_nll(single, below, flagged, carry=0)[0, 0, :2], [4.0, 1.0])


def test_volume_path_propagated_flags_by_that_nll(monkeypatch):
    import anomaly

    vqvae, prior = _volume_models()
    volumes = np.random.default_rng(1).uniform(0, 1, (2, 3, 16, 16, 1)).astype(np.float32)
    seen, real = [], anomaly.propagated_nll

    def recording(single, given_below, flagged_below, *a, **kw):
        out = real(single, given_below, flagged_below, *a, **kw)
        seen.append(out)
        return out

    monkeypatch.setattr(anomaly, "propagated_nll", recording)
    v = anomaly.heal_volume(vqvae, prior, volumes, 2.0, condition=[0, 1, 2], samples=2, rounds=1, dilate=0, seed=0,
                            flag="propagated")
    assert len(seen) == 2                                    # slices 1 and 2 (slice 0 has none below)
    nll = v.nll.reshape(2, 3, 4, 4)
    for k in (1, 2):
        np.testing.assert_array_equal(nll[:, k], seen[k - 1])           # the maps' NLL is the flagging NLL
        np.testing.assert_array_equal(v.region.reshape(2, 3, 4, 4)[:, k], seen[k - 1] > 2.0)
    assert v.threshold == 2.0


def test_chosen_map_adds_the_residual_and_divides_by_the_reconstructions_edges():
    import anomaly

    n, size, grid = 1, 32, 8
    difference = np.zeros((n, size, size), np.float32)
    nll = np.zeros((n, grid, grid), np.float32)
    residual = np.zeros((n, size, size), np.float32)
    residual[0, 8, 8] = residual[0, 8, 24] = 0.1            # the same residual twice
    recon = np.zeros((n, size, size), np.float32)
    recon[0, :, 24:] = 1.0                                  # an edge through the second
    m = anomaly.combine_maps(difference, nll, threshold=3.0, residual=residual, recon=recon)
    assert m[0, 8, 8] > 3 * m[0, 8, 24] > 0                 # damped on the edge
    flat = anomaly.RESIDUAL_WEIGHT * 0.1 / anomaly.EDGE_FLOOR
    assert m[0, 8, 8] == pytest.approx(flat, rel=0.01)      # flat tissue: residual weight x residual / floor
    # the NLL weight is in units of the threshold: doubling both the NLL and the threshold changes nothing
    rng = np.random.default_rng(0)
    difference, nll = rng.uniform(0, 1, (2, size, size)).astype(np.float32), rng.uniform(0, 6, (2, grid, grid))
    recon = rng.uniform(0, 1, (2, size, size)).astype(np.float32)
    residual = rng.uniform(0, 0.1, (2, size, size)).astype(np.float32)
    a = anomaly.combine_maps(difference, nll, threshold=3.0, residual=residual, recon=recon)
    b = anomaly.combine_maps(difference, 2 * nll, threshold=6.0, residual=residual, recon=recon)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    # without the residual and the reconstruction: the healed difference times the squared NLL
    w = anomaly.smooth(anomaly.upsample_codes(nll, (size, size)), size / grid)
    np.testing.assert_allclose(anomaly.combine_maps(difference, nll), difference * w ** 2, rtol=1e-5)
    with pytest.raises(ValueError, match="together"):
        anomaly.combine_maps(difference, nll, residual=residual)


def test_bootstrap_detection_equals_the_metrics_on_the_drawn_groups_and_pairs_maps():
    import anomaly

    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(6), 20)
    labels = rng.uniform(size=120) < 0.3
    labels[::20] = True                                         # every group holds a positive
    scores = np.round(labels + rng.normal(0, 0.8, 120), 1)      # rounded: ties across groups
    draws = anomaly.bootstrap_detection(scores, labels, groups, num=5, seed=7)
    picked = np.random.default_rng(7).integers(0, 6, (5, 6))    # the draws the docstring describes
    for b in range(5):
        idx = np.concatenate([np.flatnonzero(groups == k) for k in picked[b]])
        assert draws["auroc"][b] == pytest.approx(anomaly.roc_auc(scores[idx], labels[idx]))
        assert draws["auprc"][b] == pytest.approx(anomaly.average_precision(scores[idx], labels[idx]))
    # the same groups and seed: the same draws, so a better map is better in every draw
    better = anomaly.bootstrap_detection(scores + 2.0 * labels, labels, groups, num=5, seed=7)
    assert (better["auprc"] > draws["auprc"]).all()
    lo, hi = anomaly.interval(draws["auprc"])
    assert draws["auprc"].min() <= lo <= hi <= draws["auprc"].max()
    with pytest.raises(ValueError, match="differ in size"):
        anomaly.bootstrap_detection(scores, labels, groups[:-1])
    with pytest.raises(ValueError, match="no bootstrap draw"):
        anomaly.interval([np.nan, np.nan])
    with pytest.raises(ValueError, match="one group"):                  # one group: a zero-width interval
        anomaly.bootstrap_detection(scores, labels, np.zeros_like(groups))


def test_slice_scores_are_the_mean_of_the_top_fraction_and_refuse_bad_fractions():
    import subprocess
    import sys

    import anomaly
    from conftest import REPO

    maps = np.zeros((2, 10, 10), np.float32)
    maps[0, 0, :5] = [1, 2, 3, 4, 5]
    np.testing.assert_allclose(anomaly.slice_scores(maps, 0.03), [4.0, 0.0])       # the top 3 of 100 pixels
    np.testing.assert_allclose(anomaly.slice_scores(maps, 0.001), [5.0, 0.0])      # at least one pixel
    np.testing.assert_array_equal(anomaly.slice_scores(maps), anomaly.slice_scores(maps, anomaly.SLICE_FRACTION))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="must be in"):
            anomaly.slice_scores(maps, bad)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_anomaly.py"), "--slice-fractions", "0.003", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--slice-fractions 0: a fraction of the map's pixels" in proc.stderr


def test_anomaly_benchmark_refuses_flags_that_leave_nothing_to_measure():
    import subprocess
    import sys

    from conftest import REPO

    bench = str(REPO / "bench" / "bench_anomaly.py")
    for argv, message in ((["--no-single", "--no-volume"], "--no-single with --no-volume leaves nothing to measure"),
                          (["--no-single", "--residual-weights", "2"],
                           "--residual-weights and --slice-fractions score the single-slice map"),
                          (["--volume-weights", "mean"], "argument --volume-weights: invalid choice: 'mean'")):
        proc = subprocess.run([sys.executable, bench, *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, (argv, proc.stderr[-300:])


def test_completion_benchmark_reports_the_completed_part_and_refuses_bad_rows(tiny_run, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_completion

    steps = np.stack([np.tile(np.array([0.0, 0.0, 3.0, 3.0])[:, None], (1, 3))] * 2)   # one step, rows 1 -> 2
    assert bench_completion.seam_step(steps, 2) == 3.0 and bench_completion.seam_step(steps, 1) == 0.0
    assert bench_completion.main(["--run", str(tiny_run), "--limit", "3", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    ssim = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in out.splitlines()
            if line.startswith("| ") and line.split("|")[2].strip()[:1].isdigit()}
    assert set(ssim) >= {"reconstructions (ceiling)", "completions", "fresh samples at the position (nothing kept)"}
    assert all(-1 <= v <= 1 for v in ssim.values())
    for argv, message in ((["--keep-rows", "8"], "--keep-rows 8: this run's code grid has 8 rows"),
                          (["--seeds", "0"], "--seeds 0: at least one completion")):
        with pytest.raises(SystemExit):
            bench_completion.main(["--run", str(tiny_run), *argv])
        assert message in capsys.readouterr().err
