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
        "--batch-size", "4", "--vqvae-epochs", "2", "--prior-epochs", "2", "--num-samples", "0",
        "--prior-condition-dropout", "0", "--decoder-epochs", "0"]  # no 'no condition' slot here; guided_run below has one


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


def test_prior_nll_matches_log_softmax_and_train_metrics(trained_run):
    import dataset
    import evaluation
    import predict

    run = predict.load_run(trained_run)
    data = run.config["data"]
    test = dataset.read_oasis(data["root"], image_size=data["image_size"])["test"]
    x = test.images.astype(np.float32) / 255.0
    codes = np.asarray(run.vqvae.encode(x))
    logits = np.asarray(run.prior((codes, test.slice_indices.astype(np.int32)), training=False)).astype(np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, codes[..., None], -1)[..., 0] / math.log(2)   # bits, (N, h, w)
    got = evaluation.prior_nll(run.prior, evaluation.encode_images(run.vqvae, test.images, batch_size=3),
                               test.slice_indices)
    assert got["bits_per_code"] == pytest.approx(nll.mean(), rel=1e-5)
    assert got["bits_per_slice"] == pytest.approx(nll.sum(axis=(1, 2)).mean(), rel=1e-5)
    # Same figures as train.py recorded for the test split.
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["prior_test_nll_bits"] == pytest.approx(nll.mean(), rel=1e-4)
    assert metrics["prior_test_nll_bits_per_slice"] == pytest.approx(nll.sum(axis=(1, 2)).mean(), rel=1e-4)


def test_evaluate_writes_consistent_metrics_and_figure(trained_run, tmp_path):
    code, _ = predict_main("evaluate", "--run", trained_run, "--out", tmp_path, "--num", "4", "--seed", "3")
    assert code == 0
    m = json.loads((tmp_path / "generation_metrics.json").read_text())
    assert (tmp_path / "samples_vs_nearest.png").is_file()
    assert m["num_samples"] == 4
    assert -1 <= m["realism_ssim_mean"] <= 1 and 0 <= m["realism_fraction_above_0.6"] <= 1
    assert m["memorisation_copies_above_0.95"] in range(5)
    assert -1 <= m["diversity_ms_ssim_samples"] <= 1 and -1 <= m["diversity_ms_ssim_real_test"] <= 1
    assert m["prior_test_nll_bits"] > 0 and m["prior_test_nll_bits_per_slice"] == pytest.approx(
        64 * m["prior_test_nll_bits"], rel=1e-5)                         # an 8x8 grid

    # Recompute the metrics directly from the same samples.
    import dataset
    import evaluation
    import judge
    import keras
    import predict

    run = predict.load_run(trained_run)
    data = run.config["data"]
    splits = dataset.read_oasis(data["root"], image_size=data["image_size"], seed=run.config["seed"])
    test, val = splits["test"], splits["validate"]
    pick = np.random.default_rng(3).choice(len(test), size=4, replace=False)
    requested = test.slice_indices[pick].astype(np.int32)
    _, samples = predict.generate(run, 4, seed=3, condition=requested, progress=False)
    x = test.images.astype(np.float32) / 255.0
    best = np.array([max(evaluation.ssim(s[None], r[None])[0] for r in x) for s in samples])
    assert m["realism_ssim_mean"] == pytest.approx(best.mean(), rel=1e-4, abs=1e-5)
    assert m["realism_fraction_above_0.6"] == pytest.approx((best > 0.6).mean())
    # The same search for real validation slices (validate has 4 slices, all searched).
    best_val = np.array([max(evaluation.ssim(v[None], r[None])[0] for r in x) for v in val.float()])
    assert m["realism_ssim_mean_real_validate"] == pytest.approx(best_val.mean(), rel=1e-4, abs=1e-5)
    assert m["realism_fraction_above_0.6_real_validate"] == pytest.approx((best_val > 0.6).mean())
    # Interior realism: the same search on the central 16x16; validate has 4 slices, all searched.
    crop = (slice(None), slice(8, 24), slice(8, 24))
    inner = np.array([max(evaluation.ssim(s[None], r[None])[0] for r in x[crop]) for s in samples[crop]])
    inner_val = np.array([max(evaluation.ssim(v[None], r[None])[0] for r in x[crop]) for v in val.float()[crop]])
    # (float32 filtering on near-flat crops: SSIMs near 0 agree to about 1e-4 absolute)
    assert m["interior_realism_samples"] == pytest.approx(inner.mean(), rel=1e-4, abs=1e-4)
    assert m["interior_realism_real_validate"] == pytest.approx(inner_val.mean(), rel=1e-4, abs=1e-4)
    assert m["interior_realism_ratio"] == pytest.approx(m["interior_realism_samples"]
                                                        / m["interior_realism_real_validate"], rel=1e-9)
    sharp, sharp_real = evaluation.sharpness(samples), evaluation.sharpness(x)
    # (a 2-epoch tiny model may decode to black slices with no head to measure in: NaN on both sides)
    assert m["sharpness_samples"] == pytest.approx(np.nanmean(sharp), rel=1e-6, nan_ok=True)
    assert m["sharpness_ratio"] == pytest.approx(np.nanmean(sharp) / np.nanmean(sharp_real), rel=1e-6, nan_ok=True)
    assert np.isfinite(np.nanmean(sharp_real)) and m["sharpness_real_test"] == pytest.approx(np.nanmean(sharp_real))
    # The judge's metrics, from its features and predictions of the same images.
    model = keras.models.load_model(trained_run / "judge.keras")
    f_s, slice_s = judge.judge_outputs(model, samples)
    f_t, _ = judge.judge_outputs(model, x)
    f_v, _ = judge.judge_outputs(model, val.float())
    assert m["judge_frechet_samples_vs_test"] == pytest.approx(evaluation.frechet_distance(f_s, f_t), rel=1e-4)
    assert m["judge_frechet_validate_vs_test"] == pytest.approx(evaluation.frechet_distance(f_v, f_t), rel=1e-4)
    assert m["slice_agreement_median_abs_error"] == np.median(np.abs(slice_s - requested))
    # Validation reconstructions (vqvae(x) decodes x's codes) are scored alike: the decoder's ceiling.
    recon = np.asarray(run.vqvae(val.float(), training=False))
    f_r, slice_r = judge.judge_outputs(model, recon)
    assert m["judge_slice_error_reconstructions"] == np.median(np.abs(slice_r - val.slice_indices))
    assert m["judge_frechet_reconstructions_vs_test"] == pytest.approx(evaluation.frechet_distance(f_r, f_t),
                                                                       rel=1e-3)
    assert m["sharpness_reconstructions"] == pytest.approx(np.nanmean(evaluation.sharpness(recon)), rel=1e-4, nan_ok=True)
    p, r = evaluation.precision_recall(f_t, f_s, k=3)
    assert (m["judge_precision"], m["judge_recall"]) == (pytest.approx(p), pytest.approx(r))
    p, r = evaluation.precision_recall(f_t, f_v, k=3)
    assert (m["judge_precision_validate"], m["judge_recall_validate"]) == (pytest.approx(p), pytest.approx(r))
    # The power spectrum: test reconstructions and the samples over the real test slices, per band.
    test_recon = evaluation.decode_codes(run.vqvae, evaluation.encode_images(run.vqvae, test.images))
    power, _ = evaluation.power_spectrum_ratios(x, {"reconstructions": test_recon, "samples": samples})
    for key in ("power_ratio_reconstructions", "power_ratio_samples"):
        assert m[key] == pytest.approx(power[key], rel=1e-3, abs=1e-4), key
    assert (tmp_path / "power_spectrum.png").is_file()


def test_evaluate_without_a_judge_skips_its_metrics_with_a_notice(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "judge.keras").unlink()
    code, lines = predict_main("evaluate", "--run", run, "--num", "2", "--seed", "0")
    assert code == 0
    m = json.loads((run / "evaluation" / "generation_metrics.json").read_text())
    assert "realism_ssim_mean" in m and not any(k.startswith("judge") for k in m)
    assert any("judge.keras not found" in line and "--stage judge" in line for line in lines), lines


def test_evaluate_runs_the_two_sample_test_on_samples_at_the_real_positions(trained_run, tmp_path, monkeypatch):
    import dataset
    import evaluation
    import predict

    # the tiny run's data has one test case: the test (split by case) is skipped with a notice, not faked
    code, lines = predict_main("evaluate", "--run", trained_run, "--out", tmp_path / "one", "--num", "2")
    assert code == 0 and any("two-sample test is skipped" in line and "test split holds 1 case" in line
                             for line in lines), lines
    assert not any(k.startswith("two_sample") for k in json.loads((tmp_path / "one" / "generation_metrics.json")
                                                                  .read_text()))
    # the same run pointed at a tree with 4 test and 2 validate cases runs it
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = json.loads((run / "config.json").read_text())
    config["data"]["root"] = str(write_tree(tmp_path / "more", cases={"train": [1, 2], "validate": [3, 4],
                                                                       "test": [5, 6, 7, 8]}))
    (run / "config.json").write_text(json.dumps(config))
    seen = {}
    scores = evaluation.two_sample_scores

    def spy(splits, reconstructions, samples, **kw):
        seen.update(splits=splits, reconstructions=reconstructions, samples=samples)
        return scores(splits, reconstructions, samples, config=evaluation.TwoSampleConfig(
            filters=(4,), epochs=1, min_steps=0, min_train_accuracy=0.0, bootstrap=50, permutations=50), **kw)

    monkeypatch.setattr(evaluation, "two_sample_scores", spy)
    loaded = predict.load_run(run)
    m = predict.evaluate(loaded, num=2, seed=1, out_dir=tmp_path / "ev", two_sample_num=6)
    rows = ("real_validate", "blurred_real", "blurred_validate", "reconstructions", "samples",
            "samples_reconstructions")
    assert {f"two_sample_{a}_{b}{c}" for a in rows for b in evaluation.TWO_SAMPLE_VIEWS
            for c in ("", "_interval", "_p")} <= set(m)
    assert m["two_sample_num_samples"] == 6 and m["two_sample_sampling_seconds"] > 0
    assert (tmp_path / "ev" / "real_recon_samples_zoom.png").is_file()
    table = (tmp_path / "ev" / "two_sample.md").read_text()
    assert "paired" in table and f"{m['two_sample_reconstructions_full']:.2f} (" in table
    test, val = seen["splits"]["test"], seen["splits"]["validate"]
    np.testing.assert_allclose(seen["reconstructions"], np.asarray(loaded.vqvae(test.float(), training=False)),
                               atol=1e-5)
    positions = np.concatenate([val.slice_indices, test.slice_indices])
    pick = evaluation.reference_pick(len(positions), 6, 1)
    _, expected = predict.generate(loaded, 6, seed=1, condition=positions[pick].astype(np.int32), progress=False)
    np.testing.assert_array_equal(seen["samples"], expected)  # 6 samples at validate and test slices' positions
    assert isinstance(test, dataset.Split) and len(test) == 16


def test_judge_stage_retrains_only_the_judge(trained_run, tmp_path):
    import train

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = {name: (run / name).read_bytes() for name in ("vqvae.keras", "pixelcnn.keras")}
    (run / "judge.keras").unlink()
    assert train.main(["--out", run, "--stage", "judge", "--judge-epochs", "1"]) == 0
    assert (run / "judge.keras").is_file()
    assert {name: (run / name).read_bytes() for name in before} == before
    config = json.loads((run / "config.json").read_text())
    assert config["judge"]["epochs"] == 1 and config["judge"]["num_slices"] == 4
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["judge_test_slice_error_median"] <= 3


def test_reconstruct_reports_per_image_scores(trained_run, tmp_path):
    import dataset
    import evaluation
    import predict

    images = trained_run.parent / "oasis" / "keras_png_slices_test"
    code, _ = predict_main("reconstruct", "--run", trained_run, "--images", images, "--out", tmp_path)
    assert code == 0
    report = json.loads((tmp_path / "reconstruction_metrics.json").read_text())
    assert len(report["images"]) == 4 and (tmp_path / "reconstructions_000.png").is_file()
    run = predict.load_run(trained_run, need_prior=False)
    x = dataset.load_images(images, image_size=32)
    expected = evaluation.ssim(x, np.asarray(run.vqvae(x, training=False)))
    np.testing.assert_allclose([r["ssim"] for r in report["images"]], expected, rtol=1e-5)
    assert report["mean_ssim"] == pytest.approx(expected.mean(), rel=1e-5)


def test_a_loader_warning_prints_as_one_line(trained_run, tmp_path):
    """From a shell, the loader's DatasetWarning reads ``warning: <message>``: no file, line number or source line."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    images = tmp_path / "pngs"
    shutil.copytree(trained_run.parent / "oasis" / "keras_png_slices_test", images)
    (images / "notes.txt").write_text("not an image")  # ignored, and the loader says so
    proc = subprocess.run([sys.executable, str(REPO / "predict.py"), "reconstruct", "--run", str(trained_run),
                           "--images", str(images), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=180, cwd=REPO, env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [f"warning: {images}: ignored 1 non-PNG entry (e.g. 'notes.txt'); "
                                        "only *.png files are read"], proc.stderr


@pytest.fixture(scope="module")
def guided_run(trained_run, tmp_path_factory):
    """The same VQ-VAE with a prior trained with condition dropout (it has a 'no condition' slot)."""
    import train

    out = tmp_path_factory.mktemp("guided") / "run"
    shutil.copytree(trained_run, out)
    assert train.main(["--out", out, "--stage", "prior", "--prior-condition-dropout", "0.5", "--prior-epochs", "1",
                       "--num-samples", "0", "--judge-epochs", "0"]) == 0
    return out


def test_sampling_flags_reach_the_sampler(guided_run, tmp_path):
    """--guidance / --top-k / --top-p / --unconditional give exactly sample_codes' codes for the seed."""
    import predict

    run = predict.load_run(guided_run)
    assert run.prior.has_null_condition
    cases = {
        "guided": (["--slice", "2", "--guidance", "3", "--top-k", "4"],
                   dict(condition=np.full(3, 2, np.int32), guidance=3.0, top_k=4)),
        "nucleus": (["--slice", "1", "--top-p", "0.8"], dict(condition=np.full(3, 1, np.int32), top_p=0.8)),
        "unconditional": (["--unconditional"], dict(condition=None)),
    }
    for name, (flags, kwargs) in cases.items():
        out = tmp_path / name
        assert predict_main("--run", guided_run, "--out", out, "--num", "3", "--seed", "5", *flags)[0] == 0
        expected = predict.sample_codes(run.prior, 3, seed=5, temperature=predict.DEFAULT_TEMPERATURE, **kwargs)
        np.testing.assert_array_equal(np.load(out / "codes.npy"), expected, err_msg=name)
    # without --temperature the CLI draws at the measured default; --temperature 1 is the prior as it is
    assert predict_main("--run", guided_run, "--out", tmp_path / "t1", "--num", "3", "--seed", "5",
                        "--unconditional", "--temperature", "1")[0] == 0
    np.testing.assert_array_equal(np.load(tmp_path / "t1" / "codes.npy"),
                                  predict.sample_codes(run.prior, 3, seed=5, condition=None))
    parser = predict.build_parser()  # every command that draws samples defaults to the measured temperature
    for command in (["sample"], ["evaluate"], ["subject"]):
        assert parser.parse_args(command).temperature == predict.DEFAULT_TEMPERATURE != 1.0, command
    # the flags change the draw: guidance 3 with top-k 4 is not plain conditioned sampling
    plain = predict.sample_codes(run.prior, 3, seed=5, condition=np.full(3, 2, np.int32),
                                 temperature=predict.DEFAULT_TEMPERATURE)
    assert not np.array_equal(np.load(tmp_path / "guided" / "codes.npy"), plain)


@pytest.mark.parametrize("flags, expect", [
    (["--guidance", "2", "--slice", "1"], "condition_dropout"),
    (["--unconditional"], "condition_dropout"),
])
def test_guidance_without_a_null_slot_is_a_one_line_error(trained_run, tmp_path, flags, expect):
    code, lines = predict_main("--run", trained_run, "--out", tmp_path, "--num", "2", *flags)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("predict.py: error: ") and expect in lines[0], lines


@pytest.mark.parametrize("flags, expect", [(["--top-k", "0"], "--top-k must be at least 1"),
                                           (["--top-p", "1.5"], "--top-p must lie in (0, 1]"),
                                           (["--unconditional", "--slice", "1"], "exclude each other")])
def test_sampling_flag_errors_name_the_flag(trained_run, capsys, flags, expect):
    import predict

    with pytest.raises(SystemExit) as e:
        predict.main(["--run", str(trained_run), "--num", "2", *flags])
    assert e.value.code == 2 and expect in capsys.readouterr().err
