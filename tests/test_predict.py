"""predict.py: sampling from a run, identical files per seed, metrics against direct computations, errors."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil

import numpy as np
import pytest

from conftest import write_tree

TINY = ["--image-size", "32", "--downsample", "4", "--channels", "8", "--num-res-blocks", "1",
        "--num-embeddings", "16", "--embedding-dim", "4", "--prior-filters", "8", "--prior-num-layers", "2",
        "--batch-size", "4", "--vqvae-epochs", "2", "--prior-epochs", "2", "--num-samples", "0"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny two-stage run (slice-conditioned prior) on a 32x32 tree."""
    import train

    root = tmp_path_factory.mktemp("predict")
    data = write_tree(root / "oasis")
    out = root / "run"
    assert train.main(["--data", data, "--out", out, *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def unconditioned_run(trained_run, tmp_path_factory):
    """The same VQ-VAE with a prior that is not conditioned on slice position."""
    import train

    out = tmp_path_factory.mktemp("uncond") / "run"
    shutil.copytree(trained_run, out)
    assert train.main(["--out", out, "--stage", "prior", "--no-condition-on-slice", "--prior-epochs", "1",
                       "--num-samples", "0"]) == 0
    return out


def predict_main(*argv):
    import predict

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = predict.main([str(a) for a in argv])
    return code, err.getvalue().strip().splitlines()


def test_same_seed_gives_byte_identical_pngs(trained_run, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert predict_main("--run", trained_run, "--out", a, "--num", "3", "--seed", "7", "--slice", "2")[0] == 0
    assert predict_main("--run", trained_run, "--out", b, "--num", "3", "--seed", "7", "--slice", "2",
                        "--batch-size", "2")[0] == 0
    assert predict_main("--run", trained_run, "--out", c, "--num", "3", "--seed", "8", "--slice", "2")[0] == 0
    names = sorted(p.name for p in a.iterdir())
    assert names == ["codes.npy", "sample_000.png", "sample_001.png", "sample_002.png", "samples_grid.png"]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert not np.array_equal(np.load(a / "codes.npy"), np.load(c / "codes.npy"))
    codes = np.load(a / "codes.npy")
    assert codes.shape == (3, 8, 8) and codes.min() >= 0 and codes.max() < 16

    from PIL import Image

    img = Image.open(a / "sample_000.png")
    assert img.mode == "L" and img.size == (32, 32)


def test_generate_decodes_sampled_codes(trained_run):
    import predict

    run = predict.load_run(trained_run)
    assert run.conditioned and run.num_conditions == 4
    codes, images = predict.generate(run, 2, seed=1, condition=np.array([0, 3]), progress=False)
    assert codes.shape == (2, 8, 8) and images.shape == (2, 32, 32, 1)
    np.testing.assert_allclose(images, np.asarray(run.vqvae.decode(codes)), atol=1e-6)
    assert 0 <= images.min() and images.max() <= 1


@pytest.mark.parametrize("case", ["missing_run", "no_prior", "num_zero", "slice_unconditioned", "slice_out_of_range",
                                  "bad_temperature"])
def test_errors_are_one_line(case, trained_run, unconditioned_run, tmp_path):
    if case == "missing_run":
        argv, expect = ["--run", tmp_path / "nope"], "run directory"
    elif case == "no_prior":
        run = tmp_path / "run"
        shutil.copytree(trained_run, run)
        (run / "pixelcnn.keras").unlink()
        argv, expect = ["--run", run], "python train.py --stage prior"
    elif case == "num_zero":
        argv, expect = ["--run", trained_run, "--num", "0"], "--num must be at least 1"
    elif case == "slice_unconditioned":
        argv, expect = ["--run", unconditioned_run, "--slice", "1"], "not conditioned on slice position"
    elif case == "slice_out_of_range":
        argv, expect = ["--run", trained_run, "--slice", "9"], "out of range"
    else:
        argv, expect = ["evaluate", "--run", trained_run, "--temperature", "0"], "--temperature"
    try:
        code, lines = predict_main(*argv)
    except SystemExit as e:  # argparse errors: usage line + one error line
        code, lines = e.code, None
    assert code == 2
    if lines is not None:
        assert len(lines) == 1 and lines[0].startswith("predict.py: error: ") and expect in lines[0], lines


def test_argparse_errors_name_the_flag(trained_run, capsys):
    import predict

    with pytest.raises(SystemExit) as e:
        predict.main(["--run", str(trained_run), "--num", "0"])
    assert e.value.code == 2
    assert "--num must be at least 1" in capsys.readouterr().err


def test_unconditioned_run_samples_without_slice(unconditioned_run, tmp_path):
    assert predict_main("--run", unconditioned_run, "--out", tmp_path, "--num", "2")[0] == 0
    assert np.load(tmp_path / "codes.npy").shape == (2, 8, 8)


def test_nearest_by_ssim_matches_brute_force():
    import predict
    import utils

    rng = np.random.default_rng(0)
    refs = rng.random((7, 16, 16, 1)).astype(np.float32)
    samples = np.concatenate([refs[[4]] * 0.9 + 0.05, rng.random((2, 16, 16, 1)).astype(np.float32)])
    best, index = predict.nearest_by_ssim(samples, refs, chunk=3)
    full = np.array([[utils.ssim(s[None], r[None])[0] for r in refs] for s in samples])
    np.testing.assert_allclose(best, full.max(axis=1), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(index, full.argmax(axis=1))
    assert index[0] == 4


def test_mean_pairwise_ms_ssim_matches_explicit_pairs():
    import tensorflow as tf

    import predict

    rng = np.random.default_rng(1)
    images = rng.random((4, 48, 48, 1)).astype(np.float32)
    images[1] = images[0]                      # one identical pair: MS-SSIM 1
    # 48 px: scales of 48, 24 and 12 px fit the 11 px window, so three scales, weights renormalised.
    w = np.array([0.0448, 0.2856, 0.3001]) / (0.0448 + 0.2856 + 0.3001)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    direct = [float(tf.image.ssim_multiscale(images[i][None], images[j][None], 1.0, power_factors=w.tolist())[0])
              for i, j in pairs]
    assert math.isclose(predict.mean_pairwise_ms_ssim(images), float(np.mean(direct)), rel_tol=1e-5)
    assert max(direct) == pytest.approx(1.0)
    # Past max_pairs, a seeded subset of the pairs is averaged.
    subset = predict.mean_pairwise_ms_ssim(images, max_pairs=3, seed=0)
    chosen = np.random.default_rng(0).choice(len(pairs), size=3, replace=False)
    assert subset == pytest.approx(float(np.mean([direct[k] for k in chosen])), rel=1e-5)


def test_prior_nll_bits_matches_log_softmax(trained_run):
    import dataset
    import predict

    run = predict.load_run(trained_run)
    data = run.config["data"]
    test = dataset.read_oasis(data["root"], image_size=data["image_size"])["test"]
    x = test.images.astype(np.float32) / 255.0
    codes = np.asarray(run.vqvae.encode(x))
    logits = np.asarray(run.prior((codes, test.slice_indices.astype(np.int32)), training=False)).astype(np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, codes[..., None], -1).mean() / math.log(2)
    assert predict.prior_nll_bits(run, test) == pytest.approx(nll, rel=1e-5)
    # Same figure as train.py recorded for the test split.
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["prior_test_nll_bits"] == pytest.approx(nll, rel=1e-4)


def test_evaluate_writes_consistent_metrics_and_figure(trained_run, tmp_path):
    code, _ = predict_main("evaluate", "--run", trained_run, "--out", tmp_path, "--num", "4", "--seed", "3")
    assert code == 0
    m = json.loads((tmp_path / "generation_metrics.json").read_text())
    assert (tmp_path / "samples_vs_nearest.png").is_file()
    assert m["num_samples"] == 4
    assert -1 <= m["realism_ssim_mean"] <= 1 and 0 <= m["realism_fraction_above_0.6"] <= 1
    assert m["memorisation_copies_above_0.95"] in range(5)
    assert -1 <= m["diversity_ms_ssim_samples"] <= 1 and -1 <= m["diversity_ms_ssim_real_test"] <= 1
    assert m["prior_test_nll_bits"] > 0

    # Recompute realism directly from the same samples.
    import dataset
    import predict
    import utils

    run = predict.load_run(trained_run)
    data = run.config["data"]
    test = dataset.read_oasis(data["root"], image_size=data["image_size"])["test"]
    pick = np.random.default_rng(3).choice(len(test), size=4, replace=False)
    _, samples = predict.generate(run, 4, seed=3, condition=test.slice_indices[pick].astype(np.int32),
                                  progress=False)
    x = test.images.astype(np.float32) / 255.0
    best = np.array([max(utils.ssim(s[None], r[None])[0] for r in x) for s in samples])
    assert m["realism_ssim_mean"] == pytest.approx(best.mean(), rel=1e-4, abs=1e-5)
    assert m["realism_fraction_above_0.6"] == pytest.approx((best > 0.6).mean())


def test_reconstruct_reports_per_image_scores(trained_run, tmp_path):
    import dataset
    import predict
    import utils

    images = trained_run.parent / "oasis" / "keras_png_slices_test"
    code, _ = predict_main("reconstruct", "--run", trained_run, "--images", images, "--out", tmp_path)
    assert code == 0
    report = json.loads((tmp_path / "reconstruction_metrics.json").read_text())
    assert len(report["images"]) == 4 and (tmp_path / "reconstructions_000.png").is_file()
    run = predict.load_run(trained_run, need_prior=False)
    x = dataset.load_images(images, image_size=32)
    expected = utils.ssim(x, np.asarray(run.vqvae(x, training=False)))
    np.testing.assert_allclose([r["ssim"] for r in report["images"]], expected, rtol=1e-5)
    assert report["mean_ssim"] == pytest.approx(expected.mean(), rel=1e-5)
