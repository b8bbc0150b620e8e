"""Optional faiss indices for the ASIF top-k: measured recall, exact fallback, round trip."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from nofree.anchors.anchor_set import AnchorSet
from nofree.anchors.asif import ASIF
from nofree.anchors.search.index import INDEX_FILES, add_index, index_topk, load_indexes, measure_recall
from nofree.anchors.search.exact import cosine_topk
from nofree.cli import main
from nofree.core import DataError


def clustered_set(n: int, seed: int = 0) -> AnchorSet:
    """n anchor pairs around 40 shared concepts (16-d image side, 8-d text side)."""
    g = torch.Generator().manual_seed(seed)
    concept = torch.randint(0, 40, (n,), generator=g)
    centres = torch.randn(40, 16, generator=g)
    image = torch.nn.functional.normalize(centres[concept] + 0.5 * torch.randn(n, 16, generator=g), dim=1)
    text = torch.nn.functional.normalize(centres[concept, :8] + 0.5 * torch.randn(n, 8, generator=g), dim=1)
    return AnchorSet(image, text, tuple(f"caption {i}" for i in range(n)), "tiny:image-d16-s0",
                     "tiny:text-d8-s0")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("sets") / "set"
    clustered_set(3000).save(path)
    return path


def test_recall_is_measured_and_reported(saved):
    entry = add_index(saved, "IVF32,Flat", nprobe=2, recall_k=50, n_queries=300)
    sides = entry["sides"]
    assert entry["search"] == "index" and set(sides) == {"image", "text"}
    assert all(0.0 < side["recall_at_k"] < 1.0 and side["k"] == 50 and side["nprobe"] == 2
               for side in sides.values())
    assert json.loads((saved / "manifest.json").read_text())["index"] == entry
    exhaustive = add_index(saved, "IVF32,Flat", nprobe=32, recall_k=50, n_queries=300)
    assert all(side["recall_at_k"] == 1.0 for side in exhaustive["sides"].values())
    text = CliRunner().invoke(main, ["anchors", "info", str(saved)]).output
    assert "index        IVF32,Flat" in text and "image recall@50 1.000" in text


def test_ivf_with_every_list_probed_matches_exact_search(saved):
    add_index(saved, "IVF32,Flat", nprobe=32, recall_k=20, n_queries=10)
    anchors = AnchorSet.load(saved)
    indexes = load_indexes(saved)  # round trip through index-*.faiss
    exact = ASIF(k=20, center=True).fit(anchors)
    query = clustered_set(50, seed=1).image
    values, ids = index_topk(exact._queries(query, "image"), exact.image_anchors_, indexes["image"], 20)
    ref_values, ref_ids = cosine_topk(exact._queries(query, "image"), exact.image_anchors_, 20)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(values, ref_values)
    fast = ASIF(k=20, center=True, search="index").fit(anchors, indexes=indexes)
    torch.testing.assert_close(fast.similarity(query, anchors.text[:30]), exact.similarity(query, anchors.text[:30]))


def test_saved_index_searches_like_the_built_one(saved):
    add_index(saved, "IVF16,PQ4x4", nprobe=4, recall_k=10, n_queries=50)
    loaded = load_indexes(saved)["text"]
    assert loaded.factory == "IVF16,PQ4x4" and loaded.nprobe == 4 and loaded.index.ntotal == 3000
    prepared = ASIF(k=1, center=True).fit(AnchorSet.load(saved)).text_anchors_
    assert torch.equal(loaded.search(prepared[:20], 10), load_indexes(saved)["text"].search(prepared[:20], 10))
    # candidates missing (-1) are filled by exact search: every row has k real anchors
    values, ids = index_topk(prepared[:20], prepared, loaded, 10)
    assert bool((ids >= 0).all()) and bool((values[:, :-1] >= values[:, 1:]).all())
    # more candidates re-scored exactly never lose recall
    recalls = [measure_recall(dataclasses.replace(loaded, refine=r), prepared, 10, n_queries=200) for r in (1, 4)]
    assert recalls[0] <= recalls[1] and recalls[0] < 1.0


def test_small_set_falls_back_to_exact_search_with_a_message(tmp_path, caplog):
    small = clustered_set(200)
    small.save(tmp_path / "small")
    entry = add_index(tmp_path / "small", "IVF64,Flat")
    assert entry["search"] == "exact" and "too few" in entry["reason"] and "exact search" in caplog.text
    assert not any((tmp_path / "small" / f).exists() for f in INDEX_FILES.values())
    assert load_indexes(tmp_path / "small") == {}
    exact = ASIF(k=10, center=True).fit(small)
    fallback = ASIF(k=10, center=True, search="index").fit(small, indexes={})
    torch.testing.assert_close(fallback.similarity(small.image[:5], small.text), exact.similarity(small.image[:5], small.text))


def test_bad_factory_mismatched_centering_and_extend(saved, tmp_path):
    with pytest.raises(DataError, match="index_factory"):
        add_index(saved, "IVFxx,Nope")
    add_index(saved, "IVF32,Flat", center=False, nprobe=4, recall_k=10, n_queries=10)
    with pytest.raises(DataError, match="center"):
        ASIF(k=10, center=True, search="index").fit(AnchorSet.load(saved), indexes=load_indexes(saved))
    # a rewritten set carries no stale index entry
    AnchorSet.load(saved).save(tmp_path / "copy")
    assert "index" not in json.loads((tmp_path / "copy" / "manifest.json").read_text())
