"""Two-level priors (VQ-VAE-2): a top level's coarse codes condition the fine prior (``train.py --top-run``)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_RUN_FLAGS, write_tree

SLICES = 4  # the tiny run's slices per case


def tiny_flags(downsample: int) -> list[str]:
    flags = list(TINY_RUN_FLAGS)
    flags[flags.index("--downsample") + 1] = str(downsample)
    return flags


@pytest.fixture(scope="module")
def levels(tiny_run, tmp_path_factory):
    """Two levels on the session's tiny run: it is the top level (32x32 images, 8x8 codes); the fine run
    beside it has 16x16 codes (downsample 2) and a prior conditioned on the tiny run's codes."""
    import train

    root = tmp_path_factory.mktemp("two_level")
    data = Path(json.loads((tiny_run / "config.json").read_text())["data"]["root"])
    assert train.main(["--data", data, "--out", root / "fine", *tiny_flags(2), "--judge-epochs", "0",
                       "--top-run", tiny_run]) == 0
    return {"top": tiny_run, "fine": root / "fine", "data": data}


def one_line_error(main, argv) -> tuple[int, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, [line for line in err.getvalue().strip().splitlines() if "%|" not in line]


def small_prior(top_codes=10, **overrides):
    from modules import PixelCNN, PriorConfig

    cfg = PriorConfig(**{**dict(filters=16, num_layers=3, num_conditions=4, grid_shape=(8, 8), condition_map=4,
                                previous_slice=True, previous_dropout=0.5, attention_every=2, condition_dropout=0.1,
                                top_codes=top_codes, top_grid_shape=(4, 4) if top_codes else None), **overrides})
    prior = PixelCNN(12, cfg)
    prior.build()
    return prior


def test_fine_prior_sees_the_top_codes_and_stays_causal():
    prior = small_prior()
    rng = np.random.default_rng(0)
    codes, cond = rng.integers(0, 12, (3, 8, 8)), np.array([0, 1, 2])
    top, previous = rng.integers(0, 10, (3, 4, 4)), rng.integers(0, 12, (3, 8, 8))
    # a trained map would be far from zero; give it weight so that the top codes move the logits
    for w in prior.top_map.weights:
        w.assign(rng.normal(0, 0.5, w.shape).astype("float32"))
    full = np.asarray(prior((codes, cond, previous, top)))
    other_top = (top + 1) % 10
    assert np.abs(np.asarray(prior((codes, cond, previous, other_top))) - full).max() > 1e-3
    later = codes.copy()
    later[:, 5:, :] = (later[:, 5:, :] + 3) % 12  # codes from row 5 on: logits before them must not move
    np.testing.assert_allclose(np.asarray(prior((later, cond, previous, top)))[:, :5], full[:, :5], atol=1e-5)
    cache = prior.init_cache(3, (8, 8), previous=previous, top=top)
    last, worst = np.zeros(3, np.int32), 0.0
    for i in range(8):
        for j in range(8):
            logits, cache = prior.call_with_cache(last, i, j, cache, cond)
            worst = max(worst, float(np.abs(np.asarray(logits) - full[:, i, j]).max()))
            last = codes[:, i, j].astype(np.int32)
    assert worst < 1e-4


def test_two_level_prior_saves_and_loads(tmp_path):
    import keras

    prior = small_prior()
    rng = np.random.default_rng(1)
    inputs = (rng.integers(0, 12, (2, 8, 8)), np.array([0, 3]), rng.integers(0, 10, (2, 4, 4)))
    prior.save(tmp_path / "p.keras")
    again = keras.models.load_model(tmp_path / "p.keras")
    assert again.config.top_codes == 10 and again.config.top_grid_shape == (4, 4)
    np.testing.assert_array_equal(np.asarray(again(inputs)), np.asarray(prior(inputs)))


def test_prior_config_checks_the_top_level():
    from modules import PriorConfig

    with pytest.raises(ValueError, match="condition_map"):
        PriorConfig(grid_shape=(8, 8), top_codes=10, top_grid_shape=(4, 4))
    with pytest.raises(ValueError, match="divide"):
        PriorConfig(grid_shape=(8, 8), condition_map=4, top_codes=10, top_grid_shape=(3, 3))
    with pytest.raises(ValueError, match="top_grid_shape"):
        PriorConfig(grid_shape=(8, 8), condition_map=4, top_codes=10)
    # configs saved before two levels existed load as one level
    old = {k: v for k, v in PriorConfig(grid_shape=(8, 8)).to_dict().items() if not k.startswith("top_")}
    assert PriorConfig.from_dict(old).top_codes == 0


def test_sampler_is_exact_with_top_codes_and_names_what_is_missing():
    import sampler

    prior = small_prior()
    rng = np.random.default_rng(2)
    top, previous = rng.integers(0, 10, (5, 4, 4)), rng.integers(0, 12, (5, 8, 8))
    fast = sampler.sample_codes(prior, 5, seed=1, condition=2, top=top, previous=previous, batch_size=3)
    naive = sampler.sample_codes(prior, 5, seed=1, condition=2, top=top, previous=previous, method="naive")
    np.testing.assert_array_equal(fast, naive)
    guided = sampler.sample_codes(prior, 5, seed=1, condition=2, top=top, guidance=2.0)
    np.testing.assert_array_equal(guided, sampler.sample_codes(prior, 5, seed=1, condition=2, top=top, guidance=2.0,
                                                               method="naive"))
    with pytest.raises(ValueError, match="pass top="):
        sampler.sample_codes(prior, 5, seed=1, condition=2)
    with pytest.raises(ValueError, match=r"top must be an int array \(5, 4, 4\)"):
        sampler.sample_codes(prior, 5, seed=1, condition=2, top=top[:, :2])
    with pytest.raises(ValueError, match="one level"):
        sampler.sample_codes(small_prior(top_codes=0), 5, seed=1, condition=2, top=top)


def test_two_level_run_keeps_its_top_level_and_samples_through_it(levels, tmp_path):
    import predict

    cfg = json.loads((levels["fine"] / "config.json").read_text())
    top_cfg = json.loads((levels["top"] / "config.json").read_text())
    assert cfg["prior"]["top_codes"] == top_cfg["vqvae"]["num_embeddings"]
    assert cfg["prior"]["top_grid_shape"] == [8, 8] and cfg["prior"]["grid_shape"] == [16, 16]
    for name in ("config.json", "vqvae.keras", "pixelcnn.keras"):
        assert (levels["fine"] / "top" / name).exists()
    metrics = json.loads((levels["fine"] / "metrics.json").read_text())
    assert metrics["prior_val_top_nll_bits_per_slice"] > 0 and metrics["prior_val_nll_bits_per_slice"] > 0

    run = predict.load_run(levels["fine"])
    assert run.two_level and run.top.prior.config.grid_shape == (8, 8)
    codes, images = predict.generate(run, 3, seed=0, condition=1, progress=False)
    again, _ = predict.generate(run, 3, seed=0, condition=1, progress=False)
    assert codes.shape == (3, 16, 16) and images.shape == (3, 32, 32, 1)
    np.testing.assert_array_equal(codes, again)
    # the fine codes are drawn given the top codes that the top prior drew with the same seed
    import sampler

    fine, top = sampler.sample_two_level(run.top.prior, run.prior, 3, seed=0, condition=1,
                                         temperature=sampler.DEFAULT_TEMPERATURE)
    np.testing.assert_array_equal(fine, codes)
    assert top.shape == (3, 8, 8)

    code, lines = one_line_error(predict.main, ["sample", "--run", levels["fine"], "--num", "2",
                                                "--out", tmp_path / "samples"])
    assert code == 0, lines
    assert len(list((tmp_path / "samples").glob("*.png"))) >= 2

    subjects = predict.generate_subjects(run, 2, seed=0, progress=False)
    assert subjects.codes.shape == (2, SLICES, 16, 16)


def test_two_level_mistakes_are_one_line(levels, tmp_path):
    import train

    data = levels["data"]
    cases = {
        "missing": (["--top-run", tmp_path / "nowhere"], "not found"),
        "same grid": (["--top-run", levels["top"]], "coarser grid"),  # the top run's own 8x8 grid
        "other size": (["--top-run", levels["top"], "--image-size", "64"], "image size"),
    }
    for name, (extra, message) in cases.items():
        code, lines = one_line_error(train.main, ["--data", data, "--out", tmp_path / name, *tiny_flags(4), *extra])
        assert code == 2 and len(lines) == 1 and message in lines[0], (name, lines)
    other = write_tree(tmp_path / "other", slices=SLICES)
    code, lines = one_line_error(train.main, ["--data", other, "--out", tmp_path / "other_run", *tiny_flags(2),
                                              "--top-run", levels["top"]])
    assert code == 2 and len(lines) == 1 and "same data" in lines[0], lines
    code, lines = one_line_error(train.main, ["--data", data, "--out", tmp_path / "v", *tiny_flags(2), "--stage",
                                              "vqvae", "--top-run", levels["top"]])
    assert code != 0 and "--top-run" in lines[-1]


def test_anomaly_maps_refuse_a_two_level_run_in_one_line(levels, tmp_path):
    import predict

    code, lines = one_line_error(predict.main, ["anomaly", "--run", levels["fine"], "--images",
                                                levels["data"] / "keras_png_slices_test", "--out", tmp_path / "a"])
    assert code == 2 and len(lines) == 1 and "two levels" in lines[0], lines


def test_resume_refuses_a_different_top_level(levels, tmp_path):
    import shutil

    import keras

    import train

    fine, other_top = tmp_path / "fine", tmp_path / "other_top"
    shutil.copytree(levels["fine"], fine)
    shutil.copytree(levels["top"], other_top)
    vqvae = keras.models.load_model(other_top / "vqvae.keras")
    vqvae.decoder.weights[0].assign(vqvae.decoder.weights[0] + 0.1)  # another top level of the same shape
    vqvae.save(other_top / "vqvae.keras")
    code, lines = one_line_error(train.main, ["--out", fine, "--resume", "--top-run", other_top])
    assert code == 2 and "another top level" in lines[-1], lines
