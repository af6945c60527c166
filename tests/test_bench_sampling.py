"""bench/bench_sampling_defaults.py: its settings parser and the gap it reports."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_sampling_defaults as bench  # noqa: E402


def test_settings_parse_temperature_and_top_p():
    assert bench.parse_setting("t0.8") == {"temperature": 0.8, "top_p": None}
    assert bench.parse_setting("p0.9") == {"temperature": 1.0, "top_p": 0.9}
    assert bench.parse_setting("t0.9p0.95") == {"temperature": 0.9, "top_p": 0.95}
    for bad in ("0.8", "t0", "p1.5", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="setting"):
            bench.parse_setting(bad)


def test_gap_closed_is_the_share_towards_the_floor():
    assert bench.gap_closed(6.0, start=8.0, floor=4.0) == pytest.approx(0.5)
    assert bench.gap_closed(4.0, start=8.0, floor=4.0) == pytest.approx(1.0)
    assert bench.gap_closed(9.0, start=8.0, floor=4.0) < 0  # worse than the reference reads negative
    assert bench.gap_closed(0.96, start=0.95, floor=0.97) == pytest.approx(0.5)  # higher-is-better alike
    assert math.isnan(bench.gap_closed(1.0, start=1.0, floor=1.0))  # no gap: no share, not "all closed"


def test_table_shows_the_real_test_split_beside_the_floor(capsys):
    from bench_sampling_defaults import ANATOMY, print_table

    def metrics(group_values: dict) -> dict:
        out = {"interior_realism_ratio": 0.9, "sharpness_ratio": 1.0, "diversity_ms_ssim_samples": 0.6,
               "diversity_ms_ssim_real_test": 0.56, "sharpness_reconstructions": 1.0, "sharpness_real_test": 1.0}
        for group, value in group_values.items():
            out.update({key.format(group): value for _, key, _ in ANATOMY})
        return out

    real_test = {"anatomy_components_csf_real_test": 20.5, "anatomy_components_white_real_test": 4.9}
    print_table({"t1": {**metrics({"real_validate": 1.0, "reconstructions": 2.0, "samples": 3.0}), **real_test}},
                "samples", "samples")
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| real test"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "4.900" and cells[3] == "20.500" and cells[5] == "" and cells[7] == ""  # no area / Frechet
    print_table({"t1": metrics({"real_validate": 1.0, "reconstructions": 2.0, "samples": 3.0})}, "samples", "samples")
    assert "| real test" not in capsys.readouterr().out  # an evaluation without the test split's figures
