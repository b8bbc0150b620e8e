"""The benchmarks' cross-validation folds (benchmarks.folds.photo_folds): disjoint, covering, dealt as documented;
and the folders the training sections work in."""
from __future__ import annotations

import pytest
import torch

from benchmarks import work_folder
from benchmarks.folds import photo_folds


def _shuffle(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("deal", ["round-robin", "contiguous"])
@pytest.mark.parametrize("n, folds", [(140, 5), (11, 3), (4, 4), (5, 1)])
def test_folds_are_disjoint_and_cover_every_photo(deal, n, folds):
    out = photo_folds(n, folds, deal=deal)
    assert len(out) == folds
    held = [h.tolist() for h, _ in out]
    assert sorted(row for h in held for row in h) == list(range(n))
    sizes = [len(h) for h in held]
    assert max(sizes) - min(sizes) <= 1
    order = _shuffle(n, 0)
    for h, kept in out:
        assert h.dtype == kept.dtype == torch.long
        assert set(h.tolist()).isdisjoint(kept.tolist())
        assert kept.tolist() == [row for row in order if row not in set(h.tolist())]


def test_round_robin_deals_the_shuffle_in_turn():
    order = _shuffle(11, 3)
    out = photo_folds(11, 3, seed=3, deal="round-robin")
    assert [h.tolist() for h, _ in out] == [order[0::3], order[1::3], order[2::3]]


def test_contiguous_cuts_the_shuffle_into_runs():
    order = _shuffle(11, 3)
    out = photo_folds(11, 3, seed=3, deal="contiguous")
    # cuts at round(i * 11 / 3) = 0, 4, 7, 11
    assert [h.tolist() for h, _ in out] == [order[0:4], order[4:7], order[7:11]]
    # kept is the other folds' photos, fold by fold
    assert out[1][1].tolist() == order[0:4] + order[7:11]


def test_dealt_holds_out_only_the_first_photos_of_the_shuffle():
    order = _shuffle(140, 0)
    out = photo_folds(140, 2, deal="round-robin", dealt=4)
    assert [h.tolist() for h, _ in out] == [order[0:4:2], order[1:4:2]]
    assert [len(kept) for _, kept in out] == [138, 138]


def test_folds_are_deterministic_and_depend_on_the_seed():
    for deal in ("round-robin", "contiguous"):
        first, again = photo_folds(30, 4, seed=5, deal=deal), photo_folds(30, 4, seed=5, deal=deal)
        assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(first, again))
        other = photo_folds(30, 4, seed=6, deal=deal)
        assert any(not torch.equal(a, b) for (a, _), (b, _) in zip(first, other))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="deal"):
        photo_folds(10, 2, deal="random")
    with pytest.raises(ValueError, match="folds"):
        photo_folds(3, 4)
    with pytest.raises(ValueError, match="folds"):
        photo_folds(10, 0)
    with pytest.raises(ValueError, match="dealt"):
        photo_folds(10, 2, dealt=11)


def test_a_smoke_sections_work_folder_is_deleted_and_a_full_runs_is_kept(tmp_path, monkeypatch):
    from nofree.cache import default_cache_root

    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path / "user-cache"))
    with work_folder(None, smoke=True, default="unused", prefix="nofree-test-") as work:
        assert work.is_dir() and work.name.startswith("nofree-test-")
        assert default_cache_root() == work / "cache"  # the tiny backbones' embeddings go with them
        (work / "adapter.safetensors").write_bytes(b"x" * 1024)
    assert not work.exists()  # a smoke run leaves no adapters behind
    assert default_cache_root() == tmp_path / "user-cache"
    given = tmp_path / "given"
    with work_folder(given, smoke=True, default="unused", prefix="nofree-test-") as work:
        assert work == given
        work.mkdir()
    assert given.is_dir()  # --work is the user's: kept, smoke or not
    with work_folder(None, smoke=False, default=str(tmp_path / "runs"), prefix="nofree-test-") as work:
        assert work == tmp_path / "runs"
