"""Bootstrap intervals of `nofree eval`: coverage, pairing, and the exact degenerate cases."""
from __future__ import annotations

import numpy as np
import pytest

from nofree.eval.significance import clustered_interval, compare_to, mean_interval, paired_difference


def test_the_interval_covers_the_true_mean_about_as_often_as_it_claims():
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(300):
        scores = rng.gamma(2.0, 0.25, size=40)  # skewed like per-image CIDEr; true mean 0.5
        low, high = mean_interval(scores, seed=trial)
        covered += low <= 0.5 <= high
    assert 0.88 <= covered / 300 <= 0.99


def test_more_images_give_a_narrower_interval_around_the_mean():
    rng = np.random.default_rng(1)
    few, many = rng.gamma(2.0, 0.25, size=20), rng.gamma(2.0, 0.25, size=2000)
    (a, b), (c, d) = mean_interval(few), mean_interval(many)
    assert a < few.mean() < b and c < many.mean() < d
    assert (d - c) < (b - a) / 5


def test_pairing_cancels_what_the_images_share():
    rng = np.random.default_rng(2)
    difficulty = rng.gamma(2.0, 0.25, size=40)          # how easy each photo is, for both methods
    better = difficulty + 0.05 + rng.normal(0, 0.02, size=40)
    result = paired_difference(better, difficulty)
    low, high = result["interval"]
    assert result["delta"] == pytest.approx((better - difficulty).mean())
    assert 0 < low < result["delta"] < high and result["ahead"] == 1.0 and result["n"] == 40
    unpaired = mean_interval(better)
    assert high - low < (unpaired[1] - unpaired[0]) / 5


def test_queries_drawn_by_photo_give_a_wider_interval_when_a_photo_decides_its_captions():
    rng = np.random.default_rng(3)
    photo = np.repeat(np.arange(40), 5)
    easy = rng.uniform(size=40) < 0.55                # a photo's 5 captions all hit, or all miss
    hits = easy[photo].astype(float)
    low, high = clustered_interval(hits, photo)
    naive = mean_interval(hits)
    assert low <= hits.mean() <= high and high - low > 1.5 * (naive[1] - naive[0])
    # one caption per photo: the same bootstrap as the plain one
    assert clustered_interval(hits[::5], np.arange(40)) == pytest.approx(mean_interval(hits[::5]), abs=0.03)
    with pytest.raises(ValueError, match="one group and weight per hit"):
        clustered_interval([1.0, 0.0], [0])


def test_a_weighted_ratio_is_drawn_by_whole_groups():
    rng = np.random.default_rng(1)
    photo = np.repeat(np.arange(30), 4)
    tokens = rng.integers(5, 15, size=120).astype(float)   # e.g. caption lengths
    per_token = np.where(photo % 3 == 0, 0.0, 0.3)           # a rise per token that differs by photo
    sums = per_token * tokens
    ratio = sums.sum() / tokens.sum()
    low, high = clustered_interval(sums, photo, weights=tokens)
    assert low < ratio < high and low > 0
    # a photo's captions share its rise: drawn apart, they would claim a narrower interval
    apart = clustered_interval(sums, np.arange(120), weights=tokens)
    assert high - low > 1.5 * (apart[1] - apart[0])
    # weights of 1 are the unweighted share, and a constant ratio has no spread at all
    assert clustered_interval(sums, photo, weights=np.ones(120)) == clustered_interval(sums, photo)
    assert clustered_interval(0.2 * tokens, photo, weights=tokens) == pytest.approx([0.2, 0.2])
    with pytest.raises(ValueError, match="one group and weight per hit"):
        clustered_interval(sums, photo, weights=tokens[:-1])


def test_degenerate_differences_are_exact_and_draws_are_reproducible():
    scores = [0.1, 0.7, 0.3, 0.9]
    same = paired_difference(scores, scores)
    assert same == {"delta": 0.0, "interval": [0.0, 0.0], "ahead": 0.0, "n": 4}
    shifted = paired_difference([s + 0.2 for s in scores], scores)
    assert shifted["interval"] == pytest.approx([0.2, 0.2]) and shifted["ahead"] == 1.0
    assert mean_interval(scores, seed=3) == mean_interval(scores, seed=3)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="same images"):
        paired_difference([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least 2 images"):
        mean_interval([0.5])
    with pytest.raises(KeyError, match="baseline 'retrieval'"):
        compare_to({"magic": [0.1, 0.2]}, "retrieval")
    assert set(compare_to({"retrieval": [0.1, 0.2], "magic": [0.3, 0.1]}, "retrieval")) == {"magic"}


def test_r1_intervals_hold_the_r1_of_retrieval_report():
    import torch

    from nofree.eval.retrieval import r1_intervals, retrieval_report

    owner = torch.arange(10).repeat_interleave(3)                     # 10 images, 3 captions each
    perfect = torch.nn.functional.one_hot(owner, 10).T.float()        # (images, texts)
    assert r1_intervals(perfect, owner) == {"t2i R@1 interval": [1.0, 1.0], "i2t R@1 interval": [1.0, 1.0]}
    sim = perfect + torch.randn(10, 30, generator=torch.Generator().manual_seed(0))
    report, intervals = retrieval_report(sim, owner), r1_intervals(sim, owner)
    for way in ("t2i", "i2t"):
        low, high = intervals[f"{way} R@1 interval"]
        assert 0 <= low < report[way]["R@1"] < high <= 1
