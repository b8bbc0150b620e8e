"""MAGIC decoding: greedy equivalence, cache exactness against a no-cache reference, batching,
the degeneration penalty, the image term, stopping rules and argument errors."""
from __future__ import annotations

import zlib

import pytest
import torch

from nofree.core import NofreeError
from nofree.decoding.magic import Generation, greedy_search, magic_search
from nofree.testing import tiny_lm

FAMILIES = ["gpt2", "llama"]
PROMPTS = ["a picture of", "the man riding a red bus on the beach with", "cat"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request, tmp_path_factory):
    return tiny_lm(tmp_path_factory.mktemp(request.param), family=request.param)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return tiny_lm(tmp_path_factory.mktemp("gpt2"), family="gpt2")


def word_scorer(words_per_image):
    """A toy scorer: image b likes texts containing its word (logit 8 per occurrence)."""
    def score(image_emb, texts):
        return torch.tensor([[8.0 * text.count(words_per_image[int(image_emb[b, 0])]) for text in row]
                             for b, row in enumerate(texts)])
    return score


def image_index(n):
    """``(n, 2)`` fake image embeddings whose first column names the image's word."""
    return torch.stack([torch.arange(n, dtype=torch.float32), torch.ones(n)], 1)


def reference_magic(lm, scorer, image_emb, prompt, *, k, alpha, beta, max_new_tokens):
    """MAGIC for one prompt with no cache at all: every candidate re-runs the whole sequence."""
    generated, steps = [], []
    for _ in range(max_new_tokens):
        full = prompt + generated
        out = lm.step(torch.tensor([full]))
        context = torch.nn.functional.normalize(out.hidden[0], dim=-1)        # (T, H)
        prob, cand = out.logits[0].softmax(-1).topk(k)
        penalty = torch.stack([
            (torch.nn.functional.normalize(lm.step(torch.tensor([full + [v]])).hidden[0, -1], dim=-1)
             @ context.T).max() for v in cand.tolist()])
        score = (1 - alpha) * prob - alpha * penalty
        if beta:
            texts = [lm.decode([generated + [v]])[0] for v in cand.tolist()]
            score = score + beta * scorer(image_emb[None], [texts])[0].softmax(-1)
        token = int(cand[score.argmax()])
        steps.append((prob, penalty))
        if token == lm.eos_id:
            break
        generated.append(token)
    return generated, steps


def test_alpha_beta_zero_is_greedy(lm):
    prompts = lm.tokenize(PROMPTS)
    for stop_at_period in (False, True):
        greedy = greedy_search(lm, prompts, max_new_tokens=10, stop_at_period=stop_at_period)
        magic = magic_search(lm, None, None, prompt_ids=prompts, k=7, alpha=0.0, beta=0.0,
                             max_new_tokens=10, stop_at_period=stop_at_period)
        assert isinstance(magic, Generation)
        assert magic.ids == greedy.ids and magic.texts == greedy.texts and magic.stop == greedy.stop
    assert all(len(ids) == 10 for ids in greedy_search(lm, prompts, max_new_tokens=10,
                                                       stop_at_period=False).ids)


def test_greedy_matches_argmax_of_full_forward(lm):
    prompt = lm.tokenize(["the dog on"])[0]
    out = greedy_search(lm, [prompt], max_new_tokens=6, stop_at_period=False).ids[0]
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(lm.step(torch.tensor([seq])).logits[0].argmax()))
    assert out == seq[len(prompt):]


def test_cache_path_equals_no_cache_reference(lm):
    scorer = word_scorer(["dog", "bus"])
    prompts = lm.tokenize(["a picture of", "the red"])
    images = image_index(2)
    got = magic_search(lm, scorer, images, prompt_ids=prompts, k=6, alpha=0.3, beta=1.5,
                       max_new_tokens=5, stop_at_period=False)
    for row, prompt in enumerate(prompts):
        ids, ref_steps = reference_magic(lm, scorer, images[row], prompt, k=6, alpha=0.3, beta=1.5,
                                         max_new_tokens=5)
        assert got.ids[row] == ids
        for step, (prob, penalty) in zip(got.steps, ref_steps):
            i = step.rows.tolist().index(row)
            torch.testing.assert_close(step.lm_prob[i], prob, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(step.penalty[i], penalty, atol=1e-5, rtol=1e-4)


def test_degeneration_penalty_matches_direct_computation(gpt2):
    lm = gpt2
    prompt = lm.tokenize(["the man riding a"])[0]
    out = magic_search(lm, None, None, prompt_ids=[prompt], k=5, alpha=0.5, beta=0.0,
                       max_new_tokens=4, stop_at_period=False)
    step = out.steps[2]                                   # two generated tokens already in context
    context = prompt + out.ids[0][:2]
    for j, v in enumerate(step.candidates[0].tolist()):
        hidden = torch.nn.functional.normalize(lm.step(torch.tensor([context + [v]])).hidden[0], dim=-1)
        direct = (hidden[:-1] @ hidden[-1]).max()         # candidate vs every earlier position
        assert step.penalty[0, j] == pytest.approx(float(direct), abs=1e-5)
    assert out.ids[0][2] == int(step.candidates[0, step.chosen[0]])
    score = 0.5 * step.lm_prob[0] - 0.5 * step.penalty[0]
    assert int(step.chosen[0]) == int(score.argmax())
    assert step.image_prob is None


def test_penalty_ignores_left_padding(gpt2):
    lm = gpt2
    short, long = lm.tokenize(["cat", "the man riding a red bus on the beach"])
    batched = magic_search(lm, None, None, prompt_ids=[short, long], k=5, alpha=0.5, beta=0.0,
                           max_new_tokens=3, stop_at_period=False)
    alone = magic_search(lm, None, None, prompt_ids=[short], k=5, alpha=0.5, beta=0.0,
                         max_new_tokens=3, stop_at_period=False)
    assert batched.ids[0] == alone.ids[0]
    torch.testing.assert_close(batched.steps[0].penalty[0], alone.steps[0].penalty[0], atol=1e-5, rtol=1e-4)


def spread_scorer(image_emb, texts):
    """Deterministic, well-spread logits (0..12) per text: a peaked image term, as real scorers give."""
    return torch.tensor([[float(zlib.crc32(text.encode()) % 13) for text in row] for row in texts])


@pytest.mark.parametrize("tree", [True, False], ids=["tree", "k-expanded"])
def test_pruning_keeps_the_tokens_and_skips_candidates(lm, tree):
    kw = dict(prompt_ids=lm.tokenize(PROMPTS), k=12, alpha=0.1, beta=2.0, max_new_tokens=6,
              stop_at_period=False)
    if not tree:
        lm.candidate_step = None
    try:
        full = magic_search(lm, spread_scorer, image_index(3), prune=False, **kw)
        fast = magic_search(lm, spread_scorer, image_index(3), **kw)
    finally:
        if not tree:
            del lm.candidate_step
    assert fast.ids == full.ids and fast.stop == full.stop
    assert not any(bool(step.penalty.isnan().any()) for step in full.steps)
    skipped = sum(int(step.penalty.isnan().sum()) for step in fast.steps)
    assert skipped > len(fast.steps) * 3 * 12 // 2     # most candidates never ran
    for step, ref in zip(fast.steps, full.steps):
        ran = ~step.penalty.isnan()
        assert ran[torch.arange(len(step.chosen)), step.chosen].all()
        torch.testing.assert_close(step.penalty[ran], ref.penalty[ran], atol=1e-5, rtol=1e-4)


def test_scorer_steers_toward_its_word(lm):
    prompts = lm.tokenize(["a picture of"])
    scorer = word_scorer(["dog"])
    plain = magic_search(lm, scorer, image_index(1), prompt_ids=prompts, k=lm.vocab_size,
                         beta=0.0, max_new_tokens=6, stop_at_period=False)
    steered = magic_search(lm, scorer, image_index(1), prompt_ids=prompts, k=lm.vocab_size,
                           beta=2.0, max_new_tokens=6, stop_at_period=False)
    assert "dog" not in plain.texts[0]
    assert steered.texts[0].count("dog") >= 1
    first = steered.steps[0]
    torch.testing.assert_close(first.image_prob.sum(-1), torch.ones(1))
    assert "dog" in lm.decode([[int(first.candidates[0, first.chosen[0]])]])[0]


def test_beta_zero_never_calls_the_scorer(gpt2):
    def boom(image_emb, texts):
        raise AssertionError("scorer called with beta=0")

    out = magic_search(gpt2, boom, None, prompt_ids=gpt2.tokenize(["a"]), k=4, beta=0.0,
                       max_new_tokens=3)
    assert out.steps and all(s.image_prob is None for s in out.steps)


def test_batched_images_equal_one_by_one(lm):
    words = ["dog", "bus", "beach"]
    scorer = word_scorer(words)
    prompts = lm.tokenize(PROMPTS)
    images = image_index(3)
    batched = magic_search(lm, scorer, images, prompt_ids=prompts, k=lm.vocab_size, alpha=0.1,
                           beta=2.0, max_new_tokens=6)
    for row in range(3):
        alone = magic_search(lm, scorer, images[row:row + 1], prompt_ids=[prompts[row]],
                             k=lm.vocab_size, alpha=0.1, beta=2.0, max_new_tokens=6)
        assert batched.ids[row] == alone.ids[0]
        assert batched.stop[row] == alone.stop[0]
        assert words[row] in batched.texts[row]


def test_eos_stops_a_row_while_others_continue(gpt2):
    lm = gpt2

    def score(image_emb, texts):   # image 0 wants the empty text (eos), image 1 wants 'cat'
        return torch.tensor([[9.0 * (t == "") if int(image_emb[b, 0]) == 0 else 9.0 * t.count("cat")
                              for t in row] for b, row in enumerate(texts)])

    prompts = lm.tokenize(["a picture of", "the"])
    out = magic_search(lm, score, image_index(2), prompt_ids=prompts, k=lm.vocab_size,
                       max_new_tokens=5, stop_at_period=False)
    assert out.ids[0] == [] and out.stop[0] == "eos" and out.texts[0] == ""
    assert len(out.ids[1]) == 5 and out.stop[1] == "length" and "cat" in out.texts[1]
    assert [s.rows.tolist() for s in out.steps] == [[0, 1]] + [[1]] * 4


def test_period_stops_only_after_a_word(gpt2):
    lm = gpt2

    def dog_then_period(image_emb, texts):
        return torch.tensor([[10.0 * t.count("dog") + 20.0 * t.rstrip().endswith("dog.") for t in row]
                             for row in texts])

    def dots(image_emb, texts):
        return torch.tensor([[8.0 * len(t) * (set(t) == {"."}) for t in row] for row in texts])

    prompt = lm.tokenize(["a picture of"])
    kw = dict(prompt_ids=prompt, k=lm.vocab_size, max_new_tokens=6)
    out = magic_search(lm, dog_then_period, image_index(1), **kw)
    assert out.texts[0].strip() == "dog." and out.stop == ["period"]
    longer = magic_search(lm, dog_then_period, image_index(1), stop_at_period=False, **kw)
    assert len(longer.ids[0]) == 6 and longer.ids[0][:len(out.ids[0])] == out.ids[0]
    only_dots = magic_search(lm, dots, image_index(1), **kw)
    assert set(only_dots.texts[0]) == {"."} and only_dots.stop == ["length"]


def test_bad_arguments_are_clear_errors(gpt2):
    lm = gpt2
    prompts = lm.tokenize(["a dog"])
    with pytest.raises(NofreeError, match="vocab"):
        magic_search(lm, None, None, prompt_ids=prompts, k=lm.vocab_size + 1, beta=0.0)
    with pytest.raises(NofreeError, match="empty"):
        magic_search(lm, None, None, prompt_ids=[[]], beta=0.0)
    with pytest.raises(NofreeError, match="empty"):
        greedy_search(lm, [prompts[0], []])
    with pytest.raises(NofreeError, match="image_emb"):
        magic_search(lm, word_scorer(["dog"]), None, prompt_ids=prompts, k=4)
    with pytest.raises(NofreeError, match="image_emb"):
        magic_search(lm, word_scorer(["dog"]), image_index(2), prompt_ids=prompts, k=4)
    with pytest.raises(TypeError, match="scorer"):
        magic_search(lm, object(), image_index(1), prompt_ids=prompts, k=4)


def test_custom_generate_callable(gpt2):
    from nofree.decoding.hf_generate import magic_custom_generate

    lm = gpt2
    prompts = lm.tokenize(PROMPTS[:2])
    from nofree.lm.hf import left_pad

    ids, mask = left_pad(prompts, lm.pad_id)
    scorer = word_scorer(["dog", "bus"])
    expected = magic_search(lm, scorer, image_index(2), prompt_ids=prompts, k=20,
                            max_new_tokens=5, stop_at_period=False)
    out = lm.model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                            custom_generate=magic_custom_generate(lm.tokenizer, scorer, image_index(2),
                                                                  k=20, stop_at_period=False))
    assert out.shape[1] == ids.shape[1] + 5
    assert [row[ids.shape[1]:].tolist() for row in out] == expected.ids


def test_lm_without_candidate_logits_gives_the_same_tokens(lm):
    """LMs exposing head_logits() get step(logits=False) for the candidates, same result."""
    from nofree.core import LMStep
    from nofree.lm.hf import HFLanguageModel

    class HeadlessLM(HFLanguageModel):
        calls: list
        candidate_step = None  # one row per candidate, as an LM without tree attention

        def step(self, ids=None, *, embeds=None, cache=None, attention_mask=None, logits=True):
            out = super().step(ids, embeds=embeds, cache=cache, attention_mask=attention_mask)
            self.calls.append(logits)
            return out if logits else LMStep(logits=None, hidden=out.hidden, cache=out.cache)

        def head_logits(self, hidden):
            return self.model.get_output_embeddings()(hidden)

    headless = HeadlessLM(lm.model, lm.tokenizer, spec=lm.spec)
    headless.calls = []
    prompts = lm.tokenize(PROMPTS)
    kw = dict(prompt_ids=prompts, k=8, alpha=0.2, beta=1.0, max_new_tokens=6, stop_at_period=False)
    scorer = word_scorer(["dog", "bus", "cat"])
    expected = magic_search(lm, scorer, image_index(3), **kw)
    got = magic_search(headless, scorer, image_index(3), **kw)
    assert got.ids == expected.ids
    from nofree.decoding.magic import length_groups

    prefill_calls = len(length_groups([len(p) for p in prompts]))  # one per group of similar lengths
    assert prefill_calls > 1 and headless.calls == [True] * prefill_calls + [False] * 6


def test_magic_generate_captions_images(gpt2):
    from nofree.decoding.hf_generate import magic_generate
    from nofree.decoding.scorers import CallableScorer

    lm = gpt2
    scorer = CallableScorer(word_scorer(["dog", "bus"]), embed_images=lambda images: image_index(len(images)))
    kw = dict(k=lm.vocab_size, max_new_tokens=4, stop_at_period=False)
    texts = magic_generate(lm.model, lm.tokenizer, ["img0", "img1"], scorer, prompt="a picture of", **kw)
    expected = magic_search(lm, scorer, image_index(2), prompt_ids=lm.tokenize(["a picture of"] * 2), **kw)
    assert texts == expected.texts and "dog" in texts[0] and "bus" in texts[1]


def test_cache_budget_chunks_the_candidates_and_keeps_the_tokens(lm):
    """Under a tiny cache budget the k candidates run in row chunks (bounded memory) and the
    chosen tokens once more on the unexpanded cache: the same captions as the one-forward path."""
    prompts = lm.tokenize(PROMPTS)
    kw = dict(prompt_ids=prompts, k=8, alpha=0.2, beta=1.0, max_new_tokens=6, stop_at_period=False)
    scorer = word_scorer(["dog", "bus", "cat"])
    expected = magic_search(lm, scorer, image_index(3), **kw)
    rows_seen = []
    original = lm.step

    def counting_step(ids=None, **step_kw):
        rows_seen.append(len(ids) if ids is not None else 0)
        return original(ids, **step_kw)

    lm.step = counting_step
    lm.candidate_step = None  # the k-expanded path (LMs without tree attention)
    try:
        per_row = lm.cache_nbytes(lm.step(torch.tensor([prompts[0]])).cache)   # one prompt row
        rows_seen.clear()
        got = magic_search(lm, scorer, image_index(3), cache_budget=5 * per_row, **kw)
    finally:
        del lm.step, lm.candidate_step
    assert got.ids == expected.ids and got.stop == expected.stop
    assert max(rows_seen[1:]) <= 5 < 3 * 8      # candidates ran in chunks of at most 5 rows
    assert 3 in rows_seen[1:]                    # ... and the 3 chosen tokens once more


def test_tree_attention_candidates_equal_one_row_per_candidate(lm):
    """candidate_step runs the k candidates side by side after each row's (left-padded) cache:
    the hidden states of k-expanded rows, a cache of past + k positions (the caller's untouched),
    and keep_candidates leaves the cache that stepping the chosen tokens gives."""
    from nofree.lm.hf import left_pad

    ids, mask = left_pad(lm.tokenize(PROMPTS), lm.pad_id)
    out = lm.step(ids, attention_mask=mask)
    (b, past), k = ids.shape, 6
    cands = torch.randint(3, lm.vocab_size, (b, k), generator=torch.Generator().manual_seed(0))
    tree = lm.candidate_step(cands, cache=out.cache, attention_mask=mask)
    assert tree.hidden.shape == (b, k, lm.hidden_size)
    assert tree.cache.get_seq_length() == past + k and out.cache.get_seq_length() == past
    expand = torch.arange(b).repeat_interleave(k)
    rows = lm.step(cands.reshape(-1, 1), cache=lm.select_cache(out.cache, expand),
                   attention_mask=torch.cat([mask[expand], mask.new_ones(b * k, 1)], 1))
    torch.testing.assert_close(tree.hidden, rows.hidden[:, -1].view(b, k, -1), atol=1e-5, rtol=1e-4)
    chosen, keep = torch.tensor([2, 5]), torch.tensor([0, 2])  # row 1 finished
    kept = lm.keep_candidates(tree.cache, keep, chosen, k)
    stepped = lm.step(cands[keep, chosen][:, None], cache=lm.select_cache(out.cache, keep),
                      attention_mask=torch.cat([mask[keep], mask.new_ones(2, 1)], 1)).cache
    probe, probe_mask = torch.tensor([[7], [9]]), torch.cat([mask[keep], mask.new_ones(2, 2)], 1)
    torch.testing.assert_close(lm.step(probe, cache=kept, attention_mask=probe_mask).logits,
                               lm.step(probe, cache=stepped, attention_mask=probe_mask).logits,
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_tree_attention_with_eager_attention_and_fallbacks(family, tmp_path):
    """The tree mask is additive, so eager attention (which adds it to the scores) gets the same
    candidates as sdpa; kernels without custom masks get None (the k-expanded fallback)."""
    from nofree.lm.hf import left_pad, load_hf_lm
    from nofree.testing import make_tiny_lm_dir

    folder = make_tiny_lm_dir(tmp_path / "lm", family=family)
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], 0)
    cands = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    hidden = {}
    for impl in ("sdpa", "eager"):
        lm = load_hf_lm(folder, attn_implementation=impl)
        assert lm.model.config._attn_implementation == impl
        out = lm.step(ids, attention_mask=mask)
        hidden[impl] = lm.candidate_step(cands, cache=out.cache, attention_mask=mask).hidden
    torch.testing.assert_close(hidden["eager"], hidden["sdpa"], atol=1e-5, rtol=1e-4)
    lm.model.config._attn_implementation = "flash_attention_2"
    try:
        assert lm.candidate_step(cands, cache=out.cache, attention_mask=mask) is None
    finally:
        lm.model.config._attn_implementation = "eager"


def test_alpha_zero_skips_the_candidate_forward(lm):
    """With α = 0 the penalty, the only user of the candidates' hidden states, is off: no
    k-candidate forward runs, and the tokens are those of the full path (α = 1e-30)."""
    prompts = lm.tokenize(PROMPTS)
    kw = dict(prompt_ids=prompts, k=8, beta=1.0, max_new_tokens=6, stop_at_period=False)
    scorer = word_scorer(["dog", "bus", "cat"])
    calls = []
    original = lm.candidate_step
    lm.candidate_step = lambda *a, **kw_: calls.append(1) or original(*a, **kw_)
    try:
        full = magic_search(lm, scorer, image_index(3), alpha=1e-30, **kw)
        n_full = len(calls)
        fast = magic_search(lm, scorer, image_index(3), alpha=0.0, **kw)
    finally:
        del lm.candidate_step
    assert n_full > 0 and len(calls) == n_full
    assert fast.ids == full.ids and fast.stop == full.stop


def test_tree_attention_in_bfloat16(lm):
    """A bf16 copy of the LM runs the same tree step (its mask in bf16) close to float32, and
    MAGIC with the penalty on decodes with it."""
    from nofree.lm.hf import left_pad

    fast = lm.to_dtype(torch.bfloat16)
    ids, mask = left_pad(lm.tokenize(PROMPTS), lm.pad_id)
    cands = torch.randint(3, lm.vocab_size, (len(PROMPTS), 4), generator=torch.Generator().manual_seed(2))
    ref = lm.candidate_step(cands, cache=lm.step(ids, attention_mask=mask).cache, attention_mask=mask)
    got = fast.candidate_step(cands, cache=fast.step(ids, attention_mask=mask).cache, attention_mask=mask)
    assert got.hidden.dtype == torch.float32
    torch.testing.assert_close(got.hidden, ref.hidden, atol=0.15, rtol=0.05)
    out = magic_search(fast, word_scorer(["dog", "bus", "cat"]), image_index(3),
                       prompt_ids=lm.tokenize(PROMPTS), k=6, alpha=0.2, beta=1.0, max_new_tokens=3,
                       stop_at_period=False)
    assert all(len(ids_) == 3 for ids_ in out.ids)


@pytest.mark.parametrize("instruction", ["", "write a short caption of the photo in the style of the red bus on the beach :"],
                         ids=["length-groups", "shared-start"])
def test_prefill_shares_and_groups_and_changes_nothing(lm, instruction):
    """Prompts with a long common start (a chat template, an instruction): the start runs once
    and its cache serves every row; the rest runs in groups of similar length whose caches are
    stacked with masked gaps. Same logits, hidden states and tokens as plain left padding and as
    each prompt decoded alone, rows in the callers' order."""
    from nofree.decoding.magic import SHARED_PREFIX_MIN, prefill
    from nofree.lm.hf import left_pad

    prompts = lm.tokenize([f"{instruction} the man riding a red bus with a dog on the", f"{instruction} a dog",
                           f"{instruction} cat on the sofa of the"])
    shared = 0
    while all(p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    shared = shared if shared >= SHARED_PREFIX_MIN else 0
    assert bool(shared) == bool(instruction), "the test needs prompts that share a long start"
    calls = []
    step = lm.step
    lm.step = lambda ids, **kw: calls.append(ids.shape) or step(ids, **kw)
    try:
        out, mask = prefill(lm, prompts)
    finally:
        del lm.step
    from nofree.decoding.magic import length_groups

    groups = length_groups([len(p) - shared for p in prompts])
    assert not shared or calls.pop(0) == (1, shared), "the common start must run once"
    assert len(groups) > 1 and len(calls) == len(groups), "the rest runs in groups of similar length"
    ids, plain_mask = left_pad(prompts, lm.pad_id)
    plain = lm.step(ids, attention_mask=plain_mask)
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-4, atol=1e-4)
    for row in range(len(prompts)):  # the real positions' hidden states, in order
        torch.testing.assert_close(out.hidden[row][mask[row].bool()],
                                   plain.hidden[row][plain_mask[row].bool()], rtol=1e-4, atol=1e-4)
    scorer = word_scorer(["dog", "bus", "beach"])
    batched = magic_search(lm, scorer, image_index(3), prompt_ids=prompts, k=lm.vocab_size,
                           alpha=0.1, beta=2.0, max_new_tokens=6)
    greedy = greedy_search(lm, prompts, max_new_tokens=6)
    for row in range(3):
        alone = magic_search(lm, scorer, image_index(3)[row:row + 1], prompt_ids=[prompts[row]],
                             k=lm.vocab_size, alpha=0.1, beta=2.0, max_new_tokens=6)
        assert batched.ids[row] == alone.ids[0]
        assert greedy.ids[row] == greedy_search(lm, [prompts[row]], max_new_tokens=6).ids[0]
