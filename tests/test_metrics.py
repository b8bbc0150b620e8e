"""Caption metrics (pycocoevalcap), retrieval R@K and zero-shot accuracy, checked independently."""
from __future__ import annotations

import math
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from nofree.core import DataError, MissingDependencyError
from nofree.eval import captioning
from nofree.eval import (METRICS, as_percent, caption_metrics, format_table, hit_rate, ptb_tokenize,
                         recall_at_k, retrieval_report, top1_accuracy, topk_accuracy)

# lower-case, no punctuation: the COCO tokenizer leaves these exactly as they are
PREDICTIONS = ["a man riding a horse on a beach", "a cat on the mat", "two dogs play in snow"]
REFERENCES = [
    ["a man rides a horse along the beach", "a person riding a brown horse on sand"],
    ["the cat is on the mat", "there is a cat on the mat"],
    ["two dogs playing in the snow", "dogs run through deep snow", "a pair of dogs in snow"],
]


@pytest.fixture(scope="module")
def full_scores():
    """One run with every metric (METEOR's JVM takes ~10 s to start, so it runs once)."""
    return caption_metrics(PREDICTIONS, REFERENCES, spice=True)


def bleu1_by_hand(predictions, references):
    """Corpus BLEU-1: clipped unigram precision x brevity penalty (closest reference length)."""
    clipped = candidate_len = reference_len = 0
    for prediction, refs in zip(predictions, references):
        words = prediction.split()
        max_ref = Counter()
        for ref in refs:
            for word, count in Counter(ref.split()).items():
                max_ref[word] = max(max_ref[word], count)
        clipped += sum(min(count, max_ref[word]) for word, count in Counter(words).items())
        candidate_len += len(words)
        reference_len += min((abs(len(r.split()) - len(words)), len(r.split())) for r in refs)[1]
    penalty = 1.0 if candidate_len >= reference_len else math.exp(1 - reference_len / candidate_len)
    return clipped / candidate_len * penalty


@pytest.mark.slow
def test_full_run(full_scores):
    scores = full_scores
    assert scores["n"] == 3
    assert set(METRICS) <= set(scores)
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L"):
        assert 0.0 < scores[name] < 1.0, name
    assert scores["BLEU-1"] >= scores["BLEU-2"] >= scores["BLEU-3"] >= scores["BLEU-4"]
    assert scores["CIDEr"] > 0
    assert scores["BLEU-1"] == pytest.approx(bleu1_by_hand(PREDICTIONS, REFERENCES), abs=1e-6)
    if captioning.spice_unavailable_reason() is not None:  # offline: skipped up front, with a reason
        assert scores["SPICE"] is None
        assert any(note.startswith("SPICE skipped: needs") for note in scores["notes"])
    else:
        assert 0.0 <= scores["SPICE"] <= 1.0


def test_bleu1_by_hand_with_brevity_penalty():
    # one short candidate (brevity penalty exp(1 - 6/5)) and one with a clipped repeated word
    predictions = ["a cat on the mat", "the the the cat"]
    references = [["the cat is on the mat", "there is a cat on the mat"], ["the cat", "a cat sat down"]]
    scores = caption_metrics(predictions, references, meteor=False)
    expected = bleu1_by_hand(predictions, references)
    assert expected < 0.8  # the example really exercises clipping and the penalty
    assert scores["BLEU-1"] == pytest.approx(expected, abs=1e-6)
    assert scores["METEOR"] is None and any("METEOR skipped" in n for n in scores["notes"])


def test_identical_captions_score_one():
    captions = ["a man riding a horse on a beach", "a red double decker bus in a street"]
    scores = caption_metrics(captions, [[c] for c in captions], meteor=False)
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(1.0)
    shuffled = caption_metrics(captions[::-1], [[c] for c in captions], meteor=False)
    assert shuffled["CIDEr"] < scores["CIDEr"] and shuffled["BLEU-4"] < 0.5
    # per-image CIDEr, in input order, averages to the corpus figure
    for result in (scores, shuffled):
        assert len(result["CIDEr per image"]) == 2
        assert sum(result["CIDEr per image"]) / 2 == pytest.approx(result["CIDEr"])
    half = caption_metrics([captions[0], captions[0]], [[c] for c in captions], meteor=False)["CIDEr per image"]
    assert half[0] > 0 and half[1] == pytest.approx(0.0)


def test_tokenisation_case_punctuation_and_dict_inputs():
    plain = caption_metrics(PREDICTIONS, REFERENCES, meteor=False)
    noisy = caption_metrics({f"img{i}": p.capitalize() + "." for i, p in enumerate(PREDICTIONS)},
                            {f"img{i}": [r.upper() + "!" for r in refs] for i, refs in enumerate(REFERENCES)},
                            meteor=False)
    for name in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert noisy[name] == pytest.approx(plain[name]), name
    assert ptb_tokenize(["A Man, riding (fast)!", "", "don't\nstop\u2028now", ""]) == \
        ["a man riding -lrb- fast -rrb-", "", "do n't stop now", ""]


def test_same_tokens_as_pycocoevalcap():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    sentences = ["A man, riding a horse.", "Two dogs -- playing; in the 'snow'?", "Café au lait..."]
    theirs = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(sentences)})
    assert ptb_tokenize(sentences) == [theirs[i][0] for i in range(len(sentences))]


def test_tokenizer_writes_nothing_into_the_package(tmp_path, monkeypatch):
    jar = captioning._package_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    package = tmp_path / "pkg"
    (package / "tokenizer").mkdir(parents=True)
    shutil.copy(jar, package / "tokenizer" / jar.name)
    (package / "tokenizer").chmod(0o555)  # read-only install
    monkeypatch.setattr(captioning, "_package_dir", lambda: package)
    try:
        assert ptb_tokenize(["A read-only install, still fine."]) == ["a read-only install still fine"]
        assert [p.name for p in (package / "tokenizer").iterdir()] == [jar.name]
    finally:
        (package / "tokenizer").chmod(0o755)
    assert ptb_tokenize([]) == []


def test_bad_inputs_and_missing_java(monkeypatch):
    with pytest.raises(DataError, match="2 predictions but 1"):
        caption_metrics(["a", "b"], [["a"]])
    with pytest.raises(DataError, match="both be dicts"):
        caption_metrics({"x": "a"}, [["a"]])
    with pytest.raises(DataError, match="ids differ"):
        caption_metrics({"x": "a"}, {"y": ["a"]})
    with pytest.raises(DataError, match="non-empty list"):
        caption_metrics(["a"], [[]])
    with pytest.raises(DataError, match="no predictions"):
        caption_metrics([], [])
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    with pytest.raises(MissingDependencyError, match="Java"):
        caption_metrics(["a dog"], [["a dog"]])
    assert "Java" in captioning.spice_unavailable_reason()


def test_spice_reason_names_the_missing_jars(tmp_path, monkeypatch):
    (tmp_path / "spice" / "lib").mkdir(parents=True)
    monkeypatch.setattr(captioning, "_package_dir", lambda: tmp_path)
    reason = captioning.spice_unavailable_reason()
    assert "stanford-corenlp-3.6.0-models.jar" in reason and str(tmp_path / "spice" / "lib") in reason


def test_percent_and_table():
    scores = caption_metrics(PREDICTIONS, REFERENCES, meteor=False)
    percent = as_percent(scores)
    assert percent["BLEU-1"] == round(100 * scores["BLEU-1"], 1)
    assert percent["METEOR"] is None and percent["SPICE"] is None
    table = format_table({"retrieval": scores})
    header, _, row = table.splitlines()
    assert header.split(" | ")[1] == "BLEU-1" and row.startswith("| retrieval |")
    assert f"{percent['CIDEr']:.1f}" in row and row.rstrip(" |").endswith("3")
    assert row.split(" | ")[METRICS.index("METEOR") + 1] == "-"


# --- retrieval ---

def brute_force_recall(sim: np.ndarray, relevant: list[set[int]], k: int) -> float:
    order = np.argsort(-sim, axis=1)
    return float(np.mean([bool(set(order[q, :k]) & relevant[q]) for q in range(len(sim))]))


def test_recall_at_k_matches_brute_force():
    rng = np.random.default_rng(0)
    n_images, per_image = 12, 5
    owner = np.repeat(np.arange(n_images), per_image)  # 5 captions per image, COCO-style
    sim = rng.normal(size=(n_images, n_images * per_image)).astype(np.float32)
    sim[owner, np.arange(len(owner))] += 1.0  # correct pairs score higher on average
    ks = (1, 2, 5, 10)

    t2i_rel = [{int(i)} for i in owner]
    i2t_rel = [set(np.flatnonzero(owner == i).tolist()) for i in range(n_images)]
    report = retrieval_report(torch.from_numpy(sim), torch.from_numpy(owner))
    direct = recall_at_k(sim.T, t2i_rel, ks)
    for k in ks:
        assert direct[f"R@{k}"] == pytest.approx(brute_force_recall(sim.T, t2i_rel, k))
        assert recall_at_k(sim, i2t_rel, ks)[f"R@{k}"] == pytest.approx(brute_force_recall(sim, i2t_rel, k))
    for k in (1, 5, 10):
        assert report["t2i"][f"R@{k}"] == pytest.approx(brute_force_recall(sim.T, t2i_rel, k))
        assert report["i2t"][f"R@{k}"] == pytest.approx(brute_force_recall(sim, i2t_rel, k))
    assert report["t2i"]["n"] == 60 and report["i2t"]["n"] == 12
    assert 0 < report["t2i"]["R@1"] < report["t2i"]["R@5"] < 1  # the data is neither trivial nor hopeless
    # the three ways of saying "which items are correct" agree
    mask = np.zeros((60, 12), dtype=bool)
    mask[np.arange(60), owner] = True
    assert recall_at_k(sim.T, owner, ks) == direct == recall_at_k(sim.T, mask, ks)


def test_ties_count_against_the_query():
    constant = np.zeros((4, 6))
    assert recall_at_k(constant, [0, 1, 2, 3], ks=(1, 5, 6)) == {"R@1": 0.0, "R@5": 0.0, "R@6": 1.0}
    sim = np.array([[0.5, 0.5, 0.1]])
    assert recall_at_k(sim, [{0}], ks=(1, 2))["R@1"] == 0.0
    assert recall_at_k(sim, [{0, 1}], ks=(1,))["R@1"] == 1.0  # a tie between two correct items is fine


def test_retrieval_errors():
    with pytest.raises(DataError, match="no correct item"):
        recall_at_k(np.zeros((2, 3)), [{0}, set()])
    with pytest.raises(DataError, match="NaN"):
        recall_at_k(np.array([[np.nan, 0.0]]), [0])
    with pytest.raises(DataError, match="outside"):
        recall_at_k(np.zeros((1, 3)), [{3}])
    with pytest.raises(DataError, match="no text"):
        retrieval_report(np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(DataError, match="text_to_image"):
        retrieval_report(np.zeros((3, 2)), np.array([0, 1, 2]))


# --- zero-shot ---

def test_top1_topk_and_hit_rate_tiny():
    scores = torch.tensor([[0.9, 0.1, 0.0],
                           [0.2, 0.5, 0.3],
                           [0.1, 0.2, 0.7],
                           [0.3, 0.6, 0.1]])
    labels = [0, 2, 2, 1]  # row 1 predicts class 1 but is class 2
    assert top1_accuracy(scores, labels) == 0.75
    assert topk_accuracy(scores, labels, k=2) == 1.0
    assert hit_rate(scores, [{0, 1}, {0}, {2}, {1, 2}]) == 0.75  # row 1: predicted 1, true {0}
    assert hit_rate(scores, [{0, 1}, {1}, {2}, {1, 2}]) == 1.0
    assert hit_rate(scores, [{2}, {0}, {0}, {0}], k=2) == 0.25


def test_topk_matches_brute_force():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(50, 7))
    labels = rng.integers(0, 7, size=50)
    order = np.argsort(-scores, axis=1)
    for k in (1, 3):
        expected = np.mean([labels[i] in order[i, :k] for i in range(50)])
        assert topk_accuracy(scores, labels, k=k) == pytest.approx(expected)
    assert top1_accuracy(scores, labels) == pytest.approx(np.mean(order[:, 0] == labels))
    with pytest.raises(DataError, match="integer"):
        top1_accuracy(scores, labels.astype(float))
    with pytest.raises(DataError, match="no correct item"):
        hit_rate(scores[:2], [{1}, set()])
