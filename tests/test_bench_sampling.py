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
