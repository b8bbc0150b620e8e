"""The anchor scan's C helpers (nofree/anchors/scan_kernels.c) against their torch twins, bit for
bit, and the fallback when no compiler is around."""
from __future__ import annotations

import logging

import pytest
import torch
from torch.nn.functional import normalize

import nofree.anchors.native as native
import nofree.anchors.topk as topk
from nofree.anchors.topk import cosine_topk

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lib():
    found = native.library()
    if found is None:
        pytest.skip("no C compiler: the torch versions are the ones in use (tested everywhere else)")
    return found


@pytest.fixture
def fresh_library():
    """Forget the loaded library before and after (the test changes how it is found)."""
    native.library.cache_clear()
    yield
    native.library.cache_clear()


def torch_only(monkeypatch):
    monkeypatch.setattr(topk, "_native", lambda device: None)


def take_all(codec, tiles, thr, qscale):
    """Run a _Taker over (tile, col0) pairs; the store's triples and the histogram."""
    hist = torch.zeros(thr.shape[0], topk._N_BINS, dtype=torch.int32)
    store = topk._Candidates(64, torch.device("cpu"))  # tiny: growth is exercised too
    take = topk._Taker(codec, qscale, hist, store)
    for s, col0 in tiles:
        take(s, thr, qscale, col0)
    return tuple(t.clone() for t in store.arrays()), hist


@pytest.mark.parametrize("width", [2048, 37])
def test_take_int8_tiles_matches_torch(lib, monkeypatch, width):
    g = torch.Generator().manual_seed(0)
    tiles = [(torch.randint(-40000, 40000, (64, width), generator=g, dtype=torch.int32), c0)
             for c0 in (0, width, 5 * width)]
    thr = torch.quantile(tiles[0][0].float(), torch.linspace(0.5, 0.999, 64), dim=1).diagonal().to(torch.int32)
    thr[3] = torch.iinfo(torch.int32).min          # a cold row: everything passes
    thr[4] = torch.iinfo(torch.int32).max          # nothing passes
    qscale = torch.rand(64, generator=g, dtype=torch.float64) * 1e-4
    ours, hist = take_all(topk._Int8, tiles, thr, qscale)
    torch_only(monkeypatch)
    ref, ref_hist = take_all(topk._Int8, tiles, thr, qscale)
    assert ours[0].numel() > 64 * 3 * width // 100     # a real share of entries was taken
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    assert torch.equal(hist, ref_hist)
    assert int(hist.sum()) == ours[0].numel()


@pytest.mark.parametrize("width", [4096, 50])
def test_take_bf16_tiles_matches_torch(lib, monkeypatch, width):
    g = torch.Generator().manual_seed(1)
    tiles = [((torch.rand(32, width, generator=g) * 2 - 0.5).to(torch.bfloat16), c0) for c0 in (0, 7 * width)]
    thr = torch.linspace(0.05, 1.4, 32).to(torch.bfloat16)   # positive: compared as int16 patterns
    ours, hist = take_all(topk._Bf16, tiles, thr, torch.ones(32, dtype=torch.float64))
    torch_only(monkeypatch)
    ref, ref_hist = take_all(topk._Bf16, tiles, thr, torch.ones(32, dtype=torch.float64))
    assert ours[0].numel() > 0
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    assert torch.equal(hist, ref_hist)


def test_prune_matches_torch(lib, monkeypatch):
    g = torch.Generator().manual_seed(2)
    rows = torch.randint(0, 50, (10_000,), generator=g, dtype=torch.int32)
    cols = torch.randint(0, 1 << 30, (10_000,), generator=g, dtype=torch.int32)
    vals = torch.randn(10_000, generator=g)
    vals[::97] = float("nan")                               # never kept
    level = torch.randn(50, generator=g)
    level[7] = float("-inf")                                # keeps every non-NaN entry of row 7
    stores = []
    for use_native in (True, False):
        if not use_native:
            torch_only(monkeypatch)
        store = topk._Candidates(20_000, torch.device("cpu"))
        store.append(rows, cols, vals)
        store.prune(level)
        stores.append(store.arrays())
    for a, b in zip(*stores):
        assert torch.equal(a, b)
    assert 0 < stores[0][0].numel() < 10_000


def test_kth_bins_matches_torch(lib, monkeypatch):
    g = torch.Generator().manual_seed(3)
    hist = torch.randint(0, 3, (40, topk._N_BINS), generator=g, dtype=torch.int32)
    hist[5] = 0                                             # never reaches k
    cases = [(k, lo) for k in (1, 50, 3000, 10_000) for lo in (0, 1500, topk._N_BINS - 1)]
    ours = [topk._kth_bins(hist, k, lo) for k, lo in cases]
    torch_only(monkeypatch)
    for (k, lo), got in zip(cases, ours):
        assert torch.equal(got, topk._kth_bins(hist, k, lo)), (k, lo)
    assert int(ours[1][5]) == -1 and (ours[1] >= 0).sum() == 39


def test_quantize_rounds_half_to_even_like_torch(lib, monkeypatch):
    g = torch.Generator().manual_seed(4)
    a = torch.cat([torch.randn(5000, generator=g) * 0.1,
                   torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 127.5, -127.5, 300.0, -300.0]) * 0.01])
    a = a.view(-1, 10).contiguous()
    ours = topk._Int8.quantize_anchors(a, 0.01)
    torch_only(monkeypatch)
    ref = topk._Int8.quantize_anchors(a, 0.01)
    assert ours.dtype == torch.int8 and torch.equal(ours, ref)
    assert ref.view(-1)[-10:].tolist() == [0, 2, 2, 0, -2, 126, 127, -127, 127, -127]


def test_top_per_row_matches_torch_with_ties(lib, monkeypatch):
    g = torch.Generator().manual_seed(5)
    rows = torch.arange(30).repeat_interleave(40).to(torch.int32)
    cols = torch.randperm(5000, generator=g)[:1200].to(torch.int32)
    vals = torch.randint(0, 6, (1200,), generator=g).float() / 4     # many exact ties
    vals[::11] = -0.0                                                # -0.0 ties with +0.0
    perm = torch.randperm(1200, generator=g)
    ours = topk._top_per_row(rows[perm], cols[perm], vals[perm], 30, 25)   # any input order
    with pytest.raises(RuntimeError, match="fewer than k"):
        topk._top_per_row(rows, cols, vals, 30, 41)
    torch_only(monkeypatch)
    order = cols.long().argsort()                                    # the torch twin wants id order
    ref = topk._top_per_row(rows[order], cols[order], vals[order], 30, 25)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    v, i = ours
    assert (v[:, :-1] >= v[:, 1:]).all()
    assert ((v[:, :-1] != v[:, 1:]) | (i[:, :-1] < i[:, 1:])).all()   # ties by increasing id
    with pytest.raises(RuntimeError, match="fewer than k"):
        topk._top_per_row(rows, cols, vals, 30, 41)


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_scan_identical_with_and_without_native(lib, monkeypatch, precision):
    g = torch.Generator().manual_seed(6)
    centers = torch.randn(8, 48, generator=g)
    anchors = normalize(centers[torch.randint(0, 8, (6000,), generator=g)] + torch.randn(6000, 48, generator=g), dim=1)
    query = normalize(centers[torch.randint(0, 8, (70,), generator=g)] + torch.randn(70, 48, generator=g), dim=1)
    ours = cosine_topk(query, anchors, 60, precision=precision, anchor_chunk=512, query_chunk=32)
    torch_only(monkeypatch)
    ref = cosine_topk(query, anchors, 60, precision=precision, anchor_chunk=512, query_chunk=32)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    exact = (query.double() @ anchors.double().T).topk(60, dim=1)
    same = [set(a.tolist()) == set(b.tolist()) for a, b in zip(ours[1], exact.indices)]
    assert sum(same) >= 68      # float32 rounding may swap near-equal anchors at the boundary


def test_no_compiler_falls_back_to_torch(fresh_library, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="nofree.anchors.native"):
        assert native.library() is None
    assert "native scan helpers are unavailable" in caplog.text and "no-such-cc" in caplog.text
    assert not list((tmp_path / "cache").rglob("*.so"))
    g = torch.Generator().manual_seed(7)
    anchors = normalize(torch.randn(3000, 32, generator=g), dim=1)
    query = normalize(torch.randn(20, 32, generator=g), dim=1)
    _, idx = cosine_topk(query, anchors, 25, precision="int8", anchor_chunk=256)
    _, ref = cosine_topk(query, anchors, 25, precision="fp32")
    assert torch.equal(idx, ref)


def test_unwritable_cache_falls_back_with_a_warning(fresh_library, monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("NOFREE_CACHE", str(blocker))
    with caplog.at_level(logging.WARNING, logger="nofree.anchors.native"):
        assert native.library() is None
    assert "cannot write the library" in caplog.text


def test_missing_source_falls_back_with_a_warning(fresh_library, monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "SOURCE", tmp_path / "gone.c")
    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="nofree.anchors.native"):
        assert native.library() is None
    assert "cannot read" in caplog.text and "gone.c" in caplog.text


def test_disabled_by_environment(fresh_library, monkeypatch, caplog):
    monkeypatch.setenv("NOFREE_NATIVE", "0")
    with caplog.at_level(logging.WARNING, logger="nofree.anchors.native"):
        assert native.library() is None
    assert caplog.text == ""


def test_built_once_then_loaded_from_the_cache(lib, fresh_library, monkeypatch, tmp_path):
    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path))
    first = native.library()
    assert first is not None
    built = list(tmp_path.rglob("*"))
    assert [p.name for p in built if p.is_file()] == ["scan_kernels.so"]  # no temporary left
    native.library.cache_clear()
    monkeypatch.setattr(native, "_compile", lambda *a: pytest.fail("rebuilt a cached library"))
    assert native.library() is not None
