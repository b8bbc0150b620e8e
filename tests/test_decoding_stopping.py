"""The one stop rule of every decoding loop: eos ends a caption and is never part of it, a period
after a word ends it and is kept, and the length limit ends it; MAGIC's greedy loop and the
trained captioners' search both follow it."""
from __future__ import annotations

import pytest
import torch

from nofree.decoding.magic import greedy_search, magic_search
from nofree.decoding.stopping import STOP_REASONS, add_token, end_caption, trim_cut
from nofree.testing import tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")


class WordLM:
    """The two members the rule reads: ``eos_id`` and ``decode`` over a fixed list of pieces."""

    PIECES = ["<eos>", " a", " dog", ".", "...", " St.", " runs", '."', " 3"]
    eos_id = 0

    def decode(self, ids):
        return ["".join(self.PIECES[i] for i in row if i != self.eos_id) for row in ids]


def ids(*pieces):
    return [WordLM.PIECES.index(piece) for piece in pieces]


@pytest.mark.parametrize("pieces, max_tokens, caption, reason", [
    ((" a", " dog", "<eos>", " runs"), 8, (" a", " dog"), "eos"),          # eos: not kept
    ((" a", " dog", ".", " runs"), 8, (" a", " dog", "."), "period"),      # a period: kept
    ((" a", " dog", '."', " runs"), 8, (" a", " dog", '."'), "period"),    # any token with '.'
    ((" St.", " runs"), 8, (" St.",), "period"),                           # its own word counts
    (("...", ".", " dog", "."), 8, ("...", ".", " dog", "."), "period"),   # no word yet: goes on
    ((" a", " dog", " runs", " a"), 3, (" a", " dog", " runs"), "length"),
    ((" a", " dog", "<eos>"), 2, (" a", " dog"), "length"),                # the limit comes first
    ((" a", "<eos>"), 2, (" a",), "eos"),                                  # eos at the limit
    ((" a", " dog"), 8, (" a", " dog"), "length"),                         # the sequence ran out
    ((), 8, (), "length"),
])
def test_end_caption(pieces, max_tokens, caption, reason):
    assert end_caption(WordLM(), ids(*pieces), stop_at_period=True, max_tokens=max_tokens) == \
        (ids(*caption), reason)


def test_without_stop_at_period_only_eos_and_the_length_end_a_caption():
    lm = WordLM()
    assert end_caption(lm, ids(" a", " dog", ".", " runs"), stop_at_period=False, max_tokens=8) == \
        (ids(" a", " dog", ".", " runs"), "length")
    assert end_caption(lm, ids(" a", ".", "<eos>", " dog"), stop_at_period=False, max_tokens=8) == \
        (ids(" a", "."), "eos")


def test_add_token_appends_in_place_and_names_the_reason():
    lm, caption = WordLM(), []
    reasons = [add_token(lm, caption, token, stop_at_period=True, max_tokens=8)
               for token in ids(" a", " dog", "<eos>")]
    assert reasons == [None, None, "eos"] and caption == ids(" a", " dog")
    assert set(STOP_REASONS) == {"eos", "period", "length"}


class PieceLM(WordLM):
    PIECES = ["<eos>", "A", " plate", " of", " food", " with", " me", "at", ",", " and", " on", " a",
              " pl", "ate", ".", " the"]


@pytest.mark.parametrize("pieces, caption", [
    (("A", " plate", " of", " food", " with", " me"), "A plate of food"),   # a dangling 'with' goes
    (("A", " plate", " of", " food", " on", " a", " pl", "ate"), "A plate of food"),  # cut mid-word
    (("A", " plate", " of", " food", ",", " and", " a", " plate"), "A plate of food"),  # ', and a'
    (("A", " plate", " of", " food", " with", " me", "at"), "A plate of food"),   # 'me' + 'at': 'meat' was cut
    (("A", " plate", " of", " food", " with", "."), "A plate of food with."),  # a period: a whole sentence
    (("A", " plate", " of", " food", " pl", " plate"), "A plate of food pl"),  # 'pl' then a new word: kept
    ((" the", " a", " on", " plate"), " the a on"),                        # never emptied
    (("A", " plate"), "A plate"),                                          # no look-ahead: as written
])
def test_trim_cut_ends_a_cut_caption_at_its_last_whole_word(pieces, caption):
    tokens = [PieceLM.PIECES.index(piece) for piece in pieces]
    assert trim_cut(PieceLM(), tokens, limit=max(len(tokens) - 1, 2)) == caption


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return tiny_lm(tmp_path_factory.mktemp("gpt2"), family="gpt2")


def test_magic_and_greedy_decoding_end_their_captions_by_the_rule(gpt2):
    """Decoding on without the period rule and then reading the caption off the tokens by the
    rule gives what the loops return while applying it step by step (and eos is never kept)."""
    lm, limit = gpt2, 12
    prompts = lm.tokenize(["a picture of", "the man riding a red bus", "cat"])
    for decode in (lambda **kw: greedy_search(lm, prompts, **kw),
                   lambda **kw: magic_search(lm, None, None, prompt_ids=prompts, k=4, alpha=0.3,
                                             beta=0.0, **kw)):
        free = decode(max_new_tokens=limit, stop_at_period=False)
        stopped = decode(max_new_tokens=limit, stop_at_period=True)
        for row, reason in enumerate(free.stop):
            tokens = free.ids[row] + [lm.eos_id] * (reason == "eos")
            assert lm.eos_id not in free.ids[row] + stopped.ids[row]
            assert end_caption(lm, tokens, stop_at_period=True, max_tokens=limit) == \
                (stopped.ids[row], stopped.stop[row])


def test_trained_captioners_read_their_captions_off_the_search_by_the_rule(gpt2, monkeypatch):
    """CaptioningAdapter.generate keeps no eos: each row of transformers' search (which ends a row
    at eos or a lone '.' and pads it with eos) is read by the rule."""
    from nofree.adapters.clipcap import ClipCap
    from nofree.testing import TinyImageEncoder

    adapter = ClipCap(TinyImageEncoder(dim=16), gpt2, prefix_length=2)
    (dog, cat, period), eos = [row[0] for row in gpt2.tokenize(["dog", "cat", "."])], gpt2.eos_id
    searched = torch.tensor([[dog, cat, eos, eos, eos],            # eos: not kept
                             [dog, period, eos, eos, eos],         # a period after a word: kept
                             [cat, dog, cat, dog, cat]])           # the length limit
    monkeypatch.setattr(gpt2.model, "generate", lambda **kw: searched)
    assert adapter.generate(torch.zeros(3, 16), max_tokens=5) == \
        [[dog, cat], [dog, period], [cat, dog, cat, dog, cat]]
    assert adapter.caption_features(torch.zeros(3, 16), max_tokens=5) == ["dogcat", "dog.", "catdogcatdogcat"]
    monkeypatch.undo()
    for caption in adapter.generate(torch.randn(3, 16), max_tokens=10):
        assert eos not in caption and 1 <= len(caption) <= 10
