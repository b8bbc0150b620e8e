"""nofree's C kernels: the anchor scan's helpers (nofree/kernels/select.c, int8_gemm.c) against
their torch twins, bit for bit; how the library is built, cached and trusted, and the fallback
when no compiler is around; and the bindings' checks of what they hand to C."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch.nn.functional import normalize

from nofree.anchors.search import exact
from nofree.anchors.search.exact import cosine_topk
from nofree.anchors.search.int8_gemm import Int8Products
from nofree.anchors.search.precision import Bf16Codec, Int8Codec
from nofree.kernels import bindings, build

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lib():
    found = build.library()
    if found is None:
        pytest.skip("no C compiler: the torch versions are the ones in use (tested everywhere else)")
    return found


@pytest.fixture
def fresh_library():
    """Forget the loaded library before and after (the test changes how it is found)."""
    build.library.cache_clear()
    yield
    build.library.cache_clear()


def torch_only(monkeypatch):
    monkeypatch.setattr(bindings, "available", lambda device="cpu": False)


def take_all(codec, tiles, thr, qscale):
    """Run a _Taker over (tile, col0) pairs; the store's triples and the histogram."""
    hist = torch.zeros(thr.shape[0], exact._N_BINS, dtype=torch.int32)
    store = exact._Candidates(64, torch.device("cpu"))  # tiny: growth is exercised too
    take = exact._Taker(codec, qscale, hist, store)
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
    ours, hist = take_all(Int8Codec, tiles, thr, qscale)
    torch_only(monkeypatch)
    ref, ref_hist = take_all(Int8Codec, tiles, thr, qscale)
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
    ours, hist = take_all(Bf16Codec, tiles, thr, torch.ones(32, dtype=torch.float64))
    torch_only(monkeypatch)
    ref, ref_hist = take_all(Bf16Codec, tiles, thr, torch.ones(32, dtype=torch.float64))
    assert ours[0].numel() > 0
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    assert torch.equal(hist, ref_hist)


@pytest.mark.parametrize("threads", [1, 3])
def test_prune_matches_torch(lib, monkeypatch, threads):
    n = 200_000                                             # several 65,536-entry shares
    g = torch.Generator().manual_seed(2)
    rows = torch.randint(0, 50, (n,), generator=g, dtype=torch.int32)
    cols = torch.randint(0, 1 << 30, (n,), generator=g, dtype=torch.int32)
    vals = torch.randn(n, generator=g)
    vals[::97] = float("nan")                               # never kept
    level = torch.randn(50, generator=g)
    level[7] = float("-inf")                                # keeps every non-NaN entry of row 7
    stores = []
    torch.set_num_threads(threads)                          # (the one_thread fixture restores it)
    for use_native in (True, False):
        if not use_native:
            torch_only(monkeypatch)
        store = exact._Candidates(2 * n, torch.device("cpu"))
        store.append(rows, cols, vals)
        store.prune(level)
        stores.append(store.arrays())
    for a, b in zip(*stores):
        assert torch.equal(a, b)
    assert 0 < stores[0][0].numel() < n


def test_kth_bins_matches_torch(lib, monkeypatch):
    g = torch.Generator().manual_seed(3)
    hist = torch.randint(0, 3, (40, exact._N_BINS), generator=g, dtype=torch.int32)
    hist[5] = 0                                             # never reaches k
    cases = [(k, lo) for k in (1, 50, 3000, 10_000) for lo in (0, 1500, exact._N_BINS - 1)]
    ours = [exact._kth_bins(hist, k, lo) for k, lo in cases]
    torch_only(monkeypatch)
    for (k, lo), got in zip(cases, ours):
        assert torch.equal(got, exact._kth_bins(hist, k, lo)), (k, lo)
    assert int(ours[1][5]) == -1 and (ours[1] >= 0).sum() == 39


def test_quantize_rounds_half_to_even_like_torch(lib, monkeypatch):
    g = torch.Generator().manual_seed(4)
    a = torch.cat([torch.randn(5000, generator=g) * 0.1,
                   torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 127.5, -127.5, 300.0, -300.0]) * 0.01])
    a = a.view(-1, 10).contiguous()
    ours = Int8Codec.quantize_anchors(a, 0.01)
    torch_only(monkeypatch)
    ref = Int8Codec.quantize_anchors(a, 0.01)
    assert ours.dtype == torch.int8 and torch.equal(ours, ref)
    assert ref.view(-1)[-10:].tolist() == [0, 2, 2, 0, -2, 126, 127, -127, 127, -127]


@pytest.mark.parametrize("threads", [1, 3])
def test_top_per_row_matches_torch_with_ties(lib, monkeypatch, threads):
    torch.set_num_threads(threads)                          # rows sorted in shares by C threads
    g = torch.Generator().manual_seed(5)
    rows = torch.arange(30).repeat_interleave(40).to(torch.int32)
    cols = torch.randperm(5000, generator=g)[:1200].to(torch.int32)
    vals = torch.randint(0, 6, (1200,), generator=g).float() / 4     # many exact ties
    vals[::11] = -0.0                                                # -0.0 ties with +0.0
    perm = torch.randperm(1200, generator=g)
    ours = exact._top_per_row(rows[perm], cols[perm], vals[perm], 30, 25)   # any input order
    with pytest.raises(RuntimeError, match="fewer than k"):
        exact._top_per_row(rows, cols, vals, 30, 41)
    torch_only(monkeypatch)
    order = cols.long().argsort()                                    # the torch twin wants id order
    ref = exact._top_per_row(rows[order], cols[order], vals[order], 30, 25)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    v, i = ours
    assert (v[:, :-1] >= v[:, 1:]).all()
    assert ((v[:, :-1] != v[:, 1:]) | (i[:, :-1] < i[:, 1:])).all()   # ties by increasing id
    with pytest.raises(RuntimeError, match="fewer than k"):
        exact._top_per_row(rows, cols, vals, 30, 41)


@pytest.mark.parametrize("k", [1, 7, 60])
def test_top_per_row_selection_matches_torch_on_ragged_rows(lib, monkeypatch, k):
    """Rows of very different lengths (k of them up to 50k), values with many ties, any order."""
    g = torch.Generator().manual_seed(12)
    sizes = [k, k + 1, 2 * k, 997, 50_000, k + 3]
    rows = torch.cat([torch.full((m,), r, dtype=torch.int32) for r, m in enumerate(sizes)])
    cols = torch.cat([torch.randperm(100_000, generator=g)[:m] for m in sizes]).to(torch.int32)
    vals = torch.randint(0, 50, (rows.numel(),), generator=g).float()
    perm = torch.randperm(rows.numel(), generator=g)
    torch.set_num_threads(2)
    ours = exact._top_per_row(rows[perm], cols[perm], vals[perm], len(sizes), k)
    torch_only(monkeypatch)
    order = cols.long().argsort()
    ref = exact._top_per_row(rows[order], cols[order], vals[order], len(sizes), k)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


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
    reference = (query.double() @ anchors.double().T).topk(60, dim=1)
    same = [set(a.tolist()) == set(b.tolist()) for a, b in zip(ours[1], reference.indices)]
    assert sum(same) >= 68      # float32 rounding may swap near-equal anchors at the boundary


def test_no_compiler_falls_back_to_torch(fresh_library, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="nofree.kernels.build"):
        assert build.library() is None
    assert "native kernels are unavailable" in caplog.text and "no-such-cc" in caplog.text
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
    with caplog.at_level(logging.WARNING, logger="nofree.kernels.build"):
        assert build.library() is None
    assert "cannot write the library" in caplog.text


def test_missing_source_falls_back_with_a_warning(fresh_library, monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(build, "SOURCES", (build.SOURCES[0], tmp_path / "gone.c"))
    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="nofree.kernels.build"):
        assert build.library() is None
    assert "cannot read" in caplog.text and "gone.c" in caplog.text


def test_disabled_by_environment(fresh_library, monkeypatch, caplog):
    monkeypatch.setenv("NOFREE_NATIVE", "0")
    with caplog.at_level(logging.WARNING, logger="nofree.kernels.build"):
        assert build.library() is None
    assert caplog.text == ""


def test_built_once_then_loaded_from_the_cache(lib, fresh_library, monkeypatch, tmp_path):
    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path))
    first = build.library()
    assert first is not None
    built = list(tmp_path.rglob("*"))
    assert sorted(p.name for p in built if p.is_file()) == [build.LIBRARY, build.RECORD]  # no temporary left
    build.library.cache_clear()
    monkeypatch.setattr(build, "_compile", lambda *a: pytest.fail("rebuilt a cached library"))
    assert build.library() is not None


def test_a_library_nofree_did_not_build_is_rebuilt_not_loaded(lib, fresh_library, monkeypatch, tmp_path,
                                                              caplog):
    import types

    class Unloaded:  # stands in for the loaded library: this process never maps the files here
        def __getattr__(self, name):
            return types.SimpleNamespace()

    loaded = []
    monkeypatch.setattr(build.ctypes, "CDLL", lambda path: loaded.append(Path(path).read_bytes()) or Unloaded())
    monkeypatch.setenv("NOFREE_CACHE", str(tmp_path))
    assert build.library() is not None
    [target] = tmp_path.rglob(build.LIBRARY)
    built = target.read_bytes()
    target.write_bytes(b"\x7fELF not the library nofree built")  # loading it would run its code
    build.library.cache_clear()
    with caplog.at_level(logging.WARNING, logger="nofree.kernels.build"):
        assert build.library() is not None
    assert "is not the library nofree built" in caplog.text
    assert loaded == [built, built] and target.read_bytes() == built  # rebuilt; only that was loaded
    (target.parent / build.RECORD).unlink()  # a library without its record is not trusted either
    build.library.cache_clear()
    monkeypatch.setattr(build, "_compile", lambda *a: "no compiler here")
    assert build.library() is None and len(loaded) == 2


def test_a_cache_writable_by_others_is_warned_about(lib, fresh_library, monkeypatch, tmp_path, caplog):
    cache = tmp_path / "shared"
    cache.mkdir()
    cache.chmod(0o777)
    monkeypatch.setenv("NOFREE_CACHE", str(cache))
    with caplog.at_level(logging.WARNING, logger="nofree.kernels.build"):
        assert build.library() is not None
    assert f"{cache} is writable by other users (mode drwxrwxrwx)" in caplog.text


# --- the int8 products in C (AVX-512 VNNI), plain and with the selection fused in ----------------

@pytest.fixture(scope="module")
def vnni(lib):
    if bindings.int8_tile() is None:
        pytest.skip("this CPU has no AVX-512 VNNI: the int8 scan uses torch._int_mm (tested everywhere else)")
    return lib


def int8_case(seed, n_rows, n_cols, dim):
    """int8 query rows (with the extremes ±127), float anchors and their int8 scale."""
    g = torch.Generator().manual_seed(seed)
    q8 = torch.randint(-127, 128, (n_rows, dim), generator=g, dtype=torch.int8)
    q8[0, :] = 127
    if n_rows > 1:
        q8[1, :] = -127
    a = torch.randn(n_cols, dim, generator=g)
    scale = float(a.abs().max()) / 127
    return q8, a, scale


@pytest.mark.parametrize("shape", [(1, 1, 4), (13, 47, 37), (17, 49, 16), (40, 200, 771)])
def test_int8_products_equal_exact_integer_products(vnni, shape):
    q8, a, scale = int8_case(7, *shape)
    a8 = Int8Codec.quantize_anchors(a, scale)          # what the scan's error bound assumes
    expected = q8.long() @ a8.long().T
    products = Int8Products(q8)
    for threads in (1, 3):
        products.threads = threads
        got = products.scores(products.pack(a, scale))
        assert got.dtype == torch.int32 and torch.equal(got.long(), expected)


def test_int8_pack_rounds_like_the_codec(vnni):
    """Half-way values round to even, out-of-range ones clamp, in the packed layout too."""
    halves = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 127.5, -127.5, 300.0, -300.0]) * 0.01
    g = torch.Generator().manual_seed(8)
    a = torch.cat([halves, torch.randn(22, generator=g) * 0.3]).view(2, 16)
    products = Int8Products(torch.eye(16, dtype=torch.int8))   # scores = the anchors themselves
    got = products.scores(products.pack(a, 0.01))
    assert torch.equal(got.T, Int8Codec.quantize_anchors(a, 0.01).int())
    assert got.T[0, :10].tolist() == [0, 2, 2, 0, -2, 126, 127, -127, 127, -127]


@pytest.mark.parametrize("threads", [1, 3])
def test_fused_int8_take_matches_taking_from_the_tile(vnni, threads):
    q8, a, scale = int8_case(9, 45, 301, 64)
    products = Int8Products(q8)
    products.threads = threads
    packed = products.pack(a, scale)
    tile = products.scores(packed)
    thr = torch.quantile(tile.float(), torch.linspace(0.3, 0.999, 45), dim=1).diagonal().to(torch.int32)
    thr[3] = torch.iinfo(torch.int32).min          # a cold row: everything passes
    thr[4] = torch.iinfo(torch.int32).max          # nothing passes
    qscale = torch.rand(45, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1e-4
    ref, ref_hist = take_all(Int8Codec, [(tile, 5000)], thr, qscale)
    hist = torch.zeros(45, exact._N_BINS, dtype=torch.int32)
    store = exact._Candidates(8, torch.device("cpu"))
    store.append(*(t[:5] for t in ref))            # entries already held stay in front
    products.take(packed, thr, 5000, qscale.float().contiguous(),
                  bindings.Histogram(hist, exact._BIN_LO, exact._BIN_W), store)
    rows, cols, vals = store.arrays()
    assert all(torch.equal(t[:5], r[:5]) for t, r in zip((rows, cols, vals), ref))
    # the same triples (fused: tile by tile, not row by row) and the same histogram
    got = sorted(zip(rows[5:].tolist(), cols[5:].tolist(), vals[5:].tolist()))
    assert got == sorted(zip(*(t.tolist() for t in ref))) and len(got) > 45 * 301 // 10
    assert torch.equal(hist, ref_hist)


def test_scan_identical_with_and_without_fused_int8(vnni, monkeypatch):
    g = torch.Generator().manual_seed(10)
    anchors = normalize(torch.randn(5000, 40, generator=g), dim=1)
    query = normalize(anchors[:50] + 0.3 * torch.randn(50, 40, generator=g), dim=1)
    calls, take = [], Int8Products.take
    monkeypatch.setattr(Int8Products, "take", lambda self, *a, **kw: calls.append(1) or take(self, *a, **kw))
    fused = cosine_topk(query, anchors, 30, precision="int8", anchor_chunk=700, query_chunk=20)
    assert len(calls) == 3 * 7                     # every chunk after each block's first
    monkeypatch.setattr(Int8Products, "create", staticmethod(lambda q8: None))
    plain = cosine_topk(query, anchors, 30, precision="int8", anchor_chunk=700, query_chunk=20)
    assert torch.equal(fused[0], plain[0]) and torch.equal(fused[1], plain[1])
    reference = cosine_topk(query, anchors, 30, precision="fp32")
    assert torch.equal(fused[1], reference[1])


# --- the bindings: one module hands tensors to C, and checks them first -----------------------------

def test_only_the_bindings_hand_memory_to_c():
    package = Path(build.__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(package).as_posix()
        if name != "kernels/bindings.py":
            assert ".data_ptr()" not in text, f"{name} passes a tensor's memory to C: go through kernels/bindings.py"
        if name not in ("kernels/bindings.py", "kernels/build.py"):
            assert "ctypes" not in text, f"{name} uses ctypes: go through kernels/bindings.py"


def test_the_int8_tile_is_two_explicit_sizes(lib):
    tile = bindings.int8_tile()
    assert tile is None or (len(tile) == 2 and all(isinstance(n, int) and n > 0 for n in tile))


def test_bindings_refuse_what_the_c_code_cannot_take(lib):
    tile = torch.zeros(4, 32, dtype=torch.int32)
    thr, qscale = torch.zeros(4, dtype=torch.int32), torch.ones(4)
    hist = bindings.Histogram(torch.zeros(4, 8, dtype=torch.int32), -1.0, 0.25)
    room = 4 * 32 + bindings.GROUP
    out = bindings.Triples(torch.empty(room, dtype=torch.int32), torch.empty(room, dtype=torch.int32),
                           torch.empty(room))
    assert bindings.take_tile(tile, thr, qscale, 0, hist, out, 0) == 4 * 32   # all pass a threshold of 0
    with pytest.raises(ValueError, match="take_tile: thresholds must be torch.int32, got torch.int64"):
        bindings.take_tile(tile, thr.long(), qscale, 0, hist, out, 0)
    with pytest.raises(ValueError, match=r"take_tile: qscale must have shape \(4\), got \(3,\)"):
        bindings.take_tile(tile, thr, qscale[:3], 0, hist, out, 0)
    with pytest.raises(ValueError, match="take_tile: scores must have rows of unit stride"):
        bindings.take_tile(tile.T, torch.zeros(32, dtype=torch.int32), torch.ones(32),
                           0, bindings.Histogram(torch.zeros(32, 8, dtype=torch.int32), -1.0, 0.25), out, 0)
    with pytest.raises(ValueError, match="too few for 1 held plus 144"):      # no room: reserve first
        bindings.take_tile(tile, thr, qscale, 0, hist, out, 1)
    with pytest.raises(ValueError, match="kth_bins: counts must be contiguous"):
        bindings.kth_bins(torch.zeros(8, 4, dtype=torch.int32).T, 1, 0)
    with pytest.raises(ValueError, match="quantize_int8: values must be on the CPU"):
        bindings.quantize_int8(torch.zeros(3, device="meta"), 0.1)
    with pytest.raises(TypeError, match="prune: level must be a tensor"):
        bindings.prune(out, 0, [0.0])
    with pytest.raises(ValueError, match="top_per_row: row 1 has fewer than k = 2 entries"):
        bindings.top_per_row(torch.tensor([0, 0], dtype=torch.int32), torch.tensor([3, 4], dtype=torch.int32),
                             torch.tensor([0.5, 0.25]), 2, 2)
    qkv = torch.zeros(3, 3, 2, 8)
    offsets = torch.tensor([0, 1, 2, 3])
    cols = torch.tensor([0, 1, 2], dtype=torch.int32)
    assert bindings.list_attention(qkv, None, offsets, cols, None, 1).shape == (3, 2, 8)
    with pytest.raises(ValueError, match=r"list_attention: offsets must have shape \(4\), got \(3,\)"):
        bindings.list_attention(qkv, None, offsets[:3], cols, None, 1)
    with pytest.raises(ValueError, match=r"list_attention: past keys must have shape \(1, 2, \*, 8\)"):
        bindings.list_attention(qkv, (torch.zeros(2, 2, 5, 8), torch.zeros(2, 2, 5, 8)), offsets, cols, None, 1)


def test_int8_bindings_check_the_packed_buffers(vnni):
    queries = bindings.int8_pack_queries(torch.ones(5, 20, dtype=torch.int8))
    buffer = torch.empty(bindings.int8_anchor_bytes(10, 20), dtype=torch.uint8)
    bindings.int8_pack_anchors(torch.rand(10, 20), 0.01, buffer)
    assert bindings.int8_scores(queries, buffer, 10).shape == (5, 10)
    with pytest.raises(ValueError, match="int8_scores: the packed anchors hold"):
        bindings.int8_scores(queries, buffer, 1000)
    with pytest.raises(ValueError, match="int8_pack_anchors: out holds"):
        bindings.int8_pack_anchors(torch.rand(100, 20), 0.01, buffer)
    with pytest.raises(TypeError, match="int8_scores: queries must come from int8_pack_queries"):
        bindings.int8_scores(torch.ones(5, 20, dtype=torch.int8), buffer, 10)
