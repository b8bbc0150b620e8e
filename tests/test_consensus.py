"""CIDEr-D consensus selection (nofree.captioning.consensus)."""
from __future__ import annotations

import pytest

from nofree.captioning.consensus import CiderD, words

DOCS = ["a dog runs on the beach", "a cat sleeps on a sofa", "two dogs play in the snow",
        "a man rides a red bike", "a plate of food on a table", "a dog sleeps on the grass"]


def test_matches_pycocoevalcap_on_single_caption_documents():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    hyps = ["a dog on the beach", "a cat on a red sofa", "dogs in the snow", "a man on a bike",
            "food on a plate", "a dog on grass"]
    reference = CiderScorer(n=4, sigma=6.0)
    for hyp, ref in zip(hyps, DOCS):
        reference += (" ".join(words(hyp)), [" ".join(words(ref))])
    _, expected = reference.compute_score()
    cider = CiderD(DOCS)  # document frequencies from the same single-caption documents
    for hyp, ref, want in zip(hyps, DOCS, expected):
        assert cider.score(hyp, [ref]) == pytest.approx(float(want), abs=1e-9)


def test_choice_follows_the_references_and_ignores_self_votes():
    cider = CiderD(DOCS)
    refs = ["a dog runs on the beach", "a brown dog on the beach", "a dog playing at the beach"]
    candidates = ["a cat sleeps on a sofa", "a dog on the beach", "a man rides a red bike"]
    assert cider.choose(candidates, refs) == 1
    # a candidate that is one of the references does not vote for itself
    scores = cider.scores(["a dog runs on the beach"], refs)
    assert scores[0] == pytest.approx(cider.score("a dog runs on the beach", refs[1:]))
    assert cider.score("a dog on the beach", []) == 0.0 and cider.scores(["x"], ["x"]) == [0.0]
    assert cider.choose(["same words", "Same words."], ["same words here"]) == 0  # ties: first


def test_agreement_is_minimum_bayes_risk_among_the_candidates():
    cider = CiderD(DOCS)
    candidates = ["a dog on the beach", "a man rides a red bike", "a brown dog on the beach",
                  "a dog runs on the beach"]
    scores = cider.agreement(candidates)
    # each candidate against the three others, itself left out by position
    assert scores[0] == pytest.approx(cider.score(candidates[0], candidates[1:]))
    assert cider.choose(candidates) == max(range(4), key=lambda i: scores[i]) and cider.choose(candidates) != 1
    # two candidates with the same words vote for each other: the pair outvotes two loners
    assert cider.choose(["a red bike", "a dog on a beach", "A dog on a beach.", "a cat on a sofa"]) == 1
    assert cider.agreement(["alone"]) == [0.0] and cider.choose(["alone"]) == 0
    # the guard applies as with references
    assert cider.choose(["A kitchen, a kitchen, a kitchen, a", "a kitchen", "a woman in a kitchen"]) != 0


def test_a_looping_or_stuttering_candidate_is_chosen_only_when_all_are():
    cider = CiderD(DOCS)
    refs = ["a woman in a kitchen with a blender", "a kitchen with a person and a blender",
            "a woman cooking in a kitchen"]
    run_on = "A woman in a kitchen, a kitchen, a blender, a person, a"
    plain = "A woman cooks."
    assert cider.scores([run_on], refs)[0] > cider.scores([plain], refs)[0]  # CIDEr-D alone prefers it
    assert cider.choose([run_on, plain], refs) == 1
    assert cider.choose(["a woman in the the kitchen with a blender", plain], refs) == 1  # a stutter
    # when every candidate is faulty, the best score wins as before
    assert cider.choose([plain + " " + plain, run_on], refs) == 1
    # a candidate cut at a length limit counts as faulty too
    cut = "A woman in a kitchen with a"
    assert cider.choose([cut, plain], refs) == 0 and cider.choose([cut, plain], refs, unfinished=[0]) == 1
    assert cider.choose([cut, run_on], refs, unfinished=[0]) == 0  # the other one loops: scores decide


def test_rare_ngrams_weigh_more_and_bad_input_is_clear():
    cider = CiderD(["a dog", "a cat", "a bus"])
    # "a" is in every document (weight 0), "dog" in one: sharing "dog" counts, sharing "a" does not
    assert cider.score("dog", ["dog"]) > 0 and cider.score("a", ["a"]) == 0.0
    assert cider.score("a dog", ["a dog"]) > cider.score("a dog", ["a cat"])
    with pytest.raises(ValueError, match="at least one document"):
        CiderD([])
    with pytest.raises(ValueError, match="no candidate"):
        cider.choose([], ["a"])
