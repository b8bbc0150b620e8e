"""ASIF relative representations and estimator against a plain dense implementation."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn.functional import normalize

import nofree.anchors.relative as rel
from nofree.anchors.asif import ASIF, default_k
from nofree.anchors.relative import relative_topk, sparse_similarity
from nofree.anchors.search import exact as exact_search
from nofree.anchors.search import precision as scan_precision
from nofree.anchors.search.exact import cosine_topk
from nofree.anchors.search.int8_gemm import Int8Products
from nofree.core import DataError, NofreeError
from nofree.kernels import bindings


@pytest.fixture(autouse=True)
def one_thread():
    # many tiny ops: a second thread only adds synchronisation cost on a busy machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dense_rho(x: torch.Tensor, anchors: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """The paper's recipe, written out densely in float64 (signed power)."""
    cos = normalize(x.double(), dim=1) @ normalize(anchors.double(), dim=1).T
    v, i = cos.topk(k, dim=1)
    v = v / v.abs().amax(dim=1, keepdim=True)
    v = v.sign() * v.abs() ** p
    v = v / v.norm(dim=1, keepdim=True)
    return torch.zeros_like(cos).scatter_(1, i, v)


def clustered(n: int, d: int, seed: int, n_clusters: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, d, generator=g)
    x = centers[torch.randint(0, n_clusters, (n,), generator=g)] + 0.7 * torch.randn(n, d, generator=g)
    return normalize(x + 2.0 * torch.ones(d) / math.sqrt(d), dim=1)  # anisotropic, like real spaces


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(300, 16, generator=g), "text": torch.randn(300, 12, generator=g),
            "qi": torch.randn(25, 16, generator=g), "qt": torch.randn(9, 12, generator=g)}


@pytest.mark.parametrize("p", [8.0, 3.5, 1.0])
def test_matches_dense_reference(data, p):
    asif = ASIF.paper(k=40, p=p).fit((data["image"], data["text"]))  # the paper's math: no centring, no CSLS
    rho_i = asif.transform(data["qi"], modality="image")
    rho_t = asif.transform(data["qt"], modality="text")
    ref_i, ref_t = dense_rho(data["qi"], data["image"], 40, p), dense_rho(data["qt"], data["text"], 40, p)
    torch.testing.assert_close(rho_i.to_dense().double(), ref_i, atol=1e-6, rtol=0)
    torch.testing.assert_close(rho_t.to_dense().double(), ref_t, atol=1e-6, rtol=0)
    sim = asif.similarity(data["qi"], data["qt"])
    assert sim.shape == (25, 9) and sim.dtype == torch.float32
    torch.testing.assert_close(sim.double(), ref_i @ ref_t.T, atol=1e-5, rtol=0)
    assert torch.equal(asif.predict(data["qi"], data["qt"]), (ref_i @ ref_t.T).argmax(dim=1))


def test_rows_are_sparse_unit_and_sorted(data):
    rho = ASIF(k=17).fit((data["image"], data["text"])).transform(data["qi"], modality="image")
    dense = rho.to_dense()
    assert ((dense != 0).sum(dim=1) <= 17).all()
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(25))
    assert (rho.cosines[:, :-1] >= rho.cosines[:, 1:]).all()  # decreasing cosine
    assert rho.indices.unique(dim=1).shape == rho.indices.shape or all(
        len(set(r.tolist())) == 17 for r in rho.indices)


def test_signed_power_keeps_negative_cosines_negative():
    g = torch.Generator().manual_seed(3)
    anchors, query = torch.randn(10, 6, generator=g), torch.randn(4, 6, generator=g)
    rho = relative_topk(normalize(query, dim=1), normalize(anchors, dim=1), 10, 8.0)
    assert (rho.cosines < 0).any()
    assert torch.equal(rho.values.sign(), rho.cosines.sign())
    torch.testing.assert_close(rho.to_dense().double(), dense_rho(query, anchors, 10, 8.0), atol=1e-6, rtol=0)


def test_power_does_not_underflow():
    cos = torch.tensor([[1e-5, 5e-6, -2e-6]])
    v = rel.power_normalize(cos, 8.0)
    assert torch.isfinite(v).all() and v[0, 0] > 0.99 and v.norm() == pytest.approx(1.0)


def test_invariant_to_anchor_order(data):
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    a = ASIF(k=30).fit((data["image"], data["text"])).similarity(data["qi"], data["qt"])
    b = ASIF(k=30).fit((data["image"][perm], data["text"][perm])).similarity(data["qi"], data["qt"])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_chunked_equals_unchunked(data, precision):
    x, anchors = normalize(data["qi"], dim=1), normalize(data["image"], dim=1)
    v0, i0 = cosine_topk(x, anchors, 20, precision="fp32")
    v1, i1 = cosine_topk(x, anchors, 20, precision=precision, anchor_chunk=23, query_chunk=4)
    assert torch.equal(i0, i1)
    torch.testing.assert_close(v0, v1, atol=1e-6, rtol=0)


def _fp64_topk_sets(x, anchors, k):
    cos = x.double() @ anchors.double().T
    top = cos.topk(k + 1, dim=1).values
    clear = (top[:, k - 1] - top[:, k]) > 1e-6  # rows without a float32-level tie at the boundary
    return cos.topk(k, dim=1).indices, clear


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_low_precision_candidates_give_exact_topk(precision):
    anchors, x = clustered(3000, 32, seed=1), clustered(40, 32, seed=2)
    ref, clear = _fp64_topk_sets(x, anchors, 30)
    assert clear.sum() >= 38
    _, idx = cosine_topk(x, anchors, 30, precision=precision, anchor_chunk=256, query_chunk=16)
    for r in range(40):
        if clear[r]:
            assert set(idx[r].tolist()) == set(ref[r].tolist()), f"row {r}"


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_low_precision_exact_on_near_ties(precision):
    """120 anchors whose cosines with the query differ by 5e-5, well below bf16/int8 resolution."""
    g = torch.Generator().manual_seed(5)
    d = 48
    q = normalize(torch.randn(1, d, generator=g), dim=1)
    u = torch.randn(600, d, generator=g, dtype=torch.float64)
    u = normalize(u - (u @ q.double().T) * q.double(), dim=1)  # orthogonal to q
    cos = torch.cat([0.6 - 5e-5 * torch.randperm(120, generator=g).double(),  # the crowded run
                     0.55 * torch.rand(480, generator=g, dtype=torch.float64)])
    anchors = (cos[:, None] * q.double() + (1 - cos[:, None] ** 2).sqrt() * u).float()
    queries = q.repeat(3, 1)
    exact = (queries.double() @ anchors.double().T).topk(40, dim=1)
    assert (exact.values[:, -1] - exact.values[:, -2]).abs().min() < 1e-4  # ties really are close
    for chunk in (64, 1024):
        v, idx = cosine_topk(queries, anchors, 40, precision=precision, anchor_chunk=chunk, query_chunk=2)
        assert torch.equal(idx, exact.indices)
        torch.testing.assert_close(v.double(), exact.values, atol=1e-6, rtol=0)


def test_error_bound_holds_for_low_precision_matmul():
    """The scan's bound |q·a - approx| <= err per row must hold on real matmul output."""
    anchors, x = clustered(2000, 64, seed=7), clustered(50, 64, seed=8)
    exact = x.double() @ anchors.double().T
    for name in ("bf16", "int8"):
        codec = scan_precision.CODECS[name]
        stats = scan_precision.anchor_stats(anchors, name)
        q_low, qscale, err = codec.queries(x, stats)
        s = codec.scores(q_low, codec.quantize_anchors(anchors, stats.scale))
        approx = codec.values(s, qscale[:, None]).double()
        slack = err[:, None] + codec.out_rel * approx.abs()
        assert ((approx - exact).abs() <= slack).all(), name
        assert err.max() < (0.01 if name == "bf16" else 0.05)  # and it is not vacuous


def test_chunk_sizes_bound_the_score_blocks(monkeypatch, data):
    shapes = []
    scores = scan_precision.Fp32Codec.scores

    def spy(q_low, a_low):
        shapes.append((q_low.shape[0], a_low.shape[0]))
        return scores(q_low, a_low)

    monkeypatch.setattr(scan_precision.Fp32Codec, "scores", staticmethod(spy))
    asif = ASIF(k=10, precision="bf16", anchor_chunk=32, query_chunk=6).fit((data["image"], data["text"]))
    asif.transform(data["qi"], modality="image")
    assert shapes and max(a for a, _ in shapes) <= 6 and max(b for _, b in shapes) <= 32
    assert sum(b for _, b in shapes) == 300 * math.ceil(25 / 6)  # every anchor seen by every block


def test_k_larger_than_anchors_is_an_error(data):
    with pytest.raises(DataError, match="k=301 exceeds the number of anchors"):
        ASIF(k=301).fit((data["image"], data["text"]))
    with pytest.raises(DataError, match="k_text"):
        ASIF(k_text=1000).fit((data["image"], data["text"]))
    assert ASIF().fit((data["image"], data["text"])).k_image_ == 300 == default_k(300)
    assert default_k(10**6) == 800


def test_dimension_mismatch_names_both_dims(data):
    asif = ASIF(k=5).fit((data["image"], data["text"]))
    with pytest.raises(DataError, match="12 dims but the fitted image anchors have 16"):
        asif.transform(data["qt"], modality="image")
    with pytest.raises(DataError, match="modality"):
        asif.transform(data["qi"], modality="audio")


def test_bad_inputs_are_clear_errors(data):
    with pytest.raises(NofreeError, match="not fitted"):
        ASIF().transform(data["qi"], modality="image")
    with pytest.raises(DataError, match="counts disagree"):
        ASIF().fit((data["image"], data["text"][:10]))
    with pytest.raises(DataError, match="NaN"):
        ASIF().fit((data["image"].clone().fill_(float("nan")), data["text"]))
    with pytest.raises(DataError, match="precision"):
        ASIF(precision="fp8").fit((data["image"], data["text"]))
    with pytest.raises(DataError, match="expects an AnchorSet"):
        ASIF().fit(data["image"])


def test_fit_accepts_an_anchor_set(data):
    from nofree.anchors.anchor_set import AnchorSet

    image, text = normalize(data["image"], dim=1), normalize(data["text"], dim=1)
    anchors = AnchorSet(image=image, text=text, captions=tuple(f"c{i}" for i in range(300)),
                        image_spec="test:img", text_spec="test:txt")
    a = ASIF(k=25).fit(anchors)
    assert a.anchors_ is anchors and a.n_anchors_ == 300
    torch.testing.assert_close(a.similarity(data["qi"], data["qt"]),
                               ASIF(k=25).fit((image, text)).similarity(data["qi"], data["qt"]))
    with pytest.raises(DataError, match=r"test:img"):
        a.transform(data["qt"], modality="image")


def test_options_center_and_per_modality_k(data):
    asif = ASIF.paper(k=30, k_image=12, center=True).fit((data["image"], data["text"]))  # p = 8
    assert asif.transform(data["qi"], modality="image").k == 12
    assert asif.transform(data["qt"], modality="text").k == 30
    mean = normalize(data["image"], dim=1).mean(0)
    ref = dense_rho(normalize(data["qi"], dim=1) - mean, normalize(data["image"], dim=1) - mean, 12, 8.0)
    torch.testing.assert_close(asif.transform(data["qi"], modality="image").to_dense().double(), ref,
                               atol=1e-6, rtol=0)


def test_similarity_reuses_a_precomputed_side(data):
    asif = ASIF(k=20).fit((data["image"], data["text"]))
    rho_t = asif.transform(data["qt"], modality="text")
    torch.testing.assert_close(asif.similarity(data["qi"], rho_t), asif.similarity(data["qi"], data["qt"]))


def test_sparse_similarity_methods_and_converters_agree(data, monkeypatch):
    monkeypatch.setattr(rel, "_DENSE_FLOATS", 64)  # force many column and row chunks
    asif = ASIF(k=50).fit((data["image"], data["text"]))
    a = asif.transform(data["qi"], modality="image")
    b = asif.transform(data["qi"][:7], modality="image")
    dense = a.to_dense() @ b.to_dense().T
    for method in ("sparse", "dense", "auto"):
        got = sparse_similarity(a.values, a.indices, b.values, b.indices, 300, method=method, row_chunk=4)
        torch.testing.assert_close(got, dense, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.from_numpy(a.to_scipy().toarray()), a.to_dense())
    torch.testing.assert_close(a.to_torch_csr().to_dense(), a.to_dense())


def test_precision_rule(monkeypatch):
    assert scan_precision.resolve_precision("auto", 1000) == "fp32"
    assert scan_precision.resolve_precision("auto", scan_precision.AUTO_BF16_MIN_ANCHORS) == "bf16"
    assert scan_precision.resolve_precision("auto", scan_precision.AUTO_INT8_MIN_ANCHORS) == "int8"
    fused = Int8Products.available()
    mid = scan_precision.AUTO_INT8_FUSED_MIN_ANCHORS
    assert scan_precision.resolve_precision("auto", mid) == ("int8" if fused else "bf16")
    assert scan_precision.resolve_precision("auto", mid - 1) == "bf16"
    monkeypatch.setattr(bindings, "available", lambda device="cpu": False)   # no native kernels: torch's int8
    assert scan_precision.resolve_precision("auto", mid) == "bf16"
    assert scan_precision.resolve_precision("auto", scan_precision.AUTO_INT8_MIN_ANCHORS) == "int8"
    assert scan_precision.resolve_precision("auto", 10**7, "cuda") == "fp32"
    with pytest.raises(DataError, match="CPU scan"):
        scan_precision.resolve_precision("int8", 10, "cuda")
    with pytest.raises(DataError, match="precision"):
        scan_precision.resolve_precision("half", 10)


def test_top_per_row_orders_signs_zeros_and_ties():
    """The packed (row, value) sort keeps each row's k largest values, negative ones and -0.0
    included, and at a tie across the k-th place the earlier candidate (lower anchor id)."""
    gen = torch.Generator().manual_seed(0)
    nb, n, k = 6, 60, 7
    cols = torch.arange(n)                                   # candidates come in anchor order ...
    rows = torch.randperm(n, generator=gen) % nb             # ... with the rows interleaved
    vals = torch.randint(-8, 3, (n,), generator=gen) / 8.0   # mostly negative, many exact ties
    vals[::7] = -0.0
    vals[rows == 0] = torch.tensor([-0.0, 0.0] + [1.0] * 6 + [-1.0] * 2)  # a tie -0.0 == 0.0 at k
    got_v, got_i = exact_search._top_per_row(rows, cols, vals, nb, k)
    for r in range(nb):
        best = sorted((-float(v), int(c)) for v, c, rr in zip(vals, cols, rows) if rr == r)[:k]
        assert got_v[r].tolist() == [-v for v, _ in best] and got_i[r].tolist() == [c for _, c in best]


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_default_anchor_chunk_follows_the_scan_precision(monkeypatch, precision):
    """anchor_chunk=None scans in the chunk measured best for the precision; an explicit one wins."""
    codec = scan_precision.CODECS[precision]
    widths, scores = [], codec.scores

    def spy(q_low, a_low):
        widths.append(a_low.shape[0])
        return scores(q_low, a_low)

    monkeypatch.setattr(codec, "scores", staticmethod(spy))
    pack = Int8Products.pack  # the native int8 products see each chunk here instead

    def pack_spy(self, anchors, scale):
        widths.append(anchors.shape[0])
        return pack(self, anchors, scale)

    monkeypatch.setattr(Int8Products, "pack", pack_spy)
    gen = torch.Generator().manual_seed(0)
    anchors = torch.nn.functional.normalize(torch.randn(9000, 16, generator=gen), dim=1)
    query = anchors[:5] + 0.01
    expected = exact_search.cosine_topk(query, anchors, 20, precision="fp32")[1]
    got = exact_search.cosine_topk(query, anchors, 20, precision=precision)[1]
    assert torch.equal(got, expected)
    assert max(widths) == scan_precision.ANCHOR_CHUNK_BY_PRECISION[precision]
    widths.clear()
    exact_search.cosine_topk(query, anchors, 20, precision=precision, anchor_chunk=1000)
    assert max(widths) == 1000


def test_defaults_are_nofrees_and_the_paper_is_one_call_away(data):
    from nofree.anchors.asif import ASIF_DEFAULTS, ASIF_PAPER

    default, paper = ASIF(), ASIF.paper()
    assert {key: getattr(default, key) for key in ASIF_DEFAULTS} == ASIF_DEFAULTS == \
        {"k": None, "p": 2.0, "center": True, "csls": 10}
    assert (paper.k, paper.p, paper.center, paper.csls) == (None, 8.0, False, 0) and \
        {key: getattr(paper, key) for key in ASIF_PAPER} == ASIF_PAPER
    g = torch.Generator().manual_seed(5)
    big = (torch.randn(1000, 8, generator=g), torch.randn(1000, 6, generator=g))
    assert ASIF.paper().fit(big).k_image_ == ASIF.paper().fit(big).k_text_ == 800   # the paper's k
    assert ASIF.paper(k=40, device="cpu").k == 40 and ASIF.paper(k=40).p == 8.0      # overrides
    assert repr(ASIF()) == "ASIF()" and repr(paper) == "ASIF(p=8.0, center=False, csls=0)"
    # csls=0 is the plain ASIF similarity; with csls the CSLS correction 2·s − r(x) − r(y)
    plain = ASIF(csls=0).fit((data["image"], data["text"]))
    fitted = ASIF().fit((data["image"], data["text"]))
    s = plain.similarity(data["qi"], data["qt"])
    r_i = plain.similarity(data["qi"], data["text"]).topk(10, dim=1).values.mean(1)
    r_t = plain.similarity(data["image"], data["qt"]).topk(10, dim=0).values.mean(0)
    torch.testing.assert_close(fitted.similarity(data["qi"], data["qt"]), 2 * s - r_i[:, None] - r_t[None, :])
    torch.testing.assert_close(fitted.hubness(data["qt"], "text"), r_t)
    with pytest.raises(DataError, match="csls"):
        ASIF(csls=-1).fit((data["image"], data["text"]))
    with pytest.raises(DataError, match="csls=0"):
        plain.hubness(data["qi"], "image")
