"""The collapse and looping measures of :mod:`nofree.eval.degeneration` on hand-written captions."""
import pytest

from nofree.eval.degeneration import degeneration, max_ngram_count, stutters


def test_distinct_rate_ignores_case_and_punctuation_and_failed_images():
    found = degeneration(["A dog on a beach.", "a dog on a beach", None, "A cat on a sofa."])
    assert found["n_captions"] == 3
    assert found["distinct"] == pytest.approx(2 / 3)


def test_one_caption_for_every_photo_has_distinct_rate_one_over_n():
    assert degeneration(["A man on a boat."] * 8)["distinct"] == pytest.approx(1 / 8)


def test_a_looping_caption_counts_as_a_3gram_repeat():
    loop = "a couple of people wearing shorts and a couple of people wearing shorts and a couple of"
    assert max_ngram_count(loop) == 3
    found = degeneration([loop, "A train traveling down train tracks near a train station."])
    assert found["repeat_3gram"] == 0.5 and found["worst_repeat"] == 3


@pytest.mark.parametrize("caption", ["a sink, sink, sink, bathtub, and sink",
                                     "A baseball baseball baseballA baseballA player baseball",
                                     "A plate with with food."])
def test_a_word_following_itself_is_a_stutter_that_3grams_miss(caption):
    assert stutters(caption)
    found = degeneration([caption])
    assert found["stutter"] == 1.0 and found["repeat_3gram"] == 0.0


@pytest.mark.parametrize("caption", ["A train traveling down train tracks near a train station.",
                                     "A man holding a tennis racket on a tennis court.", ""])
def test_repeated_words_apart_from_each_other_are_not_stutters(caption):
    assert not stutters(caption)


def test_a_hyphenated_word_counts_as_its_parts():
    # "two two-story" reads as "two two story": a rare false alarm the measure accepts
    assert stutters("Two two-story buses.")


def test_no_captions_gives_zeros():
    assert degeneration([None]) == {"distinct": 0.0, "repeat_3gram": 0.0, "worst_repeat": 0, "stutter": 0.0,
                                    "n_captions": 0}
