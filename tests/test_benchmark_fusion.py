"""The fusion benchmark's table over training seeds (benchmarks.fusion.seed_table)."""
from __future__ import annotations

from benchmarks.fusion import adapter_dir, seed_table


def _seed(score, delta, interval, gap=None, gap_interval=None, seconds=None):
    return {"score": score, "delta": delta, "interval": interval, "image gap": gap,
            "image gap interval": gap_interval, "distinct": 1.0, "train_seconds": seconds}


def test_seed_table_reports_mean_sd_and_counts_separated_seeds():
    summary = {"clipcap": {"metric": "CIDEr", "baseline": "retrieval", "per_seed": {
        0: _seed(0.30, -0.20, [-0.40, -0.05], 0.9, [0.7, 1.1], 700.0),
        1: _seed(0.40, -0.10, [-0.30, 0.10], 1.0, [0.8, 1.2], None),
        2: _seed(0.50, 0.00, [-0.20, 0.20], -0.0001, [-0.1, 0.1], 650.0)}}}
    lines = seed_table(summary)
    row = next(line for line in lines if line.startswith("| clipcap"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "30.0 / 40.0 / 50.0"
    assert cells[3] == "**40.0 ± 10.0**"
    assert cells[4] == "−10.0 ± 10.0 (0 ahead, 1 behind)"
    assert cells[6] == "100.0 / 100.0 / 100.0"
    assert cells[5] == "0.900 / 1.000 / 0.000 (2 above 0)"   # a rounded −0.0001 is shown as 0.000
    assert cells[7] == "700 / – / 650"


def test_seed_table_is_empty_with_one_seed_and_shows_a_missing_seed():
    one = {"flamingo": {"metric": "CIDEr", "baseline": "retrieval", "per_seed": {0: _seed(0.3, 0.0, None)}}}
    assert seed_table(one) == []
    two = {**one, "smallcap": {"metric": "CIDEr", "baseline": "retrieval",
                               "per_seed": {0: _seed(0.6, 0.1, None), 1: _seed(0.7, 0.2, None)}}}
    row = next(line for line in seed_table(two) if line.startswith("| flamingo"))
    assert "30.0 / –" in row and "**30.0**" in row
    row = next(line for line in seed_table(two) if line.startswith("| smallcap"))
    assert "+15.0 ± 7.1 (0 ahead, 0 behind)" in row   # a lead carries its sign


def test_adapter_folders_keep_seed_zero_where_earlier_runs_put_it(tmp_path):
    assert adapter_dir(tmp_path, "clipcap", 0) == tmp_path / "clipcap"
    assert adapter_dir(tmp_path, "clipcap", 2) == tmp_path / "clipcap-seed2"
